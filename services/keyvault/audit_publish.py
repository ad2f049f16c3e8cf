"""Publish the keyvault's signed audit tips outside its database, and check each new one.

Run by an operator (admin certificate) on a schedule, with the log file kept somewhere the
keyvault's host and database cannot write (another machine, a WORM bucket)::

    python -m veil.services.keyvault.audit_publish --address keyvault:50052 \\
        --cert admin.pem --key admin-key.pem --ca ca.pem \\
        --release-key <hex of GetJwks.release_public_key> --log audit-tips.jsonl

Each run fetches the tip ListAuditEvents returns (the keyvault verified its chain first),
checks its signature under the pinned release key, checks that the log still holds the
last published tip (the event at that sequence has the published hash: no cut-back, no
rewrite since), and appends the new tip as one JSON line. Exit status 1, with the reason on
stderr, is the alarm: what signatures alone cannot show (the log cut back to an older signed
tip, or replaced wholesale) shows here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc

from veil.keyvault.v1 import keyvault_pb2, keyvault_pb2_grpc
from veil.services.common.channels import secure_channel
from veil.services.common.config import TlsFiles
from veil.services.keyvault.audit import SignedTip, page_token_after, verify_tip

TIMEOUT_S = 30.0


class PublishError(Exception):
    """The keyvault's audit log does not extend what was published (or cannot be read)."""


def last_published(log: Path) -> SignedTip | None:
    """The newest tip in the log file, or None when nothing was published yet."""
    if not log.exists():
        return None
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        return None
    entry = json.loads(lines[-1])
    return SignedTip(
        sequence=int(entry["sequence"]),
        hash=bytes.fromhex(entry["hash"]),
        signature=bytes.fromhex(entry["signature"]),
        public_key=bytes.fromhex(entry["release_public_key"]),
    )


def publish(stub: keyvault_pb2_grpc.KeyvaultServiceStub, *, release_key: bytes, log: Path) -> SignedTip:
    """Fetch, check and append the current signed tip; raises PublishError on any mismatch."""
    try:
        reply = stub.ListAuditEvents(keyvault_pb2.ListAuditEventsRequest(page_size=1), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        raise PublishError(f"ListAuditEvents failed: {exc.code().name} {exc.details()}") from None
    if not reply.HasField("tip"):
        raise PublishError("the keyvault returned no signed audit tip")
    tip = SignedTip(
        sequence=reply.tip.sequence,
        hash=reply.tip.hash,
        signature=reply.tip.signature,
        public_key=reply.tip.release_public_key,
    )
    if tip.public_key != release_key or not verify_tip(release_key, tip.sequence, tip.hash, tip.signature):
        raise PublishError(f"the tip at event {tip.sequence} is not signed by the pinned release key")
    previous = last_published(log)
    if previous is not None:
        if tip.sequence < previous.sequence:
            raise PublishError(
                f"the log ends at event {tip.sequence}, before the published tip {previous.sequence}"
                ": it was cut back"
            )
        try:
            page = stub.ListAuditEvents(
                keyvault_pb2.ListAuditEventsRequest(
                    page_size=1, page_token=page_token_after(previous.sequence - 1)
                ),
                timeout=TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise PublishError(f"ListAuditEvents failed: {exc.code().name} {exc.details()}") from None
        if (
            not page.events
            or page.events[0].sequence != previous.sequence
            or page.events[0].hash != previous.hash
        ):
            raise PublishError(
                f"event {previous.sequence} differs from the published tip: the log was rewritten"
            )
    if previous is None or tip.sequence > previous.sequence:
        with log.open("a", encoding="utf-8") as out:
            out.write(tip.as_json() + "\n")
    return tip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the keyvault's mTLS address, host:port")
    parser.add_argument("--cert", type=Path, required=True, help="the admin certificate")
    parser.add_argument("--key", type=Path, required=True, help="the admin private key")
    parser.add_argument("--ca", type=Path, required=True, help="the CA that signed the keyvault")
    parser.add_argument("--release-key", required=True, help="the pinned release public key, hex")
    parser.add_argument("--log", type=Path, required=True, help="the published tips, one JSON line each")
    args = parser.parse_args(argv)
    try:
        release_key = bytes.fromhex(args.release_key)
    except ValueError:
        parser.error("--release-key must be hex")
    channel = secure_channel(args.address, TlsFiles(cert=args.cert, key=args.key, ca=args.ca))
    try:
        tip = publish(keyvault_pb2_grpc.KeyvaultServiceStub(channel), release_key=release_key, log=args.log)
    except PublishError as exc:
        print(f"audit_publish: ALERT: {exc}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    print(tip.as_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
