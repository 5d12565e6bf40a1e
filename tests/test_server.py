"""The server's behaviour (issue 2, point 5) against a real ``sentineld`` subprocess.

Most tests speak the raw protocol over a blocking Unix socket (``Raw``), so the
bytes on the wire are exactly what the test wrote. Two behaviours need a
request that stays in flight, which no built-in handler offers on demand: they
run the real :class:`~sentinel_ipc.server.server.Server` in-process on a real
socket with one slow handler, and call the drain SIGTERM triggers.

Reaching the daemon as another user: the socket is 0600 in a 0700 directory
(that *is* the access control), so the ``nobody`` tests start the daemon with
``server.socket_mode = 0o666`` in a world-traversable base directory and
chmod the socket directory to 0755 after start-up (the daemon narrows it to
0700 when it starts).
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import trio
import trio.testing
from daemon_harness import ping_once, traversable_dir

from sentinel_ipc import schema
from sentinel_ipc.client.link import Link
from sentinel_ipc.codec import decode_reply, encode_framed
from sentinel_ipc.config import ServerConfig
from sentinel_ipc.errors import BusyError, ErrorCode, TransportError
from sentinel_ipc.framing import NEED_DATA, FrameDecoder
from sentinel_ipc.handlers import core
from sentinel_ipc.messages import (
    ADMIN_REQUESTS,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    Ack,
    Error,
    Health,
    HealthReport,
    Hello,
    Limits,
    Metrics,
    MetricsReport,
    Ping,
    Pong,
    Reply,
    Scan,
    ScanFd,
    ScanResult,
    Shutdown,
    Welcome,
    type_tag,
)
from sentinel_ipc.server.dispatch import Dispatcher, RequestContext
from sentinel_ipc.server.listener import open_unix_listener, prepare_socket_dir
from sentinel_ipc.server.server import Server
from sentinel_ipc.transport import FramedConnection, connect_unix, open_framed_connection

NOBODY = 65534


class Raw:
    """A blocking client that writes exact bytes and reads decoded replies."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder(64 * 1024 * 1024)

    def send(self, *items: msgspec.Struct | bytes) -> None:
        self.sock.sendall(b"".join(i if isinstance(i, bytes) else encode_framed(i) for i in items))

    def recv(self) -> Reply | None:
        """The next reply, or None when the server closed the connection."""
        while (frame := self.decoder.next_frame()) is NEED_DATA:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:  # closed with our bytes unread
                data = b""
            if not data:
                return None
            self.decoder.receive_data(data)
        assert isinstance(frame, bytes)
        return decode_reply(frame)

    def call(self, message: msgspec.Struct) -> Reply | None:
        self.send(message)
        return self.recv()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def assert_usable(path: Path, request_id: int = 900) -> None:
    with Raw(path) as c:
        assert c.call(Ping(id=request_id)) == Pong(id=request_id)


