"""A fast instance that runs batches before the keyvault registered it for this boot (after
CreateInstance, or a restore with a tail the keyvault has not seen): those answers are held
until the keyvault confirms their heads, and once it is live its later answers go out at once.

The wedge this guards against: the first confirmation made the instance live and released only
the holds up to its head; the host then skipped ConfirmHead for the (now registered) fast
instance, so the hold of the batch that ran meanwhile was never released, and the enclave
wrapped every later answer under that same hold: all answers of the instance were parked until
the enclave rebooted."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.enclave.support import NOW_MS, Client, Harness, Sealed, config, head_confirmation, vault
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2
from veil.services.state.enclave_host import EnclaveCallError
from veil.services.state.holds import HeldAnswers, unwrap
from veil.services.state.metrics import StateMetrics
from veil.services.state.startup import InstanceState, _take

FAST = envelope_pb2.ACKNOWLEDGMENT_FAST


def _put(i: int) -> apps_pb2.AppCall:
    return vault(put=apps_pb2.VaultPut(record_id=f"r{i}", data=b"x"))


@dataclass
class _Host:
    """The honest state host's side of it: its view of the instances, its held answers, and
    `_take` as the head advancer calls it with each confirmation."""

    h: Harness
    instances: dict[str, InstanceState] = field(default_factory=dict)
    holds: HeldAnswers = field(default_factory=HeldAnswers)
    metrics: StateMetrics = field(default_factory=StateMetrics)
    refused: list[str] = field(default_factory=list)

    @property
    def enclave(self) -> object:
        return self.h.host

    def take(self, instance_id: str) -> int:
        """The keyvault's confirmation of the head it holds now, handed over as the advancer does."""
        head = self.h.keyvault[instance_id].head
        return _take(
            self,  # type: ignore[arg-type]
            instance_id=instance_id,
            on_refused=lambda _r, why: self.refused.append(why),
            on_broken=lambda _r, why: self.refused.append(why),
            confirmation=head_confirmation(instance_id, head, self.h.keys.signing_public_key),
        )


def _created(h: Harness, instance_id: str) -> _Host:
    """A fast instance created and its genesis link sent; the keyvault's answer not in yet."""
    h.auto_confirm = False
    cfg = config(acknowledgment=FAST)
    h.provision(instance_id)
    created = h.host.create_instance(instance_id, cfg, h.statement(instance_id), NOW_MS)
    h.log[instance_id] = [created.entry]
    h.advance(created.link)  # the keyvault registers head 1; its confirmation is on its way
    host = _Host(h)
    host.instances[instance_id] = InstanceState(cfg, created.link.head, 0)  # as `_create` leaves it
    host.holds.key(instance_id, 1)  # CreateInstance waits for the genesis to be registered
    return host


def _batch(
    h: Harness, client: Client, i: int
) -> tuple[Sealed, ecall_pb2.ExecuteBatchResponse, envelope_pb2.CommandOutcome]:
    """One command in its own batch, its entries logged; nothing sent to the keyvault."""
    sealed = client.seal(_put(i))
    response = h.host.execute_batch(client.instance_id, [sealed.command], NOW_MS)
    h.log[client.instance_id].extend(response.entries)
    return sealed, response, response.outcomes[0]


