"""The Node client: a call refused when it is kept (another account's call kept the request id
first) never overwrites the owner's entry. A review found its unsent sealing left in
`state.attempts`, so the error path stored it over the owner's kept call (sent, no answer, held
by the host): the owner's resume was refused as "another call" while its sealing could still run."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import grpc

from tests.client.node_support import node_clients, node_eval
from tests.client.test_node_client import HostileGateway, _balance, evil, funded
from tests.gateway.support import InProcessMesh
from veil.sdk.identity import SigningIdentity

__all__ = ["evil", "funded"]

_HELPERS = """
const alice = veil.loadIdentity(dir + "/identities/alice.key");
const bob = veil.loadIdentity(dir + "/identities/bob.key");
const outcome = (p) => p.then(
  (r) => ({ ok: String(r.accepted) }),
  (e) => ({ error: e.constructor.name, message: e.message, requestId: e.requestId ?? null }),
);
const pay = (to, amount) => ({ token: { transfer: { to: to.account, amount } } });
"""


def test_node_refused_call_never_overwrites_the_owners_entry(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity], evil: tuple[HostileGateway, str]
) -> None:
    alice, bob = funded
    servicer, address = evil
    held: list[Any] = []

    def hook(request: Any, context: grpc.ServicerContext, forward: Any) -> Any:
        if request.request_id == "inv-42":
            held.append(request)  # the host keeps alice's sealing and drops the answer
            context.abort(grpc.StatusCode.UNAVAILABLE, "gateway restarting")
        return forward()

    servicer.execute_hook = hook
    prelude = node_clients(mesh.data_dir, address, timeout_ms=1500) + _HELPERS
    result = node_eval(
        prelude
        + """
        const a = make(), b = make();
        let release; const aliceDone = new Promise((r) => (release = r));
        let entered; const bobSealing = new Promise((r) => (entered = r));
        const attest = b.attest.bind(b);
        let first = true;
        b.attest = async (...args) => {
          if (first) { first = false; entered(); await aliceDone; }
          return attest(...args);
        };
        // bob's call claims "inv-42" (nothing kept yet), then seals while alice's call is kept and sent.
        const bobP = outcome(b.execute("coins", pay(alice, 5), bob, { requestId: "inv-42" }));
        await bobSealing;
        const aliceFirst = await outcome(a.execute("coins", pay(bob, 10), alice, { requestId: "inv-42" }));
        release();
        const bobR = await bobP;
        a.close(); b.close();
        // alice's process again: resume her call, as her first error said.
        const c = make();
        const resumed = await outcome(c.execute("coins", pay(bob, 10), alice, { requestId: "inv-42" }));
        c.close();
        console.log(JSON.stringify({ aliceFirst, bobR, resumed }));
        """
    )
    kept = mesh.data_dir / "node-calls" / f"{hashlib.sha256(b'inv-42').hexdigest()}.json"
    document = json.loads(kept.read_text()) if kept.exists() else None
    owner = document and document["account"]
    assert held, result  # alice's sealing reached the host
    assert result["aliceFirst"]["requestId"] == "inv-42", result
    # The host now runs the sealing it held: alice's transfer may still run.
    servicer.upstream.Execute(held[0], timeout=10)
    after = _balance(mesh, alice)
    assert owner == alice.account, (
        f"node-calls/ entry for inv-42 belongs to {'bob' if owner == bob.account else owner} "
        "after bob's refused call: "
        f"alice's kept call (sent, held by the host, ran later: balance {after}) was overwritten; "
        f"her resume got {result['resumed']}; bob got {result['bobR']}"
    )
