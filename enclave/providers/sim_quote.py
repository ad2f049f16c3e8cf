"""The `sim` quote provider: real Intel SGX DCAP ECDSA quote v3 bytes, signed by a dev PCK chain.

Layout (little-endian integers; Intel `sgx_quote_3.h`), built exactly as a quoting enclave would:

    header (48)           version 3, att key type 2 (ECDSA P-256), tee type 0, QE SVN, PCE SVN,
                          Intel QE vendor id, user data (platform id || 4 zero bytes)
    ISV report body (384) this enclave: MRENCLAVE, MRSIGNER, ISVPRODID, ISVSVN, attributes,
                          report data
    signature data length (4)
    signature data        ISV signature (ECDSA-P256-SHA256 over header || body, raw r || s) by a
                          per-runner attestation key; that key (raw X || Y); the QE report body
                          whose report_data[0:32] = SHA-256(attestation key || QE auth data); the
                          QE report signature by the PCK leaf key; QE auth data (2-byte size);
                          certification data type 5 (PEM chain leaf || CA || root, 4-byte size)

Only the trust anchor differs from hardware: the PCK chain ends at the dev root written by
`veil pki init`, which no production policy accepts.
"""

from __future__ import annotations

import hashlib
import secrets
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from veil.enclave.wire import REPORT_DATA_SIZE

QE_VENDOR_ID_INTEL = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
#: MRSIGNER of Intel's quoting enclave, as in Intel's QE identity collateral. A copy of
#: veil.verify.verifier.INTEL_QE_MRSIGNER, which checks every quote's QE against it (the enclave
#: imports no verifier): tests/verify/test_qe_identity.py asserts the two are equal.
INTEL_QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
SIM_QE_MRENCLAVE = hashlib.sha256(b"veil sim quoting enclave").digest()
CERT_DATA_PCK_CHAIN = 5

ATTR_INIT, ATTR_DEBUG, ATTR_MODE64BIT, ATTR_PROVISIONKEY = 0x01, 0x02, 0x04, 0x10
XFRM_LEGACY = 0x03  # x87 and SSE state

#: The fixed dev enclave signer: an Ed25519 key derived from a public seed (anyone can sign as
#: it, which is the point of a dev signer). MRSIGNER = SHA-256 of its raw public key.
DEV_SIGNER_PUBLIC_KEY = (
    ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"veil dev enclave signer v1").digest())
    .public_key()
    .public_bytes_raw()
)
DEV_MRSIGNER = hashlib.sha256(DEV_SIGNER_PUBLIC_KEY).digest()


def report_body(
    *,
    cpu_svn: bytes,
    attributes: bytes,
    mrenclave: bytes,
    mrsigner: bytes,
    isv_prod_id: int,
    isv_svn: int,
    report_data: bytes,
    misc_select: int = 0,
) -> bytes:
    """An `sgx_report_body_t` (384 bytes); reserved, config and family fields are zero."""
    if len(cpu_svn) != 16 or len(attributes) != 16 or len(mrenclave) != 32 or len(mrsigner) != 32:
        raise ValueError("bad report body field size")
    if len(report_data) != REPORT_DATA_SIZE:
        raise ValueError("report data must be 64 bytes")
    body = (
        cpu_svn  # 0
        + struct.pack("<I", misc_select)  # 16
        + bytes(12)  # 20 reserved
        + bytes(16)  # 32 isv_ext_prod_id
        + attributes  # 48
        + mrenclave  # 64
        + bytes(32)  # 96 reserved
        + mrsigner  # 128
        + bytes(32)  # 160 reserved
        + bytes(64)  # 192 config_id
        + struct.pack("<HHH", isv_prod_id, isv_svn, 0)  # 256 isv_prod_id, isv_svn, config_svn
        + bytes(42)  # 262 reserved
        + bytes(16)  # 304 isv_family_id
        + report_data  # 320
    )
    return body


def attributes(flags: int, xfrm: int = XFRM_LEGACY) -> bytes:
    """The 16-byte ATTRIBUTES field: flags (8, LE) || xfrm (8, LE)."""
    return struct.pack("<QQ", flags, xfrm)


def _raw_signature(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]  # X || Y without the 0x04 prefix


class SimQuoteProvider:
    """Quotes for a simulated enclave, certified by a dev PCK chain."""

    def __init__(
        self,
        *,
        mrenclave: bytes,
        pck_chain_pem: bytes,
        pck_leaf_key_pem: bytes,
        mrsigner: bytes = DEV_MRSIGNER,
        isv_prod_id: int = 1,
        isv_svn: int = 1,
        debug: bool = False,
        cpu_svn: bytes = bytes(16),
        qe_svn: int = 8,
        pce_svn: int = 13,
    ) -> None:
        pck_key = serialization.load_pem_private_key(pck_leaf_key_pem, password=None)
        if not isinstance(pck_key, ec.EllipticCurvePrivateKey) or not isinstance(pck_key.curve, ec.SECP256R1):
            raise ValueError("the PCK leaf key must be an ECDSA P-256 private key")
        self._pck_key = pck_key
        self._chain = pck_chain_pem
        self._attestation_key = ec.generate_private_key(ec.SECP256R1())  # per runner, like a QE's
        self._mrenclave = mrenclave
        self._mrsigner = mrsigner
        self._isv_prod_id = isv_prod_id
        self._isv_svn = isv_svn
        self._flags = ATTR_INIT | ATTR_MODE64BIT | (ATTR_DEBUG if debug else 0)
        self._cpu_svn = cpu_svn
        self._qe_svn = qe_svn
        self._pce_svn = pce_svn

    def quote(self, report_data: bytes) -> bytes:
        """A DCAP quote v3 of this enclave over `report_data` (64 bytes)."""
        platform_id = hashlib.sha256(self._chain).digest()[:16]
        header = (
            struct.pack("<HHIHH", 3, 2, 0, self._qe_svn, self._pce_svn)
            + QE_VENDOR_ID_INTEL
            + platform_id
            + bytes(4)
        )
        body = report_body(
            cpu_svn=self._cpu_svn,
            attributes=attributes(self._flags),
            mrenclave=self._mrenclave,
            mrsigner=self._mrsigner,
            isv_prod_id=self._isv_prod_id,
            isv_svn=self._isv_svn,
            report_data=report_data,
        )
        attestation_key = _raw_public_key(self._attestation_key)
        qe_auth_data = secrets.token_bytes(32)
        qe_report = report_body(
            cpu_svn=self._cpu_svn,
            attributes=attributes(ATTR_INIT | ATTR_MODE64BIT | ATTR_PROVISIONKEY, 0xE7),
            mrenclave=SIM_QE_MRENCLAVE,
            mrsigner=INTEL_QE_MRSIGNER,
            isv_prod_id=1,
            isv_svn=self._qe_svn,
            report_data=hashlib.sha256(attestation_key + qe_auth_data).digest() + bytes(32),
        )
        signature_data = (
            _raw_signature(self._attestation_key, header + body)
            + attestation_key
            + qe_report
            + _raw_signature(self._pck_key, qe_report)
            + struct.pack("<H", len(qe_auth_data))
            + qe_auth_data
            + struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(self._chain))
            + self._chain
        )
        return header + body + struct.pack("<I", len(signature_data)) + signature_data
