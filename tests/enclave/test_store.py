"""The transactional key-value store under every instance: nested rollback and exact sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from veil.enclave.store import Store


def test_nested_transactions_commit_and_roll_back_with_exact_sizes() -> None:
    store = Store([(("a",), b"12345")])
    assert store.size == 6
    store.begin()
    store.put(("b", "c"), b"xy")  # 2 + 2
    store.begin()
    store.delete(("a",))
    store.put(("b", "c"), b"xyz")
    assert store.get(("a",)) is None
    assert store.size == 5
    store.rollback()
    assert store.get(("a",)) == b"12345"
    assert store.get(("b", "c")) == b"xy"
    assert store.size == 10
    store.commit()
    assert store.items() == [(("a",), b"12345"), (("b", "c"), b"xy")]
    assert list(store.scan(("b",))) == [(("b", "c"), b"xy")]
    with pytest.raises(RuntimeError):
        store.put(("z",), b"")  # writes only inside a transaction


keys = st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["x", "y"]))
ops = st.lists(
    st.tuples(st.sampled_from(["put", "delete", "begin", "commit", "rollback"]), keys, st.binary(max_size=8))
)


@given(ops)
def test_size_always_matches_the_visible_contents(
    operations: list[tuple[str, tuple[str, str], bytes]],
) -> None:
    store = Store()
    store.begin()
    depth = 1
    for op, key, value in operations:
        if op == "put":
            store.put(key, value)
        elif op == "delete":
            store.delete(key)
        elif op == "begin":
            store.begin()
            depth += 1
        elif depth > 1:
            getattr(store, op)()
            depth -= 1
        visible = list(store.scan(()))
        assert store.size == sum(len("".join(k).encode()) + len(v) for k, v in visible)


@given(
    st.lists(st.tuples(keys, st.binary(max_size=8))),
    st.lists(st.tuples(keys, st.none() | st.binary(max_size=8))),
)
def test_applied_writes_match_a_dict_and_keep_the_size_exact(
    initial: list[tuple[tuple[str, str], bytes]], writes: list[tuple[tuple[str, str], bytes | None]]
) -> None:
    store = Store(initial)
    model = dict(initial)
    store.apply(writes)  # restore applying logged writes: updates, inserts and erasures
    for key, value in writes:
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    assert store.items() == sorted(model.items())
    assert store.size == sum(len("".join(k).encode()) + len(v) for k, v in model.items())
