"""`veil instance`: create, list and pin app instances (creating needs the admin certificate)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from veil.cli import output
from veil.cli.common import (
    DEFAULT_IDENTITY,
    UsageError,
    acting_identity,
    bind_sdk,
    example,
    gateway_bearer,
    instance_id,
    open_client,
    recipient,
    report,
)
from veil.enclave.v1 import envelope_pb2
from veil.gateway.v1 import gateway_pb2
from veil.sdk.errors import VeilClientError
from veil.sdk.gateway_auth import check_bearer
from veil.sdk.identity import identity_paths

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

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


def register(commands: Subcommands) -> None:
    instance = commands.add_parser("instance", help="create and list app instances (admin certificate)")
    instance_commands = instance.add_subparsers(dest="instance_command", required=True)
    create = instance_commands.add_parser(
        "create",
        help="create an app instance (an existing one with the same configuration is kept)",
        epilog=example("veil instance create coins --app token --as treasury"),
    )
    create.add_argument("instance", type=instance_id, help="instance id (lowercase letters, digits, dashes)")
    create.add_argument("--app", required=True, choices=sorted(APPS))
    create.add_argument("--auth", default="signature", choices=sorted(SCHEMES))
    create.add_argument("--token-issuer", help="token app: the minting identity or account (default: --as)")
    create.add_argument("--oauth2-issuer")
    create.add_argument(
        "--oauth2-audience",
        help="the audience the enclave accepts OAuth2 tokens for; the gateway's token (--gateway-bearer) "
        "must be for another one",
    )
    create.add_argument("--oauth2-jwks", help="JWKS file of the OAuth2 issuer")
    bind_sdk(create, instance_create, identity=True)
    bind_sdk(
        instance_commands.add_parser(
            "list", help="list instances across shards", epilog=example("veil instance list")
        ),
        instance_list,
    )
    pin = instance_commands.add_parser(
        "pin",
        help="pin an instance's genesis: later commands refuse any other instance under its id",
        epilog=example("veil instance pin coins --genesis 9c41…(64 hex)"),
    )
    pin.add_argument("instance", type=instance_id)
    pin.add_argument("--genesis", help="the genesis hash (hex) you expect, e.g. from its creator")
    bind_sdk(pin, instance_pin)


def _instance_json(instance: gateway_pb2.Instance) -> dict[str, Any]:
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
            raise UsageError("--auth oauth2 needs --oauth2-issuer, --oauth2-audience and --oauth2-jwks")
        config.oauth2_issuer = args.oauth2_issuer
        config.oauth2_audience = args.oauth2_audience
        config.oauth2_jwks_json = Path(args.oauth2_jwks).read_text()
        # The gateway's token must not be one this instance's enclave accepts (the host runs the
        # gateway): refused here, before connecting, rather than after the first attestation.
        check_bearer(gateway_bearer(args), enclave_audiences=[args.oauth2_audience])
    if args.app == "token":
        unnamed = not (args.token_issuer or args.identity)
        if unnamed and not identity_paths(Path(args.data_dir), DEFAULT_IDENTITY)[0].exists():
            raise UsageError(
                "a token instance needs its issuer, the identity that may mint: --as NAME (or "
                "--token-issuer NAME|ACCOUNT); `veil identity new NAME` makes one"
            )
        issuer = recipient(args, args.token_issuer) if args.token_issuer else acting_identity(args).account
        try:
            config.token_issuer_public_key = bytes.fromhex(issuer)
        except ValueError:
            raise VeilClientError("--token-issuer must name an Ed25519 identity or account") from None
    with open_client(args) as veil:
        listed = {i.instance_id: i for i in veil.list_instances()}
        existed = args.instance in listed
        if existed:
            # Nothing to create: say so, and what the enclave signed for the instance.
            instance = listed[args.instance]
            descriptor = veil.attest(args.instance, refresh=True).descriptor
            if descriptor is None:
                raise VeilClientError(f"the enclave did not describe instance {args.instance!r}")
            if descriptor.config != config:
                have = _instance_json(instance)
                raise VeilClientError(
                    f"instance {args.instance!r} already exists with another configuration "
                    f"({have['app']}, auth {have['auth']}); nothing created"
                )
        else:
            # The SDK checks the enclave-signed descriptor carries exactly this configuration,
            # then pins it.
            instance, descriptor = veil.create_instance(args.instance, config)
    document = {**_instance_json(instance), **descriptor.to_json(), "existed": existed}
    genesis = f"genesis {descriptor.genesis_hash.hex()[:16]}… pinned"
    said = (
        f"{args.app} instance {instance.instance_id!r} already exists on {instance.shard} with this "
        f"configuration: kept, nothing created; {genesis}"
        if existed
        else f"created {args.app} instance {instance.instance_id!r} on {instance.shard}; {genesis}"
    )
    return report(args, document, lambda: print(said))


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
    return report(
        args,
        descriptor.to_json(),
        lambda: print(f"pinned instance {args.instance!r}: genesis {descriptor.genesis_hash.hex()}"),
    )


def instance_list(args: argparse.Namespace) -> int:
    with open_client(args) as veil:
        instances = [_instance_json(i) for i in veil.list_instances()]
    rows = [[i["instance_id"], i["app"], i["auth"], i["sequence"], i["shard"]] for i in instances]
    return report(
        args,
        {"instances": instances},
        lambda: output.table(["INSTANCE", "APP", "AUTH", "SEQUENCE", "SHARD"], rows),
    )