def run_sentineld(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel_ipc.cli.sentineld", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- the socket ---------------------------------------------------------------------


def test_socket_directory_is_0700_and_socket_0600(daemon_factory: Any) -> None:
    d = daemon_factory(start=False)
    d.socket_path.parent.mkdir(mode=0o755)
    os.chmod(d.socket_path.parent, 0o755)  # a pre-existing, too-wide directory
    d.start()
    assert stat.S_IMODE(d.socket_path.parent.stat().st_mode) == 0o700
    st = d.socket_path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()


def test_refuses_to_start_while_a_daemon_serves_the_socket(daemon_factory: Any) -> None:
    first = daemon_factory()
    second = daemon_factory(start=False)
    second.config_path.write_text("")
    command = second.command()
    command[command.index("--socket") + 1] = str(first.socket_path)
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "already running" in result.stderr and str(first.socket_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert ping_once(first.socket_path)  # the first daemon is untouched
    assert first.stop() == 0


def test_refuses_to_start_when_another_process_answers_on_the_path(tmp_path: Path) -> None:
    """No lock held, but something accepts connections there: not stale, keep it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    path = run_dir / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as squatter:
        squatter.bind(str(path))
        squatter.listen(8)
        result = run_sentineld("--socket", str(path), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 1
    assert "already answering" in result.stderr
    assert path.exists()  # someone else's socket is not removed


def test_a_stale_socket_left_by_sigkill_is_replaced(daemon_factory: Any) -> None:
    d = daemon_factory()
    d.kill()
    assert d.socket_path.exists()  # stale: nobody answers
    assert not ping_once(d.socket_path)
    d.start()
    assert ping_once(d.socket_path)
    assert d.stop() == 0
    assert not d.socket_path.exists()


# --- pipelining and hello ---------------------------------------------------------------


async def test_200_pipelined_pings_are_all_answered_by_id(daemon_factory: Any) -> None:
    d = daemon_factory()
    ids = list(range(1000, 1200))
    async with open_framed_connection(d.socket_path) as conn:
        await conn.send_raw(b"".join(encode_framed(Ping(id=i)) for i in ids))
        replies = [await conn.receive() for _ in ids]
    assert all(isinstance(r, Pong) for r in replies)
    assert sorted(r.id for r in replies) == ids


def test_replies_larger_than_the_socket_buffer_arrive_whole_and_in_order(
    daemon_factory: Any,
) -> None:
    """A peer that pipelines far more than it reads: replies fill the socket
    buffer, so the daemon's one-shot non-blocking write takes part of a batch
    and the rest goes through the locked send_all, while handler tasks (health)
    write too. Every frame must arrive whole, and the inline pings in order."""
    d = daemon_factory()
    n = 60_000  # ~700 KB of pongs: several times a Unix socket's buffer
    health_every = 3_000
    with Raw(d.socket_path, timeout=30.0) as c:
        requests: list[msgspec.Struct] = []
        for i in range(1, n + 1):
            requests.append(Ping(id=i))
            if i % health_every == 0:
                requests.append(Health(id=-i, probe="live"))
        payload = b"".join(encode_framed(r) for r in requests)
        sender = threading.Thread(target=c.sock.sendall, args=(payload,))
        sender.start()
        time.sleep(0.5)  # read nothing yet: the daemon's writes back up
        replies = [c.recv() for _ in requests]
        sender.join(10)
    pongs = [r.id for r in replies if isinstance(r, Pong)]
    assert pongs == list(range(1, n + 1))
    others = [r for r in replies if not isinstance(r, Pong)]
    assert len(others) == n // health_every
    assert all(isinstance(r, (HealthReport, Error)) and r.id < 0 for r in others)


async def test_pipelined_requests_from_concurrent_connections(daemon_factory: Any) -> None:
    d = daemon_factory()
    results: dict[int, list[int]] = {}

    async def client(n: int) -> None:
        async with open_framed_connection(d.socket_path) as conn:
            for i in range(50):
                await conn.send(Ping(id=n * 1000 + i))
            results[n] = sorted([(await conn.receive()).id for _ in range(50)])

    async with trio.open_nursery() as nursery:
        for n in range(1, 9):
            nursery.start_soon(client, n)
    assert results == {n: [n * 1000 + i for i in range(50)] for n in range(1, 9)}


def test_hello_negotiates_and_an_unsupported_version_is_a_typed_error(
    daemon_factory: Any,
) -> None:
    d = daemon_factory(config={"server": {"max_frame_bytes": 1 << 20}})
    with Raw(d.socket_path) as c:
        welcome = c.call(Hello(id=1, client="test", protocol_version=1))
        assert isinstance(welcome, Welcome)
        assert welcome.id == 1 and welcome.protocol_version == 1
        assert welcome.max_frame_bytes == welcome.limits.max_frame_bytes == 1 << 20
        refused = c.call(Hello(id=2, client="test", protocol_version=99))
        assert isinstance(refused, Error)
        assert refused.code == ErrorCode.UNSUPPORTED_VERSION and refused.id == 2
        assert "99" in refused.message and not refused.retryable
        assert c.call(Ping(id=3)) == Pong(id=3)  # still usable


# --- peer credentials --------------------------------------------------------------------

_NOBODY_CLIENT = """
import os, socket, sys
path, frames, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5 if count > 0 else 2)  # count 0: read until 2 s of silence
s.connect(path)
try:
    s.sendall(frames)
except (BrokenPipeError, ConnectionResetError):
    pass  # refused at connect: the error frame may still be readable
buf = b""
def frame_count(b):
    n = 0
    while len(b) >= 4 and len(b) >= 4 + int.from_bytes(b[:4], "big"):
        b = b[4 + int.from_bytes(b[:4], "big"):]; n += 1
    return n
while count <= 0 or frame_count(buf) < count:
    try:
        chunk = s.recv(65536)
    except (ConnectionResetError, TimeoutError):
        break
    if not chunk:
        break
    buf += chunk
print(os.getpid(), os.getuid(), buf.hex())
"""


def _as_nobody(path: Path, messages: list[msgspec.Struct], count: int) -> tuple[int, list[Reply]]:
    """Run a stdlib-only client as uid nobody; return its pid and the replies."""
    frames = b"".join(encode_framed(m) for m in messages)
    result = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", _NOBODY_CLIENT, str(path), frames.hex(), str(count)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.split()
    pid, uid = int(out[0]), int(out[1])
    assert uid == NOBODY
    raw = bytes.fromhex(out[2]) if len(out) > 2 else b""
    decoder = FrameDecoder(1 << 20)
    decoder.receive_data(raw)
    replies = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(frame, bytes)
        replies.append(decode_reply(frame))
    return pid, replies


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A base directory other users can traverse (pytest's tmp_path is 0700)."""
    with traversable_dir("sentinel-peer-", 0o755) as base:
        yield base


def _daemon_for_others(daemon_factory: Any, base: Path, server: dict[str, Any]) -> Any:
    d = daemon_factory(config={"server": {"socket_mode": 0o666, **server}}, start=False)
    d.socket_path = base / "run" / "sentinel.sock"
    d.start()
    os.chmod(d.socket_path.parent, 0o755)
    return d


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as nobody")
def test_peer_credentials_decide_admin_requests(daemon_factory: Any, shared_base: Path) -> None:
    d = _daemon_for_others(daemon_factory, shared_base, {})
    pid, replies = _as_nobody(d.socket_path, [Ping(id=1), Shutdown(id=2)], 2)
    assert replies[0] == Pong(id=1)  # other users may use the daemon...
    refused = replies[1]
    assert isinstance(refused, Error)  # ...but not its admin operations
    assert refused.id == 2 and refused.code == ErrorCode.FORBIDDEN and not refused.retryable
    assert f"uid {NOBODY}" in refused.message
    assert ping_once(d.socket_path)  # the shutdown was not carried out
    log = d.log()
    assert "event=request_refused" in log
    assert f"uid={NOBODY} pid={pid} request=shutdown" in log  # SO_PEERCRED uid and pid
    assert d.stop() == 0


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as nobody")
def test_exactly_the_documented_admin_requests_are_forbidden_to_others(
    daemon_factory: Any, shared_base: Path
) -> None:
    d = _daemon_for_others(daemon_factory, shared_base, {})
    requests = {
        100 + n: msgspec.structs.replace(example, id=100 + n)
        for n, example in enumerate(schema.EXAMPLES)
        if type(example) in REQUEST_TYPES
    }
    _, replies = _as_nobody(d.socket_path, list(requests.values()), 0)
    forbidden = {
        type_tag(type(requests[r.id]))
        for r in replies
        if isinstance(r, Error) and r.code == ErrorCode.FORBIDDEN and r.id in requests
    }
    documented = {type_tag(t) for t in ADMIN_REQUESTS}
    assert forbidden == documented
    assert ping_once(d.socket_path)  # and the shutdown among them was refused


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as nobody")
def test_other_users_are_refused_when_not_allowed(daemon_factory: Any, shared_base: Path) -> None:
    d = _daemon_for_others(daemon_factory, shared_base, {"allow_other_users": False})
    _, replies = _as_nobody(d.socket_path, [Ping(id=1)], 1)
    assert len(replies) == 1
    refused = replies[0]
    assert isinstance(refused, Error)
    assert refused.code == ErrorCode.FORBIDDEN and refused.id == 0
    assert ping_once(d.socket_path)  # the daemon's own user still gets in


# --- bounds ------------------------------------------------------------------------------


def test_over_max_connections_a_peer_gets_busy_then_close(daemon_factory: Any) -> None:
    d = daemon_factory(config={"server": {"max_connections": 5}})
    clients = [Raw(d.socket_path) for _ in range(5)]
    try:
        for n, c in enumerate(clients):
            assert c.call(Ping(id=n + 1)) == Pong(id=n + 1)  # registered by the server
        with Raw(d.socket_path) as sixth:
            refused = sixth.recv()
            assert isinstance(refused, Error)
            assert refused.code == ErrorCode.BUSY and refused.retryable and refused.id == 0
            assert refused.retry_after_ms is not None and refused.retry_after_ms > 0
            assert "limit 5" in refused.message
            assert sixth.recv() is None  # closed
        for n, c in enumerate(clients):  # the five are unaffected
            assert c.call(Ping(id=10 + n)) == Pong(id=10 + n)
        clients.pop().close()
        deadline = time.monotonic() + 5
        while not ping_once(d.socket_path):  # the slot frees once the server notices
            assert time.monotonic() < deadline, "a closed connection never freed its slot"
            time.sleep(0.02)
    finally:
        for c in clients:
            c.close()


def _wait_for_hangup(fd: int) -> None:
    """Block until the daemon has closed its end of ``fd``."""
    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    assert poller.poll(5000), "the daemon never closed the refused connection"


def test_a_refused_peer_that_sends_after_the_close_still_learns_it_is_busy(
    daemon_factory: Any,
) -> None:
    """The daemon writes its refusal and closes at once, so a request sent after
    that meets EPIPE. Both client layers still report the refusal (a retryable
    ``busy`` naming the limit), not a broken pipe; ``tools/load.py`` once lost
    this race in CI and reported "send failed: Broken pipe"."""
    d = daemon_factory(config={"server": {"max_connections": 1}})

    async def refused_twice() -> None:
        sock = await connect_unix(d.socket_path)
        _wait_for_hangup(sock.fileno())
        conn = FramedConnection(sock, 2**20)
        try:
            await conn.send(Ping(id=2))  # EPIPE underneath
            refused = await conn.receive()
            assert isinstance(refused, Error) and refused.id == 0, refused
            assert refused.code == ErrorCode.BUSY and "limit 1" in refused.message
            with pytest.raises(TransportError):  # then the daemon's close
                await conn.receive()
        finally:
            conn.close()

        sock = await connect_unix(d.socket_path)
        _wait_for_hangup(sock.fileno())
        link = Link(sock, 1)
        with pytest.raises(BusyError) as info:
            await link.handshake(Hello(id=3, client="test", protocol_version=PROTOCOL_VERSION))
        assert info.value.retryable and info.value.retry_after, info.value
        assert "limit 1" in info.value.message
        assert link.closed

    deadline = time.monotonic() + 5
    while True:  # the harness's readiness probe may still hold the one slot
        holder = Raw(d.socket_path)
        if holder.call(Ping(id=1)) == Pong(id=1):
            break
        holder.close()
        assert time.monotonic() < deadline, "the one connection slot never freed"
        time.sleep(0.02)
    with holder:
        trio.run(refused_twice)


def test_large_frames_share_one_receive_budget_and_small_ones_never_wait(
    daemon_factory: Any,
) -> None:
    """A header's length is only a claim: memory for a large frame is reserved
    from one budget shared by all connections before its buffer exists. With
    room for one 600 KB frame, a second waits (its sender held back by the
    socket) until the first is complete; pings on a third connection do not."""
    d = daemon_factory(config={"server": {
        "max_frame_bytes": 1 << 20, "max_receive_buffer_bytes": 1 << 20,
        "frame_read_timeout": 20.0,
    }})

    def big(request_id: int) -> bytes:  # a ping padded past the direct-receive size
        payload = msgspec.msgpack.encode({"type": "ping", "id": request_id, "pad": b"x" * 600_000})
        return len(payload).to_bytes(4, "big") + payload

    first, second = big(1), big(2)
    with Raw(d.socket_path) as a, Raw(d.socket_path) as b, Raw(d.socket_path) as c:
        a.send(first[:-1000])  # the daemon reserves for it and waits for the rest
        time.sleep(0.3)
        sender = threading.Thread(target=b.send, args=(second,))  # blocks: not read
        sender.start()
        time.sleep(0.3)
        assert c.call(Ping(id=3)) == Pong(id=3)  # small frames never wait
        reserved, waiting = receive_buffer_gauges(c)
        assert reserved == len(first) - 4 and waiting == 1, (reserved, waiting)
        b.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            b.sock.recv(1)  # no room: the second frame is not being read
        b.sock.settimeout(10)
        a.send(first[-1000:])
        assert a.recv() == Pong(id=1)
        assert b.recv() == Pong(id=2)  # read and answered once the first was done
        sender.join(10)
        assert receive_buffer_gauges(c) == (0, 0)


def receive_buffer_gauges(raw: Raw) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    reply = raw.call(Metrics(id=99))
    assert isinstance(reply, MetricsReport), reply
    values = {
        s.name: s.value
        for f in text_string_to_metric_families(reply.text)
        for s in f.samples
    }
    return (values["sentinel_ipc_receive_buffer_bytes"],
            values["sentinel_ipc_receive_buffer_waiting"])


def test_over_max_in_flight_a_request_gets_busy(daemon_factory: Any) -> None:
    """Two concurrent (non-inline) requests in one write with a limit of 1.

    ``shutdown`` is the only concurrent handler every daemon has; the second
    is refused before it starts, the first is carried out.
    """
    d = daemon_factory(config={"server": {"max_in_flight_per_connection": 1}})
    with Raw(d.socket_path) as c:
        c.send(Shutdown(id=1), Shutdown(id=2))
        replies = {r.id: r for r in (c.recv(), c.recv()) if r is not None}
    busy = replies[2]
    assert isinstance(busy, Error)
    assert busy.code == ErrorCode.BUSY and busy.retryable and busy.retry_after_ms == 50
    assert "limit 1" in busy.message
    assert replies[1].id == 1 and not isinstance(replies[1], Error)
    assert d.proc.wait(20) == 0


def test_a_peer_that_never_reads_its_replies_is_let_go(daemon_factory: Any) -> None:
    """Its requests' slots are freed only by writing their replies: without
    ``write_timeout`` it would hold the server-wide in-flight budget for as long
    as it stayed connected, and every other client would get ``busy``."""
    d = daemon_factory(config={"server": {
        "write_timeout": 1.0, "max_in_flight_total": 64, "max_in_flight_per_connection": 64,
    }})
    hog = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect(str(d.socket_path))
    try:
        # Metrics replies (over 6 KiB each): the socket's buffer takes some 30 of
        # them; the second burst fills the slots those freed.
        hog.sendall(b"".join(encode_framed(Metrics(id=i)) for i in range(1, 65)))
        time.sleep(0.3)
        hog.sendall(b"".join(encode_framed(Metrics(id=i)) for i in range(65, 129)))
        time.sleep(0.2)
        with Raw(d.socket_path) as other:
            first = other.call(Health(id=100))
            assert isinstance(first, Error) and first.code == ErrorCode.BUSY, first
            assert "64 requests in flight" in first.message
            deadline = time.monotonic() + 15
            while True:
                reply = other.call(Health(id=101))
                if not isinstance(reply, Error) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert isinstance(reply, HealthReport), reply
        assert "event=connection_abandoned" in d.log()
        # The hog's connection was closed by the daemon: after the replies that
        # did fit, it reads the end of the stream.
        hog.settimeout(10)
        while hog.recv(65536):
            pass
    finally:
        hog.close()
    assert_usable(d.socket_path)


def test_out_of_descriptors_a_new_peer_is_told_busy_not_left_waiting(tmp_path: Path) -> None:
    """EMFILE at accept: the spare descriptor answers the peer ``busy``, the
    failure is logged once with a count, and the daemon serves again as soon
    as descriptors are free."""
    import resource

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    sock = tmp_path / "run" / "s.sock"
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket", str(sock),
             "--data-dir", str(tmp_path / "data")],
            stdout=out, stderr=out, preexec_fn=low_fd_limit,
        )
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and ping_once(sock)):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        refused: list[Reply | None] = []
        for _ in range(80):  # more connections than the daemon has descriptors for
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(5)
            c.connect(str(sock))
            c.sendall(encode_framed(Ping(id=1)))
            clients.append(c)
        for c in clients:
            raw = b""
            while len(raw) < 4 or len(raw) < 4 + int.from_bytes(raw[:4], "big"):
                chunk = c.recv(65536)  # a timeout here: a peer left waiting
                if not chunk:
                    break
                raw += chunk
            reply = decode_reply(raw[4:])
            if isinstance(reply, Error):
                refused.append(reply)
            else:
                assert reply == Pong(id=1), reply
        assert refused, "every peer was served: the limit was never reached"
        for reply in refused:
            assert isinstance(reply, Error) and reply.code == ErrorCode.BUSY and reply.retryable
            assert reply.message == "the daemon is out of file descriptors"
        for c in clients:
            c.close()
        clients.clear()
        time.sleep(0.5)
        assert ping_once(sock)
        lines = [line for line in log.read_text().splitlines() if "event=accept_failed" in line]
        assert 1 <= len(lines) <= 2, lines
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


