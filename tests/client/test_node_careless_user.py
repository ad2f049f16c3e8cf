"""The Node.js client (clients/node) as a careless user meets it: names, arguments, retries.

A mistyped recipient never becomes an account; no argument produces a stack trace or sends
anything; an application retrying a transfer with the same request id after a lost answer
pays once. Every script runs as a real subprocess against the in-process mesh, on its public
port, directly or through a gateway that loses answers.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.client import test_node_client as node_tests
from tests.client.test_node_client import node_eval, node_transfer
from tests.gateway.support import InProcessMesh
from veil.sdk.identity import SigningIdentity, new_identity

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
    # A contact as `veil contact add carol ACCOUNT` writes it.
    (mesh.data_dir / "identities" / "contacts.json").write_text(json.dumps({"carol": carol.account}))
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
