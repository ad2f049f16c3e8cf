"""Request ids are scoped by the caller the gateway authenticated (an outside review).

The state service answers a repeated request id with the first command's answer whatever
command comes with it: a new sealing under an application-named id that already ran (a CSV row
rerun after its journal was lost) gets an answer it cannot open, "outcome unknown", and never
runs twice. Unscoped, another tenant who knew or guessed an id could take it first (the owner's
command then got the squatter's answer, unopenable: its account stuck on an unsettled call) or
read the owner's outcome (accepted, sequence, sealed size) under it. The gateway now forwards
`<request id>@<scope of the caller>`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.support import InProcessMesh, mesh_fixture, token_config
from veil.sdk.calls import MemoryCalls
from veil.sdk.client import VeilClient
from veil.sdk.counters import MemoryCounters
from veil.sdk.errors import IntegrityError
from veil.sdk.identity import SigningIdentity, new_identity
from veil.services.common.errors import InvalidArgument
from veil.services.gateway import validation
from veil.services.gateway.idempotency import (
    SCOPE_CHARS,
    SCOPE_SEPARATOR,
    scoped_request_id,
)

KEYS = {"tenant-a": "key-of-a", "tenant-b": "key-of-b"}


@pytest.fixture
def mesh(pki_dir: Path, tmp_path: Path) -> Iterator[InProcessMesh]:
    auth = tmp_path / "gateway-auth.json"
    hashed = {name: "sha256:" + hashlib.sha256(key.encode()).hexdigest() for name, key in KEYS.items()}
    auth.write_text(
        json.dumps({"default": {"type": "none"}, "instances": {"coins": {"type": "api_key", "keys": hashed}}})
    )
    yield from mesh_fixture(pki_dir, tmp_path, gateway_options={"auth_file": auth})


def _tenant(mesh: InProcessMesh, name: str, **options: object) -> VeilClient:
    """A tenant's client; its own calls store (the tenants are two machines: the test shares
    one data dir, whose store would refuse an id that names another call)."""
    options.setdefault("calls", MemoryCalls())
    return mesh.connect(api_key=KEYS[name], **options)  # type: ignore[arg-type]


@pytest.fixture
def funded(mesh: InProcessMesh) -> tuple[SigningIdentity, SigningIdentity, SigningIdentity]:
    """Treasury, and alice (tenant a) and bob (tenant b) with 100 each."""
    treasury, alice, bob = (new_identity(mesh.data_dir, name) for name in ("treasury", "alice", "bob"))
    with _tenant(mesh, "tenant-a") as client:
        client.create_instance("coins", token_config(treasury.public_key))
        for who in (alice, bob):
            client.token("coins", treasury).mint(who.account, 100)
    return treasury, alice, bob


def test_another_tenant_cannot_take_an_id_first(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity, SigningIdentity]
) -> None:
    treasury, alice, bob = funded
    with _tenant(mesh, "tenant-b") as squatter:
        assert squatter.token("coins", bob).transfer(treasury.account, 1, request_id="invoice-42") == 99
    with _tenant(mesh, "tenant-a") as owner:  # its own command under the id: runs, its own answer
        assert owner.token("coins", alice).transfer(treasury.account, 2, request_id="invoice-42") == 98


def test_another_tenant_never_gets_an_owners_answer(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity, SigningIdentity]
) -> None:
    treasury, alice, bob = funded
    with _tenant(mesh, "tenant-a") as owner:
        owner.token("coins", alice).transfer(treasury.account, 5, request_id="order-1")
        head = mesh.states[0].head("coins")
    with _tenant(mesh, "tenant-b") as other:  # the same id: its own command, run as itself
        assert other.token("coins", bob).transfer(treasury.account, 3, request_id="order-1") == 97
    assert mesh.states[0].head("coins") == head + 1


def test_within_one_tenant_a_reused_id_still_never_runs_twice(
    mesh: InProcessMesh, funded: tuple[SigningIdentity, SigningIdentity, SigningIdentity]
) -> None:
    """What the id's first-answer rule is for: the same caller, its records lost (a new
    process, no calls or counters kept), seals the call again under its id: not run again."""
    treasury, alice, _ = funded
    with _tenant(mesh, "tenant-a") as first:
        assert first.token("coins", alice).transfer(treasury.account, 10, request_id="row-7") == 90
    head = mesh.states[0].head("coins")
    with _tenant(mesh, "tenant-a", counters=MemoryCounters()) as rerun:
        with pytest.raises(IntegrityError):
            rerun.token("coins", alice).transfer(treasury.account, 10, request_id="row-7")
        assert rerun.token("coins", alice).balance() == 90
    assert mesh.states[0].head("coins") == head


def test_a_scope_is_one_readable_suffix_per_tenant() -> None:
    a = scoped_request_id("api-key", "api-key:coins:tenant-a", "x@y")
    b = scoped_request_id("api-key", "api-key:coins:tenant-b", "x@y")
    assert a != b
    assert a.startswith("x@y" + SCOPE_SEPARATOR)
    assert len(a) == len("x@y") + 1 + SCOPE_CHARS
    assert a[: -(SCOPE_CHARS + 1)] == "x@y"
    assert scoped_request_id("api-key", "api-key:coins:tenant-a", "x@y") == a  # a retry finds its record
    # The scope is the fixed-length tail, so an id that looks scoped stays another tenant's id;
    # and no client can send one that looks scoped (a fourth review: on an instance without a
    # plugin yet, "invoice-42" + "@" + <tenant-a's scope> was planted for tenant a's "invoice-42").
    assert scoped_request_id("api-key", "api-key:coins:tenant-b", "x@y" + a[-SCOPE_CHARS - 1 :]) != a
    with pytest.raises(InvalidArgument):
        validation.request_id(a)
    # Without gateway authentication there are no tenants: the id as it is, whoever calls.
    for kind, key in (("anonymous", "anonymous:"), ("certificate", "certificate:spiffe://veil/admin")):
        assert scoped_request_id(kind, key, "x@y") == "x@y"


def test_without_gateway_authentication_a_rerun_with_or_without_a_certificate_never_runs_twice(
    pki_dir: Path, tmp_path: Path
) -> None:
    """A third review: scoped by whatever principal the gateway saw, an instance without gateway
    authentication gave the admin certificate one scope and the public port (no certificate:
    the Node client, `--no-client-cert`) another, so a CSV row rerun without the certificate
    after its records were lost ran again. Such an instance keeps one scope."""
    for mesh in mesh_fixture(pki_dir, tmp_path):
        treasury, alice = new_identity(mesh.data_dir, "treasury"), new_identity(mesh.data_dir, "alice")
        with mesh.connect(calls=MemoryCalls()) as admin:
            admin.create_instance("coins", token_config(treasury.public_key))
            admin.token("coins", treasury).mint(alice.account, 100)
            assert admin.token("coins", alice).transfer(treasury.account, 10, request_id="csv-row-2") == 90
        head = mesh.states[0].head("coins")
        with mesh.connect(admin=False, counters=MemoryCounters(), calls=MemoryCalls()) as public:
            with pytest.raises(IntegrityError):
                public.token("coins", alice).transfer(treasury.account, 10, request_id="csv-row-2")
            assert public.token("coins", alice).balance() == 90
        assert mesh.states[0].head("coins") == head
