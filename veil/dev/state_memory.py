"""Enclave memory at N token accounts: the memory phase of `make bench-state`.

For each level N the token instance's state after N mints is built with the enclave's own code:
`Instance.apply` runs each mint as the enclave runs an authorized command (the token app's
`mint`, the issuer's counter record), so the state holds what the app writes: a balance record
per account, the total supply and the issuer's counter. What a live mint adds on top (opening
the sealed command, its signature, its log entry and receipt: ~1 ms each) writes no state and
is skipped. The state is encrypted under the instance's data key as the Snapshot ECALL does,
and a fresh enclave runner process (the state host's, on the sim providers) loads it through
its Restore ECALL: the key released to it and the snapshot's head stated by a stand-in
keyvault whose release key the bench holds (`veil.dev.keyvault_standin`). The head and genesis
hashes name a log that is never built (only the snapshot is): 32 bytes each, like real ones.

Measured for each level, in that runner:

* accounted bytes: GetStatus's memory_used_bytes, the key and value bytes of the state, which
  is what the enclave's memory budget is checked against;
* resident bytes: the runner's VmRSS (/proc/<pid>/status) after the restore less its VmRSS
  before it (initialized, key provisioned, no instance), and VmHWM, its peak during the restore;
* that the accounts are there: the accounted bytes equal the built state's, and a sample of
  accounts (real Ed25519 keys; the others are named by 64 hex characters like such a key) read
  their own balances, and the issuer the total supply, through sealed queries.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.dev.keyvault_standin import head_statement, wrap_key
from veil.dev.loadclient import Account, balance, mint, token_config_for, total_supply
from veil.enclave import crypto, wire
from veil.enclave.auth import Caller
from veil.enclave.instance import Instance
from veil.enclave.runner import RunnerOptions
from veil.enclave.v1 import apps_pb2, envelope_pb2, error_pb2
from veil.services.state.config import DEFAULT_MEMORY_MB
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost

INSTANCE = "memory"
KEY_VERSION = 1
MIB = 1024 * 1024
DEFAULT_LEVELS = (10_000, 100_000, 1_000_000)
GENESIS_HASH = hashlib.sha256(b"veil bench-state memory genesis").digest()


def _vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    sizes = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            sizes[name] = int(value.split()[0]) * 1024  # kB
    return sizes


@dataclass
class TokenState:
    """A token instance as N mints leave it, grown level by level with the enclave's own code.

    Account i holds i + 1 tokens. The accounts in `sampled` are real Ed25519 keys (they can
    query their balances); the others are named by 64 hex characters, the size of such a key's.
    """

    issuer: ed25519.Ed25519PrivateKey
    sampled: dict[int, ed25519.Ed25519PrivateKey]
    instance: Instance = field(init=False)
    accounts: int = 0

    def __post_init__(self) -> None:
        issuer_public = self.issuer.public_key().public_bytes_raw()
        config = token_config_for(issuer_public)
        config.acknowledgment = envelope_pb2.ACKNOWLEDGMENT_FAST  # answers need no read fence
        self.instance = Instance.create(INSTANCE, config)
        self.instance.genesis_hash = GENESIS_HASH
        self._caller = Caller(account=issuer_public.hex(), signer_public_key=issuer_public)

    def grow(self, accounts: int) -> None:
        """Mint to new accounts until there are `accounts` (the issuer's counter follows)."""
        for index in range(self.accounts, accounts):
            key = self.sampled.get(index)
            name = (
                key.public_key().public_bytes_raw().hex()
                if key is not None
                else hashlib.sha256(b"veil bench account %d" % index).hexdigest()
            )
            result, _ = self.instance.apply(
                self._caller,
                index + 1,
                mint(name, index + 1),
                sys.maxsize,  # the budget is the measured enclave's to enforce
                command_hash=hashlib.sha256(b"veil bench mint %d" % index).digest(),
                sequence=index + 2,  # the genesis entry is 1
            )
            if result.HasField("error"):
                raise RuntimeError(f"mint {index} refused: {result.error.message}")
        self.accounts = accounts

    def snapshot(self, data_key: bytes) -> envelope_pb2.EncryptedSnapshot:
        """The state encrypted as the Snapshot ECALL encrypts it, at head N + 1 (genesis, N mints)."""
        head = envelope_pb2.CommitHead(
            sequence=self.accounts + 1,
            hash=hashlib.sha256(b"veil bench-state memory head %d" % self.accounts).digest(),
        )
        aad = wire.snapshot_aad(INSTANCE, head.sequence, head.hash, KEY_VERSION)
        nonce, ciphertext = crypto.aead_seal(data_key, self.instance.snapshot_plaintext(), aad)
        return envelope_pb2.EncryptedSnapshot(
            instance_id=INSTANCE, head=head, key_version=KEY_VERSION, nonce=nonce, ciphertext=ciphertext
        )


def _read(host: EnclaveHost, account: Account, call: apps_pb2.AppCall) -> int:
    """One sealed query's amount (balance or total supply); its receipt is checked."""
    sealed = account.seal(call, counter=0)
    response = host.query(INSTANCE, sealed.command, int(time.time() * 1000))
    result = account.open(sealed, response.outcome)
    if result.HasField("error"):
        raise RuntimeError(f"query refused: {result.error.message}")
    method = result.result.token.WhichOneof("method")
    return int(getattr(result.result.token, str(method)).amount)


def _check(host: EnclaveHost, keys: envelope_pb2.EnclavePublicKeys, state: TokenState) -> int:
    """The sampled accounts' balances and the total supply, read from the enclave; how many."""
    count = state.accounts
    if _read(host, Account(keys, INSTANCE, signer=state.issuer), total_supply()) != count * (count + 1) // 2:
        raise RuntimeError("the restored total supply is not the minted one")
    checked = 0
    for index, key in state.sampled.items():
        if index < count:
            if _read(host, Account(keys, INSTANCE, signer=key), balance()) != index + 1:
                raise RuntimeError(f"account {index}: the restored balance is not the minted one")
            checked += 1
    return checked


def measure_level(state: TokenState, options: RunnerOptions) -> dict[str, Any]:
    """Restore `state` in a fresh runner with `options`; what it accounts and holds resident."""
    release = ed25519.Ed25519PrivateKey.generate()  # the stand-in keyvault's release key
    data_key = secrets.token_bytes(crypto.KEY_SIZE)
    started = time.perf_counter()
    snapshot = state.snapshot(data_key)
    level: dict[str, Any] = {
        "accounts": state.accounts,
        "snapshot_bytes": snapshot.ByteSize(),  # as the host stores it
        "snapshot_seconds": round(time.perf_counter() - started, 2),
    }
    budget = options.memory_mb * MIB
    host = EnclaveHost.spawn(options)
    try:
        assert host.process is not None
        pid = host.process.pid
        # As the state host does: the budget at Initialize, the key from the keyvault.
        keys = host.initialize(
            budget, keyvault_release_public_key=release.public_key().public_bytes_raw()
        ).keys
        host.provision_key(
            INSTANCE, KEY_VERSION, wrap_key(keys, INSTANCE, KEY_VERSION, data_key, signer=release)
        )
        before = _vm(pid)
        now = int(time.time() * 1000)
        statement = head_statement(
            keys,
            INSTANCE,
            host.issue_challenge(INSTANCE),
            snapshot.head,
            genesis_hash=GENESIS_HASH,
            config_hash=wire.config_hash(state.instance.config_bytes),
            not_after_unix_ms=now + 60_000,
            signer=release,
        )
        started = time.perf_counter()
        try:
            host.restore(INSTANCE, [], snapshot, statement=statement, host_time_unix_ms=now)
        except EnclaveCallError as refusal:
            if refusal.code != error_pb2.ECALL_ERROR_CODE_RESOURCE_EXHAUSTED:
                raise
            return {
                **level,
                "budget_bytes": budget,
                "refused": str(refusal),
                "state_bytes": state.instance.store.size,  # what the enclave would account
            }
        level["restore_seconds"] = round(time.perf_counter() - started, 2)
        after = _vm(pid)
        status = host.get_status()
        if status.memory_used_bytes != state.instance.store.size:
            raise RuntimeError("the enclave accounts another state than the one built")
        checked = _check(host, keys, state)
    finally:
        host.close()
    used = status.memory_used_bytes
    resident = after["VmRSS"] - before["VmRSS"]
    return {
        **level,
        "accounted_bytes": used,
        "accounted_bytes_per_account": round(used / state.accounts, 1),
        "budget_bytes": status.memory_budget_bytes,
        "budget_used": round(used / status.memory_budget_bytes, 3),
        "resident_bytes_before": before["VmRSS"],
        "resident_bytes": after["VmRSS"],
        "resident_bytes_per_account": round(resident / state.accounts, 1),
        "peak_resident_bytes": after["VmHWM"],
        "balances_checked": checked,
    }


def measure(
    levels: Sequence[int], *, pki_dir: Path, platform_secret: Path, memory_mb: int = DEFAULT_MEMORY_MB
) -> dict[str, Any]:
    """Each level in a fresh sim runner (quoting with the dev PKI in `pki_dir`); one report."""
    options = RunnerOptions(
        quote_provider="sim",
        seal_provider="sim",
        pck_dir=pki_dir,
        platform_secret=platform_secret,
        memory_mb=memory_mb,
    )
    ordered = sorted(set(levels))
    # The first account, and the middle and last account of each level, can read their balance.
    sampled = {0} | {n // 2 for n in ordered} | {n - 1 for n in ordered}
    state = TokenState(
        issuer=ed25519.Ed25519PrivateKey.generate(),
        sampled={index: ed25519.Ed25519PrivateKey.generate() for index in sorted(sampled)},
    )
    results = []
    minting = 0.0
    for count in ordered:
        started = time.perf_counter()
        state.grow(count)
        minting += time.perf_counter() - started  # all N mints, grown level by level
        results.append({**measure_level(state, options), "mint_seconds": round(minting, 2)})
        print(f"# memory {results[-1]}", file=sys.stderr)
    measured = [r for r in results if "accounted_bytes" in r]
    report: dict[str, Any] = {
        "app": "token",
        "enclave": "a fresh enclave runner process per level (sim providers); resident = its VmRSS",
        "budget_bytes": memory_mb * MIB,
        "budget_is_the_state_host_default": memory_mb == DEFAULT_MEMORY_MB,
        "levels": results,
    }
    if measured:
        per_account = measured[-1]["accounted_bytes_per_account"]
        report["accounts_within_budget"] = int(memory_mb * MIB // per_account)
    return report
