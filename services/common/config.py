"""Service configuration: frozen dataclasses built from the environment.

Every environment variable the services read is named here, once. A broken
security invariant (a missing certificate, a plaintext main port) fails at
start-up, not on the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Environment variable names (the deployment contract; deploy/k8s sets these).
ENV_DATA_DIR = "VEIL_DATA_DIR"
ENV_LISTEN = "VEIL_LISTEN"
ENV_ADMIN_LISTEN = "VEIL_ADMIN_LISTEN"
ENV_TLS_CERT = "VEIL_TLS_CERT"
ENV_TLS_KEY = "VEIL_TLS_KEY"
ENV_TLS_CA = "VEIL_TLS_CA"
ENV_GRACE_SECONDS = "VEIL_GRACE_SECONDS"
ENV_LOG_LEVEL = "VEIL_LOG_LEVEL"
ENV_KEYVAULT_ADDR = "VEIL_KEYVAULT_ADDR"
ENV_STATE_ADDRS = "VEIL_STATE_ADDRS"
ENV_STATE_DB = "VEIL_STATE_DB"
ENV_KEYVAULT_DB = "VEIL_KEYVAULT_DB"
ENV_KEYVAULT_ENCLAVE_POLICY_FILE = "VEIL_KEYVAULT_ENCLAVE_POLICY_FILE"
ENV_ENCLAVE_MODE = "VEIL_ENCLAVE_MODE"
ENV_ENCLAVE_MEMORY_MB = "VEIL_ENCLAVE_MEMORY_MB"
ENV_SEAL_DIR = "VEIL_SEAL_DIR"
ENV_PLATFORM_SECRET = "VEIL_PLATFORM_SECRET"
ENV_STATE_DB_SCHEMA = "VEIL_STATE_DB_SCHEMA"
ENV_SNAPSHOT_EVERY = "VEIL_SNAPSHOT_EVERY"
ENV_STATE_BATCH_MAX = "VEIL_STATE_BATCH_MAX"
ENV_STATE_BATCH_LINGER_MS = "VEIL_STATE_BATCH_LINGER_MS"
ENV_STATE_MAX_HEAD_LAG = "VEIL_STATE_MAX_HEAD_LAG"
ENV_ATTESTATION_ROOT = "VEIL_ATTESTATION_ROOT"
ENV_GATEWAY_PUBLIC_LISTEN = "VEIL_GATEWAY_PUBLIC_LISTEN"
ENV_SHARD_MAP = "VEIL_SHARD_MAP"
ENV_GATEWAY_AUTH = "VEIL_GATEWAY_AUTH"
ENV_GATEWAY_RATE = "VEIL_GATEWAY_RATE"
ENV_GATEWAY_BURST = "VEIL_GATEWAY_BURST"
ENV_GATEWAY_MAX_MESSAGE_BYTES = "VEIL_GATEWAY_MAX_MESSAGE_BYTES"
ENV_GATEWAY_TIMEOUT_SECONDS = "VEIL_GATEWAY_TIMEOUT_SECONDS"
ENV_KEK_PROVIDER = "VEIL_KEK_PROVIDER"
ENV_KEK_FILE = "VEIL_KEK_FILE"
ENV_PKCS11_MODULE = "VEIL_PKCS11_MODULE"
ENV_PKCS11_TOKEN_LABEL = "VEIL_PKCS11_TOKEN_LABEL"
ENV_PKCS11_PIN = "VEIL_PKCS11_PIN"
ENV_PKCS11_KEY_LABEL = "VEIL_PKCS11_KEY_LABEL"

# Default addresses of `veil up` (deploy order: keyvault, state, gateway).
# Each service serves mTLS on its main port and plaintext health/reflection on its admin port.
DEFAULT_PORTS: Mapping[str, tuple[int, int]] = {
    "gateway": (50051, 51051),
    "keyvault": (50052, 51052),
    "state": (50053, 51053),
}
DEFAULT_DATA_DIR = Path(".veil")
DEFAULT_GRACE_SECONDS = 10.0


class ConfigError(ValueError):
    """A configuration value is missing or breaks an invariant."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: this service's certificate and key, and the CA that signs peers."""

    cert: Path
    key: Path
    ca: Path

    def check(self) -> None:
        """Fail fast if any file is missing: no service ever falls back to plaintext."""
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path.is_file():
                raise ConfigError(f"TLS {label} file {path} does not exist; run `veil pki init`")


@dataclass(frozen=True)
class ServiceConfig:
    """What every Veil server needs: its name, addresses, TLS files, data dir and drain grace."""

    service: str
    listen: str
    admin_listen: str
    tls: TlsFiles
    data_dir: Path
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, service: str, env: Mapping[str, str] | None = None) -> ServiceConfig:
        """Build the config for `service` from the environment, defaulting to the dev PKI."""
        env = os.environ if env is None else env
        if service not in DEFAULT_PORTS:
            raise ConfigError(f"unknown service {service!r}; expected one of {sorted(DEFAULT_PORTS)}")
        port, admin_port = DEFAULT_PORTS[service]
        data_dir = Path(env.get(ENV_DATA_DIR, str(DEFAULT_DATA_DIR)))
        pki = data_dir / "pki"
        tls = TlsFiles(
            cert=Path(env.get(ENV_TLS_CERT, str(pki / f"{service}.pem"))),
            key=Path(env.get(ENV_TLS_KEY, str(pki / f"{service}-key.pem"))),
            ca=Path(env.get(ENV_TLS_CA, str(pki / "ca.pem"))),
        )
        try:
            grace = float(env.get(ENV_GRACE_SECONDS, str(DEFAULT_GRACE_SECONDS)))
        except ValueError as exc:
            raise ConfigError(f"{ENV_GRACE_SECONDS} must be a number of seconds") from exc
        return cls(
            service=service,
            listen=env.get(ENV_LISTEN, f"127.0.0.1:{port}"),
            admin_listen=env.get(ENV_ADMIN_LISTEN, f"127.0.0.1:{admin_port}"),
            tls=tls,
            data_dir=data_dir,
            grace_seconds=grace,
            log_level=env.get(ENV_LOG_LEVEL, "INFO").upper(),
        )
