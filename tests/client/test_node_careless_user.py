"""The Node.js client (clients/node) as a careless user meets it: names, arguments, retries.

A mistyped recipient never becomes an account; no argument produces a stack trace or sends
anything; an application retrying a transfer with the same request id after a lost answer
pays once. Every script runs as a real subprocess against the in-process mesh, on its public
port, directly or through a gateway that loses answers.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.client import test_node_client as node_tests
from tests.client.node_support import NODE_CLIENT, node_eval, run_node
from tests.client.test_node_client import node_transfer
from tests.conftest import REPO_ROOT
from tests.gateway.support import InProcessMesh
from veil.sdk.contacts import add_contact
from veil.sdk.identity import SigningIdentity, new_identity
from veil.services.common.errors import Unavailable, abort

funded = node_tests.funded  # alice (100 coins on "coins") and bob, as the Node client tests fund them


def _calls(mesh: InProcessMesh, method: str) -> int:
    return int(mesh.states[0].calls.get(method, 0))


def _balance(mesh: InProcessMesh, who: SigningIdentity) -> int:
    with mesh.connect() as client:
        balance: int = client.token("coins", who).balance()
        return balance


def _one_line_refusal(result: Any, *reasons: str, status: int = 1) -> None:
    """A refusal: the status, nothing on stdout, one line on stderr naming the reason, no stack."""
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or (status == 2 and lines[1].startswith("usage:")), result.stderr
    assert lines[0].startswith("error: ")
    for reason in reasons:
        assert reason in lines[0]
    assert "    at " not in result.stderr  # a reason, not a stack trace
    assert "Error:" not in result.stderr.replace("error:", "")


def _client_script(mesh: InProcessMesh, gateway: str, body: str, *, timeout_ms: int = 15000) -> str:
    """A module that connects a VeilNodeClient as alice, runs `body` and prints its JSON."""
    data = json.dumps(str(mesh.data_dir))
    return f"""
import {{ readFileSync }} from "node:fs";
import path from "node:path";
const dir = {data};
const ca = readFileSync(path.join(dir, "pki", "ca.pem"));
const client = new veil.VeilNodeClient({json.dumps(gateway)}, ca, {{
  serverName: "localhost",
  policy: veil.loadPolicy(path.join(dir, "expected-measurement.json")),
  rootPem: readFileSync(path.join(dir, "pki", "sgx-root.pem")),
  counters: new veil.FileCounters(path.join(dir, "counters.json")),
  timeoutMs: {timeout_ms},
}});
const alice = veil.loadIdentity(path.join(dir, "identities", "alice.key"));
const out = {{}};
try {{
{body}
}} finally {{
  client.close();
}}
process.stdout.write(JSON.stringify(out));
"""


# --- 1. recipients -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "to",
    [
        "bobb",  # a mistyped identity
        "Bob",  # names are case-sensitive, like the files
        "carol",  # nobody
        "ab" * 31,  # 62 hex characters: not an account
        "AB" * 32,  # an account in another case: not canonical
        "../identities/bob",
        "bob\n",
    ],
)
def test_a_recipient_that_is_not_known_is_refused_before_anything_is_sent(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], to: str
) -> None:
    before = _calls(mesh, "GetAttestation"), _calls(mesh, "Execute")
    result = node_transfer(mesh, mesh.public_address, to, amount=5)
    _one_line_refusal(result, "is not a known identity or contact, nor an account", "nothing was sent")
    assert (_calls(mesh, "GetAttestation"), _calls(mesh, "Execute")) == before  # not even attested
    assert _balance(mesh, funded[1]) == 0


def test_identities_contacts_and_accounts_name_the_recipient(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    alice, bob = funded
    carol = new_identity(mesh.data_dir, "carol-device")
    add_contact(mesh.data_dir, "carol", carol.account)  # as `veil contact add carol ACCOUNT` does
    (mesh.data_dir / "identities" / "carol-device.pub").unlink()  # only the contact names her
    sent = {"bob": (bob, "bob"), "carol": (carol, "carol"), bob.account: (bob, "bob")}
    for to, (who, name) in sent.items():
        result = node_transfer(mesh, mesh.public_address, to, amount=3)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["to"] == {"name": name, "account": who.account}
    assert (_balance(mesh, bob), _balance(mesh, carol)) == (6, 3)
    unknown = "cd" * 32  # canonical but nobody's: allowed, shown without a name
    result = node_transfer(mesh, mesh.public_address, unknown, amount=1)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["to"] == {"name": None, "account": unknown}
    assert alice.account != unknown


def test_the_library_refuses_a_recipient_the_instance_can_never_authenticate(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    body = """
  const tokens = client.token("coins", alice);
  for (const to of ["bob", "AB".repeat(32), "", "ab".repeat(33)]) {
    try {
      await tokens.transfer(to, 5);
      out[to] = "sent";
    } catch (error) {
      out[to] = `${error.name}: ${error.message}`;
    }
  }