def test_slowloris_frame_times_out_and_others_are_unaffected(daemon_factory: Any) -> None:
    d = daemon_factory(config={"server": {"frame_read_timeout": 0.5}})
    frame = encode_framed(Ping(id=5))
    with Raw(d.socket_path) as slow, Raw(d.socket_path) as other:
        start = time.monotonic()
        slow.send(frame[:2])  # a frame has started...
        for n in range(3):  # ...and others keep being served meanwhile
            assert other.call(Ping(id=n)) == Pong(id=n)
        error = slow.recv()
        elapsed = time.monotonic() - start
        assert isinstance(error, Error), error
        assert error.code == ErrorCode.TIMEOUT and error.id == 0
        assert "0.5 s" in error.message
        assert slow.recv() is None
        assert 0.4 < elapsed < 3.0
        assert other.call(Ping(id=9)) == Pong(id=9)


def test_slowloris_dribbling_bytes_does_not_reset_the_frame_timer(daemon_factory: Any) -> None:
    """The timeout bounds the whole frame, not each read: a byte every 0.1 s
    must not keep a frame alive past the 0.5 s limit."""
    d = daemon_factory(config={"server": {"frame_read_timeout": 0.5}})
    frame = encode_framed(Hello(id=5, client="x" * 60, protocol_version=1))
    with Raw(d.socket_path) as slow:
        start = time.monotonic()
        answered_at = None
        for byte in frame[:-1]:  # about 7 s of dribbling if nothing stops it
            readable, _, _ = select.select([slow.sock], [], [], 0.1)
            if readable:
                answered_at = time.monotonic() - start
                break
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                slow.send(bytes([byte]))
        assert answered_at is not None, "the dribbled frame was never timed out"
        assert answered_at < 2.0
        error = slow.recv()
        assert isinstance(error, Error) and error.code == ErrorCode.TIMEOUT
        assert slow.recv() is None


