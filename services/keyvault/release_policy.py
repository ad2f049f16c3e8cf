"""Key release policies in the Azure Key Vault secure-key-release (SKR) grammar, evaluated strictly.

Grammar (SKR policy version ``1.0.0``; JSON, keys case-sensitive)::

    policy    = {"version": "1.0.0", "anyOf": [authority, ...],
                 ["x-veil-accepted-tcb-statuses": [status, ...]]}
    authority = {"authority": "<token issuer>", "allOf" | "anyOf": [condition, ...]}
    condition = claim | group
    group     = {"allOf" | "anyOf": [condition, ...]}
    claim     = {"claim": "<name>", "<operator>": <value>}
    operator  = equals | notEquals | less | lessOrEquals | greater | greaterOrEquals | exists

Semantics, as in Azure: a policy allows a release when some ``authority`` rule whose
issuer equals the token's ``iss`` is satisfied. Claim names use dot notation to reach
into JSON objects (``x-ms-sgx-collateral.quotehash``); arrays are not addressable. A
claim that is missing (or null, or of another type than the policy's value) fails its
condition, for every operator except ``{"exists": false}``, which holds exactly when the
claim is missing. Comparisons are type-strict (``true`` never equals ``1``); the ordering
operators compare numbers only; ``exists`` takes ``true`` or ``false``.

Parsing is strict and fails with a :class:`~veil.services.keyvault.errors.ReleasePolicyError` naming
the offending place: unknown keys or operators, a node with two operators or both
``allOf`` and ``anyOf``, empty condition lists, duplicate JSON keys, NaN/Infinity, values
of the wrong type for well-known claims (MRENCLAVE/MRSIGNER must be 32-byte hex and are
normalised to lower case; product id and SVN are integers; ``x-ms-sgx-is-debuggable`` is a
boolean; TCB statuses must be known Intel names), and policies beyond fixed size, depth
and condition-count limits.

Veil's stricter default (the *gates*). Azure would release to any token satisfying the
conditions; Veil additionally refuses:

* a **debuggable enclave** (``x-ms-sgx-is-debuggable`` not exactly ``false``), unless a
  satisfying path through the policy contains the explicit condition
  ``{"claim": "x-ms-sgx-is-debuggable", "equals": true}``;
* a **TCB status** (``x-ms-sgx-tcb-status``) outside the accepted list, unless a satisfying
  path pins that very status with ``{"claim": "x-ms-sgx-tcb-status", "equals": "<status>"}``.
  The accepted list is ``["UpToDate", "SWHardeningNeeded"]`` unless the policy replaces it
  with the Veil extension field ``"x-veil-accepted-tcb-statuses": [...]``. A token whose
  quote was verified without collateral carries the status ``"Unevaluated"``, which is
  therefore refused unless accepted the same way (development policies do this).
  ``"Revoked"`` is never accepted and cannot be written into a policy.

"Satisfying path" is exact: an ``anyOf`` lends its permission only through the branch that
is actually satisfied, so in ``anyOf[{mrenclave A}, {debuggable true, mrenclave B}]`` a
debug build of A is refused while a debug build of B is released. Evaluation never raises:
anything unexpected in the claims yields a refusal (fail closed).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from operator import ge, gt, le, lt
from typing import Literal

from veil.enclave import wire
from veil.services.keyvault.errors import ReleasePolicyError

POLICY_VERSION = "1.0.0"
#: The Veil extension field that replaces the default accepted TCB statuses.
ACCEPTED_TCB_FIELD = "x-veil-accepted-tcb-statuses"
DEFAULT_ACCEPTED_TCB_STATUSES: tuple[str, ...] = ("UpToDate", "SWHardeningNeeded")

CLAIM_ISSUER = "iss"
CLAIM_DEBUGGABLE = "x-ms-sgx-is-debuggable"
CLAIM_TCB_STATUS = "x-ms-sgx-tcb-status"
CLAIM_MRENCLAVE = "x-ms-sgx-mrenclave"
CLAIM_MRSIGNER = "x-ms-sgx-mrsigner"
CLAIM_PRODUCT_ID = "x-ms-sgx-product-id"
CLAIM_SVN = "x-ms-sgx-svn"

#: The status a token carries when its quote was verified without TCB collateral.
TCB_UNEVALUATED = "Unevaluated"
TCB_REVOKED = "Revoked"
#: Intel's TCB statuses (TCB info v3) plus Veil's "Unevaluated".
KNOWN_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
        TCB_REVOKED,
        TCB_UNEVALUATED,
    }
)

# Limits: a policy is configuration, not data; anything bigger is a mistake or an attack.
MAX_POLICY_BYTES = 64 * 1024
MAX_DEPTH = 8
MAX_CONDITIONS = 256
MAX_CLAIM_NAME = 256

_HEX_CLAIMS = {CLAIM_MRENCLAVE: 64, CLAIM_MRSIGNER: 64, "x-ms-sgx-report-data": 128}
_INT_CLAIMS = {CLAIM_PRODUCT_ID, CLAIM_SVN}
# \Z, not $: "$" also matches before a final "\n".
_CLAIM_NAME_RE = re.compile(r"^[A-Za-z0-9_$-]+(\.[A-Za-z0-9_$-]+)*\Z")
_HEX_RE = re.compile(r"^[0-9a-fA-F]*\Z")

# The gated claims a satisfying path can pin (explicitly allow).
_PIN_DEBUG = "debug"
_PIN_TCB = "tcb"


class Operator(StrEnum):
    """Claim comparison operators of the SKR grammar."""

    EQUALS = "equals"
    NOT_EQUALS = "notEquals"
    LESS = "less"
    LESS_OR_EQUALS = "lessOrEquals"
    GREATER = "greater"
    GREATER_OR_EQUALS = "greaterOrEquals"
    EXISTS = "exists"


_ORDERING = {Operator.LESS, Operator.LESS_OR_EQUALS, Operator.GREATER, Operator.GREATER_OR_EQUALS}
_GROUP_KEYS = ("allOf", "anyOf")

Scalar = str | int | float | bool
GroupMode = Literal["allOf", "anyOf"]


@dataclass(frozen=True)
class ClaimCondition:
    """One ``{"claim": name, operator: value}`` test."""

    claim: str
    operator: Operator
    value: Scalar

    @property
    def pins(self) -> frozenset[str]:
        """The gates this condition explicitly opens when it holds."""
        if self.operator is not Operator.EQUALS:
            return frozenset()
        if self.claim == CLAIM_DEBUGGABLE and self.value is True:
            return frozenset({_PIN_DEBUG})
        if self.claim == CLAIM_TCB_STATUS:
            return frozenset({_PIN_TCB})
        return frozenset()


@dataclass(frozen=True)
class ConditionGroup:
    """``allOf`` (every condition) or ``anyOf`` (at least one) over nested conditions."""

    mode: GroupMode
    conditions: tuple[Condition, ...]


Condition = ClaimCondition | ConditionGroup


@dataclass(frozen=True)
class AuthorityRule:
    """The conditions that apply to tokens from one issuer."""

    authority: str
    group: ConditionGroup


@dataclass(frozen=True)
class Decision:
    """The outcome of evaluating a policy: allowed, or refused with a reason for the audit log."""

    allowed: bool
    reason: str


@dataclass(frozen=True)
class ReleasePolicy:
    """A parsed, validated release policy. Build with :func:`parse_release_policy`."""

    rules: tuple[AuthorityRule, ...]
    accepted_tcb_statuses: tuple[str, ...] | None = None

    @property
    def effective_tcb_statuses(self) -> frozenset[str]:
        """The TCB statuses accepted without an explicit pin."""
        statuses = self.accepted_tcb_statuses
        return frozenset(DEFAULT_ACCEPTED_TCB_STATUSES if statuses is None else statuses)

    def evaluate(self, claims: Mapping[str, object]) -> Decision:
        """Decide whether a verified token's claims allow a release. Never raises."""
        try:
            return self._evaluate(claims)
        except Exception:  # fail closed on anything unforeseen
            return Decision(False, "policy evaluation failed")

    def _evaluate(self, claims: Mapping[str, object]) -> Decision:
        issuer = claims.get(CLAIM_ISSUER)
        if not isinstance(issuer, str):
            return Decision(False, "token has no issuer")
        rules = [rule for rule in self.rules if rule.authority == issuer]
        if not rules:
            return Decision(False, f"no policy rule for issuer {issuer!r}")
        paths: set[frozenset[str]] = set()
        for rule in rules:
            paths |= _satisfying_pins(rule.group, claims)
        if not paths:
            return Decision(False, "claims do not satisfy the release policy")
        return self._gates(claims, paths)

    def _gates(self, claims: Mapping[str, object], paths: set[frozenset[str]]) -> Decision:
        """Veil's default refusals, lifted only by a pin on a satisfying path."""
        needed: set[str] = set()
        if _lookup(claims, CLAIM_DEBUGGABLE) is not False:
            needed.add(_PIN_DEBUG)
        status = _lookup(claims, CLAIM_TCB_STATUS)
        if status == TCB_REVOKED:
            return Decision(False, "TCB status 'Revoked' is never accepted")
        if not (isinstance(status, str) and status in self.effective_tcb_statuses):
            needed.add(_PIN_TCB)
        if any(needed <= pins for pins in paths):
            return Decision(True, "release policy satisfied")
        if _PIN_DEBUG in needed and not any(_PIN_DEBUG in pins for pins in paths):
            return Decision(
                False,
                "debuggable enclave: the policy does not require x-ms-sgx-is-debuggable equals true",
            )
        shown = status if isinstance(status, str) else None
        return Decision(False, f"TCB status {shown!r} is not accepted by the policy")

    def to_json(self) -> str:
        """The policy's normalised JSON (what is stored and shown in key metadata)."""
        doc: dict[str, object] = {
            "version": POLICY_VERSION,
            "anyOf": [_rule_to_json(rule) for rule in self.rules],
        }
        if self.accepted_tcb_statuses is not None:
            doc[ACCEPTED_TCB_FIELD] = list(self.accepted_tcb_statuses)
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=True)


