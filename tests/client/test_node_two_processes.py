"""Outside review 4: two clients on one data dir, and a Node process that stalled.

1. A Node process paused for over 10 s loses its calls lock (proper-lockfile takes a lock over
   once its holder stops refreshing it); another process resumed the same call and ran a fresh
   sealing; the paused one, answered "counter used by <that sealing>", took it for another
   command's and sealed the call under the next counter: paid twice. Now a client re-reads the
   call's kept sealings before it ever seals a call under a new counter.
2. The Python SDK's gap filler did not see the Node client's kept calls (`node-calls/`), so it
   used up the counter of a transfer the Node client held, which could then never run and was
   reported as possibly run. Both clients now count each other's kept calls.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client.node_support import node_eval
from tests.client.test_node_client import _balance, _unopenable_status, evil, funded
from tests.client.test_node_counter_gap import _Host, _node, _transfer_30
from tests.gateway.support import InProcessMesh
from veil.sdk.calls import FileCalls, MemoryCalls
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import CounterGap
from veil.sdk.identity import SigningIdentity

__all__ = ["evil", "funded"]

_CALLS = 'new veil.FileCalls(dir + "/node-calls")'


ARRIVED, RELEASED = "a-arrived", "b-done"  # files in the data dir: the host holds process 1, lets go


def _two_processes(mesh: InProcessMesh, address: str) -> str:
    """Node source: `p1` and `p2`, two clients on the data dir `dir` (as two processes would be,
    sharing its files), `alice`, `fs` and `path`; `until(ready)` waits for a condition; `stall()`
    stalls process 1 past proper-lockfile's 10 s (its calls lock is stale to everyone else);
    `heldByHost()` waits until the host holds process 1's call and `release()` lets it go on (see
    _hold_process_1)."""
    return f"""const fs = await import("node:fs"); const path = await import("node:path");
        const dir = {json.dumps(str(mesh.data_dir))};
        const make = () => new veil.VeilNodeClient({json.dumps(address)},
          fs.readFileSync(dir + "/pki/ca.pem"), {{
          serverName: "localhost", policy: veil.loadPolicy(dir + "/expected-measurement.json"),
          rootPem: fs.readFileSync(dir + "/pki/sgx-root.pem"),
          counters: new veil.FileCounters(dir + "/counters.json"),
          pins: new veil.InstancePins(dir + "/instances.json"),
          calls: new veil.FileCalls(dir + "/node-calls"), timeoutMs: 20000 }});
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const p1 = make(), p2 = make();
        const until = async (ready) => {{ while (!ready()) await new Promise((r) => setTimeout(r, 20)); }};
        const stall = () => {{
          const lock = fs.readdirSync(dir + "/node-calls").find((n) => n.endsWith(".lock"));
          const old = new Date(Date.now() - 20000);
          fs.utimesSync(path.join(dir, "node-calls", lock), old, old);
        }};
        const heldByHost = () => until(() => fs.existsSync(dir + "/{ARRIVED}"));
        const release = () => fs.writeFileSync(dir + "/{RELEASED}", "1");"""


def _hold_process_1(mesh: InProcessMesh) -> None:
    """The host holds process 1's call while process 1 "stalls": it says so (`heldByHost()` in the
    script) and waits, 30 s at most, until process 2 is done (`release()`)."""
    (mesh.data_dir / ARRIVED).write_text("1")
    for _ in range(600):
        if (mesh.data_dir / RELEASED).exists():
            return
        time.sleep(0.05)


def _another_device_pays_bob_1(mesh: InProcessMesh, alice: SigningIdentity, bob: SigningIdentity) -> None:
    """Alice's other device (its own counters and calls, nothing shared) pays bob 1: it uses the
    next counter, the one the two processes' call holds."""
    with mesh.connect(counters=MemoryCounters(), calls=MemoryCalls()) as device:
        tokens = device.token("coins", alice)
        tokens.balance()
        tokens.transfer(bob.account, 1)


