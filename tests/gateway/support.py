"""An in-process mesh for gateway and SDK tests: real gateway, real enclave, real tokens.

`EnclaveState` is a StateService built from the generated servicer over a real in-process
enclave (sim quote provider with the session's dev PCK chain), with the state contract the
gateway relies on: durable-style request_id dedupe (a repeated id returns the first result),
NOT_FOUND for unknown instances, the attestation bundle with a keyvault-style token issued by
the keyvault's own TokenIssuer after the keyvault's own quote verifier passed. It also counts
calls so tests can assert that refused requests never reached it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.conftest import tls_for
from tests.enclave.support import KEYVAULT_RELEASE_KEY, Harness
from veil.dev.policies import DEV_MIN_SVN, DEV_PRODUCT_ID
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.enclave.runner import RunnerOptions, build_enclave
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.client import VeilClient, connect
from veil.sdk.trust_policy import ANY_TCB_STATUS, POLICY_FILE, ExpectedMeasurement, save_policy
from veil.services.common.config import ServiceConfig
from veil.services.common.errors import DeadlineExceeded, Unavailable, abort
from veil.services.common.server import VeilServer
from veil.services.gateway.config import GatewayConfig
from veil.services.gateway.server import create_server as create_gateway
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.errors import from_ecall, from_outcome_error
from veil.services.state.server import build_state_server
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.verify import verify_quote
from veil.verify.roots import load_root_pem

ISSUER = "https://keyvault.veil.test"


# The release key the fake keyvault signs with (the enclave harness's); clients pin its public half.
FAKE_KEYVAULT_RELEASE_KEY = KEYVAULT_RELEASE_KEY
FAKE_KEYVAULT_RELEASE_PUBLIC = FAKE_KEYVAULT_RELEASE_KEY.public_key().public_bytes_raw()


def write_fake_mesh_policy(data_dir: Path) -> Path:
    """Write the policy file the CLI reads, pinning this fake mesh."""
    return save_policy(fake_mesh_policy(), data_dir / POLICY_FILE)


def fake_mesh_policy() -> ExpectedMeasurement:
    """The dev policy for this mesh: the fake keyvault's release key and token issuer, any TCB status.

    The fake keyvault verifies quotes without collateral ("Unevaluated") and makes a new token
    key per module, so the policy accepts every TCB status and leaves the JWKS unpinned (the
    only unpinned form a policy may take); tests that restrict the status pin the bundle's JWKS.
    """
    return ExpectedMeasurement(
        mrenclaves=(measure_source_tree(),),
        mrsigner=DEV_MRSIGNER,
        product_id=DEV_PRODUCT_ID,
        min_svn=DEV_MIN_SVN,
        accepted_tcb_statuses=(ANY_TCB_STATUS,),
        root="dev",
        issuer=ISSUER,
        keyvault_release_key=FAKE_KEYVAULT_RELEASE_PUBLIC,
    )


class TokenAuthority:
    """The keyvault's token issuing, on its real libraries (SQLite store, file KEK)."""

    def __init__(self, directory: Path, *, ttl_s: int = 600) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.store = SqliteStore(directory / "keyvault.db")
        clock = time.time
        ring = SigningKeyRing(self.store, FileKek(directory / "kek.key"), clock, AuditLog(self.store, clock))
        self.ring = ring
        self.issuer = TokenIssuer(ring, issuer=ISSUER, clock=clock, token_ttl_s=ttl_s)

    def jwks_json(self) -> str:
        return json.dumps(self.ring.jwks())

    def close(self) -> None:
        self.store.close()


class _ItemAborted(Exception):
    def __init__(self, status: bytes) -> None:
        super().__init__("aborted")
        self.status = status


