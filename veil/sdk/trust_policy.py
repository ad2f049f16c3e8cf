"""The expected-measurement policy a client pins before trusting an enclave, and its JSON file.

File format (`<data_dir>/expected-measurement.json`, written by `veil up` in development)::

    {
      "mrenclave": ["<64 hex>", ...],        # accepted MRENCLAVEs (at least one of mrenclave/mrsigner)
      "mrsigner": "<64 hex>" | null,         # accepted MRSIGNER (then product_id/min_svn apply)
      "product_id": 1 | null,
      "min_svn": 1 | null,
      "allow_debug": false,
      "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"] | ["*"],
      "root": "intel" | "dev" | "/path/root.pem",   # the pinned SGX root ("dev": <data_dir>/pki/sgx-root.pem)
      "issuer": "https://..." | null,        # pin the keyvault's token issuer
      "jwks": {"keys": [...]} | null,        # pin the keyvault's token keys; REQUIRED unless ["*"]
      "keyvault_release_key": "<64 hex>"     # REQUIRED: the keyvault release-signing key (Ed25519)
    }

`keyvault_release_key` is what makes the data keys trustworthy: an enclave only accepts
instance keys signed by the keyvault key it was started with, and it binds that key into its
quote. A client that did not pin it could be talking to a genuine enclave that a malicious
host started against a keyvault of its own, holding keys the host knows.

`accepted_tcb_statuses` lists the Intel TCB statuses (``UpToDate``, ``SWHardeningNeeded``,
``ConfigurationNeeded``, ``ConfigurationAndSWHardeningNeeded``, ``OutOfDate``,
``OutOfDateConfigurationNeeded``, ``Revoked``, and ``Unevaluated`` from a keyvault without
collateral) the client accepts; ``["*"]`` accepts every one of them (an unknown status is
refused at load). Only the keyvault's token states the TCB status, computed from collateral
the quote does not carry, so the verdict is only as trustworthy as the key that signed the
token: **a policy that restricts the TCB status must pin `jwks`**, or a hostile gateway could
sign a token of its own, copy every claim the quote binds and set "UpToDate". A policy with
``["*"]`` may leave `jwks` unpinned (then the bundle's JWKS verifies the token, and the quote
binding is what holds).

The file's JSON Schema is `veil/sdk/policy.schema.json` (shipped with the package; the Node
client validates against the same file): `load_policy` admits a file only when it passes both
the checks here and the schema, and a refusal names the field and the rule it breaks.
docs/protocol.md (section 2) describes every field.

Fail closed: there is no trust-on-first-use. In development `veil up` writes the policy with
`veil.dev.policies.write_dev_policy`: the sim enclave's MRENCLAVE computed from the enclave
source (`veil.enclave.measurement`), the dev signer's MRSIGNER, the dev root, and the local
keyvault's JWKS and release key (read from the keyvault it started). The sim mesh's keyvault evaluates quotes
against dev collateral, so the dev policy accepts the production default statuses. A
production policy pins "intel" and the production keyvault's JWKS; when the keyvault rotates
its token-signing key, the new public key must be pinned before it signs.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
from cryptography.hazmat.primitives.asymmetric import ec
from jsonschema.exceptions import ValidationError, relevance

from veil.enclave import wire
from veil.sdk.errors import PolicyError
from veil.verify.collateral import TCB_STATUSES
from veil.verify.roots import RootError, dev_root_path, resolve_root
from veil.verify.tokens import TCB_UNEVALUATED

POLICY_FILE = "expected-measurement.json"
#: The policy file's JSON Schema, package data next to this module.
POLICY_SCHEMA = "policy.schema.json"
DEFAULT_TCB_STATUSES = ("UpToDate", "SWHardeningNeeded")
#: Spells "accept every TCB status" in `accepted_tcb_statuses` (alone in the list).
ANY_TCB_STATUS = "*"
#: Every status a token can state; a policy accepting all of them restricts nothing.
ALL_TCB_STATUSES = tuple(sorted(TCB_STATUSES | {TCB_UNEVALUATED}))


def _hex32(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise PolicyError(f"{what} must be a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise PolicyError(f"{what} is not hex") from None
    if len(raw) != 32:
        raise PolicyError(f"{what} must be 32 bytes (64 hex digits)")
    return raw


@dataclass(frozen=True)
class ExpectedMeasurement:
    """What the client accepts as "the enclave": measurements, debug, TCB status and trust roots."""

    mrenclaves: tuple[bytes, ...] = ()
    mrsigner: bytes | None = None
    product_id: int | None = None
    min_svn: int | None = None
    allow_debug: bool = False
    accepted_tcb_statuses: tuple[str, ...] = DEFAULT_TCB_STATUSES
    root: str = "intel"
    issuer: str | None = None
    jwks: Mapping[str, Any] | None = field(default=None, compare=False)
    keyvault_release_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.keyvault_release_key is not None and len(self.keyvault_release_key) != 32:
            raise PolicyError("keyvault_release_key must be 32 bytes (64 hex digits)")
        if not self.mrenclaves and self.mrsigner is None:
            raise PolicyError("a policy must pin at least one MRENCLAVE or an MRSIGNER")
        if any(len(m) != 32 for m in self.mrenclaves) or (
            self.mrsigner is not None and len(self.mrsigner) != 32
        ):
            raise PolicyError("measurements are 32 bytes")
        self._check_tcb_statuses()
        if self.jwks is not None:
            _check_jwks(self.jwks)
        elif not self.accepts_every_tcb_status:
            raise PolicyError(
                "a policy that restricts accepted_tcb_statuses must pin jwks: the token's TCB status "
                "is only as trustworthy as the key that signed it, and without a pinned JWKS that key "
                "comes from the gateway with the bundle (pin the keyvault's JWKS, or accept every "
                f'status with ["{ANY_TCB_STATUS}"])'
            )

    def _check_tcb_statuses(self) -> None:
        statuses = tuple(self.accepted_tcb_statuses)
        if not statuses:
            raise PolicyError("accepted_tcb_statuses must not be empty")
        if ANY_TCB_STATUS in statuses:
            if statuses != (ANY_TCB_STATUS,):
                raise PolicyError(f'"{ANY_TCB_STATUS}" accepts every TCB status and must stand alone')
            # Expanded, so that membership tests (`status in accepted_tcb_statuses`) hold.
            statuses = ALL_TCB_STATUSES
        unknown = sorted(set(statuses) - set(ALL_TCB_STATUSES))
        if unknown:
            raise PolicyError(
                f"unknown TCB status(es) {', '.join(unknown)}; known: {', '.join(ALL_TCB_STATUSES)}"
            )
        object.__setattr__(self, "accepted_tcb_statuses", statuses)

    @property
    def accepts_every_tcb_status(self) -> bool:
        """True when no TCB status is refused (`["*"]`): then the policy need not pin `jwks`."""
        return set(self.accepted_tcb_statuses) >= set(ALL_TCB_STATUSES)

    @classmethod
    def for_mrenclave(cls, mrenclave_hex: str, *, root: str = "intel", **options: Any) -> ExpectedMeasurement:
        """A policy pinning one MRENCLAVE (e.g. from `--mrenclave HEX`)."""
        return cls(mrenclaves=(_hex32(mrenclave_hex, "mrenclave"),), root=root, **options)

    def root_public_key(self, data_dir: Path | None = None) -> ec.EllipticCurvePublicKey:
        """The pinned SGX root key ("dev" resolves against `data_dir`)."""
        dev = dev_root_path(data_dir) if data_dir is not None else None
        try:
            return resolve_root(self.root, dev)
        except RootError as exc:
            raise PolicyError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        """The policy file's object."""
        return {
            "mrenclave": [m.hex() for m in self.mrenclaves],
            "mrsigner": self.mrsigner.hex() if self.mrsigner is not None else None,
            "product_id": self.product_id,
            "min_svn": self.min_svn,
            "allow_debug": self.allow_debug,
            "accepted_tcb_statuses": (
                [ANY_TCB_STATUS] if self.accepts_every_tcb_status else list(self.accepted_tcb_statuses)
            ),
            "root": self.root,
            "issuer": self.issuer,
            "jwks": dict(self.jwks) if self.jwks is not None else None,
            "keyvault_release_key": self.keyvault_release_key.hex() if self.keyvault_release_key else None,
        }

    @classmethod
    def from_json(cls, document: object) -> ExpectedMeasurement:
        """Parse a policy file's object (PolicyError with the reason)."""
        if not isinstance(document, Mapping):
            raise PolicyError("policy must be a JSON object")
        unknown = set(document) - {
            "mrenclave", "mrsigner", "product_id", "min_svn", "allow_debug",
            "accepted_tcb_statuses", "root", "issuer", "jwks", "keyvault_release_key",
        }  # fmt: skip
        if unknown:
            raise PolicyError(f"unknown policy keys: {', '.join(sorted(unknown))}")
        mrenclave = document.get("mrenclave") or []
        if isinstance(mrenclave, str):
            mrenclave = [mrenclave]
        if not isinstance(mrenclave, list):
            raise PolicyError("mrenclave must be a hex string or a list of them")
        mrsigner = document.get("mrsigner")
        statuses = document.get("accepted_tcb_statuses", list(DEFAULT_TCB_STATUSES))
        if not isinstance(statuses, list) or not all(isinstance(s, str) for s in statuses):
            raise PolicyError("accepted_tcb_statuses must be a list of strings")
        jwks = document.get("jwks")
        if jwks is not None and not isinstance(jwks, Mapping):
            raise PolicyError("jwks must be a JWKS object")
        return cls(
            mrenclaves=tuple(_hex32(m, "mrenclave") for m in mrenclave),
            mrsigner=_hex32(mrsigner, "mrsigner") if mrsigner is not None else None,
            product_id=_optional_int(document, "product_id"),
            min_svn=_optional_int(document, "min_svn"),
            allow_debug=_bool(document, "allow_debug"),
            accepted_tcb_statuses=tuple(statuses),
            root=str(document.get("root", "intel")),
            issuer=_optional_str(document, "issuer"),
            jwks=jwks,
            keyvault_release_key=(
                _hex32(document["keyvault_release_key"], "keyvault_release_key")
                if document.get("keyvault_release_key") is not None
                else None
            ),
        )


