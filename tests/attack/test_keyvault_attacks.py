"""Attacks on the keyvault over its real mTLS port, as the state identity (the only one that may
attest, release and advance heads): forged and tampered quotes, a debug enclave, hostile tokens.

Each is refused with PERMISSION_DENIED and its ErrorInfo reason, no key or head changes, and
the refusal is audited as a refusal (checked by `RunningKeyvault.check_invariants`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from tests.attack.hostile_host import EnclaveBoot, now_ms
from tests.attack.mesh import TIMEOUT, RunningKeyvault
from tests.attack.mutations import HOSTILE_TOKENS
from tests.enclave.support import Client, config, vault
from tests.keyvault.support import FakeEnclave
from veil.dev.pki import init_pki
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.state.enclave_host import EnclaveCallError
from veil.status import error_info


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
    # A well-formed link (signed by some enclave): only the token is hostile.
    link = FakeEnclave().link(RunningKeyvault.HEAD_INSTANCE, (1, bytes(range(32))), (9, bytes(32)))
    advance = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=RunningKeyvault.HEAD_INSTANCE, links=[link], token=token
    )
    for call in (
        lambda: state.ReleaseKey(release, timeout=TIMEOUT),
        lambda: state.AdvanceCommitHead(advance, timeout=TIMEOUT),
    ):
        assert _refusal(keyvault, call) == (grpc.StatusCode.PERMISSION_DENIED, "INVALID_TOKEN")


def test_a_host_serving_a_rolled_back_log_can_never_advance_its_head(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """Row 49 (docs/security.md): a fresh enclave refuses to restore a rolled-back log.

    A malicious host starts a fresh enclave and has the instance key released to it (the key's
    policy is about the build, not the head). Restore requires the keyvault's statement of the
    head for this enclave and a challenge it just issued, and a log that contains the head, so
    an old prefix of the log is refused (FAILED_PRECONDITION, nothing restored), as is a
    statement made for another enclave (an earlier boot) or for an earlier challenge.
    """
    honest = EnclaveBoot(keyvault, pki_dir)
    instance_id = "rolled-back"
    created = honest.create(instance_id, config())
    log = [created.entry]
    client = Client(honest.keys, instance_id)
    for i in range(3):
        batch = honest.execute(
            instance_id, client.seal(vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x"))).command
        )
        log.extend(batch.entries)
        honest.confirm(honest.advance(batch.link))  # the keyvault now holds each new head
    stored = honest.stored_head(instance_id)
    assert stored.sequence == 4

    forked = EnclaveBoot(keyvault, pki_dir)
    forked.provision(instance_id)
    earlier_boot = honest.statement(instance_id)  # made for another enclave key
    stale = forked.statement(instance_id)
    forked.host.issue_challenge(instance_id)  # ...and this one's challenge has since been replaced
    for entries, statement in (
        (log[:2], forked.statement(instance_id)),  # an old, authentic prefix
        (log, earlier_boot),  # the whole log, but a statement for another boot
        (log, stale),  # the whole log, but a statement for an earlier challenge
        (log, envelope_pb2.HeadStatement(instance_id=instance_id)),  # no statement
    ):
        with pytest.raises(EnclaveCallError) as refused:
            forked.host.restore(instance_id, entries, statement=statement, host_time_unix_ms=now_ms())
        assert refused.value.code in {
            error_pb2.ECALL_ERROR_CODE_FAILED_PRECONDITION,
            error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT,
        }, refused.value.message
        assert not forked.host.get_status().instances  # nothing restored: no fork to serve
    assert honest.stored_head(instance_id).sequence == 4

    # The honest path: a fresh enclave restores the whole log under a statement for its own key.
    successor = EnclaveBoot(keyvault, pki_dir)
    successor.provision(instance_id)
    restored = successor.host.restore(
        instance_id, log, statement=successor.statement(instance_id), host_time_unix_ms=now_ms()
    )
    assert (restored.head.sequence, restored.head.hash) == (4, stored.hash)
