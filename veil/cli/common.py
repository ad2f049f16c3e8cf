"""What every `veil` noun shares: typed handler registration, connection and identity options,
connecting (the enclave is verified first), output, and turning errors into one line.

Every command that talks to the mesh first connects with `veil.sdk.client.connect`, i.e.
verifies the enclave against the expected-measurement policy (fail closed: `--mrenclave HEX`
or a policy file, by default `<data-dir>/expected-measurement.json` as written by `veil up`).
Before that, everything local is checked (arguments, the acting identity, recipients, files)
and the gateway must answer a TCP and a TLS handshake within a few seconds, so a typo or a mesh
that is down costs nothing and says so in one line. Output is a table or key/value block for
humans, or one JSON document with `--json`. Every error is one `error: ...` line on stderr:
exit status 2 for bad arguments, 1 for everything else, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc

from veil.cli import output
from veil.enclave import commands, wire
from veil.enclave.v1 import envelope_pb2
from veil.sdk.client import DEFAULT_GATEWAY, MAX_MESSAGE_BYTES, MAX_REQUEST_BYTES, VeilClient, connect
from veil.sdk.contacts import names_by_account, resolve_recipient
from veil.sdk.errors import GatewayError, IdentityError, VeilClientError
from veil.sdk.gateway_auth import check_bearer
from veil.sdk.identity import AnonymousIdentity, Identity, OAuth2Identity, check_name, load_identity
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
    #: What `VeilParser.add_subparsers` returns: where a noun adds its parser.
    Subcommands: TypeAlias = "argparse._SubParsersAction[VeilParser]"

#: A command: the parsed arguments in, the exit status out.
Handler = Callable[[argparse.Namespace], int]

#: PKI, identities, counters, pins and policies (`veil up` writes the local mesh's here).
DEFAULT_DATA_DIR = roots.DEFAULT_DATA_DIR
ENV_GATEWAY = "VEIL_GATEWAY"
ENV_DATA_DIR = "VEIL_DATA_DIR"
ENV_MAX_REQUEST_BYTES = "VEIL_MAX_REQUEST_BYTES"
ENV_API_KEY = "VEIL_API_KEY"
ENV_DEBUG = "VEIL_DEBUG"
DEFAULT_IDENTITY = "default"
_HANDLER = "handler"
#: How long a command waits for the gateway's TCP and TLS handshake before saying it is down.
CONNECT_WAIT_S = 3.0
MAX_AMOUNT = 2**64 - 1  # the apps' uint64
_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]{0,252}))$")


class ArgumentsRefused(SystemExit):
    """The parser refused the command line (exit 2); `line` is the error it printed."""

    def __init__(self, line: str) -> None:
        super().__init__(2)
        self.line = line


class VeilParser(argparse.ArgumentParser):
    """argparse with one-line errors (and `--help` epilogs kept as written)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        line = f"{self.prog}: {message} (see {self.prog} --help)"
        print(f"error: {line}", file=sys.stderr)
        raise ArgumentsRefused(line)


def example(*lines: str) -> str:
    """A `--help` epilog showing how the command is used."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


# --- argument types (argparse turns their ValueError/ArgumentTypeError into one line) ------


def address(text: str) -> str:
    """HOST:PORT with a non-empty host and a port in 1..65535 (IPv6 hosts in brackets)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:50051)")
    if not _HOST.match(host):
        raise argparse.ArgumentTypeError(f"{text!r}: {host!r} is not a host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number from 1 to 65535")
    return f"{host}:{int(port)}"


def instance_id(text: str) -> str:
    """An instance id as the mesh names them: lowercase letters, digits and dashes, 1 to 63."""
    if not _INSTANCE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an instance id (lowercase letters, digits and dashes, 1 to 63)"
        )
    return text


def identity_name(text: str) -> str:
    """A name for a new identity (the SDK's rule, `check_name`)."""
    try:
        return check_name(text)
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def request_id_option(parser: argparse.ArgumentParser) -> None:
    """--request-id for a command that changes state: the same id resumes a call an error left
    unsettled (its error line names the id) instead of sending it again."""
    parser.add_argument(
        "--request-id",
        type=request_id,
        help="name the call (an error that leaves it unsettled prints its id): the same id resumes "
        "it rather than sending it again",
    )


def amount(text: str) -> int:
    """A positive whole number of tokens that fits the apps' uint64."""
    if not text.strip().isdigit() or not 0 < int(text) <= MAX_AMOUNT:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount (a whole number from 1 to {MAX_AMOUNT})")
    return int(text)


