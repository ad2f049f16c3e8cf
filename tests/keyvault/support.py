"""Test helpers for the keyvault libraries: a settable clock, fake enclaves and their quotes.

A :class:`FakeEnclave` holds real X25519/Ed25519 key pairs and produces what the real
enclave would: runtime data (serialized ``EnclavePublicKeys``, pinning the test keyvault's
release key :data:`RELEASE_PUBLIC_KEY` unless told otherwise), the facts a verified quote
would give (:class:`QuoteFacts`, its report data binding that runtime data and a nonce),
signed commit heads, and HPKE opening of released keys. Tokens are issued by the real
:class:`TokenIssuer`, so only the quote verification step is faked here (it has its own
tests under ``tests/verify/``).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tests.conftest import tls_for
from veil.dev.policies import dev_enclave_policy_json
from veil.enclave import wire
from veil.enclave.providers.sim_quote import DEV_MRSIGNER, SimQuoteProvider
from veil.enclave.v1 import envelope_pb2
from veil.keyvault.v1 import keyvault_pb2_grpc
from veil.services.common.config import ServiceConfig
from veil.services.common.tls import channel_credentials
from veil.services.keyvault.config import DEFAULT_ISSUER, KekConfig, KeyvaultConfig
from veil.services.keyvault.enclave_policy import EnclavePolicy
from veil.services.keyvault.keys import ReleasedKey, open_released_key
from veil.services.keyvault.release_key import ReleaseSigner
from veil.services.keyvault.release_policy import parse_release_policy
from veil.services.keyvault.server import create_server
from veil.services.keyvault.tokens import IssuedToken, TokenIssuer
from veil.verify.binding import expected_report_data
from veil.verify.verifier import QuoteFacts

T = TypeVar("T")

POSTGRES_DSN = os.environ.get("VEIL_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
START = 1_750_000_000.0
ISSUER = "https://keyvault.veil.test"
MRENCLAVE = bytes.fromhex("11" * 32)
MRSIGNER = bytes.fromhex("22" * 32)
CALLER = "spiffe://veil/state"
SIM_MRENCLAVE = hashlib.sha256(b"veil keyvault test enclave").digest()
ADMIN = "spiffe://veil/admin"
#: The library tests' release-signing key (the real one is created by the keyvault at start).
RELEASE_KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"veil keyvault test release key").digest())
RELEASE_PUBLIC_KEY = RELEASE_KEY.public_key().public_bytes_raw()
#: The genesis and configuration hashes of the test instances' commit links.
GENESIS = hashlib.sha256(b"test genesis").digest()
CONFIG = hashlib.sha256(b"test config").digest()


def fixed_release_signer() -> ReleaseSigner:
    """A signer over :data:`RELEASE_KEY` (no store, no audit event)."""
    return ReleaseSigner(private_key=RELEASE_KEY, public_key=RELEASE_PUBLIC_KEY)


def release_signature_verifies(
    released: ReleasedKey, recipient_hpke_public_key: bytes, release_public_key: bytes
) -> bool:
    """Whether ``released`` carries a valid release signature, checked as the enclave does."""
    message = wire.wrapped_key_signing_bytes(
        released.name,
        released.version,
        recipient_hpke_public_key,
        released.encapsulated_key,
        released.wrapped_key,
    )
    try:
        Ed25519PublicKey.from_public_bytes(release_public_key).verify(released.signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class SoftHsm:
    """A SoftHSM2 token initialised for this test session (see the ``softhsm`` fixture)."""

    module: str
    token_label: str
    pin: str
    config: Path


def sim_provider(pki_dir: Path, *, debug: bool = False) -> SimQuoteProvider:
    """The enclave's sim quote provider, certified by the dev PCK chain of ``veil pki init``."""
    chain = b"".join(
        (pki_dir / name).read_bytes() for name in ("sgx-pck-leaf.pem", "sgx-pck-ca.pem", "sgx-root.pem")
    )
    return SimQuoteProvider(
        mrenclave=SIM_MRENCLAVE,
        pck_chain_pem=chain,
        pck_leaf_key_pem=(pki_dir / "sgx-pck-leaf-key.pem").read_bytes(),
        debug=debug,
    )


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeEnclave:
    """An enclave's key pairs and the evidence it would present."""

    mrenclave: bytes = MRENCLAVE
    mrsigner: bytes = MRSIGNER
    product_id: int = 1
    svn: int = 3
    debug: bool = False
    tcb_status: str | None = "UpToDate"
    hpke_key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    signing_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    keyvault_release_public_key: bytes = RELEASE_PUBLIC_KEY

    @property
    def runtime_data(self) -> bytes:
        raw = serialization.Encoding.Raw
        keys = envelope_pb2.EnclavePublicKeys(
            hpke_x25519_public_key=self.hpke_public_bytes,
            signing_public_key=self.signing_key.public_key().public_bytes(
                raw, serialization.PublicFormat.Raw
            ),
            keyvault_release_public_key=self.keyvault_release_public_key,
        )
        return keys.SerializeToString(deterministic=True)

    @property
    def hpke_public_bytes(self) -> bytes:
        return self.hpke_key.public_key().public_bytes_raw()

    @property
    def signing_public_bytes(self) -> bytes:
        return self.signing_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def quote(self, nonce: bytes, *, runtime_data: bytes | None = None) -> QuoteFacts:
        data = self.runtime_data if runtime_data is None else runtime_data
        return QuoteFacts(
            mrenclave=self.mrenclave,
            mrsigner=self.mrsigner,
            isv_prod_id=self.product_id,
            isv_svn=self.svn,
            debug=self.debug,
            report_data=expected_report_data(data, nonce),
            tcb_status=self.tcb_status,
        )

    def token(self, issuer: TokenIssuer, *, runtime_data: bytes | None = None) -> IssuedToken:
        """Attest (as the keyvault would after verifying the quote) and get a token."""
        nonce = os.urandom(32)
        data = self.runtime_data if runtime_data is None else runtime_data
        quote = self.quote(nonce, runtime_data=data)
        return issuer.issue(
            quote, runtime_data=data, nonce=nonce, quote_hash=hashlib.sha256(b"quote").digest()
        )

    def link(
        self,
        instance_id: str,
        base: tuple[int, bytes],
        head: tuple[int, bytes],
        *,
        genesis_hash: bytes = GENESIS,
        config_hash: bytes = CONFIG,
    ) -> envelope_pb2.CommitLink:
        """A commit link from `base` to `head` (sequence, hash) signed by this enclave."""
        link = envelope_pb2.CommitLink(
            instance_id=instance_id,
            genesis_hash=genesis_hash,
            config_hash=config_hash,
            base=envelope_pb2.CommitHead(sequence=base[0], hash=base[1]),
            head=envelope_pb2.CommitHead(sequence=head[0], hash=head[1]),
        )
        link.signature = self.signing_key.sign(wire.commit_link_bytes(link))
        return link

    def open(self, released: ReleasedKey) -> bytes:
        return open_released_key(released, self.hpke_key)


