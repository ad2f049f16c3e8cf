"""The conformance vectors (testdata/conformance/) and the spec's refusal checklist, as tests read them."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT

VECTORS = REPO_ROOT / "testdata" / "conformance"
SPEC = REPO_ROOT / "docs" / "protocol.md"
CHECKLIST_HEADING = "## 11. What a client must refuse"
FILES = ("attestation.json", "answers.json", "receipts.json", "commands.json", "policies.json")


@cache
def vectors(name: str) -> tuple[dict[str, Any], ...]:
    """The vectors of one file, in order."""
    document = json.loads((VECTORS / name).read_text())
    assert document["format"] == "veil-conformance/v1"
    return tuple(document["vectors"])


def ids(name: str) -> list[str]:
    return [vector["id"] for vector in vectors(name)]


def by_id(name: str, vector_id: str) -> dict[str, Any]:
    (vector,) = (v for v in vectors(name) if v["id"] == vector_id)
    return vector


def checklist(spec: Path = SPEC) -> set[str]:
    """The refusal ids of the spec's checklist: the first cell of each table row, in backticks."""
    text = spec.read_text()
    start = text.index(CHECKLIST_HEADING)
    end = text.find("\n## ", start + len(CHECKLIST_HEADING))
    section = text[start : end if end >= 0 else len(text)]
    return set(re.findall(r"^\| `([a-z0-9-]+)` \|", section, flags=re.MULTILINE))


def refusals() -> dict[str, set[str]]:
    """Every refusal id the vectors name, with the vectors that name it."""
    named: dict[str, set[str]] = {}
    for name in FILES:
        for vector in vectors(name):
            if vector["expect"]["verdict"] == "refused":
                named.setdefault(vector["expect"]["refusal"], set()).add(f"{name}:{vector['id']}")
    return named
