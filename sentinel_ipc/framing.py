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

Large frames (``direct_threshold``)
-----------------------------------
Accumulating a many-megabyte body in one growing buffer copies it several
times (every reallocation, then the final ``bytes()``). A frame whose length
is at least ``direct_threshold`` gets a body buffer of its own, of exactly
that length, returned by :meth:`FrameDecoder.next_frame` as it is. The I/O
layer may receive straight into it (:meth:`~FrameDecoder.body_view` and
:meth:`~FrameDecoder.body_received`); :meth:`~FrameDecoder.receive_data`
still works and copies into it.

With ``hold_large=True`` the decoder does not allocate that buffer on its own:
:attr:`~FrameDecoder.body_needed` names the length, and the caller allocates
(:meth:`~FrameDecoder.allocate_body`) once it has reserved the memory. The
server uses this to bound the bytes all connections may hold in partial
frames: the length in a header alone never allocates anything.
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

    __slots__ = (
        "_body",
        "_buffer",
        "_eof",
        "_error",
        "_expected",
        "_filled",
        "direct_threshold",
        "hold_large",
        "max_frame_bytes",
    )

    def __init__(
        self,
        max_frame_bytes: int,
        *,
        direct_threshold: int | None = None,
        hold_large: bool = False,
    ) -> None:
        if not 0 < max_frame_bytes <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_bytes must be in 1..{MAX_FRAME_LIMIT}")
        if direct_threshold is not None and direct_threshold < 1:
            raise ValueError("direct_threshold must be positive")
        self.max_frame_bytes = max_frame_bytes
        #: Frames at least this long get a body buffer of their own (None: never).
        self.direct_threshold = direct_threshold
        #: Wait for allocate_body() before buffering such a body.
        self.hold_large = hold_large
        self._buffer = bytearray()
        self._expected: int | None = None  # body length once the header is read
        self._body: bytearray | None = None  # the current large frame's own buffer
        self._filled = 0  # bytes of _body received
        self._error: FrameTooLargeError | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) + self._filled

    @property
    def in_frame(self) -> bool:
        """True when part of a frame has arrived but not all of it (slowloris timer)."""
        return bool(self._buffer) or self._expected is not None

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def body_needed(self) -> int | None:
        """With ``hold_large``: the length of the current large frame while its
        body buffer waits for :meth:`allocate_body`; else None."""
        length = self._expected  # None between frames: the common case, checked first
        if length is not None and self._body is None and self.hold_large and self._is_large(length):
            return length
        return None

    def allocate_body(self) -> None:
        """Give the current large frame its body buffer (moving in what is buffered)."""
        length = self._expected
        if length is None or self._body is not None or not self._is_large(length):
            raise LocalProtocolError("allocate_body() without a large frame waiting for it")
        self._body = bytearray(length)
        taken = min(len(self._buffer), length)
        self._body[:taken] = memoryview(self._buffer)[:taken]
        del self._buffer[:taken]
        self._filled = taken

    def body_view(self) -> memoryview | None:
        """Where the rest of the current large frame's body may be received
        directly (``recv_into``), or None when there is no such place now."""
        body = self._body
        if body is None or self._buffer or self._filled >= len(body):
            return None
        return memoryview(body)[self._filled :]

    def body_received(self, count: int) -> None:
        """``count`` bytes were written at the start of :meth:`body_view`."""
        body = self._body
        if body is None or not 0 < count <= len(body) - self._filled or self._buffer:
            raise LocalProtocolError(f"body_received({count}) does not fit the frame")
        self._filled += count

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the transport; ``b""`` means the peer closed."""
        if self._eof:
            raise LocalProtocolError("receive_data() after end of stream")
        if not data:
            self._eof = True
            return
        body = self._body
        if body is not None and not self._buffer:
            view = memoryview(data)
            taken = min(len(view), len(body) - self._filled)
            body[self._filled : self._filled + taken] = view[:taken]
            self._filled += taken
            if taken < len(view):
                self._buffer += view[taken:]
            return
        self._buffer += data

    def next_frame(self) -> bytes | bytearray | _Sentinel:
        """The next complete payload, or :data:`NEED_DATA`.

        A large frame (see ``direct_threshold``) comes back as its own
        ``bytearray``, not copied. Raises :class:`FrameTooLargeError` (sticky)
        when a header announces more than ``max_frame_bytes``, and
        :class:`BadFrameError` when the stream ended inside a frame.
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
            if self._is_large(length) and not self.hold_large:
                self.allocate_body()
        body = self._body
        if body is not None:
            if self._filled < len(body):
                return self._need_data()
            self._body, self._filled, self._expected = None, 0, None
            return body
        if len(self._buffer) < self._expected or self.body_needed is not None:
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

    def _is_large(self, length: int | None) -> bool:
        threshold = self.direct_threshold
        return length is not None and threshold is not None and length >= threshold

    def _need_data(self) -> _Sentinel:
        if self._eof and self.in_frame:
            raise BadFrameError(
                f"connection closed inside a frame ({self.buffered} bytes buffered)"
            )
        return NEED_DATA

    def wanted(self) -> int:
        """How many more bytes complete the current frame (a read-size hint)."""
        if self._expected is None:
            return max(HEADER_SIZE - len(self._buffer), 1)
        return max(self._expected - self.buffered, 1)