class _ItemContext:
    """One batched command's context: its abort becomes that command's status."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def abort_with_status(self, status: grpc.Status) -> None:
        details = dict(status.trailing_metadata or ())["grpc-status-details-bin"]
        assert isinstance(details, bytes)
        raise _ItemAborted(details)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def execute_batch_over(
    execute: Any, request: state_pb2.ExecuteBatchRequest, context: grpc.ServicerContext
) -> Iterator[state_pb2.ExecuteBatchResponse]:
    """A fake state's ExecuteBatch from its Execute, one command after another (the real
    service's is veil.services.state.server)."""
    for index, command in enumerate(request.commands):
        try:
            response = execute(command, _ItemContext(context))
        except _ItemAborted as aborted:
            yield state_pb2.ExecuteBatchResponse(index=index, status=aborted.status)
        else:
            yield state_pb2.ExecuteBatchResponse(index=index, response=response)


class EnclaveState(state_pb2_grpc.StateServiceServicer):
    """A state replica over a real in-process enclave, as an honest host with the test keyvault
    (tests.enclave.support.Harness: statements, links, confirmations); no persistence."""

    def __init__(
        self,
        pki_dir: Path,
        workdir: Path,
        authority: TokenAuthority,
        *,
        jwks_in_bundle: bool = True,
        debug: bool = False,
    ):
        workdir.mkdir(parents=True, exist_ok=True)
        options = RunnerOptions(
            quote_provider="sim",
            seal_provider="sim",
            pck_dir=pki_dir,
            platform_secret=workdir / "cpu",
            debug=debug,
        )
        self.harness = Harness.start(
            build_enclave(options), keyvault_release_public_key=FAKE_KEYVAULT_RELEASE_PUBLIC
        )
        self.host = self.harness.host
        keys = self.harness.keys
        nonce = secrets.token_bytes(32)
        quoted = self.host.get_quote(nonce)
        verified = verify_quote(quoted.quote, root_public_key=load_root_pem(pki_dir / "sgx-root.pem"))
        token = authority.issuer.issue(
            verified,
            runtime_data=quoted.runtime_data,
            nonce=nonce,
            quote_hash=hashlib.sha256(quoted.quote).digest(),
        )
        self.bundle = gateway_pb2.GetAttestationResponse(
            quote=quoted.quote,
            runtime_data=quoted.runtime_data,
            nonce=nonce,
            attestation_token=token.token,
            keys=keys,
            jwks_json=authority.jwks_json() if jwks_in_bundle else "",
        )
        self.keys = keys
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self.deadlines: list[float | None] = []
        self._lock = threading.Lock()
        self._configs: dict[str, envelope_pb2.InstanceConfig] = {}
        self._responses: dict[tuple[str, str], Any] = {}

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1

    def GetAttestation(self, request: state_pb2.GetAttestationRequest, context: grpc.ServicerContext) -> Any:
        self._count("GetAttestation")
        descriptor = self.harness.descriptors.get(request.instance_id) if request.instance_id else None
        return state_pb2.GetAttestationResponse(bundle=self.bundle, descriptor=descriptor)

    def CreateInstance(self, request: state_pb2.CreateInstanceRequest, context: grpc.ServicerContext) -> Any:
        self._count("CreateInstance")
        with self._lock:
            done = self._responses.get((request.instance_id, request.request_id))
            if done is not None:
                return done
            try:
                self.harness.create(request.instance_id, request.config)
            except EnclaveCallError as error:
                abort(context, from_ecall(error.code, error.message, method="CreateInstance"))
                raise AssertionError("unreachable") from None
            descriptor = self.harness.descriptors[request.instance_id]
            self._configs[request.instance_id] = envelope_pb2.InstanceConfig.FromString(descriptor.config)
            response = state_pb2.CreateInstanceResponse(
                instance=state_pb2.Instance(
                    instance_id=request.instance_id,
                    config=self._configs[request.instance_id],
                    head=envelope_pb2.CommitHead(sequence=1, hash=descriptor.genesis_hash),
                ),
                descriptor=descriptor,
            )
            self._responses[(request.instance_id, request.request_id)] = response
            return response

    def ListInstances(self, request: state_pb2.ListInstancesRequest, context: grpc.ServicerContext) -> Any:
        self._count("ListInstances")
        heads = {i.instance_id: i.head for i in self.host.get_status().instances}
        with self._lock:
            configs = dict(self._configs)
        return state_pb2.ListInstancesResponse(
            instances=[
                state_pb2.Instance(instance_id=i, config=c, head=heads.get(i))
                for i, c in sorted(configs.items())
            ]
        )

    def Execute(self, request: state_pb2.ExecuteRequest, context: grpc.ServicerContext) -> Any:
        self._count("Execute")
        self.deadlines.append(context.time_remaining())
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            done = self._responses.get((request.instance_id, request.request_id))
            if done is not None:
                return done
            try:
                (outcome,) = self.harness.execute(request.instance_id, [request.command]).outcomes
            except EnclaveCallError as error:
                abort(context, from_ecall(error.code, error.message, method="ExecuteBatch"))
                raise AssertionError("unreachable") from None
            if outcome.HasField("error"):
                abort(context, from_outcome_error(outcome.error.code, outcome.error.message))
            response = state_pb2.ExecuteResponse(outcome=outcome)
            if outcome.accepted:
                self._responses[(request.instance_id, request.request_id)] = response
            return response

    def ExecuteBatch(
        self, request: state_pb2.ExecuteBatchRequest, context: grpc.ServicerContext
    ) -> Iterator[state_pb2.ExecuteBatchResponse]:
        self._count("ExecuteBatch")
        return execute_batch_over(self.Execute, request, context)

    def Query(self, request: state_pb2.QueryRequest, context: grpc.ServicerContext) -> Any:
        self._count("Query")
        try:
            response = self.host.query(request.instance_id, request.command, int(time.time() * 1000))
        except EnclaveCallError as error:
            abort(context, from_ecall(error.code, error.message, method="Query"))
            raise AssertionError("unreachable") from None
        outcome = response.outcome
        if outcome.HasField("error"):
            abort(context, from_outcome_error(outcome.error.code, outcome.error.message))
        if response.read_round:  # the honest host's read fence with the test keyvault
            with self._lock:
                self.harness.read_fence(request.instance_id)
            self.harness.unwrap_read(request.instance_id, response.read_round, outcome)
        return state_pb2.QueryResponse(outcome=outcome)

    def GetStatus(self, request: state_pb2.GetStatusRequest, context: grpc.ServicerContext) -> Any:
        return state_pb2.GetStatusResponse(step=state_pb2.LIFECYCLE_STEP_SERVING, detail="serving")

    def Ping(self, request: state_pb2.PingRequest, context: grpc.ServicerContext) -> Any:
        return state_pb2.PingResponse(payload=request.payload)

    def head(self, instance_id: str) -> int:
        """The instance's committed sequence inside the enclave."""
        for instance in self.host.get_status().instances:
            if instance.instance_id == instance_id:
                return instance.head.sequence
        return 0


