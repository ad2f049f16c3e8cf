"""KeyvaultService over real mTLS on port 0: the whole enclave flow, authorization, error mapping."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tests.conftest import refused
from veil.enclave import wire
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.keyvault.keys import ReleasedKey
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost
from veil.status import error_info
from veil.verify.binding import expected_report_data
from veil.verify.tokens import verify_token

from .support import (
    SIM_MRENCLAVE,
    FakeEnclave,
    Stubs,
    dev_keyvault_config,
    keyvault_stub,
    policy_json,
    release_signature_verifies,
    sim_keyvault_config,
    sim_provider,
)

ISSUER = "spiffe://veil/keyvault"
INSTANCE = "inst-1"


def attest(
    state: keyvault_pb2_grpc.KeyvaultServiceStub, pki_dir: Path, enclave: FakeEnclave, *, debug: bool = False
) -> str:
    nonce = os.urandom(32)
    quote = sim_provider(pki_dir, debug=debug).quote(expected_report_data(enclave.runtime_data, nonce))
    response = state.Attest(
        keyvault_pb2.AttestRequest(quote=quote, runtime_data=enclave.runtime_data, nonce=nonce), timeout=10
    )
    return response.token


def test_enclave_flow_end_to_end(stub: Stubs, pki_dir: Path) -> None:
    admin, state, gateway = stub("admin"), stub("state"), stub("gateway")
    release_public_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
    assert len(release_public_key) == 32
    enclave = FakeEnclave(keyvault_release_public_key=release_public_key)
    policy = policy_json(
        {"claim": "x-ms-sgx-mrenclave", "equals": SIM_MRENCLAVE.hex()},
        authority=ISSUER,
        accepted_tcb=["UpToDate", "Unevaluated"],
    )
    created = state.CreateKey(
        keyvault_pb2.CreateKeyRequest(
            key_name="instance.inst-1", release_policy_json=policy, request_id="r1"
        ),
        timeout=10,
    )
    assert created.key.latest_version == 1
    assert created.key.create_time.seconds > 0

    token = attest(state, pki_dir, enclave)
    published = gateway.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10)
    assert published.release_public_key == release_public_key
    jwks = json.loads(published.jwks_json)
    verified = verify_token(token, jwks, issuer=ISSUER, now=time.time())
    assert verified.mrenclave == SIM_MRENCLAVE.hex()

    released = state.ReleaseKey(
        keyvault_pb2.ReleaseKeyRequest(token=token, key_name="instance.inst-1"), timeout=10
    )
    as_released = ReleasedKey(
        name=released.key_name,
        version=released.version,
        encapsulated_key=released.encapsulated_key,
        wrapped_key=released.wrapped_key,
        signature=released.signature,
    )
    assert len(enclave.open(as_released)) == 32
    # The release signature verifies with the published key, for this enclave's HPKE key only.
    assert release_signature_verifies(as_released, enclave.hpke_public_bytes, release_public_key)
    assert not release_signature_verifies(as_released, FakeEnclave().hpke_public_bytes, release_public_key)
    assert refused(
        lambda: state.ReleaseKey(
            keyvault_pb2.ReleaseKeyRequest(token=token, key_name="instance.inst-1"), timeout=10
        )
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "TOKEN_REPLAYED",
    )

    head_hash = hashlib.sha256(b"entry 3").digest()
    link = enclave.link(INSTANCE, (0, bytes(32)), (3, head_hash))
    advanced = state.AdvanceCommitHead(
        keyvault_pb2.AdvanceCommitHeadRequest(instance_id=INSTANCE, links=[link], token=token), timeout=10
    )
    assert advanced.sequence == 3
    # The answer is the release key's confirmation of the stored head (a strict enclave needs it).
    release_verifier = Ed25519PublicKey.from_public_bytes(release_public_key)
    confirmation = advanced.confirmation
    assert (confirmation.head.sequence, confirmation.head.hash) == (3, head_hash)
    assert confirmation.enclave_signing_public_key == enclave.signing_public_bytes  # for this boot
    release_verifier.verify(
        confirmation.signature,
        wire.head_confirmation_bytes(INSTANCE, 3, head_hash, enclave.signing_public_bytes),
    )
    head = state.GetCommitHead(keyvault_pb2.GetCommitHeadRequest(instance_id=INSTANCE), timeout=10)
    assert (head.sequence, head.hash, head.signing_public_key) == (3, head_hash, enclave.signing_public_bytes)
    # The operator reads the same head (veil status: the head lag), never a statement.
    assert admin.GetCommitHead(keyvault_pb2.GetCommitHeadRequest(instance_id=INSTANCE), timeout=10) == head
    assert (head.genesis_hash, head.config_hash) == (link.genesis_hash, link.config_hash)
    assert not head.HasField("statement")  # no enclave key and challenge asked: no statement
    # The statement Create/Restore require: the head, for the asking enclave key and challenge only.
    fresh_enclave = FakeEnclave(keyvault_release_public_key=release_public_key)
    challenge = os.urandom(32)
    signed = state.GetCommitHead(
        keyvault_pb2.GetCommitHeadRequest(
            instance_id=INSTANCE,
            enclave_signing_public_key=fresh_enclave.signing_public_bytes,
            challenge=challenge,
        ),
        timeout=10,
    ).statement
    assert (signed.head.sequence, signed.head.hash, signed.challenge) == (3, head_hash, challenge)
    assert signed.enclave_signing_public_key == fresh_enclave.signing_public_bytes
    release_verifier.verify(signed.signature, wire.head_statement_bytes(signed))
    for bad in (
        keyvault_pb2.GetCommitHeadRequest(
            instance_id=INSTANCE, enclave_signing_public_key=b"k", challenge=challenge
        ),
        keyvault_pb2.GetCommitHeadRequest(
            instance_id=INSTANCE, enclave_signing_public_key=fresh_enclave.signing_public_bytes
        ),
    ):
        assert refused(functools.partial(state.GetCommitHead, bad, timeout=10))[0] == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
    old_hash = hashlib.sha256(b"entry 2").digest()
    rollback = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=INSTANCE, links=[enclave.link(INSTANCE, (1, old_hash), (2, old_hash))], token=token
    )
    assert refused(lambda: state.AdvanceCommitHead(rollback, timeout=10)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "COMMIT_HEAD_ROLLBACK",
    )
    unlinked = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=INSTANCE, sequence=4, hash=old_hash, token=token
    )
    assert (
        refused(lambda: state.AdvanceCommitHead(unlinked, timeout=10))[0] == grpc.StatusCode.INVALID_ARGUMENT
    )
    empty = state.GetCommitHead(keyvault_pb2.GetCommitHeadRequest(instance_id="never"), timeout=10)
    assert (empty.sequence, empty.hash) == (0, b"")
    unknown = state.GetCommitHead(
        keyvault_pb2.GetCommitHeadRequest(
            instance_id="never",
            enclave_signing_public_key=fresh_enclave.signing_public_bytes,
            challenge=challenge,
        ),
        timeout=10,
    ).statement
    # "No such instance" is a signed statement too (sequence 0, no genesis).
    assert (unknown.head.sequence, unknown.genesis_hash) == (0, b"")
    release_verifier.verify(unknown.signature, wire.head_statement_bytes(unknown))

    page = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=100), timeout=10)
    actions = [(event.action, event.outcome) for event in page.events]
    assert actions == [
        ("create_release_key", "allowed"),  # at the first start over an empty store
        ("create", "allowed"),
        ("attest", "allowed"),
        ("release", "allowed"),
        ("release", "refused"),
        ("advance_commit_head", "allowed"),
        ("advance_commit_head", "refused"),
        ("advance_commit_head", "refused"),
    ]
    assert {event.caller for event in page.events[1:]} == {"spiffe://veil/state"}
    assert json.loads(page.events[0].detail_json)["release_public_key"] == release_public_key.hex()
    assert all(
        later.previous_hash == earlier.hash
        for earlier, later in zip(page.events, page.events[1:], strict=False)
    )


def test_admin_key_management(stub: Stubs) -> None:
    admin = stub("admin")
    policy = policy_json({"claim": "x-ms-sgx-svn", "greaterOrEquals": 1}, authority=ISSUER)
    admin.CreateKey(keyvault_pb2.CreateKeyRequest(key_name="orders", release_policy_json=policy), timeout=10)
    rotated = admin.RotateKey(
        keyvault_pb2.RotateKeyRequest(key_name="orders", request_id="rot-1"), timeout=10
    )
    again = admin.RotateKey(keyvault_pb2.RotateKeyRequest(key_name="orders", request_id="rot-1"), timeout=10)
    assert rotated.key.latest_version == again.key.latest_version == 2
    assert [k.key_name for k in admin.ListKeys(keyvault_pb2.ListKeysRequest(), timeout=10).keys] == ["orders"]
    destroyed = admin.DestroyKey(keyvault_pb2.DestroyKeyRequest(key_name="orders"), timeout=10)
    assert destroyed.key.destroyed
    assert admin.GetKey(keyvault_pb2.GetKeyRequest(key_name="orders"), timeout=10).key.destroyed
    assert refused(lambda: admin.GetKey(keyvault_pb2.GetKeyRequest(key_name="missing"), timeout=10)) == (
        grpc.StatusCode.NOT_FOUND,
        "KEY_NOT_FOUND",
    )
    assert refused(
        lambda: admin.CreateKey(
            keyvault_pb2.CreateKeyRequest(key_name="orders", release_policy_json=policy), timeout=10
        )
    ) == (grpc.StatusCode.ALREADY_EXISTS, "KEY_EXISTS")
    assert refused(
        lambda: admin.CreateKey(
            keyvault_pb2.CreateKeyRequest(key_name="x", release_policy_json="{}"), timeout=10
        )
    ) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY")
    status = admin.GetStatus(keyvault_pb2.GetStatusRequest(), timeout=10)
    assert (status.serving, status.kek_provider) == (True, "file")


def test_release_refusals_over_grpc(stub: Stubs, pki_dir: Path) -> None:
    admin, state = stub("admin"), stub("state")
    other = policy_json(
        {"claim": "x-ms-sgx-mrenclave", "equals": "44" * 32}, authority=ISSUER, accepted_tcb=["Unevaluated"]
    )
    admin.CreateKey(keyvault_pb2.CreateKeyRequest(key_name="other", release_policy_json=other), timeout=10)
    release_public_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
    token = attest(state, pki_dir, FakeEnclave(keyvault_release_public_key=release_public_key))
    assert refused(
        lambda: state.ReleaseKey(keyvault_pb2.ReleaseKeyRequest(token=token, key_name="other"), timeout=10)
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RELEASE_POLICY_NOT_SATISFIED",
    )
    assert refused(
        lambda: state.ReleaseKey(keyvault_pb2.ReleaseKeyRequest(token="x.y.z", key_name="other"), timeout=10)
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "INVALID_TOKEN",
    )
    bad_nonce = keyvault_pb2.AttestRequest(quote=b"q", runtime_data=b"r", nonce=b"short")
    assert refused(lambda: state.Attest(bad_nonce, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


@pytest.mark.parametrize(
    ("identity", "method", "request_message"),
    [
        ("gateway", "ReleaseKey", keyvault_pb2.ReleaseKeyRequest(key_name="k")),
        ("admin", "Attest", keyvault_pb2.AttestRequest()),
        ("state", "RotateKey", keyvault_pb2.RotateKeyRequest(key_name="k")),
        ("state", "ListAuditEvents", keyvault_pb2.ListAuditEventsRequest()),
        ("gateway", "CreateKey", keyvault_pb2.CreateKeyRequest()),
        ("keyvault", "GetJwks", keyvault_pb2.GetJwksRequest()),
        ("keyvault", "GetStatus", keyvault_pb2.GetStatusRequest()),
        ("gateway", "GetCommitHead", keyvault_pb2.GetCommitHeadRequest(instance_id="coins")),
        # The operator reads heads (veil status); a signed statement is a state host's to ask for.
        (
            "admin",
            "GetCommitHead",
            keyvault_pb2.GetCommitHeadRequest(
                instance_id="coins", enclave_signing_public_key=bytes(32), challenge=bytes(32)
            ),
        ),
    ],
)
def test_authorization(stub: Stubs, identity: str, method: str, request_message: object) -> None:
    rpc = getattr(stub(identity), method)
    assert refused(lambda: rpc(request_message, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
    )


def _sim_enclave(
    pki_dir: Path, release_public_key: bytes
) -> tuple[EnclaveHost, envelope_pb2.EnclavePublicKeys]:
    """A fresh sim enclave (its own platform) that pins `release_public_key`, and its keys."""
    enclave = Enclave(
        mrenclave=SIM_MRENCLAVE,
        quote_provider=sim_provider(pki_dir),
        sealing_provider=SimSealingProvider(os.urandom(32), SIM_MRENCLAVE),
    )
    host = EnclaveHost.from_dispatcher(Dispatcher(enclave))
    return host, host.initialize(keyvault_release_public_key=release_public_key).keys


def test_a_release_provisions_into_a_real_enclave_pinned_to_this_keyvault(stub: Stubs, pki_dir: Path) -> None:
    state = stub("state")
    release_public_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
    host, keys = _sim_enclave(pki_dir, release_public_key)
    assert keys.keyvault_release_public_key == release_public_key
    runtime_data = keys.SerializeToString(deterministic=True)

    def fresh_token() -> str:
        nonce = os.urandom(32)
        quoted = host.get_quote(nonce)
        assert quoted.runtime_data == runtime_data
        request = keyvault_pb2.AttestRequest(quote=quoted.quote, runtime_data=runtime_data, nonce=nonce)
        return state.Attest(request, timeout=10).token

    policy = policy_json(
        {"claim": "x-ms-sgx-mrenclave", "equals": SIM_MRENCLAVE.hex()},
        authority=ISSUER,
        accepted_tcb=["Unevaluated"],
    )
    state.CreateKey(
        keyvault_pb2.CreateKeyRequest(key_name="instance.inst-1", release_policy_json=policy), timeout=10
    )
    released = state.ReleaseKey(
        keyvault_pb2.ReleaseKeyRequest(token=fresh_token(), key_name="instance.inst-1"), timeout=10
    )
    wrapped = envelope_pb2.WrappedKey(
        suite=envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM,
        encapsulated_key=released.encapsulated_key,
        ciphertext=released.wrapped_key,
        signature=released.signature,
    )
    # The host cannot strip the signature or move the release to another instance.
    unsigned = envelope_pb2.WrappedKey()
    unsigned.CopyFrom(wrapped)
    unsigned.ClearField("signature")
    with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED"):
        host.provision_key(INSTANCE, released.version, unsigned)
    with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED"):
        host.provision_key("inst-2", released.version, wrapped)
    host.provision_key(INSTANCE, released.version, wrapped)

    # The real keyvault's statement lets the enclave create the instance; its link registers the
    # genesis; the keyvault's confirmation is accepted by the enclave (it pins the release key).
    def statement() -> envelope_pb2.HeadStatement:
        request = keyvault_pb2.GetCommitHeadRequest(
            instance_id=INSTANCE,
            enclave_signing_public_key=keys.signing_public_key,
            challenge=host.issue_challenge(INSTANCE),
        )
        return state.GetCommitHead(request, timeout=10).statement

    config = envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
    )
    created = host.create_instance(INSTANCE, config, statement(), int(time.time() * 1000))
    assert created.link.head.sequence == 1
    advanced = state.AdvanceCommitHead(
        keyvault_pb2.AdvanceCommitHeadRequest(
            instance_id=INSTANCE, links=[created.link], token=fresh_token()
        ),
        timeout=10,
    )
    confirmed = host.confirm_head(advanced.confirmation)
    assert [hold.held_until for hold in confirmed.released] == [1]
    # The keyvault derives the very key the enclave held the genesis's answers under, so the
    # host needs no ConfirmHead ECALL to open them. It makes the key version's hold root off the
    # advance path: the first advance that asks comes back without; a repeat (idempotent) has it.
    assert list(advanced.hold_keys) == []  # none asked for
    repeat = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=INSTANCE, links=[created.link], token=fresh_token(), hold_key_version=released.version
    )
    deadline = time.monotonic() + 10
    while not (vouched_keys := state.AdvanceCommitHead(repeat, timeout=10).hold_keys):
        assert time.monotonic() < deadline, "the hold root was never made"
        time.sleep(0.02)
    [vouched] = vouched_keys
    assert (vouched.sequence, vouched.hash, vouched.key) == (
        1,
        created.link.head.hash,
        confirmed.released[0].key,
    )
    assert confirmed.descriptor.instance_id == INSTANCE  # registered: the descriptor is given out
    # A second creation of the id, by this or any enclave, now needs a statement the keyvault
    # will never give: it holds the instance.
    host, keys = _sim_enclave(pki_dir, release_public_key)
    with pytest.raises(EnclaveCallError, match="ALREADY_EXISTS: the keyvault holds this instance"):
        host.create_instance(INSTANCE, config, statement(), int(time.time() * 1000))


def test_attest_refuses_an_enclave_pinned_to_another_keyvault(stub: Stubs, pki_dir: Path) -> None:
    state, admin = stub("state"), stub("admin")
    host_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert refused(lambda: attest(state, pki_dir, FakeEnclave(keyvault_release_public_key=host_key))) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RELEASE_KEY_MISMATCH",
    )
    events = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=100), timeout=10).events
    refusal = events[-1]
    assert (refusal.action, refusal.outcome) == ("attest", "refused")
    facts = json.loads(refusal.detail_json)
    assert (facts["reason"], facts["keyvault_release_public_key"]) == ("RELEASE_KEY_MISMATCH", host_key.hex())


def test_the_release_key_survives_a_keyvault_restart(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> None:
    config = sim_keyvault_config(tmp_path / "kv", pki_dir, tmp_path)
    published = []
    for _ in range(2):
        with keyvault_stub(service_config("keyvault"), config, pki_dir, "gateway") as stub:
            published.append(stub.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key)
    assert len(published[0]) == 32
    assert published[0] == published[1]


def test_admin_reads_the_jwks_to_pin_the_release_key(stub: Stubs) -> None:
    # Operators publish the release key to clients (`veil up` writes it into the dev policy).
    published = stub("admin").GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10)
    assert len(published.release_public_key) == 32


# --- the operator enclave policy ------------------------------------------------------------------

#: What a malicious state host would write for its instance key: any build, debug ones welcome.
LOOSE_POLICY = policy_json(
    {"claim": "x-ms-sgx-svn", "greaterOrEquals": 0},
    {"claim": "x-ms-sgx-is-debuggable", "equals": True},
    mode="anyOf",
    authority=ISSUER,
    accepted_tcb=["Unevaluated"],
)


def head_request(enclave: FakeEnclave, token: str, sequence: int) -> keyvault_pb2.AdvanceCommitHeadRequest:
    """Register the instance with a link from 0 to `sequence`."""
    link = enclave.link(INSTANCE, (0, bytes(32)), (sequence, hashlib.sha256(b"entry %d" % sequence).digest()))
    return keyvault_pb2.AdvanceCommitHeadRequest(instance_id=INSTANCE, links=[link], token=token)


def test_a_debug_build_gets_no_instance_key_whatever_policy_the_state_wrote(
    stub: Stubs, pki_dir: Path
) -> None:
    state, admin = stub("state"), stub("admin")
    release_public_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
    enclave = FakeEnclave(keyvault_release_public_key=release_public_key)
    state.CreateKey(
        keyvault_pb2.CreateKeyRequest(key_name="instance.inst-1", release_policy_json=LOOSE_POLICY),
        timeout=10,
    )
    # A debug build of the very same enclave, pinned to this keyvault: attested, then refused.
    debug_token = attest(state, pki_dir, enclave, debug=True)
    release = keyvault_pb2.ReleaseKeyRequest(token=debug_token, key_name="instance.inst-1")
    assert refused(lambda: state.ReleaseKey(release, timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ENCLAVE_NOT_ALLOWED",
    )
    assert refused(lambda: state.AdvanceCommitHead(head_request(enclave, debug_token, 1), timeout=10)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED",
    )
    # The production build (the operator policy's) gets the key and moves the head.
    token = attest(state, pki_dir, enclave)
    released = state.ReleaseKey(
        keyvault_pb2.ReleaseKeyRequest(token=token, key_name="instance.inst-1"), timeout=10
    )
    assert len(released.wrapped_key) == 48
    assert state.AdvanceCommitHead(head_request(enclave, token, 1), timeout=10).sequence == 1
    # A non-instance key with the same loose policy is the admin's business: the debug build gets it.
    admin.CreateKey(
        keyvault_pb2.CreateKeyRequest(key_name="scratch", release_policy_json=LOOSE_POLICY), timeout=10
    )
    scratch = keyvault_pb2.ReleaseKeyRequest(
        token=attest(state, pki_dir, enclave, debug=True), key_name="scratch"
    )
    assert len(state.ReleaseKey(scratch, timeout=10).wrapped_key) == 48

    page = admin.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=100), timeout=10)
    refusals = [json.loads(e.detail_json) for e in page.events if e.outcome == "refused"]
    assert [(r["reason"], r["debuggable"]) for r in refusals] == [
        ("ENCLAVE_NOT_ALLOWED", True),
        ("COMMIT_HEAD_ENCLAVE_NOT_ALLOWED", True),
    ]
    assert "outside the operator enclave policy" in refusals[0]["message"]


def test_a_dev_keyvault_without_an_enclave_policy_refuses_with_a_clear_reason(
    service_config: Callable[[str], ServiceConfig], pki_dir: Path, tmp_path: Path
) -> None:
    config = dev_keyvault_config(tmp_path / "kv", pki_dir)
    with keyvault_stub(service_config("keyvault"), config, pki_dir, "state") as state:
        release_public_key = state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=10).release_public_key
        enclave = FakeEnclave(keyvault_release_public_key=release_public_key)
        state.CreateKey(
            keyvault_pb2.CreateKeyRequest(key_name="instance.inst-1", release_policy_json=LOOSE_POLICY),
            timeout=10,
        )
        token = attest(state, pki_dir, enclave)
        release = keyvault_pb2.ReleaseKeyRequest(token=token, key_name="instance.inst-1")
        with pytest.raises(grpc.RpcError) as caught:
            state.ReleaseKey(release, timeout=10)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "VEIL_KEYVAULT_ENCLAVE_POLICY_FILE" in str(caught.value.details())
        info = error_info(caught.value)
        assert info is not None
        assert info.reason == "ENCLAVE_POLICY_NOT_CONFIGURED"
        assert refused(lambda: state.AdvanceCommitHead(head_request(enclave, token, 1), timeout=10)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "ENCLAVE_POLICY_NOT_CONFIGURED",
        )
