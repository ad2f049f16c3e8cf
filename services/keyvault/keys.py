"""Data-key lifecycle with envelope encryption, and secure key release to attested enclaves.

Envelope encryption. Each key version is a random 32-byte data key that is stored only
wrapped under the KEK (:mod:`veil.services.keyvault.kek`, AES-256-GCM) with the AAD::

    data_key_aad(name, version) = b"veil/data-key/v1" || u16be(len(name)) || name (UTF-8)
                                  || u32be(version)

so a wrapped blob cannot be moved to another key or version. Rotation adds version n+1;
older versions still unwrap (data encrypted under them stays readable). Destroy
crypto-shreds: every version's wrapped material is deleted and the metadata says
``destroyed``. A destroyed name is never created again, by anyone (the admin included): data
and logs encrypted under it, and a host's old database, must never meet a new key by that name;
a replacement key takes a new name. Backups taken before a destroy still hold KEK-wrapped
copies; shredding them needs the KEK retired as well.

Who may name what: the admin may create any key; the state host (``spiffe://veil/state``) only
instance keys, ``instance.<instance id>``, so it cannot squat a name the operator means to use.

Secure key release (:meth:`KeyManager.release`): verify the attestation token, re-check
that its report data binds its runtime data and nonce, evaluate the key's release policy
on the token's claims -- and for an instance key (``instance.<id>``) also the operator
enclave policy (:mod:`veil.services.keyvault.enclave_policy`), because whoever created the key
(the state identity may) wrote its policy; both must allow, and an unconfigured operator
policy refuses (``ENCLAVE_POLICY_NOT_CONFIGURED``) -- unwrap the data key, and HPKE-seal
it (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-128-GCM) to the
enclave's X25519 key from the token's runtime data with::

    info = release_info(name, version) = b"veil/key-release/v1" || u16be(len(name))
           || name (UTF-8) || u32be(version)

and empty AAD; ``encapsulated_key`` is the 32-byte HPKE ``enc`` and ``wrapped_key`` the
48-byte ciphertext. The enclave opens it with the same suite and info
(:func:`open_released_key` is the reference). HPKE base mode does not authenticate the
sender, so every release is also signed with the keyvault's Ed25519 release key
(:mod:`veil.services.keyvault.release_key`) over::

    veil.enclave.wire.wrapped_key_signing_bytes(name, version, enclave X25519 key, enc, ciphertext)
      = b"veil/wrapped-key/v1" || u16be(len(name)) || name || u32be(version)
        || u16be(32) || recipient key || u16be(32) || enc || u32be(48) || ciphertext

and the enclave, which pinned that key at Initialize, refuses an unsigned release. A
token whose enclave pins another release key is refused (``RELEASE_KEY_MISMATCH``; Attest
never issues one). A token's ``jti`` releases at most once,
recorded atomically with the audit event. Every outcome -- release, refusal, create,
rotate, destroy -- is audited with the caller's identity.

Idempotency: create, rotate and destroy take an optional ``request_id``; a repeat returns
the first result (even if the key changed since), and reusing an id for another operation
or other parameters is refused. Ids are scoped by caller identity (stored as
``<caller>#<request_id>``): the state host and the admin never see or block each other's.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Literal

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from veil.enclave import wire
from veil.services.common import identity
from veil.services.keyvault import leases
from veil.services.keyvault.audit import (
    ACTION_CREATE,
    ACTION_DESTROY,
    ACTION_RELEASE,
    ACTION_ROTATE,
    OUTCOME_ALLOWED,
    DetailValue,
    canonical_json,
)
from veil.services.keyvault.clock import to_micros
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.enclave_keys import bound_enclave_keys
from veil.services.keyvault.enclave_policy import INSTANCE_KEY_PREFIX, is_instance_key
from veil.services.keyvault.errors import (
    CallerNotAllowedError,
    IdempotencyConflictError,
    InvalidArgumentError,
    KeyDestroyedError,
    KeyExistsError,
    KeyNotFoundError,
    ReleaseRefusedError,
    TokenReplayError,
)
from veil.services.keyvault.release_policy import parse_release_policy
from veil.services.keyvault.store import KeyRecord, KeyVersionRecord, StoreTx
from veil.services.keyvault.tokens import replay_horizon_us
from veil.verify.tokens import VerifiedToken

DATA_KEY_SIZE = 32
DATA_KEY_AAD_LABEL = b"veil/data-key/v1"
RELEASE_INFO_LABEL = b"veil/key-release/v1"
HPKE_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
HPKE_ENC_SIZE = 32
MAX_VERSION = 0xFFFFFFFF

# \Z, not $: "$" also matches before a final "\n", which would let "name\n" pass as a second name.
KEY_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,126}[a-z0-9])?\Z")
REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}\Z")


def _context(label: bytes, name: str, version: int) -> bytes:
    raw = name.encode("utf-8")
    return label + struct.pack(">H", len(raw)) + raw + struct.pack(">I", version)


def data_key_aad(name: str, version: int) -> bytes:
    """The KEK AAD of a data key: binds the wrapped blob to its key name and version."""
    return _context(DATA_KEY_AAD_LABEL, name, version)


def release_info(name: str, version: int) -> bytes:
    """The HPKE ``info`` of a release: binds the sealed key to its key name and version."""
    return _context(RELEASE_INFO_LABEL, name, version)


@dataclass(frozen=True)
class KeyMetadata(KeyRecord):
    """What may be known about a key without holding it: its stored record (never material)."""

    @classmethod
    def from_record(cls, record: KeyRecord) -> KeyMetadata:
        return cls(**vars(record))

    def to_json(self) -> str:
        return canonical_json(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> KeyMetadata:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            latest_version=int(data["latest_version"]),
            policy_json=str(data["policy_json"]),
            created_us=int(data["created_us"]),
            updated_us=int(data["updated_us"]),
            destroyed=bool(data["destroyed"]),
        )


@dataclass(frozen=True)
class ReleasedKey:
    """A data key HPKE-sealed to an attested enclave and signed with the release key."""

    name: str
    version: int
    encapsulated_key: bytes
    wrapped_key: bytes
    signature: bytes


def open_released_key(released: ReleasedKey, hpke_private_key: X25519PrivateKey) -> bytes:
    """The enclave side of a release (reference implementation): HPKE-open the data key."""
    return HPKE_SUITE.decrypt(
        released.encapsulated_key + released.wrapped_key,
        hpke_private_key,
        info=release_info(released.name, released.version),
    )


def check_key_name(name: str) -> None:
    """Key names: 1..128 of lower-case letters, digits, dots and dashes, alphanumeric at both ends."""
    if not isinstance(name, str) or not KEY_NAME_RE.match(name):
        raise InvalidArgumentError("key_name must be 1-128 lower-case letters, digits, dots or dashes")


def _check_request_id(request_id: str) -> None:
    if request_id and not REQUEST_ID_RE.match(request_id):
        raise InvalidArgumentError("request_id must be 1-128 printable ASCII characters")


def _token_facts(token: VerifiedToken) -> dict[str, DetailValue]:
    return {
        "jti": token.jti,
        "kid": token.kid,
        "mrenclave": token.mrenclave,
        "mrsigner": token.mrsigner,
        "debuggable": token.debuggable,
        "tcb_status": token.tcb_status,
    }


class KeyManager:
    """Creates, rotates, lists, destroys and releases data keys; audits every outcome."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    # -- reads ---------------------------------------------------------------------------
    def get(self, name: str) -> KeyMetadata:
        """One key's metadata."""
        check_key_name(name)
        with self._deps.store.transaction() as tx:
            record = tx.get_key(name)
        if record is None:
            raise KeyNotFoundError(f"no key named {name!r}")
        return KeyMetadata.from_record(record)

    def list_keys(self) -> list[KeyMetadata]:
        """Every key's metadata (destroyed keys included), by name."""
        with self._deps.store.transaction() as tx:
            records = tx.list_keys()
        return [KeyMetadata.from_record(record) for record in records]

    # -- mutations -------------------------------------------------------------------------
    def create(self, name: str, policy_json: str, *, request_id: str = "", caller: str) -> KeyMetadata:
        """Create a key with its first version and release policy."""
        canonical_policy = ""  # set by params(): parsed inside the audited attempt

        def change(tx: StoreTx, now_us: int) -> tuple[KeyRecord, dict[str, DetailValue]]:
            record = KeyRecord(
                name=name,
                policy_json=canonical_policy,
                latest_version=1,
                created_us=now_us,
                updated_us=now_us,
                destroyed=False,
            )
            if not tx.insert_key(record):
                raise KeyExistsError(f"a key named {name!r} exists or existed")
            self._insert_version(tx, name, 1, now_us)
            return record, {"version": 1}

        def params() -> dict[str, str]:
            nonlocal canonical_policy
            if caller == identity.STATE and not is_instance_key(name):  # (the name is checked first)
                raise CallerNotAllowedError(
                    f"{caller} creates instance keys only ({INSTANCE_KEY_PREFIX}<instance id>), not {name!r}"
                )
            canonical_policy = parse_release_policy(policy_json).to_json()
            return {"name": name, "policy": canonical_policy}

        return self._change_key(
            ACTION_CREATE, name, request_id=request_id, caller=caller, change=change, params=params
        )

    def rotate(self, name: str, *, request_id: str = "", caller: str) -> KeyMetadata:
        """Add a new version; it becomes the latest, older versions keep unwrapping."""

        def change(tx: StoreTx, now_us: int) -> tuple[KeyRecord, dict[str, DetailValue]]:
            current = self._live_key(tx, name, lock=True)
            version = current.latest_version + 1
            if version > MAX_VERSION:
                raise InvalidArgumentError(f"key {name!r} has no versions left")
            self._insert_version(tx, name, version, now_us)
            record = replace(current, latest_version=version, updated_us=now_us)
            tx.update_key(record)
            return record, {"version": version}

        return self._change_key(ACTION_ROTATE, name, request_id=request_id, caller=caller, change=change)

    def destroy(self, name: str, *, request_id: str = "", caller: str) -> KeyMetadata:
        """Crypto-shred every version of a key; the metadata remains, marked destroyed."""

        def change(tx: StoreTx, now_us: int) -> tuple[KeyRecord, dict[str, DetailValue]]:
            current = self._live_key(tx, name, lock=True)
            shredded = tx.delete_key_versions(name)
            record = replace(current, updated_us=now_us, destroyed=True)
            tx.update_key(record)
            return record, {"versions_shredded": shredded}

        return self._change_key(ACTION_DESTROY, name, request_id=request_id, caller=caller, change=change)

    def _change_key(
        self,
        action: str,
        name: str,
        *,
        request_id: str,
        caller: str,
        change: Callable[[StoreTx, int], tuple[KeyRecord, dict[str, DetailValue]]],
        params: Callable[[], dict[str, str]] | None = None,
    ) -> KeyMetadata:
        """One audited, idempotent key mutation: `change` writes the key and says what to audit;
        a refusal (a bad name or policy, a conflict) is audited as one."""

        def effect(tx: StoreTx, now_us: int) -> KeyMetadata:
            record, detail = change(tx, now_us)
            self._deps.audit.append(
                tx,
                action=action,
                outcome=OUTCOME_ALLOWED,
                caller=caller,
                detail={"key": name, **detail, "request_id": request_id},
            )
            return KeyMetadata.from_record(record)

        try:
            check_key_name(name)
            return self._mutate(action, caller, request_id, params() if params else {"name": name}, effect)
        except BaseException as exc:
            self._refused(action, caller, {"key": name, "request_id": request_id}, exc)
            raise

    # -- release -----------------------------------------------------------------------------
    def release(
        self, token: str, name: str, version: int = 0, *, caller: str, fencing_token: int = 0
    ) -> ReleasedKey:
        """Release a data key (``version`` 0: the latest) HPKE-sealed to the token's enclave; an
        instance key with a lease only for its current `fencing_token` (leases.py)."""
        detail: dict[str, DetailValue] = {"key": name, "requested_version": version}
        if fencing_token:
            detail["fencing_token"] = fencing_token
        try:
            check_key_name(name)
            if not 0 <= version <= MAX_VERSION:
                raise InvalidArgumentError("version out of range")
            verified = self._deps.verifier.verify(token)
            detail.update(_token_facts(verified))
            enclave = bound_enclave_keys(verified)
            if enclave.keyvault_release_public_bytes != self._deps.release_signer.public_key:
                # Attest issues no such token; refuse anyway rather than sign for such an enclave.
                raise ReleaseRefusedError(
                    "the token's enclave pins another keyvault release key", reason="RELEASE_KEY_MISMATCH"
                )
            with self._deps.store.transaction() as tx:
                key = self._live_key(tx, name, lock=False)
                chosen = version or key.latest_version
                wrapped = tx.get_key_version(name, chosen) if chosen <= key.latest_version else None
            if wrapped is None:
                raise KeyNotFoundError(f"key {name!r} has no version {chosen}")
            detail["version"] = chosen
            decision = parse_release_policy(key.policy_json).evaluate(verified.claims)
            if not decision.allowed:
                raise ReleaseRefusedError(decision.reason)
            if is_instance_key(name):
                # The key's policy was written by its creator (possibly the state host); the
                # operator's enclave policy bounds every instance-key release regardless.
                detail["enclave_policy_checked"] = True
                refusal = self._deps.enclave_policy.refusal(verified.claims)
                if refusal is not None:
                    raise ReleaseRefusedError(refusal.message, reason=refusal.reason)
            data_key = self._deps.kek.unwrap(wrapped.wrapped, data_key_aad(name, chosen))
            sealed = HPKE_SUITE.encrypt(data_key, enclave.hpke_public_key, info=release_info(name, chosen))
            enc, ciphertext = sealed[:HPKE_ENC_SIZE], sealed[HPKE_ENC_SIZE:]
            # The signature is what lets the enclave tell our release from a host-made one.
            signature = self._deps.release_signer.sign(
                wire.wrapped_key_signing_bytes(name, chosen, enclave.hpke_public_bytes, enc, ciphertext)
            )
            with self._deps.store.transaction() as tx:
                # Housekeeping in its own short transaction, so releases never contend on it.
                tx.purge_jtis(to_micros(self._deps.clock()))
            with self._deps.store.transaction() as tx:
                # Re-read under lock: a destroy that committed meanwhile wins.
                self._live_key(tx, name, lock=True)
                instance_id = leases.instance_of_key(name)
                if instance_id is not None:  # a host that lost the instance gets its key no more
                    leases.check(tx, instance_id, fencing_token)
                if not tx.use_jti(verified.jti, replay_horizon_us(verified, self._deps.verifier.leeway_s)):
                    raise TokenReplayError("token was already used for a key release")
                self._deps.audit.append(
                    tx, action=ACTION_RELEASE, outcome=OUTCOME_ALLOWED, caller=caller, detail=detail
                )
            return ReleasedKey(
                name=name, version=chosen, encapsulated_key=enc, wrapped_key=ciphertext, signature=signature
            )
        except BaseException as exc:
            self._refused(ACTION_RELEASE, caller, detail, exc)
            raise

    def version_state(self, name: str, version: int) -> Literal["live", "destroyed", "missing"]:
        """ "live" (the key exists, is not destroyed, and has `version`), "destroyed", or
        "missing" (no such key or version)."""
        with self._deps.store.transaction() as tx:
            record = tx.get_key(name, lock=False)
        if record is None or not 1 <= version <= record.latest_version:
            return "missing"
        return "destroyed" if record.destroyed else "live"

    def data_key(self, name: str, version: int) -> bytes:
        """A data key version, unwrapped, for what the keyvault derives from it itself (hold
        roots, hold_keys.py); KeyNotFoundError when there is none, KeyDestroyedError."""
        with self._deps.store.transaction() as tx:
            self._live_key(tx, name, lock=False)
            wrapped = tx.get_key_version(name, version)
        if wrapped is None:
            raise KeyNotFoundError(f"key {name!r} has no version {version}")
        return self._deps.kek.unwrap(wrapped.wrapped, data_key_aad(name, version))

    # -- helpers -------------------------------------------------------------------------------
    def _live_key(self, tx: StoreTx, name: str, *, lock: bool) -> KeyRecord:
        record = tx.get_key(name, lock=lock)
        if record is None:
            raise KeyNotFoundError(f"no key named {name!r}")
        if record.destroyed:
            raise KeyDestroyedError(f"key {name!r} was destroyed")
        return record

    def _insert_version(self, tx: StoreTx, name: str, version: int, now_us: int) -> None:
        data_key = secrets.token_bytes(DATA_KEY_SIZE)
        wrapped = self._deps.kek.wrap(data_key, data_key_aad(name, version))
        inserted = tx.insert_key_version(
            KeyVersionRecord(
                name=name, version=version, kek_id=self._deps.kek.key_id, wrapped=wrapped, created_us=now_us
            )
        )
        if not inserted:
            raise KeyExistsError(f"key {name!r} version {version} exists")

    def _mutate(
        self,
        operation: str,
        caller: str,
        request_id: str,
        params: Mapping[str, str],
        effect: Callable[[StoreTx, int], KeyMetadata],
    ) -> KeyMetadata:
        _check_request_id(request_id)
        fingerprint = hashlib.sha256(
            canonical_json({"operation": operation, **params}).encode("ascii")
        ).hexdigest()
        now_us = to_micros(self._deps.clock())
        scoped_id = f"{caller}#{request_id}"  # a SPIFFE ID has no '#': callers never share an id
        with self._deps.store.transaction() as tx:
            if request_id:
                prior = tx.claim_request(scoped_id, operation, fingerprint, now_us)
                if prior is not None:
                    if prior.operation != operation or prior.fingerprint != fingerprint:
                        raise IdempotencyConflictError("request_id was used for a different request")
                    return KeyMetadata.from_json(prior.result_json)
            result = effect(tx, now_us)
            if request_id:
                tx.complete_request(scoped_id, result.to_json())
            return result

    def _refused(
        self, action: str, caller: str, detail: Mapping[str, DetailValue], exc: BaseException
    ) -> None:
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt and friends are not refusals
        self._deps.audit.record_refusal(action=action, caller=caller, detail=detail, refusal=exc)