@dataclass
class InProcessMesh:
    """State replicas and a gateway on port 0, with the dev PKI."""

    pki_dir: Path
    states: list[EnclaveState]
    state_servers: list[VeilServer]
    gateway: VeilServer
    servers: list[VeilServer] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    @property
    def public_address(self) -> str:
        """The TLS-only listener (no client certificate)."""
        return f"127.0.0.1:{self.gateway.public_port}"

    @property
    def data_dir(self) -> Path:
        return self.pki_dir.parent

    @property
    def state_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.state_servers]

    def policy(self) -> ExpectedMeasurement:
        return fake_mesh_policy()

    def connect(
        self, *, admin: bool = True, policy: ExpectedMeasurement | None = None, **options: Any
    ) -> VeilClient:
        """An SDK client: admin certificate on the mTLS port, or (`admin=False`) none on the public port."""
        pki = self.pki_dir
        credentials: dict[str, Any] = (
            {"cert": pki / "admin.pem", "key": pki / "admin-key.pem"} if admin else {}
        )
        return connect(
            self.address if admin else self.public_address,
            policy=policy or self.policy(),
            ca=pki / "ca.pem",
            data_dir=self.data_dir,
            **credentials,
            **options,
        )

    def stop(self) -> None:
        self.gateway.stop(0)
        for server in self.state_servers:
            server.stop(0)


