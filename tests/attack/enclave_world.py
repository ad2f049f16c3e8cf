"""An initialized in-process enclave with one instance per app and auth scheme, plus valid inputs.

The ECALL and sealed-command attacks start from a `World`: a real `Enclave` behind the real
`Dispatcher` (sim quote and sealing providers over the dev PCK chain), with

* ``v``: vault, no authentication; ``t``: token, Ed25519 signatures; ``b``: ballot with an
  open poll; ``o``: vault behind OAuth2 (ES256 JWKS); ``spare``: a provisioned key, no instance;
* a little history in each, so Restore, Snapshot and Unseal have real inputs;
* `seeds`: one valid, serialized request per ECALL method (refused or idempotent when replayed,
  so that only a mutation can make it do something new).

`state_of` reads an instance's plaintext state the way only a key holder can (Snapshot, then
open it with the data key the test keyvault released), so tests can say exactly which keys a
batch changed.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm

from tests.enclave.support import (
    KEYVAULT_RELEASE_PUBLIC_KEY,
    NOW_MS,
    Client,
    Harness,
    config,
    head_confirmation,
    wrap_key,
)
from veil.enclave import crypto, wire
from veil.enclave.dispatcher import Dispatcher, ecall_table
from veil.enclave.measurement import measure_source_tree
from veil.enclave.providers.sealing import SimSealingProvider
from veil.enclave.providers.sim_quote import SimQuoteProvider
from veil.enclave.runner import PCK_FILES, PCK_KEY_FILE
from veil.enclave.runtime import Enclave
from veil.enclave.v1 import apps_pb2, ecall_pb2, envelope_pb2, storage_pb2

OAUTH_ISSUER, OAUTH_AUDIENCE = "https://login.attack.test", "veil"
#: Small enough that a "huge field" command can hit the budget, large enough for the history.
MEMORY_BUDGET = 256 * 1024
INSTANCES = ("v", "t", "b", "o")
StateKey = tuple[str, ...]

_MEASUREMENT: list[bytes] = []


def mrenclave() -> bytes:
    """The sim measurement of the enclave sources (hashed once per process)."""
    if not _MEASUREMENT:
        _MEASUREMENT.append(measure_source_tree())
    return _MEASUREMENT[0]


def sim_quotes(pki_dir: Path) -> SimQuoteProvider:
    """The sim quote provider over the dev PCK chain, as the runner builds it."""
    return SimQuoteProvider(
        mrenclave=mrenclave(),
        pck_chain_pem=b"".join((pki_dir / name).read_bytes() for name in PCK_FILES),
        pck_leaf_key_pem=(pki_dir / PCK_KEY_FILE).read_bytes(),
    )


def new_enclave(pki_dir: Path, platform_secret: bytes | None = None) -> Enclave:
    """An uninitialized enclave on a (fresh) simulated platform."""
    sealing = SimSealingProvider(platform_secret or secrets.token_bytes(32), mrenclave())
    return Enclave(mrenclave=mrenclave(), quote_provider=sim_quotes(pki_dir), sealing_provider=sealing)


def oauth_token(key: ec.EllipticCurvePrivateKey, subject: str, **overrides: Any) -> str:
    """An ES256 access token for the ``o`` instance, valid at NOW_MS."""
    now = NOW_MS // 1000
    claims = {"iss": OAUTH_ISSUER, "aud": OAUTH_AUDIENCE, "sub": subject, "exp": now + 600, "nbf": now - 60}
    return pyjwt.encode(claims | overrides, key, algorithm="ES256", headers={"kid": "k1"})


@dataclass
class World:
    """An enclave with instances, history and valid seed inputs."""

    harness: Harness
    dispatcher: Dispatcher
    issuer: ed25519.Ed25519PrivateKey
    oauth_key: ec.EllipticCurvePrivateKey
    seeds: dict[str, list[bytes]] = field(default_factory=dict)
    sealed_donors: list[envelope_pb2.SealedCommand] = field(default_factory=list)

    @property
    def enclave(self) -> Enclave:
        return self.harness.enclave

    def digest(self) -> bytes:
        """Everything the enclave holds (instances, heads, counters, keys), hashed."""
        return self.enclave.state_digest()

    def client(self, instance_id: str, account: str | None = None) -> Client:
        """A fresh client of `instance_id` with a never-used identity (its counter starts at 1)."""
        name = account or f"acct-{uuid.uuid4().hex[:12]}"
        if instance_id == "t":
            return self.harness.client(instance_id, signer=ed25519.Ed25519PrivateKey.generate())
        if instance_id == "o":
            return self.harness.client(instance_id, jwt=oauth_token(self.oauth_key, name), account=name)
        return self.harness.client(instance_id, account=name)

    def state_of(self, instance_id: str) -> dict[StateKey, bytes]:
        """The instance's plaintext state, via Snapshot and the data key (the keyvault's view)."""
        snapshot = self.harness.host.snapshot(instance_id)
        key = self.harness.data_keys[(instance_id, snapshot.key_version)]
        aad = wire.snapshot_aad(instance_id, snapshot.head.sequence, snapshot.head.hash, snapshot.key_version)
        plain = storage_pb2.InstanceSnapshot.FromString(
            crypto.aead_open(key, snapshot.nonce, snapshot.ciphertext, aad)
        )
        return {tuple(entry.key): entry.value for entry in plain.entries}

    def head(self, instance_id: str) -> int:
        """The instance's current sequence."""
        status = self.harness.host.get_status()
        return next(i.head.sequence for i in status.instances if i.instance_id == instance_id)


