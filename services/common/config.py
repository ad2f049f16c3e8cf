"""Service configuration: frozen dataclasses built from the environment.

Every environment variable the services read is named here, once. A broken
security invariant (a missing certificate, a plaintext main port) fails at
start-up, not on the first request.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Environment variable names (the deployment contract; deploy/k8s sets these). A service reads
# only variables named after it, VEIL_<SERVICE>_*: one environment (a shell, `veil up`, a test)
# that starts several services never configures one through a variable meant for another.

# Settings every server has, each read under its own service's name (`env_name`).
LISTEN = "LISTEN"
ADMIN_LISTEN = "ADMIN_LISTEN"
TLS_CERT = "TLS_CERT"
TLS_KEY = "TLS_KEY"
TLS_CA = "TLS_CA"
DATA_DIR = "DATA_DIR"
GRACE_SECONDS = "GRACE_SECONDS"
LOG_LEVEL = "LOG_LEVEL"
# The CA whose leaves alone may be spiffe://veil/admin (default: the dev PKI's admin-ca.pem).
ADMIN_CA = "ADMIN_CA"
SERVER_SETTINGS = (
    LISTEN,
    ADMIN_LISTEN,
    TLS_CERT,
    TLS_KEY,
    TLS_CA,
    ADMIN_CA,
    DATA_DIR,
    GRACE_SECONDS,
    LOG_LEVEL,
)

# The keyvault's.
ENV_KEYVAULT_DB = "VEIL_KEYVAULT_DB"
ENV_KEYVAULT_ENCLAVE_POLICY_FILE = "VEIL_KEYVAULT_ENCLAVE_POLICY_FILE"
ENV_KEYVAULT_ATTESTATION_ROOT = "VEIL_KEYVAULT_ATTESTATION_ROOT"
ENV_KEYVAULT_KEK_PROVIDER = "VEIL_KEYVAULT_KEK_PROVIDER"
ENV_KEYVAULT_KEK_FILE = "VEIL_KEYVAULT_KEK_FILE"
ENV_KEYVAULT_PKCS11_MODULE = "VEIL_KEYVAULT_PKCS11_MODULE"
ENV_KEYVAULT_PKCS11_TOKEN_LABEL = "VEIL_KEYVAULT_PKCS11_TOKEN_LABEL"
ENV_KEYVAULT_PKCS11_PIN = "VEIL_KEYVAULT_PKCS11_PIN"
ENV_KEYVAULT_PKCS11_KEY_LABEL = "VEIL_KEYVAULT_PKCS11_KEY_LABEL"
# Secrets may come from files instead (secret_setting): what the manifests use.
ENV_KEYVAULT_DB_FILE = "VEIL_KEYVAULT_DB_FILE"
ENV_KEYVAULT_PKCS11_PIN_FILE = "VEIL_KEYVAULT_PKCS11_PIN_FILE"
# The state host's.
ENV_STATE_KEYVAULT_ADDR = "VEIL_STATE_KEYVAULT_ADDR"
ENV_STATE_DB = "VEIL_STATE_DB"
ENV_STATE_DB_SCHEMA = "VEIL_STATE_DB_SCHEMA"
ENV_STATE_DB_FILE = "VEIL_STATE_DB_FILE"
ENV_STATE_ENCLAVE_MODE = "VEIL_STATE_ENCLAVE_MODE"
ENV_STATE_ENCLAVE_MEMORY_MB = "VEIL_STATE_ENCLAVE_MEMORY_MB"
ENV_STATE_SEAL_DIR = "VEIL_STATE_SEAL_DIR"
ENV_STATE_PLATFORM_SECRET = "VEIL_STATE_PLATFORM_SECRET"
ENV_STATE_SNAPSHOT_EVERY = "VEIL_STATE_SNAPSHOT_EVERY"
ENV_STATE_BATCH_MAX = "VEIL_STATE_BATCH_MAX"
ENV_STATE_BATCH_LINGER_MS = "VEIL_STATE_BATCH_LINGER_MS"
ENV_STATE_MAX_HEAD_LAG = "VEIL_STATE_MAX_HEAD_LAG"
# Instance ownership (veil.services.state.ownership): the host's stable name, its leases' ttl.
ENV_STATE_NODE_NAME = "VEIL_STATE_NODE_NAME"
ENV_STATE_LEASE_TTL_MS = "VEIL_STATE_LEASE_TTL_MS"
# The gateway's.
ENV_GATEWAY_KEYVAULT_ADDR = "VEIL_GATEWAY_KEYVAULT_ADDR"
ENV_GATEWAY_STATE_ADDRS = "VEIL_GATEWAY_STATE_ADDRS"
ENV_GATEWAY_SHARD_MAP = "VEIL_GATEWAY_SHARD_MAP"
ENV_GATEWAY_PUBLIC_LISTEN = "VEIL_GATEWAY_PUBLIC_LISTEN"
ENV_GATEWAY_AUTH = "VEIL_GATEWAY_AUTH"
ENV_GATEWAY_RATE = "VEIL_GATEWAY_RATE"
ENV_GATEWAY_BURST = "VEIL_GATEWAY_BURST"
ENV_GATEWAY_MAX_MESSAGE_BYTES = "VEIL_GATEWAY_MAX_MESSAGE_BYTES"
ENV_GATEWAY_TIMEOUT_SECONDS = "VEIL_GATEWAY_TIMEOUT_SECONDS"
ENV_GATEWAY_MAX_STREAMS = "VEIL_GATEWAY_MAX_STREAMS"
ENV_GATEWAY_STREAMS_PER_CLIENT = "VEIL_GATEWAY_STREAMS_PER_CLIENT"
ENV_GATEWAY_STREAM_LIFETIME_SECONDS = "VEIL_GATEWAY_STREAM_LIFETIME_SECONDS"
ENV_GATEWAY_MAX_CONCURRENT_RPCS = "VEIL_GATEWAY_MAX_CONCURRENT_RPCS"

# Telemetry (veil.services.common.telemetry): OpenTelemetry's own variable names, the same for
# every service (each names itself in service.name). Unset: no traces, no metrics, and no tracing
# interceptors at all. The OTLP exporter reads its own OTEL_EXPORTER_OTLP_* (endpoint, headers,
# certificates), and the periodic metric reader OTEL_METRIC_EXPORT_INTERVAL.
ENV_OTEL_SDK_DISABLED = "OTEL_SDK_DISABLED"
ENV_OTEL_TRACES_EXPORTER = "OTEL_TRACES_EXPORTER"
ENV_OTEL_TRACES_SAMPLER = "OTEL_TRACES_SAMPLER"
ENV_OTEL_TRACES_SAMPLER_ARG = "OTEL_TRACES_SAMPLER_ARG"
ENV_OTEL_METRICS_EXPORTER = "OTEL_METRICS_EXPORTER"


#: Names read before each service had its own. Setting one is a start-up error naming its
#: replacement: silently ignored, `VEIL_KEK_PROVIDER=pkcs11` would leave the KEK in a file.
RETIRED_NAMES: Mapping[str, str] = {
    **{f"VEIL_{setting}": f"VEIL_<SERVICE>_{setting}" for setting in SERVER_SETTINGS},
    "VEIL_KEYVAULT_ADDR": f"{ENV_STATE_KEYVAULT_ADDR} and {ENV_GATEWAY_KEYVAULT_ADDR}",
    "VEIL_STATE_ADDRS": ENV_GATEWAY_STATE_ADDRS,
    "VEIL_SHARD_MAP": ENV_GATEWAY_SHARD_MAP,
    "VEIL_ENCLAVE_MODE": ENV_STATE_ENCLAVE_MODE,
    "VEIL_ENCLAVE_MEMORY_MB": ENV_STATE_ENCLAVE_MEMORY_MB,
    "VEIL_SEAL_DIR": ENV_STATE_SEAL_DIR,
    "VEIL_PLATFORM_SECRET": ENV_STATE_PLATFORM_SECRET,
    "VEIL_SNAPSHOT_EVERY": ENV_STATE_SNAPSHOT_EVERY,
    "VEIL_ATTESTATION_ROOT": ENV_KEYVAULT_ATTESTATION_ROOT,
    "VEIL_KEK_PROVIDER": ENV_KEYVAULT_KEK_PROVIDER,
    "VEIL_KEK_FILE": ENV_KEYVAULT_KEK_FILE,
    "VEIL_PKCS11_MODULE": ENV_KEYVAULT_PKCS11_MODULE,
    "VEIL_PKCS11_TOKEN_LABEL": ENV_KEYVAULT_PKCS11_TOKEN_LABEL,
    "VEIL_PKCS11_PIN": ENV_KEYVAULT_PKCS11_PIN,
    "VEIL_PKCS11_KEY_LABEL": ENV_KEYVAULT_PKCS11_KEY_LABEL,
}


def env_name(service: str, setting: str) -> str:
    """The variable of one of `service`'s server settings: VEIL_<SERVICE>_<SETTING>."""
    return f"VEIL_{service.upper()}_{setting}"


