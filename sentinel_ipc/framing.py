"""Sans-I/O length-prefix framing.

Theory of operation
-------------------
A frame is a 4-byte big-endian unsigned length followed by that many bytes of
payload (MessagePack, see :mod:`sentinel_ipc.codec`). :class:`FrameDecoder` is
fed whatever bytes arrived (``receive_data``) and hands back complete payloads
(``next_frame``), or :data:`NEED_DATA` when the next frame is not complete yet.

The decoder has three states::

    HEADER  --4 bytes, length <= max-->  BODY  --length bytes-->  HEADER
    HEADER  --length > max----------->  ERROR  (FrameTooLargeError, sticky)
    any     --receive_data(b"")------>  EOF    (a partial frame => BadFrameError)

An oversized length is refused as soon as the header is complete, before any
of the body is buffered, so a hostile peer cannot make us allocate. The decoder
never does I/O and never sleeps; the trio server and the client wrap it.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from .errors import BadFrameError, FrameTooLargeError, LocalProtocolError

HEADER = struct.Struct(">I")
HEADER_SIZE: Final = HEADER.size
MAX_FRAME_LIMIT: Final = 0xFFFFFFFF


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Sentinel.NEED_DATA
"""Returned by :meth:`FrameDecoder.next_frame` when more bytes are needed."""


def encode_frame(payload: bytes, max_frame_bytes: int = MAX_FRAME_LIMIT) -> bytes:
    """Prefix ``payload`` with its length.

    Raises :class:`LocalProtocolError` if the payload exceeds ``max_frame_bytes``:
    sending it would only make the peer hang up.
    """
    if len(payload) > max_frame_bytes:
        raise LocalProtocolError(
            f"refusing to send a {len(payload)}-byte frame: the limit is {max_frame_bytes}"
        )
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental decoder of length-prefixed frames with a size limit."""

    __slots__ = ("_buffer", "_eof", "_error", "_expected", "max_frame_bytes")

    def __init__(self, max_frame_bytes: int) -> None:
        if not 0 < max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_FRAME_LIMIT}")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._expected: int | None = None  # body length once the header is read
        self._error: FrameTooLargeError | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer)

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived but not all of it (slowloris timer)."""
        return bool(self._buffer) or self._expected is not None

    @property
    def eof(self) -> bool:
        return self._eof

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; ``b""`` means the peer closed."""
        if self._eof:
            raise LocalProtocolError("receive_data() after end of stream")
        if not data:
            self._eof = True
            return
        self._buffer += data

    def next_frame(self) -> bytes | _Sentinel:
        """The next complete payload, or :data:`NEED_DATA`.

        Raises :class:`FrameTooLargeError` (sticky) when a header announces more
        than ``max_frame_bytes``, and :class:`BadFrameError` when the stream
        ended inside a frame.
        """
        if self._error is not None:
            raise self._error
        if self._expected is None:
            if len(self._buffer) < HEADER_SIZE:
                return self._need_data()
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame_bytes:
                self._error = FrameTooLargeError(
                    f"frame of {length} bytes exceeds the limit of {self.max_frame_bytes} bytes"
                )
                self._buffer.clear()
                raise self._error
            del self._buffer[:HEADER_SIZE]
            self._expected = length
        if len(self._buffer) < self._expected:
            return self._need_data()
        end = self._expected
        if end == len(self._buffer):
            payload = bytes(self._buffer)
            self._buffer.clear()
        else:
            payload = bytes(self._buffer[:end])
            del self._buffer[:end]
        self._expected = None
        return payload

    def _need_data(self) -> _Sentinel:
        if self._eof and self.in_frame:
            raise BadFrameError(
                f"connection closed inside a frame ({len(self._buffer)} bytes buffered)"
            )
        return NEED_DATA

    def wanted(self) -> int:
        """How many more bytes complete the current frame (a read-size hint)."""
        if self._expected is None:
            return max(HEADER_SIZE - len(self._buffer), 1)
        return max(self._expected - len(self._buffer), 1)
