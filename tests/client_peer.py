"""A scripted protocol peer for the client tests.

The real daemon is used wherever it can commit the fault (kill -9, SIGSTOP,
restart, socket removed). Some faults it cannot be told to commit on cue:
answer in reverse order, hang up in the middle of a reply or after the third
chunk of a stream, push events. This peer speaks the real wire protocol
(the same framing and codec) over a real Unix socket, and each test scripts
what it does per connection.
"""

from __future__ import annotations

import array
import contextlib
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import trio

from sentinel_ipc.codec import decode_request, encode_framed
from sentinel_ipc.framing import NEED_DATA, FrameDecoder
from sentinel_ipc.messages import PROTOCOL_VERSION, Hello, Limits, Welcome


class PeerConn:
    """Server side of one connection: receive requests (with fds), send replies."""

    def __init__(self, sock: trio.socket.SocketType, number: int) -> None:
        self.sock = sock
        self.number = number  # 1 for the first connection the peer accepted
        self._decoder = FrameDecoder(64 * 1024 * 1024)
        self.received: list[msgspec.Struct] = []

    async def recv(self) -> tuple[msgspec.Struct | None, list[int]]:
        """The next request and the fds that came with it; (None, []) at EOF."""
        fds: list[int] = []
        while True:
            frame = self._decoder.next_frame()
            if frame is not NEED_DATA:
                assert isinstance(frame, bytes)
                request = decode_request(frame)
                self.received.append(request)
                return request, fds
            data, ancdata, _flags, _addr = await self.sock.recvmsg(
                1 << 20, socket.CMSG_SPACE(16 * 4)
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                    fds.extend(arr)
            if not data:
                return None, fds
            self._decoder.receive_data(data)

    async def send(self, message: msgspec.Struct) -> None:
        await self.send_raw(encode_framed(message))

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    async def greet(self, max_frame_bytes: int = 64 * 1024 * 1024) -> Hello:
        """Answer the client's hello with a welcome."""
        hello, _ = await self.recv()
        assert isinstance(hello, Hello), hello
        await self.send(
            Welcome(
                id=hello.id,
                server="scripted-peer",
                protocol_version=PROTOCOL_VERSION,
                max_frame_bytes=max_frame_bytes,
                limits=Limits(max_frame_bytes=max_frame_bytes),
            )
        )
        return hello

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


Script = Callable[[PeerConn], Awaitable[None]]


class ScriptedPeer:
    """Listens on ``path``; runs ``script(conn)`` for every accepted connection."""

    def __init__(self, path: Path, script: Script) -> None:
        self.path = path
        self.script = script
        self.connections: list[PeerConn] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        await listener.bind(str(self.path))
        listener.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    sock, _ = await listener.accept()
                    conn = PeerConn(sock, len(self.connections) + 1)
                    self.connections.append(conn)
                    nursery.start_soon(self._run, conn)
        finally:
            listener.close()

    async def _run(self, conn: PeerConn) -> None:
        try:
            await self.script(conn)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            conn.close()


async def start_peer(nursery: trio.Nursery, path: Path, script: Script) -> ScriptedPeer:
    peer = ScriptedPeer(path, script)
    await nursery.start(peer.serve)
    return peer