"""
    before = _calls(mesh, "Execute")
    out = node_eval(_client_script(mesh, mesh.public_address, body))
    assert len(out) == 4
    for message in out.values():
        assert message.startswith("UnknownRecipient: ")
        assert "nothing was sent" in message
    assert "it authenticates Ed25519 keys" in out["bob"]
    assert _calls(mesh, "Execute") == before
    assert _balance(mesh, funded[1]) == 0


# --- 2. no traceback for any input -----------------------------------------------------------------

MODULES = sorted(NODE_CLIENT.glob("*.mjs"))
SCRIPTS = [m for m in MODULES if m.read_text().startswith("#!")]  # the commands (a shebang)


@pytest.mark.parametrize("script", [m.name for m in SCRIPTS])
def test_every_node_command_answers_help_and_refuses_nonsense_in_one_line(script: str) -> None:
    for flag in ("--help", "-h"):
        result = run_node(str(NODE_CLIENT / script), flag)
        assert (result.returncode, result.stderr) == (0, ""), (script, result.stderr)
        assert result.stdout.startswith("usage: "), script
    _one_line_refusal(run_node(str(NODE_CLIENT / script), "--no-such-option"), status=2)


@pytest.mark.parametrize("module", [m.name for m in MODULES if m not in SCRIPTS])
def test_a_library_module_run_as_a_command_says_so_without_a_trace(module: str) -> None:
    result = run_node(str(NODE_CLIENT / module), "--help")
    assert result.returncode == 0
    assert "    at " not in result.stderr
    assert "Error" not in result.stderr


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _set(option: str, value: str | None) -> dict[str, str | None]:
    return {option: value}


# (what to change in a valid transfer's arguments, the exit status, words of the one-line reason)
HOSTILE: list[tuple[dict[str, str | None], int, str]] = [
    *[
        (_set("--amount", amount), 2, "--amount must be a whole number from 1 to 18446744073709551615")
        for amount in ["0", "1.5", "1e3", "0x10", " 5", "NaN", "18446744073709551616", "9" * 40]
    ],
    ({"--amount": "-5"}, 2, "--amount must be a whole number from 1 to"),  # the parser read "-5" as an option
    ({"--amount=-5": ""}, 2, "--amount must be a whole number"),
    ({"--amount": ""}, 2, "--amount is required"),
    *[
        (_set("--gateway", gateway), 2, "is not a gateway address: HOST:PORT with a port from 1 to 65535")
        for gateway in ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "http://127.0.0.1:50050", "a b:1"]
    ],
    *[
        (_set("--instance", instance), 2, "--instance must be lowercase letters")
        for instance in ["Coins", "a" * 64, "../coins"]
    ],
    ({"--to": "bobb"}, 1, "is not a known identity or contact"),
    ({"--request-id": "x" * 65}, 2, "a request id is 1 to 64 printable ASCII characters"),
    ({"--request-id": "caf\u00e9"}, 2, "a request id is 1 to 64 printable ASCII characters"),
    *[(_set("--timeout", timeout), 2, "--timeout must be a whole number") for timeout in ["0", "1.5", "301"]],
    ({"--to": None}, 2, "--to is required"),
    ({"--as": "../alice"}, 2, "--as names an identity"),
    ({"--as": "nobody"}, 1, "cannot read identity"),
    ({"--as": None}, 2, "give the sender as --as NAME or --key FILE"),
    ({"--key": "{data}/identities/alice.key"}, 2, "give the sender as --as NAME or --key FILE"),  # and --as
    (
        {"--as": None, "--key": "/nonexistent/alice.key"},
        1,
        "cannot read identity /nonexistent/alice.key: no such file",
    ),
    ({"--as": None, "--key": "{data}/key-dir"}, 1, "is not a PEM private key"),
    ({"--as": None, "--key": "{data}/not-a.key"}, 1, "is not a PEM private key"),
    ({"--as": None, "--key": "{data}/loose.key"}, 1, "is readable by others; chmod 600 it"),
    ({"--data-dir": "/nonexistent/.veil"}, 1, "no Veil data directory at /nonexistent/.veil"),
    ({"--data-dir": "{data}/counters.json"}, 1, "no Veil data directory"),
    ({"--policy": "/nonexistent/policy.json"}, 1, "policy refused: cannot read /nonexistent/policy.json"),
    ({"--policy": "{data}/pki/ca.pem"}, 1, "is not valid JSON"),
    ({"--counters": "/nonexistent/dir/counters.json"}, 1, "its directory does not exist"),
    ({"stray": ""}, 2, "does not take positional arguments"),
    ({"--no-such-option": ""}, 2, "Unknown option '--no-such-option'"),
    ({"--server-name": "elsewhere.example"}, 1, "it accepts connections, but no TLS session came up"),
    ({"--gateway": "{admin}"}, 1, "its mutual-TLS port wants a client certificate"),  # and none is sent
]


def _arguments(mesh: InProcessMesh, changes: dict[str, str | None]) -> list[str]:
    """A valid transfer's arguments with `changes`: None drops an option, a new key is added
    alone (or with its value when there is one), "{data}" is the data directory, "{admin}" the
    gateway's mTLS port."""
    options: dict[str, str | None] = {
        "--gateway": mesh.public_address,
        "--server-name": "localhost",
        "--data-dir": str(mesh.data_dir),
        "--as": "alice",
        "--instance": "coins",
        "--to": "bob",
        "--amount": "5",
    }
    arguments: list[str] = []
    for option, value in {**options, **changes}.items():
        if value is None:
            continue
        arguments.append(option)
        if option in options or value:
            arguments.append(value.replace("{data}", str(mesh.data_dir)).replace("{admin}", mesh.address))
    return arguments


