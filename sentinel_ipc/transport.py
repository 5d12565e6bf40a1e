"""A framed connection to the daemon, for clients: the lowest client layer.

:class:`FramedConnection` sends messages (optionally with descriptors in the
same ``sendmsg``, for ``scan_fd``) and receives decoded replies. It knows
nothing of ids, retries or reconnects: the client library builds those on it,
and the tests use it directly to speak the raw protocol.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import trio

from .codec import encode_framed, next_reply
from .errors import TransportError
from .framing import FrameDecoder
from .messages import DEFAULT_MAX_FRAME_BYTES, Reply

_RECV = 256 * 1024


class FramedConnection:
    def __init__(self, sock: trio.socket.SocketType, max_frame_bytes: int) -> None:
        self.sock = sock
        self._decoder = FrameDecoder(max_frame_bytes)
        self._send_lock = trio.Lock()

    async def send(self, message: msgspec.Struct, fds: Sequence[int] = ()) -> None:
        await self.send_raw(encode_framed(message), fds)

    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes as they are (tests use this for malformed frames).

        A daemon that refuses a connection (over ``max_connections``, draining,
        another user) writes an ``error`` with id 0 and closes at once, so a
        send that comes after gets EPIPE. When the daemon said something before
        it hung up, that send does not raise: the next :meth:`receive` returns
        what it said (the refusal), then reports the close, as if the race had
        gone the other way.
        """
        async with self._send_lock:
            view = memoryview(data)
            try:
                if fds:
                    sent = await self.sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array(fds)))]
                    )
                    view = view[sent:]
                while view:
                    sent = await self.sock.send(view)
                    view = view[sent:]
            except OSError as exc:
                read_nowait(self.sock.fileno(), self._decoder)
                if self._decoder.buffered:
                    return  # the daemon's last words say more than EPIPE
                raise TransportError(f"send failed: {exc.strerror or exc}") from exc

    async def receive(self) -> Reply:
        """The next reply; :class:`TransportError` if the daemon hung up."""
        while True:
            reply = next_reply(self._decoder)
            if reply is not None:
                return reply
            try:
                data = await self.sock.recv(_RECV)
            except OSError as exc:
                raise TransportError(f"receive failed: {exc.strerror or exc}") from exc
            if not data:
                if self._decoder.in_frame:
                    raise TransportError("the daemon closed the connection inside a reply")
                raise TransportError("the daemon closed the connection")
            self._decoder.receive_data(data)

    def close(self) -> None:
        self.sock.close()


def read_nowait(fd: int, decoder: FrameDecoder) -> None:
    """Feed ``decoder`` what has already arrived on the non-blocking socket
    ``fd``, up to EOF or an error, without waiting.

    For a send that failed because the daemon hung up: its last words (a
    refusal, an ``error`` with id 0) may be waiting unread, and they say more
    than EPIPE does.
    """
    with contextlib.suppress(OSError):
        while data := os.read(fd, _RECV):
            decoder.receive_data(data)


def _fd_array(fds: Sequence[int]) -> bytes:
    return array.array("i", fds).tobytes()


async def connect_unix(path: str | Path) -> trio.socket.SocketType:
    """Connect to ``path``; maps OS errors to :class:`TransportError`."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
    except OSError as exc:
        sock.close()
        kind = errno.errorcode.get(exc.errno or 0, "error")
        raise TransportError(
            f"cannot connect to {path}: {kind} {exc.strerror or ''}".strip()
        ) from exc
    return sock


@contextlib.asynccontextmanager
async def open_framed_connection(
    path: str | Path, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
) -> AsyncIterator[FramedConnection]:
    conn = FramedConnection(await connect_unix(path), max_frame_bytes)
    try:
        yield conn
    finally:
        conn.close()
