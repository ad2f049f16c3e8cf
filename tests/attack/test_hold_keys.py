"""Hold keys from the keyvault (issue 13; docs/security.md row 121), attacked by a hostile host
against the real keyvault and real sim enclaves: keys only for heads the keyvault recorded for
the boot that signed them, none under a lost lease or after the key is destroyed, and an
advance that never waits for the KEK. (Written by a fresh-context review of the change.)"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.attack.hostile_host import EnclaveBoot
from tests.attack.mesh import TIMEOUT, RunningKeyvault
from tests.attack.test_hostile_host import (
    _kept_statement_setup,
    _mint,
    _provisioned,
    _rpc_refusal,
    _strict_coins,
    _token_config,
)
from tests.enclave.support import Client, Sealed
from veil.enclave import commands, wire
from veil.enclave.errors import DecryptionError
from veil.enclave.v1 import ecall_pb2, envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.keyvault import kek as kek_module

KEY_VERSION = 1  # the instance key version the boots here hold
ROOT_WAIT_S = 10.0


def _advance(
    boot: EnclaveBoot,
    *links: envelope_pb2.CommitLink,
    token: str | None = None,
    fencing: int = 0,
    timeout: float = TIMEOUT,
) -> keyvault_pb2.AdvanceCommitHeadResponse:
    request = keyvault_pb2.AdvanceCommitHeadRequest(
        instance_id=links[0].instance_id,
        links=links,
        token=token if token is not None else boot.token(),
        fencing_token=fencing,
        hold_key_version=KEY_VERSION,
    )
    return boot.state.AdvanceCommitHead(request, timeout=timeout)


def _advanced_with_keys(
    boot: EnclaveBoot, *links: envelope_pb2.CommitLink, **options: object
) -> keyvault_pb2.AdvanceCommitHeadResponse:
    """An advance, repeated (idempotently) until the keyvault has the key version's hold root at
    hand: it makes it off the advance path, so the first advance that asks may come back without."""
    deadline = time.monotonic() + ROOT_WAIT_S
    while True:
        response = _advance(boot, *links, **options)  # type: ignore[arg-type]
        if response.hold_keys or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


def _checks(response: keyvault_pb2.AdvanceCommitHeadResponse) -> dict[int, bytes]:
    return {hold.sequence: wire.hold_key_check(hold.key) for hold in response.hold_keys}


def _opens(
    client: Client, sealed: Sealed, instance_id: str, batch: ecall_pb2.ExecuteBatchResponse, key: bytes
) -> bool:
    """Whether `key` opens the batch's held answer into one the client reads as accepted."""
    outcome = envelope_pb2.CommandOutcome()
    outcome.CopyFrom(batch.outcomes[0])
    aad = wire.held_response_aad(instance_id, batch.held_until)
    try:
        outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)
    except DecryptionError:
        return False
    client.read(sealed, outcome)  # raises if the client cannot open it
    return True


