"""What every `veil` noun shares: typed handler registration, connection and identity options,
connecting (the enclave is verified first), output, and turning errors into one line.

Every command that talks to the mesh first connects with `veil.sdk.client.connect`, i.e.
verifies the enclave against the expected-measurement policy (fail closed: `--mrenclave HEX`
or a policy file, by default `<data-dir>/expected-measurement.json` as written by `veil up`).
Output is a table or key/value block for humans, or one JSON document with `--json`. Errors go
to stderr as `error: ...` with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from veil.cli import output
from veil.enclave import wire
from veil.enclave.v1 import envelope_pb2
from veil.sdk.client import DEFAULT_GATEWAY, VeilClient, connect
from veil.sdk.errors import VeilClientError
from veil.sdk.identity import AnonymousIdentity, Identity, OAuth2Identity, load_identity, resolve_account
from veil.sdk.sealing import Opened
from veil.sdk.trust_policy import (
    ANY_TCB_STATUS,
    DEFAULT_TCB_STATUSES,
    POLICY_FILE,
    ExpectedMeasurement,
    load_policy,
)
from veil.verify import roots
from veil.verify.errors import AttestationError

if TYPE_CHECKING:
    #: What `ArgumentParser.add_subparsers` returns: where a noun adds its parser.
    Subcommands: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]

#: A command: the parsed arguments in, the exit status out.
Handler = Callable[[argparse.Namespace], int]

#: PKI, identities, counters, pins and policies (`veil up` writes the local mesh's here).
DEFAULT_DATA_DIR = roots.DEFAULT_DATA_DIR
ENV_GATEWAY = "VEIL_GATEWAY"
ENV_API_KEY = "VEIL_API_KEY"
ENV_BEARER = "VEIL_BEARER_TOKEN"
DEFAULT_IDENTITY = "default"
_HANDLER = "handler"


# --- registration -------------------------------------------------------------------------


def bind(parser: argparse.ArgumentParser, handler: Handler) -> None:
    """Make `handler` the command `parser` runs."""
    parser.set_defaults(**{_HANDLER: handler})


def bind_sdk(parser: argparse.ArgumentParser, handler: Handler, *, identity: bool = False) -> None:
    """Give `parser` the connection options (and the identity options) and bind `handler`."""
    connection_options(parser)
    if identity:
        identity_option(parser)
    bind(parser, handler)


def handler_of(args: argparse.Namespace) -> Handler:
    """The handler the parsed command was bound to."""
    handler: Handler = getattr(args, _HANDLER)
    return handler


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a handler, turning SDK errors and refused evidence into `error: ...` on stderr and exit
    status 1."""
    try:
        return handler(args)
    except (VeilClientError, AttestationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --- connection ---------------------------------------------------------------------------


def connection_options(parser: argparse.ArgumentParser) -> None:
    """The options every mesh-facing command shares."""
    group = parser.add_argument_group("connection")
    group.add_argument("--gateway", default=os.environ.get(ENV_GATEWAY, DEFAULT_GATEWAY), help="HOST:PORT")
    group.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="PKI, identities, counters (.veil)")
    group.add_argument("--mrenclave", action="append", default=[], metavar="HEX", help="expected MRENCLAVE")
    group.add_argument("--root", default=None, help="SGX root for --mrenclave: intel (default), dev or a PEM")
    group.add_argument(
        "--jwks",
        type=Path,
        metavar="FILE",
        help="the keyvault's token JWKS for --mrenclave; only with it is the TCB status restricted "
        "(UpToDate, SWHardeningNeeded), since the gateway could sign its own token otherwise",
    )
    group.add_argument(
        "--policy", type=Path, help="expected-measurement file (default DATA_DIR/" + POLICY_FILE + ")"
    )
    group.add_argument(
        "--ca", type=Path, help="CA of the gateway's certificate (default DATA_DIR/pki/ca.pem)"
    )
    group.add_argument(
        "--cert", type=Path, help="client certificate (default DATA_DIR/pki/admin.pem if present)"
    )
    group.add_argument("--key", type=Path, help="client key (default DATA_DIR/pki/admin-key.pem)")
    group.add_argument("--no-client-cert", action="store_true", help="connect without a client certificate")
    group.add_argument("--api-key", default=os.environ.get(ENV_API_KEY), help="gateway API key")
    group.add_argument("--bearer", default=os.environ.get(ENV_BEARER), help="OAuth2 bearer JWT")
    group.add_argument("--timeout", type=float, default=15.0, help="seconds per call")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def identity_option(parser: argparse.ArgumentParser) -> None:
    """Who a command acts as."""
    parser.add_argument(
        "--as", dest="identity", help=f"identity name or key file (default {DEFAULT_IDENTITY!r})"
    )
    parser.add_argument("--anonymous", metavar="ACCOUNT", help="act as a self-declared account (auth none)")


