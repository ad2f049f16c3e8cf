"""Input generators shared by the hypothesis tests and the fuzz runner.

Everything takes a `random.Random`: under hypothesis it is `st.randoms()` (derandomized,
shrinkable), in `python -m tests.attack.fuzz` a seeded `random.Random`. So a failure found by
the long fuzz run is reproduced by the same code the tests run.

* byte mutators: bit flips, byte sets, truncation, extension, insertion, deletion, splices
  with donor inputs (e.g. other real quotes), and "interesting" integers written over length
  fields;
* `random_message`: any protobuf message, field by field from its descriptor, with hostile
  values (boundary integers, unknown enum numbers, deep JSON, non-ASCII, huge strings);
* `mutate_message`: a valid message with one field replaced, cleared or byte-mutated.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

Mutator = Callable[[random.Random, bytes, Sequence[bytes]], bytes]

#: Integers that break length and counter arithmetic.
INTERESTING_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)

#: Strings that have crashed parsers before: deep JSON (recursion), non-ASCII where ASCII is
#: expected, NUL, path tricks, names of real things, JWT-shaped garbage, sizes at the limits.
HOSTILE_STRINGS: tuple[str, ...] = (
    "",
    "a",
    "v",
    "t",
    "b",
    "tokens",
    "instance.v",
    "v\n",
    "instance.v\n",
    "spiffe://veil/admin",
    "\x00",
    "\u00e9",
    "\U0001f600",
    "../../etc/passwd",
    "-",
    "A" * 64,
    "a" * 65,
    "a" * 129,
    "x" * 300,
    "x" * 20_000,
    "[" * 5_000,
    '{"a":' * 3_000,
    "null",
    "1e400",
    "NaN",
    '{"keys":[]}',
    '{"version":"1.0.0","anyOf":[]}',
    "eyJhbGciOiJub25lIn0.e30.",
    "eyJhbGciOiJFUzI1NiJ9.\u00e9.AA",
    "eyJhbGciOiJFUzI1NiIsImtpZCI6IngifQ.e30.AA",
    "a.b.c.d",
    "....",
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


_ES256_HEADER = _b64(b'{"alg":"ES256"}')
#: JWT-shaped strings aimed at the parsers behind OAuth2 proofs and attestation tokens. The
#: first two escaped the enclave's JWT verifier (RecursionError, UnicodeEncodeError) and turned
#: one client's command into INTERNAL for its whole batch; fixed in enclave/jwt.py.
HOSTILE_TOKENS: dict[str, str] = {
    "deeply nested header": _b64(b"[" * 11_000) + ".e30.AA",
    "non-ASCII claims segment": _ES256_HEADER + ".\u00e9\u00e9.AA",
    "deeply nested object header": _b64(b'{"a":' * 2_000) + ".e30.AA",
    "deeply nested claims": _ES256_HEADER + "." + _b64(b"[" * 11_000) + ".AA",
    "non-ASCII signature segment": _ES256_HEADER + ".e30.\u00e9",
    "newline in a segment": _ES256_HEADER + "\n.e30.AA",
    "huge integer in the header": _b64(b'{"alg":' + b"9" * 5000 + b"}") + ".e30.AA",
    "alg none": _b64(b'{"alg":"none"}') + "." + _b64(b'{"sub":"admin"}') + ".",
    "alg HS256": _b64(b'{"alg":"HS256"}') + "." + _b64(b'{"sub":"admin"}') + ".AAAA",
    "header not an object": _b64(b'"ES256"') + ".e30.AA",
    "duplicate alg": _b64(b'{"alg":"ES256","alg":"none"}') + ".e30.AA",
    "NaN expiry": _ES256_HEADER + "." + _b64(b'{"exp":NaN}') + ".AA",
}

_INT_BOUNDS: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


# --- bytes -------------------------------------------------------------------------------------


def _offset(rng: random.Random, data: bytes) -> int:
    return rng.randrange(len(data)) if data else 0


def flip_bit(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """One bit flipped."""
    if not data:
        return b"\x01"
    i = _offset(rng, data)
    return data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :]


def set_byte(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """One byte replaced by a boundary or random value."""
    if not data:
        return bytes([rng.randrange(256)])
    i = _offset(rng, data)
    value = rng.choice((0x00, 0x01, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    return data[:i] + bytes([value]) + data[i + 1 :]


def truncate(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """A prefix (possibly empty)."""
    return data[: rng.randrange(len(data) + 1)]


def extend(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """Trailing bytes: random, zeros, or the input again."""
    tail = rng.choice((rng.randbytes(rng.randrange(1, 65)), bytes(rng.randrange(1, 9)), data))
    return data + tail


def insert(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """Random bytes inserted somewhere."""
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.randrange(1, 17)) + data[i:]


def delete(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """A range removed."""
    if not data:
        return data
    start = _offset(rng, data)
    return data[:start] + data[start + rng.randrange(1, 65) :]


def splice(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """A range replaced by a range of a donor (another valid input) at the same or another offset."""
    donor = rng.choice(donors) if donors else data
    if not donor:
        return data
    start = rng.randrange(len(data) + 1)
    length = rng.randrange(1, 257)
    source = start if rng.random() < 0.5 and start < len(donor) else rng.randrange(len(donor))
    return data[:start] + donor[source : source + length] + data[start + length :]


def cross_over(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """A prefix of the input followed by the suffix of a donor."""
    donor = rng.choice(donors) if donors else data
    return data[: rng.randrange(len(data) + 1)] + donor[rng.randrange(len(donor) + 1) :]


def overwrite_int(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """An interesting integer written over 1, 2, 4 or 8 bytes (little or big endian): hits lengths."""
    width = rng.choice((1, 2, 4, 8))
    limit = 2 ** (8 * width)
    value: int = rng.choice((*INTERESTING_INTS, len(data), len(data) + 1, limit - 1)) % limit
    raw = value.to_bytes(width, rng.choice(("little", "big")))
    i = rng.randrange(len(data) + 1)
    return data[:i] + raw + data[i + width :]


def duplicate(rng: random.Random, data: bytes, donors: Sequence[bytes]) -> bytes:
    """A range repeated in place (duplicated protobuf fields, repeated chunks)."""
    if not data:
        return data
    start = _offset(rng, data)
    chunk = data[start : start + rng.randrange(1, 129)]
    return data[:start] + chunk * rng.randrange(2, 4) + data[start + len(chunk) :]


MUTATORS: tuple[Mutator, ...] = (
    flip_bit,
    set_byte,
    truncate,
    extend,
    insert,
    delete,
    splice,
    cross_over,
    overwrite_int,
    duplicate,
)


def mutate(rng: random.Random, data: bytes, donors: Sequence[bytes] = (), rounds: int = 0) -> bytes:
    """Apply `rounds` (default 1 to 3) random mutators; never returns the input unchanged."""
    for _ in range(rounds or rng.randrange(1, 4)):
        data = rng.choice(MUTATORS)(rng, data, donors)
    return data


def big_bytes(rng: random.Random, size: int) -> bytes:
    """`size` bytes from a short random pattern (cheap for hypothesis to draw, huge on the wire)."""
    pattern = rng.randbytes(32)
    return (pattern * (size // 32 + 1))[:size]


def random_bytes(rng: random.Random, max_size: int = 2048) -> bytes:
    """Random bytes of a random (mostly small) length."""
    size = rng.choice((0, 1, rng.randrange(64), rng.randrange(max_size + 1)))
    return rng.randbytes(size)


# --- protobuf ----------------------------------------------------------------------------------


def random_string(rng: random.Random) -> str:
    """A hostile or random string."""
    if rng.random() < 0.6:
        return rng.choice(HOSTILE_STRINGS)
    alphabet = rng.choice(
        ("abcdefghijklmnopqrstuvwxyz0123456789-.", "\u00e9\u4e2d\U0001f600 \t\n/", "AZ_09:")
    )
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 80)))


def _random_int(rng: random.Random, field_type: int) -> int:
    low, high = _INT_BOUNDS[field_type]
    candidates = [value for value in (*INTERESTING_INTS, -1, low, high) if low <= value <= high]
    return rng.choice(candidates) if rng.random() < 0.7 else rng.randint(low, high)


# Descriptors are typed Any below: protobuf's stubs name two classes (Python and upb) for each.


def _random_scalar(rng: random.Random, field: Any) -> object:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return random_string(rng)
    if kind == FieldDescriptor.TYPE_BYTES:
        return random_bytes(rng) if rng.random() < 0.9 else big_bytes(rng, rng.choice((32, 64, 65_536)))
    if kind == FieldDescriptor.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FieldDescriptor.TYPE_ENUM:
        numbers = [value.number for value in field.enum_type.values]
        # proto3 enums are open: an unknown number must be refused like any other bad value.
        return rng.choice((*numbers, max(numbers) + 1, 2**31 - 1, -1))
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan")))
    return _random_int(rng, kind)


def _fill(rng: random.Random, message: Message, depth: int) -> None:
    for field in message.DESCRIPTOR.fields:
        if rng.random() < 0.4:
            continue  # absent: proto3 defaults are the commonest bad input
        repeated = field.is_repeated
        count = rng.choice((1, 1, 2, 3, 17)) if repeated else 1
        for _ in range(count):
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 4:
                    break
                child = getattr(message, field.name).add() if repeated else getattr(message, field.name)
                child.SetInParent()
                _fill(rng, child, depth + 1)
            elif repeated:
                getattr(message, field.name).append(_random_scalar(rng, field))
            else:
                setattr(message, field.name, _random_scalar(rng, field))


def message_class(descriptor: Any) -> type[Message]:
    """The generated class of a message descriptor."""
    return message_factory.GetMessageClass(descriptor)


def random_message(rng: random.Random, descriptor: Any) -> Message:
    """A random instance of the message type `descriptor`."""
    message = message_class(descriptor)()
    _fill(rng, message, 0)
    return message


def mutate_message(rng: random.Random, message: Message) -> Message:
    """A copy of `message` with one field cleared, replaced by a random value, or byte-mutated."""
    mutated = type(message)()
    mutated.CopyFrom(message)
    target: Any = mutated
    # Walk into a random set sub-message now and then, so nested fields get mutated too.
    while rng.random() < 0.5:
        children = [
            value
            for field, value in target.ListFields()
            if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated
        ]
        if not children:
            break
        target = rng.choice(children)
    fields: list[Any] = list(target.DESCRIPTOR.fields)
    if not fields:
        return mutated  # nothing to change (e.g. GetStatusRequest): byte mutation covers it
    field = rng.choice(fields)
    choice = rng.randrange(3)
    if choice == 0 or field.type == FieldDescriptor.TYPE_MESSAGE:
        target.ClearField(field.name)
        if choice != 0:
            scratch = message_class(target.DESCRIPTOR)()
            _fill(rng, scratch, 2)
            getattr(target, field.name).MergeFrom(getattr(scratch, field.name))
    elif field.is_repeated:
        getattr(target, field.name).append(_random_scalar(rng, field))
    elif field.type == FieldDescriptor.TYPE_BYTES and rng.random() < 0.7:
        setattr(target, field.name, mutate(rng, getattr(target, field.name)))
    else:
        setattr(target, field.name, _random_scalar(rng, field))
    return mutated


def decodes_as(data: bytes, message_type: type[Message]) -> bool:
    """Whether `data` parses as `message_type` (what the server's deserializer will do)."""
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True
