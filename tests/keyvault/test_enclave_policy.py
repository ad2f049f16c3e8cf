"""The operator enclave policy: it bounds every instance-key release and every commit-head advance.

The threat: the state identity creates ``instance.<id>`` keys, so a malicious state host can
write a loose release policy and have the key released to an enclave it controls (a debug
build, another measurement), then released again to the honest enclave. The operator policy
is checked on top of the key's own policy, so that first release never happens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from veil.dev.policies import DEV_ENCLAVE_POLICY_FILENAME, dev_enclave_policy_json, write_dev_enclave_policy
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sim_quote import DEV_MRSIGNER
from veil.services.common.config import ConfigError
from veil.services.keyvault.audit import AuditLog
from veil.services.keyvault.deps import Deps
from veil.services.keyvault.enclave_policy import (
    INSTANCE_KEY_PREFIX,
    EnclavePolicy,
    enclave_policy_json,
    is_instance_key,
    load_enclave_policy,
)
from veil.services.keyvault.errors import HeadRefusedError, ReleaseRefusedError
from veil.services.keyvault.heads import CommitHeads
from veil.services.keyvault.keys import KeyManager
from veil.services.keyvault.release_policy import parse_release_policy
from veil.services.keyvault.store import AuditRecord
from veil.services.keyvault.tokens import TokenIssuer

from .support import ADMIN, CALLER, ISSUER, FakeEnclave, policy_json

STATE = CALLER
INSTANCE_KEY = "instance.vault-7"
INSTANCE = "vault-7"

#: What a malicious state host would write: any SVN, and debug builds explicitly welcome.
LOOSE_POLICY = policy_json(
    {"claim": "x-ms-sgx-svn", "greaterOrEquals": 0},
    {"claim": "x-ms-sgx-is-debuggable", "equals": True},
    mode="anyOf",
    accepted_tcb=["UpToDate", "SWHardeningNeeded", "Unevaluated"],
)


def refusals(audit: AuditLog, action: str) -> list[dict[str, object]]:
    events: tuple[AuditRecord, ...] = audit.list_events(page_size=1000).events
    return [json.loads(e.detail_json) for e in events if (e.action, e.outcome) == (action, "refused")]


def head_hash(sequence: int) -> bytes:
    return hashlib.sha256(sequence.to_bytes(8, "big")).digest()


def advance(heads: CommitHeads, issuer: TokenIssuer, enclave: FakeEnclave, sequence: int) -> int:
    base = (sequence - 1, head_hash(sequence - 1) if sequence > 1 else bytes(32))
    link = enclave.link(INSTANCE, base, (sequence, head_hash(sequence)))
    token = enclave.token(issuer).token
    return heads.advance(INSTANCE, [link], token, caller=STATE)[0].sequence


@pytest.fixture
def unguarded_deps(deps: Deps) -> Deps:
    """The collaborators of a dev keyvault started without VEIL_KEYVAULT_ENCLAVE_POLICY_FILE."""
    return replace(deps, enclave_policy=EnclavePolicy.not_configured())


@pytest.fixture
def unguarded_keys(unguarded_deps: Deps) -> KeyManager:
    return KeyManager(unguarded_deps)


# --- releases of instance keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "outsider",
    [
        pytest.param(FakeEnclave(debug=True), id="debug-build-of-the-trusted-enclave"),
        pytest.param(FakeEnclave(mrenclave=b"\x66" * 32), id="other-mrenclave"),
        pytest.param(FakeEnclave(mrsigner=b"\x77" * 32), id="other-mrsigner"),
        pytest.param(FakeEnclave(svn=0), id="svn-below-the-minimum"),
    ],
)
def test_a_loose_instance_key_policy_does_not_release_outside_the_operator_policy(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog, enclave: FakeEnclave, outsider: FakeEnclave
) -> None:
    # The state identity may create the key, with whatever policy it likes.
    keys.create(INSTANCE_KEY, LOOSE_POLICY, caller=STATE)
    with pytest.raises(ReleaseRefusedError, match="outside the operator enclave policy") as caught:
        keys.release(outsider.token(issuer).token, INSTANCE_KEY, caller=STATE)
    assert caught.value.reason == "ENCLAVE_NOT_ALLOWED"
    (refused,) = refusals(audit, "release")
    assert refused["reason"] == "ENCLAVE_NOT_ALLOWED"
    assert refused["key"] == INSTANCE_KEY
    assert refused["mrenclave"] == outsider.mrenclave.hex()
    assert refused["debuggable"] is outsider.debug
    assert refused["enclave_policy_checked"] is True
    # The honest enclave still gets the key.
    assert len(enclave.open(keys.release(enclave.token(issuer).token, INSTANCE_KEY, caller=STATE))) == 32


def test_both_policies_must_allow_an_instance_key_release(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog, enclave: FakeEnclave
) -> None:
    # Inside the operator policy, but the key's own policy names another build: still refused.
    other = FakeEnclave(mrenclave=b"\x55" * 32)
    own = policy_json({"claim": "x-ms-sgx-mrenclave", "equals": other.mrenclave.hex()})
    keys.create(INSTANCE_KEY, own, caller=STATE)
    with pytest.raises(ReleaseRefusedError) as caught:
        keys.release(enclave.token(issuer).token, INSTANCE_KEY, caller=STATE)
    assert caught.value.reason == "RELEASE_POLICY_NOT_SATISFIED"
    with pytest.raises(ReleaseRefusedError) as outside:
        keys.release(other.token(issuer).token, INSTANCE_KEY, caller=STATE)
    assert outside.value.reason == "ENCLAVE_NOT_ALLOWED"
    assert [r["reason"] for r in refusals(audit, "release")] == [
        "RELEASE_POLICY_NOT_SATISFIED",
        "ENCLAVE_NOT_ALLOWED",
    ]


def test_keys_not_named_instance_keep_their_own_policy_only(
    keys: KeyManager, issuer: TokenIssuer, audit: AuditLog
) -> None:
    # An admin key whose policy trusts builds the operator policy does not: released to them.
    keys.create("orders", LOOSE_POLICY, caller=ADMIN)
    keys.create("instances-report", LOOSE_POLICY, caller=ADMIN)  # a prefix of the word, not "instance."
    for outsider in (FakeEnclave(debug=True), FakeEnclave(mrenclave=b"\x66" * 32)):
        for name in ("orders", "instances-report"):
            assert len(outsider.open(keys.release(outsider.token(issuer).token, name, caller=CALLER))) == 32
    assert refusals(audit, "release") == []
    allowed = [json.loads(e.detail_json) for e in audit.list_events(page_size=1000).events]
    assert not any("enclave_policy_checked" in facts for facts in allowed)


def test_an_unconfigured_operator_policy_refuses_instance_keys_with_a_clear_reason(
    unguarded_keys: KeyManager, issuer: TokenIssuer, audit: AuditLog, enclave: FakeEnclave
) -> None:
    unguarded_keys.create(INSTANCE_KEY, LOOSE_POLICY, caller=STATE)  # creating stays allowed
    with pytest.raises(ReleaseRefusedError, match="VEIL_KEYVAULT_ENCLAVE_POLICY_FILE") as caught:
        unguarded_keys.release(enclave.token(issuer).token, INSTANCE_KEY, caller=STATE)
    assert caught.value.reason == "ENCLAVE_POLICY_NOT_CONFIGURED"
    (refused,) = refusals(audit, "release")
    assert refused["reason"] == "ENCLAVE_POLICY_NOT_CONFIGURED"
    assert "VEIL_KEYVAULT_ENCLAVE_POLICY_FILE" in str(refused["message"])
    # Other keys are unaffected.
    unguarded_keys.create("orders", LOOSE_POLICY, caller=ADMIN)
    assert (
        len(enclave.open(unguarded_keys.release(enclave.token(issuer).token, "orders", caller=ADMIN))) == 32
    )


# --- commit heads ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "outsider",
    [
        pytest.param(FakeEnclave(debug=True), id="debug"),
        pytest.param(FakeEnclave(mrenclave=b"\x66" * 32), id="other-mrenclave"),
        pytest.param(FakeEnclave(tcb_status="OutOfDate"), id="unaccepted-tcb"),
    ],
)
def test_only_enclaves_in_the_operator_policy_advance_heads(
    heads: CommitHeads, issuer: TokenIssuer, audit: AuditLog, enclave: FakeEnclave, outsider: FakeEnclave
) -> None:
    assert advance(heads, issuer, enclave, 1) == 1
    with pytest.raises(HeadRefusedError, match="outside the operator enclave policy") as caught:
        advance(heads, issuer, outsider, 2)
    assert caught.value.reason == "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED"
    (refused,) = refusals(audit, "advance_commit_head")
    assert (refused["reason"], refused["mrenclave"], refused["sequence"]) == (
        "COMMIT_HEAD_ENCLAVE_NOT_ALLOWED",
        outsider.mrenclave.hex(),
        2,
    )
    stored = heads.get(INSTANCE)
    assert stored is not None
    assert stored.sequence == 1
    assert advance(heads, issuer, enclave, 2) == 2


def test_an_unconfigured_operator_policy_refuses_every_head_advance(
    unguarded_deps: Deps, audit: AuditLog, issuer: TokenIssuer
) -> None:
    unguarded = CommitHeads(unguarded_deps)
    with pytest.raises(HeadRefusedError, match="VEIL_KEYVAULT_ENCLAVE_POLICY_FILE") as caught:
        advance(unguarded, issuer, FakeEnclave(), 1)
    assert caught.value.reason == "ENCLAVE_POLICY_NOT_CONFIGURED"
    assert [r["reason"] for r in refusals(audit, "advance_commit_head")] == ["ENCLAVE_POLICY_NOT_CONFIGURED"]
    assert unguarded.get(INSTANCE) is None


# --- the policy document ----------------------------------------------------------------------------


def sim_claims(mrenclave: bytes, *, mrsigner: bytes = DEV_MRSIGNER, debug: bool = False) -> dict[str, object]:
    """The claims of a token for a sim quote (no collateral: TCB status "Unevaluated")."""
    return {
        "iss": "spiffe://veil/keyvault",
        "x-ms-sgx-mrenclave": mrenclave.hex(),
        "x-ms-sgx-mrsigner": mrsigner.hex(),
        "x-ms-sgx-product-id": 1,
        "x-ms-sgx-svn": 1,
        "x-ms-sgx-is-debuggable": debug,
        "x-ms-sgx-tcb-status": "Unevaluated",
    }


def test_the_dev_policy_trusts_exactly_the_sim_enclave_of_this_checkout(tmp_path: Path) -> None:
    path = write_dev_enclave_policy(tmp_path)
    assert path == tmp_path / DEV_ENCLAVE_POLICY_FILENAME
    policy = load_enclave_policy(path, issuer="spiffe://veil/keyvault")
    mrenclave = measure_source_tree()
    assert policy.refusal(sim_claims(mrenclave)) is None
    for claims in (
        sim_claims(mrenclave, debug=True),
        sim_claims(b"\x01" * 32),
        sim_claims(mrenclave, mrsigner=b"\x02" * 32),
        {**sim_claims(mrenclave), "iss": "https://elsewhere"},
        {**sim_claims(mrenclave), "x-ms-sgx-svn": 0},
        {**sim_claims(mrenclave), "x-ms-sgx-product-id": 2},
    ):
        refusal = policy.refusal(claims)
        assert refusal is not None
        assert refusal.reason == "ENCLAVE_NOT_ALLOWED"
    assert path.read_text() == dev_enclave_policy_json(mrenclave, DEV_MRSIGNER)


def test_policy_builder_covers_mrsigner_and_mrenclave_lists() -> None:
    first, second = b"\x0a" * 32, b"\x0b" * 32
    by_list = EnclavePolicy(
        parse_release_policy(enclave_policy_json(issuer=ISSUER, mrenclaves=(first, second)))
    )
    claims = {"iss": ISSUER, "x-ms-sgx-is-debuggable": False, "x-ms-sgx-tcb-status": "UpToDate"}
    for mrenclave in (first, second):
        assert by_list.refusal({**claims, "x-ms-sgx-mrenclave": mrenclave.hex()}) is None
    assert by_list.refusal({**claims, "x-ms-sgx-mrenclave": (b"\x0c" * 32).hex()}) is not None
    by_signer = EnclavePolicy(
        parse_release_policy(enclave_policy_json(issuer=ISSUER, mrsigner=second, product_id=3, min_svn=4))
    )
    signed = {**claims, "x-ms-sgx-mrsigner": second.hex(), "x-ms-sgx-product-id": 3}
    assert by_signer.refusal({**signed, "x-ms-sgx-svn": 4}) is None
    assert by_signer.refusal({**signed, "x-ms-sgx-svn": 3}) is not None
    assert by_signer.refusal({**signed, "x-ms-sgx-svn": 4, "x-ms-sgx-is-debuggable": True}) is not None
    with pytest.raises(ValueError, match="MRENCLAVEs or an MRSIGNER"):
        enclave_policy_json(issuer=ISSUER)
    with pytest.raises(ValueError, match="32 bytes"):
        enclave_policy_json(issuer=ISSUER, mrsigner=b"short")


def test_instance_keys_are_recognised_by_their_prefix() -> None:
    assert INSTANCE_KEY_PREFIX == "instance."
    assert is_instance_key("instance.vault-7")
    for name in ("orders", "instances.x", "instance", "my.instance.x"):
        assert not is_instance_key(name)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot be read"),
        ("{not json", "not a valid release policy"),
        (
            '{"version":"1.0.0","anyOf":[{"authority":"spiffe://veil/keyvault","allOf":'
            '[{"claim":"x-ms-sgx-mrsigner","equals":"EDIT: your MRSIGNER"}]}]}',
            "64 hex digits",
        ),
        (
            '{"version":"1.0.0","anyOf":[{"authority":"https://elsewhere","allOf":'
            '[{"claim":"x-ms-sgx-svn","greaterOrEquals":1}]}]}',
            "no rule for this keyvault's token issuer",
        ),
    ],
)
def test_a_broken_policy_file_is_a_configuration_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "enclave-policy.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match="VEIL_KEYVAULT_ENCLAVE_POLICY_FILE") as caught:
        load_enclave_policy(path, issuer="spiffe://veil/keyvault")
    assert message in str(caught.value)