def test_a_batch_run_before_registration_is_answered_and_later_answers_are_not_held(
    harness: Harness,
) -> None:
    h = harness
    host = _created(h, "f")
    alice = h.client("f")
    # A command arrives while the genesis is being registered: run, its answer held under 2.
    early, r2, out2 = _batch(h, alice, 2)
    assert r2.held_until == 2
    key2 = host.holds.key("f", 2)  # the host waits on it before it sends the link
    # The confirmation of head 1 makes the instance live (descriptor), releases hold 1 only:
    # the keyvault has not seen head 2, so nothing vouches for the answer held under it yet.
    assert host.take("f") == 0
    assert host.instances["f"].descriptor is not None
    assert host.holds.key("f", 1).done()
    assert not key2.done()
    # Live now, the fast instance answers at once (once durable, the host's part): no hold.
    later, r3, out3 = _batch(h, alice, 3)
    assert (r3.held_until, r3.read_round) == (0, 0)
    assert not alice.read(later, out3).HasField("error")
    # The links reach the keyvault; its confirmation passes to the enclave while an answer of
    # the instance still waits for one, and releases it.
    h.advance(r2.link)
    h.advance(r3.link)
    ecalls = h.host.ecalls
    assert host.take("f") == 0
    assert h.host.ecalls == ecalls + 1
    assert key2.done()
    unwrap(key2.result(), "f", 2, out2)
    assert not alice.read(early, out2).HasField("error")
    # Nothing waits any more: the later confirmations of the fast instance cost no ECALL.
    for i in range(4, 7):
        _, r, _ = _batch(h, alice, i)
        assert r.held_until == 0
        h.advance(r.link)
        assert host.take("f") == 0
    assert h.host.ecalls == ecalls + 1 + 3  # the three batches only
    assert not host.refused


def test_nothing_held_for_a_fast_instance_opens_before_the_keyvault_vouches_for_it(
    harness: Harness,
) -> None:
    """The adversarial host: the held answers of a fast instance not yet registered for this
    boot stay sealed under anything but the keyvault's own confirmation of their head."""
    h = harness
    _created(h, "f")
    alice = h.client("f")
    _, r2, _ = _batch(h, alice, 2)
    _, r3, _ = _batch(h, alice, 3)
    assert (r2.held_until, r3.held_until) == (2, 3)
    forger = ed25519.Ed25519PrivateKey.generate()
    for bad in (
        head_confirmation("f", r3.link.head, h.keys.signing_public_key, signer=forger),
        head_confirmation("f", r3.link.head, b"\x01" * 32),
    ):
        with pytest.raises(EnclaveCallError):
            h.host.confirm_head(bad)
    # A read fence whose statement says the keyvault holds nothing: not live, nothing released.
    challenge = h.host.issue_challenge("f", reads=True)
    fence = h.host.confirm_head(statement=h.statement_for("f", challenge, envelope_pb2.CommitHead()))
    assert not fence.released
    assert not fence.HasField("descriptor")
    _, r4, _ = _batch(h, alice, 4)
    assert r4.held_until == 4
    # A read fence stating the genesis only: live, hold 1 released, the later ones still held.
    fence = h.read_fence("f")
    assert [hold.held_until for hold in fence.released] == [1]
    assert fence.HasField("descriptor")
    _, r5, _ = _batch(h, alice, 5)
    assert r5.held_until == 0
    # Up to head 3 confirmed: holds 2 and 3; then 4.
    for link in (r2.link, r3.link):
        h.advance(link)
    assert [hold.held_until for hold in h.confirm("f")] == [2, 3]
    h.advance(r4.link)
    h.advance(r5.link)
    assert [hold.held_until for hold in h.confirm("f")] == [4]


def test_a_fast_instance_restored_with_an_unseen_tail_answers_at_once_once_confirmed(
    harness: Harness,
) -> None:
    a = harness
    a.create("f", config(acknowledgment=FAST))
    alice = a.client("f")
    a.call(alice, _put(1))  # head 2, confirmed
    a.auto_confirm = False
    _batch(a, alice, 2)  # head 3: durable in the database, its link never sent
    b = a.restarted()
    b.auto_confirm = False
    assert b.restore("f", list(a.log["f"])).sequence == 3  # kv head 2: not live, the tail sent
    alice = b.client("f", account=alice.account)
    alice.counter = 2
    _, r4, _ = _batch(b, alice, 4)
    assert r4.held_until == 4
    assert [hold.held_until for hold in b.confirm("f")] == [3]  # the tail: live now
    later, r5, out5 = _batch(b, alice, 5)
    assert r5.held_until == 0
    assert not alice.read(later, out5).HasField("error")
    b.advance(r4.link)
    assert [hold.held_until for hold in b.confirm("f")] == [4]
