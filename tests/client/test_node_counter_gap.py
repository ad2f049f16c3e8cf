"""The Node.js client never lets a batch that did not finish turn a new call into a double run.

Outside review: `executeMany` sealed commands under counters above the local cache; when the
batch ended without definitive answers those sealings stayed valid in the host's hands while the
cache stayed put, so the next new `transfer` was sealed under the batch's first counter. A
hostile state host then ran the new transfer, then a held sealing of the batch, then replayed the
transfer: the enclave's genuine "counter used by another command" refusal made the client seal
the transfer again, and it ran twice.

Two rules close it (docs/protocol.md, section 6), both tested here behind an honest gateway:

- the high-water mark (`sealed.json`, raised before anything is sent): a new call is sealed above
  every counter this client sealed, so it is "too early" until the held sealings are settled:
  `CounterGap`, naming the calls to resume, never a re-seal under another counter;
- a refusal naming a later counter than the call's (and not one of its sealings) is
  `OutcomeUnknown`: it proves only that that delivery did not run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import pytest

from tests.client.node_support import node_eval
from tests.client.test_node_client import funded
from tests.gateway.support import InProcessMesh
from veil.enclave.v1 import error_pb2
from veil.sdk.identity import SigningIdentity
from veil.services.state.enclave_host import EnclaveCallError

__all__ = ["funded"]  # the fixture, shared with the single-transfer tests


def _node(mesh: InProcessMesh, body: str, *, calls: str = "undefined") -> Any:
    d = json.dumps(str(mesh.data_dir))
    return node_eval(f"""
        const fs = await import("node:fs"); const dir = {d};
        const client = new veil.VeilNodeClient({json.dumps(mesh.public_address)},
          fs.readFileSync(dir + "/pki/ca.pem"), {{
          serverName: "localhost", policy: veil.loadPolicy(dir + "/expected-measurement.json"),
          rootPem: fs.readFileSync(dir + "/pki/sgx-root.pem"),
          counters: new veil.FileCounters(dir + "/counters.json"),
          pins: new veil.InstancePins(dir + "/instances.json"), calls: {calls}, timeoutMs: 2500 }});
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const tokens = client.token("coins", alice); let out;
        {body}
        client.close();
        console.log(JSON.stringify(out, (k, v) => typeof v === "bigint" ? v.toString() : v));""")  # fmt: skip


_TRANSFER_30 = """try {{
      out = {{ balance: (await tokens.transfer({to}, 30{options})).toString() }};
    }} catch (error) {{
      out = {{ error: error.constructor.name, message: error.message, requestId: error.requestId ?? null,
               waitingFor: error.waitingFor ?? null }};
    }}"""


def _transfer_30(to: str, options: str = "") -> str:
    return _TRANSFER_30.format(to=json.dumps(to), options=options)


def _balance(mesh: InProcessMesh, who: SigningIdentity) -> int:
    with mesh.connect() as client:
        balance: int = client.token("coins", who).balance()
        return balance


class _Host:
    """A hostile state host behind the honest gateway: while `phase` is "hold" it keeps every
    command it is given and says the enclave is busy (nothing runs); in "gap" it runs the first
    new command, then the batch's held second sealing, then replays the new command to obtain a
    genuine refusal; in "honest" it forwards."""

    def __init__(self, mesh: InProcessMesh, monkeypatch: pytest.MonkeyPatch) -> None:
        self.state = mesh.states[0]
        self.honest = self.state.harness.execute
        self.held: list[Any] = []
        self.phase = "hold"
        self.seen = 0
        monkeypatch.setattr(self.state.harness, "execute", self.execute)

    def execute(self, instance_id: str, commands: list[Any]) -> Any:
        if self.phase == "honest":
            return self.honest(instance_id, commands)
        (command,) = commands
        if self.phase == "hold":
            if command not in self.held:
                self.held.append(command)
            raise EnclaveCallError(
                "Execute", error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INTERNAL, message="busy")
            )
        self.seen += 1
        if self.seen == 1:
            self.honest(instance_id, [command])
            self.honest(instance_id, [self.held[1]])
        return self.honest(instance_id, [command])


def _unsettled_batch(
    mesh: InProcessMesh, bob: SigningIdentity, host: _Host, calls: str = "undefined"
) -> None:
    first = _node(
        mesh,
        f"""const rs = await tokens.transferMany([{{ to: {json.dumps(bob.account)}, amount: 1 }},
            {{ to: {json.dumps(bob.account)}, amount: 2 }}], {{ requestIds: ["gap-1", "gap-2"] }});
            out = rs.map((r) => r.error ? r.error.constructor.name : "ok");""",
        calls=calls,
    )
    assert first == ["NoAnswer", "NoAnswer"]
    assert len(host.held) == 2


def test_a_new_transfer_after_an_unsettled_batch_waits_for_it_and_never_runs_twice(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's scenario: the new transfer is sealed above the batch's counters (the
    high-water mark), so the host's run-hold-replay gets nothing to run twice. This process does
    not know the batch's calls (they were kept in the other one's memory), so the counter the
    enclave waits for is one no kept call may use: the client uses counters 2 and 3 up with
    balance reads sent as commands (the batch's sealings can then never run), and the transfer
    runs under its own counter, once."""
    alice, bob = funded
    host = _Host(mesh, monkeypatch)
    _unsettled_batch(mesh, bob, host)
    sealed = json.loads((mesh.data_dir / "sealed.json").read_text())
    assert sealed["coins"][alice.account] == 3  # the batch's counters 2 and 3, kept before sending
    host.phase = "gap"
    out = _node(mesh, _transfer_30(bob.account))
    assert out == {"balance": "70"}, out
    monkeypatch.undo()
    assert _balance(mesh, alice) == 70  # above all, the 30 did not run twice (40 or 38)
    assert json.loads((mesh.data_dir / "counters.json").read_text())["coins"][alice.account] == 4