def test_hostile_arguments_get_one_line_and_a_nonzero_exit_and_send_nothing(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    loose = mesh.data_dir / "loose.key"
    loose.write_bytes((mesh.data_dir / "identities" / "alice.key").read_bytes())
    loose.chmod(0o644)
    (mesh.data_dir / "key-dir").mkdir(mode=0o700)
    (mesh.data_dir / "not-a.key").write_text("-----BEGIN PRIVATE KEY-----\nnonsense\n")
    (mesh.data_dir / "not-a.key").chmod(0o600)
    before = _calls(mesh, "GetAttestation"), _calls(mesh, "Execute")

    def attempt(case: tuple[dict[str, str | None], int, str]) -> str | None:
        changes, status, reason = case
        result = run_node(str(NODE_CLIENT / "transfer.mjs"), *_arguments(mesh, changes))
        try:
            _one_line_refusal(result, reason, status=status)
        except AssertionError as failure:
            return f"{changes}: {failure}\n{result.stderr}"
        return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        failures = [f for f in pool.map(attempt, HOSTILE) if f is not None]
    assert failures == [], "\n".join(failures)
    assert _calls(mesh, "Execute") == before[1]  # nothing sent
    assert _balance(mesh, funded[1]) == 0


def test_a_mesh_that_is_down_fails_in_seconds_naming_the_address(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity]
) -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_node(str(NODE_CLIENT / "transfer.mjs"), *_arguments(mesh, {"--gateway": address}))
    elapsed = time.monotonic() - started
    _one_line_refusal(result, f"cannot reach the gateway at {address} within 3 s", "ECONNREFUSED", "make run")
    assert elapsed < 8, elapsed  # 3 s to connect, and Node's start-up


# --- 3. safe retries: one request id, one transfer ------------------------------------------------

evil = node_tests.evil  # a gateway in front of the mesh whose Execute a test decides


@dataclass(frozen=True)
class Sent:
    """One Execute that reached the mesh through the losing gateway."""

    request_id: str
    ciphertext: bytes
    accepted: bool
    answered: bool  # False: it ran, but the client got UNAVAILABLE


@dataclass
class LosingGateway:
    """A gateway in front of the mesh: every command runs, but its answer is lost until the file
    `answering` exists."""

    address: str
    answering: Path
    sent: list[Sent] = field(default_factory=list)


@pytest.fixture
def losing(evil: tuple[node_tests.HostileGateway, str], tmp_path: Path) -> LosingGateway:
    servicer, address = evil
    gateway = LosingGateway(address, tmp_path / "answering")

    def lose_answers(request: Any, context: grpc.ServicerContext, forward: Callable[[], Any]) -> Any:
        reply = forward()  # the command runs
        answered = gateway.answering.exists()
        gateway.sent.append(
            Sent(request.request_id, request.command.ciphertext, reply.outcome.accepted, answered)
        )
        if not answered:
            abort(context, Unavailable("connection reset by peer"))
        return reply

    servicer.execute_hook = lose_answers
    return gateway