def request_id(text: str) -> str:
    """A request id naming one call (the mesh's one rule, `commands.valid_request_id`)."""
    if not commands.valid_request_id(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a request id (printable, 1 to {commands.MAX_REQUEST_ID_SIZE} bytes of UTF-8)"
        )
    return text


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """A whole number from `low` to `high` (a negative one only where `low` allows it)."""

    def parse(text: str) -> int:
        digits = text.strip().removeprefix("-") if low < 0 else text.strip()
        if not digits.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse


def count(limit: int) -> Callable[[str], int]:
    """A whole number from 0 to `limit`."""
    return whole_number(0, limit)


def positive(limit: int) -> Callable[[str], int]:
    """A whole number from 1 to `limit`."""
    return whole_number(1, limit)


def seconds(text: str) -> float:
    """A positive number of seconds (at most a day)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be above 0 and at most 86400")
    return value


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


def app_commands(commands: Subcommands, app: str, summary: str) -> Subcommands:
    """`veil <app>`: an app's noun, whose verbs (`app_verb`) act on one of its instances."""
    return commands.add_parser(app, help=summary).add_subparsers(dest=f"{app}_command", required=True)


@contextmanager
def app_verb(
    verbs: Subcommands, verb: str, handler: Handler, summary: str, *examples: str
) -> Iterator[argparse.ArgumentParser]:
    """`veil <app> <verb> INSTANCE ...` as an identity: the verb's own arguments are added in the
    `with` block (after INSTANCE, before the connection and identity options); then it is bound."""
    parser = verbs.add_parser(verb, help=summary, epilog=example(*examples))
    parser.add_argument("instance", type=instance_id)
    yield parser
    bind_sdk(parser, handler, identity=True)


def handler_of(args: argparse.Namespace) -> Handler:
    """The handler the parsed command was bound to."""
    handler: Handler = getattr(args, _HANDLER)
    return handler


class UsageError(VeilClientError):
    """The command line itself is wrong in a way its parser cannot see (arguments that exclude
    each other, one missing): exit 2, as for the parser's own refusals; nothing was sent."""


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a handler; whatever goes wrong becomes one `error: ...` line on stderr and exit 1 (2
    for a UsageError), and with --json also one document, {"error": ..., "request_id": ...}, on
    stdout, so a script reads one JSON document whatever happened.

    No input may produce a traceback: SDK errors and refused evidence say what failed, files and
    values name the bad one, and anything unexpected is one line too (`VEIL_DEBUG=1` shows the
    traceback).
    """
    try:
        return handler(args)
    except KeyboardInterrupt as interrupt:
        kept = getattr(interrupt, "request_id", None)  # set by the SDK once the call was sent
        return fail(f"interrupted{_resume_hint(kept, args)}", status=130, args=args, request_id=kept)
    except Exception as exc:
        message, status, request_id = _failure(exc, args)
        return fail(message, status, args=args, request_id=request_id)


def _failure(exc: Exception, args: argparse.Namespace) -> tuple[str, int, str | None]:
    """An error's one line, the exit status, and the request id of a call kept unsettled."""
    if isinstance(exc, UsageError):
        return str(exc), 2, None
    if isinstance(exc, (VeilClientError, AttestationError)):
        return f"{exc}{_hint(exc, args)}", 1, exc.request_id
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{':' if where else ''}{where}", 1, None
    if isinstance(exc, (ValueError, KeyError, grpc.RpcError)):
        return f"{type(exc).__name__}: {exc}", 1, None
    # The last line of defence: still one line.
    if os.environ.get(ENV_DEBUG):
        traceback.print_exception(exc)
    return f"unexpected {type(exc).__name__}: {exc} (run with {ENV_DEBUG}=1 for details)", 1, None


def _resume_hint(request_id: str | None, args: argparse.Namespace) -> str:
    """Sent without a definitive answer: the call is kept in the data dir, and only its request
    id resumes it (a new call could run it twice)."""
    if not request_id or not hasattr(args, "request_id"):
        return ""
    return f" (run the same command with --request-id {request_id} to resume it: it runs at most once)"


def _hint(exc: Exception, args: argparse.Namespace) -> str:
    """What to do about a call kept unsettled, or a mesh that answered but is not serving."""
    kept = exc.request_id if isinstance(exc, (VeilClientError, AttestationError)) else None
    resume = _resume_hint(kept, args)
    if resume:
        return resume
    if isinstance(exc, GatewayError) and exc.code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ):
        gateway = getattr(args, "gateway", "the gateway")
        return f" (the mesh behind {gateway} is not serving: `veil status` shows which part)"
    return ""


def fail(
    message: str, status: int = 1, *, args: argparse.Namespace | None = None, request_id: str | None = None
) -> int:
    """Print one `error:` line (newlines folded), and the error as the JSON document when the
    command was asked for --json; return the exit status."""
    line = " ".join(message.split())
    print("error: " + line, file=sys.stderr)
    if args is not None and getattr(args, "json", False):
        json_error(line, status, request_id)
    return status