def test_oversized_length_gets_an_error_and_close_before_any_body(daemon_factory: Any) -> None:
    d = daemon_factory(config={"server": {"max_frame_bytes": 4096}})
    with Raw(d.socket_path) as c:
        c.send((4097).to_bytes(4, "big"))  # the header alone: no body is ever sent
        error = c.recv()
        assert isinstance(error, Error)
        assert error.code == ErrorCode.FRAME_TOO_LARGE and error.id == 0
        assert "4097" in error.message and "4096" in error.message
        assert c.recv() is None
    assert_usable(d.socket_path)


def test_a_huge_length_never_makes_the_daemon_buffer_the_body(daemon_factory: Any) -> None:
    d = daemon_factory()
    rss_before = psutil.Process(d.pid).memory_info().rss
    with Raw(d.socket_path) as c:
        c.send(b"\xf0\x00\x00\x00" + b"\x00" * 65536)  # announces ~4 GB
        error = c.recv()
        assert isinstance(error, Error) and error.code == ErrorCode.FRAME_TOO_LARGE
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(256):  # keep pushing body bytes: the daemon no longer reads
                c.sock.sendall(b"\x00" * 65536)
                sent += 65536
        assert sent < 8 * 1024 * 1024
    growth = psutil.Process(d.pid).memory_info().rss - rss_before
    assert growth < 16 * 1024 * 1024
    assert_usable(d.socket_path)


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "code", "names"),
    [
        ({"type": "teleport", "id": 31}, ErrorCode.UNKNOWN_TYPE, "teleport"),
        ({"type": "hello", "id": 32, "protocol_version": 1}, ErrorCode.INVALID_MESSAGE, "client"),
        (
            {"type": "hello", "id": 33, "client": 5, "protocol_version": 1},
            ErrorCode.INVALID_MESSAGE,
            "$.client",
        ),
        ({"type": "health", "id": 34, "probe": 1}, ErrorCode.INVALID_MESSAGE, "$.probe"),
    ],
    ids=["unknown-type", "missing-field", "wrong-field-type", "wrong-literal-type"],
)
def test_a_bad_message_gets_an_error_naming_the_field_and_the_connection_stays_usable(
    daemon_factory: Any, fields: dict[str, Any], code: str, names: str
) -> None:
    d = daemon_factory()
    payload = msgspec.msgpack.encode(fields)
    with Raw(d.socket_path) as c:
        c.send(len(payload).to_bytes(4, "big") + payload, Ping(id=2))
        error = c.recv()
        assert isinstance(error, Error)
        assert error.id == fields["id"] and error.code == code and not error.retryable
        assert names in error.message
        assert c.recv() == Pong(id=2)