def run_concurrently(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(0..count-1)`` on ``count`` threads released together by a barrier."""
    barrier = threading.Barrier(count)

    def start(index: int) -> T:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(start, range(count)))


def policy_json(
    *conditions: dict[str, object],
    authority: str = ISSUER,
    mode: str = "allOf",
    accepted_tcb: Sequence[str] | None = None,
) -> str:
    """A one-authority policy document."""
    doc: dict[str, object] = {"version": "1.0.0", "anyOf": [{"authority": authority, mode: list(conditions)}]}
    if accepted_tcb is not None:
        doc["x-veil-accepted-tcb-statuses"] = list(accepted_tcb)
    return json.dumps(doc)


def measurement_policy(
    enclave: FakeEnclave | None = None,
    *,
    extra: Sequence[dict[str, object]] = (),
    accepted_tcb: Sequence[str] | None = None,
) -> str:
    """The usual policy: this MRENCLAVE and MRSIGNER, SVN at least 1 (plus ``extra``)."""
    mrenclave = (enclave.mrenclave if enclave else MRENCLAVE).hex()
    mrsigner = (enclave.mrsigner if enclave else MRSIGNER).hex()
    conditions: list[dict[str, object]] = [
        {"claim": "x-ms-sgx-mrenclave", "equals": mrenclave},
        {"claim": "x-ms-sgx-mrsigner", "equals": mrsigner},
        {"claim": "x-ms-sgx-svn", "greaterOrEquals": 1},
    ]
    return policy_json(*conditions, *extra, accepted_tcb=accepted_tcb)


def operator_policy(
    enclave: FakeEnclave | None = None, *, accepted_tcb: Sequence[str] | None = None
) -> EnclavePolicy:
    """An operator enclave policy trusting ``enclave``'s build (default: the default FakeEnclave)."""
    return EnclavePolicy(parse_release_policy(measurement_policy(enclave, accepted_tcb=accepted_tcb)))


def write_sim_enclave_policy(path: Path, *, issuer: str = DEFAULT_ISSUER) -> Path:
    """The operator enclave policy trusting the sim enclave of :func:`sim_provider`, written to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dev_enclave_policy_json(SIM_MRENCLAVE, DEV_MRSIGNER, issuer=issuer))
    return path


def dev_keyvault_config(data_dir: Path, pki_dir: Path, collateral: Path | None = None) -> KeyvaultConfig:
    """A keyvault on the dev SGX root with SQLite and a file KEK under `data_dir`, without an
    operator enclave policy (and without collateral unless given)."""
    return KeyvaultConfig(
        db=str(data_dir / "keyvault.db"),
        kek=KekConfig(provider="file", file=data_dir / "kek.bin"),
        attestation_root="dev",
        dev_root_path=pki_dir / "sgx-root.pem",
        collateral_dir=collateral,
    )


def sim_keyvault_config(data_dir: Path, pki_dir: Path, policy_dir: Path) -> KeyvaultConfig:
    """A keyvault as production runs one (the root as a PEM, so the operator enclave policy is
    required) trusting the sim enclave of this checkout, with SQLite and a file KEK."""
    return replace(
        dev_keyvault_config(data_dir, pki_dir),
        attestation_root=str(pki_dir / "sgx-root.pem"),
        enclave_policy_file=write_sim_enclave_policy(policy_dir / "enclave-policy.json"),
    )


Stubs = Callable[[str], keyvault_pb2_grpc.KeyvaultServiceStub]
"""Stubs to a served keyvault, each called as the given identity (see the ``stub`` fixture)."""


@contextmanager
def keyvault_stub(
    service: ServiceConfig, config: KeyvaultConfig, pki_dir: Path, identity: str
) -> Iterator[keyvault_pb2_grpc.KeyvaultServiceStub]:
    """A started keyvault server for `config`, called as `identity` (mTLS); stopped after."""
    server, port = create_server(service, keyvault_config=config)
    server.start()
    try:
        credentials = channel_credentials(tls_for(pki_dir, identity))
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            yield keyvault_pb2_grpc.KeyvaultServiceStub(channel)
    finally:
        server.stop(0)