def json_error(line: str, status: int, request_id: str | None = None) -> None:
    """A failure as the one JSON document a --json command prints."""
    print(json.dumps({"error": line, "exit_status": status, "request_id": request_id}))


# --- connection ---------------------------------------------------------------------------


#: The gateway's own bearer token (its oauth2 plugin), for the gateway's audience.
ENV_GATEWAY_BEARER = "VEIL_GATEWAY_BEARER"
#: The token an OAuth2 identity acts with: the enclave's proof, sealed in commands only.
ENV_OAUTH2_TOKEN = "VEIL_OAUTH2_TOKEN"  # noqa: S105 (a variable name)
#: The old name of one token for both the gateway and the enclave: refused, since a token the
#: enclave accepts must never reach the gateway (the host runs it; veil.sdk.gateway_auth).
_ENV_BEARER_RETIRED = "VEIL_BEARER_TOKEN"


def data_dir_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup, holds: str) -> None:
    """--data-dir, with one default for every command: $VEIL_DATA_DIR, else .veil (so a mesh
    started with another data dir is used by exporting one variable, as for its gateway)."""
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=os.environ.get(ENV_DATA_DIR, str(DEFAULT_DATA_DIR)),
        help=f"{holds} (default ${ENV_DATA_DIR}, else {DEFAULT_DATA_DIR})",
    )


def connection_options(parser: argparse.ArgumentParser) -> None:
    """The options every mesh-facing command shares."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--gateway",
        type=address,
        default=os.environ.get(ENV_GATEWAY, DEFAULT_GATEWAY),
        help=f"HOST:PORT of the gateway (default: ${ENV_GATEWAY}, else {DEFAULT_GATEWAY})",
    )
    data_dir_option(group, "PKI, identities, counters, calls")
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
    _token_option(
        group,
        "--gateway-bearer",
        ENV_GATEWAY_BEARER,
        f"bearer JWT for the gateway's oauth2 plugin (default ${ENV_GATEWAY_BEARER}): a token for "
        "the gateway's audience, never one the enclave accepts (--oauth2-token's, or any for an "
        "instance's enclave audience), which is refused: the host runs the gateway",
    )
    # Retired: it was both the gateway's token and the acting identity's, so the identity's
    # proof went to the gateway in clear metadata. Kept only to refuse it with the way out.
    group.add_argument("--bearer", default=None, help=argparse.SUPPRESS)
    group.add_argument("--timeout", type=seconds, default=15.0, help="seconds per call")
    group.add_argument(
        "--max-request-bytes",
        type=positive(MAX_MESSAGE_BYTES),
        default=os.environ.get(ENV_MAX_REQUEST_BYTES, str(MAX_REQUEST_BYTES)),
        metavar="N",
        help=f"the gateway's request limit (default ${ENV_MAX_REQUEST_BYTES}, else {MAX_REQUEST_BYTES}, "
        "the gateway's default): a larger sealed command is refused before anything is sent",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def identity_option(parser: argparse.ArgumentParser) -> None:
    """Who a command acts as."""
    parser.add_argument(
        "--as", dest="identity", help=f"identity name or key file (default {DEFAULT_IDENTITY!r})"
    )
    parser.add_argument("--anonymous", metavar="ACCOUNT", help="act as a self-declared account (auth none)")
    _token_option(
        parser,
        "--oauth2-token",
        ENV_OAUTH2_TOKEN,
        f"act as this JWT's subject on an instance with auth oauth2 (default ${ENV_OAUTH2_TOKEN}; "
        "--as takes precedence): the enclave's proof, sealed in each command and never sent to the "
        "gateway; the gateway takes its own token (--gateway-bearer)",
    )


def _token_option(
    options: argparse.ArgumentParser | argparse._ArgumentGroup, flag: str, env: str, help: str
) -> None:
    """A JWT option that defaults to an environment variable (one of the two tokens kept apart)."""
    options.add_argument(flag, metavar="JWT", default=os.environ.get(env), help=help)


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


def client_files(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """The CA, client certificate and key per the command line: --ca, --cert and --key, else the
    data directory's dev PKI (its admin certificate where there is one); none with --no-client-cert."""
    pki = Path(args.data_dir) / "pki"
    ca = args.ca or pki / "ca.pem"
    cert, key = args.cert, args.key
    if not args.no_client_cert and cert is None and (pki / "admin.pem").exists():
        cert, key = pki / "admin.pem", pki / "admin-key.pem"
    if args.no_client_cert:
        cert = key = None
    return ca, cert, key


