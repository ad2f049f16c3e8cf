"""The gateway's credential, kept apart from the tokens the enclave accepts.

The gateway is run by the host, which the threat model counts as the adversary: whatever a
client puts in gRPC metadata, the host reads. Under AUTH_SCHEME_OAUTH2 the only proof inside
a sealed command is a bearer JWT, and nothing ties it to the command: a token the enclave
accepts that reaches the host lets the host seal commands of its own as that account (reads
need no counter; a write learns the next one from a sealed refusal). So an OAuth2 identity's
JWT only ever travels sealed, and the gateway's `oauth2` plugin takes another token, issued for
another audience (the gateway's), given explicitly as `connect(bearer=...)`.

`check_bearer` refuses (`GatewayCredentialError`, before the RPC it would go with) a gateway
bearer that the enclave could accept, as far as the client can tell:

- the very JWT of the OAuth2 identity a call acts as;
- a JWT sharing an audience with that identity's JWT: the instance's enclave audience is one of
  them, and this is known before anything of the call is sent, its attestation included;
- a JWT for the audience the enclave of an OAuth2 instance this client attested checks (the
  `oauth2_audience` of its enclave-signed descriptor; the bearer goes to every instance).

Issuers are not compared (refusing more is the safe side), and a bearer that is not a JWT
passes: the enclave verifies JWTs only. What this cannot see: attestation requests made with no
identity at hand (`connect` attests the default shard at once; `attest(instance)` on its own)
carry the bearer before the client knows an enclave audience that would refuse it. The rule
that closes that gap is the deployment's: the gateway's token has another audience than the
enclave's (docs/threat-model.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import jwt
import jwt.utils

from veil.sdk.errors import GatewayCredentialError
from veil.sdk.identity import Identity, OAuth2Identity


def audiences(token: str) -> frozenset[str]:
    """The `aud` of a JWT, read without verifying it (a string or a list); empty otherwise.
    Read from the claims segment as the enclave reads it (base64url JSON, whatever the header
    says: a `"b64": false` header made PyJWT see no claims, where the enclave's reader sees them)."""
    parts = token.split(".")
    if len(parts) != 3:
        return frozenset()
    try:
        claims = json.loads(jwt.utils.base64url_decode(parts[1]))
    except (ValueError, TypeError, RecursionError):  # not base64url JSON: not a token the enclave reads
        return frozenset()
    aud = claims.get("aud") if isinstance(claims, dict) else None
    if isinstance(aud, str):
        return frozenset({aud})
    if isinstance(aud, list):
        return frozenset(a for a in aud if isinstance(a, str))
    return frozenset()


def check_bearer(
    bearer: str | None, *, identity: Identity | None = None, enclave_audiences: Iterable[str] = ()
) -> None:
    """GatewayCredentialError when `bearer` is a token the enclave could accept (see above)."""
    if not bearer:
        return
    if isinstance(identity, OAuth2Identity) and bearer == identity.jwt:
        raise GatewayCredentialError(
            "the gateway bearer is the OAuth2 identity's own JWT, which the enclave accepts as the "
            "account's proof: the host runs the gateway and could act as the account with it. Nothing "
            "was sent; give the gateway a token issued for the gateway's audience"
        )
    if isinstance(identity, OAuth2Identity):
        shared = audiences(bearer) & audiences(identity.jwt)
        if shared:
            raise GatewayCredentialError(
                f"the gateway bearer is a JWT for audience {sorted(shared)[0]!r}, an audience of the "
                "OAuth2 identity's token, so the enclave may accept it as an account's proof: the host "
                "runs the gateway and could act as that account with it. Nothing was sent; give the "
                "gateway a token issued for the gateway's own audience"
            )
    shared = audiences(bearer) & set(enclave_audiences)
    if shared:
        raise GatewayCredentialError(
            f"the gateway bearer is a JWT for audience {sorted(shared)[0]!r}, the audience an attested "
            "enclave accepts OAuth2 proofs for: the host runs the gateway and could act as the token's "
            "account with it. Nothing more is sent with it; give the gateway a token issued for the "
            "gateway's own audience (and treat this one as exposed if an attestation request carried it)"
        )
