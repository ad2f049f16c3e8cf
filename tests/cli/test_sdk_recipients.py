"""The SDK itself refuses a recipient that cannot be an account of the instance (a name on an
instance whose accounts are Ed25519 keys) before sealing, as the CLI does before connecting."""

from __future__ import annotations

import pytest

from tests.gateway.support import InProcessMesh, token_config
from veil.enclave.v1 import envelope_pb2
from veil.errors import VeilClientError
from veil.sdk.identity import AnonymousIdentity, new_identity


def test_names_are_not_accounts_on_a_signature_instance(mesh: InProcessMesh) -> None:
    treasury = new_identity(mesh.data_dir, "treasury")
    with mesh.connect() as veil:
        veil.create_instance("coins", token_config(treasury.public_key))
        coins = veil.token("coins", treasury)
        executed = mesh.states[0].calls["Execute"]
        for bad in ("bob", "", "AB" * 32, "ab" * 31, "ab" * 32 + "\n"):
            with pytest.raises(VeilClientError, match="account"):
                coins.mint(bad, 5)
        with pytest.raises(VeilClientError, match="amount"):
            coins.mint("ab" * 32, -5)
        assert mesh.states[0].calls["Execute"] == executed  # nothing sealed, nothing sent
        assert coins.mint("ab" * 32, 5) == 5


def test_other_schemes_keep_their_own_accounts(mesh: InProcessMesh) -> None:
    config = envelope_pb2.InstanceConfig(
        app=envelope_pb2.APP_KIND_VAULT, auth_scheme=envelope_pb2.AUTH_SCHEME_NONE
    )
    with mesh.connect() as veil:
        veil.create_instance("notes", config)
        guest = veil.vault("notes", AnonymousIdentity("guest"))
        guest.put("todo", b"milk")
        guest.share("todo", "friend")  # an anonymous account is any name
        with pytest.raises(VeilClientError, match="empty"):
            guest.share("todo", "")
