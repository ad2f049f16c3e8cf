"""Recipients: who a transfer, a share or a ballot may name, so a mistyped name never becomes an account.

A recipient is one of
    a local identity's name         `<data_dir>/identities/NAME.pub`
    a contact's name                `<data_dir>/identities/contacts.json` (`veil contact add NAME ACCOUNT`)
    an account in canonical form    64 lowercase hex characters (an Ed25519 public key)

and nothing else: "bobb" is refused before anything is sealed, since the enclave would accept
any string as an account and the tokens sent there would be gone. Accounts that are not keys
(an OAuth2 subject, an anonymous account) are reached through a contact added with
`any_form=True`, an explicit act.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from veil.sdk.errors import IdentityError
from veil.sdk.files import write_json
from veil.sdk.identity import IDENTITIES_DIR, check_name

CONTACTS_FILE = "contacts.json"
ACCOUNT_HEX_CHARS = 64
_CANONICAL = re.compile(r"^[0-9a-f]{64}$")
_MAX_ACCOUNT = 256


class UnknownRecipient(IdentityError):
    """A recipient that is neither a known name nor an account in canonical form."""


def is_canonical_account(value: str) -> bool:
    """64 lowercase hex characters: the account of an Ed25519 key."""
    return bool(_CANONICAL.match(value))


def canonical_account(value: str) -> str:
    """`value` as a canonical account; IdentityError naming what is wrong otherwise."""
    text = value.strip().lower()
    if len(text) != ACCOUNT_HEX_CHARS or not _CANONICAL.match(text):
        raise IdentityError(
            f"{value!r} is not an account: an account is {ACCOUNT_HEX_CHARS} hex characters (got {len(text)})"
        )
    return text


def _contacts_path(data_dir: Path) -> Path:
    return data_dir / IDENTITIES_DIR / CONTACTS_FILE


def load_contacts(data_dir: Path) -> dict[str, str]:
    """Every contact: name -> account."""
    path = _contacts_path(data_dir)
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read contacts {path}: {exc}") from None
    if not isinstance(document, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in document.items()
    ):
        raise IdentityError(f"{path} is not a JSON object of name -> account")
    return document


def _save(data_dir: Path, contacts: dict[str, str]) -> None:
    write_json(_contacts_path(data_dir), contacts)


def _identity_account(data_dir: Path, name: str) -> str | None:
    pub_path = data_dir / IDENTITIES_DIR / f"{name}.pub"
    return pub_path.read_text().strip() if pub_path.is_file() else None


def add_contact(data_dir: Path, name: str, account: str, *, any_form: bool = False) -> str:
    """Save `name` -> `account`; returns the account as stored.

    The account must be canonical unless `any_form` (an OAuth2 subject, an anonymous account).
    A name already taken by an identity or a contact is refused: one name, one account.
    """
    check_name(name)
    if any_form:
        stored = account.strip()
        if not 0 < len(stored) <= _MAX_ACCOUNT or not stored.isprintable():
            raise IdentityError(f"an account is 1 to {_MAX_ACCOUNT} printable characters")
    else:
        stored = canonical_account(account)
    if _identity_account(data_dir, name) is not None:
        raise IdentityError(f"{name!r} is already a local identity")
    contacts = load_contacts(data_dir)
    if name in contacts:
        raise IdentityError(f"contact {name!r} already exists ({contacts[name]}); remove it first")
    contacts[name] = stored
    _save(data_dir, contacts)
    return stored


def remove_contact(data_dir: Path, name: str) -> str:
    """Forget contact `name`; returns the account it named."""
    contacts = load_contacts(data_dir)
    if name not in contacts:
        raise UnknownRecipient(f"no contact {name!r}")
    account = contacts.pop(name)
    _save(data_dir, contacts)
    return account


def resolve_recipient(data_dir: Path, value: str) -> str:
    """The account `value` names: an identity, a contact, or a canonical account; else refused."""
    if check_name_quiet(value):
        account = _identity_account(data_dir, value)
        if account is not None:
            return account
        contacts = load_contacts(data_dir)
        if value in contacts:
            return contacts[value]
    if is_canonical_account(value):
        return value
    if is_canonical_account(value.lower()):  # never taken as is: an account is written one way
        hint = f"an account is written in lowercase: {value.lower()}"
    else:
        hint = f"add it with `veil contact add {value} ACCOUNT`"
    raise UnknownRecipient(
        f"{value!r} is not a known identity or contact, nor an account ({ACCOUNT_HEX_CHARS} lowercase "
        f"hex characters); nothing was sent ({hint})"
    )


def check_name_quiet(value: str) -> bool:
    try:
        check_name(value)
    except IdentityError:
        return False
    return True


def names_by_account(data_dir: Path) -> dict[str, str]:
    """account -> the name to show for it (identities before contacts)."""
    names: dict[str, str] = {}
    for account_name, account in sorted(load_contacts(data_dir).items()):
        names.setdefault(account, account_name)
    directory = data_dir / IDENTITIES_DIR
    if directory.is_dir():
        for pub in sorted(directory.glob("*.pub")):
            names[pub.read_text().strip()] = pub.stem
    return names


def display(data_dir: Path, account: str) -> str:
    """A name for `account` when one is known, else the account itself."""
    return names_by_account(data_dir).get(account, account)
