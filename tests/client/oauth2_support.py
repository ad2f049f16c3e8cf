"""An OAuth2 world for the client tests: one identity provider issuing tokens for two audiences
(the enclave's and the gateway's), a gateway whose `oauth2` plugin guards one instance, and a
record of the metadata the gateway received (what the host reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.enclave.support import NOW_MS
from tests.gateway.support import InProcessMesh, mesh_fixture
from veil.enclave.v1 import envelope_pb2
from veil.services.gateway import server as gateway_server

ISSUER = "https://login.example"
ENCLAVE_AUDIENCE = "veil-enclave"
GATEWAY_AUDIENCE = "veil-gateway"
#: Guarded at the gateway by the oauth2 plugin (the gateway's audience); others by none.
GUARDED = "ids"


@dataclass
class IdentityProvider:
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [jwk | {"kid": "k1", "use": "sig", "alg": "RS256"}]}

    def token(self, subject: str, audience: str | list[str]) -> str:
        # Valid at the in-process enclave's fixed time (NOW_MS) and at the gateway's (now).
        claims = {"iss": ISSUER, "aud": audience, "sub": subject, "exp": NOW_MS // 1000 + 3600}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})

    def config(self, app: envelope_pb2.AppKind.ValueType = envelope_pb2.APP_KIND_VAULT) -> Any:
        return envelope_pb2.InstanceConfig(
            app=app,
            auth_scheme=envelope_pb2.AUTH_SCHEME_OAUTH2,
            oauth2_issuer=ISSUER,
            oauth2_audience=ENCLAVE_AUDIENCE,
            oauth2_jwks_json=json.dumps(self.jwks()),
        )


@dataclass
class OAuth2Mesh:
    mesh: InProcessMesh
    idp: IdentityProvider
    #: The credential metadata of every request the gateway admitted, in order.
    seen: list[dict[str, str]]

    def states_called(self, *methods: str) -> int:
        return sum(state.calls[m] for state in self.mesh.states for m in methods)


def oauth2_mesh_fixture(
    pki_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[OAuth2Mesh]:
    idp = IdentityProvider()
    auth = tmp_path / "gateway-auth.json"
    auth.write_text(
        json.dumps(
            {
                "default": {"type": "none"},
                "instances": {
                    GUARDED: {
                        "type": "oauth2",
                        "issuer": ISSUER,
                        "audience": GATEWAY_AUDIENCE,
                        "jwks": idp.jwks(),
                        "algorithms": ["RS256"],
                    }
                },
            }
        )
    )
    seen: list[dict[str, str]] = []
    read = gateway_server._metadata

    def recorded(context: grpc.ServicerContext) -> dict[str, str]:
        metadata = read(context)
        seen.append(metadata)
        return metadata

    monkeypatch.setattr(gateway_server, "_metadata", recorded)
    for mesh in mesh_fixture(pki_dir, tmp_path, gateway_options={"auth_file": auth}):
        yield OAuth2Mesh(mesh, idp, seen)
