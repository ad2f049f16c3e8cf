"""Dev PKI: a CA, one mTLS certificate per service, an admin CA and the admin's certificate, the
sim SGX PCK chain and its collateral.

`veil pki init` writes these under DATA_DIR/pki/ (directory 0700, private keys 0600, modes
set on the open file so `--force` narrows an older, wider file) and the CAs' private keys apart,
in DATA_DIR/pki-ca/ (0700): the services' pki directory holds nothing that can issue an
identity. The admin's certificate comes from its own CA (`admin-ca.pem`), which the services
accept `spiffe://veil/admin` from and nothing else (VEIL_<SERVICE>_ADMIN_CA), so the CA that
issues service identities (cert-manager's, in a cluster) cannot make an admin. Files are opened
without following symlinks. On Kubernetes cert-manager issues the same service identities; the
sim PCK chain exists only for the simulated quote provider and is never accepted by a
production policy.

The sim platform's collateral (`collateral/<fmspc>.json`, what `VEIL_KEYVAULT_COLLATERAL_DIR`
names) is TCB info v3 and Intel's QE3 identity v2 signed by a dev "SGX TCB Signing" certificate
under the dev SGX root, with the root CA and PCK CRLs, all valid as long as the root (ten
years). Its one TCB level is the sim PCK certificate's and its QE level the sim quoting
enclave's, both UpToDate, so the sim mesh's tokens carry an evaluated TCB status. This module
is dev tooling: it builds the collateral with the attestation library's `dev_collateral`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from veil.dev import collateral as dev_collateral
from veil.services.common.config import TlsFiles
from veil.services.common.identity import ADMIN, SERVICE_IDENTITIES

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
SIM_FMSPC = bytes.fromhex("00906ED50000")
SIM_PCEID = bytes.fromhex("0000")
SIM_PCESVN = 13
SIM_CPUSVN = bytes(range(16))
SIM_COMPONENT_SVNS = (2, 2, 2, 2, 255, 255, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0)
#: The sim quoting enclave's ISVSVN (`SimQuoteProvider`'s default `qe_svn`).
SIM_QE_ISV_SVN = 8
COLLATERAL_DIR = "collateral"
#: The admin CA's certificate in the pki directory (what VEIL_<SERVICE>_ADMIN_CA defaults to).
ADMIN_CA_FILE = "admin-ca.pem"

_SERVICE_DNS = ("localhost",)
_VALIDITY = dt.timedelta(days=3650)
_LEAF_VALIDITY = dt.timedelta(days=825)


class PkiExistsError(FileExistsError):
    """The PKI directory is already initialised and overwriting was not asked for."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Veil"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    subject: str,
    issuer: Issued | None,
    *,
    ca: bool,
    now: dt.datetime,
    lifetime: dt.timedelta,
    san: x509.SubjectAlternativeName | None = None,
    usages: Iterable[x509.ObjectIdentifier] = (),
    extra: Iterable[x509.UnrecognizedExtension] = (),
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = issuer.cert.subject if issuer else _name(subject)
    signing_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    usages = list(usages)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return Issued(builder.sign(signing_key, hashes.SHA256()), key)


