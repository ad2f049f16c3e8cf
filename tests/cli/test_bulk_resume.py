"""Item 6 of issue 14: `token transfer --from-csv` is resumable. Each row has a deterministic
request id (file hash, sender, row); a rerun skips the rows already applied and says so, and a
row the mesh already answered in a run that died before its journal is not paid twice."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import Veil
from veil.cli.token import BULK_CHUNK
from veil.enclave.v1 import envelope_pb2, error_pb2
from veil.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def _assert_balances(veil: Veil, **expected: int) -> None:
    """Each named identity's balance on `coins` is the one given."""
    balances = {name: veil.json("token", "balance", "coins", "--as", name)["balance"] for name in expected}
    assert balances == expected


def test_a_rerun_pays_nobody_twice(veil: Veil, tmp_path: Path) -> None:
    veil.identities("treasury", "alice", "bob", "carol", "dave")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "treasury")
    payroll = tmp_path / "payroll.csv"
    payroll.write_text("to,amount\nbob,10\ncarol,20\ndave,500\n")  # dave's row overdraws

    status, out, _ = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 1
    assert "2 transfers committed (30 tokens), 1 refused, 0 skipped" in out
    assert "refused row 4: 500 to dave" in out
    _assert_balances(veil, alice=70, bob=10, carol=20, dave=0)

    # Running the same file again: the applied rows are skipped, the refused one tried again.
    status, out, _ = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 1
    assert "0 transfers committed (0 tokens), 1 refused, 2 skipped, 0 outcome unknown" in out
    assert "skipped row 2: 10 to bob: applied by an earlier run" in out
    _assert_balances(veil, alice=70, bob=10, carol=20)

    # Dave's row is fixed by funding alice; the rerun applies only it.
    veil.ok("token", "mint", "coins", "alice", "500", "--as", "treasury")
    document = veil.json("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert (document["applied"], document["refused"], document["skipped"]) == (1, 0, 2)
    _assert_balances(veil, alice=70, dave=500)

    # A run that died before writing its journal: the mesh holds the rows' answers under their
    # request ids, so none of them is sent to the enclave again.
    journal = Path(document["journal"])
    journal.unlink()
    executed = veil.executed()
    status, out, _ = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 1, out  # the outcome of those rows is for the user to check
    assert "0 transfers committed (0 tokens), 0 refused, 0 skipped, 3 outcome unknown" in out
    assert "unknown row 2: 10 to bob: the mesh's answer did not authenticate" in out
    assert "check the balance of the rows whose outcome is unknown" in out
    _assert_balances(veil, alice=70, bob=10, carol=20, dave=500)
    assert json.loads(journal.read_text())["rows"]["2"]["state"] == "unknown"
    # One attempt per row, answered from the mesh's record; then each row's new sealing has its
    # counter used up by a read-only call, so it can never run later and nothing waits for it.
    assert veil.executed() - executed == 6
    status, out, _ = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 1
    assert "unknown row 2: 10 to bob: its outcome was unknown in an earlier run; never sent again" in out
    assert veil.executed() - executed == 6  # not even tried again
    veil.ok("token", "transfer", "coins", "bob", "1", "--as", "alice")  # the account goes on
    _assert_balances(veil, alice=69, bob=11, carol=20, dave=500)


def test_a_bad_row_stops_the_file_before_anything_is_sent(veil: Veil, tmp_path: Path) -> None:
    veil.identities("treasury", "alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    before = veil.executed()
    for content, expected in (
        ("bob,5\nbobb,5\n", "payroll.csv:2: 'bobb' is not a known identity"),
        ("bob,5\nbob,-1\n", "payroll.csv:2: amount '-1' is not a whole number"),
        ("bob,5\nbob\n", "payroll.csv:2: expected two columns"),
        ("bob,-2\nbob,1\n", "payroll.csv:1: amount '-2' is not a whole number"),  # not a header
        ("to,amount\nbob,x\n", "payroll.csv:2: amount 'x' is not a whole number"),
        ("", "no transfers in the file"),
    ):
        payroll = tmp_path / "payroll.csv"
        payroll.write_text(content)
        status, out, err = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
        assert status == 1
        assert out == ""
        assert expected in err
    payroll.write_bytes(b"\xff\xfe,\x00\n")
    status, _, err = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 1
    assert "not a UTF-8 CSV file" in err
    assert veil.executed() == before


def test_a_row_answered_too_late_is_resumed_not_repaid(veil: Veil, tmp_path: Path) -> None:
    """The mesh commits a row after the caller's deadline: the same run sends the same call
    again, reads the first attempt's answer, and pays once."""
    veil.identities("treasury", "alice", "bob")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "treasury")
    payroll = tmp_path / "payroll.csv"
    payroll.write_text("bob,10\n")
    state = veil.mesh.states[0]
    state.delay = 1.5  # longer than --timeout: the first attempt gets no answer, but commits
    threading.Timer(1.2, lambda: setattr(state, "delay", 0.0)).start()
    status, out, err = veil(
        "token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice", "--timeout", "1"
    )
    assert status == 0, out + err
    assert "1 transfers committed (10 tokens)" in out
    _assert_balances(veil, alice=90, bob=10)


def test_a_long_file_goes_in_batches_and_a_rerun_sends_nothing(veil: Veil, tmp_path: Path) -> None:
    """Issue 13: the rows go to the mesh BULK_CHUNK at a time, one ExecuteBatch each, in file
    order; a rerun of the finished file skips every row and sends nothing."""
    veil.identities("treasury", "alice", "bob", "carol")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "1000", "--as", "treasury")
    rows = BULK_CHUNK * 2 + 44
    payroll = tmp_path / "payroll.csv"
    payroll.write_text("".join(f"{'bob' if n % 2 else 'carol'},{1 + n % 3}\n" for n in range(rows)))
    state = veil.mesh.states[0]
    batches, executed = state.calls["ExecuteBatch"], veil.executed()
    document = veil.json("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    sent = sum(1 + n % 3 for n in range(rows))
    assert (document["applied"], document["sent"]) == (rows, sent)
    assert state.calls["ExecuteBatch"] - batches == 3  # one call per chunk, not one per row
    assert veil.executed() - executed == rows  # each row once
    sequences = [t["sequence"] for t in document["transfers"]]
    assert sequences == sorted(sequences)  # run in file order
    _assert_balances(veil, alice=1000 - sent)
    document = veil.json("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert (document["applied"], document["skipped"]) == (0, rows)
    assert veil.executed() - executed == rows


class _InterruptingGateway:
    """An outside review's hostile gateway. `interrupt`: the batch runs, the second row's answer
    is replaced by the host's word, and while the SDK resends that row the user presses Ctrl-C
    (before the chunk's journal is saved). `no-dedupe`: outer request ids rewritten, so the state
    service never deduplicates a resent row."""

    mode = "interrupt"
    count = 0

    def __init__(self, channel: Any) -> None:
        self.real = _REAL_STUB(channel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def ExecuteBatch(self, request: Any, **kw: Any) -> Any:
        if _InterruptingGateway.mode == "interrupt":
            items = list(self.real.ExecuteBatch(request, **kw))
            for item in items:
                if item.index == 1:
                    item.response.outcome.CopyFrom(
                        envelope_pb2.CommandOutcome(
                            error=error_pb2.EcallError(code=error_pb2.ECALL_ERROR_CODE_INVALID_ARGUMENT)
                        )
                    )
            return iter(items)
        forwarded = gateway_pb2.ExecuteBatchRequest()
        forwarded.CopyFrom(request)
        for command in forwarded.commands:
            _InterruptingGateway.count += 1
            command.request_id = f"host-{_InterruptingGateway.count}"
        return self.real.ExecuteBatch(forwarded, **kw)

    def Execute(self, request: Any, **kw: Any) -> Any:
        if _InterruptingGateway.mode == "interrupt":
            raise KeyboardInterrupt
        forwarded = gateway_pb2.ExecuteRequest()
        forwarded.CopyFrom(request)
        _InterruptingGateway.count += 1
        forwarded.request_id = f"host-{_InterruptingGateway.count}"
        return self.real.Execute(forwarded, **kw)


_REAL_STUB = gateway_pb2_grpc.GatewayServiceStub


def test_a_run_interrupted_before_its_journal_pays_no_settled_row_twice(
    veil: Veil, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside review: a row settled by the SDK but not yet in the journal (saved once per
    chunk) was forgotten by both (the SDK deleted settled calls), so a rerun behind a host that
    rewrites request ids paid it again. The SDK now keeps a named call with its answer until the
    journal has it: the rerun gets that answer and sends nothing for the row."""
    veil.identities("treasury", "alice", "bob", "carol")
    veil.ok("instance", "create", "coins", "--app", "token", "--as", "treasury")
    veil.ok("token", "mint", "coins", "alice", "100", "--as", "treasury")
    payroll = tmp_path / "payroll.csv"
    payroll.write_text("bob,10\ncarol,20\n")
    monkeypatch.setattr(gateway_pb2_grpc, "GatewayServiceStub", _InterruptingGateway)
    status, _, err = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    assert status == 130
    assert "interrupted" in err
    _InterruptingGateway.mode = "no-dedupe"
    status, out, err = veil("token", "transfer", "coins", "--from-csv", str(payroll), "--as", "alice")
    monkeypatch.undo()
    assert status == 0, (out, err)
    _assert_balances(veil, alice=70, bob=10, carol=20)
    assert not list((veil.mesh.data_dir / "calls").glob("*.json"))  # in the journal now: forgotten
