"""Attacks on the keyvault over its real mTLS port, as the state identity (the only one that may
attest, release and advance heads): forged and tampered quotes, a debug enclave, hostile tokens.

Each is refused with PERMISSION_DENIED and its ErrorInfo reason, no key or head changes, and
the refusal is audited as a refusal (checked by `RunningKeyvault.check_invariants`).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.keyvault.v1 import keyvault_pb2

from enclave.dispatcher import Dispatcher
from services.common.errors import error_info
from services.common.pki import init_pki
from services.keyvault.config import DEFAULT_ISSUER
from services.keyvault.tokens import expected_report_data
from services.state.enclave_host import EnclaveCallError, EnclaveHost
from services.state.keys import release_policy
from tests.attack.enclave_world import new_enclave
from tests.attack.mesh import KEYVAULT, TIMEOUT, Lab, RunningKeyvault
from tests.attack.mutations import HOSTILE_TOKENS
from tests.enclave.support import NOW_MS, Client, config, vault
from tests.keyvault.support import FakeEnclave


@pytest.fixture(scope="module")
def lab(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    started = Lab(pki_dir, tmp_path_factory.mktemp("keyvault-attacks"))
    yield started
    started.close()


@pytest.fixture(scope="module")
def keyvault(lab: Lab) -> RunningKeyvault:
    running = lab.get(KEYVAULT)
    assert isinstance(running, RunningKeyvault)
    return running


@pytest.fixture
def enclave(keyvault: RunningKeyvault) -> FakeEnclave:
    """A fresh enclave pinned to this keyvault (so only the attack itself is wrong)."""
    release_key = (
        keyvault.stub("state").GetJwks(keyvault_pb2.GetJwksRequest(), timeout=TIMEOUT).release_public_key
    )
    return FakeEnclave(keyvault_release_public_key=release_key)


def _refusal(keyvault: RunningKeyvault, call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """Run a call that must be refused; checks nothing changed and the refusal was audited."""
    keyvault.check_invariants(refused=False)  # moves its audit watermark past earlier successes
    before = keyvault.snapshot()
    with pytest.raises(grpc.RpcError) as refused:
        call()
    keyvault.check_invariants(refused=True)
    assert keyvault.snapshot() == before
    info = error_info(refused.value)
    return refused.value.code(), info.reason if info else ""


def test_a_quote_under_another_pck_chain_gets_no_token(
    keyvault: RunningKeyvault, enclave: FakeEnclave, tmp_path: Path
) -> None:
    # A host that runs its own "quoting enclave": a well-formed DCAP quote, signed by a PCK
    # chain of its own making (a rogue dev root), binding the right keys and nonce.
    rogue = tmp_path / "rogue"
    init_pki(rogue, now=dt.datetime.now(dt.UTC))
    request = keyvault.attest(enclave, rogue)
    state = keyvault.stub("state")
    assert _refusal(keyvault, lambda: state.Attest(request, timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "QUOTE_INVALID",
    )


@pytest.mark.parametrize(
    ("what", "offset"),
    [
        ("header", 8),
        ("MRENCLAVE", 112),
        ("report data", 368 + 40),
        ("ISV signature", 440),
        ("QE report", 700),
    ],
)
def test_a_tampered_quote_gets_no_token(
    keyvault: RunningKeyvault, enclave: FakeEnclave, pki_dir: Path, what: str, offset: int
) -> None:
    request = keyvault.attest(enclave, pki_dir)
    request.quote = (
        request.quote[:offset] + bytes([request.quote[offset] ^ 0x01]) + request.quote[offset + 1 :]
    )
    state = keyvault.stub("state")
    assert _refusal(keyvault, lambda: state.Attest(request, timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "QUOTE_INVALID",
    ), what


def test_a_genuine_quote_for_other_keys_gets_no_token(
    keyvault: RunningKeyvault, enclave: FakeEnclave, pki_dir: Path
) -> None:
    # The host swaps in its own public keys next to a genuine quote: the report data binds them.
    request = keyvault.attest(enclave, pki_dir)
    request.runtime_data = FakeEnclave(
        keyvault_release_public_key=enclave.keyvault_release_public_key
    ).runtime_data
    state = keyvault.stub("state")
    code, reason = _refusal(keyvault, lambda: state.Attest(request, timeout=TIMEOUT))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ATTESTATION_REFUSED")


def test_a_debug_enclave_is_attested_as_debuggable_and_gets_no_key(
    keyvault: RunningKeyvault, enclave: FakeEnclave, pki_dir: Path
) -> None:
    state = keyvault.stub("state")
    token = state.Attest(keyvault.attest(enclave, pki_dir, debug=True), timeout=TIMEOUT).token
    # The same measurement the key's policy names: only the DEBUG attribute differs.
    release = keyvault_pb2.ReleaseKeyRequest(token=token, key_name=RunningKeyvault.FUZZ_KEY)
    assert _refusal(keyvault, lambda: state.ReleaseKey(release, timeout=TIMEOUT)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "RELEASE_POLICY_NOT_SATISFIED",
    )
    # The production twin of this enclave gets it: the refusal was about DEBUG alone.
    token = state.Attest(keyvault.attest(enclave, pki_dir), timeout=TIMEOUT).token
    released = state.ReleaseKey(
        keyvault_pb2.ReleaseKeyRequest(token=token, key_name=RunningKeyvault.FUZZ_KEY), timeout=TIMEOUT
    )
    assert len(released.wrapped_key) == 48


@pytest.mark.parametrize("name", sorted(HOSTILE_TOKENS))
def test_a_hostile_attestation_token_is_refused(keyvault: RunningKeyvault, name: str) -> None:
    state = keyvault.stub("state")
    token = HOSTILE_TOKENS[name]
    release = keyvault_pb2.ReleaseKeyRequest(token=token, key_name=RunningKeyvault.FUZZ_KEY)
    head_hash = bytes(32)
    advance = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=RunningKeyvault.HEAD_INSTANCE,
        sequence=9,
        hash=head_hash,
        signature=bytes(64),
        token=token,
    )
    for call in (
        lambda: state.ReleaseKey(release, timeout=TIMEOUT),
        lambda: state.AdvanceCommitHead(advance, timeout=TIMEOUT),
    ):
        assert _refusal(keyvault, call) == (grpc.StatusCode.PERMISSION_DENIED, "INVALID_TOKEN")


class _EnclaveAtTheKeyvault:
    """A real in-process enclave that attests at the keyvault and gets instance keys released."""

    def __init__(self, keyvault: RunningKeyvault, pki_dir: Path) -> None:
        self.keyvault, self.state = keyvault, keyvault.stub("state")
        release_key = self.state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=TIMEOUT).release_public_key
        self.host = EnclaveHost.from_dispatcher(Dispatcher(new_enclave(pki_dir)))
        self.keys = self.host.initialize(keyvault_release_public_key=release_key).keys

    def token(self) -> str:
        runtime_data = self.keys.SerializeToString(deterministic=True)
        nonce = os.urandom(32)
        quote = self.host.get_quote(expected_report_data(runtime_data, nonce))
        request = keyvault_pb2.AttestRequest(quote=quote, runtime_data=runtime_data, nonce=nonce)
        return self.state.Attest(request, timeout=TIMEOUT).token

    def provision(self, instance_id: str) -> None:
        released = self.state.ReleaseKey(
            keyvault_pb2.ReleaseKeyRequest(token=self.token(), key_name=f"instance.{instance_id}"),
            timeout=TIMEOUT,
        )
        wrapped = envelope_pb2.WrappedKey(
            suite=envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM,
            encapsulated_key=released.encapsulated_key,
            ciphertext=released.wrapped_key,
            signature=released.signature,
        )
        self.host.provision_key(instance_id, released.version, wrapped)

    def advance(self, head: envelope_pb2.SignedCommitHead) -> None:
        request = keyvault_pb2.AdvanceCommitHeadRequest(
            instance_id=head.instance_id,
            sequence=head.head.sequence,
            hash=head.head.hash,
            signature=head.signature,
            token=self.token(),
        )
        self.state.AdvanceCommitHead(request, timeout=TIMEOUT)

    def commit_head(self, instance_id: str) -> keyvault_pb2.GetCommitHeadResponse:
        """The keyvault's head of `instance_id`, signed for this enclave's signing key."""
        request = keyvault_pb2.GetCommitHeadRequest(
            instance_id=instance_id, enclave_signing_public_key=self.keys.signing_public_key
        )
        return self.state.GetCommitHead(request, timeout=TIMEOUT)


def test_a_host_serving_a_rolled_back_log_can_never_advance_its_head(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """Row 49 (docs/security.md): a fresh enclave refuses to restore a rolled-back log.

    A malicious host starts a fresh enclave and has the instance key released to it (the key's
    policy is about the build, not the head). Restore requires the keyvault's commit head signed
    for this enclave's signing key and a log that contains it, so an old prefix of the log is
    refused (FAILED_PRECONDITION, nothing restored), as is a statement made for another enclave
    (an earlier boot). A fork it starts anyway (a new genesis) can never move the keyvault head.
    """
    honest = _EnclaveAtTheKeyvault(keyvault, pki_dir)
    instance_id = "rolled-back"
    policy = release_policy(DEFAULT_ISSUER, honest.host.get_status().mrenclave, sim=True)
    honest.state.CreateKey(
        keyvault_pb2.CreateKeyRequest(key_name=f"instance.{instance_id}", release_policy_json=policy),
        timeout=TIMEOUT,
    )
    honest.provision(instance_id)
    created = honest.host.create_instance(instance_id, config())
    log, head = [created.entry], created.head
    client = Client(honest.keys, instance_id)
    for i in range(3):
        batch = honest.host.execute_batch(
            instance_id,
            [client.seal(vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x"))).command],
            NOW_MS,
        )
        log.extend(batch.entries)
        head = batch.head
    honest.advance(head)  # the keyvault now holds sequence 4

    forked = _EnclaveAtTheKeyvault(keyvault, pki_dir)
    forked.provision(instance_id)
    fresh = forked.commit_head(instance_id)
    assert (fresh.sequence, fresh.hash) == (4, head.head.hash)
    assert fresh.freshness_signature
    earlier_boot = honest.commit_head(instance_id)  # a statement for another enclave key
    kv_head = envelope_pb2.CommitHead(sequence=fresh.sequence, hash=fresh.hash)
    for entries, signature in (
        (log[:2], fresh.freshness_signature),  # an old, authentic prefix
        (log, earlier_boot.freshness_signature),  # the whole log, but a replayed statement
        (log, b""),  # no statement
    ):
        with pytest.raises(EnclaveCallError) as refused:
            forked.host.restore(
                instance_id, entries, keyvault_head=kv_head, keyvault_head_signature=signature
            )
        assert refused.value.code == error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION, refused.value.message
        assert "rollback refused" in refused.value.message
        assert not forked.host.get_status().instances  # nothing restored: no fork to serve

    # A fork the host starts anyway (a new genesis: CreateInstance is not Restore) stays off the head.
    fork = forked.host.create_instance(instance_id, config())
    before = keyvault.snapshot()
    with pytest.raises(grpc.RpcError) as advance_refused:
        forked.advance(fork.head)
    info = error_info(advance_refused.value)
    assert (advance_refused.value.code(), info.reason if info else "") == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "COMMIT_HEAD_ROLLBACK",
    )
    assert keyvault.snapshot() == before
    head_now = honest.state.GetCommitHead(
        keyvault_pb2.GetCommitHeadRequest(instance_id=instance_id), timeout=TIMEOUT
    )
    assert (head_now.sequence, head_now.hash) == (4, head.head.hash)

    # The honest path: a fresh enclave restores the whole log under a statement for its own key.
    successor = _EnclaveAtTheKeyvault(keyvault, pki_dir)
    successor.provision(instance_id)
    statement = successor.commit_head(instance_id)
    restored = successor.host.restore(
        instance_id, log, keyvault_head=kv_head, keyvault_head_signature=statement.freshness_signature
    )
    assert (restored.sequence, restored.hash) == (4, head.head.hash)
