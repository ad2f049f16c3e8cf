"""Instance data keys: the sealed cache on this platform first, else a release from the keyvault.

The sealed cache is the enclave's Seal blob in one file under VEIL_STATE_SEAL_DIR. It opens only on
the same platform and the same enclave measurement; on any other node (or after an enclave
upgrade) Unseal fails and every key comes from the keyvault instead, released to this
enclave's attested HPKE key and provisioned into it. The host never sees a key in the clear.

Each instance's key is `instance.<instance_id>` at the keyvault, created with a release policy
pinning this enclave's measurement (and refusing debug enclaves); in sim mode the policy also
accepts the "Unevaluated" TCB status that quotes verified without collateral carry. The host
writes that policy, so it is not what protects the key: the keyvault releases `instance.*` keys
(and accepts commit heads) only to enclaves that also satisfy the operator's enclave policy
(`veil.services.keyvault.enclave_policy`, VEIL_KEYVAULT_ENCLAVE_POLICY_FILE).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.services.state.attestation import Attestor
from veil.services.state.enclave_host import EnclaveCallError, EnclaveHost
from veil.services.state.keyvault_client import KeyvaultClient

_log = logging.getLogger(__name__)

SIM_ACCEPTED_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded", "Unevaluated")


def release_policy(issuer: str, mrenclave: bytes, *, sim: bool) -> str:
    """The release policy of an instance key: this enclave build only, never a debug one."""
    policy: dict[str, object] = {
        "version": "1.0.0",
        "anyOf": [
            {
                "authority": issuer,
                "allOf": [
                    {"claim": "x-ms-sgx-mrenclave", "equals": mrenclave.hex()},
                    {"claim": "x-ms-sgx-is-debuggable", "equals": False},
                ],
            }
        ],
    }
    if sim:
        policy["x-veil-accepted-tcb-statuses"] = list(SIM_ACCEPTED_TCB_STATUSES)
    return json.dumps(policy, sort_keys=True, separators=(",", ":"))


class SealedCache:
    """The sealed key cache file; written atomically (temp file, fsync, rename, fsync dir)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, blob: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, blob)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


class KeyProvisioner:
    """Gets instance data keys into one enclave."""

    def __init__(
        self, enclave: EnclaveHost, keyvault: KeyvaultClient, attestor: Attestor, cache: SealedCache
    ) -> None:
        self._enclave = enclave
        self._keyvault = keyvault
        self._attestor = attestor
        self._cache = cache

    def unseal_cache(self) -> set[str]:
        """Load the sealed cache; the instances it covered (empty when absent or unreadable here)."""
        blob = self._cache.read()
        if blob is None:
            _log.info("no sealed key cache at %s; keys come from the keyvault", self._cache.path)
            return set()
        try:
            loaded = set(self._enclave.unseal(blob))
        except EnclaveCallError as exc:
            # Another platform or another enclave build: expected after a node move or upgrade.
            _log.warning(
                "sealed key cache %s does not open on this platform (%s); keys come from the keyvault",
                self._cache.path,
                exc.message,
            )
            return set()
        _log.info("unsealed keys of %d instance(s) from %s", len(loaded), self._cache.path)
        return loaded

    def release(self, instance_id: str, version: int = 0) -> int:
        """Release a key version (0: the latest) to this enclave and provision it; returns the version."""
        token = self._attestor.fresh().token  # a release consumes its token
        released = self._keyvault.release_key(token, wire.instance_key_name(instance_id), version)
        wrapped = envelope_pb2.WrappedKey(
            suite=envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM,
            encapsulated_key=released.encapsulated_key,
            ciphertext=released.wrapped_key,
            signature=released.signature,  # the enclave accepts only releases its pinned keyvault signed
        )
        self._enclave.provision_key(instance_id, released.version, wrapped)
        return released.version

    def release_versions(self, instance_id: str, versions: Iterable[int]) -> None:
        """Release every listed version (those an instance's stored data was encrypted under)."""
        for version in sorted(set(versions)):
            self.release(instance_id, version)

    def create_key(self, instance_id: str, mrenclave: bytes, *, sim: bool) -> bool:
        """Create the instance key at the keyvault (idempotent); False when it existed."""
        policy = release_policy(self._attestor.current().issuer, mrenclave, sim=sim)
        # A deterministic request id: a retried creation is the same keyvault request.
        name = wire.instance_key_name(instance_id)
        return self._keyvault.create_key(name, policy, request_id=f"state.create.{instance_id}")

    def reseal(self) -> None:
        """Seal every provisioned key to this platform and replace the cache."""
        self._cache.write(self._enclave.seal())
