"""On a socket shared with other users, one user cannot take a bound the
daemon shares between them.

There every daemon-wide bound has a per-uid share (a quarter, unless set):
connections and requests in flight (``[server] max_connections_per_uid`` /
``max_in_flight_per_uid``), running scans (``[rate_limit]
max_concurrent_scans_per_uid``), open scan streams and the bytes they buffer
(``handlers/scan.py``), and event subscriptions (``EventBus.max_per_owner``).
Each test fills one user's share as root and shows that root is refused with
the per-user limit named, while a client running as ``nobody`` on the same
socket is still served. A private socket (the default) has one user and no
share.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from samples import EICAR, slow_rule
from test_scan_daemon import slow_input, with_eicar
from test_security import as_nobody, call, can_be_nobody, open_daemon, running
from test_security import shared_base as shared_base

from sentinel_ipc.codec import decode_reply, encode_framed
from sentinel_ipc.errors import BusyError
from sentinel_ipc.framing import FrameDecoder
from sentinel_ipc.handlers.scan import MAX_STREAMS_PER_UID
from sentinel_ipc.messages import (
    PROTOCOL_VERSION,
    Error,
    Event,
    Health,
    HealthReport,
    Hello,
    Metrics,
    Ping,
    Pong,
    Reply,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ScanResult,
    Welcome,
)
from sentinel_ipc.observability.events import EventBus

pytestmark = can_be_nobody


def is_busy_per_user(reply: Any) -> bool:
    return isinstance(reply, Error) and reply.code == "busy" and "limit per user" in reply.message


class RawPeer:
    """A blocking connection of the test's own uid (root) that reads only when asked."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder(64 * 1024 * 1024)

    def send(self, request: Any) -> None:
        self.sock.sendall(encode_framed(request))

    def read(self) -> Reply:
        while True:
            payload = self.decoder.next_frame()
            if isinstance(payload, (bytes, bytearray)):
                return decode_reply(bytes(payload))
            chunk = self.sock.recv(65536)
            assert chunk, "the daemon closed the connection"
            self.decoder.receive_data(chunk)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def peers() -> Iterator[list[RawPeer]]:
    held: list[RawPeer] = []
    try:
        yield held
    finally:
        for peer in held:
            peer.close()


