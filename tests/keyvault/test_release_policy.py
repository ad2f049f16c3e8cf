"""Release policy grammar: parsing strictness, every operator, nesting, and Veil's default gates."""

from __future__ import annotations

import json
from typing import Any

import pytest

from veil.services.keyvault.errors import ReleasePolicyError
from veil.services.keyvault.release_policy import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_POLICY_BYTES,
    ReleasePolicy,
    parse_release_policy,
)

from .support import ISSUER, MRENCLAVE, MRSIGNER, policy_json

MRE = MRENCLAVE.hex()


def claims(**overrides: Any) -> dict[str, Any]:
    """Token claims of a healthy production enclave."""
    base: dict[str, Any] = {
        "iss": ISSUER,
        "x-ms-sgx-mrenclave": MRE,
        "x-ms-sgx-mrsigner": MRSIGNER.hex(),
        "x-ms-sgx-product-id": 1,
        "x-ms-sgx-svn": 3,
        "x-ms-sgx-is-debuggable": False,
        "x-ms-sgx-tcb-status": "UpToDate",
        "x-ms-sgx-collateral": {"quotehash": "ab" * 32},
        "ratio": 1.5,
        "label": "blue",
    }
    for key, value in overrides.items():
        name = key.replace("_", "-")
        if value is _DROP:
            base.pop(name)
        else:
            base[name] = value
    return base


_DROP = object()


def one(condition: dict[str, Any], **kwargs: Any) -> ReleasePolicy:
    return parse_release_policy(policy_json(condition, **kwargs))


def allowed(policy: ReleasePolicy, token_claims: dict[str, Any]) -> bool:
    return policy.evaluate(token_claims).allowed


# --- operators ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"claim": "x-ms-sgx-svn", "equals": 3}, True),
        ({"claim": "x-ms-sgx-svn", "equals": 4}, False),
        ({"claim": "x-ms-sgx-svn", "notEquals": 4}, True),
        ({"claim": "x-ms-sgx-svn", "notEquals": 3}, False),
        ({"claim": "x-ms-sgx-svn", "less": 4}, True),
        ({"claim": "x-ms-sgx-svn", "less": 3}, False),
        ({"claim": "x-ms-sgx-svn", "lessOrEquals": 3}, True),
        ({"claim": "x-ms-sgx-svn", "lessOrEquals": 2}, False),
        ({"claim": "x-ms-sgx-svn", "greater": 2}, True),
        ({"claim": "x-ms-sgx-svn", "greater": 3}, False),
        ({"claim": "x-ms-sgx-svn", "greaterOrEquals": 3}, True),
        ({"claim": "x-ms-sgx-svn", "greaterOrEquals": 4}, False),
        ({"claim": "x-ms-sgx-mrenclave", "exists": True}, True),
        ({"claim": "x-ms-sgx-config-id", "exists": True}, False),
        ({"claim": "x-ms-sgx-config-id", "exists": False}, True),
        ({"claim": "x-ms-sgx-mrenclave", "exists": False}, False),
        ({"claim": "ratio", "greater": 1.25}, True),
        ({"claim": "ratio", "lessOrEquals": 1}, False),
        ({"claim": "label", "equals": "blue"}, True),
        ({"claim": "label", "equals": "Blue"}, False),
        ({"claim": "label", "notEquals": "red"}, True),
        ({"claim": "x-ms-sgx-collateral.quotehash", "equals": "ab" * 32}, True),
        ({"claim": "x-ms-sgx-mrenclave", "equals": MRE.upper()}, True),
    ],
)
def test_operator(condition: dict[str, Any], expected: bool) -> None:
    assert allowed(one(condition), claims()) is expected


@pytest.mark.parametrize(
    "condition",
    [
        {"claim": "x-ms-sgx-not-there", "equals": 1},
        {"claim": "x-ms-sgx-not-there", "notEquals": 1},
        {"claim": "x-ms-sgx-not-there", "less": 1},
        {"claim": "x-ms-sgx-not-there", "greaterOrEquals": 1},
        {"claim": "x-ms-sgx-collateral.missing", "equals": "x"},
        {"claim": "x-ms-sgx-svn.deeper", "exists": True},
    ],
)
def test_missing_claim_fails_the_condition(condition: dict[str, Any]) -> None:
    decision = one(condition).evaluate(claims())
    assert not decision.allowed
    assert decision.reason == "claims do not satisfy the release policy"


