"""Item 2 of issue 14: `ballot verify-receipt` never claims a check that did not happen. Each
byte class of a saved vote receipt (signature, key, signed payload, vote payload) is altered and
the command must refuse it, with one error line and exit 1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cli.support import Veil
from veil.enclave.v1 import envelope_pb2


def _flip_hex(text: str, at: int = 0) -> str:
    raw = bytearray(bytes.fromhex(text))
    raw[at % len(raw)] ^= 0x01
    return raw.hex()


def _receipt_field(field: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        receipt = envelope_pb2.Receipt.FromString(bytes.fromhex(document["receipt"]))
        value = getattr(receipt, field)
        if isinstance(value, bytes):
            setattr(receipt, field, bytes([value[0] ^ 1]) + value[1:])
        elif isinstance(value, int):
            setattr(receipt, field, value + 1)
        else:
            setattr(receipt, field, value + "x")
        document["receipt"] = receipt.SerializeToString().hex()

    return change


def _set(key: str, transform: Callable[[Any], Any]) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document[key] = transform(document[key])

    return change


ALTERATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "signature": _receipt_field("signature"),
    "signature (last byte)": _set("receipt", lambda r: _flip_hex(r, -1)),
    "key: the voter": _set("voter", _flip_hex),
    "payload: sequence": _receipt_field("sequence"),
    "payload: command hash": _receipt_field("command_hash"),
    "payload: result hash": _receipt_field("result_hash"),
    "payload: instance": _receipt_field("instance_id"),
    "vote: commitment": _set("commitment", _flip_hex),
    "vote: salt": _set("salt", _flip_hex),
    "vote: option": _set("option", lambda o: 1 - o),
    "not a receipt": _set("receipt", lambda r: "zz"),
}
#: A genuine, enclave-signed receipt of another vote in place of this one's.
SWAPPED = "another vote's genuine receipt"


def test_each_altered_byte_class_is_refused(veil: Veil, tmp_path: Path) -> None:
    veil.identities("clerk", "v1", "v2", "v3")
    veil.ok("instance", "create", "polls", "--app", "ballot")
    voters = [a for v in ("v1", "v2", "v3") for a in ("--voter", v)]
    veil.ok(
        "ballot",
        "create",
        "polls",
        "b",
        "--question",
        "q",
        "--option",
        "yes",
        "--option",
        "no",
        *voters,
        "--as",
        "clerk",
    )
    saved = {}
    for voter in ("v1", "v2", "v3"):
        saved[voter] = veil.json("ballot", "vote", "polls", "b", "yes", "--as", voter)["saved"]
    veil.ok("ballot", "close", "polls", "b", "--as", "clerk")
    genuine = json.loads(Path(saved["v1"]).read_text())
    assert (
        veil.json("ballot", "verify-receipt", "polls", "b", "--as", "v1")["vote_receipt_signature"] == "valid"
    )
    other = json.loads(Path(saved["v2"]).read_text())["receipt"]
    cases = {**ALTERATIONS, SWAPPED: _set("receipt", lambda _: other)}
    for name, alter in cases.items():
        document = json.loads(json.dumps(genuine))
        alter(document)
        path = tmp_path / f"{name.replace(' ', '_').replace(':', '')}.json"
        path.write_text(json.dumps(document))
        status, out, err = veil(
            "ballot", "verify-receipt", "polls", "b", "--receipt", str(path), "--as", "v1"
        )
        assert status == 1, f"{name}: accepted\n{out}"
        assert out == "", name
        assert len(err.strip().splitlines()) == 1, name
        assert "valid" not in err.replace("could NOT be verified", ""), name
        assert "earlier enclave key" not in err or "NOT" in err, name
