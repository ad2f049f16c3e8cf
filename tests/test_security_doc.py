"""docs/security.md names the test behind each row: every named test file and test must exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)(?:::([\w-]+)[^`]*)?`|`::([\w-]+)[^`]*`")


def _references() -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for row in (ROOT / "docs" / "security.md").read_text().splitlines():
        if not row.startswith("|"):
            continue
        current = None
        for match in _REFERENCE.finditer(row):
            current = match.group(1) or current
            if current is not None:
                found.append((current, match.group(2) or match.group(3)))
    return found


def test_every_test_the_security_table_names_exists() -> None:
    references = _references()
    assert len(references) > 100
    missing = []
    for path, name in references:
        file = ROOT / path
        if not file.is_file():
            missing.append(path)
        elif name and not re.search(
            rf"(def {re.escape(name)}\b|^{re.escape(name)}\b)", file.read_text(), re.M
        ):
            missing.append(f"{path}::{name}")  # a test function, or a module-level name
    assert not missing, f"docs/security.md names tests that do not exist: {sorted(set(missing))}"
