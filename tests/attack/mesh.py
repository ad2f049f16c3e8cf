"""The gRPC services under attack: real in-process servers on port 0 over real mTLS.

A `ServiceTarget` says how to start one service and which identity may call which method (its
own authorization table). Its running form (`Running`) gives a channel per caller identity,
valid seed requests for every method (replays of which are refused or idempotent), what a
refused call must not change (`snapshot`), and which successes may change it (`may_change`).

`SERVICE_TARGETS` is the list the RPC attack tests are parametrized over; each service's
methods are enumerated from its descriptor. Adding the gateway is one entry: a `ServiceTarget`
whose `start` builds the gateway (over a `Lab`'s keyvault and state servers) and returns a
`Running`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from tests.conftest import config_on_free_ports, tls_for
from tests.keyvault.support import SIM_MRENCLAVE, FakeEnclave, policy_json, sim_provider
from veil.dev.loadclient import Account, mint, token_config, vault_config, vault_put
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.measurement import measure_source_tree
from veil.enclave.runner import build_enclave
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import apps_pb2, ecall_pb2
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common import identity
from veil.services.common.config import ServiceConfig
from veil.services.common.server import VeilServer
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.config import DEFAULT_ISSUER, KekConfig, KeyvaultConfig
from veil.services.keyvault.server import AUTHORIZATION as KEYVAULT_AUTHORIZATION
from veil.services.keyvault.server import SERVICE_NAME as KEYVAULT_SERVICE
from veil.services.keyvault.server import create_server as create_keyvault_server
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.state import lifecycle
from veil.services.state.config import StateConfig
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.runner import runner_options
from veil.services.state.server import AUTHORIZATION as STATE_AUTHORIZATION
from veil.services.state.server import SERVICE_NAME as STATE_SERVICE
from veil.services.state.server import create_server as create_state_server
from veil.state.v1 import state_pb2, state_pb2_grpc
from veil.verify.binding import expected_report_data

IDENTITIES = {
    "admin": identity.ADMIN,
    "gateway": identity.GATEWAY,
    "keyvault": identity.KEYVAULT,
    "state": identity.STATE,
}
#: The only statuses a refused request may get (never INTERNAL, UNKNOWN, DATA_LOSS, UNAVAILABLE...).
EXPECTED_REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.ABORTED,
    }
)
TIMEOUT = 20.0


#: The operator enclave policy of the test keyvaults: the sim enclave of this checkout (the state
#: service's) and the keyvault tests' fake enclave measurement (the keyvault seeds'), never debug.
OPERATOR_POLICY = policy_json(
    {
        "anyOf": [
            {"claim": "x-ms-sgx-mrenclave", "equals": measure_source_tree().hex()},
            {"claim": "x-ms-sgx-mrenclave", "equals": SIM_MRENCLAVE.hex()},
        ]
    },
    {"claim": "x-ms-sgx-is-debuggable", "equals": False},
    authority=DEFAULT_ISSUER,
    accepted_tcb=["UpToDate", "Unevaluated"],
)


class Running(Protocol):
    """A started service under attack."""

    target: ServiceTarget
    port: int
    seeds: Mapping[str, list[Message]]

    def channel(self, identity_name: str) -> grpc.Channel:
        """An mTLS channel presenting `identity_name`'s certificate (cached)."""
        ...

    def snapshot(self) -> object:
        """What no refused request may change (compared with ==)."""
        ...

    def may_change(self, method: str, response: bytes) -> bool:
        """Whether this successful response may have changed the snapshot legitimately."""
        ...

    def check_invariants(self, refused: bool) -> None:
        """Service-wide checks after a call (e.g. the audit chain still verifies)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServiceTarget:
    """A service to attack: its contract, its authorization table and how to start it."""

    name: str
    service: ServiceDescriptor
    authorization: Mapping[str, frozenset[str]]
    start: Callable[[Lab], Running]

    @property
    def methods(self) -> list[MethodDescriptor]:
        return list(self.service.methods)

    def path(self, method: str) -> str:
        return f"/{self.service.full_name}/{method}"

    def caller(self, method: str) -> str:
        """The identity allowed to call `method` (the first by name; fail closed if none)."""
        allowed = self.authorization.get(self.path(method), frozenset())
        names = sorted(name for name, spiffe in IDENTITIES.items() if spiffe in allowed)
        assert names, f"{self.path(method)} is callable by nobody"
        return names[0]


class _Channels:
    def __init__(self, pki_dir: Path, port: int) -> None:
        self._pki_dir, self._port = pki_dir, port
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, identity_name: str) -> grpc.Channel:
        if identity_name not in self._channels:
            credentials = channel_credentials(tls_for(self._pki_dir, identity_name))
            self._channels[identity_name] = grpc.secure_channel(f"127.0.0.1:{self._port}", credentials)
        return self._channels[identity_name]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def service_config(pki_dir: Path, service: str, directory: Path) -> ServiceConfig:
    """A service config on free ports (port 0) with the dev PKI."""
    return config_on_free_ports(pki_dir, service, directory, grace_seconds=1.0)


# --- keyvault ----------------------------------------------------------------------------------


class RunningKeyvault(_Channels):
    """A keyvault server with keys, a commit head and audit events to attack."""

    FUZZ_KEY = "instance.fuzz"
    HEAD_INSTANCE = "inst-1"
    LEASE_INSTANCE = "inst-leased"

    def __init__(self, lab: Lab, target: ServiceTarget | None = None) -> None:
        self.target = target or KEYVAULT
        directory = lab.directory(f"keyvault-{uuid.uuid4().hex[:8]}")
        policy_file = directory / "enclave-policy.json"
        policy_file.write_text(OPERATOR_POLICY)
        config = KeyvaultConfig(
            db=str(directory / "keyvault.db"),
            kek=KekConfig(provider="file", file=directory / "kek.bin"),
            attestation_root="dev",
            dev_root_path=lab.pki_dir / "sgx-root.pem",
            enclave_policy_file=policy_file,
        )
        self.server: VeilServer
        self.server, self.port = create_keyvault_server(
            service_config(lab.pki_dir, "keyvault", directory), keyvault_config=config
        )
        self.server.start()
        super().__init__(lab.pki_dir, self.port)
        # A second handle on the same database: the audit chain is checked by the library itself.
        self._audit_store = SqliteStore(directory / "keyvault.db")
        self._audit = AuditLog(self._audit_store, lambda: 0.0)
        self._audit_count = 0
        self.seeds = self._seed(lab.pki_dir)
        self._audit_count = self._audit.verify_chain()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stub(self, identity_name: str) -> keyvault_pb2_grpc.KeyvaultServiceStub:
        return keyvault_pb2_grpc.KeyvaultServiceStub(self.channel(identity_name))

    def attest(
        self, enclave: FakeEnclave, pki_dir: Path, *, debug: bool = False
    ) -> keyvault_pb2.AttestRequest:
        """A valid Attest request for `enclave`: a sim DCAP quote over its keys and a nonce."""
        nonce = os.urandom(32)
        quote = sim_provider(pki_dir, debug=debug).quote(expected_report_data(enclave.runtime_data, nonce))
        return keyvault_pb2.AttestRequest(quote=quote, runtime_data=enclave.runtime_data, nonce=nonce)

    def _seed(self, pki_dir: Path) -> dict[str, list[Message]]:
        state, admin = self.stub("state"), self.stub("admin")
        release_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=TIMEOUT).release_public_key
        enclave = FakeEnclave(keyvault_release_public_key=release_key)
        attest = self.attest(enclave, pki_dir)
        token = state.Attest(attest, timeout=TIMEOUT).token
        spent = state.Attest(self.attest(enclave, pki_dir), timeout=TIMEOUT).token
        policy = policy_json(
            {"claim": "x-ms-sgx-mrenclave", "equals": SIM_MRENCLAVE.hex()},
            authority=DEFAULT_ISSUER,
            accepted_tcb=["Unevaluated"],
        )
        create = keyvault_pb2.CreateKeyRequest(
            key_name=self.FUZZ_KEY, release_policy_json=policy, request_id="c-1"
        )
        rotate = keyvault_pb2.RotateKeyRequest(key_name=self.FUZZ_KEY, request_id="r-1")
        doomed = keyvault_pb2.CreateKeyRequest(
            key_name="doomed", release_policy_json=policy, request_id="c-2"
        )
        destroy = keyvault_pb2.DestroyKeyRequest(key_name="doomed", request_id="d-1")
        release = keyvault_pb2.ReleaseKeyRequest(token=spent, key_name=self.FUZZ_KEY)
        link = enclave.link(self.HEAD_INSTANCE, (0, bytes(32)), (1, bytes(range(32))))
        advance = keyvault_pb2.AdvanceCommitHeadRequest(
            instance_id=self.HEAD_INSTANCE, links=[link], token=token
        )
        admin.CreateKey(create, timeout=TIMEOUT)
        admin.RotateKey(rotate, timeout=TIMEOUT)
        admin.CreateKey(doomed, timeout=TIMEOUT)
        admin.DestroyKey(destroy, timeout=TIMEOUT)
        state.ReleaseKey(release, timeout=TIMEOUT)  # the seed replays a spent token
        state.AdvanceCommitHead(advance, timeout=TIMEOUT)  # the seed replays an applied head
        page = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=2), timeout=TIMEOUT)
        taken = state.AcquireLease(
            keyvault_pb2.AcquireLeaseRequest(
                instance_id=self.LEASE_INSTANCE, holder="fuzz-host", ttl_ms=60_000
            ),
            timeout=TIMEOUT,
        ).lease
        renew = keyvault_pb2.AcquireLeaseRequest(
            instance_id=self.LEASE_INSTANCE,
            holder="fuzz-host",
            ttl_ms=60_000,
            fencing_token=taken.fencing_token,
        )
        rival = keyvault_pb2.AcquireLeaseRequest(  # refused: the lease is held by fuzz-host
            instance_id=self.LEASE_INSTANCE, holder="rival-host", ttl_ms=1_000
        )
        seeds: dict[str, list[Message]] = {
            "Attest": [attest],
            "GetJwks": [keyvault_pb2.GetJwksRequest()],
            "ReleaseKey": [release],
            "CreateKey": [create, doomed],
            "RotateKey": [rotate],
            "ListKeys": [keyvault_pb2.ListKeysRequest()],
            "GetKey": [keyvault_pb2.GetKeyRequest(key_name=self.FUZZ_KEY)],
            "DestroyKey": [destroy],
            "GetCommitHead": [
                keyvault_pb2.GetCommitHeadRequest(instance_id=self.HEAD_INSTANCE),
                keyvault_pb2.GetCommitHeadRequest(
                    instance_id=self.HEAD_INSTANCE,
                    enclave_signing_public_key=enclave.signing_public_bytes,
                    challenge=bytes(32),
                ),
            ],
            "AdvanceCommitHead": [advance],
            "ListAuditEvents": [
                keyvault_pb2.ListAuditEventsRequest(page_size=5, page_token=page.next_page_token)
            ],
            "GetStatus": [keyvault_pb2.GetStatusRequest()],
            "AcquireLease": [renew, rival],
            "ListLeases": [keyvault_pb2.ListLeasesRequest()],
        }
        return seeds

    def snapshot(self) -> object:
        keys = self.stub("admin").ListKeys(keyvault_pb2.ListKeysRequest(), timeout=TIMEOUT).keys
        head = self.stub("state").GetCommitHead(
            keyvault_pb2.GetCommitHeadRequest(instance_id=self.HEAD_INSTANCE), timeout=TIMEOUT
        )
        leases = self.stub("state").ListLeases(keyvault_pb2.ListLeasesRequest(), timeout=TIMEOUT).leases
        return (
            tuple((k.key_name, k.latest_version, k.release_policy_json, k.destroyed) for k in keys),
            (head.sequence, head.hash, head.signing_public_key),
            # Who holds what under which token (a renewal moves only the expiry).
            tuple((lease.instance_id, lease.holder, lease.fencing_token) for lease in leases),
        )

    def may_change(self, method: str, response: bytes) -> bool:
        return method in {"CreateKey", "RotateKey", "DestroyKey", "AdvanceCommitHead", "AcquireLease"}

    def check_invariants(self, refused: bool) -> None:
        # The audit chain verifies end to end, and a refusal is recorded only as a refusal.
        count = self._audit.verify_chain()
        with self._audit_store.transaction() as tx:
            new = tx.list_audit(after_sequence=self._audit_count, limit=1000)
        if refused:
            outcomes = {event.outcome for event in new}
            assert outcomes <= {"refused"}, f"a refused call appended audit outcomes {outcomes}"
        self._audit_count = count

    def close(self) -> None:
        super().close()
        self.server.stop(0)
        self._audit_store.close()


# --- state -------------------------------------------------------------------------------------


class RunningState(_Channels):
    """A state server (own keyvault, in-process sim enclave) with two instances to attack."""

    def __init__(self, lab: Lab, target: ServiceTarget | None = None, *, memory_mb: int = 1) -> None:
        self.target = target or STATE
        self.keyvault = RunningKeyvault(lab)
        directory = lab.directory(f"state-{uuid.uuid4().hex[:8]}")
        base = service_config(lab.pki_dir, "state", directory)
        self.settings = StateConfig(
            service=base,
            keyvault_address=self.keyvault.address,
            database=str(directory / "state.db"),
            database_schema="unused",
            enclave_mode="sim",
            enclave_memory_mb=memory_mb,
            seal_dir=directory / "sealed",
            platform_secret=directory / "platform.key",
            pck_dir=lab.pki_dir,
            batch_linger_ms=0.5,
        )
        self.enclaves: list[Enclave] = []
        self.server, self.port = create_state_server(
            base, state_config=self.settings, enclave_factory=self._enclave
        )
        self.server.start()
        super().__init__(lab.pki_dir, self.port)
        self.gateway = state_pb2_grpc.StateServiceStub(self.channel("gateway"))
        self._wait_serving()
        self.keys = self.gateway.GetAttestation(
            state_pb2.GetAttestationRequest(), timeout=TIMEOUT
        ).bundle.keys
        self.issuer = ed25519.Ed25519PrivateKey.generate()
        self.seeds = self._seed()

    def _enclave(self) -> EnclaveHost:
        # The runner's own enclave, in process, so tests can read its state digest.
        enclave = build_enclave(runner_options(self.settings))
        self.enclaves.append(enclave)
        return EnclaveHost.from_dispatcher(Dispatcher(enclave))

    def _wait_serving(self) -> None:
        for _ in range(600):
            status = self.gateway.GetStatus(state_pb2.GetStatusRequest(), timeout=TIMEOUT)
            if status.step == lifecycle.SERVING:
                return
            assert status.step != lifecycle.FAILED, status.detail
            time.sleep(0.05)
        raise AssertionError("the state server never reported SERVING")

    def account(self, instance_id: str = "v", **kwargs: Any) -> Account:
        """A client account of an instance (anonymous on "v", signing on "t")."""
        return Account(self.keys, instance_id, **kwargs)

    def execute(
        self, sealed: Any, instance_id: str = "v", request_id: str | None = None
    ) -> state_pb2.ExecuteResponse:
        request = state_pb2.ExecuteRequest(
            instance_id=instance_id, command=sealed.command, request_id=request_id or sealed.request_id
        )
        response: state_pb2.ExecuteResponse = self.gateway.Execute(request, timeout=TIMEOUT)
        return response

    def _seed(self) -> dict[str, list[Message]]:
        create_v = state_pb2.CreateInstanceRequest(instance_id="v", config=vault_config(), request_id="cv")
        create_t = state_pb2.CreateInstanceRequest(
            instance_id="t", config=token_config(self.issuer), request_id="ct"
        )
        self.gateway.CreateInstance(create_v, timeout=TIMEOUT)
        self.gateway.CreateInstance(create_t, timeout=TIMEOUT)
        alice = self.account(name="alice")
        put = alice.seal(vault_put("r", b"hello"))
        assert self.execute(put).outcome.accepted
        executed = state_pb2.ExecuteRequest(instance_id="v", command=put.command, request_id=put.request_id)
        self.minter = self.account("t", signer=self.issuer)  # its counter lives on in the tests
        minted = self.minter.seal(mint("holder", 7))
        assert self.execute(minted, "t").outcome.accepted
        read = apps_pb2.VaultGet(owner="alice", record_id="r")
        get = alice.seal(apps_pb2.AppCall(vault=apps_pb2.VaultCall(get=read)), counter=0)
        return {
            "Execute": [executed],
            "Query": [state_pb2.QueryRequest(instance_id="v", command=get.command)],
            "CreateInstance": [create_v, create_t],
            "ListInstances": [state_pb2.ListInstancesRequest()],
            "GetAttestation": [state_pb2.GetAttestationRequest()],
            "GetStatus": [state_pb2.GetStatusRequest()],
            "Ping": [state_pb2.PingRequest(payload=b"ping")],
            # A replay of the executed command: the first answer again, nothing re-applied.
            "ExecuteBatch": [state_pb2.ExecuteBatchRequest(commands=[executed])],
        }

    @property
    def enclave(self) -> Enclave:
        return self.enclaves[-1]

    def snapshot(self) -> object:
        """Committed heads (database) and the enclave's instances, heads and state size.

        Every command that changes state is logged, so heads and state size cover balances,
        records and counters. (Not the enclave's whole digest: it includes provisioned keys,
        and a refused CreateInstance leaves one behind; see test_state_attacks.)
        """
        listed = self.gateway.ListInstances(state_pb2.ListInstancesRequest(), timeout=TIMEOUT).instances
        heads = tuple((i.instance_id, i.head.sequence, i.head.hash) for i in listed)
        status = self.enclave.get_status(ecall_pb2.GetStatusRequest())
        for instance in status.instances:
            # What the keyvault vouched for to this boot, not state: it moves whenever the keyvault
            # speaks (a query's read fence brings it up to date; hold keys leave it behind).
            instance.ClearField("confirmed")
        return heads, status.SerializeToString(deterministic=True)

    def may_change(self, method: str, response: bytes) -> bool:
        if method == "Execute":
            return state_pb2.ExecuteResponse.FromString(response).outcome.accepted
        if method == "ExecuteBatch":
            first = state_pb2.ExecuteBatchResponse.FromString(response)
            return first.HasField("response") and first.response.outcome.accepted
        return method == "CreateInstance"

    def check_invariants(self, refused: bool) -> None:
        status = self.gateway.GetStatus(state_pb2.GetStatusRequest(), timeout=TIMEOUT)
        assert status.step == lifecycle.SERVING, f"the state service left SERVING: {status.detail}"

    def close(self) -> None:
        super().close()
        self.server.stop(1)
        self.keyvault.close()


# --- the lab -----------------------------------------------------------------------------------


@dataclass
class Lab:
    """Starts services on demand (once each) under one PKI and data directory; closes them all."""

    pki_dir: Path
    root: Path
    running: dict[str, Running] = field(default_factory=dict)

    def directory(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def get(self, target: ServiceTarget) -> Running:
        if target.name not in self.running:
            self.running[target.name] = target.start(self)
        return self.running[target.name]

    def close(self) -> None:
        for running in reversed(list(self.running.values())):
            running.close()
        self.running.clear()


KEYVAULT = ServiceTarget(
    "keyvault",
    keyvault_pb2.DESCRIPTOR.services_by_name["KeyvaultService"],
    KEYVAULT_AUTHORIZATION,
    RunningKeyvault,
)
STATE = ServiceTarget(
    "state",
    state_pb2.DESCRIPTOR.services_by_name["StateService"],
    STATE_AUTHORIZATION,
    RunningState,
)
#: Every gRPC service the RPC attacks cover. The gateway joins with one ServiceTarget here.
SERVICE_TARGETS: tuple[ServiceTarget, ...] = (KEYVAULT, STATE)
assert KEYVAULT.service.full_name == KEYVAULT_SERVICE
assert STATE.service.full_name == STATE_SERVICE