def test_a_stalled_lock_holder_never_runs_the_call_a_second_time(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: Any
) -> None:
    _, bob = funded
    servicer, address = evil
    seen: list[str] = []
    release_first = threading.Event()

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        seen.append(request.request_id)
        n = len(seen)
        if n in (1, 3):  # each process's resend of the first sealing: the host's "unopenable"
            return _unopenable_status(context)
        if n == 2:  # process 1's second sealing, same counter: held while process 1 "stalls"
            release_first.wait(30)
            return forward()
        if n == 4:  # process 2's fresh sealing under the same counter: it runs
            reply = forward()
            release_first.set()
            return reply
        return forward()

    servicer.execute_hook = hook
    out = node_eval(f"""
        const rejections = [];
        process.on("unhandledRejection", (e) => rejections.push(String(e && e.code || e)));
        {_two_processes(mesh, address)}
        const crypto = await import("node:crypto");
        const file = path.join(dir, "node-calls",
          crypto.createHash("sha256").update("pay-1").digest("hex") + ".json");
        const pay = (client) => client.token("coins", alice)
          .transfer({json.dumps(bob.account)}, 10, {{ requestId: "pay-1" }})
          .then((b) => "ok " + b, (e) => e.constructor.name + ": " + e.message);
        const first = pay(p1);
        await until(() => fs.existsSync(file)
          && JSON.parse(fs.readFileSync(file, "utf8")).attempts.length === 2);  // its second sealing
        stall();
        const second = await pay(p2);
        const firstOut = await first;
        await new Promise((r) => setTimeout(r, 200));
        p1.close(); p2.close();
        console.log(JSON.stringify({{ first: firstOut, second, rejections }}));
    """)  # fmt: skip
    assert out == {"first": "ok 90", "second": "ok 90", "rejections": []}, out
    assert len(seen) == 4  # process 1 never sealed the call under another counter
    assert _balance(mesh, bob) == 10  # once


