"""RFC 6962 / RFC 9162 Merkle tree hash and inclusion proofs (SHA-256).

    leaf hash  = SHA-256(0x00 || leaf)
    node hash  = SHA-256(0x01 || left || right)
    MTH([])    = SHA-256(b"")
    MTH(D[n])  = node(MTH(D[:k]), MTH(D[k:])), k = the largest power of two < n

`levels` is what the ballot stores at close, so that `audit_path` answers each proof in
O(log n). `verify_inclusion` is what a voter runs on a BallotProofResult; it needs nothing from the
enclave but the proof and the root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE = 32


def leaf_hash(leaf: bytes) -> bytes:
    """The hash of one leaf."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def levels(leaves: Sequence[bytes]) -> list[bytes]:
    """The tree's levels, leaf hashes first and the root last, each its 32-byte nodes concatenated."""
    # Pairing bottom-up and moving an unpaired last node up unhashed builds exactly the RFC 6962
    # tree (its left subtrees are the complete ones), so a path is one node per level.
    level = [leaf_hash(leaf) for leaf in leaves]
    tree = [b"".join(level)]
    while len(level) > 1:
        level = [
            _node(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)
        ]
        tree.append(b"".join(level))
    return tree


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of `leaves`."""
    return levels(leaves)[-1] if leaves else hashlib.sha256(b"").digest()


def audit_path(index: int, tree: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf `index`, from the leaf up, read from `levels` output in O(log n)."""
    path = []
    for level in tree:
        sibling = (index ^ 1) * HASH_SIZE
        if sibling < len(level):  # no sibling: the node moves up unhashed
            path.append(level[sibling : sibling + HASH_SIZE])
        index >>= 1
    return path


def inclusion_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf `index`, from the leaf up."""
    if not 0 <= index < len(leaves):
        raise IndexError("leaf index out of range")
    return audit_path(index, levels(leaves))


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes], expected_root: bytes) -> bool:
    """True when `path` proves `leaf` is leaf `index` of the tree of `size` leaves with `expected_root`."""
    if not 0 <= index < size:
        return False
    fn, sn, node = index, size - 1, leaf_hash(leaf)
    for sibling in path:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            node = _node(sibling, node)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = _node(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and node == expected_root
