"""The Node.js client in process: its own quote, token, descriptor, receipt and counter checks.

The same in-process mesh as the SDK tests, reached over the gateway's public port (no client
certificate) directly or through a hostile gateway: a proxy that forwards to the real gateway
and lies the way a host can (forged instance descriptions, flipped `accepted` flags, quotes of
its own making under the dev PCK key, tokens signed by its own key, lost answers). The byte
formats are checked against veil.enclave.wire with known answers. The client runs as node_support
runs it (`make setup` installs its node_modules).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.client.evil_gateway import EvilGateway, evil_gateway
from tests.client.node_support import NODE_CLIENT, node_eval, run_node
from tests.gateway.support import InProcessMesh, token_config, write_fake_mesh_policy
from tests.verify import fakes
from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.identity import SigningIdentity, new_identity
from veil.services.common.errors import InvalidArgument, abort

OTHER_SIGNER = b"\xaa" * 32

# --- harness ------------------------------------------------------------------------------------


@dataclass
class HostileGateway(EvilGateway):
    """An EvilGateway that may also decide an Execute itself: `execute_hook(request, context,
    forward)` returns the reply (forwarding with `forward()` when it likes) or aborts."""

    execute_hook: Callable[[Any, grpc.ServicerContext, Callable[[], Any]], Any] | None = None

    def Execute(self, request: Any, context: grpc.ServicerContext) -> Any:
        if self.execute_hook is None:
            return super().Execute(request, context)
        self.calls["Execute"] += 1
        return self.execute_hook(request, context, lambda: self.upstream.Execute(request, timeout=10))


@pytest.fixture
def funded(mesh: InProcessMesh) -> tuple[SigningIdentity, SigningIdentity]:
    alice, bob = new_identity(mesh.data_dir, "alice"), new_identity(mesh.data_dir, "bob")
    write_fake_mesh_policy(mesh.data_dir)
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))  # pinned in instances.json
        admin.token("coins", alice).mint(alice.account, 100)  # counter 1, in counters.json
    return alice, bob


@pytest.fixture
def evil(mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HostileGateway, str]]:
    monkeypatch.setattr("tests.client.evil_gateway.EvilGateway", HostileGateway)
    yield from evil_gateway(mesh)  # type: ignore[misc]  # yields our subclass


def node_transfer(
    mesh: InProcessMesh, gateway: str, to: str, *extra: str, instance: str = "coins", amount: int = 10
) -> subprocess.CompletedProcess[str]:
    return run_node(
        str(NODE_CLIENT / "transfer.mjs"), "--gateway", gateway, "--server-name", "localhost",
        "--data-dir", str(mesh.data_dir), "--key", str(mesh.data_dir / "identities" / "alice.key"),
        "--instance", instance, "--to", to, "--amount", str(amount), *extra,
    )  # fmt: skip


REMOVE = object()  # a policy change that deletes the key


def _policy(mesh: InProcessMesh, tmp_path: Path, **changes: Any) -> str:
    policy = json.loads((mesh.data_dir / "expected-measurement.json").read_text())
    policy.update(changes)
    policy = {key: value for key, value in policy.items() if value is not REMOVE}
    path = tmp_path / f"policy-{secrets.token_hex(4)}.json"
    path.write_text(json.dumps(policy))
    return str(path)


def _balance(mesh: InProcessMesh, who: SigningIdentity) -> int:
    with mesh.connect() as client:
        balance: int = client.token("coins", who).balance()
        return balance


def _executed(mesh: InProcessMesh) -> int:
    return mesh.states[0].calls["Execute"]


def _refused(result: subprocess.CompletedProcess[str], *reasons: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    for reason in reasons:
        assert reason in result.stderr
    assert "    at " not in result.stderr  # a reason, not a stack trace


# --- the honest path ------------------------------------------------------------------------------


def test_node_client_transfers_with_verified_attestation_and_receipt(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    alice, bob = funded
    result = node_transfer(mesh, mesh.public_address, bob.account)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["account"] == alice.account
    assert document["balance"] == "90"
    assert document["counter"] == 2  # after the mint's counter 1, read from the shared counters.json
    assert document["verified"]["tcb_status"] == "Unevaluated"
    assert document["verified"]["jwks_pinned"] is False  # the fake mesh policy accepts ["*"]
    descriptor = mesh.states[0].harness.descriptors["coins"]
    assert document["verified"]["instance"] == {
        "instance_id": "coins",
        "config_hash": wire.config_hash(descriptor.config).hex(),
        "genesis_hash": descriptor.genesis_hash.hex(),
        "auth_scheme": "AUTH_SCHEME_SIGNATURE",
    }
    assert json.loads((mesh.data_dir / "counters.json").read_text())["coins"][alice.account] == 2
    assert _balance(mesh, bob) == 10


def test_node_client_resynchronises_its_counter_from_the_enclaves_typed_state(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    counters = tmp_path / "fresh-counters.json"  # knows nothing: the first sealing uses counter 1
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--counters", str(counters))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counter"] == 2  # ABORTED with CounterState(next_counter=2)
    assert json.loads(counters.read_text())["coins"][funded[0].account] == 2
    assert _balance(mesh, funded[1]) == 10


def test_node_client_prints_its_usage() -> None:
    result = run_node(str(NODE_CLIENT / "transfer.mjs"), "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("usage: node transfer.mjs")
    wrong = run_node(str(NODE_CLIENT / "transfer.mjs"), "--no-such-option")
    assert wrong.returncode == 2
    assert "usage:" in wrong.stderr
    assert "    at " not in wrong.stderr


# --- the bundle -------------------------------------------------------------------------------------


def _flip_quote(reply: Any) -> None:
    reply.quote = reply.quote[:60] + bytes([reply.quote[60] ^ 1]) + reply.quote[61:]


def _swap_keys(reply: Any) -> None:
    reply.keys.hpke_x25519_public_key = bytes(32)


def _break_token(reply: Any) -> None:
    reply.attestation_token = reply.attestation_token[:-4] + "AAAA"


def _other_nonce(reply: Any) -> None:
    reply.nonce = bytes(len(reply.nonce))


def _short_nonce(reply: Any) -> None:
    reply.nonce = reply.nonce[:31]


def _signer(mesh: InProcessMesh) -> fakes.PemPckSigner:
    """The dev PCK key and chain (what the sim QE signs with): quotes of the test's own making."""
    pki = mesh.pki_dir
    key = serialization.load_pem_private_key((pki / "sgx-pck-leaf-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    chain = b"".join(
        (pki / name).read_bytes() for name in ("sgx-pck-leaf.pem", "sgx-pck-ca.pem", "sgx-root.pem")
    )
    return fakes.PemPckSigner(key, chain)


def _requote(mesh: InProcessMesh, **forged: Any) -> Callable[[Any], None]:
    """Replace the bundle's quote by one PCK-signed end to end over the genuine enclave body
    (its measurements and report data), with the QE report changed as `forged` says."""
    qe_report_data = forged.pop("qe_report_data", None)

    def tamper(reply: Any) -> None:
        body = bytearray(reply.quote[48:432])
        if "report_data" in forged:
            body[320:384] = forged["report_data"](reply)
        parts = fakes.quote_parts(
            _signer(mesh), body=bytes(body), **{k: v for k, v in forged.items() if k != "report_data"}
        )
        if qe_report_data is not None:
            qe_report = bytearray(parts.qe_report)
            qe_report[320:384] = qe_report_data(parts)
            parts.qe_report = bytes(qe_report)
            parts.qe_report_signature = fakes.sign_raw(_signer(mesh).leaf_key, parts.qe_report)
        reply.quote = fakes.assemble_quote(parts)

    return tamper


def test_a_quote_rebuilt_under_the_dev_pck_key_with_intels_qe_passes(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    # The control for the forgeries below: the harness itself builds quotes the client accepts.
    servicer, address = evil
    servicer.on_attestation = _requote(mesh)
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 0, result.stderr


def _old_report_data(reply: Any) -> bytes:
    return hashlib.sha256(reply.runtime_data + reply.nonce).digest() + bytes(32)


def _tail(parts: fakes.QuoteParts) -> bytes:
    return hashlib.sha256(parts.attestation_key + parts.qe_auth_data).digest() + b"\x01" * 32


@pytest.mark.parametrize(
    ("forged", "reason"),
    [
        (
            {"qe_mrsigner": OTHER_SIGNER},
            f"QE report is not Intel's Quoting Enclave: MRSIGNER {OTHER_SIGNER.hex()} is not Intel's",
        ),
        ({"qe_isv_prod_id": 2}, "ISVPRODID 2 is not 1 (QE3)"),
        (
            {"qe_attributes": bytes([fakes.QE_ATTRIBUTES[0] | 0x02]) + fakes.QE_ATTRIBUTES[1:]},
            "debug Quoting Enclave",
        ),
        ({"qe_report_data": _tail}, "QE report data is not zero after the key binding"),
        ({"report_data": _old_report_data}, "quote report data does not bind the runtime data and nonce"),
    ],
    ids=["qe-mrsigner", "qe-isvprodid", "qe-debug", "qe-report-data-tail", "old-report-data-formula"],
)
def test_node_client_refuses_a_pck_signed_quote_of_another_qe_or_binding(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    forged: dict[str, Any],
    reason: str,
) -> None:
    servicer, address = evil
    servicer.on_attestation = _requote(mesh, **forged)
    result = node_transfer(mesh, address, funded[1].account)
    _refused(result, "attestation refused", reason)
    assert servicer.calls["Execute"] == 0


# --- policy, JWKS and the token's TCB status ------------------------------------------------------


def _own_token(kid: str | None) -> Callable[[Any], None]:
    """Re-sign the genuine token's claims with the gateway's own key, stating "UpToDate", and
    serve that key as the bundle's JWKS (under its own kid, or the genuine key's)."""

    def tamper(reply: Any) -> None:
        claims = jwt.decode(reply.attestation_token, options={"verify_signature": False})
        claims["x-ms-sgx-tcb-status"] = "UpToDate"
        key = ec.generate_private_key(ec.SECP256R1())
        key_id = kid or jwt.get_unverified_header(reply.attestation_token)["kid"]
        reply.attestation_token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": key_id})
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
        reply.jwks_json = json.dumps({"keys": [{**jwk, "kid": key_id, "alg": "ES256", "use": "sig"}]})

    return tamper


@pytest.mark.parametrize(
    ("kid", "reason"),
    [("gateway-key", "is not a known signing key of the pinned JWKS"), (None, "signature does not verify")],
    ids=["own-kid", "copied-kid"],
)
def test_node_client_verifies_the_token_only_against_the_pinned_jwks(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    tmp_path: Path,
    kid: str | None,
    reason: str,
) -> None:
    servicer, address = evil
    servicer.on_attestation = _own_token(kid)
    genuine = json.loads(mesh.states[0].bundle.jwks_json)
    policy = _policy(mesh, tmp_path, jwks=genuine, accepted_tcb_statuses=["UpToDate"])
    result = node_transfer(mesh, address, funded[1].account, "--policy", policy)
    _refused(result, "attestation refused: token", reason)
    assert servicer.calls["Execute"] == 0


def test_a_gateway_token_passes_only_a_policy_that_accepts_every_tcb_status(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    # The control: the forged token is well formed. Under ["*"] (no JWKS pinned) the client
    # trusts the quote binding alone, and says the status came from an unpinned key.
    servicer, address = evil
    servicer.on_attestation = _own_token("gateway-key")
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 0, result.stderr
    verified = json.loads(result.stdout)["verified"]
    assert (verified["tcb_status"], verified["jwks_pinned"]) == ("UpToDate", False)


def test_node_client_accepts_the_genuine_token_under_a_pinned_jwks(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    genuine = json.loads(mesh.states[0].bundle.jwks_json)
    policy = _policy(mesh, tmp_path, jwks=genuine, accepted_tcb_statuses=["Unevaluated"])
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--policy", policy)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["verified"]["jwks_pinned"] is True


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"accepted_tcb_statuses": ["UpToDate"]}, "must pin jwks"),
        ({"accepted_tcb_statuses": REMOVE}, "must pin jwks"),  # absent: the default restricts too
        ({"accepted_tcb_statuses": ["*", "UpToDate"]}, "must stand alone"),
        ({"accepted_tcb_statuses": ["Fine"]}, "unknown TCB status"),
        ({"accepted_tcb_statuses": []}, "must not be empty"),
        ({"jwks": {"keys": []}}, "non-empty"),
        ({"mrenclave": "abc"}, "mrenclave must be 32 bytes"),
        ({"extra": 1}, "unknown policy keys: extra"),
    ],
    ids=[
        "restricted",
        "default",
        "star-and-more",
        "unknown",
        "empty",
        "empty-jwks",
        "mrenclave",
        "unknown-key",
    ],
)
def test_node_client_refuses_an_unsafe_policy_before_fetching_anything(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    tmp_path: Path,
    changes: dict[str, Any],
    reason: str,
) -> None:
    servicer, address = evil
    result = node_transfer(mesh, address, funded[1].account, "--policy", _policy(mesh, tmp_path, **changes))
    _refused(result, "policy refused", reason)
    assert servicer.calls["GetAttestation"] == servicer.calls["Execute"] == 0


