"""Generate the client conformance vectors (testdata/conformance/) from the real code.

    python -m veil.dev.conformance [--out testdata/conformance]

A real sim enclave (the enclave package, its DCAP v3 quote over a fresh dev PCK chain, pinned to
a keyvault release key derived from a fixed seed) is initialized, attested with a token from
the keyvault's own TokenIssuer, given an instance through the keyvault's head statements, and
runs sealed commands the SDK's `seal_command` built. Each vector is that real evidence, as a
client receives it, or a copy tampered the way a hostile gateway or host would, with the verdict
a client must reach. Every refusal names an id of the "What a client must refuse" checklist in
docs/protocol.md (tests/conformance/ fail when one is missing there).

Deterministic where the primitives allow: fixed times, nonces, identities, request ids and
response keys, Ed25519 signatures (deterministic by design) and every byte string the client
computes. Not reproducible byte for byte: ECDSA signatures, the enclave's fresh keys per boot
and HPKE's ephemeral keys, so a regeneration changes those bytes (and nothing else that matters).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import secrets
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, mlkem, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from veil.dev.pki import init_pki
from veil.enclave import commands, crypto, wire
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.runner import PCK_KEY_FILE, RunnerOptions, build_enclave
from veil.enclave.v1 import apps_pb2, command_pb2, ecall_pb2, envelope_pb2
from veil.sdk.identity import SigningIdentity
from veil.sdk.sealing import MLKEM768X25519_SUITE, X25519_SUITE, SealedRequest, seal_command
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.kek import FileKek
from veil.services.keyvault.store_sqlite import SqliteStore
from veil.services.keyvault.tokens import SigningKeyRing, TokenIssuer
from veil.services.state.enclave_host import EnclaveHost
from veil.verify.quote import parse_quote
from veil.verify.roots import load_root_pem
from veil.verify.tokens import b64url_encode, public_jwk
from veil.verify.verifier import VerifiedQuote, verify_quote

DEFAULT_OUT = Path("testdata/conformance")
FORMAT = "veil-conformance/v1"
#: When the dev PKI is issued, and when every vector is checked (unless it says otherwise).
PKI_TIME = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NOW = int(dt.datetime(2026, 6, 1, tzinfo=dt.UTC).timestamp())
TOKEN_TTL_S = 600
ISSUER = "https://keyvault.conformance.veil.dev"
INSTANCE = "coins"
OTHER_INSTANCE = "payroll"
DEV_ROOT_FILE = "dev-root.pem"
OTHER_ROOT_FILE = "other-root.pem"
ALL_STATUSES = ["UpToDate", "SWHardeningNeeded", "Unevaluated"]

_HEADER, _BODY = 48, 384
_QE_REPORT = _HEADER + _BODY + 4 + 64 + 64  # offset of the QE report body in the quote


def _seed(label: str, size: int = 32) -> bytes:
    return hashlib.sha256(b"veil conformance " + label.encode()).digest()[:size]


RELEASE_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(_seed("keyvault release key"))
RELEASE_PUBLIC = RELEASE_KEY.public_key().public_bytes_raw()
ALICE = SigningIdentity(ed25519.Ed25519PrivateKey.from_private_bytes(_seed("alice")), "alice")
BOB = SigningIdentity(ed25519.Ed25519PrivateKey.from_private_bytes(_seed("bob")), "bob")


def _hex(data: bytes) -> str:
    return bytes(data).hex()


# --- the world: a real sim enclave, its keyvault, an instance -------------------------------------


@dataclass
class Evidence:
    """One enclave's attestation, as the gateway would serve it (fields of GetAttestationResponse)."""

    quote: bytes
    runtime_data: bytes
    nonce: bytes
    token: str
    keys: envelope_pb2.EnclavePublicKeys
    jwks: dict[str, Any]
    descriptor: envelope_pb2.InstanceDescriptor | None
    verified: VerifiedQuote
    claims: dict[str, Any]


