"""Trust anchors for quote verification: Intel's SGX Root CA key and the dev PKI root.

Roots are pinned by public key. A production policy pins ``intel``; the ``dev`` root is the
sim PCK root written by ``veil pki init`` under ``<data_dir>/pki/sgx-root.pem`` and must never
be accepted in production.
"""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

#: Intel SGX Root CA public key, X9.62 uncompressed. Shared by both published encodings of
#: the root certificate (notAfter 2033 and 2049).
INTEL_SGX_ROOT_PUBLIC_KEY_HEX = (
    "040ba9c4c0c0c86193a3fe23d6b02cda10a8bbd4e88e48b4458561a36e705525"
    "f567918e2edc88e40d860bd0cc4ee26aacc988e505a953558c453f6b0904ae7394"
)

DEFAULT_DATA_DIR = Path(".veil")
DEV_ROOT_RELATIVE_PATH = Path("pki") / "sgx-root.pem"


class RootError(ValueError):
    """A root specification or root file is unusable (a configuration error, not a bad quote)."""


def intel_root_public_key() -> ec.EllipticCurvePublicKey:
    """The pinned Intel SGX Root CA key."""
    return ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), bytes.fromhex(INTEL_SGX_ROOT_PUBLIC_KEY_HEX)
    )


def dev_root_path(data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Where the dev PKI keeps the sim PCK root certificate."""
    return data_dir / DEV_ROOT_RELATIVE_PATH


def load_root_pem(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a P-256 root key from a PEM file holding one certificate or one public key."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RootError(f"cannot read root {path}: {exc.strerror or exc}") from None
    key: object
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise RootError(f"root {path} is not a valid PEM certificate") from None
        if len(certs) != 1:
            raise RootError(f"root {path} must hold exactly one certificate, found {len(certs)}")
        key = certs[0].public_key()
    else:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            raise RootError(f"root {path} is neither a PEM certificate nor a public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RootError(f"root {path} key is not ECDSA P-256")
    return key


def resolve_root(spec: str, dev_root_path: Path | None = None) -> ec.EllipticCurvePublicKey:
    """Resolve ``intel``, ``dev`` (the dev PKI root at ``dev_root_path``) or a PEM file path."""
    if spec == "intel":
        return intel_root_public_key()
    if spec == "dev":
        return load_root_pem(dev_root_path if dev_root_path is not None else _default_dev_root())
    if not spec:
        raise RootError("empty root specification (use intel, dev or a PEM path)")
    return load_root_pem(Path(spec))


def _default_dev_root() -> Path:
    return dev_root_path(DEFAULT_DATA_DIR)