def until(check: Any, timeout: float = 10.0) -> Any:
    """Call ``check`` until it returns something truthy (then return it)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_one_user_cannot_hold_every_connection(shared_base: Path, peers: list[RawPeer]) -> None:
    config = {"server": {"max_connections": 10, "max_connections_per_uid": 3}}
    with running(open_daemon(shared_base, config)) as d:
        for n in range(3):
            peer = RawPeer(d.socket_path)
            peers.append(peer)
            peer.send(Hello(id=1, client=f"root-{n}", protocol_version=PROTOCOL_VERSION))
            assert isinstance(peer.read(), Welcome)
        # The fourth of root's connections is refused at once, with the per-user limit.
        refused = call(d.socket_path, Ping(id=5))
        assert is_busy_per_user(refused), refused
        assert isinstance(refused, Error) and refused.retryable
        assert "3 connections" in refused.message
        # Another user still gets in: the daemon-wide bound (10) is far from full.
        answers = as_nobody(d.socket_path, [Ping(id=7), Health(id=8)])
        assert isinstance(answers[0], Pong) and answers[0].id == 7, answers
        assert isinstance(answers[1], HealthReport), answers
        # Root's share comes back as soon as one of its connections closes.
        peers.pop().close()
        assert isinstance(until(lambda: (r := call(d.socket_path, Ping(id=9))) and
                                isinstance(r, Pong) and r), Pong)


def test_one_user_cannot_hold_every_request_slot(shared_base: Path, peers: list[RawPeer]) -> None:
    # 40 metrics replies of about 10 KB are more than a socket buffer (208 KiB).
    config = {"server": {"max_in_flight_per_uid": 40, "max_in_flight_total": 500,
                         "max_in_flight_per_connection": 200, "write_timeout": 60.0}}
    with running(open_daemon(shared_base, config)) as d:
        # Root pipelines metrics requests and reads nothing: once the socket
        # buffer is full their replies cannot be written, so they stay in flight.
        stuck = RawPeer(d.socket_path)
        peers.append(stuck)
        for n in range(30):  # fill the socket buffer first (30 x 10 KB)...
            stuck.send(Metrics(id=100 + n))
        time.sleep(1.0)
        for n in range(30, 100):  # ...so that each of these stays in flight
            stuck.send(Metrics(id=100 + n))
        # Root's other connections are now refused: its share (40) is taken...
        refused = until(lambda: is_busy_per_user(r := call(d.socket_path, Health(id=1))) and r)
        assert refused, "root's requests were never refused with the per-user limit"
        assert "40 requests in flight" in refused.message
        # ...while another user's requests are served.
        answers = as_nobody(d.socket_path, [Health(id=2), Metrics(id=3)])
        assert isinstance(answers[0], HealthReport), answers
        assert not isinstance(answers[1], Error), answers
        # Nothing is lost on the stuck connection: each request gets its answer,
        # the metrics or the same per-user busy.
        replies = [stuck.read() for _ in range(100)]
        assert sorted(r.id for r in replies) == list(range(100, 200))
        assert all(is_busy_per_user(r) or not isinstance(r, Error) for r in replies), replies
        assert any(is_busy_per_user(r) for r in replies)
        # Read, the stuck requests finish and root is served again.
        assert isinstance(until(lambda: isinstance(r := call(d.socket_path, Health(id=4)),
                                                   HealthReport) and r), HealthReport)


def test_one_user_cannot_hold_every_scan_slot(
    shared_base: Path, peers: list[RawPeer], tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", slow_rule("high")))
    config = {
        "scanner": {"workers": 1, "worker_wait_timeout": 30.0, "scan_timeout": 30},
        "rate_limit": {"burst": 100, "scans_per_second": 100.0,
                       "max_concurrent_scans_per_uid": 2},
    }
    with running(open_daemon(shared_base, config, extra_args=["--rules", str(rules)])) as d:
        slow = slow_input(1.0)
        busy = RawPeer(d.socket_path)
        peers.append(busy)
        busy.send(Scan(id=1, data=slow, filename="a.bin"))
        busy.send(Scan(id=2, data=slow, filename="b.bin"))
        busy.send(Ping(id=9))  # answered in order: both scans were admitted before it
        assert isinstance(busy.read(), Pong)
        # Root's two scans hold its share (one scanning, one queued behind it):
        # its third, on another connection, is refused with the per-user limit.
        refused = call(d.socket_path, Scan(id=3, data=EICAR))
        assert isinstance(refused, Error) and refused.code == "rate_limited", refused
        assert "limit per user 2" in refused.message and refused.retryable, refused
        # Another user's scan is admitted, waits its turn and gets its verdict.
        answer = as_nobody(d.socket_path, [Scan(id=4, data=EICAR, filename="e.com")])[0]
        assert isinstance(answer, ScanResult) and answer.action == "block", answer
        for _ in range(2):
            result = busy.read()
            assert isinstance(result, ScanResult) and result.action == "block", result


def test_one_user_cannot_hold_every_scan_stream(shared_base: Path, peers: list[RawPeer]) -> None:
    with running(open_daemon(shared_base, {})) as d:
        per_connection = MAX_STREAMS_PER_UID // 2
        next_id = 1
        for _ in range(2):
            peer = RawPeer(d.socket_path)
            peers.append(peer)
            for _ in range(per_connection):
                peer.send(ScanBegin(id=next_id, filename="s.bin"))
                next_id += 1
        # scan_begin has no reply; a ping after them proves they were handled.
        for peer in peers:
            peer.send(Ping(id=999))
            assert isinstance(peer.read(), Pong)
        third = RawPeer(d.socket_path)
        peers.append(third)
        third.send(ScanBegin(id=1, filename="one-too-many.bin"))
        refused = third.read()
        assert is_busy_per_user(refused) and refused.id == 1, refused
        assert f"{MAX_STREAMS_PER_UID} scan streams open" in refused.message
        # Another user opens one and scans through it.
        stream = b"".join(encode_framed(m) for m in (
            ScanBegin(id=5, filename="n.com"), ScanChunk(id=5, data=EICAR), ScanEnd(id=5)))
        answer = as_nobody(d.socket_path, [stream])[0]
        assert isinstance(answer, ScanResult) and answer.id == 5, answer
        assert answer.action == "block", answer


def test_one_users_streams_share_one_buffer_budget(
    shared_base: Path, peers: list[RawPeer]
) -> None:
    mib = 1024 * 1024
    config = {"scanner": {"max_pending_bytes": 2 * mib, "max_stream_bytes": 512 * 1024}}
    with running(open_daemon(shared_base, config)) as d:
        # Root's share: half of max_pending_bytes, 1 MiB, over all its connections.
        first, second = RawPeer(d.socket_path), RawPeer(d.socket_path)
        peers += [first, second]
        chunk = b"x" * (250 * 1024)
        first.send(ScanBegin(id=1, filename="a.bin"))
        second.send(ScanBegin(id=1, filename="b.bin"))
        second.send(ScanBegin(id=2, filename="c.bin"))
        for peer, stream in ((first, 1), (first, 1), (second, 1), (second, 1)):
            peer.send(ScanChunk(id=stream, data=chunk))
        for peer in (first, second):
            peer.send(Ping(id=9))
            assert isinstance(peer.read(), Pong)  # 500 KiB buffered on each connection
        # A further 250 KiB on the second connection (750 KiB there, less than
        # one connection's share) would take root to 1250 KiB: refused.
        second.send(ScanChunk(id=2, data=chunk))
        refused = second.read()
        assert isinstance(refused, Error) and refused.code == "busy", refused
        assert "uid 0" in refused.message and "per user" in refused.message, refused
        # Another user streams as much at the same time.
        stream = b"".join(encode_framed(m) for m in (
            ScanBegin(id=5, filename="n.com"), ScanChunk(id=5, data=chunk),
            ScanChunk(id=5, data=EICAR), ScanEnd(id=5)))
        answer = as_nobody(d.socket_path, [stream])[0]
        assert isinstance(answer, ScanResult) and answer.action == "block", answer


async def test_one_user_cannot_hold_every_subscription() -> None:
    sent: list[Event] = []

    async def send(event: Event) -> None:
        sent.append(event)

    async with trio.open_nursery() as nursery:
        bus = EventBus(nursery, max_subscribers=8, max_per_owner=2, clock=trio.current_time)
        held = [bus.subscribe(n, ["services"], send, owner=1000) for n in range(2)]
        with pytest.raises(BusyError, match="uid 1000 holds 2 subscriptions"):
            bus.subscribe(3, ["services"], send, owner=1000)
        # Others (and the daemon's own, unowned, subscriptions) are unaffected.
        others = [bus.subscribe(4, ["services"], send, owner=1001) for _ in range(2)]
        others.append(bus.subscribe(5, ["degraded"], send))
        # Ending one gives the slot back at once.
        bus.unsubscribe(held[0])
        held[0] = bus.subscribe(6, ["services"], send, owner=1000)
        for sub in held + others:
            bus.unsubscribe(sub)
        nursery.cancel_scope.cancel()


def test_a_private_socket_has_no_per_user_share(daemon_factory: Any, peers: list[RawPeer]) -> None:
    """The default socket (0600) has one user: it may use every slot itself."""
    d = daemon_factory(config={"server": {"max_connections": 8}})
    for _ in range(8):  # a shared socket would stop this user at 2
        peer = RawPeer(d.socket_path)
        peers.append(peer)
        peer.send(Ping(id=1))
        assert isinstance(peer.read(), Pong)
    refused = call(d.socket_path, Ping(id=2))
    assert isinstance(refused, Error) and refused.code == "busy", refused
    assert "too many connections (limit 8)" in refused.message
