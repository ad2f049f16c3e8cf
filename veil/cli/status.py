"""`veil status`: one table of the mesh, from what the gateway and the keyvault expose.

Rows: the gateway (GetStatus), each state replica it routes to (health and counters from the
gateway; enclave measurement and TCB status from the verified attestation of an instance it
hosts), the keyvault (its own GetStatus, admin certificate), and each instance (its shard, its
committed head, and the head lag: how many entries of it the keyvault has not confirmed yet,
from the keyvault's GetCommitHead; a strict instance's answers wait for those).

`--json` prints the same rows as values: the whole measurement, numbers as numbers, and null
where the table shows "-" (nothing to show) or "n/a" (not known: the keyvault unreachable).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from veil.cli import output
from veil.cli.common import address, bind_sdk, example, open_client, report
from veil.gateway.v1 import gateway_pb2
from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.sdk.client import VeilClient
from veil.sdk.errors import VeilClientError
from veil.verify.errors import AttestationError

if TYPE_CHECKING:
    from veil.cli.common import Subcommands

DEFAULT_KEYVAULT = "127.0.0.1:50052"
#: A column that does not apply to the row, and one whose value could not be learned.
_NONE, _UNKNOWN = "-", "n/a"
#: Instance heads asked of the keyvault per `veil status` (one small call each).
MAX_HEADS_ASKED = 256


def register(commands: Subcommands) -> None:
    status = commands.add_parser(
        "status",
        help="one table of the mesh: services, health, addresses, enclave, TCB, heads",
        epilog=example("veil status", "veil status --json"),
    )
    status.add_argument(
        "--keyvault",
        type=address,
        help="the keyvault's HOST:PORT (admin certificate; default: the gateway's host and port + 1, "
        "as `veil up` lays them out)",
    )
    bind_sdk(status, mesh_status)


def _keyvault_address(args: argparse.Namespace) -> str:
    if args.keyvault:
        return str(args.keyvault)
    host, _, port = str(args.gateway).rpartition(":")
    return f"{host}:{int(port) + 1}" if int(port) < 65535 else DEFAULT_KEYVAULT


def _shard_detail(shard: gateway_pb2.ShardStatus) -> str:
    """A state replica's counters; with strict answers, who released their holds (mostly the
    enclave means the keyvault's hold keys do not match or do not come: one ECALL more a batch)."""
    detail = f"{shard.commands} commands, {shard.commits} commits, {shard.ecalls} ECALLs"
    if shard.holds_released_by_keyvault or shard.holds_released_by_enclave:
        detail += (
            f"; strict answers released by the keyvault {shard.holds_released_by_keyvault}, "
            f"by the enclave {shard.holds_released_by_enclave}"
        )
    return detail


def _keyvault(args: argparse.Namespace, instance_ids: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    """The keyvault's row, and the confirmed head sequence of each instance it answered for."""
    target = _keyvault_address(args)
    row: dict[str, Any] = {"service": "keyvault", "address": target, "measurement": None, "tcb": None}
    pki = Path(args.data_dir) / "pki"
    ca, cert, key = (
        args.ca or pki / "ca.pem",
        args.cert or pki / "admin.pem",
        args.key or pki / "admin-key.pem",
    )
    if not (ca.is_file() and cert.is_file() and key.is_file()):
        return {**row, "health": "UNKNOWN", "detail": "needs the admin certificate (--cert/--key)"}, {}
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    with grpc.secure_channel(target, credentials) as channel:
        stub = keyvault_pb2_grpc.KeyvaultServiceStub(channel)
        try:
            answer = stub.GetStatus(keyvault_pb2.GetStatusRequest(), timeout=3)
        except grpc.RpcError as error:
            return {**row, "health": "UNREACHABLE", "detail": error.code().name}, {}
        heads = _confirmed_heads(stub, instance_ids[:MAX_HEADS_ASKED])
    detail = f"{answer.detail}; KEK {answer.kek_provider}; collateral {answer.collateral_source}"
    return {**row, "health": "SERVING" if answer.serving else "NOT_SERVING", "detail": detail}, heads


def _confirmed_heads(stub: keyvault_pb2_grpc.KeyvaultServiceStub, instance_ids: list[str]) -> dict[str, int]:
    """The keyvault's head sequence of each instance, up to the first it did not answer for."""
    heads: dict[str, int] = {}
    for instance_id in instance_ids:
        request = keyvault_pb2.GetCommitHeadRequest(instance_id=instance_id)
        try:
            heads[instance_id] = stub.GetCommitHead(request, timeout=3).sequence
        except grpc.RpcError:
            break  # the rest show their lag as not known
    return heads


def _enclave(veil: VeilClient, instance_id: str) -> tuple[str, str]:
    """(MRENCLAVE hex, TCB status) of the enclave hosting `instance_id`, verified."""
    try:
        attestation = veil.attest(instance_id)
    except (VeilClientError, AttestationError) as exc:
        return "refused", str(exc)
    return attestation.mrenclave.hex(), attestation.tcb_status


def _cell(value: Any, width: int | None = None) -> str:
    """A value as the table shows it: "-" for none, shortened to `width` characters."""
    if value is None:
        return _NONE
    text = str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def mesh_status(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    with open_client(args) as veil:
        gateway = veil.status()
        rows.append(
            {
                "service": "gateway",
                "health": "SERVING" if gateway.serving else "NOT_SERVING",
                "address": args.gateway,
                "measurement": None,
                "tcb": None,
                "detail": gateway.detail,
            }
        )
        instances = veil.list_instances()
        default = _enclave(veil, "")
        for shard in gateway.shards:
            hosted = [i.instance_id for i in instances if i.shard == shard.address]
            measurement, tcb = _enclave(veil, hosted[0]) if hosted else default
            rows.append(
                {
                    "service": "state",
                    "health": "SERVING" if shard.serving else "NOT_SERVING",
                    "address": shard.address,
                    "measurement": measurement,
                    "tcb": tcb,
                    "detail": _shard_detail(shard),
                }
            )
        keyvault, confirmed = _keyvault(args, [i.instance_id for i in instances])
        rows.append(keyvault)
        for instance in instances:
            known = confirmed.get(instance.instance_id)
            rows.append(
                {
                    "service": f"instance {instance.instance_id}",
                    "health": None,
                    "address": instance.shard,
                    "measurement": None,
                    "tcb": None,
                    "head": instance.sequence,
                    # The listing came first: a head the keyvault confirmed since is no lag.
                    "head_lag": None if known is None else max(instance.sequence - known, 0),
                    "detail": "",
                }
            )
    document = {"services": rows}
    table = [
        [
            r["service"],
            _cell(r["health"]),
            r["address"],
            _cell(r["measurement"], 17),
            _cell(r["tcb"], 40),
            _cell(r.get("head")),
            _UNKNOWN if "head" in r and r["head_lag"] is None else _cell(r.get("head_lag")),
            r["detail"],
        ]
        for r in rows
    ]
    headers = ["SERVICE", "HEALTH", "ADDRESS", "MRENCLAVE", "TCB", "HEAD", "HEAD LAG", "DETAIL"]
    return report(args, document, lambda: output.table(headers, table))