# --- parsing -------------------------------------------------------------------------------


def parse_release_policy(text: str | bytes) -> ReleasePolicy:
    """Parse and validate a policy document; raise :class:`ReleasePolicyError` on any deviation."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) > MAX_POLICY_BYTES:
        raise ReleasePolicyError(f"policy is larger than {MAX_POLICY_BYTES} bytes")
    return _Parser().policy(wire.strict_json_object(raw, "policy", ReleasePolicyError))


class _Parser:
    """Recursive-descent validation with a running condition count."""

    def __init__(self) -> None:
        self.count = 0

    def policy(self, doc: object) -> ReleasePolicy:
        obj = _object(doc, "policy")
        if "allOf" in obj:
            raise ReleasePolicyError("policy: the top level takes 'anyOf' of authorities only")
        _only_keys(obj, {"version", "anyOf", ACCEPTED_TCB_FIELD}, "policy")
        if obj.get("version") != POLICY_VERSION:
            raise ReleasePolicyError(f"policy: 'version' must be {POLICY_VERSION!r}")
        rules = tuple(
            self.authority(item, f"anyOf[{i}]")
            for i, item in enumerate(_nonempty_list(obj.get("anyOf"), "policy.anyOf"))
        )
        accepted: tuple[str, ...] | None = None
        if ACCEPTED_TCB_FIELD in obj:
            accepted = _tcb_list(obj[ACCEPTED_TCB_FIELD])
        return ReleasePolicy(rules=rules, accepted_tcb_statuses=accepted)

    def authority(self, node: object, where: str) -> AuthorityRule:
        obj = _object(node, where)
        _only_keys(obj, {"authority", *_GROUP_KEYS}, where)
        issuer = obj.get("authority")
        if not isinstance(issuer, str) or not issuer:
            raise ReleasePolicyError(f"{where}: 'authority' must be a non-empty string (the token issuer)")
        return AuthorityRule(authority=issuer, group=self.group(obj, where, depth=1))

    def group(self, obj: Mapping[str, object], where: str, depth: int) -> ConditionGroup:
        modes = [key for key in _GROUP_KEYS if key in obj]
        if len(modes) != 1:
            raise ReleasePolicyError(f"{where}: needs exactly one of 'allOf' or 'anyOf'")
        mode: GroupMode = "allOf" if modes[0] == "allOf" else "anyOf"
        if depth > MAX_DEPTH:
            raise ReleasePolicyError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        items = _nonempty_list(obj[mode], f"{where}.{mode}")
        conditions = tuple(
            self.condition(item, f"{where}.{mode}[{i}]", depth) for i, item in enumerate(items)
        )
        return ConditionGroup(mode=mode, conditions=conditions)

    def condition(self, node: object, where: str, depth: int) -> Condition:
        obj = _object(node, where)
        if "claim" not in obj:
            _only_keys(obj, set(_GROUP_KEYS), where)
            return self.group(obj, where, depth + 1)
        self.count += 1
        if self.count > MAX_CONDITIONS:
            raise ReleasePolicyError(f"policy has more than {MAX_CONDITIONS} claim conditions")
        claim = obj["claim"]
        if not isinstance(claim, str) or len(claim) > MAX_CLAIM_NAME or not _CLAIM_NAME_RE.match(claim):
            raise ReleasePolicyError(f"{where}: 'claim' must be a dotted claim name")
        operators = [key for key in obj if key != "claim"]
        if len(operators) != 1:
            raise ReleasePolicyError(f"{where}: a claim condition needs exactly one operator")
        try:
            operator = Operator(operators[0])
        except ValueError:
            known = ", ".join(op.value for op in Operator)
            raise ReleasePolicyError(f"{where}: unknown operator {operators[0]!r} (known: {known})") from None
        value = _check_value(claim, operator, obj[operators[0]], where)
        return ClaimCondition(claim=claim, operator=operator, value=value)


def _object(node: object, where: str) -> Mapping[str, object]:
    if not isinstance(node, dict):
        raise ReleasePolicyError(f"{where}: expected a JSON object")
    return node


def _only_keys(obj: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ReleasePolicyError(f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown)}")


def _nonempty_list(node: object, where: str) -> list[object]:
    if not isinstance(node, list) or not node:
        raise ReleasePolicyError(f"{where}: expected a non-empty list")
    return node


def _tcb_list(node: object) -> tuple[str, ...]:
    items = _nonempty_list(node, ACCEPTED_TCB_FIELD)
    statuses: list[str] = []
    for item in items:
        status = _tcb_status(item, ACCEPTED_TCB_FIELD)
        if status not in statuses:
            statuses.append(status)
    return tuple(statuses)


def _tcb_status(value: object, where: str) -> str:
    if not isinstance(value, str) or value not in KNOWN_TCB_STATUSES:
        known = ", ".join(sorted(KNOWN_TCB_STATUSES))
        raise ReleasePolicyError(f"{where}: unknown TCB status {value!r} (known: {known})")
    if value == TCB_REVOKED:
        raise ReleasePolicyError(f"{where}: TCB status 'Revoked' can never be accepted")
    return value


def _check_value(claim: str, operator: Operator, value: object, where: str) -> Scalar:
    if operator is Operator.EXISTS:
        if not isinstance(value, bool):
            raise ReleasePolicyError(f"{where}: 'exists' takes true or false")
        return value
    if value is None or isinstance(value, (list, dict)):
        raise ReleasePolicyError(f"{where}: the value must be a string, number or boolean")
    assert isinstance(value, (str, int, float, bool))  # JSON leaves nothing else
    if operator in _ORDERING and _number(value) is None:
        raise ReleasePolicyError(f"{where}: {operator.value!r} compares finite numbers only")
    if claim in _HEX_CLAIMS:
        return _check_hex(claim, operator, value, where)
    if claim in _INT_CLAIMS and (
        isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF
    ):
        raise ReleasePolicyError(f"{where}: {claim} must be an integer in 0..65535")
    if claim == CLAIM_DEBUGGABLE and (operator in _ORDERING or not isinstance(value, bool)):
        raise ReleasePolicyError(f"{where}: {claim} is compared with equals/notEquals to true or false")
    if claim == CLAIM_TCB_STATUS:
        return _check_tcb_condition(operator, value, where)
    if isinstance(value, float) and not math.isfinite(value):
        raise ReleasePolicyError(f"{where}: numbers must be finite")
    return value


def _check_hex(claim: str, operator: Operator, value: Scalar, where: str) -> str:
    length = _HEX_CLAIMS[claim]
    if operator in _ORDERING or not isinstance(value, str):
        raise ReleasePolicyError(f"{where}: {claim} is compared with equals/notEquals to a hex string")
    if len(value) != length or not _HEX_RE.match(value):
        raise ReleasePolicyError(f"{where}: {claim} must be {length} hex digits")
    return value.lower()


def _check_tcb_condition(operator: Operator, value: Scalar, where: str) -> str:
    if operator in _ORDERING:
        raise ReleasePolicyError(f"{where}: {CLAIM_TCB_STATUS} is compared with equals/notEquals")
    if operator is Operator.EQUALS:
        # equals pins (explicitly accepts) a status, so 'Revoked' is refused here.
        return _tcb_status(value, where)
    if not isinstance(value, str) or value not in KNOWN_TCB_STATUSES:
        raise ReleasePolicyError(f"{where}: unknown TCB status {value!r}")
    return value


# --- evaluation ------------------------------------------------------------------------------

_MISSING = object()
_COMPARE: dict[Operator, Callable[[float, float], bool]] = {
    Operator.LESS: lt,
    Operator.LESS_OR_EQUALS: le,
    Operator.GREATER: gt,
    Operator.GREATER_OR_EQUALS: ge,
}


def _lookup(claims: Mapping[str, object], name: str) -> object:
    """Resolve a dotted claim name through nested objects; ``_MISSING`` if absent or null."""
    node: object = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return _MISSING if node is None else node


def _number(value: object) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _same_type_equal(actual: object, expected: Scalar) -> bool | None:
    """Type-strict equality; None when the types are not comparable (fails the condition)."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        if isinstance(expected, bool) and isinstance(actual, bool):
            return actual is expected
        return None
    if isinstance(expected, str):
        return actual == expected if isinstance(actual, str) else None
    number = _number(actual)
    return None if number is None else number == expected