class World:
    """The enclave(s), the token authority and the keys the vectors are built from."""

    def __init__(self, directory: Path) -> None:
        self.pki = directory / "pki"
        init_pki(self.pki, now=PKI_TIME)
        self.other_pki = directory / "other-pki"
        init_pki(self.other_pki, now=PKI_TIME)
        self.root_pem = (self.pki / "sgx-root.pem").read_bytes()
        self.other_root_pem = (self.other_pki / "sgx-root.pem").read_bytes()
        store = SqliteStore(directory / "keyvault.db")
        clock: Callable[[], float] = lambda: float(NOW - 60)  # noqa: E731
        self.ring = SigningKeyRing(store, FileKek(directory / "kek.key"), clock, AuditLog(store, clock))
        self.issuer = TokenIssuer(self.ring, issuer=ISSUER, clock=clock, token_ttl_s=TOKEN_TTL_S)
        self.host = self._enclave(directory / "cpu", debug=False)
        self.keys = self.host.initialize(keyvault_release_public_key=RELEASE_PUBLIC).keys
        self.debug_host = self._enclave(directory / "cpu-debug", debug=True)
        self.debug_keys = self.debug_host.initialize(keyvault_release_public_key=RELEASE_PUBLIC).keys
        #: What the keyvault holds per instance: genesis hash, config hash and head.
        self.registered: dict[str, tuple[bytes, bytes, envelope_pb2.CommitHead]] = {}
        self.descriptor = self._create_instance(INSTANCE)
        self._create_instance(OTHER_INSTANCE)

    def _enclave(self, secret: Path, *, debug: bool) -> EnclaveHost:
        options = RunnerOptions(
            quote_provider="sim", seal_provider="sim", pck_dir=self.pki, platform_secret=secret, debug=debug
        )
        return EnclaveHost.from_dispatcher(Dispatcher(build_enclave(options)))

    def jwks(self) -> dict[str, Any]:
        document: dict[str, Any] = self.ring.jwks()
        return document

    def evidence(self, host: EnclaveHost, keys: envelope_pb2.EnclavePublicKeys, label: str) -> Evidence:
        nonce = _seed(f"nonce {label}")
        quoted = host.get_quote(nonce)
        verified = verify_quote(
            quoted.quote,
            root_public_key=load_root_pem(self.pki / "sgx-root.pem"),
            now=dt.datetime.fromtimestamp(NOW, dt.UTC),
        )
        token = self.issuer.issue(
            verified,
            runtime_data=quoted.runtime_data,
            nonce=nonce,
            quote_hash=hashlib.sha256(quoted.quote).digest(),
        )
        return Evidence(
            quote=quoted.quote,
            runtime_data=quoted.runtime_data,
            nonce=nonce,
            token=token.token,
            keys=keys,
            jwks=self.jwks(),
            descriptor=self.descriptor if host is self.host else None,
            verified=verified,
            claims=dict(token.claims),
        )

    def sign_claims(self, claims: dict[str, Any]) -> str:
        """A token by the keyvault's genuine current key over any claims (a claims-level forgery)."""
        kid, private_key = self.ring.current()
        return jwt.encode(claims, private_key, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})

    # --- the instance, through the keyvault's protocol --------------------------------------------

    def _statement(
        self, instance_id: str, challenge: bytes, *, head: envelope_pb2.CommitHead | None = None
    ) -> envelope_pb2.HeadStatement:
        genesis, config_hash, _ = self.registered.get(instance_id, (b"", b"", None))
        statement = envelope_pb2.HeadStatement(
            instance_id=instance_id,
            challenge=challenge,
            enclave_signing_public_key=self.keys.signing_public_key,
            head=head or envelope_pb2.CommitHead(),
            genesis_hash=genesis if head is not None else b"",
            config_hash=config_hash if head is not None else b"",
            not_after_unix_ms=NOW * 1000 + 60_000,
        )
        statement.signature = RELEASE_KEY.sign(wire.head_statement_bytes(statement))
        return statement

    def _confirm(self, link: envelope_pb2.CommitLink) -> ecall_pb2.ConfirmHeadResponse:
        """Play the keyvault: take the enclave's link and confirm the head to this boot."""
        if not wire.verify_commit_link(link, self.keys.signing_public_key):
            raise RuntimeError("the enclave's commit link does not verify")
        instance_id = link.instance_id
        self.registered[instance_id] = (bytes(link.genesis_hash), bytes(link.config_hash), link.head)
        message = wire.head_confirmation_bytes(
            instance_id, link.head.sequence, link.head.hash, self.keys.signing_public_key
        )
        confirmation = envelope_pb2.HeadConfirmation(
            instance_id=instance_id,
            head=link.head,
            signature=RELEASE_KEY.sign(message),
            enclave_signing_public_key=self.keys.signing_public_key,
        )
        return self.host.confirm_head(confirmation)

    def _read_fence(self, instance_id: str) -> ecall_pb2.ConfirmHeadResponse:
        challenge = self.host.issue_challenge(instance_id, reads=True)
        head = self.registered[instance_id][2]
        return self.host.confirm_head(statement=self._statement(instance_id, challenge, head=head))

    def _create_instance(self, instance_id: str) -> envelope_pb2.InstanceDescriptor:
        key_name = wire.instance_key_name(instance_id)
        suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
        recipient = x25519.X25519PublicKey.from_public_bytes(self.keys.hpke_x25519_public_key)
        key = _seed(f"data key {instance_id}")
        sealed = suite.encrypt(key, recipient, info=wire.key_release_info(key_name, 1))
        wrapped = envelope_pb2.WrappedKey(
            suite=X25519_SUITE, encapsulated_key=sealed[:32], ciphertext=sealed[32:]
        )
        wrapped.signature = RELEASE_KEY.sign(
            wire.wrapped_key_signing_bytes(
                key_name, 1, self.keys.hpke_x25519_public_key, wrapped.encapsulated_key, wrapped.ciphertext
            )
        )
        self.host.provision_key(instance_id, 1, wrapped)
        config = envelope_pb2.InstanceConfig(
            app=envelope_pb2.APP_KIND_TOKEN,
            auth_scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
            token_issuer_public_key=ALICE.public_key,
        )
        statement = self._statement(instance_id, self.host.issue_challenge(instance_id))
        created = self.host.create_instance(instance_id, config, statement, NOW * 1000)
        confirmed = self._confirm(created.link)
        if not confirmed.HasField("descriptor"):
            raise RuntimeError("the enclave gave out no descriptor after its registration")
        return confirmed.descriptor

    def execute(self, sealed: SealedRequest) -> envelope_pb2.CommandOutcome:
        """One command in its own batch, its answer released as the honest host does."""
        instance_id = sealed.instance_id
        response = self.host.execute_batch(instance_id, [sealed.command], NOW * 1000)
        released: dict[tuple[str, int], bytes] = {}
        if response.HasField("link"):
            for hold in self._confirm(response.link).released:
                released[("held", hold.held_until)] = hold.key
        if response.read_round:
            for hold in self._read_fence(instance_id).released:
                released[("read", hold.read_round)] = hold.key
        (outcome,) = response.outcomes
        return self._unwrap(instance_id, outcome, response.held_until, response.read_round, released)

    def query(self, sealed: SealedRequest) -> envelope_pb2.CommandOutcome:
        instance_id = sealed.instance_id
        response = self.host.query(instance_id, sealed.command, NOW * 1000)
        released = {}
        if response.read_round:
            for hold in self._read_fence(instance_id).released:
                released[("read", hold.read_round)] = hold.key
        return self._unwrap(instance_id, response.outcome, 0, response.read_round, released)

    @staticmethod
    def _unwrap(
        instance_id: str,
        outcome: envelope_pb2.CommandOutcome,
        held_until: int,
        read_round: int,
        released: dict[tuple[str, int], bytes],
    ) -> envelope_pb2.CommandOutcome:
        if held_until and outcome.sealed_response:
            aad = wire.held_response_aad(instance_id, held_until)
            outcome.sealed_response = commands.open_held(
                released[("held", held_until)], outcome.sealed_response, aad
            )
        elif read_round and outcome.sealed_response:
            aad = wire.held_read_aad(instance_id, read_round)
            outcome.sealed_response = commands.open_held(
                released[("read", read_round)], outcome.sealed_response, aad
            )
        return outcome