def open_client(args: argparse.Namespace) -> VeilClient:
    """Connect and verify the enclave, per the command line; a gateway that is down or is not
    a TLS gateway is named within a few seconds."""
    data_dir = Path(args.data_dir)
    for given in (args.ca, args.cert, args.key):
        if given is not None and not given.is_file():
            raise VeilClientError(f"cannot read {given}: no such file")
    ca, cert, key = client_files(args)
    policy = trust_policy(args)
    policy.root_public_key(data_dir)  # an unusable --root is refused before connecting
    ca_path = ca if ca.exists() else None
    wait_for_gateway(args.gateway, ca_path, cert, key)
    return connect(
        args.gateway,
        policy=policy,
        ca=ca_path,
        cert=cert,
        key=key,
        data_dir=data_dir,
        api_key=args.api_key,
        bearer=gateway_bearer(args),
        timeout=args.timeout,
        max_request_bytes=args.max_request_bytes,
    )


def wait_for_gateway(
    gateway: str, ca: Path | None, cert: Path | None, key: Path | None, wait_s: float = CONNECT_WAIT_S
) -> None:
    """Fail fast: a TCP connection, then a TLS handshake, each within `wait_s` seconds."""
    host, _, port = gateway.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=wait_s):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise VeilClientError(
            f"cannot reach the gateway at {gateway} ({reason}); is the mesh running? start one with "
            "`veil up` (`make run` in a checkout), or name its gateway with --gateway or $VEIL_GATEWAY"
        ) from None
    if (cert is None) != (key is None):
        raise VeilClientError("a client certificate needs both --cert and --key")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    channel = grpc.secure_channel(gateway, credentials)
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        raise VeilClientError(
            f"{gateway} accepts connections but completed no TLS handshake with this CA in "
            f"{wait_s:.0f} s: is it a gateway port? (the local mesh's gateway is {DEFAULT_GATEWAY}; "
            "`veil up`, or `make run` in a checkout, starts it)"
        ) from None
    finally:
        channel.close()


def gateway_bearer(args: argparse.Namespace) -> str | None:
    """The gateway's bearer token; the retired one-token-for-both option or variable is refused
    before anything is sent (it may hold the token the enclave accepts)."""
    if getattr(args, "bearer", None) or os.environ.get(_ENV_BEARER_RETIRED):
        raise VeilClientError(
            f"--bearer and ${_ENV_BEARER_RETIRED} are retired: they sent the token the enclave accepts "
            "to the gateway, which the host runs. Pass the OAuth2 identity's token as --oauth2-token "
            f"(${ENV_OAUTH2_TOKEN}) and the gateway's own token, for the gateway's audience, as "
            f"--gateway-bearer (${ENV_GATEWAY_BEARER})"
        )
    return getattr(args, "gateway_bearer", None)


def acting_identity(args: argparse.Namespace) -> Identity:
    """Who the command acts as; an OAuth2 token that would also be the gateway's bearer (the same
    JWT, or one sharing its audience) is refused before connecting."""
    bearer = gateway_bearer(args)
    if getattr(args, "anonymous", None):
        return AnonymousIdentity(args.anonymous)
    token = getattr(args, "oauth2_token", None)
    if token and not args.identity:
        identity = OAuth2Identity(token)
        check_bearer(bearer, identity=identity)
        return identity
    return load_identity(Path(args.data_dir), args.identity or DEFAULT_IDENTITY)


@contextmanager
def acting_client(args: argparse.Namespace) -> Iterator[tuple[VeilClient, Identity]]:
    """A verified client and the identity the command acts as (refused before connecting)."""
    identity = acting_identity(args)
    with open_client(args) as veil:
        yield veil, identity


def recipient(args: argparse.Namespace, value: str) -> str:
    """The account a recipient names: a local identity, a contact or a 64-hex account; anything
    else is refused before anything is sealed."""
    return resolve_recipient(Path(args.data_dir), value)


def namer(args: argparse.Namespace) -> Callable[[str], str]:
    """Shows an account as its identity's or contact's name when one is known."""
    names = names_by_account(Path(args.data_dir))
    return lambda account: names.get(account, account)


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


def report_receipt(
    args: argparse.Namespace, document: dict[str, Any], opened: Opened | None, done: str
) -> int:
    """`report` for a command with a receipt: the JSON document carries it as "receipt", and
    people read `done` followed by the receipt line."""
    document = {**document, "receipt": receipt_json(opened)}
    return report(args, document, lambda: print(f"{done}; {receipt_line(opened)}"))


def receipt_line(opened: Opened | None) -> str:
    if opened is None or opened.receipt is None:
        return ""
    kind = "log sequence" if opened.receipt.kind == envelope_pb2.RECEIPT_KIND_COMMAND else "read at sequence"
    return f"receipt verified ({kind} {opened.receipt.sequence})"
