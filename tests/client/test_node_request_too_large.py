"""The Node client refuses a sealed command over the gateway's request limit before it keeps or
sends it (as the Python SDK does: tests/client/test_request_too_large.py), alone or in a batch,
and the account's next calls run: kept, such a call could never be answered and held them up."""

from __future__ import annotations

from tests.client.node_support import node_clients, node_eval
from tests.client.test_request_too_large import create_records, sent_to_state
from tests.gateway.support import InProcessMesh, write_fake_mesh_policy
from veil.sdk.client import MAX_REQUEST_BYTES
from veil.sdk.identity import new_identity


def test_node_refuses_an_oversized_command_unsent_and_the_next_calls_run(mesh: InProcessMesh) -> None:
    new_identity(mesh.data_dir, "alice")
    write_fake_mesh_policy(mesh.data_dir)
    with mesh.connect() as admin:
        create_records(admin)
    prelude = (
        node_clients(mesh.data_dir, mesh.public_address, timeout_ms=5000)
        + f"""
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const put = (recordId, size) => ({{ vault: {{ put: {{ recordId, data: Buffer.alloc(size, 7) }} }} }});
        const outcome = (p) => p.then(
          (r) => (Array.isArray(r) ? r.map((one) => String(one.answer?.accepted)) : String(r.accepted)),
          (e) => ({{ error: e.constructor.name, message: e.message, requestId: e.requestId ?? null }}),
        );
        const big = {MAX_REQUEST_BYTES} + 1;
        const client = make();
        """
    )
    sent = sent_to_state(mesh)
    refused = node_eval(
        prelude
        + """
        const alone = await outcome(
          client.execute("records", put("big", big), alice, { requestId: "row-1" }),
        );
        const batch = await outcome(
          client.executeMany("records", [put("a", 1), put("big", big), put("c", 1)], alice),
        );
        client.close();
        console.log(JSON.stringify({ alone, batch }));
        """
    )
    for failure in refused.values():
        assert failure["error"] == "RequestTooLarge", refused
        assert "nothing was sent" in failure["message"]
        assert failure["requestId"] is None  # nothing to resume
    assert sent_to_state(mesh) == sent
    # Another process on the same data dir: nothing kept, and the account's next calls run.
    after = node_eval(
        prelude
        + """
        const kept = client.calls.pending("records", alice.account).length;
        const next = await outcome(client.execute("records", put("small", 2), alice));
        const nextBatch = await outcome(client.executeMany("records", [put("a", 1), put("c", 1)], alice));
        client.close();
        console.log(JSON.stringify({ kept, next, nextBatch }));
        """
    )
    assert after == {"kept": 0, "next": "true", "nextBatch": ["true", "true"]}


def test_node_uses_the_counter_up_when_the_gateway_refuses_a_command_as_too_large(
    mesh: InProcessMesh,
) -> None:
    """A maxRequestBytes above the gateway's limit: the gateway refuses the command unread; the
    client uses its counter up with the read-only filler (a sealing the host holds can never
    run), drops the call, and the account's next call runs."""
    new_identity(mesh.data_dir, "alice")
    write_fake_mesh_policy(mesh.data_dir)
    with mesh.connect() as admin:
        create_records(admin)
    result = node_eval(
        node_clients(mesh.data_dir, mesh.public_address, timeout_ms=5000)
        + f"""
        const alice = veil.loadIdentity(dir + "/identities/alice.key");
        const put = (recordId, size) => ({{ vault: {{ put: {{ recordId, data: Buffer.alloc(size, 7) }} }} }});
        const client = make();
        client.maxRequestBytes = 4 * {MAX_REQUEST_BYTES};
        let refused;
        try {{
          const big = put("big", {MAX_REQUEST_BYTES} + 1);
          await client.execute("records", big, alice, {{ requestId: "row-1" }});
        }} catch (e) {{
          const {{ message, sent }} = e;
          refused = {{ error: e.constructor.name, message, sent, requestId: e.requestId ?? null }};
        }}
        const kept = client.calls.pending("records", alice.account).length;
        const next = (await client.execute("records", put("small", 2), alice)).accepted;
        client.close();
        console.log(JSON.stringify({{ refused, kept, next }}));
        """
    )
    refused = result["refused"]
    assert refused["error"] == "RequestTooLarge", result
    assert refused["sent"] is True
    assert "nothing ran" in refused["message"]
    assert refused["requestId"] is None
    assert result["kept"] == 0
    assert result["next"] is True