# --- attestation vectors --------------------------------------------------------------------------


def _bundle_json(evidence: Evidence) -> dict[str, Any]:
    keys = evidence.keys
    bundle: dict[str, Any] = {
        "quote": _hex(evidence.quote),
        "runtime_data": _hex(evidence.runtime_data),
        "nonce": _hex(evidence.nonce),
        "attestation_token": evidence.token,
        "keys": {
            "hpke_x25519_public_key": _hex(keys.hpke_x25519_public_key),
            "hpke_mlkem768x25519_public_key": _hex(keys.hpke_mlkem768x25519_public_key),
            "signing_public_key": _hex(keys.signing_public_key),
            "keyvault_release_public_key": _hex(keys.keyvault_release_public_key),
        },
        "jwks_json": json.dumps(evidence.jwks, separators=(",", ":")),
        "descriptor": None,
    }
    if evidence.descriptor is not None:
        bundle["descriptor"] = {
            "instance_id": evidence.descriptor.instance_id,
            "config": _hex(evidence.descriptor.config),
            "genesis_hash": _hex(evidence.descriptor.genesis_hash),
            "signature": _hex(evidence.descriptor.signature),
        }
    return bundle


def _policy(world: World, evidence: Evidence, **changes: Any) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "mrenclave": [_hex(evidence.verified.mrenclave)],
        "mrsigner": _hex(evidence.verified.mrsigner),
        "product_id": evidence.verified.isv_prod_id,
        "min_svn": evidence.verified.isv_svn,
        "allow_debug": False,
        "accepted_tcb_statuses": ALL_STATUSES,
        "root": "dev",
        "issuer": ISSUER,
        "jwks": world.jwks(),
        "keyvault_release_key": _hex(RELEASE_PUBLIC),
    }
    policy.update(changes)
    return policy


def _flip(data: str, offset: int) -> str:
    raw = bytearray(bytes.fromhex(data))
    raw[offset] ^= 0x01
    return raw.hex()