def service_certificate(ca: Issued, spiffe_id: str, now: dt.datetime, dns: Iterable[str] = ()) -> Issued:
    """An mTLS leaf for a SPIFFE identity, usable as server and client."""
    san = x509.SubjectAlternativeName(
        [
            x509.UniformResourceIdentifier(spiffe_id),
            *(x509.DNSName(name) for name in dns),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    )
    return _issue(
        spiffe_id.rsplit("/", 1)[-1],
        ca,
        ca=False,
        now=now,
        lifetime=_LEAF_VALIDITY,
        san=san,
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    )


# Minimal DER for the SGX PCK extension (Intel PCK certificate profile, OID 1.2.840.113741.1.13.1);
# the verifier's tests forge malformed extensions from the same writer (tests/verify/fakes.py).
def der(tag: int, body: bytes) -> bytes:
    """One DER element: tag, definite minimal length, body."""
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def der_oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for part in parts[2:]:
        rest = part >> 7
        chunk = [part & 0x7F]
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        body += bytes(reversed(chunk))
    return der(0x06, body)


def der_int(value: int, tag: int = 0x02) -> bytes:
    """An INTEGER (or, by `tag`, an ENUMERATED) in two's complement, with room for the sign bit."""
    return der(tag, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def der_octets(value: bytes) -> bytes:
    return der(0x04, value)


def der_seq(*items: bytes) -> bytes:
    return der(0x30, b"".join(items))


def _entry(suffix: str, value: bytes) -> bytes:
    return der_seq(der_oid(f"{SGX_EXTENSION_OID.dotted_string}.{suffix}"), value)


def sgx_pck_extension(
    *,
    fmspc: bytes = SIM_FMSPC,
    pceid: bytes = SIM_PCEID,
    pcesvn: int = SIM_PCESVN,
    cpusvn: bytes = SIM_CPUSVN,
    component_svns: tuple[int, ...] = SIM_COMPONENT_SVNS,
    ppid: bytes = bytes(16),
) -> x509.UnrecognizedExtension:
    """The SGX extension a PCK leaf carries: PPID, TCB (16 component SVNs, PCESVN, CPUSVN), PCEID, FMSPC."""
    tcb = [_entry(f"2.{i + 1}", der_int(svn)) for i, svn in enumerate(component_svns)]
    tcb += [_entry("2.17", der_int(pcesvn)), _entry("2.18", der_octets(cpusvn))]
    body = der_seq(
        _entry("1", der_octets(ppid)),
        _entry("2", der_seq(*tcb)),
        _entry("3", der_octets(pceid)),
        _entry("4", der_octets(fmspc)),
        _entry("5", der_int(0, tag=0x0A)),
    )
    return x509.UnrecognizedExtension(SGX_EXTENSION_OID, body)


@dataclass(frozen=True)
class SimPckChain:
    """The simulated SGX provisioning chain: root → PCK CA → PCK leaf (with its key), and
    root → TCB Signing, which signs the sim platform's collateral."""

    root: Issued
    ca: Issued
    leaf: Issued
    tcb_signer: Issued


def sim_pck_chain(now: dt.datetime | None = None) -> SimPckChain:
    """A fresh dev SGX root, PCK processor CA, PCK leaf carrying the SGX extension, and TCB signer."""
    now = now or dt.datetime.now(dt.UTC)
    root = _issue("Veil Dev SGX Root CA", None, ca=True, now=now, lifetime=_VALIDITY)
    ca = _issue("Veil Dev SGX PCK Processor CA", root, ca=True, now=now, lifetime=_VALIDITY)
    leaf = _issue(
        "Veil Dev SGX PCK Certificate", ca, ca=False, now=now, lifetime=_VALIDITY, extra=[sgx_pck_extension()]
    )
    tcb_signer = _issue("Veil Dev SGX TCB Signing", root, ca=False, now=now, lifetime=_VALIDITY)
    return SimPckChain(root, ca, leaf, tcb_signer)


def collateral_dir(pki_dir: Path) -> Path:
    """Where the dev PKI keeps collateral, one `<fmspc>.json` per platform."""
    return pki_dir / COLLATERAL_DIR


def sim_collateral(chain: SimPckChain, now: dt.datetime) -> dict[str, str]:
    """The sim platform's collateral (dcap-qvl JSON layout), fresh from `now` for the root's lifetime."""
    # Issued with the certificates (5 minutes back, for clock skew); next update when the root expires.
    issued = now - dt.timedelta(minutes=5)
    next_update = now + _VALIDITY
    tcb_date = dev_collateral.iso(issued)
    tcb_info = dev_collateral.tcb_info_json(
        levels=[
            dev_collateral.tcb_level(
                "UpToDate", components=SIM_COMPONENT_SVNS, pce_svn=SIM_PCESVN, tcb_date=tcb_date
            )
        ],
        fmspc=SIM_FMSPC,
        pce_id=SIM_PCEID,
        issued=issued,
        next_update=next_update,
    )
    qe_identity = dev_collateral.qe_identity_json(
        levels=[dev_collateral.qe_level(SIM_QE_ISV_SVN, "UpToDate", tcb_date=tcb_date)],
        issued=issued,
        next_update=next_update,
    )
    return dev_collateral.collateral_json(
        root=chain.root.cert,
        pck_ca=chain.ca.cert,
        signer=chain.tcb_signer.cert,
        signer_key=chain.tcb_signer.key,
        tcb_info=tcb_info,
        qe_identity=qe_identity,
        root_crl=dev_collateral.make_crl(
            chain.root.cert, chain.root.key, last_update=issued, next_update=next_update
        ),
        pck_crl=dev_collateral.make_crl(
            chain.ca.cert, chain.ca.key, last_update=issued, next_update=next_update
        ),
    )


def sim_collateral_path(pki_dir: Path) -> Path:
    """The sim platform's collateral file: `collateral/<sim fmspc>.json`."""
    return collateral_dir(pki_dir) / f"{SIM_FMSPC.hex()}.json"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


_DIR_MODE = 0o700
_SECRET_MODE = 0o600
_PUBLIC_MODE = 0o644


def ca_key_dir(pki_dir: Path) -> Path:
    """Where the dev CA's private key lives: beside the pki directory, not in it."""
    return pki_dir.with_name(pki_dir.name + "-ca")


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
    directory.chmod(_DIR_MODE)  # an existing directory keeps its mode through mkdir


def _write(path: Path, data: bytes, secret: bool = False) -> None:
    mode = _SECRET_MODE if secret else _PUBLIC_MODE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        # O_CREAT's mode applies only to a new file: a rewritten one keeps its old (wider) mode.
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def init_pki(directory: Path, *, force: bool = False, now: dt.datetime | None = None) -> list[Path]:
    """Write the dev PKI into `directory`; refuses to overwrite an existing one unless `force`."""
    marker = directory / "ca.pem"
    if marker.exists() and not force:
        raise PkiExistsError(f"{directory} already holds a PKI; pass --force to replace it")
    now = now or dt.datetime.now(dt.UTC)
    files: dict[Path, tuple[bytes, bool]] = {}
    ca = _issue("Veil Dev CA", None, ca=True, now=now, lifetime=_VALIDITY)
    files[directory / "ca.pem"] = (_pem(ca.cert), False)
    files[ca_key_dir(directory) / "ca-key.pem"] = (_key_pem(ca.key), True)
    for service, spiffe_id in SERVICE_IDENTITIES.items():
        leaf = service_certificate(ca, spiffe_id, now, dns=(*_SERVICE_DNS, service))
        files[directory / f"{service}.pem"] = (_pem(leaf.cert) + _pem(ca.cert), False)
        files[directory / f"{service}-key.pem"] = (_key_pem(leaf.key), True)
    files |= _admin_files(directory, now)
    written = _write_all(directory, {**files, **_sim_sgx_files(directory, now)})
    (directory / "ca-key.pem").unlink(missing_ok=True)  # where an older init left the CA key
    return written


def _admin_files(directory: Path, now: dt.datetime) -> dict[Path, tuple[bytes, bool]]:
    """The admin CA (its key beside the service CA's) and the admin certificate it issues."""
    admin_ca = _issue("Veil Dev Admin CA", None, ca=True, now=now, lifetime=_VALIDITY)
    admin = service_certificate(admin_ca, ADMIN, now)
    return {
        directory / ADMIN_CA_FILE: (_pem(admin_ca.cert), False),
        ca_key_dir(directory) / "admin-ca-key.pem": (_key_pem(admin_ca.key), True),
        directory / "admin.pem": (_pem(admin.cert), False),
        directory / "admin-key.pem": (_key_pem(admin.key), True),
    }


def admin_tls(directory: Path) -> TlsFiles:
    """The admin's mTLS files in the dev PKI at `directory`: what the dev tools call the mesh with."""
    return TlsFiles(cert=directory / "admin.pem", key=directory / "admin-key.pem", ca=directory / "ca.pem")


def ensure_admin_ca(directory: Path, *, now: dt.datetime | None = None) -> list[Path]:
    """Give a dev PKI written before the admin CA one, and an admin certificate from it.

    Nothing happens when `admin-ca.pem` is there; otherwise the old admin certificate (from the
    service CA, which services no longer accept as admin) is replaced.
    """
    if (directory / ADMIN_CA_FILE).exists() or not (directory / "ca.pem").exists():
        return []
    return _write_all(directory, _admin_files(directory, now or dt.datetime.now(dt.UTC)))


def ensure_sim_collateral(directory: Path, *, now: dt.datetime | None = None) -> list[Path]:
    """Give a dev PKI written before dev collateral existed a sim SGX chain with collateral.

    Nothing happens when the sim platform's collateral is there. Otherwise the sim SGX root,
    PCK chain and collateral are replaced together (their keys were not kept, so collateral
    cannot be signed for the old chain); the mTLS CA and certificates are left alone.
    """
    if sim_collateral_path(directory).exists():
        return []
    return _write_all(directory, _sim_sgx_files(directory, now or dt.datetime.now(dt.UTC)))


def _sim_sgx_files(directory: Path, now: dt.datetime) -> dict[Path, tuple[bytes, bool]]:
    chain = sim_pck_chain(now)
    collateral = json.dumps(sim_collateral(chain, now), indent=2) + "\n"
    return {
        directory / "sgx-root.pem": (_pem(chain.root.cert), False),
        directory / "sgx-pck-ca.pem": (_pem(chain.ca.cert), False),
        directory / "sgx-pck-leaf.pem": (_pem(chain.leaf.cert), False),
        directory / "sgx-pck-leaf-key.pem": (_key_pem(chain.leaf.key), True),
        sim_collateral_path(directory): (collateral.encode(), False),
    }


def _write_all(directory: Path, files: dict[Path, tuple[bytes, bool]]) -> list[Path]:
    for folder in sorted({path.parent for path in files} | {directory}):
        _private_dir(folder)
    for path, (data, secret) in files.items():
        _write(path, data, secret)
    return list(files)
