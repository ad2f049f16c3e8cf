"""Every conformance vector through the Node.js client's own functions (clients/node/conformance.mjs).

The runner loads the client library (verifyBundle, openOutcome, the receipt and command byte
helpers, the policy schema and Policy) and reports a verdict per vector; here every vector must
be present and get its expected verdict, a refusal of the expected class (AttestationError,
IntegrityError, PolicyError). The runner runs as tests/client/node_support runs the client (its
node_modules from `make setup`; the tests fail, not skip, without it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.client.node_support import NODE_CLIENT, node_eval, run_node
from tests.conformance.vectors import FILES, VECTORS, by_id, vectors


@pytest.fixture(scope="module")
def node_results() -> dict[tuple[str, str], dict[str, Any]]:
    result = run_node(str(NODE_CLIENT / "conformance.mjs"), str(VECTORS), timeout=120)
    assert result.stdout, result.stderr
    document = json.loads(result.stdout)
    return {(row["file"], row["id"]): row for row in document["results"]}


@pytest.mark.parametrize("name", FILES)
def test_the_node_client_reaches_every_verdict(name: str, node_results: dict[tuple[str, str], Any]) -> None:
    wrong = []
    for vector in vectors(name):
        row = node_results.get((name, vector["id"]))
        assert row is not None, f"the Node runner skipped {name}:{vector['id']}"
        if row["got"] != vector["expect"]["verdict"]:
            wrong.append(
                f"{vector['id']}: expected {vector['expect']['verdict']}, got {row['got']} ({row['detail']})"
            )
    assert not wrong, "\n".join(wrong)


def test_only_the_optional_suite_is_left_to_the_python_sdk(node_results: dict[tuple[str, str], Any]) -> None:
    """The Node client seals with X25519 only: the X-Wing vector's HPKE step is the one it names
    as not run; every other step of that vector (signing bytes, signature, hash) it checks."""
    notes = {
        key: row["detail"]
        for key, row in node_results.items()
        if row["ok"] and row["expected"] == "valid" and row["detail"]
    }
    assert notes == {("commands.json", "command-xwing"): notes[("commands.json", "command-xwing")]}
    assert "X25519 suite only" in notes[("commands.json", "command-xwing")]


def test_the_node_client_loads_a_policy_file_through_the_schema(tmp_path: Path) -> None:
    bad = tmp_path / "policy.json"
    # Policy's own checks admit an empty root; the schema does not.
    bad.write_text(json.dumps({"mrenclave": ["ab" * 32], "accepted_tcb_statuses": ["*"], "root": ""}))
    twice = tmp_path / "twice.json"
    twice.write_text(by_id("policies.json", "policy-duplicate-key")["text"])
    good = tmp_path / "good.json"
    good.write_text(json.dumps(vectors("policies.json")[0]["document"]))
    answer = node_eval(
        f"const policy = veil.loadPolicy({json.dumps(str(good))});\n"
        f"let refused = null;\n"
        f"try {{ veil.loadPolicy({json.dumps(str(bad))}); }}\n"
        "catch (error) { refused = `${error.name}: ${error.message}`; }\n"
        f"let twice = null;\n"
        f"try {{ veil.loadPolicy({json.dumps(str(twice))}); }}\n"
        "catch (error) { twice = `${error.name}: ${error.message}`; }\n"
        "console.log(JSON.stringify({ jwksPinned: policy.jwks !== null, refused, twice }));\n"
    )
    assert answer["jwksPinned"] is True
    assert answer["refused"].startswith("PolicyError: policy refused: ")
    assert "root: must NOT have fewer than 1 characters: the pinned SGX root" in answer["refused"]
    assert 'duplicate key "mrenclave"' in answer["twice"]