def test_comparisons_are_type_strict() -> None:
    # true is not 1, "3" is not 3, ordering needs numbers on both sides.
    assert not allowed(one({"claim": "flag", "equals": 1}), claims(flag=True))
    assert not allowed(one({"claim": "label", "equals": 3}), claims(label="3"))
    assert not allowed(one({"claim": "label", "notEquals": 3}), claims(label="3"))
    assert not allowed(one({"claim": "label", "greater": 1}), claims(label="3"))
    assert not allowed(one({"claim": "flag", "greater": 0}), claims(flag=True))
    assert not allowed(one({"claim": "ratio", "less": 2}), claims(ratio=float("nan")))


# --- nesting and authorities --------------------------------------------------------------------


def test_nested_groups() -> None:
    nested = {
        "anyOf": [
            {"claim": "x-ms-sgx-svn", "equals": 99},
            {"allOf": [{"claim": "label", "equals": "blue"}, {"anyOf": [{"claim": "ratio", "less": 2}]}]},
        ]
    }
    policy = one(nested)
    assert allowed(policy, claims())
    assert not allowed(policy, claims(label="red"))
    assert allowed(policy, claims(label="red", x_ms_sgx_svn=99))


def test_all_of_needs_every_condition_any_of_needs_one() -> None:
    conditions: list[dict[str, object]] = [
        {"claim": "label", "equals": "blue"},
        {"claim": "x-ms-sgx-svn", "equals": 99},
    ]
    assert not allowed(parse_release_policy(policy_json(*conditions, mode="allOf")), claims())
    assert allowed(parse_release_policy(policy_json(*conditions, mode="anyOf")), claims())


def test_issuer_must_match_an_authority() -> None:
    policy = one({"claim": "label", "equals": "blue"}, authority="https://other.example")
    decision = policy.evaluate(claims())
    assert not decision.allowed
    assert "no policy rule for issuer" in decision.reason
    assert not allowed(one({"claim": "label", "equals": "blue"}), claims(iss=_DROP))


def test_several_authorities() -> None:
    doc = {
        "version": "1.0.0",
        "anyOf": [
            {"authority": "https://other.example", "allOf": [{"claim": "label", "equals": "blue"}]},
            {"authority": ISSUER, "allOf": [{"claim": "label", "equals": "red"}]},
        ],
    }
    policy = parse_release_policy(json.dumps(doc))
    assert allowed(policy, claims(label="red"))
    assert not allowed(policy, claims(label="blue"))  # blue is only accepted from the other issuer


# --- Veil's default gates -----------------------------------------------------------------------


def test_debug_enclave_refused_by_default() -> None:
    policy = one({"claim": "x-ms-sgx-mrenclave", "equals": MRE})
    decision = policy.evaluate(claims(x_ms_sgx_is_debuggable=True))
    assert not decision.allowed
    assert "debuggable" in decision.reason
    # A missing or malformed flag counts as debuggable (fail closed).
    assert not allowed(policy, claims(x_ms_sgx_is_debuggable=_DROP))
    assert not allowed(policy, claims(x_ms_sgx_is_debuggable="false"))


def test_debug_enclave_allowed_only_when_the_policy_requires_it() -> None:
    debug_ok = parse_release_policy(
        policy_json(
            {"claim": "x-ms-sgx-mrenclave", "equals": MRE},
            {"claim": "x-ms-sgx-is-debuggable", "equals": True},
        )
    )
    assert allowed(debug_ok, claims(x_ms_sgx_is_debuggable=True))
    assert not allowed(debug_ok, claims())  # and that policy then needs a debug build
    # notEquals false is not an explicit allowance.
    loose = parse_release_policy(
        policy_json(
            {"claim": "x-ms-sgx-mrenclave", "equals": MRE},
            {"claim": "x-ms-sgx-is-debuggable", "notEquals": False},
        )
    )
    assert not allowed(loose, claims(x_ms_sgx_is_debuggable=True))


