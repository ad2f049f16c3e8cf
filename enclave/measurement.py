"""MRENCLAVE of the simulated enclave: a hash of the enclave's own source code.

    SHA-256 over, for each file in sorted order of its path relative to the repository root
    (e.g. "enclave/runtime.py"; every enclave/**/*.py except tests and caches):
        u16(len(path)) || utf8(path) || u64(len(content)) || content      (big-endian)

Any change to the trusted code changes the measurement, as with SGX. Under Gramine the real
MRENCLAVE comes from the platform instead (GramineQuoteProvider.mrenclave).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The measured files, sorted by their relative path."""
    files = [
        path
        for path in package_dir.rglob("*.py")
        if not any(part in ("tests", "__pycache__") for part in path.relative_to(package_dir).parts)
        and not path.name.startswith("test_")
    ]
    return sorted(files, key=lambda p: p.relative_to(package_dir.parent).as_posix())


def measure_source_tree(package_dir: Path = PACKAGE_DIR) -> bytes:
    """The sim MRENCLAVE of the enclave package at `package_dir`."""
    digest = hashlib.sha256()
    for path in source_files(package_dir):
        name = path.relative_to(package_dir.parent).as_posix().encode("utf-8")
        content = path.read_bytes()
        digest.update(len(name).to_bytes(2, "big") + name + len(content).to_bytes(8, "big") + content)
    return digest.digest()