def test_node_client_refuses_another_measurement(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    policy = _policy(mesh, tmp_path, mrenclave=["11" * 32])
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--policy", policy)
    _refused(result, "MRENCLAVE")
    assert _executed(mesh) == 1  # only the fixture's mint


def test_node_client_refuses_an_enclave_pinned_to_another_keyvault(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    policy = _policy(mesh, tmp_path, keyvault_release_key="22" * 32)
    result = node_transfer(mesh, mesh.public_address, funded[1].account, "--policy", policy)
    _refused(result, "another keyvault")
    assert _executed(mesh) == 1  # only the fixture's mint


# --- the instance descriptor ------------------------------------------------------------------------


def _describe_as_none(reply: Any) -> None:
    reply.instance.config.auth_scheme = envelope_pb2.AUTH_SCHEME_NONE


def test_node_client_seals_under_the_descriptor_not_the_gateways_description(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    servicer, address = evil
    servicer.on_attestation = _describe_as_none  # the gateway says: anyone may act as anyone
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 0, result.stderr  # a signature proof, as the enclave signed it
    assert json.loads(result.stdout)["verified"]["instance"]["auth_scheme"] == "AUTH_SCHEME_SIGNATURE"
    assert _balance(mesh, funded[1]) == 10


def _forge_descriptor_config(reply: Any) -> None:
    config = envelope_pb2.InstanceConfig.FromString(reply.descriptor.config)
    config.auth_scheme = envelope_pb2.AUTH_SCHEME_NONE
    reply.descriptor.config = config.SerializeToString()
    _describe_as_none(reply)


def _other_instance(reply: Any) -> None:
    reply.descriptor.instance_id = "other"


def _no_descriptor(reply: Any) -> None:
    reply.ClearField("descriptor")


def _other_genesis(reply: Any) -> None:
    reply.descriptor.genesis_hash = bytes(32)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_flip_quote, "quote"),
        (_swap_keys, "keys"),
        (_break_token, "token"),
        (_other_nonce, "report data"),
        (_short_nonce, "nonce must be 32 bytes"),
        # the instance descriptor the client seals under
        (_forge_descriptor_config, "the instance descriptor is not signed by the attested enclave"),
        (_other_genesis, "the instance descriptor is not signed by the attested enclave"),
        (_other_instance, 'the instance descriptor names "other", not "coins"'),
        (_no_descriptor, 'the bundle carries no descriptor of instance "coins"'),
    ],
)
def test_node_client_refuses_a_tampered_bundle_and_sends_nothing(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    tamper: Any,
    reason: str,
) -> None:
    servicer, address = evil
    servicer.on_attestation = tamper
    result = node_transfer(mesh, address, funded[1].account)
    _refused(result, "attestation refused", reason)
    assert servicer.calls["Execute"] == 0