def good_call(instance_id: str) -> apps_pb2.AppCall:
    """A command every fresh account of `instance_id` may send (executed, hence logged)."""
    if instance_id == "t":  # a fresh holder has nothing: executed, refused by the app, logged
        return apps_pb2.AppCall(token=apps_pb2.TokenCall(transfer=apps_pb2.TokenTransfer(to="x", amount=1)))
    if instance_id == "b":
        vote = apps_pb2.BallotVote(ballot_id="poll", option=1, salt=b"s" * 16)
        return apps_pb2.AppCall(ballot=apps_pb2.BallotCall(vote=vote))
    return apps_pb2.AppCall(vault=apps_pb2.VaultCall(put=apps_pb2.VaultPut(record_id="r", data=b"d" * 8)))


def build_world(pki_dir: Path, memory_budget: int = MEMORY_BUDGET) -> World:
    """A fresh enclave with the instances, history and seeds described in the module docstring."""
    harness = Harness.start(new_enclave(pki_dir), memory_budget_bytes=memory_budget)
    issuer = ed25519.Ed25519PrivateKey.generate()
    oauth_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(oauth_key.public_key())) | {"kid": "k1"}
    configs: Mapping[str, envelope_pb2.InstanceConfig] = {
        "v": config(),
        "t": config(
            app=envelope_pb2.APP_KIND_TOKEN,
            auth=envelope_pb2.AUTH_SCHEME_SIGNATURE,
            token_issuer_public_key=issuer.public_key().public_bytes_raw(),
        ),
        "b": config(app=envelope_pb2.APP_KIND_BALLOT),
        "o": config(
            auth=envelope_pb2.AUTH_SCHEME_OAUTH2,
            oauth2_issuer=OAUTH_ISSUER,
            oauth2_audience=OAUTH_AUDIENCE,
            oauth2_jwks_json=json.dumps({"keys": [jwk]}),
        ),
    }
    for instance_id, instance_config in configs.items():
        harness.create(instance_id, instance_config)
    world = World(harness, Dispatcher(harness.enclave), issuer, oauth_key)
    # History: a record, a mint, an open poll with a vote, an OAuth2 record.
    owner = world.client("v", "alice")
    put = owner.seal(good_call("v"))
    assert harness.run("v", put)[0].accepted
    minter = harness.client("t", signer=issuer)
    mint = apps_pb2.TokenMint(to="holder", amount=100)
    assert harness.run("t", minter.seal(apps_pb2.AppCall(token=apps_pb2.TokenCall(mint=mint))))[0].accepted
    create = apps_pb2.BallotCreate(ballot_id="poll", question="?", options=["a", "b"])
    assert harness.run(
        "b", world.client("b").seal(apps_pb2.AppCall(ballot=apps_pb2.BallotCall(create=create)))
    )[0].accepted
    assert harness.run("b", world.client("b").seal(good_call("b")))[0].accepted
    assert harness.run("o", world.client("o").seal(good_call("o")))[0].accepted
    harness.provision("spare")
    world.sealed_donors = [put.command, world.client("t").seal(good_call("t")).command]
    world.seeds = _seeds(world, put.command)
    return world