def start_state(state_config: ServiceConfig, state: EnclaveState) -> VeilServer:
    """Serve `state` with the state service's real mTLS server and authorization table."""
    server = build_state_server(state_config, state)
    server.start()
    server.set_serving(True)
    return server


def start_mesh(
    pki_dir: Path,
    workdir: Path,
    authority: TokenAuthority,
    *,
    replicas: int = 1,
    gateway_options: dict[str, Any] | None = None,
    jwks_in_bundle: bool = True,
    pin: dict[str, int] | None = None,
) -> InProcessMesh:
    """Start `replicas` enclave-backed state servers and a gateway in front of them.

    `pin` places instances on replicas by index (the gateway's explicit shard map).
    """
    states, servers = [], []
    for index in range(replicas):
        state = EnclaveState(pki_dir, workdir / f"state-{index}", authority, jwks_in_bundle=jwks_in_bundle)
        config = ServiceConfig(
            service="state",
            listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            tls=tls_for(pki_dir, "state"),
            data_dir=workdir / f"state-{index}",
            grace_seconds=0.5,
        )
        states.append(state)
        servers.append(start_state(config, state))
    addresses = tuple(f"127.0.0.1:{s.port}" for s in servers)
    options = {
        "keyvault_address": "127.0.0.1:1",
        "public_listen": "127.0.0.1:0",
        "shard_map": {instance: addresses[index] for instance, index in (pin or {}).items()},
        **(gateway_options or {}),
    }
    gateway_config = GatewayConfig(state_addresses=addresses, **options)
    gateway_service = ServiceConfig(
        service="gateway",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        tls=tls_for(pki_dir, "gateway"),
        data_dir=workdir / "gateway",
        grace_seconds=0.5,
    )
    gateway, _ = create_gateway(gateway_service, gateway=gateway_config)
    gateway.start()
    return InProcessMesh(pki_dir, states, servers, gateway)


def mesh_fixture(pki_dir: Path, tmp_path: Path, **options: Any) -> Iterator[InProcessMesh]:
    """Start a mesh with its own data dir (a copy of the session's PKI) and stop it afterwards."""
    own_pki = tmp_path / "data" / "pki"
    shutil.copytree(pki_dir, own_pki)  # identities, counters and policies stay per test
    authority = TokenAuthority(tmp_path / "keyvault")
    mesh = start_mesh(own_pki, tmp_path, authority, **options)
    try:
        yield mesh
    finally:
        mesh.stop()
        authority.close()


def token_config(issuer_public_key: bytes) -> envelope_pb2.InstanceConfig:
    return envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_TOKEN,
        auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
        token_issuer_public_key=issuer_public_key,
    )


def fail_once(
    state: EnclaveState,
    request_id: str,
    monkeypatch: Any,
    *,
    lose_answer: bool,
) -> list[str]:
    """Make the replica fail the command `request_id` once: after running it, its answer lost
    on the way (`lose_answer`, DEADLINE_EXCEEDED), or before running it (UNAVAILABLE
    NOT_SERVING). Returns the list the request id is put in when that happened. (On a mesh
    without gateway authentication the replica sees the caller's id as it is.)"""
    honest = state.Execute
    failed: list[str] = []

    def failing(request: state_pb2.ExecuteRequest, context: grpc.ServicerContext) -> Any:
        if request.request_id != request_id or failed:
            return honest(request, context)
        failed.append(request.request_id)
        if not lose_answer:
            abort(context, Unavailable("not serving yet", reason="NOT_SERVING"))
        honest(request, context)
        abort(context, DeadlineExceeded("lost on the way", reason="DEADLINE_EXCEEDED"))
        raise AssertionError("unreachable")

    monkeypatch.setattr(state, "Execute", failing)
    return failed


class FailedCall(grpc.RpcError):
    """A replica call that failed with `code` and `details` and no `google.rpc.Status` attached
    (a dropped connection, or an upstream that sent no details): what the gateway's `translate`
    must turn into a public error. Shared by the translation and coalescing tests."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()