def trust_policy(args: argparse.Namespace) -> ExpectedMeasurement:
    if args.mrenclave:
        # The TCB verdict is only in the keyvault's token: a policy restricts it only when the
        # token's key is pinned, or a hostile gateway could sign its own "UpToDate".
        jwks = _jwks_file(args.jwks) if args.jwks else None
        statuses = DEFAULT_TCB_STATUSES if jwks is not None else (ANY_TCB_STATUS,)
        return ExpectedMeasurement(
            mrenclaves=tuple(
                ExpectedMeasurement.for_mrenclave(h, accepted_tcb_statuses=statuses, jwks=jwks).mrenclaves[0]
                for h in args.mrenclave
            ),
            root=args.root or "intel",
            accepted_tcb_statuses=statuses,
            jwks=jwks,
        )
    path = args.policy or Path(args.data_dir) / POLICY_FILE
    if not path.exists():
        raise VeilClientError(
            f"no expected measurement: pass --mrenclave HEX or --policy FILE ({path} does not exist; "
            "`veil up` writes it for the local mesh)"
        )
    return load_policy(path)


def _jwks_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise VeilClientError(f"cannot read JWKS {path}: {exc}") from None
    return wire.strict_json_object(text, f"JWKS {path}", VeilClientError)


def open_client(args: argparse.Namespace) -> VeilClient:
    """Connect and verify the enclave, per the command line."""
    data_dir = Path(args.data_dir)
    pki = data_dir / "pki"
    ca = args.ca or pki / "ca.pem"
    cert, key = args.cert, args.key
    if not args.no_client_cert and cert is None and (pki / "admin.pem").exists():
        cert, key = pki / "admin.pem", pki / "admin-key.pem"
    if args.no_client_cert:
        cert = key = None
    return connect(
        args.gateway,
        policy=trust_policy(args),
        ca=ca if ca.exists() else None,
        cert=cert,
        key=key,
        data_dir=data_dir,
        api_key=args.api_key,
        bearer=args.bearer,
        timeout=args.timeout,
    )


def acting_identity(args: argparse.Namespace) -> Identity:
    if getattr(args, "anonymous", None):
        return AnonymousIdentity(args.anonymous)
    if args.bearer and not args.identity:
        return OAuth2Identity(args.bearer)
    return load_identity(Path(args.data_dir), args.identity or DEFAULT_IDENTITY)


def account(args: argparse.Namespace, value: str) -> str:
    return resolve_account(Path(args.data_dir), value)


# --- output -------------------------------------------------------------------------------


def receipt_json(opened: Opened | None) -> dict[str, Any] | None:
    if opened is None or opened.receipt is None:
        return None
    receipt = opened.receipt
    return {
        "kind": envelope_pb2.ReceiptKind.Name(receipt.kind),
        "instance_id": receipt.instance_id,
        "sequence": receipt.sequence,
        "command_hash": receipt.command_hash.hex(),
        "result_hash": receipt.result_hash.hex(),
        "signature": receipt.signature.hex(),
    }


def report(args: argparse.Namespace, document: dict[str, Any], human: Callable[[], None]) -> int:
    if args.json:
        output.emit_json(document)
    else:
        human()
    return 0


def receipt_line(opened: Opened | None) -> str:
    if opened is None or opened.receipt is None:
        return ""
    kind = "log sequence" if opened.receipt.kind == envelope_pb2.RECEIPT_KIND_COMMAND else "read at sequence"
    return f"receipt verified ({kind} {opened.receipt.sequence})"