def test_a_refusal_naming_a_later_command_is_outcome_unknown_never_a_reseal(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device that does not know of the batch (no high-water mark) seals the transfer under
    counter 2; the host runs it, runs the held counter 3, replays it. The genuine refusal names
    counter 3's command: it proves only that the replay did not run, so the transfer is
    OutcomeUnknown, and it ran once."""
    alice, bob = funded
    host = _Host(mesh, monkeypatch)
    _unsettled_batch(mesh, bob, host)
    (mesh.data_dir / "sealed.json").unlink()  # another device, sharing only counters.json
    host.phase = "gap"
    out = _node(mesh, _transfer_30(bob.account))
    assert out["error"] == "OutcomeUnknown", out
    assert "moved from 2 to 3" in out["message"]
    monkeypatch.undo()
    assert _balance(mesh, alice) == 68, "the 30-coin transfer ran twice"  # 100 - 30 - 2, once each
    assert json.loads((mesh.data_dir / "counters.json").read_text())["coins"][alice.account] == 3


def test_the_unsettled_calls_resume_by_request_id_then_the_waiting_one_runs_once(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the calls kept in files, the gap error names the batch's calls; resuming them, then
    the new transfer, under their request ids (new processes, an honest host now) runs each
    exactly once, under the counters sealed the first time."""
    alice, bob = funded
    calls = 'new veil.FileCalls(dir + "/node-calls")'
    host = _Host(mesh, monkeypatch)
    _unsettled_batch(mesh, bob, host, calls)
    host.phase = "gap"
    out = _node(mesh, _transfer_30(bob.account), calls=calls)
    assert out["error"] == "CounterGap", out
    assert out["waitingFor"] == ["gap-1", "gap-2"]
    waiting = out["requestId"]
    host.phase = "honest"
    resumed = _node(
        mesh,
        f"""const rs = await tokens.transferMany([{{ to: {json.dumps(bob.account)}, amount: 1 }},
            {{ to: {json.dumps(bob.account)}, amount: 2 }}], {{ requestIds: ["gap-1", "gap-2"] }});
            out = rs.map((r) => r.error ? r.error.constructor.name
              : [r.balance.toString(), r.opened.counter]);""",
        calls=calls,
    )
    assert resumed == [["99", 2], ["97", 3]]
    out = _node(mesh, _transfer_30(bob.account, f", {{ requestId: {json.dumps(waiting)} }}"), calls=calls)
    assert out == {"balance": "67"}
    assert _balance(mesh, alice) == 67
    kept = [json.loads(f.read_text()) for f in (mesh.data_dir / "node-calls").glob("*.json")]
    assert sorted(k["request_id"] for k in kept) == sorted(["gap-1", "gap-2", waiting])
    assert all(k["answer"] is not None for k in kept)  # every call settled (named: kept with its answer)


def test_a_new_batch_behind_an_unsettled_one_waits_whole_then_runs_once_each(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new batch behind the unsettled one is sealed above it: its first command is CounterGap
    naming the unsettled calls, the later ones wait with it (kept, neither resent nor sealed
    again); resumed in order, every transfer runs once."""
    alice, bob = funded
    calls = 'new veil.FileCalls(dir + "/node-calls")'
    host = _Host(mesh, monkeypatch)
    _unsettled_batch(mesh, bob, host, calls)
    host.phase = "honest"
    executed = host.state.calls["Execute"]
    to = json.dumps(bob.account)
    batch = f"""const rs = await tokens.transferMany([{{ to: {to}, amount: 5 }}, {{ to: {to}, amount: 6 }}],
        {{ requestIds: ["next-1", "next-2"] }});
        out = rs.map((r) => r.error ? [r.error.constructor.name, r.error.waitingFor, r.error.requestId]
          : [r.balance.toString(), r.opened.counter]);"""
    waiting = _node(mesh, batch, calls=calls)
    assert waiting == [
        ["CounterGap", ["gap-1", "gap-2"], "next-1"],
        ["CounterGap", ["gap-1", "gap-2", "next-1"], "next-2"],
    ]
    # The batch's two commands, then only the first one sealed again under its own counter.
    assert host.state.calls["Execute"] - executed == 3
    resumed = _node(
        mesh,
        f"""const rs = await tokens.transferMany([{{ to: {to}, amount: 1 }}, {{ to: {to}, amount: 2 }}],
            {{ requestIds: ["gap-1", "gap-2"] }});
            out = rs.map((r) => r.error ? r.error.constructor.name
              : [r.balance.toString(), r.opened.counter]);""",
        calls=calls,
    )
    assert resumed == [["99", 2], ["97", 3]]
    assert _node(mesh, batch, calls=calls) == [["92", 4], ["86", 5]]
    assert _balance(mesh, alice) == 86


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    """The Node client holds an account's calls against other processes (two resumptions of one
    call must see each other's sealings, outside review 2) with proper-lockfile: a lock whose
    holder stopped refreshing it (dead, or stopped) is taken over after 10 s, whatever the pid
    or pid namespace (outside review 3: a pid lock file was neither), and released after."""
    alice, bob = funded
    name = hashlib.sha256(("coins\0" + alice.account).encode()).hexdigest()
    lock = mesh.data_dir / "node-calls" / f"{name}.lock"
    lock.mkdir(parents=True)
    stale = time.time() - 60
    os.utime(lock, (stale, stale))
    out = _node(mesh, _transfer_30(bob.account), calls='new veil.FileCalls(dir + "/node-calls")')
    assert out == {"balance": "70"}, out
    assert not lock.exists()