def test_debug_allowance_does_not_leak_across_any_of_branches() -> None:
    other = "33" * 32
    policy = parse_release_policy(
        policy_json(
            {"claim": "x-ms-sgx-mrenclave", "equals": MRE},
            {
                "allOf": [
                    {"claim": "x-ms-sgx-mrenclave", "equals": other},
                    {"claim": "x-ms-sgx-is-debuggable", "equals": True},
                ]
            },
            mode="anyOf",
        )
    )
    assert allowed(policy, claims())
    assert not allowed(policy, claims(x_ms_sgx_is_debuggable=True))  # debug build of the production MRENCLAVE
    assert allowed(policy, claims(x_ms_sgx_is_debuggable=True, x_ms_sgx_mrenclave=other))


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("UpToDate", True),
        ("SWHardeningNeeded", True),
        ("ConfigurationAndSWHardeningNeeded", False),
        ("OutOfDate", False),
        ("Unevaluated", False),
        ("Revoked", False),
        (_DROP, False),
        (7, False),
    ],
)
def test_tcb_status_default_list(status: object, expected: bool) -> None:
    policy = one({"claim": "x-ms-sgx-mrenclave", "equals": MRE})
    decision = policy.evaluate(claims(x_ms_sgx_tcb_status=status))
    assert decision.allowed is expected
    if not expected:
        assert "TCB status" in decision.reason


def test_tcb_status_list_replaced_by_the_policy() -> None:
    policy = one(
        {"claim": "x-ms-sgx-mrenclave", "equals": MRE},
        accepted_tcb=["UpToDate", "ConfigurationAndSWHardeningNeeded", "Unevaluated"],
    )
    assert allowed(policy, claims(x_ms_sgx_tcb_status="ConfigurationAndSWHardeningNeeded"))
    assert allowed(policy, claims(x_ms_sgx_tcb_status="Unevaluated"))
    assert not allowed(policy, claims(x_ms_sgx_tcb_status="SWHardeningNeeded"))  # no longer in the list
    assert not allowed(policy, claims(x_ms_sgx_tcb_status="Revoked"))


def test_tcb_status_pinned_by_an_equals_condition() -> None:
    policy = parse_release_policy(
        policy_json(
            {"claim": "x-ms-sgx-mrenclave", "equals": MRE},
            {"claim": "x-ms-sgx-tcb-status", "equals": "OutOfDate"},
        )
    )
    assert allowed(policy, claims(x_ms_sgx_tcb_status="OutOfDate"))
    assert not allowed(policy, claims())  # UpToDate does not satisfy equals OutOfDate


def test_evaluation_never_raises() -> None:
    policy = one({"claim": "x-ms-sgx-svn", "greater": 1})
    weird: dict[str, Any] = {"iss": ISSUER, "x-ms-sgx-svn": [1, 2], "x-ms-sgx-is-debuggable": {"a": 1}}
    assert not policy.evaluate(weird).allowed


# --- strict parsing -------------------------------------------------------------------------------


def base_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": "1.0.0",
        "anyOf": [{"authority": ISSUER, "allOf": [{"claim": "x-ms-sgx-svn", "equals": 1}]}],
    }
    doc.update(overrides)
    return doc