def test_hold_keys_only_for_heads_the_keyvault_recorded_for_that_boot(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """Honest boot A runs a strict instance to head 3; rogue boot R (a "no such instance"
    statement kept from before creation) restores the prefix up to 2 and forks at 3'; boot C is
    restored honestly at 3 and moves to 4, leaving A behind (A then runs 4''). Every path the
    host can build -- R's fork, its rollback, A's links under R's token, R's restore link
    spliced onto A's link, a link before the stored head, A's stale 4'' -- is refused with its
    reason (a refusal carries no answer, so no hold key); the successes (A's own path, an
    idempotent repeat, C's advance) carry keys that match only the checks of the boot and heads
    the keyvault recorded."""
    instance_id = f"coins-{os.urandom(4).hex()}"
    issuer = ed25519.Ed25519PrivateKey.generate()
    honest, rogue, early, created = _kept_statement_setup(
        keyvault, pki_dir, instance_id, _token_config(issuer)
    )
    minter = honest.client(instance_id, signer=issuer)
    log = [created.entry]
    batches, sealed = [], []
    for amount in (1, 2):
        command = minter.seal(_mint("a", amount))
        batch = honest.execute(instance_id, command.command)
        assert batch.held_until
        assert len(batch.held_key_check) == 32
        batches.append(batch)
        sealed.append(command)
        log += batch.entries
    b2, b3 = batches
    accepted = _advanced_with_keys(honest, b2.link, b3.link)
    assert _checks(accepted) == {2: b2.held_key_check, 3: b3.held_key_check}
    keys = {hold.sequence: hold.key for hold in accepted.hold_keys}
    assert _opens(minter, sealed[0], instance_id, b2, keys[2])
    assert _opens(minter, sealed[1], instance_id, b3, keys[3])

    # Idempotent repeat of the last link: the same key for 3, nothing else.
    again = _advance(honest, b3.link)
    assert [(h.sequence, h.key) for h in again.hold_keys] == [(3, keys[3])]
    # A link before the stored head alone: refused (rollback), no keys.
    assert _rpc_refusal(lambda: _advance(honest, b2.link))[1] == "COMMIT_HEAD_ROLLBACK"

    # Rogue boot: restores the prefix 1..2 with the kept statement and forks at 3'.
    restored = rogue.host.restore(
        instance_id, log[:2], statement=early, host_time_unix_ms=early.not_after_unix_ms
    )
    assert restored.head.sequence == 2
    assert restored.HasField("link")
    fork_minter = rogue.client(instance_id, signer=issuer)
    fork_cmd = fork_minter.seal(_mint("a", 999), counter=2)
    fork = rogue.execute(instance_id, fork_cmd.command)
    assert fork.held_until == 3
    assert fork.link.head.hash != b3.link.head.hash
    rogue_token = rogue.token()
    attempts = {
        "fork": (rogue, (restored.link, fork.link), rogue_token),
        "rollback": (rogue, (restored.link,), rogue_token),
        "honest links, rogue token": (rogue, (b2.link, b3.link), rogue_token),
        "rogue restore link + honest link": (rogue, (restored.link, b3.link), rogue_token),
        "rogue links, honest token": (honest, (restored.link, fork.link), honest.token()),
    }
    reasons = {}
    for what, (boot, links, token) in attempts.items():
        reasons[what] = _rpc_refusal(
            lambda boot=boot, links=links, token=token: _advance(boot, *links, token=token)
        )[1]
    assert reasons == {
        "fork": "COMMIT_HEAD_FORK",
        "rollback": "COMMIT_HEAD_ROLLBACK",
        "honest links, rogue token": "COMMIT_HEAD_BAD_SIGNATURE",
        "rogue restore link + honest link": "COMMIT_HEAD_BAD_SIGNATURE",
        "rogue links, honest token": "COMMIT_HEAD_BAD_SIGNATURE",
    }
    # The honest keys do not open the fork's answer (another boot, another hash).
    assert not _opens(fork_minter, fork_cmd, instance_id, fork, keys[3])

    # Boot C restored honestly at 3 moves to 4; A, left behind, runs 4''.
    third = _provisioned(keyvault, pki_dir, instance_id)
    assert third.restore(instance_id, log).HasField("descriptor")
    c_minter = third.client(instance_id, signer=issuer)
    c_cmd = c_minter.seal(_mint("a", 3), counter=3)
    c4 = third.execute(instance_id, c_cmd.command)
    c_keys = _advanced_with_keys(third, c4.link)
    assert _checks(c_keys) == {4: c4.held_key_check}
    assert _opens(c_minter, c_cmd, instance_id, c4, c_keys.hold_keys[0].key)
    a_cmd = minter.seal(_mint("a", 4))
    a4 = honest.execute(instance_id, a_cmd.command)
    assert a4.held_until == 4
    assert a4.held_key_check != c4.held_key_check
    assert _rpc_refusal(lambda: _advance(honest, a4.link))[1] == "COMMIT_HEAD_FORK"
    # C's key for head 4 (its boot, its hash) does not open A's answer held until its own 4''.
    assert not _opens(minter, a_cmd, instance_id, a4, c_keys.hold_keys[0].key)


def test_no_hold_keys_under_a_lost_lease_and_none_after_the_key_is_destroyed(
    keyvault: RunningKeyvault, pki_dir: Path
) -> None:
    """A lease taken over by another holder: the old token (and none) is refused before any key
    is derived. After the admin destroys the instance key, an advance still succeeds (the head
    moves) but carries no hold key; the enclave's own release (ConfirmHead) still works."""
    boot, instance_id, issuer, _ = _strict_coins(keyvault, pki_dir)
    minter = boot.client(instance_id, signer=issuer)
    first = boot.state.AcquireLease(
        keyvault_pb2.AcquireLeaseRequest(instance_id=instance_id, holder="host-a", ttl_ms=1000),
        timeout=TIMEOUT,
    ).lease.fencing_token
    time.sleep(1.2)
    second = boot.state.AcquireLease(
        keyvault_pb2.AcquireLeaseRequest(instance_id=instance_id, holder="host-b", ttl_ms=60_000),
        timeout=TIMEOUT,
    ).lease.fencing_token
    assert second > first
    b2 = boot.execute(instance_id, minter.seal(_mint("a", 1)).command)
    for fencing in (0, first):
        status, reason = _rpc_refusal(lambda fencing=fencing: _advance(boot, b2.link, fencing=fencing))
        assert status == grpc.StatusCode.FAILED_PRECONDITION, (status, reason)
    assert _checks(_advanced_with_keys(boot, b2.link, fencing=second)) == {2: b2.held_key_check}

    admin = keyvault.stub("admin")
    admin.DestroyKey(
        keyvault_pb2.DestroyKeyRequest(key_name=wire.instance_key_name(instance_id)), timeout=TIMEOUT
    )
    command = minter.seal(_mint("a", 2))
    b3 = boot.execute(instance_id, command.command)  # the enclave still holds the key
    advanced = _advance(boot, b3.link, fencing=second)
    assert advanced.confirmation.head.sequence == 3
    assert list(advanced.hold_keys) == []
    boot.confirm(advanced.confirmation)
    boot.open_held(instance_id, b3.held_until, b3.outcomes[0])


def test_a_blocking_kek_never_holds_up_an_advance(
    keyvault: RunningKeyvault, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hold root is made from the unwrapped data key off the advance path: a KEK that blocks
    (an HSM that hangs rather than fails) leaves advances answering at once, without hold keys
    (the host then has the enclave release), and once it answers the keys come. (The review
    found the first version unwrapping inside the advance: the head moved, the answer never
    came, and every retry hung the same way.)"""
    boot, instance_id, issuer, _ = _strict_coins(keyvault, pki_dir)
    minter = boot.client(instance_id, signer=issuer)
    b2 = boot.execute(instance_id, minter.seal(_mint("a", 1)).command)
    token = boot.token()
    gate = threading.Event()
    real = kek_module._GcmKek.unwrap

    def hanging(self: object, blob: bytes, aad: bytes) -> bytes:
        gate.wait(10)
        return real(self, blob, aad)  # type: ignore[arg-type]

    monkeypatch.setattr(kek_module._GcmKek, "unwrap", hanging)
    try:
        for _ in range(2):  # the advance, then the host's idempotent retry
            advanced = _advance(boot, b2.link, token=token, timeout=2.0)
            assert advanced.confirmation.head.sequence == 2
            assert list(advanced.hold_keys) == []
    finally:
        gate.set()
    assert _checks(_advanced_with_keys(boot, b2.link, token=token)) == {2: b2.held_key_check}