def test_a_transfer_retried_with_its_request_id_after_a_lost_answer_is_applied_once(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], losing: LosingGateway
) -> None:
    body = f"""
  const tokens = client.token("coins", alice);
  const bob = readFileSync(path.join(dir, "identities", "bob.pub"), "utf8").trim();
  const requestId = "order-1234";
  try {{
    await tokens.transfer(bob, 10, {{ requestId }});
    out.first = "answered";
  }} catch (error) {{
    out.first = `${{error.name}} ${{error.requestId}}`;
  }}
  (await import("node:fs")).writeFileSync({json.dumps(str(losing.answering))}, "");  // answers get through
  out.balance = String(await tokens.transfer(bob, 10, {{ requestId }}));  // the retry
  out.counter = tokens.last.counter;
  out.again = String(await tokens.transfer(bob, 10, {{ requestId }}));  // answered, nothing sent
  for (const [what, retry] of [
    ["another call", () => tokens.transfer(bob, 11, {{ requestId }})],
    ["a bad id", () => tokens.transfer(bob, 10, {{ requestId: "x".repeat(65) }})],
  ]) {{
    try {{
      await retry();
    }} catch (error) {{
      out[what] = `${{error.name}}: ${{error.message}}`;
    }}
  }}
"""
    out = node_eval(_client_script(mesh, losing.address, body, timeout_ms=1500))
    assert out["first"] == "NoAnswer order-1234"  # UNAVAILABLE for 1.5 s: no answer
    assert (out["balance"], out["again"], out["counter"]) == ("90", "90", 2)
    assert _balance(mesh, funded[1]) == 10  # once
    # Every attempt, the client's own and the application's retry, sent the same sealed bytes
    # under the same request id; the mesh ran the first and answered the others from its record.
    assert len(losing.sent) >= 2
    assert {(s.request_id, s.ciphertext) for s in losing.sent} == {("order-1234", losing.sent[0].ciphertext)}
    assert all(s.accepted for s in losing.sent)
    assert out["another call"] == (
        'InputError: request id "order-1234" already names another call; nothing was sent'
    )
    assert (
        out["a bad id"] == "InputError: a request id is 1 to 64 printable ASCII characters; nothing was sent"
    )
    answered = [s.request_id for s in losing.sent if s.answered]
    assert answered == ["order-1234"]  # one send for the retry; the repeats sent nothing


def test_the_command_resumes_a_transfer_by_its_request_id_in_another_process(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], losing: LosingGateway
) -> None:
    address = losing.address
    lost = node_transfer(mesh, address, "bob", "--timeout", "1")  # alice sends bob 10
    assert lost.returncode == 3, lost.stderr
    resume = re.search(
        r"run the same command with --request-id (\S+) to resume it \(it runs at most once\)", lost.stderr
    )
    assert resume is not None, lost.stderr
    request_id = resume[1]
    journal = list((mesh.data_dir / "node-calls").iterdir())
    assert len(journal) == 1
    assert journal[0].stat().st_mode & 0o777 == 0o600  # it holds the call's response key
    losing.answering.touch()

    resumed = node_transfer(mesh, address, "bob", "--request-id", request_id)
    assert resumed.returncode == 0, resumed.stderr
    answer = json.loads(resumed.stdout)
    assert (answer["balance"], answer["counter"]) == ("90", 2)
    count = len(losing.sent)
    again = node_transfer(mesh, address, "bob", "--request-id", request_id)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["receipt"] == answer["receipt"]  # its answer, kept
    assert len(losing.sent) == count  # and nothing sent
    other = node_transfer(mesh, address, "bob", "--request-id", request_id, amount=11)
    _one_line_refusal(other, f'request id "{request_id}" already names another call')
    assert {s.request_id for s in losing.sent} == {request_id}  # one sealing, sent again byte for byte
    assert _balance(mesh, funded[1]) == 10  # once


# --- 4. the Node README, as written ---------------------------------------------------------------

README = NODE_CLIENT / "README.md"
EXPECTED = re.compile(r"#\s*exit (\d+): (.+)$")  # a command's comment: its exit status and reason


def test_every_command_of_the_node_readme_runs_as_written(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], tmp_path: Path
) -> None:
    """Each fenced block, from a directory laid out like the repository root after `make run`
    (`.veil` is the mesh's data directory); only the gateway's port differs."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".veil").symlink_to(mesh.data_dir)
    (work / "clients").symlink_to(REPO_ROOT / "clients")
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert {language for language, _ in blocks} == {"sh", "js"}  # a block of another kind needs a runner here
    ran = 0
    for language, text in blocks:
        source = text.replace("127.0.0.1:50050", mesh.public_address)
        if language == "js":
            result = run_node("--input-type=module", "-e", source, cwd=work)
            assert result.returncode == 0, (text, result.stderr)
            assert "sent 5 to bob under " in result.stdout
        else:
            command = source.replace("\\\n", " ").strip()
            expected = EXPECTED.search(command)
            result = subprocess.run(
                ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False, cwd=work
            )
            if expected is None:
                assert result.returncode == 0, (text, result.stderr)
                assert "    at " not in result.stderr
            else:
                _one_line_refusal(result, expected[2].strip(), status=int(expected[1]))
        ran += 1
    assert ran == len(blocks) >= 7
    # The transfers by name, by account, under a request id (run twice: once), the library's,
    # the library's batch.
    assert _balance(mesh, funded[1]) == 5 + 1 + 2 + 5 + 5 + 2