def _seeds(world: World, executed: envelope_pb2.SealedCommand) -> dict[str, list[bytes]]:
    """One or more valid serialized requests per ECALL (replays are refused or idempotent)."""
    harness, keys = world.harness, world.harness.keys
    data_key = harness.data_keys[("v", 1)]
    query = world.client("v", "alice").seal(
        apps_pb2.AppCall(vault=apps_pb2.VaultCall(get=apps_pb2.VaultGet(owner="alice", record_id="r"))),
        counter=0,
    )
    last = harness.log["v"][-1]
    v_head = envelope_pb2.CommitHead(sequence=last.sequence, hash=wire.entry_hash(last))
    requests: dict[str, list[Any]] = {
        "Initialize": [ecall_pb2.InitializeRequest(keyvault_release_public_key=KEYVAULT_RELEASE_PUBLIC_KEY)],
        "GetQuote": [ecall_pb2.GetQuoteRequest(nonce=bytes(range(32)))],
        "IssueChallenge": [ecall_pb2.IssueChallengeRequest(instance_id="spare")],
        "ProvisionKey": [
            ecall_pb2.ProvisionKeyRequest(
                instance_id="v", key_version=1, wrapped_key=wrap_key(keys, "v", 1, data_key)
            )
        ],
        "CreateInstance": [
            ecall_pb2.CreateInstanceRequest(
                instance_id="v", config=config(), statement=harness.statement("v"), host_time_unix_ms=NOW_MS
            ),
            # A valid statement, but its challenge is replaced before any replay can use it.
            ecall_pb2.CreateInstanceRequest(
                instance_id="spare",
                config=config(),
                statement=harness.statement("spare"),
                host_time_unix_ms=NOW_MS,
            ),
        ],
        "ExecuteBatch": [
            ecall_pb2.ExecuteBatchRequest(instance_id="v", commands=[executed], host_time_unix_ms=NOW_MS)
        ],
        "Query": [ecall_pb2.QueryRequest(instance_id="v", command=query.command, host_time_unix_ms=NOW_MS)],
        "Snapshot": [ecall_pb2.SnapshotRequest(instance_id="v")],
        "Restore": [
            ecall_pb2.RestoreRequest(
                instance_id="v",
                entries=[entry.SerializeToString() for entry in harness.log["v"]],
                statement=harness.statement("v", v_head),
                host_time_unix_ms=NOW_MS,
            ),
            ecall_pb2.RestoreRequest(
                instance_id="b",
                snapshot=harness.host.snapshot("b"),
                statement=harness.statement("b"),
                host_time_unix_ms=NOW_MS,
            ),
        ],
        "ConfirmHead": [
            ecall_pb2.ConfirmHeadRequest(
                confirmation=head_confirmation("v", v_head, keys.signing_public_key)
            ),
            # A read fence for a challenge that is never current when the seed is replayed.
            ecall_pb2.ConfirmHeadRequest(statement=harness.statement("v", v_head)),
        ],
        "Seal": [ecall_pb2.SealRequest()],
        "Unseal": [ecall_pb2.UnsealRequest(sealed_blob=harness.host.seal())],
        "GetStatus": [ecall_pb2.GetStatusRequest()],
    }
    assert set(requests) == set(ecall_table(world.enclave)), "a new ECALL needs a seed here"
    return {method: [r.SerializeToString(deterministic=True) for r in rs] for method, rs in requests.items()}
