"""A host as the adversary: real enclaves it starts and drives ECALL by ECALL, and the real keyvault
it reaches over mTLS with the state identity.

`EnclaveBoot` is one enclave incarnation on that host (an in-process runner behind the real
dispatcher, pinned to the keyvault's release key). It offers what an honest host does
(attest, release keys, create, execute, advance, confirm, restore) as separate steps, so a test
can do what a hostile host would instead: skip a step, repeat it, reorder it, or feed the
enclave something it made up. Nothing here reaches into the enclave's memory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from tests.attack.enclave_world import new_enclave
from tests.attack.mesh import TIMEOUT, RunningKeyvault
from tests.enclave.support import Client
from veil.enclave import commands, wire
from veil.enclave.dispatcher import Dispatcher
from veil.enclave.v1 import ecall_pb2, envelope_pb2
from veil.keyvault.v1 import keyvault_pb2
from veil.services.keyvault.config import DEFAULT_ISSUER
from veil.services.state.enclave_host import EnclaveHost
from veil.services.state.keys import release_policy


def now_ms() -> int:
    return int(time.time() * 1000)


class EnclaveBoot:
    """One enclave boot on the hostile host, attested and pinned to the real keyvault."""

    def __init__(
        self, keyvault: RunningKeyvault, pki_dir: Path, platform_secret: bytes | None = None
    ) -> None:
        self.keyvault, self.state = keyvault, keyvault.stub("state")
        release_key = self.state.GetJwks(keyvault_pb2.GetJwksRequest(), timeout=TIMEOUT).release_public_key
        self.host = EnclaveHost.from_dispatcher(Dispatcher(new_enclave(pki_dir, platform_secret)))
        self.keys = self.host.initialize(keyvault_release_public_key=release_key).keys
        self.released: dict[tuple[str, int], bytes] = {}

    # -- attestation and keys -----------------------------------------------------------------
    def token(self) -> str:
        """Attest at the keyvault (a fresh nonce; the enclave quotes its own keys)."""
        nonce = os.urandom(32)
        quoted = self.host.get_quote(nonce)
        request = keyvault_pb2.AttestRequest(
            quote=quoted.quote, runtime_data=quoted.runtime_data, nonce=nonce
        )
        return self.state.Attest(request, timeout=TIMEOUT).token

    def create_key(self, instance_id: str) -> None:
        """The instance key with the state host's usual release policy (what a host may write)."""
        policy = release_policy(DEFAULT_ISSUER, self.host.get_status().mrenclave, sim=True)
        request = keyvault_pb2.CreateKeyRequest(
            key_name=wire.instance_key_name(instance_id), release_policy_json=policy
        )
        self.state.CreateKey(request, timeout=TIMEOUT)

    def provision(self, instance_id: str) -> None:
        """Have the instance key released to this enclave (any admitted build may ask)."""
        released = self.state.ReleaseKey(
            keyvault_pb2.ReleaseKeyRequest(token=self.token(), key_name=wire.instance_key_name(instance_id)),
            timeout=TIMEOUT,
        )
        wrapped = envelope_pb2.WrappedKey(
            suite=envelope_pb2.HPKE_SUITE_X25519_SHA256_AES128GCM,
            encapsulated_key=released.encapsulated_key,
            ciphertext=released.wrapped_key,
            signature=released.signature,
        )
        self.host.provision_key(instance_id, released.version, wrapped)

    # -- freshness ------------------------------------------------------------------------------
    def statement(self, instance_id: str) -> envelope_pb2.HeadStatement:
        """The keyvault's statement for a challenge this enclave just issued."""
        request = keyvault_pb2.GetCommitHeadRequest(
            instance_id=instance_id,
            enclave_signing_public_key=self.keys.signing_public_key,
            challenge=self.host.issue_challenge(instance_id),
        )
        return self.state.GetCommitHead(request, timeout=TIMEOUT).statement

    def stored_head(self, instance_id: str) -> keyvault_pb2.GetCommitHeadResponse:
        request = keyvault_pb2.GetCommitHeadRequest(instance_id=instance_id)
        return self.state.GetCommitHead(request, timeout=TIMEOUT)

    def advance(self, *links: envelope_pb2.CommitLink) -> envelope_pb2.HeadConfirmation:
        request = keyvault_pb2.AdvanceCommitHeadRequest(
            instance_id=links[0].instance_id, links=links, token=self.token()
        )
        return self.state.AdvanceCommitHead(request, timeout=TIMEOUT).confirmation

    def confirm(self, confirmation: envelope_pb2.HeadConfirmation) -> ecall_pb2.ConfirmHeadResponse:
        """Hand the enclave the keyvault's confirmation; keep the hold keys it releases."""
        return self._keep(confirmation.instance_id, self.host.confirm_head(confirmation))

    def read_fence(self, instance_id: str) -> ecall_pb2.ConfirmHeadResponse:
        """The honest read fence: a read challenge, the keyvault's statement for it, ConfirmHead."""
        request = keyvault_pb2.GetCommitHeadRequest(
            instance_id=instance_id,
            enclave_signing_public_key=self.keys.signing_public_key,
            challenge=self.host.issue_challenge(instance_id, reads=True),
        )
        statement = self.state.GetCommitHead(request, timeout=TIMEOUT).statement
        return self._keep(instance_id, self.host.confirm_head(statement=statement))

    def _keep(
        self, instance_id: str, response: ecall_pb2.ConfirmHeadResponse
    ) -> ecall_pb2.ConfirmHeadResponse:
        for hold in response.released:
            slot = (instance_id, -hold.read_round if hold.read_round else hold.held_until)
            self.released[slot] = hold.key
        return response

    # -- the honest steps, one by one ---------------------------------------------------------
    def create(
        self, instance_id: str, config: envelope_pb2.InstanceConfig, *, new_key: bool = True
    ) -> ecall_pb2.CreateInstanceResponse:
        """Key (unless it exists), statement, CreateInstance, then register and confirm it."""
        if new_key:
            self.create_key(instance_id)
        self.provision(instance_id)
        created = self.host.create_instance(instance_id, config, self.statement(instance_id), now_ms())
        self.confirm(self.advance(created.link))
        return created

    def restore(
        self,
        instance_id: str,
        entries: Sequence[envelope_pb2.LogEntry],
        snapshot: envelope_pb2.EncryptedSnapshot | None = None,
        *,
        host_time_unix_ms: int = 0,
    ) -> ecall_pb2.RestoreResponse:
        """Restore with the keyvault's statement for a challenge this enclave just issued."""
        statement = self.statement(instance_id)
        return self.host.restore(
            instance_id, entries, snapshot, statement=statement, host_time_unix_ms=host_time_unix_ms
        )

    def execute(
        self, instance_id: str, *sealed: envelope_pb2.SealedCommand
    ) -> ecall_pb2.ExecuteBatchResponse:
        return self.host.execute_batch(instance_id, list(sealed), now_ms())

    def open_held(self, instance_id: str, held_until: int, outcome: envelope_pb2.CommandOutcome) -> None:
        """Unwrap a held command answer in place with a key the enclave released (KeyError: none yet)."""
        if held_until:
            key = self.released[(instance_id, held_until)]
            aad = wire.held_response_aad(instance_id, held_until)
            outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)

    def open_read(self, instance_id: str, read_round: int, outcome: envelope_pb2.CommandOutcome) -> None:
        """Unwrap a held query answer in place (KeyError: its read round was not released)."""
        if read_round:
            key = self.released[(instance_id, -read_round)]
            aad = wire.held_read_aad(instance_id, read_round)
            outcome.sealed_response = commands.open_held(key, outcome.sealed_response, aad)

    def client(self, instance_id: str, **kwargs: object) -> Client:
        return Client(self.keys, instance_id, **kwargs)  # type: ignore[arg-type]