def test_an_undecodable_body_gets_error_id_0_and_close(daemon_factory: Any) -> None:
    d = daemon_factory()
    with Raw(d.socket_path) as c, Raw(d.socket_path) as bystander:
        c.send(b"\x00\x00\x00\x03\xc1\xc1\xc1", Ping(id=2))  # the ping is never read
        error = c.recv()
        assert isinstance(error, Error)
        assert error.code == ErrorCode.BAD_FRAME and error.id == 0 and not error.retryable
        assert c.recv() is None
        assert bystander.call(Ping(id=3)) == Pong(id=3)


def test_a_peer_hanging_up_mid_frame_affects_nobody_else(daemon_factory: Any) -> None:
    d = daemon_factory()
    frame = encode_framed(Hello(id=7, client="bystander", protocol_version=1))
    with Raw(d.socket_path) as bystander:
        bystander.send(frame[:9])  # the bystander is itself mid-frame
        for cut in (1, 4, 6):
            quitter = Raw(d.socket_path)
            quitter.send(encode_framed(Ping(id=1))[:cut])
            quitter.close()
        bystander.send(frame[9:])
        assert isinstance(bystander.recv(), Welcome)
        assert bystander.call(Ping(id=8)) == Pong(id=8)
    assert_usable(d.socket_path)
    deadline = time.monotonic() + 5
    while d.log().count("event=connection_truncated") < 3:
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.02)
    assert d.proc.poll() is None


