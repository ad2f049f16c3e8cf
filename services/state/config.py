"""State-service configuration from the environment (names in services/common/config.py).

Fail-closed rules: VEIL_STATE_ENCLAVE_MODE has no default. A production deployment that forgets it
refuses to start instead of silently running a simulated enclave; `veil up` sets ``sim``.

VEIL_STATE_DB (a SQLite path or a PostgreSQL URL, which may hold a password) may instead be
read from the file VEIL_STATE_DB_FILE names: once, at start, refused when other users may read
it (veil.services.common.config.secret_setting). The manifests mount it that way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from veil.services.common.config import (
    DEFAULT_PORTS,
    ENV_STATE_BATCH_LINGER_MS,
    ENV_STATE_BATCH_MAX,
    ENV_STATE_DB,
    ENV_STATE_DB_SCHEMA,
    ENV_STATE_ENCLAVE_MEMORY_MB,
    ENV_STATE_ENCLAVE_MODE,
    ENV_STATE_KEYVAULT_ADDR,
    ENV_STATE_MAX_HEAD_LAG,
    ENV_STATE_PLATFORM_SECRET,
    ENV_STATE_SEAL_DIR,
    ENV_STATE_SNAPSHOT_EVERY,
    ConfigError,
    ServiceConfig,
    secret_setting,
)
from veil.services.state.store_postgres import DEFAULT_SCHEMA
from veil.services.state.store_sqlite import DEFAULT_FILE_NAME

ENCLAVE_MODES = ("sim", "gramine")
DEFAULT_MEMORY_MB = 96  # the SGXv1 EPC scale
DEFAULT_SNAPSHOT_EVERY = 1000
DEFAULT_BATCH_MAX = 256
# How long a batch may wait to reach the size of the previous one (batcher.py). Behind the
# gateway, commands reach the host at the gateway's pace: with 2 ms, batches at 64 clients held
# ~5 commands (0.19 ECALLs per command); 20 ms gives ~16 (0.06) at the same throughput, costing
# ~10% throughput at 16 clients, where waiting batches can leave the CPU idle (`make bench`).
DEFAULT_BATCH_LINGER_MS = 20.0
SIM_PLATFORM_SECRET_FILE = "sim-platform.key"  # noqa: S105 - a file name, not a secret


def _int(env: Mapping[str, str], name: str, default: int, minimum: int) -> int:
    raw = env.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not 0 <= value <= 1000:
        raise ConfigError(f"{name} must be between 0 and 1000, got {value}")
    return value


@dataclass(frozen=True)
class StateConfig:
    """Everything the state host needs besides its server config."""

    service: ServiceConfig
    keyvault_address: str
    database: str
    database_schema: str
    enclave_mode: str
    enclave_memory_mb: int
    seal_dir: Path
    platform_secret: Path
    pck_dir: Path
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    batch_max: int = DEFAULT_BATCH_MAX
    batch_linger_ms: float = DEFAULT_BATCH_LINGER_MS
    max_head_lag: int = 0  # 0: no bound; see heads.py

    @property
    def sealed_cache(self) -> Path:
        """The sealed key cache file."""
        return self.seal_dir / "keys.sealed"

    @classmethod
    def from_env(cls, service: ServiceConfig, env: Mapping[str, str] | None = None) -> StateConfig:
        """Read the environment; ConfigError names the variable at fault."""
        env = os.environ if env is None else env
        data_dir = service.data_dir
        mode = env.get(ENV_STATE_ENCLAVE_MODE, "")
        if mode not in ENCLAVE_MODES:
            raise ConfigError(
                f"{ENV_STATE_ENCLAVE_MODE} must be one of {', '.join(ENCLAVE_MODES)} (got {mode!r}); "
                "there is no default, so a production node never falls back to a simulated enclave"
            )
        return cls(
            service=service,
            keyvault_address=env.get(ENV_STATE_KEYVAULT_ADDR, f"127.0.0.1:{DEFAULT_PORTS['keyvault'][0]}"),
            database=secret_setting(env, ENV_STATE_DB) or str(data_dir / DEFAULT_FILE_NAME),
            database_schema=env.get(ENV_STATE_DB_SCHEMA, "") or DEFAULT_SCHEMA,
            enclave_mode=mode,
            enclave_memory_mb=_int(env, ENV_STATE_ENCLAVE_MEMORY_MB, DEFAULT_MEMORY_MB, 1),
            seal_dir=Path(env.get(ENV_STATE_SEAL_DIR, "") or data_dir / "sealed"),
            platform_secret=Path(
                env.get(ENV_STATE_PLATFORM_SECRET, "") or data_dir / SIM_PLATFORM_SECRET_FILE
            ),
            pck_dir=data_dir / "pki",  # sim only: the dev PCK chain `veil pki init` writes
            snapshot_every=_int(env, ENV_STATE_SNAPSHOT_EVERY, DEFAULT_SNAPSHOT_EVERY, 0),
            batch_max=_int(env, ENV_STATE_BATCH_MAX, DEFAULT_BATCH_MAX, 1),
            batch_linger_ms=_float(env, ENV_STATE_BATCH_LINGER_MS, DEFAULT_BATCH_LINGER_MS),
            max_head_lag=_int(env, ENV_STATE_MAX_HEAD_LAG, 0, 0),
        )
