"""RFC 6962 / RFC 9162 Merkle tree hash and inclusion proofs (SHA-256).

    leaf hash  = SHA-256(0x00 || leaf)
    node hash  = SHA-256(0x01 || left || right)
    MTH([])    = SHA-256(b"")
    MTH(D[n])  = node(MTH(D[:k]), MTH(D[k:])), k = the largest power of two < n

`verify_inclusion` is what a voter runs on a BallotProofResult; it needs nothing from the
enclave but the proof and the root.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def leaf_hash(leaf: bytes) -> bytes:
    """The hash of one leaf."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    return 1 << ((n - 1).bit_length() - 1)


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return _node(_root_of_hashes(hashes[:k]), _root_of_hashes(hashes[k:]))


def root(leaves: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of `leaves`."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    return _root_of_hashes([leaf_hash(leaf) for leaf in leaves])


def _path(index: int, hashes: Sequence[bytes]) -> list[bytes]:
    if len(hashes) <= 1:
        return []
    k = _split(len(hashes))
    if index < k:
        return [*_path(index, hashes[:k]), _root_of_hashes(hashes[k:])]
    return [*_path(index - k, hashes[k:]), _root_of_hashes(hashes[:k])]


def inclusion_path(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """The audit path of leaf `index`, from the leaf up."""
    if not 0 <= index < len(leaves):
        raise IndexError("leaf index out of range")
    return _path(index, [leaf_hash(leaf) for leaf in leaves])


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