def server_env(service: str, settings: Mapping[str, str]) -> dict[str, str]:
    """`settings` ({LISTEN: "0.0.0.0:50051", ...}) as `service`'s environment variables."""
    return {env_name(service, setting): value for setting, value in settings.items()}


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


#: A secret setting NAME may instead name a file in NAME_FILE (a mounted Secret), so the secret
#: is not in the process environment (`/proc/<pid>/environ`, `kubectl describe`, crash dumps).
SECRET_FILE_SUFFIX = "_FILE"


def secret_setting(env: Mapping[str, str], name: str, default: str = "") -> str:
    """The secret `name`: read once from the file NAME_FILE names, else the variable itself
    (kept for development; the manifests mount files). Setting both is refused."""
    file_variable = name + SECRET_FILE_SUFFIX
    path = env.get(file_variable, "").strip()
    if not path:
        return env.get(name, default)
    if env.get(name):
        raise ConfigError(f"set {name} or {file_variable}, not both")
    return read_secret_file(Path(path), file_variable)


def read_secret_file(path: Path, variable: str) -> str:
    """A secret file's text (one trailing newline dropped), refused when other users may read it
    or anyone but its owner may change it (group read stays allowed: Kubernetes mounts Secrets
    0440 for the pod's fsGroup), when it is not a regular file, or when it is empty."""
    try:
        with path.open("rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise ConfigError(f"{variable}: {path} is not a regular file")
            if status.st_mode & 0o027:
                raise ConfigError(
                    f"{variable}: {path} has mode {stat.S_IMODE(status.st_mode):04o}: other users may read "
                    "or change it; chmod 600 it (or mount the Secret with defaultMode 0440)"
                )
            raw = handle.read()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"{variable}: {path} is empty")
    return text


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for mutual TLS: this service's certificate and key, the CA that signs peers, and
    (servers) the admin CA, the one issuer of spiffe://veil/admin certificates. A server without
    an admin CA accepts no admin at all."""

    cert: Path
    key: Path
    ca: Path
    admin_ca: Path | None = None

    def check(self) -> None:
        """Fail fast if any file is missing: no service ever falls back to plaintext."""
        for label, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not path.is_file():
                raise ConfigError(f"TLS {label} file {path} does not exist; run `veil pki init`")
        if self.admin_ca is not None and not self.admin_ca.is_file():
            raise ConfigError(f"admin CA file {self.admin_ca} does not exist; run `veil pki init --force`")


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
        retired = sorted(name for name in RETIRED_NAMES if name in env)
        if retired:
            replaced = "; ".join(f"{name} is now {RETIRED_NAMES[name]}" for name in retired)
            raise ConfigError(f"renamed environment variables are set: {replaced}")
        port, admin_port = DEFAULT_PORTS[service]

        def setting(name: str, default: str) -> str:
            return env.get(env_name(service, name), default)

        data_dir = Path(setting(DATA_DIR, str(DEFAULT_DATA_DIR)))
        pki = data_dir / "pki"
        admin_ca = setting(ADMIN_CA, "").strip()
        dev_admin_ca = pki / "admin-ca.pem"  # veil.dev.pki.ADMIN_CA_FILE
        tls = TlsFiles(
            cert=Path(setting(TLS_CERT, str(pki / f"{service}.pem"))),
            key=Path(setting(TLS_KEY, str(pki / f"{service}-key.pem"))),
            ca=Path(setting(TLS_CA, str(pki / "ca.pem"))),
            admin_ca=Path(admin_ca) if admin_ca else (dev_admin_ca if dev_admin_ca.is_file() else None),
        )
        try:
            grace = float(setting(GRACE_SECONDS, str(DEFAULT_GRACE_SECONDS)))
        except ValueError as exc:
            raise ConfigError(f"{env_name(service, GRACE_SECONDS)} must be a number of seconds") from exc
        return cls(
            service=service,
            listen=setting(LISTEN, f"127.0.0.1:{port}"),
            admin_listen=setting(ADMIN_LISTEN, f"127.0.0.1:{admin_port}"),
            tls=tls,
            data_dir=data_dir,
            grace_seconds=grace,
            log_level=setting(LOG_LEVEL, "INFO").upper(),
        )