def condition_doc(condition: Any) -> str:
    return json.dumps(base_doc(anyOf=[{"authority": ISSUER, "allOf": [condition]}]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        (json.dumps(base_doc(version="2.0.0")), "'version' must be"),
        (json.dumps(base_doc(extra=1)), "unknown key(s) 'extra'"),
        (json.dumps(base_doc(anyOf=[])), "non-empty list"),
        (json.dumps({"version": "1.0.0", "allOf": []}), "top level takes 'anyOf'"),
        (
            json.dumps(base_doc(anyOf=[{"authority": "", "allOf": [{"claim": "a", "equals": 1}]}])),
            "authority",
        ),
        (json.dumps(base_doc(anyOf=[{"authority": ISSUER}])), "exactly one of 'allOf' or 'anyOf'"),
        (
            json.dumps(
                base_doc(anyOf=[{"authority": ISSUER, "allOf": [{"claim": "a", "equals": 1}], "anyOf": []}])
            ),
            "exactly one of",
        ),
        (condition_doc({"claim": "a", "matches": "x"}), "unknown operator 'matches'"),
        (condition_doc({"claim": "a", "equals": 1, "less": 2}), "exactly one operator"),
        (condition_doc({"claim": "a"}), "exactly one operator"),
        (condition_doc({"claim": "", "equals": 1}), "dotted claim name"),
        (condition_doc({"claim": "a..b", "equals": 1}), "dotted claim name"),
        (condition_doc({"claim": "a", "equals": None}), "string, number or boolean"),
        (condition_doc({"claim": "a", "equals": [1]}), "string, number or boolean"),
        (condition_doc({"claim": "a", "less": "9"}), "compares finite numbers only"),
        (condition_doc({"claim": "a", "greater": True}), "compares finite numbers only"),
        (condition_doc({"claim": "a", "exists": 1}), "'exists' takes true or false"),
        (condition_doc({"claim": "x-ms-sgx-mrenclave", "equals": "abcd"}), "64 hex digits"),
        (condition_doc({"claim": "x-ms-sgx-mrsigner", "equals": "zz" * 32}), "64 hex digits"),
        (condition_doc({"claim": "x-ms-sgx-mrenclave", "greater": 1}), "compared with equals/notEquals"),
        (condition_doc({"claim": "x-ms-sgx-svn", "equals": "3"}), "integer in 0..65535"),
        (condition_doc({"claim": "x-ms-sgx-product-id", "equals": 70000}), "integer in 0..65535"),
        (condition_doc({"claim": "x-ms-sgx-is-debuggable", "equals": 1}), "true or false"),
        (condition_doc({"claim": "x-ms-sgx-tcb-status", "equals": "Fine"}), "unknown TCB status"),
        (condition_doc({"claim": "x-ms-sgx-tcb-status", "equals": "Revoked"}), "never be accepted"),
        (condition_doc({"allOf": [{"claim": "a", "equals": 1}], "extra": 1}), "unknown key(s)"),
        (condition_doc({"allOf": []}), "non-empty list"),
        (condition_doc("a string"), "expected a JSON object"),
        (json.dumps(base_doc(**{"x-veil-accepted-tcb-statuses": ["Revoked"]})), "never be accepted"),
        (json.dumps(base_doc(**{"x-veil-accepted-tcb-statuses": ["Great"]})), "unknown TCB status"),
        (json.dumps(base_doc(**{"x-veil-accepted-tcb-statuses": []})), "non-empty list"),
        ('{"version": "1.0.0", "version": "1.0.0", "anyOf": []}', "duplicate key 'version'"),
        (condition_doc({"claim": "a", "equals": 1}).replace("1}]", "NaN}]"), "NaN is not allowed"),
    ],
)
def test_parse_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ReleasePolicyError) as caught:
        parse_release_policy(text)
    assert message in str(caught.value)
    assert caught.value.reason == "INVALID_POLICY"


def test_size_depth_and_count_limits() -> None:
    with pytest.raises(ReleasePolicyError, match="larger than"):
        parse_release_policy(" " * (MAX_POLICY_BYTES + 1))
    node: dict[str, Any] = {"claim": "a", "equals": 1}
    for _ in range(MAX_DEPTH + 1):
        node = {"allOf": [node]}
    with pytest.raises(ReleasePolicyError, match="nested deeper"):
        parse_release_policy(condition_doc(node))
    many = [{"claim": "a", "equals": i} for i in range(MAX_CONDITIONS + 1)]
    with pytest.raises(ReleasePolicyError, match="more than"):
        parse_release_policy(json.dumps(base_doc(anyOf=[{"authority": ISSUER, "anyOf": many}])))


def test_normalised_json_round_trips() -> None:
    text = policy_json(
        {"claim": "x-ms-sgx-mrenclave", "equals": MRE.upper()},
        {"anyOf": [{"claim": "x-ms-sgx-svn", "greaterOrEquals": 2}, {"claim": "label", "exists": True}]},
        accepted_tcb=["UpToDate"],
    )
    policy = parse_release_policy(text)
    normalised = policy.to_json()
    assert MRE in normalised  # hex lower-cased
    assert parse_release_policy(normalised) == policy
    assert parse_release_policy(normalised).to_json() == normalised