def test_the_python_sdk_never_fills_a_counter_the_node_client_holds(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = funded
    host = _Host(mesh, monkeypatch)  # holds what it is given, answers "busy"
    calls = 'new veil.FileCalls(dir + "/node-calls")'
    first = _node(mesh, _transfer_30(bob.account, ', { requestId: "node-pay" }'), calls=calls)
    assert first["error"] in ("GatewayError", "NoAnswer"), first
    host.phase = "honest"
    with mesh.connect() as python_client:
        with pytest.raises(CounterGap) as gap:  # sealed above the Node call, which it waits for
            python_client.token("coins", alice).transfer(bob.account, 5)
        assert gap.value.waiting_for == ["node-pay"]
        again = _node(mesh, _transfer_30(bob.account, ', { requestId: "node-pay" }'), calls=calls)
        assert again == {"balance": "70"}, again  # the Node call, resumed: it runs
        assert (
            python_client.token("coins", alice).transfer(bob.account, 5, request_id=gap.value.request_id)
            == 65
        )
    assert _balance(mesh, bob) == 35


def test_a_stalled_process_never_seals_a_call_another_process_moved_on(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: Any
) -> None:
    """Outside review 5: the stalled process 1 got "counter 2 used by another command" (another
    device's) while process 2, which took its lock over, had already moved the call to counter 3
    and sent sealings the host held; process 1 sealed the call under counter 4 from its stale copy
    and the host ran both: paid twice. A process now checks that the store still holds the call as
    it knows it before sealing it again, and stops (OutcomeUnknown) when another took it over."""
    alice, bob = funded
    servicer, address = evil
    first: dict[str, Any] = {}
    held: list[Callable[[], Any]] = []
    guard = threading.Lock()

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        with guard:
            is_first = not first
            if is_first:
                first["command"] = request.command.SerializeToString()
        if is_first:  # process 1's sealing under counter 2: another device uses 2 meanwhile
            _another_device_pays_bob_1(mesh, alice, bob)
            reply = forward()  # genuine: "counter 2 used by another command"
            _hold_process_1(mesh)
            return reply
        if request.command.SerializeToString() == first["command"]:
            return forward()  # process 2's resend of the same bytes
        request.request_id = f"rewritten-{len(held)}"  # the host ignores request-id dedupe
        held.append(forward)  # every later sealing: kept by the host, "unopenable" to the client
        return _unopenable_status(context)

    servicer.execute_hook = hook
    out = node_eval(f"""
        {_two_processes(mesh, address)}
        const pay = (client) => client.token("coins", alice)
          .transfer({json.dumps(bob.account)}, 10, {{ requestId: "pay-1" }})
          .then((b) => "ok " + b, (e) => e.constructor.name + ": " + e.message);
        const first = pay(p1);
        await heldByHost();
        stall();
        const second = await pay(p2);
        release();
        const firstOut = await first;
        p1.close(); p2.close();
        console.log(JSON.stringify({{ first: firstOut, second }}));
    """)  # fmt: skip
    assert out["first"].startswith("OutcomeUnknown"), out
    assert "took this call over" in out["first"]
    assert out["second"].startswith("OutcomeUnknown"), out
    for run in held:  # the host runs every sealing it kept: pay-1 runs once at most
        run()
    assert _balance(mesh, bob) == 11  # the device's 1 and pay-1's 10, once


def test_a_request_id_the_other_client_keeps_is_refused_not_a_new_call(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside review 5: the Python SDK took a request id of a call the Node client keeps for a
    new call of its own, and its gap filler then used up the counter the Node call held."""
    alice, bob = funded
    host = _Host(mesh, monkeypatch)
    first = _node(mesh, _transfer_30(bob.account, ', { requestId: "node-pay" }'), calls=_CALLS)
    assert first["error"] in ("GatewayError", "NoAnswer"), first
    host.phase = "honest"
    with mesh.connect() as python_client, pytest.raises(ValueError, match="the Node client keeps"):
        python_client.token("coins", alice).transfer(bob.account, 30, request_id="node-pay")
    assert _node(mesh, _transfer_30(bob.account, ', { requestId: "node-pay" }'), calls=_CALLS) == {
        "balance": "70"
    }


def test_an_unreadable_file_in_the_other_store_names_no_call(tmp_path: Path) -> None:
    """Outside review 5: a corrupt file in node-calls/ (a number that overflows, nesting past the
    recursion limit) made every Python "too early" answer fail."""
    node = tmp_path / "node-calls"
    node.mkdir()
    (node / ("0" * 64 + ".json")).write_text(
        '{"request_id":"x","instance_id":"coins","account":"a","call":"","counter":1e999,"attempts":[]}'
    )
    (node / ("1" * 64 + ".json")).write_text("[" * 100_000 + "]" * 100_000)
    assert FileCalls(tmp_path / "calls", also_pending=[node]).pending("coins", "a") == []


def test_a_stalled_batch_never_reseals_a_call_another_process_took_over(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: Any
) -> None:
    """Outside review 6: process 1's batch [pay-1 (10), pay-2 (5)]; another device uses pay-1's
    counter, so pay-1 is to be sealed again after the batch; process 1 stalls on pay-2's resend,
    process 2 takes the lock over, resumes pay-1 and moves it on (sealings the host keeps); then
    process 1 sealed pay-1 from its stale copy and the host ran both. Every new sealing is now kept
    only if the store still holds the call as this process last read or wrote it."""
    alice, bob = funded
    servicer, address = evil
    seen: list[bytes] = []
    held: list[Callable[[], Any]] = []
    guard = threading.Lock()
    device_used: list[bool] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        command = request.command.SerializeToString()
        with guard:
            if command not in seen:
                seen.append(command)
            index = seen.index(command)
        if index == 0 and not device_used:
            device_used.append(True)
            _another_device_pays_bob_1(mesh, alice, bob)  # uses counter 2, pay-1's
            return forward()  # genuine: "counter 2 used by another command"
        if index == 0:
            return forward()  # process 2's resend of pay-1's first sealing
        if index == 1:  # pay-2's resend: held while process 1 "stalls"
            _hold_process_1(mesh)
            return forward()
        request.request_id = f"rewritten-{len(held)}"  # the host ignores request-id dedupe
        held.append(forward)
        return _unopenable_status(context)

    servicer.execute_hook = hook
    out = node_eval(f"""
        {_two_processes(mesh, address)}
        const name = (e) => e.constructor.name + ": " + e.message;
        const to = {json.dumps(bob.account)};
        const first = p1.token("coins", alice)
          .transferMany([{{ to, amount: 10 }}, {{ to, amount: 5 }}], {{ requestIds: ["pay-1", "pay-2"] }})
          .then((rs) => rs.map((r) => r.error ? name(r.error) : "ok " + r.balance), name);
        await heldByHost();
        stall();
        const second = await p2.token("coins", alice).transfer(to, 10, {{ requestId: "pay-1" }})
          .then((b) => "ok " + b, name);
        release();
        const firstOut = await first;
        p1.close(); p2.close();
        console.log(JSON.stringify({{ first: firstOut, second }}));
    """)  # fmt: skip
    assert "took this call over" in out["first"][0], out
    for run in held:  # the host runs every sealing it kept
        with contextlib.suppress(grpc.RpcError):
            run()
    assert _balance(mesh, bob) == 16  # the device's 1, pay-2's 5 and pay-1's 10, each once