def _check_jwks(jwks: Mapping[str, Any]) -> None:
    """A pinned JWKS must name at least one key: an empty set would pin nothing checkable."""
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list) or not keys or not all(isinstance(key, Mapping) for key in keys):
        raise PolicyError('jwks must be a JWKS object with a non-empty "keys" list of JWKs')


def _optional_int(document: Mapping[str, Any], name: str) -> int | None:
    value = document.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{name} must be a non-negative integer")
    return value


def _optional_str(document: Mapping[str, Any], name: str) -> str | None:
    value = document.get(name)
    if value is not None and not isinstance(value, str):
        raise PolicyError(f"{name} must be a string")
    return value


def _bool(document: Mapping[str, Any], name: str) -> bool:
    value = document.get(name, False)
    if not isinstance(value, bool):
        raise PolicyError(f"{name} must be true or false")
    return value


@functools.cache
def policy_schema() -> dict[str, Any]:
    """The policy file's JSON Schema (draft 2020-12)."""
    text = resources.files("veil.sdk").joinpath(POLICY_SCHEMA).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = policy_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(error: ValidationError) -> str:
    """One refusal in the file's own terms: where, what, and the rule (the schema's description)."""
    where = "/".join(str(part) for part in error.absolute_path)
    if not where and error.validator == "anyOf":
        return "a policy must pin at least one MRENCLAVE or an MRSIGNER"
    if not where and error.validator == "type":
        return "the policy must be a JSON object"
    message = (
        f"{_short(error.instance)} is not valid" if error.validator in ("oneOf", "anyOf") else error.message
    )
    description = error.schema.get("description") if isinstance(error.schema, Mapping) else None
    if description and error.schema is not policy_schema():
        message += f": {description}"
    return f"{where}: {message}" if where else message


def check_policy_document(document: object, what: str = "policy") -> None:
    """Refuse a policy document the schema does not admit (PolicyError naming the field and rule)."""
    errors = list(_validator().iter_errors(document))
    if errors:
        # The most relevant error at the shallowest level: the field the author got wrong.
        first = min(errors, key=relevance)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise PolicyError(f"{what}: {_describe(first)}{more}")


def policy_from_document(document: object, what: str = "policy") -> ExpectedMeasurement:
    """A policy from its parsed JSON: the policy's own checks (whose messages name the rule),
    then the schema, which names the field and rule of anything those do not look at."""
    policy = ExpectedMeasurement.from_json(document)
    check_policy_document(document, what)
    return policy


def load_policy(path: Path) -> ExpectedMeasurement:
    """Read a policy file (strict JSON, schema-valid, then checked)."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"cannot read policy {path}: {exc.strerror or exc}") from None
    what = f"policy {path}"
    return policy_from_document(wire.strict_json_object(text, what, PolicyError), what)


def save_policy(policy: ExpectedMeasurement, path: Path) -> Path:
    """Write a policy file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(policy.to_json(), indent=2) + "\n")
    os.replace(temporary, path)
    return path