def _raw_signature(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _resigned_qe_report(world: World, quote: bytes, change: Callable[[bytearray], None]) -> bytes:
    """The quote with its QE report changed and signed again by the (dev) PCK key: a QE that is
    certified by the platform but is not Intel's Quoting Enclave."""
    raw = bytearray(quote)
    report = bytearray(raw[_QE_REPORT : _QE_REPORT + _BODY])
    change(report)
    pck_key = serialization.load_pem_private_key((world.pki / PCK_KEY_FILE).read_bytes(), password=None)
    if not isinstance(pck_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the dev PCK key is not an EC key")
    raw[_QE_REPORT : _QE_REPORT + _BODY] = report
    signature = _raw_signature(pck_key.sign(bytes(report), ec.ECDSA(hashes.SHA256())))
    raw[_QE_REPORT + _BODY : _QE_REPORT + _BODY + 64] = signature
    parse_quote(bytes(raw))  # still well formed
    return bytes(raw)


def _forged_token(claims: dict[str, Any], *, kid: str | None = None) -> tuple[str, dict[str, Any]]:
    """Claims signed by a key the gateway made up, and the JWKS it would serve with them."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = public_jwk(key.public_key())
    if kid is not None:
        jwk["kid"] = kid
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": jwk["kid"], "typ": "JWT"})
    return token, {"keys": [jwk]}


def _unsigned_token(claims: dict[str, Any], alg: str) -> str:
    header = b64url_encode(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    payload = b64url_encode(json.dumps(claims).encode())
    return f"{header}.{payload}."


def attestation_vectors(world: World) -> list[dict[str, Any]]:  # noqa: PLR0915  # one vector a statement
    genuine = world.evidence(world.host, world.keys, "genuine")
    debug = world.evidence(world.debug_host, world.debug_keys, "debug")
    base = _bundle_json(genuine)
    pinned = _policy(world, genuine)
    vectors: list[dict[str, Any]] = []

    def add(
        name: str,
        description: str,
        refusal: str | None,
        *,
        bundle: dict[str, Any] | None = None,
        policy: dict[str, Any] | None = None,
        root: str = DEV_ROOT_FILE,
        now: int = NOW,
        instance_id: str = INSTANCE,
    ) -> None:
        vectors.append({
            "id": name,
            "description": description,
            "bundle": bundle if bundle is not None else copy.deepcopy(base),
            "policy": policy if policy is not None else copy.deepcopy(pinned),
            "root": root,
            "now": now,
            "instance_id": instance_id,
            "expect": {"verdict": "valid"} if refusal is None else {"verdict": "refused", "refusal": refusal},
        })  # fmt: skip

    def bundle_with(**changes: Any) -> dict[str, Any]:
        bundle = copy.deepcopy(base)
        bundle.update(changes)
        return bundle

    add("valid", "genuine bundle, pinned JWKS and issuer, the instance's descriptor", None)
    add("valid-default-shard", "genuine bundle, no instance named (the default shard)", None, instance_id="")
    add(
        "valid-unpinned-jwks-any-status",
        'policy accepts every TCB status (["*"]) and leaves jwks unpinned: '
        "the bundle's JWKS verifies the token",
        None,
        policy=_policy(world, genuine, accepted_tcb_statuses=["*"], jwks=None, issuer=None),
    )
    add(
        "valid-signer-policy",
        "policy pins MRSIGNER + product id + minimum SVN, no MRENCLAVE",
        None,
        policy=_policy(world, genuine, mrenclave=[]),
    )
    add(
        "debug-enclave-allowed",
        "a debug enclave under a policy with allow_debug (development only)",
        None,
        bundle=_bundle_json(debug),
        policy=_policy(world, debug, allow_debug=True),
        instance_id="",
    )
    # --- the quote
    add(
        "quote-truncated",
        "the quote cut to 100 bytes",
        "quote-format",
        bundle=bundle_with(quote=base["quote"][:200]),
    )
    version = bytearray(bytes.fromhex(base["quote"]))
    version[0] = 4
    add(
        "quote-version",
        "quote version 4 (only DCAP v3)",
        "quote-format",
        bundle=bundle_with(quote=version.hex()),
    )
    add(
        "wrong-root",
        "genuine quote, checked against another pinned root",
        "quote-root",
        root=OTHER_ROOT_FILE,
    )
    leaf = x509.load_pem_x509_certificate((world.pki / "sgx-pck-leaf.pem").read_bytes())
    expired = int(leaf.not_valid_after_utc.timestamp()) + 86_400
    add(
        "pck-expired",
        "checked one day after the PCK leaf certificate expired",
        "pck-chain",
        now=expired,
    )
    add(
        "flipped-quote-body-byte",
        "one bit of MRENCLAVE in the quote's report body flipped",
        "quote-signature",
        bundle=bundle_with(quote=_flip(base["quote"], _HEADER + 64)),
    )
    add(
        "flipped-report-data-byte",
        "one bit of the quoted report data flipped",
        "quote-signature",
        bundle=bundle_with(quote=_flip(base["quote"], _HEADER + 320)),
    )
    add(
        "flipped-qe-report-byte",
        "one bit of the QE report flipped",
        "qe-report-signature",
        bundle=bundle_with(quote=_flip(base["quote"], _QE_REPORT + 10)),
    )
    add(
        "flipped-attestation-key-byte",
        "one bit of the attestation key flipped (the QE report no longer binds it)",
        "qe-report-binding",
        bundle=bundle_with(quote=_flip(base["quote"], _HEADER + _BODY + 4 + 64 + 5)),
    )

    def other_signer(report: bytearray) -> None:
        report[128:160] = _seed("not intel's QE")

    def debug_qe(report: bytearray) -> None:
        report[48] |= 0x02

    add(
        "qe-not-intel",
        "the QE report is certified by the PCK key but its MRSIGNER is not Intel's QE3",
        "qe-identity",
        bundle=bundle_with(quote=_resigned_qe_report(world, genuine.quote, other_signer).hex()),
    )
    add(
        "qe-debug",
        "the QE report has the DEBUG attribute (its attestation key is readable by the host)",
        "qe-identity",
        bundle=bundle_with(quote=_resigned_qe_report(world, genuine.quote, debug_qe).hex()),
    )
    # --- the binding and the keys
    add(
        "other-nonce",
        "the bundle's nonce replaced (the quote's report data binds another)",
        "report-data",
        bundle=bundle_with(nonce=_hex(_seed("another nonce"))),
    )
    substituted = copy.deepcopy(base)
    substituted["keys"]["hpke_x25519_public_key"] = _hex(
        x25519.X25519PrivateKey.from_private_bytes(_seed("gateway hpke key")).public_key().public_bytes_raw()
    )
    add(
        "substituted-hpke-key",
        "the gateway puts its own HPKE key in `keys` (runtime data untouched)",
        "keys-substituted",
        bundle=substituted,
    )
    # --- the token
    forged, forged_jwks = _forged_token(genuine.claims)
    add(
        "forged-token-pinned-jwks",
        "the gateway signs a copy of the genuine claims with its own key and serves its own JWKS; "
        "the policy pins the keyvault's JWKS",
        "token-signature",
        bundle=bundle_with(attestation_token=forged, jwks_json=json.dumps(forged_jwks)),
    )
    same_kid, _ = _forged_token(genuine.claims, kid=str(world.jwks()["keys"][0]["kid"]))
    add(
        "forged-token-same-kid",
        "a forged token that names the keyvault key's kid",
        "token-signature",
        bundle=bundle_with(attestation_token=same_kid),
    )
    uptodate = dict(genuine.claims, **{"x-ms-sgx-tcb-status": "UpToDate"})
    forged_status, forged_status_jwks = _forged_token(uptodate)
    add(
        "forged-tcb-status",
        "forged token claiming UpToDate with its own JWKS, under a policy that pins the keyvault's JWKS",
        "token-signature",
        bundle=bundle_with(attestation_token=forged_status, jwks_json=json.dumps(forged_status_jwks)),
        policy=_policy(world, genuine, accepted_tcb_statuses=["UpToDate"]),
    )
    add(
        "token-alg-none",
        'a token with alg "none"',
        "token-algorithm",
        bundle=bundle_with(attestation_token=_unsigned_token(genuine.claims, "none")),
    )
    hs256 = jwt.encode(genuine.claims, _hex(_seed("hmac")), algorithm="HS256", headers={"kid": "k"})
    add("token-alg-hs256", "an HS256 token", "token-algorithm", bundle=bundle_with(attestation_token=hs256))
    add(
        "wrong-issuer",
        "the policy pins another issuer",
        "token-issuer",
        policy=_policy(world, genuine, issuer="https://another-keyvault.example"),
    )
    add("stale-token", "checked after the token expired (beyond the 30 s leeway)", "token-lifetime",
        now=int(genuine.claims["exp"]) + 31)  # fmt: skip
    add("future-token", "checked before the token was issued (beyond the leeway)", "token-lifetime",
        now=int(genuine.claims["iat"]) - 120)  # fmt: skip
    other_measure = dict(genuine.claims, **{"x-ms-sgx-mrenclave": _hex(_seed("another enclave"))})
    add(
        "token-claims-disagree",
        "a token by the genuine key whose MRENCLAVE claim is not the quote's",
        "token-claims",
        bundle=bundle_with(attestation_token=world.sign_claims(other_measure)),
    )
    other_ehd = dict(genuine.claims, **{"x-ms-sgx-ehd": b64url_encode(b"other runtime data")})
    add(
        "token-ehd-disagrees",
        "a token by the genuine key whose x-ms-sgx-ehd is not the bundle's runtime data",
        "token-claims",
        bundle=bundle_with(attestation_token=world.sign_claims(other_ehd)),
    )
    missing = {k: v for k, v in genuine.claims.items() if k != "x-ms-sgx-tcb-status"}
    add(
        "token-claim-missing",
        "a token by the genuine key without x-ms-sgx-tcb-status",
        "token-claims",
        bundle=bundle_with(attestation_token=world.sign_claims(missing)),
    )
    # --- the policy's measurement rules
    add(
        "wrong-measurement",
        "the policy pins another MRENCLAVE",
        "measurement",
        policy=_policy(world, genuine, mrenclave=[_hex(_seed("another enclave"))]),
    )
    add(
        "wrong-signer",
        "the policy pins another MRSIGNER",
        "signer",
        policy=_policy(world, genuine, mrsigner=_hex(_seed("another signer"))),
    )
    add("wrong-product", "the policy pins another product id", "signer",
        policy=_policy(world, genuine, product_id=genuine.verified.isv_prod_id + 1))  # fmt: skip
    add("svn-too-low", "the policy's minimum SVN is above the enclave's", "signer",
        policy=_policy(world, genuine, min_svn=genuine.verified.isv_svn + 1))  # fmt: skip
    add(
        "debug-enclave",
        "a debug enclave (DEBUG attribute set; the token says so too) under a policy without allow_debug",
        "debug-enclave",
        bundle=_bundle_json(debug),
        policy=_policy(world, debug),
        instance_id="",
    )
    add(
        "tcb-status-not-accepted",
        "the token's TCB status (Unevaluated) is not in the policy's accepted list",
        "tcb-status",
        policy=_policy(world, genuine, accepted_tcb_statuses=["UpToDate", "SWHardeningNeeded"]),
    )
    add(
        "other-keyvault",
        "the enclave binds a keyvault release key other than the pinned one",
        "keyvault-pin",
        policy=_policy(world, genuine, keyvault_release_key=_hex(_seed("another keyvault"))),
    )
    add(
        "no-keyvault-pin",
        "the policy pins no keyvault release key",
        "keyvault-pin",
        policy=_policy(world, genuine, keyvault_release_key=None),
    )
    # --- the instance descriptor
    add("descriptor-missing", "an instance is named but the bundle carries no descriptor",
        "descriptor", bundle=bundle_with(descriptor=None))  # fmt: skip
    add("descriptor-other-instance", "the descriptor names another instance than asked for",
        "descriptor", instance_id="payroll")  # fmt: skip
    tampered = copy.deepcopy(base)
    config = envelope_pb2.InstanceConfig.FromString(bytes.fromhex(tampered["descriptor"]["config"]))
    config.auth_scheme = envelope_pb2.AUTH_SCHEME_NONE
    tampered["descriptor"]["config"] = _hex(config.SerializeToString())
    add(
        "descriptor-config-swapped",
        "the gateway rewrites the signed configuration (auth scheme none)",
        "descriptor",
        bundle=tampered,
    )
    resigned = copy.deepcopy(base)
    resigned["descriptor"]["signature"] = _flip(resigned["descriptor"]["signature"], 3)
    add(
        "descriptor-bad-signature",
        "one bit of the descriptor's signature flipped",
        "descriptor",
        bundle=resigned,
    )
    return vectors


# --- commands, answers and receipts -----------------------------------------------------------------


def _token_call(**method: Any) -> apps_pb2.AppCall:
    return apps_pb2.AppCall(token=apps_pb2.TokenCall(**method))


def _sealed(request_label: str, call: apps_pb2.AppCall, counter: int, keys: envelope_pb2.EnclavePublicKeys,
            *, suite: int = X25519_SUITE, instance_id: str = INSTANCE) -> SealedRequest:  # fmt: skip
    """The SDK's seal_command with a fixed response key (the SDK draws it at random)."""
    response_key = _seed(f"response key {request_label}")
    original = secrets.token_bytes
    try:
        secrets.token_bytes = lambda n=None: response_key  # type: ignore[assignment]
        return seal_command(
            keys,
            instance_id=instance_id,
            scheme=envelope_pb2.AUTH_SCHEME_SIGNATURE,
            identity=ALICE,
            call=call,
            counter=counter,
            request_id=f"conformance-{request_label}",
            suite=suite,
        )
    finally:
        secrets.token_bytes = original


def _request_json(sealed: SealedRequest) -> dict[str, Any]:
    return {
        "instance_id": sealed.instance_id,
        "request_id": sealed.request_id,
        "counter": sealed.counter,
        "response_key": _hex(sealed.response_key),
        "command": {
            "suite": int(sealed.command.suite),
            "encapsulated_key": _hex(sealed.command.encapsulated_key),
            "ciphertext": _hex(sealed.command.ciphertext),
        },
    }


def _outcome_json(outcome: envelope_pb2.CommandOutcome) -> dict[str, Any]:
    document: dict[str, Any] = {
        "accepted": outcome.accepted,
        "sequence": outcome.sequence,
        "sealed_response": _hex(outcome.sealed_response),
        "error": None,
    }
    if outcome.HasField("error"):
        document["error"] = {"code": int(outcome.error.code), "message": outcome.error.message}
    return document


def _reseal(
    sealed: SealedRequest,
    outcome: envelope_pb2.CommandOutcome,
    change: Callable[[command_pb2.CommandResponse], None],
) -> envelope_pb2.CommandOutcome:
    """The same answer with its plaintext changed, sealed again under the request's response key.

    Only the client knows that key, so these test each check behind the AEAD on its own."""
    response = commands.open_response(
        sealed.response_key, outcome.sealed_response, sealed.instance_id, sealed.request_id
    )
    change(response)
    blob = crypto.seal_blob(
        sealed.response_key,
        response.SerializeToString(deterministic=True),
        wire.response_aad(sealed.instance_id, sealed.request_id),
    )
    changed = envelope_pb2.CommandOutcome()
    changed.CopyFrom(outcome)
    changed.sealed_response = blob
    return changed


def answer_vectors(world: World) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # noqa: PLR0915
    """Sealed commands and the enclave's answers (valid and tampered); and receipt vectors."""
    keys = world.keys
    signing = _hex(keys.signing_public_key)
    mint = _sealed("mint", _token_call(mint=apps_pb2.TokenMint(to=ALICE.account, amount=100)), 1, keys)
    mint_outcome = world.execute(mint)
    transfer = _sealed(
        "transfer", _token_call(transfer=apps_pb2.TokenTransfer(to=BOB.account, amount=10)), 2, keys
    )
    transfer_outcome = world.execute(transfer)
    replay = _sealed(
        "stale-counter", _token_call(transfer=apps_pb2.TokenTransfer(to=BOB.account, amount=10)), 2, keys
    )
    replay_outcome = world.execute(replay)
    overdraft = _sealed(
        "overdraft", _token_call(transfer=apps_pb2.TokenTransfer(to=BOB.account, amount=1000)), 3, keys
    )
    overdraft_outcome = world.execute(overdraft)
    balance = _sealed("balance", _token_call(balance=apps_pb2.TokenBalance()), 0, keys)
    balance_outcome = world.query(balance)
    hybrid = _sealed(
        "hybrid", _token_call(transfer=apps_pb2.TokenTransfer(to=BOB.account, amount=1)), 4, keys,
        suite=MLKEM768X25519_SUITE,
    )  # fmt: skip
    hybrid_outcome = world.execute(hybrid)

    vectors: list[dict[str, Any]] = []

    def result_of(sealed: SealedRequest, outcome: envelope_pb2.CommandOutcome) -> command_pb2.CommandResponse:
        return commands.open_response(
            sealed.response_key, outcome.sealed_response, INSTANCE, sealed.request_id
        )

    def add(name: str, description: str, sealed: SealedRequest, outcome: envelope_pb2.CommandOutcome,
            refusal: str | None, *, query: bool = False, signing_key: str = signing) -> None:  # fmt: skip
        expect: dict[str, Any]
        if refusal is None:
            response = result_of(sealed, outcome)
            result = command_pb2.CommandResult.FromString(response.result)
            expect = {
                "verdict": "valid",
                "accepted": outcome.accepted,
                "sequence": response.receipt.sequence if response.HasField("receipt") else 0,
                "result": _hex(response.result),
                "error_code": int(result.error.code) if result.HasField("error") else 0,
                "next_counter": result.counter.next_counter if result.HasField("counter") else None,
                "last_command_hash": (
                    _hex(result.counter.last_command_hash) if result.HasField("counter") else None
                ),
            }
        else:
            expect = {"verdict": "refused", "refusal": refusal}
        vectors.append({
            "id": name,
            "description": description,
            "signing_public_key": signing_key,
            "query": query,
            "request": _request_json(sealed),
            "outcome": _outcome_json(outcome),
            "expect": expect,
        })  # fmt: skip

    add("mint-accepted", "counter 1: mint 100 to alice (she is the token's issuer); receipt kind COMMAND",
        mint, mint_outcome, None)  # fmt: skip
    add("transfer-accepted", "counter 2: transfer 10 to bob", transfer, transfer_outcome, None)
    add(
        "stale-counter-aborted",
        "counter 2 again (another command): refused before execution, ABORTED, no receipt, with the "
        "account's typed CounterState: next_counter 3 and the hash of the command that used counter 2",
        replay,
        replay_outcome,
        None,
    )
    add("app-refusal-accepted", "counter 3: an overdraft; the app refuses, the counter is used and logged "
        "(accepted, receipt), the refusal is in the result", overdraft, overdraft_outcome, None)  # fmt: skip
    add("query-balance", "a query: receipt kind QUERY naming the head read; CounterState with next_counter 4",
        balance, balance_outcome, None, query=True)  # fmt: skip
    add("xwing-transfer", "counter 4 sealed with the X-Wing suite (HPKE ML-KEM-768+X25519)",
        hybrid, hybrid_outcome, None)  # fmt: skip

    flipped = envelope_pb2.CommandOutcome()
    flipped.CopyFrom(transfer_outcome)
    flipped.sealed_response = bytes.fromhex(_flip(_hex(transfer_outcome.sealed_response), 20))
    add("response-bit-flipped", "one bit of the sealed response flipped", transfer, flipped,
        "response-authentication")  # fmt: skip
    swapped = envelope_pb2.CommandOutcome()
    swapped.CopyFrom(mint_outcome)
    add("response-of-another-request", "the host answers the transfer with the mint's sealed response",
        transfer, swapped, "response-authentication")  # fmt: skip

    def bad_signature(response: command_pb2.CommandResponse) -> None:
        response.receipt.signature = bytes.fromhex(_flip(_hex(response.receipt.signature), 0))

    add("receipt-bad-signature", "the receipt's signature does not verify", transfer,
        _reseal(transfer, transfer_outcome, bad_signature), "receipt-signature")  # fmt: skip
    add("receipt-other-enclave", "a genuine answer checked with another enclave's signing key", transfer,
        transfer_outcome, "receipt-signature",
        signing_key=_hex(world.debug_keys.signing_public_key))  # fmt: skip

    mint_receipt = result_of(mint, mint_outcome).receipt
    other = _sealed(
        "payroll-mint", _token_call(mint=apps_pb2.TokenMint(to=ALICE.account, amount=5)), 1, keys,
        instance_id=OTHER_INSTANCE,
    )  # fmt: skip
    other_outcome = world.execute(other)
    payroll_receipt = commands.open_response(
        other.response_key, other_outcome.sealed_response, OTHER_INSTANCE, other.request_id
    ).receipt

    def other_instance(response: command_pb2.CommandResponse) -> None:
        response.receipt.CopyFrom(payroll_receipt)

    add("receipt-of-another-instance", "the transfer's answer carries a valid receipt of another instance "
        "of the same enclave", transfer, _reseal(transfer, transfer_outcome, other_instance),
        "receipt-instance")  # fmt: skip

    def other_receipt(response: command_pb2.CommandResponse) -> None:
        response.receipt.CopyFrom(mint_receipt)

    add("receipt-of-another-command", "the transfer's answer carries the mint's (valid) receipt", transfer,
        _reseal(transfer, transfer_outcome, other_receipt), "receipt-command")  # fmt: skip

    def other_result(response: command_pb2.CommandResponse) -> None:
        result = command_pb2.CommandResult.FromString(response.result)
        result.result.token.transfer.amount = 1_000_000
        response.result = result.SerializeToString(deterministic=True)

    add("result-changed", "the result differs from the one the receipt signs", transfer,
        _reseal(transfer, transfer_outcome, other_result), "receipt-result")  # fmt: skip

    def other_request(response: command_pb2.CommandResponse) -> None:
        response.request_id = "conformance-mint"

    add("response-names-another-request", "the response's request_id is not the request's", transfer,
        _reseal(transfer, transfer_outcome, other_request), "response-request-id")  # fmt: skip

    def no_receipt(response: command_pb2.CommandResponse) -> None:
        response.ClearField("receipt")

    add("receipt-missing", "an accepted answer without its receipt", transfer,
        _reseal(transfer, transfer_outcome, no_receipt), "receipt-missing")  # fmt: skip
    moved = envelope_pb2.CommandOutcome()
    moved.CopyFrom(transfer_outcome)
    moved.sequence += 5
    add("outcome-sequence-moved", "the host's outcome.sequence differs from the receipt's", transfer, moved,
        "outcome-flags")  # fmt: skip
    unaccepted = envelope_pb2.CommandOutcome()
    unaccepted.CopyFrom(transfer_outcome)
    unaccepted.accepted = False
    add("outcome-not-accepted", "the host says a command with a COMMAND receipt was not accepted", transfer,
        unaccepted, "outcome-flags")  # fmt: skip
    add("query-receipt-as-command", "a query's answer read as a command's (receipt kind QUERY)", balance,
        balance_outcome, "receipt-kind")  # fmt: skip
    vectors[-1]["query"] = False

    receipts: list[dict[str, Any]] = []
    for label, sealed, outcome in (
        ("transfer", transfer, transfer_outcome),
        ("query", balance, balance_outcome),
    ):
        receipt = result_of(sealed, outcome).receipt
        fields: dict[str, Any] = {
            "kind": int(receipt.kind),
            "instance_id": receipt.instance_id,
            "sequence": receipt.sequence,
            "command_hash": _hex(receipt.command_hash),
            "result_hash": _hex(receipt.result_hash),
            "signature": _hex(receipt.signature),
        }
        signed = wire.receipt_signing_bytes(receipt)
        receipts.append({
            "id": f"receipt-{label}", "description": f"the enclave's receipt of the {label}",
            "signing_public_key": signing, "receipt": fields, "signing_bytes": _hex(signed),
            "expect": {"verdict": "valid"},
        })  # fmt: skip
        tampers: dict[str, Any] = {
            "kind": 2 if receipt.kind == 1 else 1,
            "instance_id": "payroll",
            "sequence": receipt.sequence + 1,
            "command_hash": _flip(fields["command_hash"], 0),
            "result_hash": _flip(fields["result_hash"], 31),
            "signature": _flip(fields["signature"], 63),
        }
        for name, value in tampers.items():
            receipts.append({
                "id": f"receipt-{label}-{name.replace('_', '-')}-tampered",
                "description": f"the {label}'s receipt with its {name} changed",
                "signing_public_key": signing, "receipt": dict(fields, **{name: value}),
                "signing_bytes": None,
                "expect": {"verdict": "refused", "refusal": "receipt-signature"},
            })  # fmt: skip
    return vectors, receipts


def command_vectors() -> list[dict[str, Any]]:
    """Sealed commands with the recipient's private key: signing bytes, signature, plaintext, hash."""
    vectors = []
    x_private = x25519.X25519PrivateKey.from_private_bytes(_seed("recipient x25519"))
    pq_seed = _seed("recipient ml-kem-768", 32) + _seed("recipient ml-kem-768 z", 32)
    pq_x_private = x25519.X25519PrivateKey.from_private_bytes(_seed("recipient x-wing x25519"))
    pq_public = (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(pq_seed).public_key().public_bytes_raw()
        + pq_x_private.public_key().public_bytes_raw()
    )
    recipient = envelope_pb2.EnclavePublicKeys(
        hpke_x25519_public_key=x_private.public_key().public_bytes_raw(),
        hpke_mlkem768x25519_public_key=pq_public,
    )
    for label, suite, private in (
        ("x25519", X25519_SUITE, {"x25519": _hex(_seed("recipient x25519"))}),
        ("xwing", MLKEM768X25519_SUITE,
         {"mlkem768_seed": _hex(pq_seed), "x25519": _hex(_seed("recipient x-wing x25519"))}),
    ):  # fmt: skip
        call = _token_call(transfer=apps_pb2.TokenTransfer(to=BOB.account, amount=7))
        sealed = _sealed(f"command-{label}", call, 5, recipient, suite=suite)
        plaintext = command_pb2.Command(
            instance_id=INSTANCE,
            counter=5,
            request_id=sealed.request_id,
            response_key=sealed.response_key,
            call=call.SerializeToString(deterministic=True),
        )
        signing_bytes = wire.command_signing_bytes(
            instance_id=INSTANCE,
            counter=5,
            request_id=sealed.request_id,
            response_key=sealed.response_key,
            call=plaintext.call,
        )
        plaintext.auth.CopyFrom(ALICE.proof(envelope_pb2.AUTH_SCHEME_SIGNATURE, signing_bytes))
        vectors.append({
            "id": f"command-{label}",
            "description": f"a token transfer sealed with suite {label} (counter 5, Ed25519 signature proof)",
            "identity_private_seed": _hex(_seed("alice")),
            "account": ALICE.account,
            "call": _hex(plaintext.call),
            "signing_bytes": _hex(signing_bytes),
            "signature": _hex(plaintext.auth.signature.signature),
            "plaintext": _hex(plaintext.SerializeToString(deterministic=True)),
            "hpke": {
                "suite": suite, "info": _hex(wire.COMMAND_INFO), "aad": _hex(wire.command_aad(INSTANCE)),
                "recipient_public_key": _hex(
                    recipient.hpke_x25519_public_key if suite == X25519_SUITE else pq_public
                ),
                "recipient_private_key": private,
            },
            "command_hash": _hex(
                wire.command_hash(sealed.command.encapsulated_key, sealed.command.ciphertext)
            ),
            **_request_json(sealed),
            "expect": {"verdict": "valid"},
        })  # fmt: skip
    return vectors


# --- policy files -------------------------------------------------------------------------------------


def policy_vectors() -> list[dict[str, Any]]:
    """Policy documents a client must load, or refuse before fetching anything."""
    jwks = {"keys": [public_jwk(ec.derive_private_key(7, ec.SECP256R1()).public_key())]}
    good: dict[str, Any] = {
        "mrenclave": [_hex(_seed("m"))],
        "mrsigner": None,
        "product_id": None,
        "min_svn": None,
        "allow_debug": False,
        "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
        "root": "intel",
        "issuer": "https://keyvault.example",
        "jwks": jwks,
        "keyvault_release_key": _hex(RELEASE_PUBLIC),
    }
    cases: list[tuple[str, str, dict[str, Any] | Any, bool]] = [
        ("policy-full", "every field set; TCB statuses restricted under a pinned JWKS", good, True),
        ("policy-minimal", 'only what is required: an MRENCLAVE, ["*"] and the release key',
         {"mrenclave": _hex(_seed("m")), "accepted_tcb_statuses": ["*"],
          "keyvault_release_key": _hex(RELEASE_PUBLIC)}, True),
        ("policy-signer", "an MRSIGNER with product id and minimum SVN instead of MRENCLAVEs",
         dict(good, mrenclave=[], mrsigner=_hex(_seed("s")), product_id=1, min_svn=2), True),
        ("policy-not-object", "a JSON array", [good], False),
        ("policy-unknown-key", "a key the schema does not define", dict(good, mrenclaves=[]), False),
        ("policy-no-measurement", "neither MRENCLAVE nor MRSIGNER", dict(good, mrenclave=[]), False),
        ("policy-short-mrenclave", "an MRENCLAVE of 31 bytes", dict(good, mrenclave=[_hex(bytes(31))]),
         False),
        ("policy-bad-hex", "a non-hex MRSIGNER", dict(good, mrsigner="zz" * 32), False),
        ("policy-tcb-without-jwks", "restricts the TCB status but pins no JWKS", dict(good, jwks=None),
         False),
        ("policy-star-not-alone", '"*" with another status',
         dict(good, accepted_tcb_statuses=["*", "UpToDate"]), False),
        ("policy-unknown-status", "an unknown TCB status", dict(good, accepted_tcb_statuses=["Fine"]), False),
        ("policy-empty-statuses", "no accepted TCB status", dict(good, accepted_tcb_statuses=[]), False),
        ("policy-empty-jwks", "a pinned JWKS without keys", dict(good, jwks={"keys": []}), False),
        ("policy-debug-not-bool", "allow_debug as a string", dict(good, allow_debug="false"), False),
        ("policy-negative-svn", "a negative minimum SVN", dict(good, min_svn=-1), False),
        ("policy-empty-root", "an empty root", dict(good, root=""), False),
        ("policy-release-key-short", "a 16-byte release key",
         dict(good, keyvault_release_key=_hex(bytes(16))), False),
    ]  # fmt: skip
    vectors: list[dict[str, Any]] = [
        {
            "id": name,
            "description": description,
            "text": None,
            "document": document,
            "expect": {"verdict": "valid"} if ok else {"verdict": "refused", "refusal": "policy-invalid"},
        }
        for name, description, document, ok in cases
    ]
    # A file with two readings: JSON parsers that keep the first or the last member disagree.
    minimal = '"accepted_tcb_statuses": ["*"], "keyvault_release_key": "' + _hex(RELEASE_PUBLIC) + '"'
    duplicated = f'{{"mrenclave": "{_hex(_seed("m"))}", "mrenclave": "{_hex(_seed("n"))}", {minimal}}}'
    vectors.append({
        "id": "policy-duplicate-key",
        "description": "a policy file (text) naming mrenclave twice",
        "text": duplicated,
        "document": None,
        "expect": {"verdict": "refused", "refusal": "policy-invalid"},
    })  # fmt: skip
    return vectors


# --- output -------------------------------------------------------------------------------------------


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")


def generate(out: Path) -> dict[str, int]:
    """Write every vector file into `out`; returns the number of vectors per file."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="veil-conformance-") as temporary:
        world = World(Path(temporary))
        (out / DEV_ROOT_FILE).write_bytes(world.root_pem)
        (out / OTHER_ROOT_FILE).write_bytes(world.other_root_pem)
        attestation = attestation_vectors(world)
        answers, receipts = answer_vectors(world)
    files = {
        "attestation.json": attestation,
        "answers.json": answers,
        "receipts.json": receipts,
        "commands.json": command_vectors(),
        "policies.json": policy_vectors(),
    }
    generated = {"format": FORMAT, "generator": "python -m veil.dev.conformance", "now": NOW}
    for name, vectors in files.items():
        _write_json(out / name, {**generated, "vectors": vectors})
    return {name: len(vectors) for name, vectors in files.items()}


def iter_vectors(directory: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (file name, vector) under `directory`."""
    for path in sorted(directory.glob("*.json")):
        for vector in json.loads(path.read_text())["vectors"]:
            yield path.name, vector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m veil.dev.conformance", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    counts = generate(args.out)
    for name, count in counts.items():
        print(f"{args.out / name}: {count} vectors")
    print(f"total: {sum(counts.values())} vectors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
