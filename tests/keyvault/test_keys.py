"""Key lifecycle (envelope encryption, rotation, crypto-shred, idempotency) and secure key release."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.errors import (
    AttestationRefusedError,
    DecryptionError,
    IdempotencyConflictError,
    InvalidArgumentError,
    KeyDestroyedError,
    KeyExistsError,
    KeyNotFoundError,
    ReleasePolicyError,
    ReleaseRefusedError,
    TokenRefusedError,
    TokenReplayError,
)
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.keys import (
    KeyManager,
    ReleasedKey,
    data_key_aad,
    open_released_key,
    release_info,
)
from veil.services.keyvault.release_key import ReleaseSigner
from veil.services.keyvault.store import AuditRecord, Store
from veil.services.keyvault.tokens import DEFAULT_TOKEN_TTL_S, TokenIssuer
from veil.verify.tokens import DEFAULT_LEEWAY_S

from .support import (
    ADMIN,
    CALLER,
    FakeClock,
    FakeEnclave,
    measurement_policy,
    release_signature_verifies,
    run_concurrently,
)


def last_event(audit: AuditLog) -> AuditRecord:
    return audit.list_events(page_size=1000).events[-1]


def detail(event: AuditRecord) -> dict[str, object]:
    loaded: dict[str, object] = json.loads(event.detail_json)
    return loaded


def assert_refusal_audited(audit: AuditLog, action: str, reason: str) -> None:
    event = last_event(audit)
    assert (event.action, event.outcome) == (action, "refused")
    assert detail(event)["reason"] == reason


# --- encodings ---------------------------------------------------------------------------------


def test_context_encodings_are_exact() -> None:
    assert data_key_aad("orders", 2) == b"veil/data-key/v1" + b"\x00\x06orders" + b"\x00\x00\x00\x02"
    assert release_info("orders", 2) == b"veil/key-release/v1" + b"\x00\x06orders" + b"\x00\x00\x00\x02"


# --- lifecycle -----------------------------------------------------------------------------------


def test_create_get_list(keys: KeyManager, audit: AuditLog, clock: FakeClock) -> None:
    created = keys.create("orders", measurement_policy(), caller=ADMIN)
    assert (created.name, created.latest_version, created.destroyed) == ("orders", 1, False)
    assert created.created_us == created.updated_us == int(clock() * 1_000_000)
    assert json.loads(created.policy_json)["version"] == "1.0.0"
    keys.create("billing", measurement_policy(), caller=ADMIN)
    assert keys.get("orders") == created
    assert [k.name for k in keys.list_keys()] == ["billing", "orders"]
    event = last_event(audit)
    assert (event.action, event.outcome, event.caller) == ("create", "allowed", ADMIN)
    assert detail(event)["key"] == "billing"


def test_create_refusals_are_audited(keys: KeyManager, audit: AuditLog) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    with pytest.raises(KeyExistsError):
        keys.create("orders", measurement_policy(), caller=ADMIN)
    assert_refusal_audited(audit, "create", "KEY_EXISTS")
    with pytest.raises(InvalidArgumentError):
        keys.create("Not A Name", measurement_policy(), caller=ADMIN)
    assert_refusal_audited(audit, "create", "INVALID_ARGUMENT")
    with pytest.raises(ReleasePolicyError):
        keys.create("other", '{"version": "1.0.0"}', caller=ADMIN)
    assert_refusal_audited(audit, "create", "INVALID_POLICY")
    with pytest.raises(KeyNotFoundError):
        keys.get("missing")


def test_data_keys_are_stored_only_wrapped(keys: KeyManager, store: Store, kek: FileKek) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    with store.transaction() as tx:
        version = tx.get_key_version("orders", 1)
    assert version is not None
    assert version.kek_id == kek.key_id
    data_key = kek.unwrap(version.wrapped, data_key_aad("orders", 1))
    assert len(data_key) == 32
    assert data_key not in version.wrapped
    with pytest.raises(DecryptionError):
        kek.unwrap(version.wrapped, data_key_aad("orders", 2))  # AAD binds the version


def test_rotation_keeps_old_versions_readable(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, clock: FakeClock
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    v1_before = enclave.open(keys.release(enclave.token(issuer).token, "orders", caller=CALLER))
    rotated = keys.rotate("orders", caller=ADMIN)
    assert rotated.latest_version == 2
    clock.advance(1)
    v1_after = enclave.open(keys.release(enclave.token(issuer).token, "orders", 1, caller=CALLER))
    latest = keys.release(enclave.token(issuer).token, "orders", caller=CALLER)
    assert latest.version == 2
    assert v1_after == v1_before  # data sealed under v1 stays readable
    assert enclave.open(latest) != v1_before
    with pytest.raises(KeyNotFoundError):
        keys.release(enclave.token(issuer).token, "orders", 3, caller=CALLER)


def test_destroy_crypto_shreds(
    keys: KeyManager, store: Store, audit: AuditLog, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    keys.rotate("orders", caller=ADMIN)
    destroyed = keys.destroy("orders", caller=ADMIN)
    assert destroyed.destroyed
    assert keys.get("orders").destroyed
    assert detail(last_event(audit))["versions_shredded"] == 2
    with store.transaction() as tx:
        assert tx.get_key_version("orders", 1) is None
        assert tx.get_key_version("orders", 2) is None
    with pytest.raises(KeyDestroyedError):
        keys.release(enclave.token(issuer).token, "orders", 1, caller=CALLER)
    assert_refusal_audited(audit, "release", "KEY_DESTROYED")
    with pytest.raises(KeyDestroyedError):
        keys.rotate("orders", caller=ADMIN)
    with pytest.raises(KeyDestroyedError):
        keys.destroy("orders", caller=ADMIN)
    with pytest.raises(KeyExistsError):
        keys.create("orders", measurement_policy(), caller=ADMIN)  # the name stays reserved


def test_request_ids_make_mutations_idempotent(keys: KeyManager, audit: AuditLog, clock: FakeClock) -> None:
    first = keys.create("orders", measurement_policy(), request_id="req-create", caller=ADMIN)
    clock.advance(5)
    assert keys.create("orders", measurement_policy(), request_id="req-create", caller=ADMIN) == first
    rotated = keys.rotate("orders", request_id="req-rotate", caller=ADMIN)
    clock.advance(5)
    assert keys.rotate("orders", request_id="req-rotate", caller=ADMIN) == rotated
    assert keys.get("orders").latest_version == 2  # rotated once, not twice
    gone = keys.destroy("orders", request_id="req-destroy", caller=ADMIN)
    assert keys.destroy("orders", request_id="req-destroy", caller=ADMIN) == gone
    assert [e.action for e in audit.list_events().events] == ["create", "rotate", "destroy"]
    with pytest.raises(IdempotencyConflictError):
        keys.rotate("orders", request_id="req-create", caller=ADMIN)
    with pytest.raises(IdempotencyConflictError):
        keys.create(
            "orders",
            measurement_policy(FakeEnclave(mrenclave=b"\x05" * 32)),
            request_id="req-create",
            caller=ADMIN,
        )
    assert_refusal_audited(audit, "create", "REQUEST_ID_REUSED")
    with pytest.raises(InvalidArgumentError):
        keys.rotate("orders", request_id="bad id with spaces", caller=ADMIN)


def test_concurrent_duplicate_requests_from_two_replicas(
    keys: KeyManager, deps: Deps, replica: Store, clock: FakeClock
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    other = KeyManager(dataclasses.replace(deps, store=replica, audit=AuditLog(replica, clock)))
    managers = [keys, other]

    def rotate(index: int) -> int:
        return managers[index % 2].rotate("orders", request_id="same-request", caller=ADMIN).latest_version

    assert run_concurrently(6, rotate) == [2] * 6
    assert keys.get("orders").latest_version == 2


# --- release ------------------------------------------------------------------------------------------


def test_release_seals_to_the_enclave_hpke_key(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    released = keys.release(enclave.token(issuer).token, "orders", caller=CALLER)
    assert (released.name, released.version) == ("orders", 1)
    assert len(released.encapsulated_key) == 32
    assert len(released.wrapped_key) == 48
    data_key = enclave.open(released)
    assert len(data_key) == 32
    # The enclave side mirrors the documented suite and info exactly.
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.AES_128_GCM)
    sealed = released.encapsulated_key + released.wrapped_key
    assert (
        suite.decrypt(sealed, enclave.hpke_key, info=b"veil/key-release/v1\x00\x06orders\x00\x00\x00\x01")
        == data_key
    )
    with pytest.raises(InvalidTag):  # another recipient
        open_released_key(released, X25519PrivateKey.generate())
    with pytest.raises(InvalidTag):  # info binds the key name
        open_released_key(
            ReleasedKey("billing", 1, released.encapsulated_key, released.wrapped_key, released.signature),
            enclave.hpke_key,
        )
    event = last_event(audit)
    assert (event.action, event.outcome, event.caller) == ("release", "allowed", CALLER)
    facts = detail(event)
    assert facts["key"] == "orders"
    assert facts["version"] == 1
    assert facts["mrenclave"] == enclave.mrenclave.hex()


def test_release_refused_for_other_measurement(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    impostor = FakeEnclave(mrenclave=b"\x66" * 32)
    with pytest.raises(ReleaseRefusedError, match="do not satisfy"):
        keys.release(impostor.token(issuer).token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "RELEASE_POLICY_NOT_SATISFIED")
    assert detail(last_event(audit))["mrenclave"] == impostor.mrenclave.hex()


def test_release_refused_for_debug_enclave(keys: KeyManager, issuer: TokenIssuer, audit: AuditLog) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    with pytest.raises(ReleaseRefusedError, match="debuggable"):
        keys.release(FakeEnclave(debug=True).token(issuer).token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "RELEASE_POLICY_NOT_SATISFIED")
    # A policy that explicitly requires a debug build releases to one.
    debug_policy = measurement_policy(extra=[{"claim": "x-ms-sgx-is-debuggable", "equals": True}])
    keys.create("debug-key", debug_policy, caller=ADMIN)
    debug = FakeEnclave(debug=True)
    assert len(debug.open(keys.release(debug.token(issuer).token, "debug-key", caller=CALLER))) == 32


def test_release_refused_for_unaccepted_tcb_status(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    with pytest.raises(ReleaseRefusedError, match="TCB status 'OutOfDate'"):
        keys.release(FakeEnclave(tcb_status="OutOfDate").token(issuer).token, "orders", caller=CALLER)
    keys.create("dev-key", measurement_policy(accepted_tcb=["UpToDate", "Unevaluated"]), caller=ADMIN)
    sim = FakeEnclave(tcb_status=None)
    assert len(sim.open(keys.release(sim.token(issuer).token, "dev-key", caller=CALLER))) == 32


def test_replayed_token_is_refused(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    keys.create("billing", measurement_policy(), caller=ADMIN)
    token = enclave.token(issuer).token
    keys.release(token, "orders", caller=CALLER)
    with pytest.raises(TokenReplayError):
        keys.release(token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "TOKEN_REPLAYED")
    with pytest.raises(TokenReplayError):
        keys.release(token, "billing", caller=CALLER)  # one token, one release


def test_refused_release_does_not_consume_the_token(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    token = enclave.token(issuer).token
    with pytest.raises(KeyNotFoundError):
        keys.release(token, "missing", caller=CALLER)
    keys.release(token, "orders", caller=CALLER)


def test_expired_token_is_refused(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog, clock: FakeClock
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    token = enclave.token(issuer).token
    clock.advance(DEFAULT_TOKEN_TTL_S + DEFAULT_LEEWAY_S + 1)
    with pytest.raises(TokenRefusedError, match="expired"):
        keys.release(token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "INVALID_TOKEN")


def test_token_for_other_runtime_data_is_refused(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    # A token whose runtime data (ehd) is not what the quote's report data binds.
    nonce = os.urandom(32)
    attacker = FakeEnclave()
    mismatched = issuer.issue(
        enclave.quote(nonce), runtime_data=attacker.runtime_data, nonce=nonce, quote_hash=b"\x00" * 32
    )
    with pytest.raises(AttestationRefusedError, match="report data"):
        keys.release(mismatched.token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "ATTESTATION_REFUSED")
    # Runtime data that is bound but is not an EnclavePublicKeys message.
    garbage = enclave.token(issuer, runtime_data=b"\xff\xfe not protobuf")
    with pytest.raises(AttestationRefusedError):
        keys.release(garbage.token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "RUNTIME_DATA_INVALID")


def test_forged_token_is_refused_and_audited(keys: KeyManager, audit: AuditLog) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    with pytest.raises(TokenRefusedError):
        keys.release("eyJhbGciOiJub25lIn0.e30.", "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "INVALID_TOKEN")


def test_swapped_wrapped_material_is_refused(
    keys: KeyManager, store: Store, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    keys.create("billing", measurement_policy(), caller=ADMIN)
    with store.transaction() as tx:
        billing = tx.get_key_version("billing", 1)
        assert billing is not None
        tx.delete_key_versions("orders")
        tx.insert_key_version(
            type(billing)(
                name="orders", version=1, kek_id=billing.kek_id, wrapped=billing.wrapped, created_us=0
            )
        )
    with pytest.raises(DecryptionError):
        keys.release(enclave.token(issuer).token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "DECRYPTION_FAILED")


def test_audit_chain_holds_after_a_busy_session(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, audit: AuditLog
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    keys.rotate("orders", caller=ADMIN)
    keys.release(enclave.token(issuer).token, "orders", caller=CALLER)
    with pytest.raises(ReleaseRefusedError):
        keys.release(FakeEnclave(debug=True).token(issuer).token, "orders", caller=CALLER)
    keys.destroy("orders", caller=ADMIN)
    assert audit.verify_chain() == 5


def test_every_release_is_signed_for_its_name_version_and_recipient(
    keys: KeyManager, issuer: TokenIssuer, enclave: FakeEnclave, release_signer: ReleaseSigner
) -> None:
    keys.create("orders", measurement_policy(), caller=ADMIN)
    keys.rotate("orders", caller=ADMIN)
    for version in (1, 2, 0):
        released = keys.release(enclave.token(issuer).token, "orders", version, caller=CALLER)
        # Checked exactly as the enclave does, with the published key...
        assert release_signature_verifies(released, enclave.hpke_public_bytes, release_signer.public_key)
        # ...over the documented bytes.
        message = (
            b"veil/wrapped-key/v1\x00\x06orders"
            + released.version.to_bytes(4, "big")
            + b"\x00\x20"
            + enclave.hpke_public_bytes
            + b"\x00\x20"
            + released.encapsulated_key
            + b"\x00\x00\x00\x30"
            + released.wrapped_key
        )
        Ed25519PublicKey.from_public_bytes(release_signer.public_key).verify(released.signature, message)
        # It does not carry over to another recipient, name or version.
        assert not release_signature_verifies(
            released, FakeEnclave().hpke_public_bytes, release_signer.public_key
        )
        moved = dataclasses.replace(released, name="billing")
        assert not release_signature_verifies(moved, enclave.hpke_public_bytes, release_signer.public_key)
        bumped = dataclasses.replace(released, version=released.version + 1)
        assert not release_signature_verifies(bumped, enclave.hpke_public_bytes, release_signer.public_key)
        other_key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not release_signature_verifies(released, enclave.hpke_public_bytes, other_key)


def test_release_refused_to_an_enclave_pinned_to_another_keyvault(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog
) -> None:
    # Attest never issues such a token; the release path refuses it anyway.
    keys.create("orders", measurement_policy(), caller=ADMIN)
    rogue = FakeEnclave(
        keyvault_release_public_key=Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    )
    with pytest.raises(ReleaseRefusedError, match="pins another keyvault release key"):
        keys.release(rogue.token(issuer).token, "orders", caller=CALLER)
    assert_refusal_audited(audit, "release", "RELEASE_KEY_MISMATCH")