# --- shutdown ---------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_removing_socket_and_lock(daemon_factory: Any, signum: int) -> None:
    d = daemon_factory()
    with Raw(d.socket_path) as idle:  # an idle connection does not hold up shutdown
        assert idle.call(Ping(id=1)) == Pong(id=1)
        children = psutil.Process(d.pid).children(recursive=True)
        d.signal(signum)
        assert d.proc.wait(20) == 0
        assert idle.recv() is None
    assert not d.socket_path.exists()
    assert not d.socket_path.with_name(d.socket_path.name + ".lock").exists()
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    log = d.log()
    assert "event=listening" in log and "event=stopped" in log


def test_sigterm_lets_an_in_flight_scan_finish(daemon_factory: Any) -> None:
    """A real scan (32 MiB: a few hundred ms) is in flight when SIGTERM arrives;
    its verdict still comes back, then the daemon closes and exits 0."""
    d = daemon_factory()
    with Raw(d.socket_path, timeout=30) as c:
        c.send(Scan(id=1, data=b"A" * (32 << 20)), Ping(id=2))
        assert c.recv() == Pong(id=2)  # the scan was dispatched before the ping
        d.signal(signal.SIGTERM)
        verdict = c.recv()
        assert isinstance(verdict, ScanResult), verdict
        assert verdict.id == 1 and verdict.size == 32 << 20
        assert c.recv() is None
    assert d.proc.wait(30) == 0
    assert not d.socket_path.exists()


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, dispatcher: Dispatcher, config: ServerConfig
) -> AsyncIterator[tuple[Server, Path]]:
    """The real Server with ``dispatcher`` on a real socket under ``tmp_path``,
    until the block ends."""
    srv = Server(config, dispatcher)
    path = tmp_path / "run" / "s.sock"
    prepare_socket_dir(path)
    listener = await open_unix_listener(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(srv.serve, listener)
            yield srv, path
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


@contextlib.asynccontextmanager
async def in_process_server(
    tmp_path: Path, handler: Any, **server: Any
) -> AsyncIterator[tuple[Server, Path]]:
    """The real Server on a real socket, with core handlers and ``handler`` for
    ``health`` (standing in for any slow request: no built-in one is slow)."""
    dispatcher = Dispatcher()
    core.register(dispatcher, limits=Limits(), request_shutdown=lambda: None)
    dispatcher.register(Health, handler)
    async with serving(tmp_path, dispatcher, ServerConfig(**server)) as served:
        yield served


async def test_drain_lets_in_flight_requests_finish_and_replies_come_out_of_order(
    tmp_path: Path,
) -> None:
    """What SIGTERM does (Server.drain), with a request held in flight by the test."""
    release = trio.Event()
    started = trio.Event()

    async def slow_health(req: Health, ctx: RequestContext) -> HealthReport:
        started.set()
        await release.wait()
        return HealthReport(id=req.id, status="healthy", alive=True, ready=True)

    async with (
        in_process_server(tmp_path, slow_health) as (srv, path),
        open_framed_connection(path) as conn,
    ):
        await conn.send(Health(id=1))
        await started.wait()
        await conn.send(Ping(id=2))
        assert await conn.receive() == Pong(id=2)  # overtakes the slow request

        drained = trio.Event()

        async def drain() -> None:
            await srv.drain(grace=30.0)
            drained.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await trio.testing.wait_all_tasks_blocked()
            assert srv.draining and not drained.is_set()
            await conn.send(Health(id=3))  # new work is refused while draining
            refused = await conn.receive()
            assert isinstance(refused, Error) and refused.id == 3
            assert refused.code == ErrorCode.SHUTTING_DOWN and refused.retryable

            release.set()
            finished = await conn.receive()
            assert isinstance(finished, HealthReport) and finished.id == 1
            with pytest.raises(TransportError, match="closed"):
                await conn.receive()
        assert drained.is_set()


async def test_drain_cancels_what_outlives_the_grace_period(tmp_path: Path) -> None:
    cancelled = trio.Event()

    async def stuck(req: Health, ctx: RequestContext) -> HealthReport:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with (
        in_process_server(tmp_path, stuck) as (srv, path),
        open_framed_connection(path) as conn,
    ):
        await conn.send(Health(id=1))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        with trio.fail_after(10):
            await srv.drain(grace=0.2)  # waits the grace, then cancels what is left
            await cancelled.wait()
        assert 0.15 < trio.current_time() - start < 5
        with pytest.raises(TransportError):
            await conn.receive()  # no reply to a cancelled request; closed


async def test_max_in_flight_refuses_the_request_over_the_limit(tmp_path: Path) -> None:
    release = trio.Event()

    async def slow_health(req: Health, ctx: RequestContext) -> HealthReport:
        await release.wait()
        return HealthReport(id=req.id, status="healthy", alive=True, ready=True)

    async with (
        in_process_server(tmp_path, slow_health, max_in_flight_per_connection=2) as (_, path),
        open_framed_connection(path) as conn,
    ):
        for i in (1, 2, 3):
            await conn.send(Health(id=i))
        busy = await conn.receive()
        assert isinstance(busy, Error) and busy.id == 3 and busy.code == ErrorCode.BUSY
        assert busy.retryable and busy.retry_after_ms == 50
        await conn.send(Ping(id=4))  # inline requests are not counted
        assert await conn.receive() == Pong(id=4)
        release.set()
        assert sorted([(await conn.receive()).id, (await conn.receive()).id]) == [1, 2]
        await conn.send(Health(id=5))  # the slots are free again
        assert (await conn.receive()).id == 5


async def test_a_peer_that_floods_past_busy_is_read_no_faster_than_it_was_told(
    tmp_path: Path,
) -> None:
    """A peer holds its in-flight slots and keeps pipelining requests, reading the
    ``busy`` replies and ignoring their ``retry_after``. Before, every frame cost
    the daemon a decode and a refusal: about 86,000 a second here, one core busy,
    and another peer's pings took 13 ms instead of 0.4. Now its reads pause for
    each ``retry_after`` (50 ms), so it gets a few refusals per pause."""
    release = trio.Event()

    async def slow_health(req: Health, ctx: RequestContext) -> HealthReport:
        await release.wait()
        return HealthReport(id=req.id, status="healthy", alive=True, ready=True)

    refused = served_pings = 0
    async with (
        in_process_server(tmp_path, slow_health, max_in_flight_per_connection=2) as (_, path),
        open_framed_connection(path) as flooder,
        open_framed_connection(path) as other,
    ):
        await flooder.send(Health(id=1))
        await flooder.send(Health(id=2))
        burst = b"".join(encode_framed(Health(id=i)) for i in range(3, 503))

        async def flood() -> None:
            while True:
                await flooder.send_raw(burst)

        async def count_refusals() -> None:
            nonlocal refused
            while True:
                reply = await flooder.receive()
                assert isinstance(reply, Error) and reply.code == ErrorCode.BUSY
                refused += 1

        async def ping() -> None:
            nonlocal served_pings
            for i in range(10_000):
                await other.send(Ping(id=i))
                assert await other.receive() == Pong(id=i)
                served_pings += 1
                await trio.sleep(0.01)

        with trio.move_on_after(1.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                nursery.start_soon(count_refusals)
                nursery.start_soon(ping)
        # About 2 per 50 ms pause; without the pause, tens of thousands.
        assert 1 <= refused < 200, refused
        assert served_pings >= 20
        release.set()
        # The held requests were never held up; what the pauses left unread in
        # the socket is refused when read, and the connection is still usable.
        seen: set[int] = set()
        with trio.fail_after(30):
            while not {1, 2} <= seen:
                reply = await flooder.receive()
                if isinstance(reply, HealthReport):
                    seen.add(reply.id)


# --- configuration and the CLIs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[server]\nmax_conections = 5\n", ["server", "max_conections"]),
        ('[server]\nmax_connections = "many"\n', ["server.max_connections", "Expected `int`"]),
        ("[server\nmax_connections = 5\n", ["not valid TOML"]),
        ("surprise = true\n", ["surprise"]),
        (None, ["cannot read config file"]),
        (
            "[server]\nmax_frame_bytes = 8192\nmax_receive_buffer_bytes = 5000\n",
            ["max_receive_buffer_bytes (5000) must be at least max_frame_bytes (8192)"],
        ),
        # Values in range for their type but not for the daemon: each once failed
        # later (the first connection, the first scan) with a traceback.
        ("[server]\nmax_frame_bytes = 0\n", ["server", "max_frame_bytes (0) must be in"]),
        ("[server]\nmax_frame_bytes = 8589934592\n", ["max_frame_bytes (8589934592)"]),
        ("[server]\nmax_connections = -1\n", ["max_connections must be at least 1"]),
        ("[server]\nmax_in_flight_per_connection = 0\n",
         ["max_in_flight_per_connection must be at least 1"]),
        ("[server]\nframe_read_timeout = -1.0\n", ["frame_read_timeout must be greater than 0"]),
        ("[server]\nwrite_timeout = 0.0\n", ["write_timeout must be greater than 0"]),
        ("[server]\nsocket_mode = 0o200\n", ["socket_mode (0o200)"]),
        ("[rate_limit]\nburst = 0\n", ["rate_limit", "burst must be at least 1"]),
        ("[rate_limit]\nscans_per_second = 0.0\n", ["scans_per_second must be greater than 0"]),
        ("[server]\nmax_connections_per_uid = 0\n",
         ["max_connections_per_uid must be at least 1"]),
        ("[rate_limit]\nmax_concurrent_scans_per_uid = -2\n",
         ["max_concurrent_scans_per_uid must be at least 1"]),
    ],
    ids=["unknown-key", "wrong-type", "not-toml", "unknown-top-level-key", "unreadable",
         "receive-budget-under-one-frame", "frame-limit-zero", "frame-limit-over-4-bytes",
         "no-connections", "no-requests", "negative-frame-timeout", "zero-write-timeout",
         "socket-mode-without-owner", "empty-bucket", "no-refill", "no-connections-per-user",
         "no-scans-per-user"],
)
def test_a_bad_config_file_stops_start_up_with_exit_2_naming_the_key(
    tmp_path: Path, content: str | None, expected: list[str]
) -> None:
    config = tmp_path / "config.toml"
    if content is None:
        config.mkdir()  # a directory: cannot be read as a file
    else:
        config.write_text(content)
    sock = tmp_path / "run" / "s.sock"
    result = run_sentineld(
        "--socket", str(sock), "--data-dir", str(tmp_path / "d"), "--config", str(config)
    )
    assert result.returncode == 2
    for text in expected:
        assert text in result.stderr, result.stderr
    assert str(config) in result.stderr
    assert "Traceback" not in result.stderr
    assert not sock.exists()


