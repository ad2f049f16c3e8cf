"""Verify an enclave's attestation bundle against a client's trust policy.

The bundle arrives through the gateway, which the client does not trust, so every piece is
checked against something the client pins or against another piece:

1. quote: DCAP v3 signatures and PCK chain to the pinned root (`intel`, or the dev root for
   the sim enclave), with the verifier the keyvault uses too (veil.verify.verifier);
2. binding: the quote's report data is `wire.report_data(runtime_data, nonce)` (a
   domain-separated hash the enclave computes over its own keys; the host picks only the nonce);
3. token: the keyvault's ES256 JWT verifies against the JWKS (pinned in the policy, or the
   one in the bundle), is unexpired, names the pinned issuer if any, and its claims agree
   with the quote (measurements, product, SVN, debug, report data) and the bundle (ehd =
   runtime_data, nonce);
4. policy: MRENCLAVE / MRSIGNER / product / minimum SVN / debug / TCB status;
5. keys: the bundle's EnclavePublicKeys equal the decoded runtime_data;
6. instance (when one is named): the enclave-signed descriptor verifies with the attested
   signing key, names the instance, and its configuration parses. That configuration (auth
   scheme, issuers, keys), not the gateway's description, is what the client seals under.

What each check anchors: the quote (1, 2, 4, 5) ties the keys to the measured code through
the pinned root, whatever the gateway does. The token adds the keyvault's TCB evaluation; it
is only as trustworthy as its JWKS, which the gateway could substitute unless the policy pins
`jwks` (`VerifiedAttestation.jwks_pinned` says which case applied).

Any failure raises `AttestationError` with the reason; nothing is returned to seal to.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import DecodeError

from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.verify.errors import AttestationError, QuoteError, TokenError
from veil.verify.tokens import DEFAULT_LEEWAY_S, VerifiedToken, verify_token
from veil.verify.verifier import VerifiedQuote, verify_quote

X25519_KEY_SIZE = 32
ED25519_KEY_SIZE = 32


class TrustPolicy(Protocol):
    """What a client pins before trusting an enclave (the SDK's `ExpectedMeasurement` is one).

    Empty `mrenclaves` and None fields pin nothing; `accepted_tcb_statuses` lists every status
    accepted (already expanded from any wildcard); `root` names the pinned SGX root whose key
    `verify_bundle` is given (for its report only).
    """

    @property
    def mrenclaves(self) -> tuple[bytes, ...]: ...
    @property
    def mrsigner(self) -> bytes | None: ...
    @property
    def product_id(self) -> int | None: ...
    @property
    def min_svn(self) -> int | None: ...
    @property
    def allow_debug(self) -> bool: ...
    @property
    def accepted_tcb_statuses(self) -> tuple[str, ...]: ...
    @property
    def root(self) -> str: ...
    @property
    def issuer(self) -> str | None: ...
    @property
    def jwks(self) -> Mapping[str, Any] | None: ...
    @property
    def keyvault_release_key(self) -> bytes | None: ...


@dataclass(frozen=True)
class VerifiedDescriptor:
    """An instance as its attested enclave describes it (signature checked)."""

    instance_id: str
    config: envelope_pb2.InstanceConfig
    config_hash: bytes
    genesis_hash: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "config_hash": self.config_hash.hex(),
            "genesis_hash": self.genesis_hash.hex(),
        }


def verify_descriptor(
    descriptor: envelope_pb2.InstanceDescriptor, signing_public_key: bytes, instance_id: str
) -> VerifiedDescriptor:
    """Check an enclave-signed instance descriptor; AttestationError with the reason."""
    if descriptor.instance_id != instance_id:
        raise _fail(f"the instance descriptor names {descriptor.instance_id[:64]!r}, not {instance_id!r}")
    if not wire.verify_instance_descriptor(descriptor, signing_public_key):
        raise _fail("the instance descriptor is not signed by the attested enclave")
    config = envelope_pb2.InstanceConfig()
    try:
        config.ParseFromString(descriptor.config)
    except DecodeError:
        raise _fail("the instance descriptor's configuration does not parse") from None
    return VerifiedDescriptor(
        instance_id=instance_id,
        config=config,
        config_hash=wire.config_hash(descriptor.config),
        genesis_hash=bytes(descriptor.genesis_hash),
    )


@dataclass(frozen=True)
class VerifiedAttestation:
    """An enclave the client decided to trust, and what was checked to decide it."""

    keys: envelope_pb2.EnclavePublicKeys
    mrenclave: bytes
    mrsigner: bytes
    product_id: int
    svn: int
    debug: bool
    tcb_status: str
    advisory_ids: tuple[str, ...]
    issuer: str
    token_issued_at: int
    token_expires_at: int
    jwks_pinned: bool
    root: str
    checks: tuple[str, ...]
    descriptor: VerifiedDescriptor | None

    def expired(self, now: float | None = None) -> bool:
        """True once the attestation token has expired (the SDK then attests again)."""
        return (time.time() if now is None else now) >= self.token_expires_at

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly summary (for `veil attest show --json`)."""
        return {
            "mrenclave": self.mrenclave.hex(),
            "mrsigner": self.mrsigner.hex(),
            "product_id": self.product_id,
            "svn": self.svn,
            "debug": self.debug,
            "tcb_status": self.tcb_status,
            "advisory_ids": list(self.advisory_ids),
            "issuer": self.issuer,
            "token_issued_at": self.token_issued_at,
            "token_expires_at": self.token_expires_at,
            "jwks_pinned": self.jwks_pinned,
            "root": self.root,
            "hpke_x25519_public_key": self.keys.hpke_x25519_public_key.hex(),
            "signing_public_key": self.keys.signing_public_key.hex(),
            "checks": list(self.checks),
            "instance": self.descriptor.to_json() if self.descriptor is not None else None,
        }


def _fail(reason: str) -> AttestationError:
    return AttestationError(reason)


def _check_quote(quote: bytes, root_public_key: ec.EllipticCurvePublicKey, now: float) -> VerifiedQuote:
    try:
        return verify_quote(
            quote, root_public_key=root_public_key, now=dt.datetime.fromtimestamp(now, dt.UTC)
        )
    except QuoteError as exc:
        raise _fail(f"quote: {exc.reason}") from None


def _check_token(
    bundle: gateway_pb2.GetAttestationResponse, policy: TrustPolicy, now: float, leeway_s: float
) -> VerifiedToken:
    if policy.jwks is not None:
        jwks = policy.jwks
    else:
        jwks = wire.strict_json_object(bundle.jwks_json, "the bundle's JWKS", _fail)
    issuer = policy.issuer
    if issuer is None:  # not pinned: accept the token's own issuer, still checked for shape
        try:
            issuer = jwt.decode(bundle.attestation_token, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            raise _fail("token: not a JWT") from None
        if not isinstance(issuer, str):
            raise _fail("token: no issuer")
    try:
        return verify_token(bundle.attestation_token, jwks, issuer=issuer, now=now, leeway_s=leeway_s)
    except TokenError as exc:
        raise _fail(f"token: {exc.reason}") from None


def _agree(token: VerifiedToken, quote: VerifiedQuote, bundle: gateway_pb2.GetAttestationResponse) -> None:
    claims = token.claims
    pairs = (
        ("x-ms-sgx-mrenclave", claims["x-ms-sgx-mrenclave"], quote.mrenclave.hex()),
        ("x-ms-sgx-mrsigner", claims["x-ms-sgx-mrsigner"], quote.mrsigner.hex()),
        ("x-ms-sgx-product-id", claims["x-ms-sgx-product-id"], quote.isv_prod_id),
        ("x-ms-sgx-svn", claims["x-ms-sgx-svn"], quote.isv_svn),
        ("x-ms-sgx-is-debuggable", claims["x-ms-sgx-is-debuggable"], quote.debug),
    )
    for name, claimed, quoted in pairs:
        if claimed != quoted:
            raise _fail(f"token claim {name} disagrees with the quote")
    if not hmac.compare_digest(token.report_data, quote.report_data):
        raise _fail("token report data disagrees with the quote")
    if not hmac.compare_digest(token.runtime_data, bundle.runtime_data):
        raise _fail("token x-ms-sgx-ehd does not equal the bundle's runtime data")
    if not hmac.compare_digest(token.nonce, bundle.nonce):
        raise _fail("token nonce does not equal the bundle's nonce")


def _check_policy(quote: VerifiedQuote, tcb_status: str, policy: TrustPolicy) -> None:
    if policy.mrenclaves and quote.mrenclave not in policy.mrenclaves:
        raise _fail(f"MRENCLAVE {quote.mrenclave.hex()} is not an expected measurement")
    if policy.mrsigner is not None and quote.mrsigner != policy.mrsigner:
        raise _fail(f"MRSIGNER {quote.mrsigner.hex()} is not the expected signer")
    if policy.product_id is not None and quote.isv_prod_id != policy.product_id:
        raise _fail(f"product id {quote.isv_prod_id} is not {policy.product_id}")
    if policy.min_svn is not None and quote.isv_svn < policy.min_svn:
        raise _fail(f"SVN {quote.isv_svn} is below the minimum {policy.min_svn}")
    if quote.debug and not policy.allow_debug:
        raise _fail("the enclave is debuggable (its memory is readable by the host)")
    if tcb_status not in policy.accepted_tcb_statuses:
        raise _fail(f"TCB status {tcb_status!r} is not accepted")


def _check_keys(
    bundle: gateway_pb2.GetAttestationResponse, policy: TrustPolicy
) -> envelope_pb2.EnclavePublicKeys:
    try:
        decoded = envelope_pb2.EnclavePublicKeys.FromString(bundle.runtime_data)
    except DecodeError:
        raise _fail("runtime data is not EnclavePublicKeys") from None
    if decoded != bundle.keys:
        raise _fail("the bundle's keys are not the attested runtime data")
    if (
        len(decoded.hpke_x25519_public_key) != X25519_KEY_SIZE
        or len(decoded.signing_public_key) != ED25519_KEY_SIZE
    ):
        raise _fail("the attested keys have the wrong sizes")
    if policy.keyvault_release_key is None:
        raise _fail("the policy pins no keyvault release key, so the enclave's data keys cannot be trusted")
    if not hmac.compare_digest(decoded.keyvault_release_public_key, policy.keyvault_release_key):
        raise _fail("the enclave accepts keys from another keyvault than the pinned one")
    return decoded


def verify_bundle(
    bundle: gateway_pb2.GetAttestationResponse,
    policy: TrustPolicy,
    *,
    root_public_key: ec.EllipticCurvePublicKey,
    now: float | None = None,
    leeway_s: float = DEFAULT_LEEWAY_S,
    instance_id: str = "",
) -> VerifiedAttestation:
    """Verify `bundle` (see the module docstring), and `instance_id`'s descriptor when one is
    named; raise AttestationError with the reason."""
    now = time.time() if now is None else now
    quote = _check_quote(bundle.quote, root_public_key, now)
    try:
        expected = wire.report_data(bundle.runtime_data, bundle.nonce)
    except ValueError as exc:
        raise _fail(f"bundle: {exc}") from None
    if not hmac.compare_digest(quote.report_data, expected):
        raise _fail("quote report data does not bind the runtime data and nonce")
    token = _check_token(bundle, policy, now, leeway_s)
    _agree(token, quote, bundle)
    _check_policy(quote, token.tcb_status, policy)
    keys = _check_keys(bundle, policy)
    descriptor = None
    if instance_id:
        if not bundle.HasField("descriptor"):
            raise _fail(f"the bundle carries no descriptor of instance {instance_id!r}")
        descriptor = verify_descriptor(bundle.descriptor, keys.signing_public_key, instance_id)
    advisories = token.claims.get("x-ms-sgx-advisory-ids") or []
    checks = (
        f"quote signatures and PCK chain verify to the pinned {policy.root!r} SGX root",
        "quote report data = the enclave's binding of its runtime data and the nonce",
        "attestation token (ES256) verifies against the "
        + ("pinned JWKS" if policy.jwks is not None else "JWKS supplied with the bundle (not pinned)"),
        f"token issuer {token.claims['iss']!r}"
        + (" is the pinned issuer" if policy.issuer is not None else " (not pinned)"),
        "token is within its lifetime",
        "token claims (MRENCLAVE, MRSIGNER, product, SVN, debug, report data, ehd, nonce) match the quote",
        "MRENCLAVE/MRSIGNER/product/SVN/debug satisfy the expected-measurement policy",
        f"TCB status {token.tcb_status!r} is accepted",
        "enclave keys = decoded runtime data",
        "the enclave accepts data keys only from the pinned keyvault release key",
    ) + (
        (f"instance {instance_id!r}: its configuration is the one the attested enclave signed",)
        if descriptor is not None
        else ()
    )
    return VerifiedAttestation(
        keys=keys,
        mrenclave=quote.mrenclave,
        mrsigner=quote.mrsigner,
        product_id=quote.isv_prod_id,
        svn=quote.isv_svn,
        debug=quote.debug,
        tcb_status=token.tcb_status,
        advisory_ids=tuple(str(a) for a in advisories) if isinstance(advisories, list) else (),
        issuer=str(token.claims["iss"]),
        token_issued_at=token.issued_at,
        token_expires_at=token.expires_at,
        jwks_pinned=policy.jwks is not None,
        root=policy.root,
        checks=checks,
        descriptor=descriptor,
    )
