"""Coarse, per-instance client authentication at the gateway (plugins: none, API key, OAuth2).

The gateway only decides whether a request may reach the instance at all. The real,
fine-grained decision stays in the enclave: under AUTH_SCHEME_OAUTH2 the caller's JWT travels
inside the sealed command only. The bearer token this plugin checks must be a different token,
for a different audience ("audience" here is the gateway's, never the instance's), because a
host running the gateway could otherwise seal its own commands with the token it saw and act as
the caller; the clients refuse to send the enclave's token here (docs/threat-model.md item 4).

Configuration (`VEIL_GATEWAY_AUTH`, JSON, or YAML when the file ends in .yaml/.yml)::

    {
      "default": {"type": "none"},
      "instances": {
        "payroll": {"type": "api_key", "keys": {"hr-bot": "sha256:<hex of SHA-256(key)>"}},
        "ballots": {"type": "oauth2", "issuer": "https://idp.example", "audience": "veil-gateway",
                    "jwks_file": "/etc/veil/idp-jwks.json", "algorithms": ["RS256", "ES256"]}
      }
    }

Without a file every instance uses "none". With a file, an instance that is neither listed
nor covered by "default" is refused (fail closed). API keys are stored only as SHA-256
hashes and compared in constant time. Credentials travel as gRPC metadata:
`x-api-key: <key>` (or `authorization: ApiKey <key>`) and `authorization: Bearer <jwt>`.

A request's principal (who the gateway believes is calling) is, in this order: the API key
name or the JWT `sub` the plugin verified, else the verified client certificate's SPIFFE
ID, else anonymous. Rate limits and WatchReceipts ownership are keyed by it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from veil.enclave import wire
from veil.services.common.config import ConfigError
from veil.services.common.errors import Unauthenticated

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
_ALLOWED_JWT_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "EdDSA"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256"})
# An EC key signs with exactly one algorithm, fixed by its curve (RFC 7518 section 3.4).
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_LEEWAY_S = 30


@dataclass(frozen=True)
class Principal:
    """Who the gateway believes is calling: `kind` is anonymous, certificate, api-key or oauth2."""

    kind: str
    name: str = ""

    @property
    def key(self) -> str:
        """A stable key for rate limiting and stream ownership."""
        return f"{self.kind}:{self.name}"


ANONYMOUS = Principal("anonymous")


@dataclass(frozen=True)
class Credentials:
    """What a request presented: its verified certificate identity and its metadata."""

    certificate_identity: str | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def fallback(self) -> Principal:
        """The principal when no plugin names one."""
        if self.certificate_identity is not None:
            return Principal("certificate", self.certificate_identity)
        return ANONYMOUS

    def authorization(self, scheme: str) -> str | None:
        """The credential after `authorization: <scheme> `, if present."""
        value = self.metadata.get(AUTHORIZATION_HEADER, "")
        prefix = f"{scheme} "
        if value[: len(prefix)].lower() == prefix.lower():
            return value[len(prefix) :].strip()
        return None


class AuthPlugin(Protocol):
    """Authenticates one request for an instance, or raises Unauthenticated."""

    def authenticate(self, credentials: Credentials) -> Principal:
        """The principal, or raise Unauthenticated."""
        ...


class NoAuth:
    """Every caller may pass; the principal is its certificate identity or anonymous."""

    def authenticate(self, credentials: Credentials) -> Principal:
        return credentials.fallback()


class ApiKeyAuth:
    """A caller must present one of the configured API keys (stored as SHA-256 hashes)."""

    def __init__(self, key_hashes: Mapping[str, bytes]) -> None:
        if not key_hashes:
            raise ConfigError("api_key plugin needs at least one key")
        self._hashes = dict(key_hashes)

    def authenticate(self, credentials: Credentials) -> Principal:
        key = credentials.metadata.get(API_KEY_HEADER) or credentials.authorization("ApiKey")
        if not key:
            raise Unauthenticated("this instance requires an API key", reason="API_KEY_MISSING")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        match = None
        for name, expected in self._hashes.items():  # no early exit: constant work per key
            if hmac.compare_digest(digest, expected):
                match = name
        if match is None:
            raise Unauthenticated("API key not accepted", reason="API_KEY_INVALID")
        return Principal("api-key", match)


class OAuth2Auth:
    """A caller must present a bearer JWT from the issuer, for the audience, signed by the JWKS."""

    def __init__(
        self, *, issuer: str, audience: str, jwks: Mapping[str, Any], algorithms: Sequence[str]
    ) -> None:
        if not issuer or not audience:
            raise ConfigError("oauth2 plugin needs issuer and audience")
        unknown = set(algorithms) - _ALLOWED_JWT_ALGORITHMS
        if not algorithms or unknown:
            # Asymmetric algorithms only: HS* with a public JWKS would be forgeable.
            raise ConfigError(f"oauth2 algorithms must be among {sorted(_ALLOWED_JWT_ALGORITHMS)}")
        try:
            self._keys = jwt.PyJWKSet.from_dict(dict(jwks))
        except (jwt.PyJWKSetError, jwt.InvalidKeyError) as exc:
            raise ConfigError(f"oauth2 JWKS is unusable: {exc}") from None
        for key in self._keys.keys:
            if not _key_algorithms(key.key):
                raise ConfigError(f"oauth2 JWKS key {key.key_id!r}: only RSA, EC and Ed25519 public keys")
        self._issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms)

    def authenticate(self, credentials: Credentials) -> Principal:
        token = credentials.authorization("Bearer")
        if not token:
            raise Unauthenticated("this instance requires a bearer token", reason="BEARER_MISSING")
        try:
            _one_reading(token)
            header = jwt.get_unverified_header(token)
            key = self._key(header.get("kid"))
            algorithm = header.get("alg")
            # The header names the algorithm; it must be allowed and fit the key's type (an RS256
            # header over an EC key made PyJWT raise TypeError, an answer of INTERNAL).
            if not isinstance(algorithm, str) or algorithm not in self._algorithms & _key_algorithms(key):
                raise jwt.InvalidAlgorithmError(f"algorithm {algorithm!r} does not fit the signing key")
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=_LEEWAY_S,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"bearer token not accepted: {exc}", reason="BEARER_INVALID") from None
        except (TypeError, ValueError):
            # Whatever else a hostile token makes the JWT or crypto library throw is a refusal.
            raise Unauthenticated("bearer token not accepted", reason="BEARER_INVALID") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise Unauthenticated("bearer token has no subject", reason="BEARER_INVALID")
        # Subjects are unique only per issuer: scope them so two issuers' "alice" stay apart, in
        # an encoding with one reading ("https://idp:8443" + "alice" and "https://idp" +
        # "8443:alice" joined with ":" were one principal: one rate bucket, one stream owner).
        return Principal("oauth2", json.dumps([self._issuer, subject], ensure_ascii=True))

    def _key(self, kid: object) -> Any:
        candidates = [k for k in self._keys.keys if kid is None or k.key_id == kid]
        if len(candidates) != 1:
            raise jwt.InvalidTokenError("signing key not found in the JWKS")
        return candidates[0].key


def _one_reading(token: str) -> None:
    """Refuse a token whose header or claims are JSON with duplicate members (or not JSON
    objects): PyJWT keeps the last of two "sub"s, the enclave refuses the token, and the gateway
    must not name a caller by a reading the enclave would not share."""
    parts = token.split(".")
    if len(parts) != 3:
        raise jwt.DecodeError("not a compact JWS")
    for what, segment in (("header", parts[0]), ("claims", parts[1])):
        try:
            decoded = jwt.utils.base64url_decode(segment)
        except (ValueError, TypeError):
            raise jwt.DecodeError(f"{what}: not base64url") from None
        wire.strict_json_object(decoded, what, jwt.DecodeError)


def _key_algorithms(key: object) -> frozenset[str]:
    """The JWS algorithms a public key of this type can verify (none for any other key)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return frozenset({_EC_ALGORITHMS[key.curve.name]})
    if isinstance(key, ed25519.Ed25519PublicKey):
        return frozenset({"EdDSA"})
    return frozenset()