def test_node_client_checks_the_instance_pins(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    pins = mesh.data_dir / "instances.json"
    document = json.loads(pins.read_text())
    document["coins"]["genesis_hash"] = "33" * 32  # as if another instance had been created as coins
    pins.write_text(json.dumps(document))
    result = node_transfer(mesh, mesh.public_address, funded[1].account)
    _refused(result, "is not the pinned one")
    assert _executed(mesh) == 1


def test_an_ed25519_identity_never_sends_an_anonymous_proof(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    with mesh.connect() as admin:
        admin.create_instance(
            "notes",
            envelope_pb2.InstanceConfig(
                app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
            ),
        )
    before = _executed(mesh)
    result = node_transfer(mesh, mesh.public_address, funded[1].account, instance="notes")
    _refused(result, "authenticates nobody", "nothing was sent")
    assert _executed(mesh) == before


# --- answers and receipts -----------------------------------------------------------------------------


def test_node_client_detects_a_tampered_response(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    servicer, address = evil

    def flip(reply: Any) -> Any:
        sealed = reply.outcome.sealed_response
        reply.outcome.sealed_response = sealed[:20] + bytes([sealed[20] ^ 1]) + sealed[21:]
        return reply

    servicer.on_execute = flip
    result = node_transfer(mesh, address, funded[1].account)
    # The transfer ran; every answer is tampered with, the filler's too: the call is kept
    # (OutcomeUnknown, exit 3) to resume by its request id, never sent as a new one.
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert "does not authenticate" in result.stderr
    assert "resume it" in result.stderr


def _accepted(value: bool) -> Callable[[gateway_pb2.ExecuteResponse], gateway_pb2.ExecuteResponse]:
    def flip(reply: gateway_pb2.ExecuteResponse) -> gateway_pb2.ExecuteResponse:
        reply.outcome.accepted = value
        if value and not reply.outcome.sequence:
            reply.outcome.sequence = 99
        return reply

    return flip


def test_node_client_refuses_a_refusal_flipped_to_accepted(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    tmp_path: Path,
) -> None:
    # A counter the enclave refuses (no receipt) that the host reports as committed.
    servicer, address = evil
    servicer.on_execute = _accepted(True)
    result = node_transfer(mesh, address, funded[1].account, "--counters", str(tmp_path / "fresh.json"))
    _refused(result, "lacks its signed receipt")
    assert _balance(mesh, funded[1]) == 0


@pytest.mark.parametrize("amount", [10, 1000], ids=["committed", "app-refusal"])
def test_node_client_verifies_the_receipt_whatever_accepted_says(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    amount: int,
) -> None:
    # The enclave signed a receipt (the command is in the log: a transfer, or a transfer the
    # app refused, which still consumes its counter); the host says it was not accepted.
    servicer, address = evil
    servicer.on_execute = _accepted(False)
    result = node_transfer(mesh, address, funded[1].account, amount=amount)
    _refused(result, "the enclave signed a receipt for this command, yet the host says it was not accepted")


def test_node_client_to_an_ip_without_server_name_prints_no_node_warning(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    """Without --server-name the TLS name is 127.0.0.1 (checked against the certificate's
    address); Node's DEP0123 warning about an IP as TLS name used to take two stderr lines."""
    result = run_node(
        str(NODE_CLIENT / "transfer.mjs"), "--gateway", mesh.public_address,
        "--data-dir", str(mesh.data_dir), "--key", str(mesh.data_dir / "identities" / "alice.key"),
        "--instance", "coins", "--to", funded[1].account, "--amount", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert _balance(mesh, funded[1]) == 1


def test_node_client_usage_errors_say_what_is_wrong(tmp_path: Path) -> None:
    negative = run_node(
        str(NODE_CLIENT / "transfer.mjs"), "--as", "a", "--instance", "c", "--to", "b", "--amount", "-3"
    )
    assert negative.returncode == 2
    assert "--amount must be a whole number from 1 to" in negative.stderr
    missing = run_node(
        str(NODE_CLIENT / "transfer.mjs"), "--key", str(tmp_path / "nope.key"), "--data-dir", str(tmp_path),
        "--instance", "coins", "--to", "ab" * 32, "--amount", "1",
    )  # fmt: skip
    assert missing.returncode != 0
    assert "no such file" in missing.stderr  # (the policy file: the data dir is empty)
    assert "ENOENT" not in missing.stderr


def test_node_client_reports_an_app_refusal_with_its_verified_receipt(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    result = node_transfer(mesh, mesh.public_address, funded[1].account, amount=1000)
    _refused(result, "error: FAILED_PRECONDITION: insufficient balance")
    assert _balance(mesh, funded[1]) == 0


# --- counters: never run a command twice --------------------------------------------------------------


def _unopenable_status(context: grpc.ServicerContext) -> Any:
    abort(context, InvalidArgument("sealed to old keys", reason="COMMAND_UNOPENABLE"))


def _unopenable_outcome(context: grpc.ServicerContext) -> Any:
    error = error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT, message="cannot open")
    return gateway_pb2.ExecuteResponse(outcome=envelope_pb2.CommandOutcome(error=error))


def _over_budget_outcome(context: grpc.ServicerContext) -> Any:
    # Unsealed, so only the host vouches for it: a command that ran must not look refused.
    error = error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED, message="over budget")
    return gateway_pb2.ExecuteResponse(outcome=envelope_pb2.CommandOutcome(error=error))


LIES = [_unopenable_status, _unopenable_outcome, _over_budget_outcome]


@pytest.mark.parametrize("lie", LIES, ids=["status", "outcome", "over-budget"])
def test_a_command_that_ran_behind_an_unopenable_claim_gets_its_kept_answer(
    mesh: InProcessMesh,
    funded: tuple[SigningIdentity, SigningIdentity],
    evil: tuple[HostileGateway, str],
    lie: Callable[[grpc.ServicerContext], Any],
) -> None:
    servicer, address = evil
    sent: list[tuple[str, bytes]] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        sent.append((request.request_id, request.command.SerializeToString()))
        reply = forward()
        return lie(context) if len(sent) == 1 else reply  # it ran; the host says otherwise

    servicer.execute_hook = hook
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["balance"] == "90"
    # Sealed again under the same counter and the call's request id: the mesh answers with what
    # it recorded for the first sealing, which opens under that sealing's key (its receipt
    # verified): nothing more is sent.
    assert len(sent) == 2
    assert sent[0][0] == sent[1][0]
    assert sent[0][1] != sent[1][1]
    assert _balance(mesh, funded[1]) == 10  # once


def test_a_command_that_ran_and_whose_answer_stays_lost_is_never_sent_again(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    """Every answer to the first sealing is lost: the one under the same counter names it, with
    the answer the enclave kept with the counter, so the transfer reports its one run."""
    servicer, address = evil
    commands: list[bytes] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        commands.append(request.command.SerializeToString())
        reply = forward()
        return _unopenable_status(context) if commands[-1] == commands[0] else reply

    servicer.execute_hook = hook
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["balance"] == "90"
    assert len(commands) == 2  # the first sealing is never sent again
    assert _balance(mesh, funded[1]) == 10
    counters = json.loads((mesh.data_dir / "counters.json").read_text())
    assert counters["coins"][funded[0].account] == 2  # the counter it ran under


def test_a_rerun_after_a_resealing_ran_never_runs_twice(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    """The fourth review of stop 25, in the Node client: the first sealing of "row-7" never ran
    and its re-sealing, under a fresh wire id, did; a rerun under "row-7" after the calls journal
    was lost paid again. Every sealing now goes under the call's id, so the rerun gets the mesh's
    record of the one that ran (which it cannot open) and nothing runs; the rerun's own sealing
    then has its counter used up, so it can never run later and no later call waits for it."""
    servicer, address = evil
    dropped: list[bytes] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        if not dropped:  # never forwarded: the first sealing does not run
            dropped.append(request.command.SerializeToString())
            return _unopenable_status(context)
        return forward()

    servicer.execute_hook = hook
    result = node_transfer(mesh, address, funded[1].account, "--request-id", "row-7")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counter"] == 2  # the re-sealing, under the first sealing's counter
    shutil.rmtree(mesh.data_dir / "node-calls")  # the journal is lost; the counters are not
    rerun = node_transfer(mesh, address, funded[1].account, "--request-id", "row-7")
    assert rerun.returncode == 1, rerun.stdout
    assert "does not authenticate" in rerun.stderr
    assert _balance(mesh, funded[1]) == 10  # once
    # The rerun's sealing had its counter used up by a filler: the next transfer is not stuck
    # behind it (it runs under counter 4).
    following = node_transfer(mesh, address, funded[1].account)
    assert following.returncode == 0, following.stderr
    assert json.loads(following.stdout)["counter"] == 4
    assert _balance(mesh, funded[1]) == 20


def test_an_ambiguous_attempt_then_another_command_is_outcome_unknown(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    servicer, address = evil
    alice, bob = funded
    calls: list[str] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        calls.append(request.request_id)
        if len(calls) > 1:
            # The host drops the mesh's record (an honest one answers the re-sealing, under the
            # call's request id, with the first sealing's recorded answer): the enclave decides.
            request.request_id = "host-rewritten"
        reply = forward()
        if len(calls) == 1:  # it ran under counter 2; another command of alice's takes 3
            with mesh.connect() as other_device:
                other_device.token("coins", alice).mint(alice.account, 1)
            return _unopenable_status(context)
        return reply

    servicer.execute_hook = hook
    result = node_transfer(mesh, address, bob.account)
    assert result.returncode == 3, result.stderr
    assert "outcome" not in result.stdout
    assert "may have run" in result.stderr
    assert "from 2 to 3" in result.stderr
    assert len(calls) == 2  # never sealed under a new counter
    assert _balance(mesh, bob) == 10  # it had run, once


def test_a_gateway_that_never_answers_definitively_gets_outcome_unknown(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    servicer, address = evil
    sent: list[tuple[str, bytes]] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        sent.append((request.request_id, request.command.SerializeToString()))
        return _unopenable_status(context)  # never forwarded, but the client cannot know that

    servicer.execute_hook = hook
    result = node_transfer(mesh, address, funded[1].account)
    assert result.returncode == 3, result.stderr
    assert "6 attempts under counter 2 got no definitive answer" in result.stderr
    # Each sealed again under the same counter, never a new one, and under the call's request id.
    assert len({command for _, command in sent}) == 6
    assert len({rid for rid, _ in sent}) == 1
    assert servicer.calls["GetAttestation"] == 6  # attested again after each ambiguous answer


def test_a_rolled_back_counter_is_refused(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    counters = mesh.data_dir / "counters.json"
    document = json.loads(counters.read_text())
    document["coins"][funded[0].account] = 5  # we were told 5 was accepted; the enclave is at 1
    counters.write_text(json.dumps(document))
    result = node_transfer(mesh, mesh.public_address, funded[1].account)
    _refused(
        result, "the enclave asks for counter 2, but counter 5 was already accepted: its log was rolled back"
    )
    assert _balance(mesh, funded[1]) == 0


# --- byte formats and checks, against veil.enclave.wire -----------------------------------------------------


def test_report_data_and_descriptor_bytes_match_enclave_wire() -> None:
    runtime_data, nonce = secrets.token_bytes(77), secrets.token_bytes(32)
    config_hash, genesis = secrets.token_bytes(32), secrets.token_bytes(32)
    out = node_eval(
        f"""
        const runtime = Buffer.from("{runtime_data.hex()}", "hex");
        const nonce = Buffer.from("{nonce.hex()}", "hex");
        let short = null;
        try {{ veil.reportData(runtime, nonce.subarray(1)); }} catch (e) {{ short = e.message; }}
        const described = veil.instanceDescriptorBytes(
          "coins/é", Buffer.from("{config_hash.hex()}", "hex"), Buffer.from("{genesis.hex()}", "hex"));
        console.log(JSON.stringify({{
          report: veil.reportData(runtime, nonce).toString("hex"), short,
          descriptor: described.toString("hex"),
        }}));
        """
    )
    assert out["report"] == wire.report_data(runtime_data, nonce).hex()
    assert out["short"] == "nonce must be 32 bytes"
    assert out["descriptor"] == wire.instance_descriptor_bytes("coins/é", config_hash, genesis).hex()


def test_the_intel_qe_check_itself() -> None:
    out = node_eval(
        f"""
        const intel = {{ mrsigner: veil.INTEL_QE_MRSIGNER, isvProdId: 1, debug: false }};
        const cases = [intel, {{ ...intel, mrsigner: Buffer.from("{OTHER_SIGNER.hex()}", "hex") }},
                       {{ ...intel, isvProdId: 3 }}, {{ ...intel, debug: true }}];
        console.log(JSON.stringify(cases.map((qe) => {{
          try {{ veil.checkIntelQe(qe); return "ok"; }} catch (e) {{ return e.message; }}
        }})));
        """
    )
    assert out[0] == "ok"
    assert "MRSIGNER aaaa" in out[1]
    assert "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff" in out[1]
    assert "ISVPRODID 3 is not 1" in out[2]
    assert "debug Quoting Enclave" in out[3]
