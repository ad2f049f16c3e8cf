"""Length-prefixed framing of ECALL messages over a byte stream (pipe or socket).

Each frame is a 4-byte big-endian length followed by that many bytes. A clean end of stream
between frames ends the conversation; anything else is a FramingError.
"""

from __future__ import annotations

from typing import IO

MAX_FRAME_SIZE = 256 * 1024 * 1024
_CHUNK = 1024 * 1024


class FramingError(Exception):
    """The stream broke mid-frame."""


class FrameTooLarge(FramingError):
    """A frame longer than the limit; its bytes were discarded, so the stream is still usable."""


def write_frame(stream: IO[bytes], payload: bytes) -> None:
    """Write one frame and flush."""
    if len(payload) > MAX_FRAME_SIZE:
        raise FrameTooLarge(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_SIZE}")
    stream.write(len(payload).to_bytes(4, "big") + payload)
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    chunks = []
    while size:
        chunk = stream.read(min(size, _CHUNK))
        if not chunk:
            raise FramingError("stream ended mid-frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: IO[bytes], max_size: int = MAX_FRAME_SIZE) -> bytes | None:
    """Read one frame; None at a clean end of stream."""
    first = stream.read(4)
    if not first:
        return None
    header = first + (_read_exact(stream, 4 - len(first)) if len(first) < 4 else b"")
    length = int.from_bytes(header, "big")
    if length > max_size:
        while length:  # skip the oversized payload so the next frame can still be read
            length -= len(_read_exact(stream, min(length, _CHUNK)))
        raise FrameTooLarge(f"frame exceeds {max_size} bytes")
    return _read_exact(stream, length)