class Refuse:
    """Fail closed: an instance not covered by the configuration."""

    def authenticate(self, credentials: Credentials) -> Principal:
        raise Unauthenticated("no authentication is configured for this instance", reason="NO_AUTH_POLICY")


@dataclass(frozen=True)
class Authenticators:
    """The plugin of each instance, and the default for the others."""

    instances: Mapping[str, AuthPlugin] = field(default_factory=dict)
    default: AuthPlugin = field(default_factory=NoAuth)

    def plugin(self, instance_id: str) -> AuthPlugin:
        """The plugin guarding `instance_id`."""
        return self.instances.get(instance_id, self.default)

    def authenticate(self, instance_id: str, credentials: Credentials) -> Principal:
        """Authenticate a request for `instance_id` (raises Unauthenticated).

        API-key names are chosen per instance, so they are scoped by it (`api-key:<instance>:<name>`,
        `*` for the default plugin's keys): two tenants' "alice" never share a bucket or a stream.
        """
        principal = self.plugin(instance_id).authenticate(credentials)
        if principal.kind == "api-key":
            scope = instance_id if instance_id in self.instances else "*"
            return Principal(principal.kind, f"{scope}:{principal.name}")
        return principal


def _key_hash(name: str, value: object) -> bytes:
    if not isinstance(value, str) or not value.startswith("sha256:"):
        raise ConfigError(f"api key {name!r}: store keys as 'sha256:<hex>', never in plain text")
    try:
        digest = bytes.fromhex(value.removeprefix("sha256:"))
    except ValueError:
        raise ConfigError(f"api key {name!r}: not hex") from None
    if len(digest) != 32:
        raise ConfigError(f"api key {name!r}: a SHA-256 hash is 32 bytes")
    return digest