def test_a_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_sentineld(
        "--socket", str(tmp_path / "s.sock"), "--config", str(tmp_path / "absent.toml")
    )
    assert result.returncode == 2
    assert "absent.toml" in result.stderr and "No such file" in result.stderr


def test_sentinelctl_ping_exit_codes(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory()
    ctl = [sys.executable, "-m", "sentinel_ipc.cli.sentinelctl"]
    live = subprocess.run(
        [*ctl, "--socket", str(d.socket_path), "ping"], capture_output=True, text=True, timeout=30
    )
    assert live.returncode == 0, live.stderr
    assert "pong" in live.stdout
    dead = subprocess.run(
        [*ctl, "--socket", str(tmp_path / "none.sock"), "ping"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dead.returncode == 2
    assert "cannot connect" in dead.stderr and "Traceback" not in dead.stderr


# --- descriptors (SCM_RIGHTS) -------------------------------------------------------------


async def test_a_passed_descriptor_reaches_the_frame_it_was_sent_with(tmp_path: Path) -> None:
    """The fd rides on the sendmsg() of its scan_fd frame; frames sent just before,
    which the kernel may hand over in the same read, must not claim it."""
    seen: dict[int, list[int]] = {}

    async def scan_fd(req: ScanFd, ctx: RequestContext) -> Ack:
        seen[req.id] = [os.fstat(fd).st_size for fd in ctx.fds]
        return Ack(id=req.id)

    async def health(req: Health, ctx: RequestContext) -> HealthReport:
        seen[req.id] = list(ctx.fds)
        return HealthReport(id=req.id, status="healthy", alive=True, ready=True)

    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"x" * 1234)
    async with in_process_server(tmp_path, health) as (srv, path):
        srv.dispatcher.register(ScanFd, scan_fd)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(str(path))
        with open(payload, "rb") as f:  # noqa: ASYNC230  (blocking on purpose)
            # Blocking sends with no checkpoint between them: the server reads
            # all three frames at once.
            raw.sendall(encode_framed(Ping(id=1)) + encode_framed(Health(id=2)))
            raw.sendmsg(
                [encode_framed(ScanFd(id=3))],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [f.fileno()]))],
            )
            raw.sendall(encode_framed(Health(id=4)))
        sock = trio.socket.from_stdlib_socket(raw)
        decoder = FrameDecoder(1 << 20)
        replies: list[Reply] = []
        with trio.fail_after(10):
            while len(replies) < 4:
                decoder.receive_data(await sock.recv(65536))
                while (frame := decoder.next_frame()) is not NEED_DATA:
                    assert isinstance(frame, bytes)
                    replies.append(decode_reply(frame))
        sock.close()
    assert sorted(r.id for r in replies) == [1, 2, 3, 4]
    assert seen == {2: [], 3: [1234], 4: []}
