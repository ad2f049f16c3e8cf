"""The SDK-backed `veil` subcommands: identity, instance, vault, token, ballot, attest show.

Every command that talks to the mesh first connects with `client.connect`, i.e. verifies the
enclave against the expected-measurement policy (fail closed: `--mrenclave HEX` or a policy
file, by default `<data-dir>/expected-measurement.json` as written by `veil up`). Output is
a table or key/value block for humans, or one JSON document with `--json`. Errors go to
stderr as `error: ...` with exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from veil.cli import output
from veil.enclave.v1 import envelope_pb2
from veil.sdk.apps import VoteReceipt
from veil.sdk.client import DEFAULT_GATEWAY, VeilClient, connect
from veil.sdk.errors import CommandRefused, VeilClientError
from veil.sdk.identity import (
    AnonymousIdentity,
    Identity,
    OAuth2Identity,
    identity_paths,
    load_identity,
    new_identity,
    resolve_account,
)
from veil.sdk.sealing import Opened, verify_receipt
from veil.sdk.trust_policy import (
    ANY_TCB_STATUS,
    DEFAULT_TCB_STATUSES,
    POLICY_FILE,
    ExpectedMeasurement,
    load_policy,
)
from veil.services.common.config import DEFAULT_DATA_DIR
from veil.verify.bundle import VerifiedAttestation
from veil.verify.errors import AttestationError

ENV_GATEWAY = "VEIL_GATEWAY"
ENV_API_KEY = "VEIL_API_KEY"
ENV_BEARER = "VEIL_BEARER_TOKEN"
DEFAULT_IDENTITY = "default"
APPS = {
    "vault": envelope_pb2.APP_KIND_VAULT,
    "token": envelope_pb2.APP_KIND_TOKEN,
    "ballot": envelope_pb2.APP_KIND_BALLOT,
}
SCHEMES = {
    "none": envelope_pb2.AUTH_SCHEME_NONE,
    "signature": envelope_pb2.AUTH_SCHEME_SIGNATURE,
    "oauth2": envelope_pb2.AUTH_SCHEME_OAUTH2,
}

Handler = Callable[[argparse.Namespace], int]


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


def _policy(args: argparse.Namespace) -> ExpectedMeasurement:
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
        jwks = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VeilClientError(f"cannot read JWKS {path}: {exc}") from None
    if not isinstance(jwks, dict):
        raise VeilClientError(f"JWKS {path} is not a JSON object")
    return jwks


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
        policy=_policy(args),
        ca=ca if ca.exists() else None,
        cert=cert,
        key=key,
        data_dir=data_dir,
        api_key=args.api_key,
        bearer=args.bearer,
        timeout=args.timeout,
    )


def _identity(args: argparse.Namespace) -> Identity:
    if getattr(args, "anonymous", None):
        return AnonymousIdentity(args.anonymous)
    if args.bearer and not args.identity:
        return OAuth2Identity(args.bearer)
    return load_identity(Path(args.data_dir), args.identity or DEFAULT_IDENTITY)


def _account(args: argparse.Namespace, value: str) -> str:
    return resolve_account(Path(args.data_dir), value)


def _receipt_json(opened: Opened | None) -> dict[str, Any] | None:
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


def _report(args: argparse.Namespace, document: dict[str, Any], human: Callable[[], None]) -> int:
    if args.json:
        output.emit_json(document)
    else:
        human()
    return 0


def _receipt_line(opened: Opened | None) -> str:
    if opened is None or opened.receipt is None:
        return ""
    kind = "log sequence" if opened.receipt.kind == envelope_pb2.RECEIPT_KIND_COMMAND else "read at sequence"
    return f"receipt verified ({kind} {opened.receipt.sequence})"


# --- identity -----------------------------------------------------------------------------


def identity_new(args: argparse.Namespace) -> int:
    identity = new_identity(Path(args.data_dir), args.name, force=args.force)
    key_path, pub_path = identity_paths(Path(args.data_dir), args.name)
    document = {"name": args.name, "account": identity.account, "key": str(key_path), "public": str(pub_path)}
    return _report(args, document, lambda: output.fields(document))


def identity_show(args: argparse.Namespace) -> int:
    identity = load_identity(Path(args.data_dir), args.name)
    document = {"name": args.name, "account": identity.account}
    return _report(args, document, lambda: output.fields(document))


def identity_list(args: argparse.Namespace) -> int:
    directory = Path(args.data_dir) / "identities"
    rows = (
        sorted((p.stem, p.read_text().strip()) for p in directory.glob("*.pub")) if directory.is_dir() else []
    )
    document = {"identities": [{"name": n, "account": a} for n, a in rows]}
    return _report(args, document, lambda: output.table(["NAME", "ACCOUNT"], rows))


# --- instances ----------------------------------------------------------------------------


def _instance_json(instance: Any) -> dict[str, Any]:
    config = instance.config
    return {
        "instance_id": instance.instance_id,
        "app": envelope_pb2.AppKind.Name(config.app).removeprefix("APP_KIND_").lower(),
        "auth": envelope_pb2.AuthScheme.Name(config.auth_scheme).removeprefix("AUTH_SCHEME_").lower(),
        "sequence": instance.sequence,
        "shard": instance.shard,
    }


def instance_create(args: argparse.Namespace) -> int:
    config = envelope_pb2.InstanceConfig(app=APPS[args.app], auth_scheme=SCHEMES[args.auth])
    if args.auth == "oauth2":
        if not (args.oauth2_issuer and args.oauth2_audience and args.oauth2_jwks):
            raise VeilClientError("--auth oauth2 needs --oauth2-issuer, --oauth2-audience and --oauth2-jwks")
        config.oauth2_issuer = args.oauth2_issuer
        config.oauth2_audience = args.oauth2_audience
        config.oauth2_jwks_json = Path(args.oauth2_jwks).read_text()
    if args.app == "token":
        issuer = _account(args, args.token_issuer) if args.token_issuer else _identity(args).account
        try:
            config.token_issuer_public_key = bytes.fromhex(issuer)
        except ValueError:
            raise VeilClientError("--token-issuer must be an identity name or an account (hex key)") from None
    with open_client(args) as veil:
        # The SDK checks the enclave-signed descriptor carries exactly this configuration, then pins it.
        instance, descriptor = veil.create_instance(args.instance, config)
    document = {**_instance_json(instance), **descriptor.to_json()}
    return _report(
        args,
        document,
        lambda: print(
            f"created {args.app} instance {instance.instance_id!r} on {instance.shard}; "
            f"genesis {descriptor.genesis_hash.hex()[:16]}… pinned"
        ),
    )


def instance_pin(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        descriptor = veil.attest(args.instance, refresh=True).descriptor
        if descriptor is None:
            raise VeilClientError(f"the enclave did not describe instance {args.instance!r}")
        if args.genesis and args.genesis.lower() != descriptor.genesis_hash.hex():
            raise VeilClientError(
                f"instance {args.instance!r} has genesis {descriptor.genesis_hash.hex()}, not --genesis"
            )
        veil.pins.pin(descriptor)
    return _report(
        args,
        descriptor.to_json(),
        lambda: print(f"pinned instance {args.instance!r}: genesis {descriptor.genesis_hash.hex()}"),
    )


def instance_list(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        instances = [_instance_json(i) for i in veil.list_instances()]
    rows = [[i["instance_id"], i["app"], i["auth"], i["sequence"], i["shard"]] for i in instances]
    return _report(
        args,
        {"instances": instances},
        lambda: output.table(["INSTANCE", "APP", "AUTH", "SEQUENCE", "SHARD"], rows),
    )


# --- vault --------------------------------------------------------------------------------


def vault_put(args: argparse.Namespace) -> int:
    if args.file is not None:
        data = Path(args.file).read_bytes()
    elif args.data is not None:
        data = args.data.encode("utf-8")
    else:
        data = sys.stdin.buffer.read()
    with open_client(args) as veil:
        vault = veil.vault(args.instance, _identity(args))
        created = vault.put(args.record, data)
    document = {
        "record_id": args.record,
        "created": created,
        "bytes": len(data),
        "receipt": _receipt_json(vault.last),
    }
    verb = "created" if created else "replaced"
    return _report(
        args,
        document,
        lambda: print(f"{verb} record {args.record!r} ({len(data)} bytes); {_receipt_line(vault.last)}"),
    )


def vault_get(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        vault = veil.vault(args.instance, _identity(args))
        record = vault.get(args.record, _account(args, args.owner) if args.owner else None)
    if args.out:
        Path(args.out).write_bytes(record.data)
    document = {
        "record_id": args.record,
        "data_base64": base64.b64encode(record.data).decode("ascii"),
        "readers": list(record.readers),
        "receipt": _receipt_json(vault.last),
    }

    def human() -> None:
        if not args.out:
            sys.stdout.buffer.write(record.data)
            if not record.data.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
        if record.readers:
            print(f"shared with: {', '.join(record.readers)}", file=sys.stderr)

    return _report(args, document, human)


def _vault_change(args: argparse.Namespace, verb: str) -> int:
    with open_client(args) as veil:
        vault = veil.vault(args.instance, _identity(args))
        if verb == "delete":
            vault.delete(args.record)
            done = f"deleted record {args.record!r}"
        else:
            reader = _account(args, args.reader)
            getattr(vault, verb)(args.record, reader)
            done = f"{verb}d record {args.record!r} {'with' if verb == 'share' else 'from'} {reader}"
    document = {"record_id": args.record, "action": verb, "receipt": _receipt_json(vault.last)}
    return _report(args, document, lambda: print(f"{done}; {_receipt_line(vault.last)}"))


def vault_share(args: argparse.Namespace) -> int:
    return _vault_change(args, "share")


def vault_revoke(args: argparse.Namespace) -> int:
    return _vault_change(args, "revoke")


def vault_delete(args: argparse.Namespace) -> int:
    return _vault_change(args, "delete")


# --- token --------------------------------------------------------------------------------


def token_mint(args: argparse.Namespace) -> int:
    to = _account(args, args.to)
    with open_client(args) as veil:
        token = veil.token(args.instance, _identity(args))
        supply = token.mint(to, args.amount)
    document = {"to": to, "amount": args.amount, "total_supply": supply, "receipt": _receipt_json(token.last)}
    return _report(
        args,
        document,
        lambda: print(f"minted {args.amount} to {to}; total supply {supply}; {_receipt_line(token.last)}"),
    )


def _read_transfers(args: argparse.Namespace, path: Path) -> list[tuple[str, int]]:
    transfers: list[tuple[str, int]] = []
    with path.open(newline="") as file:
        for number, row in enumerate(csv.reader(file), start=1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 2:
                raise VeilClientError(f"{path}:{number}: expected two columns: to,amount")
            to, amount = row[0].strip(), row[1].strip()
            if number == 1 and not amount.isdigit():
                continue  # a header line
            if not amount.isdigit() or int(amount) <= 0:
                raise VeilClientError(f"{path}:{number}: amount must be a positive integer")
            transfers.append((_account(args, to), int(amount)))
    return transfers


def token_transfer(args: argparse.Namespace) -> int:
    if args.from_csv is not None:
        return _bulk_transfer(args)
    if args.to is None or args.amount is None:
        raise VeilClientError("give TO AMOUNT, or --from-csv FILE")
    to = _account(args, args.to)
    with open_client(args) as veil:
        token = veil.token(args.instance, _identity(args))
        balance = token.transfer(to, args.amount)
    document = {"to": to, "amount": args.amount, "balance": balance, "receipt": _receipt_json(token.last)}
    return _report(
        args,
        document,
        lambda: print(f"sent {args.amount} to {to}; balance {balance}; {_receipt_line(token.last)}"),
    )


def _bulk_transfer(args: argparse.Namespace) -> int:
    transfers = _read_transfers(args, Path(args.from_csv))
    results: list[dict[str, Any]] = []
    failed = 0
    with open_client(args) as veil:
        token = veil.token(args.instance, _identity(args))
        progress = output.Progress(len(transfers), "transfers")
        for to, amount in transfers:
            try:
                balance = token.transfer(to, amount)
                receipt = _receipt_json(token.last)
                results.append(
                    {
                        "to": to,
                        "amount": amount,
                        "balance": balance,
                        "sequence": receipt and receipt["sequence"],
                    }
                )
            except CommandRefused as refusal:
                failed += 1
                results.append({"to": to, "amount": amount, "error": str(refusal)})
            progress.advance()
        progress.finish()
    sent = sum(r["amount"] for r in results if "error" not in r)
    document = {"transfers": results, "sent": sent, "failed": failed}

    def human() -> None:
        print(f"{len(results) - failed} transfers committed ({sent} tokens), {failed} refused")
        for r in results:
            if "error" in r:
                print(f"  refused: {r['amount']} to {r['to']}: {r['error']}")

    _report(args, document, human)
    return 1 if failed else 0


def token_balance(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        token = veil.token(args.instance, _identity(args))
        balance = token.balance()
    document = {"account": token.account, "balance": balance, "receipt": _receipt_json(token.last)}
    return _report(args, document, lambda: print(f"{balance}  ({_receipt_line(token.last)})"))


def token_supply(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        token = veil.token(args.instance, _identity(args))
        supply = token.total_supply()
    document = {"total_supply": supply, "receipt": _receipt_json(token.last)}
    return _report(args, document, lambda: print(f"{supply}  ({_receipt_line(token.last)})"))


# --- ballot -------------------------------------------------------------------------------


def _vote_path(args: argparse.Namespace, ballot: str, voter: str) -> Path:
    return Path(args.data_dir) / "ballots" / str(args.instance) / f"{ballot}.{voter[:16]}.json"


def ballot_create(args: argparse.Namespace) -> int:
    voters = [_account(args, v) for v in args.voter]
    with open_client(args) as veil:
        ballot = veil.ballot(args.instance, _identity(args))
        ballot.create(args.ballot, args.question, args.option, voters, min_votes=args.min_votes)
    document = {
        "ballot_id": args.ballot,
        "options": args.option,
        "voters": voters,
        "receipt": _receipt_json(ballot.last),
    }
    who = f"{len(voters)} eligible voters" if voters else "open to everyone"
    return _report(
        args, document, lambda: print(f"ballot {args.ballot!r} is open ({who}); {_receipt_line(ballot.last)}")
    )


def ballot_vote(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        ballot = veil.ballot(args.instance, _identity(args))
        if args.option.isdigit():
            option = int(args.option)
        else:
            options = list(ballot.info(args.ballot).options)
            if args.option not in options:
                raise VeilClientError(f"no option {args.option!r}; options are {options}")
            option = options.index(args.option)
        vote = ballot.vote(args.ballot, option)
    path = _vote_path(args, args.ballot, vote.voter)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the salt reveals the vote
    with os.fdopen(fd, "w") as file:
        json.dump(vote.to_json(), file, indent=2)
    document = {
        "ballot_id": args.ballot,
        "commitment": vote.commitment.hex(),
        "replaced": vote.replaced,
        "saved": str(path),
        "receipt": _receipt_json(ballot.last),
    }
    return _report(
        args,
        document,
        lambda: print(
            f"vote cast{' (replaced your earlier vote)' if vote.replaced else ''}; "
            f"commitment {vote.commitment.hex()}; {_receipt_line(ballot.last)}\n"
            f"vote receipt saved to {path} (keep it: it proves your vote later)"
        ),
    )


def _tally_table(options: list[str], counts: tuple[int, ...]) -> None:
    output.table(["OPTION", "VOTES"], [[o, c] for o, c in zip(options, counts, strict=True)])


def _tally(args: argparse.Namespace, close: bool) -> int:
    with open_client(args) as veil:
        ballot = veil.ballot(args.instance, _identity(args))
        tally = ballot.close(args.ballot) if close else ballot.tally(args.ballot)
        info = ballot.info(args.ballot)
    options = list(info.options)
    document = {
        "ballot_id": args.ballot,
        "question": info.question,
        "counts": dict(zip(options, tally.counts, strict=True)),
        "voters": tally.voters,
        "merkle_root": tally.merkle_root.hex(),
    }

    def human() -> None:
        print(info.question)
        _tally_table(options, tally.counts)
        print(f"{tally.voters} votes counted; Merkle root {tally.merkle_root.hex()}")

    return _report(args, document, human)


def ballot_close(args: argparse.Namespace) -> int:
    return _tally(args, close=True)


def ballot_tally(args: argparse.Namespace) -> int:
    return _tally(args, close=False)


def ballot_verify_receipt(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        identity = _identity(args)
        path = Path(args.receipt) if args.receipt else _vote_path(args, args.ballot, identity.account)
        try:
            vote = VoteReceipt.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            raise VeilClientError(f"cannot read vote receipt {path}: {exc}") from None
        ballot = veil.ballot(args.instance, identity)
        signature_ok = verify_receipt(vote.receipt, veil.attest(args.instance).keys.signing_public_key)
        check = ballot.verify_vote(vote)
    document = {
        "ballot_id": vote.ballot_id,
        "counted": True,
        "leaf_index": check.leaf_index,
        "tree_size": check.tree_size,
        "merkle_root": check.tally.merkle_root.hex(),
        "vote_receipt_signature": "valid" if signature_ok else "signed by an earlier enclave key",
    }

    def human() -> None:
        root = check.tally.merkle_root.hex()
        print(f"your vote is counted: leaf {check.leaf_index} of {check.tree_size} under Merkle root {root}")
        print("checked: the commitment recomputes from your option and salt; the inclusion proof")
        print(f"         verifies against the tally's root; the counts sum to {check.tree_size}")
        print(f"vote receipt signature: {document['vote_receipt_signature']}")

    return _report(args, document, human)


# --- attest -------------------------------------------------------------------------------


def _when(seconds: int) -> str:
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    left = seconds - dt.datetime.now(dt.UTC).timestamp()
    return f"{moment.isoformat(timespec='seconds')} (in {int(left // 60)} min {int(left % 60)} s)"


def attest_show(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        attestation: VerifiedAttestation = veil.attest(args.instance or "")
    document = {"gateway": args.gateway, "instance": args.instance, "verified": True, **attestation.to_json()}

    def human() -> None:
        print(
            f"enclave behind {args.gateway}"
            + (f" hosting {args.instance!r}" if args.instance else "")
            + ": TRUSTED"
        )
        output.fields(
            {
                "MRENCLAVE": attestation.mrenclave.hex(),
                "MRSIGNER": attestation.mrsigner.hex(),
                "product / SVN": f"{attestation.product_id} / {attestation.svn}",
                "debuggable": "yes" if attestation.debug else "no",
                "TCB status": attestation.tcb_status
                + (
                    f" (advisories: {', '.join(attestation.advisory_ids)})"
                    if attestation.advisory_ids
                    else ""
                ),
                "token issuer": attestation.issuer,
                "token expires": _when(attestation.token_expires_at),
                "HPKE key": attestation.keys.hpke_x25519_public_key.hex(),
                "receipt key": attestation.keys.signing_public_key.hex(),
            }
        )
        print("checked:")
        for check in attestation.checks:
            print(f"  ✓ {check}")

    return _report(args, document, human)


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a handler, turning SDK errors and refused evidence into `error: ...` on stderr and exit
    status 1."""
    try:
        return handler(args)
    except (VeilClientError, AttestationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
