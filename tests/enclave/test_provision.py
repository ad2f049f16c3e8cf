"""Key provisioning is authenticated to the keyvault pinned at Initialize.

HPKE base mode does not authenticate the sender and the enclave's HPKE key is public, so
without a keyvault signature a malicious host could provision a key it knows before
CreateInstance and then read every log entry of that instance. These tests are that attack
and its variants; every refusal must leave the enclave unchanged.
"""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.enclave.conftest import MakeEnclave
from tests.enclave.support import (
    KEYVAULT_RELEASE_PUBLIC_KEY,
    Harness,
    config,
    error_code,
    release_signature,
    vault,
    wrap_key,
)
from veil.enclave import crypto, wire
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost


def _refused_without_change(harness: Harness, instance_id: str, wrapped: envelope_pb2.WrappedKey) -> None:
    before = harness.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="PERMISSION_DENIED: wrapped key is not signed by the pinned"):
        harness.host.provision_key(instance_id, 1, wrapped)
    assert harness.enclave.state_digest() == before
    with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION"):  # still no key: no instance
        harness.create_raw(instance_id, config())


def test_a_key_signed_by_the_pinned_keyvault_is_accepted(harness: Harness) -> None:
    assert harness.keys.keyvault_release_public_key == KEYVAULT_RELEASE_PUBLIC_KEY
    harness.create("v", config())  # provisions through wrap_key, signed by the test keyvault
    result = harness.call(harness.client("v"), vault(put=apps_pb2.VaultPut(record_id="r", data=b"x")))
    assert error_code(result) == "OK"


def test_a_key_the_host_wrapped_itself_is_refused(harness: Harness) -> None:
    # The attack: the enclave's HPKE key is public, so the host can wrap a key it knows.
    host_known_key = secrets.token_bytes(32)
    unsigned = wrap_key(harness.keys, "v", 1, host_known_key, signer=None)
    _refused_without_change(harness, "v", unsigned)
    host_signed = wrap_key(harness.keys, "v", 1, host_known_key, signer=ed25519.Ed25519PrivateKey.generate())
    _refused_without_change(harness, "v", host_signed)
    garbage = wrap_key(harness.keys, "v", 1, host_known_key, signer=None)
    garbage.signature = secrets.token_bytes(64)
    _refused_without_change(harness, "v", garbage)
    # The signature carried over from a genuine release of another key does not help either.
    genuine = wrap_key(harness.keys, "v", 1, secrets.token_bytes(32))
    unsigned.signature = genuine.signature
    _refused_without_change(harness, "v", unsigned)


@pytest.mark.parametrize(
    ("key_name", "version", "other_recipient"),
    [("instance.w", 1, False), ("instance.v", 2, False), ("instance.v", 1, True), ("v", 1, False)],
)
def test_a_signature_over_other_name_version_or_recipient_is_refused(
    harness: Harness, key_name: str, version: int, other_recipient: bool
) -> None:
    wrapped = wrap_key(harness.keys, "v", 1, secrets.token_bytes(32), signer=None)
    recipient = harness.keys.hpke_x25519_public_key
    if other_recipient:
        recipient = crypto.HpkeKeyPairs().x25519_public  # released to another enclave
    wrapped.signature = release_signature(wrapped, key_name, version, recipient)
    _refused_without_change(harness, "v", wrapped)


def test_a_release_to_another_enclave_is_refused(make_enclave: MakeEnclave, harness: Harness) -> None:
    other = Harness.start(make_enclave())
    released_elsewhere = wrap_key(other.keys, "v", 1, secrets.token_bytes(32))
    _refused_without_change(harness, "v", released_elsewhere)


def test_initialize_requires_a_32_byte_keyvault_release_key(make_enclave: MakeEnclave) -> None:
    enclave = make_enclave()
    host = EnclaveHost.from_dispatcher(Dispatcher(enclave))
    for bad in (b"", b"\x01" * 31, b"\x01" * 33):
        with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT: keyvault_release_public_key"):
            host.initialize(keyvault_release_public_key=bad)
        with pytest.raises(EnclaveCallError, match="FAILED_PRECONDITION: enclave not initialized"):
            host.get_quote(b"")  # nothing changed: still uninitialized
    # A raw request without the field (an old host) is refused the same way.
    with pytest.raises(EnclaveCallError, match="INVALID_ARGUMENT"):
        host.call(
            "Initialize", ecall_pb2.InitializeRequest(memory_budget_bytes=1024), ecall_pb2.InitializeResponse
        )
    keys = host.initialize(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY).keys
    assert keys.keyvault_release_public_key == KEYVAULT_RELEASE_PUBLIC_KEY
    assert host.get_status().memory_budget_bytes == 96 * 1024 * 1024  # the refused budget was not kept


def test_the_pinned_key_is_part_of_the_runtime_data_a_quote_binds(make_enclave: MakeEnclave) -> None:
    pinned = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    harness = Harness.start(make_enclave(), keyvault_release_public_key=pinned)
    assert harness.keys.keyvault_release_public_key == pinned
    assert harness.enclave.public_keys() == harness.keys
    runtime_data = harness.keys.SerializeToString(deterministic=True)
    assert pinned in runtime_data  # so SHA-256(runtime_data || nonce) in the quote covers it
    # Pinned to a key the test keyvault does not hold: its releases are refused.
    _refused_without_change(harness, "v", wrap_key(harness.keys, "v", 1, secrets.token_bytes(32)))


def test_keys_sealed_under_another_pin_do_not_unseal(make_enclave: MakeEnclave) -> None:
    # The host pins its own key in one enclave, provisions a key it knows and seals it; an
    # enclave on the same platform pinned to the real keyvault must not take that cache.
    platform = secrets.token_bytes(32)
    host_key = ed25519.Ed25519PrivateKey.generate()
    rogue = Harness.start(
        make_enclave(platform), keyvault_release_public_key=host_key.public_key().public_bytes_raw()
    )
    rogue.host.provision_key("v", 1, wrap_key(rogue.keys, "v", 1, secrets.token_bytes(32), signer=host_key))
    blob = rogue.host.seal()
    honest = Harness.start(make_enclave(platform))
    before = honest.enclave.state_digest()
    with pytest.raises(EnclaveCallError, match="DATA_LOSS: sealed blob: decryption failed"):
        honest.host.unseal(blob)
    assert honest.enclave.state_digest() == before
    # The same platform and pin still unseal (the cache works across restarts).
    honest.provision("w")
    again = Harness.start(make_enclave(platform))
    assert again.host.unseal(honest.host.seal()) == ["w"]
    assert wire.sealed_keys_aad(KEYVAULT_RELEASE_PUBLIC_KEY) != wire.sealed_keys_aad(
        rogue.keys.keyvault_release_public_key
    )
