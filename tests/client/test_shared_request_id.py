"""Two accounts' calls under one request id at once (reviews of the change that sends every
sealing of a call under the call's own id).

A careless application names payments by invoice number, so alice's and bob's calls both carry
"inv-42"; the calls store is keyed by request id and the account locks differ, so nothing
orders them. Unguarded, the second call kept overwrote the first's entry: the mesh ran alice's
sealing and answered bob's with its record of it, and merging "this call's" kept sealings took
alice's sealing as bob's (his client reported her transfer as his); and dropping bob's call
deleted alice's kept entry, so her retry sealed her transfer anew while the host held the first
sealing (paid twice). Now an id's entry is checked and written in one step (`CallStore.keep`):
the first call kept owns the id, the other is refused before anything of it is sent, and
neither ever overwrites or deletes the other's entry; kept sealings merge only from the same
call (instance, account, call bytes).
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.client.test_sdk_batch_hostile import _pay
from tests.gateway.support import InProcessMesh, token_config
from veil.enclave.v1 import apps_pb2
from veil.sdk.calls import MemoryCalls
from veil.sdk.errors import VeilClientError
from veil.sdk.identity import SigningIdentity, new_identity
from veil.sdk.sealing import Opened

CAROL = "c0" * 32


@pytest.fixture
def alice(mesh: InProcessMesh) -> SigningIdentity:
    return new_identity(mesh.data_dir, "alice")


@pytest.fixture
def bob(mesh: InProcessMesh) -> SigningIdentity:
    return new_identity(mesh.data_dir, "bobby")


@pytest.fixture
def coins(mesh: InProcessMesh, alice: SigningIdentity, bob: SigningIdentity) -> str:
    """alice (issuer) holds 1000, bob 100; both accounts' next counter is 3."""
    with mesh.connect() as admin:
        admin.create_instance("coins", token_config(alice.public_key))
        admin.token("coins", alice).mint(alice.account, 1000)  # alice: counter 1
        admin.token("coins", alice).mint(bob.account, 100)  # alice: counter 2
        admin.token("coins", bob).transfer(CAROL, 1)  # bob: counter 1
        admin.token("coins", bob).transfer(CAROL, 1)  # bob: counter 2
    return "coins"


def _balance(mesh: InProcessMesh, who: SigningIdentity) -> int:
    with mesh.connect() as honest:
        return honest.token("coins", who).balance()


class _Gated:
    """Wraps a client's calls store to force one interleaving of two concurrent executes."""

    def __init__(
        self,
        inner: Any,
        *,
        on_get: threading.Event | None = None,
        before_put: threading.Event | None = None,
        after_put: threading.Event | None = None,
    ) -> None:
        self.inner, self.on_get, self.before_put, self.after_put = inner, on_get, before_put, after_put
        self.puts = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def get(self, request_id: str) -> Any:
        found = self.inner.get(request_id)
        if self.on_get is not None:
            self.on_get.set()
        return found

    def keep(self, state: Any) -> bool:
        self.puts += 1
        if self.puts == 1 and self.before_put is not None:
            assert self.before_put.wait(10)
        kept: bool = self.inner.keep(state)
        if self.puts == 1 and self.after_put is not None:
            self.after_put.set()
        return kept


class _HeldStub:
    def __init__(self, real: Any, until: threading.Event) -> None:
        self.real, self.until = real, until

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def Execute(self, request: Any, **kw: Any) -> Any:
        assert self.until.wait(10)
        return self.real.Execute(request, **kw)


def _race(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, bob: SigningIdentity, *, memory: bool
) -> tuple[Any, Any]:
    """alice's and bob's calls under one request id ("inv-42"), concurrently, on one data dir
    (two clients: two processes) or one client object with MemoryCalls (two threads). The
    account locks differ, so nothing orders them: both claims see no call under "inv-42", then
    bob's call is kept, then alice's tries to be (the store is keyed by request id only)."""
    a_claimed, b_put, a_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, Any] = {}
    if memory:
        shared = mesh.connect(timeout=5.0, calls=MemoryCalls())
        first, second = shared, shared
    else:
        first, second = mesh.connect(timeout=5.0), mesh.connect(timeout=5.0)
    try:
        store = first.calls
        if memory:
            # One store: alice's thread gets, then waits to put; bob's thread puts in between.
            class Both(_Gated):
                def get(self, request_id: str) -> Any:
                    found = self.inner.get(request_id)
                    if threading.current_thread().name == "alice":
                        a_claimed.set()
                    return found

                def keep(self, state: Any) -> bool:
                    me = threading.current_thread().name
                    if me == "alice" and not b_put.is_set():
                        assert b_put.wait(10)
                    if me == "bob" and not b_put.is_set():
                        assert a_claimed.wait(10)
                        kept: bool = self.inner.keep(state)
                        b_put.set()
                        return kept
                    return bool(self.inner.keep(state))

            shared.calls = Both(store)
            real = shared._stub

            class PerThread:
                def __getattr__(self, name: str) -> Any:
                    return getattr(real, name)

                def Execute(self, request: Any, **kw: Any) -> Any:
                    if threading.current_thread().name == "bob":
                        assert a_done.wait(10)
                    return real.Execute(request, **kw)

            shared._stub = PerThread()  # type: ignore[assignment]
        else:
            first.calls = _Gated(first.calls, on_get=a_claimed, before_put=b_put)
            second.calls = _Gated(second.calls, before_put=a_claimed, after_put=b_put)
            second._stub = _HeldStub(second._stub, a_done)  # type: ignore[assignment]

        def run_alice() -> None:
            try:
                results["alice"] = first.execute(coins, _pay(30), alice, request_id="inv-42")
            except BaseException as error:
                results["alice"] = error
            finally:
                a_done.set()

        def run_bob() -> None:
            pay_carol = apps_pb2.AppCall(
                token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to=CAROL, amount=50))
            )
            try:
                results["bob"] = second.execute(coins, pay_carol, bob, request_id="inv-42")
            except BaseException as error:
                results["bob"] = error

        threads = [
            threading.Thread(target=run_alice, name="alice"),
            threading.Thread(target=run_bob, name="bob"),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        first.close()
        if second is not first:
            second.close()
    return results["alice"], results["bob"]


@pytest.mark.parametrize(
    "memory", [False, True], ids=["two-processes-one-data-dir", "two-threads-one-client"]
)
def test_a_request_id_reused_by_another_account_never_gets_that_accounts_answer(
    mesh: InProcessMesh, coins: str, alice: SigningIdentity, bob: SigningIdentity, memory: bool
) -> None:
    """Bob's call is kept first: it owns "inv-42" and runs; alice's is refused before anything
    of it is sent (nothing moves), and neither reports the other's answer, whether the two calls
    come from two processes on one data dir or two threads of one client."""
    a, b = _race(mesh, coins, alice, bob, memory=memory)
    assert isinstance(a, VeilClientError), a
    assert "names another call" in str(a)
    assert "not sent" in str(a)
    assert isinstance(b, Opened), b
    assert b.accepted, b
    assert _balance(mesh, bob) == 48  # his transfer of 50, once
    assert _balance(mesh, alice) == 1000  # hers never left