def _holds(cond: ClaimCondition, claims: Mapping[str, object]) -> bool:
    actual = _lookup(claims, cond.claim)
    if cond.operator is Operator.EXISTS:
        return (actual is not _MISSING) is cond.value
    if actual is _MISSING:
        return False
    if cond.claim in _HEX_CLAIMS and isinstance(actual, str):
        actual = actual.lower()
    if cond.operator in (Operator.EQUALS, Operator.NOT_EQUALS):
        equal = _same_type_equal(actual, cond.value)
        if equal is None:
            return False
        return equal if cond.operator is Operator.EQUALS else not equal
    left, right = _number(actual), _number(cond.value)
    if left is None or right is None:
        return False
    return _COMPARE[cond.operator](left, right)


def _satisfying_pins(node: Condition, claims: Mapping[str, object]) -> set[frozenset[str]]:
    """Every set of gates some satisfying derivation of ``node`` pins; empty if unsatisfied.

    With two gates there are at most four such sets, so combining children stays cheap.
    """
    if isinstance(node, ClaimCondition):
        return {node.pins} if _holds(node, claims) else set()
    children = [_satisfying_pins(child, claims) for child in node.conditions]
    if node.mode == "anyOf":
        return set().union(*children)
    combined: set[frozenset[str]] = {frozenset()}
    for child in children:
        # Fold pairwise so the set never exceeds the four subsets of the two gates.
        combined = {left | right for left in combined for right in child}
        if not combined:
            return set()
    return combined


# --- serialisation -----------------------------------------------------------------------------


def _condition_to_json(node: Condition) -> dict[str, object]:
    if isinstance(node, ClaimCondition):
        return {"claim": node.claim, node.operator.value: node.value}
    return {node.mode: [_condition_to_json(child) for child in node.conditions]}


def _rule_to_json(rule: AuthorityRule) -> dict[str, object]:
    return {"authority": rule.authority, **_condition_to_json(rule.group)}