def _plugin(spec: object, where: str, base: Path) -> AuthPlugin:
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected an object with a 'type'")
    kind = spec.get("type")
    if kind == "none":
        return NoAuth()
    if kind == "api_key":
        keys = spec.get("keys")
        if not isinstance(keys, Mapping):
            raise ConfigError(f"{where}: api_key needs 'keys': {{name: 'sha256:<hex>'}}")
        return ApiKeyAuth({str(name): _key_hash(str(name), value) for name, value in keys.items()})
    if kind == "oauth2":
        jwks: object = spec.get("jwks")
        if "jwks_file" in spec:
            path = base / str(spec["jwks_file"])
            try:
                text = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read JWKS {path}: {exc}") from None
            jwks = wire.strict_json_object(text, f"{where}: JWKS {path}", ConfigError)
        if not isinstance(jwks, Mapping):
            raise ConfigError(f"{where}: oauth2 needs 'jwks' or 'jwks_file'")
        algorithms = spec.get("algorithms", ["RS256", "ES256"])
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise ConfigError(f"{where}: 'algorithms' must be a list of names")
        return OAuth2Auth(
            issuer=str(spec.get("issuer", "")),
            audience=str(spec.get("audience", "")),
            jwks=jwks,
            algorithms=algorithms,
        )
    raise ConfigError(f"{where}: unknown plugin type {kind!r} (none, api_key, oauth2)")


def parse_authenticators(document: object, base: Path = Path()) -> Authenticators:
    """Build the authenticators from a parsed configuration document (relative paths resolve
    against `base`)."""
    if not isinstance(document, Mapping):
        raise ConfigError("gateway auth configuration must be an object")
    unknown = set(document) - {"default", "instances"}
    if unknown:
        raise ConfigError(f"gateway auth configuration: unknown keys {sorted(unknown)}")
    instances = document.get("instances", {})
    if not isinstance(instances, Mapping):
        raise ConfigError("'instances' must map instance ids to plugins")
    plugins = {str(i): _plugin(spec, f"instances.{i}", base) for i, spec in instances.items()}
    default = _plugin(document["default"], "default", base) if "default" in document else Refuse()
    return Authenticators(plugins, default)


def load_authenticators(path: Path | None) -> Authenticators:
    """The authenticators in `path` (JSON, or YAML by extension); no file means "none" everywhere."""
    if path is None:
        return Authenticators()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read gateway auth configuration {path}: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        return parse_authenticators(_yaml(text, path), path.parent)
    document = wire.strict_json_object(text, f"gateway auth configuration {path}", ConfigError)
    return parse_authenticators(document, path.parent)


def _yaml(text: str, path: Path) -> object:
    import yaml  # PyYAML: a runtime dependency only for YAML policies

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"gateway auth configuration {path} is not valid YAML: {exc}") from None
