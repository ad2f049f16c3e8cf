"""Client identities: who a sealed command says it is, and the key files behind them.

An Ed25519 identity lives in `<data_dir>/identities/NAME.key` (PKCS#8 PEM, mode 0600, readable
by openssl and Node) with `NAME.pub` beside it holding the account: the lowercase hex of the
raw public key, which is what the enclave calls the account under AUTH_SCHEME_SIGNATURE.

Proofs by instance scheme:
    NONE       anonymous proof naming the account (AnonymousIdentity only: an Ed25519 identity
               refuses, since on such an instance anyone can act as its account)
    SIGNATURE  Ed25519 signature over veil.enclave.wire.command_signing_bytes
    OAUTH2     the JWT itself: only ever sealed, never a gateway credential (veil.sdk.gateway_auth)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from veil.enclave.v1 import command_pb2, envelope_pb2
from veil.sdk.errors import IdentityError

IDENTITIES_DIR = "identities"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # the whole name (fullmatch: no newline after it)

Scheme: TypeAlias = envelope_pb2.AuthScheme.ValueType


def _scheme_name(scheme: Scheme) -> str:
    return envelope_pb2.AuthScheme.Name(scheme).removeprefix("AUTH_SCHEME_").lower()


@dataclass(frozen=True)
class SigningIdentity:
    """An Ed25519 key pair; its account is the public key's hex."""

    private_key: ed25519.Ed25519PrivateKey
    name: str = ""

    @property
    def public_key(self) -> bytes:
        return self.private_key.public_key().public_bytes_raw()

    @property
    def account(self) -> str:
        return self.public_key.hex()

    def proof(self, scheme: Scheme, signing_bytes: bytes) -> command_pb2.AuthProof:
        if scheme == envelope_pb2.AUTH_SCHEME_SIGNATURE:
            return command_pb2.AuthProof(
                signature=command_pb2.SignatureProof(
                    public_key=self.public_key, signature=self.private_key.sign(signing_bytes)
                )
            )
        if scheme == envelope_pb2.AUTH_SCHEME_NONE:
            # Never downgrade: on an instance that checks no proof, anyone can claim this account.
            raise IdentityError(
                "this instance authenticates nobody (auth scheme none): anyone may act as any "
                "account there, so an Ed25519 identity is not used; act as an anonymous account instead"
            )
        raise IdentityError(f"an Ed25519 identity cannot prove a {_scheme_name(scheme)} identity")


@dataclass(frozen=True)
class AnonymousIdentity:
    """A self-declared account name (AUTH_SCHEME_NONE only: anyone can claim any name)."""

    account: str

    def proof(self, scheme: Scheme, signing_bytes: bytes) -> command_pb2.AuthProof:
        if scheme != envelope_pb2.AUTH_SCHEME_NONE:
            raise IdentityError(f"an anonymous identity cannot prove a {_scheme_name(scheme)} identity")
        return command_pb2.AuthProof(anonymous=command_pb2.AnonymousProof(account=self.account))


@dataclass(frozen=True)
class OAuth2Identity:
    """A JWT from the instance's issuer for its enclave audience; the account is its `sub`.

    The JWT is the account's proof inside sealed commands only: the SDK never sends it to the
    gateway, and refuses a gateway bearer equal to it or sharing its audience."""

    jwt: str

    @property
    def account(self) -> str:
        try:
            subject = jwt.decode(self.jwt, options={"verify_signature": False}).get("sub")
        except jwt.InvalidTokenError:
            raise IdentityError("the bearer token is not a JWT") from None
        if not isinstance(subject, str):
            raise IdentityError("the bearer token has no subject")
        return subject

    def proof(self, scheme: Scheme, signing_bytes: bytes) -> command_pb2.AuthProof:
        if scheme != envelope_pb2.AUTH_SCHEME_OAUTH2:
            raise IdentityError(f"a bearer token cannot prove a {_scheme_name(scheme)} identity")
        return command_pb2.AuthProof(oauth2=command_pb2.OAuth2Proof(jwt=self.jwt))


Identity = SigningIdentity | AnonymousIdentity | OAuth2Identity


def check_name(name: str) -> str:
    """`name` when it is a valid identity or contact name; IdentityError otherwise."""
    if not _NAME.fullmatch(name):
        raise IdentityError(
            "identity names are 1 to 64 letters, digits, dots, dashes or underscores, "
            "the first a letter or digit"
        )
    return name


def identity_paths(data_dir: Path, name: str) -> tuple[Path, Path]:
    """The key and public files of identity `name`."""
    directory = data_dir / IDENTITIES_DIR
    return directory / f"{check_name(name)}.key", directory / f"{name}.pub"


def new_identity(data_dir: Path, name: str, *, force: bool = False) -> SigningIdentity:
    """Create identity `name`: a fresh Ed25519 key written 0600, never overwriting unless `force`."""
    key_path, pub_path = identity_paths(data_dir, name)
    key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_key = ed25519.Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(key_path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(f"identity {name!r} already exists at {key_path}") from None
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    os.chmod(key_path, 0o600)  # O_TRUNC keeps an old file's mode
    identity = SigningIdentity(private_key, name)
    pub_path.write_text(identity.account + "\n")
    return identity


def load_key_file(path: Path, name: str = "") -> SigningIdentity:
    """Load an Ed25519 PKCS#8 PEM key file."""
    try:
        if path.stat().st_mode & 0o077:
            raise IdentityError(f"{path} is readable by others; chmod 600 it")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise IdentityError(f"cannot read identity {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise IdentityError(f"{path} is not a PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return SigningIdentity(key, name or path.stem)


def load_identity(data_dir: Path, name_or_path: str) -> SigningIdentity:
    """Identity `name` from the data dir, or a key file given by path."""
    path = Path(name_or_path)
    if path.suffix == ".key" or os.sep in name_or_path:
        return load_key_file(path)
    key_path, _ = identity_paths(data_dir, name_or_path)
    if not key_path.exists():
        raise IdentityError(f"no identity {name_or_path!r} in {key_path.parent}; run `veil identity new`")
    return load_key_file(key_path, name_or_path)


def resolve_account(data_dir: Path, value: str) -> str:
    """The account a local identity's name, a contact's name or a canonical account names;
    IdentityError for anything else (a mistyped name never becomes an account)."""
    from veil.sdk.contacts import resolve_recipient  # contacts builds on this module

    return resolve_recipient(data_dir, value)
