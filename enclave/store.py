"""An instance's state: a key-value map with nested transactions and exact size accounting.

Apps and counters only ever touch state through a `Store`, so every state change can be
undone: a batch opens a transaction, each command opens a nested one, and a refused command
(or app error, or memory-budget refusal) rolls its layer back without touching the others.
The size is the sum of key and value bytes, tracked incrementally so the memory budget can be
checked before a layer commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Key = tuple[str, ...]


def _key_size(key: Key) -> int:
    return len("".join(key).encode("utf-8"))


def _entry_size(key: Key, value: bytes | None) -> int:
    return 0 if value is None else _key_size(key) + len(value)


class Store:
    """Key-value state with a stack of uncommitted write layers (None marks a deletion)."""

    def __init__(self, items: Iterable[tuple[Key, bytes]] = ()) -> None:
        self._base: dict[Key, bytes] = dict(items)
        self._size = sum(_entry_size(k, v) for k, v in self._base.items())
        self._layers: list[dict[Key, bytes | None]] = []
        self._deltas: list[int] = []

    # --- reads ---------------------------------------------------------------------------

    def get(self, key: Key) -> bytes | None:
        """The current value of `key` (uncommitted writes included), or None."""
        for layer in reversed(self._layers):
            if key in layer:
                return layer[key]
        return self._base.get(key)

    def scan(self, prefix: Key) -> Iterator[tuple[Key, bytes]]:
        """Current entries whose key starts with `prefix`, in key order. Costs O(state)."""
        merged: dict[Key, bytes | None] = {k: v for k, v in self._base.items() if k[: len(prefix)] == prefix}
        for layer in self._layers:
            merged.update((k, v) for k, v in layer.items() if k[: len(prefix)] == prefix)
        for key in sorted(merged):
            value = merged[key]
            if value is not None:
                yield key, value

    @property
    def size(self) -> int:
        """The current size in bytes, uncommitted writes included."""
        return self._size + sum(self._deltas)

    def items(self) -> list[tuple[Key, bytes]]:
        """All committed entries, sorted by key (for snapshots)."""
        if self._layers:
            raise RuntimeError("snapshot inside a transaction")
        return sorted(self._base.items())

    def pending(self) -> list[tuple[Key, bytes | None]]:
        """The innermost transaction's writes, sorted by key (None marks a deletion)."""
        return sorted(self._layers[-1].items())

    # --- writes --------------------------------------------------------------------------

    def put(self, key: Key, value: bytes) -> None:
        """Set `key` in the innermost transaction."""
        self._write(key, value)

    def delete(self, key: Key) -> None:
        """Erase `key` in the innermost transaction."""
        self._write(key, None)

    def _write(self, key: Key, value: bytes | None) -> None:
        if not self._layers:
            raise RuntimeError("write outside a transaction")
        self._deltas[-1] += _entry_size(key, value) - _entry_size(key, self.get(key))
        self._layers[-1][key] = value

    def apply(self, writes: Iterable[tuple[Key, bytes | None]]) -> None:
        """Write straight into the committed state (restore applying logged writes)."""
        if self._layers:
            raise RuntimeError("apply inside a transaction")
        base, size = self._base, self._size
        for key, value in writes:
            old = base.get(key)
            if old is not None and value is not None:  # an update (most writes): same key size
                size += len(value) - len(old)
                base[key] = value
            elif value is not None:
                size += _key_size(key) + len(value)
                base[key] = value
            elif old is not None:
                size -= _key_size(key) + len(old)
                del base[key]
        self._size = size

    # --- transactions --------------------------------------------------------------------

    def begin(self) -> None:
        """Open a nested transaction."""
        self._layers.append({})
        self._deltas.append(0)

    def rollback(self) -> None:
        """Drop the innermost transaction's writes."""
        self._layers.pop()
        self._deltas.pop()

    def commit(self) -> None:
        """Merge the innermost transaction into its parent (or into the committed state)."""
        layer = self._layers.pop()
        delta = self._deltas.pop()
        if self._layers:
            self._layers[-1].update(layer)
            self._deltas[-1] += delta
            return
        for key, value in layer.items():
            if value is None:
                self._base.pop(key, None)
            else:
                self._base[key] = value
        self._size += delta
