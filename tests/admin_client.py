"""An SDK client as the admin of a local mesh (`veil up`'s or a dev cluster's data directory)."""

from __future__ import annotations

from pathlib import Path

from veil.sdk.client import VeilClient, connect
from veil.sdk.counters import MemoryCounters
from veil.sdk.trust_policy import POLICY_FILE, load_policy


def admin_client(gateway: str, data_dir: Path, timeout: float) -> VeilClient:
    """Through `gateway`, with the admin certificate of `data_dir`'s dev PKI and its client policy
    (the enclave is verified first); command counters in memory, so no run sees another's."""
    pki = data_dir / "pki"
    return connect(
        gateway,
        policy=load_policy(data_dir / POLICY_FILE),
        ca=pki / "ca.pem",
        cert=pki / "admin.pem",
        key=pki / "admin-key.pem",
        data_dir=data_dir,
        counters=MemoryCounters(),
        timeout=timeout,
    )
