"""Protocol fuzzing against a live daemon (issue 8, part 2).

Hypothesis builds byte streams out of frames of every kind: valid requests,
well-formed maps with wrong field types and unknown tags, arbitrary
MessagePack, deep nesting, random bytes, and mutations of all of them
(truncations, flipped bytes, rewritten or huge length prefixes), interleaved,
and cut into arbitrary send() pieces. For every stream:

* every complete frame the daemon sends back decodes as a reply (it never
  answers garbage), and the connection ends when we hang up (no hang);
* afterwards the daemon answers a ping on a new connection.

At the end the daemon's descriptors are back where they were and its memory
did not run away. ``tools/fuzz_frames.py`` is the long version (100,000 frames,
and an atheris harness for the decoder itself).

Frames that would decode to ``shutdown`` (or trip a breaker, or reload the
rules) are swapped for a ping: the fuzzer runs as the daemon's own user, who
may legitimately stop it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
from daemon_harness import DaemonProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from samples import EICAR

from sentinel_ipc.codec import DecodeFailure, decode_reply, decode_request, encode
from sentinel_ipc.messages import (
    REQUEST_TAGS,
    REQUEST_TYPES,
    BreakerControl,
    Error,
    Health,
    Hello,
    Metrics,
    Ping,
    PolicyAdd,
    PolicyList,
    PolicyQuery,
    Pong,
    Reload,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ServiceRetry,
    Shutdown,
    Subscribe,
    Threats,
)

MAX_FRAME = 256 * 1024
UNSAFE = (Shutdown, BreakerControl, Reload, ServiceRetry)
SAFE_TAGS = sorted(REQUEST_TAGS - {"shutdown", "breaker_control", "reload", "service_retry"})
FIELDS = sorted({f.name for t in REQUEST_TYPES for f in msgspec.structs.fields(t)} - {"id"})
PING = struct.pack(">I", len(encode(Ping(id=1)))) + encode(Ping(id=1))


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def safe(data: bytes) -> bytes:
    """``data`` unless it is a frame that would stop the daemon or trip a breaker."""
    if len(data) >= 4 and int.from_bytes(data[:4], "big") == len(data) - 4:
        try:
            request = decode_request(data[4:])
        except DecodeFailure:
            return data
        if isinstance(request, UNSAFE):
            return PING
    return data


# --- strategies -----------------------------------------------------------------------

ids = st.one_of(st.integers(min_value=0, max_value=2**63 - 1),
                st.integers(min_value=-(2**63), max_value=2**64 - 1))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.binary(max_size=200),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.text(max_size=12), st.integers(-(2**63), 2**64 - 1)),
                        children, max_size=6),
    ),
    max_leaves=40,
)
hex64 = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def valid_requests(draw: st.DrawFn) -> msgspec.Struct:
    i = draw(st.integers(min_value=1, max_value=2**62))
    return draw(st.sampled_from([
        Ping(id=i),
        Health(id=i, probe=draw(st.sampled_from(["full", "live", "ready"]))),
        Metrics(id=i),
        PolicyList(id=i),
        Threats(id=i, limit=draw(st.integers(min_value=-5, max_value=5000))),
        PolicyQuery(id=i, sha256=draw(st.none() | hex64 | st.text(max_size=70)),
                    url=draw(st.none() | st.text(max_size=80)),
                    rule_names=draw(st.lists(st.text(max_size=20), max_size=4))),
        PolicyAdd(id=i, action=draw(st.sampled_from(["allow", "warn", "quarantine", "block"])),
                  sha256=draw(st.none() | hex64 | st.text(max_size=70)),
                  url_pattern=draw(st.none() | st.text(max_size=300)),
                  rule_name=draw(st.none() | st.text(max_size=300)),
                  reason=draw(st.none() | st.text(max_size=50))),
        Scan(id=i, data=draw(st.binary(max_size=2000) | st.just(EICAR)),
             filename=draw(st.none() | st.text(max_size=60)),
             url=draw(st.none() | st.text(max_size=60))),
        ScanBegin(id=i, size=draw(st.none() | st.integers(min_value=-10, max_value=2**40))),
        ScanChunk(id=i, data=draw(st.binary(max_size=500))),
        ScanEnd(id=i),
        Subscribe(id=i, topics=draw(st.lists(st.text(max_size=12), max_size=3))),
        Hello(id=i, client="fuzz", protocol_version=draw(st.integers(-3, 5))),
    ]))


@st.composite
def message_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """Maps shaped like messages: a tag (known or not), an id of any type, fields with
    values of any type."""
    out: dict[Any, Any] = {}
    if draw(st.booleans()):
        out["type"] = draw(st.sampled_from(SAFE_TAGS) | st.text(max_size=15) | scalars)
    if draw(st.integers(0, 9)):
        out["id"] = draw(ids | scalars)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=5, unique=True)):
        out[name] = draw(values)
    return out


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    """MessagePack nested far deeper than any message: arrays or maps of one."""
    depth = draw(st.integers(min_value=50, max_value=200_000))
    opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"]))
    return opener * depth + b"\xc0"


def payloads() -> st.SearchStrategy[bytes]:
    return st.one_of(
        valid_requests().map(encode),
        message_maps().map(msgspec.msgpack.encode),
        values.map(msgspec.msgpack.encode),
        deep_nesting(),
        st.binary(max_size=300),
    )


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    data = frame(draw(payloads()))
    mutation = draw(st.sampled_from(
        ["none", "none", "none", "truncate", "flip", "length", "huge", "zero", "raw"]))
    if mutation == "truncate":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    elif mutation == "flip" and len(data) > 4:
        at = draw(st.integers(4, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif mutation == "length":
        data = struct.pack(">I", draw(st.integers(0, len(data) + 64))) + data[4:]
    elif mutation == "huge":
        data = struct.pack(">I", draw(st.integers(MAX_FRAME + 1, 2**32 - 1))) + data[4:]
    elif mutation == "zero":
        data = struct.pack(">I", 0) + data[4:]
    elif mutation == "raw":
        data = draw(st.binary(min_size=1, max_size=64))
    return safe(data)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Frames (valid and not) interleaved, then cut into arbitrary send() pieces."""
    blob = b"".join(draw(st.lists(frames(), min_size=1, max_size=6)))
    cuts = sorted(set(draw(st.lists(st.integers(0, len(blob)), max_size=4))))
    pieces, last = [], 0
    for cut in [*cuts, len(blob)]:
        if cut > last:
            pieces.append(blob[last:cut])
            last = cut
    return pieces


# --- the daemon -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        tmp_path_factory.mktemp("fuzz"),
        {
            "server": {"max_frame_bytes": MAX_FRAME, "frame_read_timeout": 2.0},
            "rate_limit": {"burst": 100_000, "scans_per_second": 100_000.0},
            "scanner": {"workers": 1},
        },
    )
    d.start()
    try:
        yield d
    finally:
        d.stop(check=False)


def exchange(path: Path, pieces: list[bytes], timeout: float = 10.0) -> bytes:
    """Send the pieces, hang up our side, read everything until the daemon closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for piece in pieces:
                s.sendall(piece)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        received = bytearray()
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 16):
                received += chunk
        return bytes(received)


def replies_in(data: bytes) -> list[Any]:
    """Every complete frame must be a reply the client library can decode."""
    out = []
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        if len(data) < 4 + size:
            break
        out.append(decode_reply(data[4:4 + size]))
        data = data[4 + size:]
    assert not data, f"the daemon sent a truncated frame: {data[:40]!r}"
    return out


def pings(path: Path) -> bool:
    data = exchange(path, [PING], timeout=5.0)
    return any(isinstance(r, Pong) for r in replies_in(data))


def own_fds(pid: int) -> int:
    """Descriptors of the daemon that are neither memfds (a bounded reuse pool)
    nor sockets (client connections close asynchronously)."""
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if not target.startswith(("/memfd:", "socket:")):
                count += 1
    return count


# --- tests ----------------------------------------------------------------------------


def test_fuzzed_streams_never_hurt_the_daemon(daemon: DaemonProcess) -> None:
    proc = psutil.Process(daemon.pid)
    assert pings(daemon.socket_path)
    fds_before = own_fds(daemon.pid)
    rss_before = proc.memory_info().rss
    seen: dict[str, int] = {}

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(streams())
    def run(pieces: list[bytes]) -> None:
        for reply in replies_in(exchange(daemon.socket_path, pieces)):
            key = reply.code if isinstance(reply, Error) else type(reply).__name__
            seen[key] = seen.get(key, 0) + 1
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-3000:]
        assert pings(daemon.socket_path), "the daemon stopped answering ping"

    run()
    print(f"\nreplies seen: {dict(sorted(seen.items()))}")
    # The fuzzer reached the error paths, not just the happy ones.
    for code in ("bad_frame", "invalid_message", "frame_too_large"):
        assert seen.get(code), (code, seen)
    assert seen.get("Pong")
    # A handler that failed unexpectedly answers "internal": a bug, even if contained.
    assert not seen.get("internal"), daemon.log()[-3000:]
    rss_after = proc.memory_info().rss
    assert rss_after - rss_before < 64 * 1024 * 1024, (rss_before, rss_after)
    assert own_fds(daemon.pid) <= fds_before, "descriptors leaked"
    log = daemon.log()
    for sign in ("Traceback", "connection_failed", "handler_failed"):
        assert sign not in log, log[-3000:]


def test_huge_length_is_refused_before_the_body(daemon: DaemonProcess) -> None:
    """A 4 GiB header is answered at once: the daemon does not wait for the body."""
    data = exchange(daemon.socket_path, [struct.pack(">I", 2**32 - 1)])
    (reply,) = replies_in(data)
    assert isinstance(reply, Error) and reply.code == "frame_too_large" and reply.id == 0


def test_deep_nesting_is_a_typed_error(daemon: DaemonProcess) -> None:
    for opener in (b"\x91", b"\x81\xa1k"):
        payload = opener * 500_000 + b"\xc0"
        big = struct.pack(">I", len(payload)) + payload
        assert len(big) > MAX_FRAME  # over the limit: refused unread
        small = frame(opener * 50_000 + b"\xc0")
        for data in (big, small):
            replies = replies_in(exchange(daemon.socket_path, [data]))
            assert replies and isinstance(replies[0], Error), replies
            assert replies[0].code in ("frame_too_large", "bad_frame", "invalid_message")
    assert pings(daemon.socket_path)


def test_errors_keep_the_connection_when_the_frame_was_decodable(
    daemon: DaemonProcess,
) -> None:
    """Unknown tags and wrong field types are answered by id and the connection
    goes on; a frame that is not a message map is answered with id 0 and closed."""
    stream = b"".join([
        frame(msgspec.msgpack.encode({"type": "no_such_thing", "id": 5})),
        frame(msgspec.msgpack.encode({"type": "ping", "id": "six"})),
        frame(msgspec.msgpack.encode({"type": "scan", "id": 7, "data": 12})),
        frame(encode(Ping(id=8))),
        frame(msgspec.msgpack.encode([1, 2, 3])),
        frame(encode(Ping(id=9))),  # after the fatal frame: never answered
    ])
    replies = replies_in(exchange(daemon.socket_path, [stream]))
    summary = [(r.id, r.code if isinstance(r, Error) else type(r).__name__) for r in replies]
    assert summary == [(5, "unknown_type"), (0, "invalid_message"), (7, "invalid_message"),
                       (8, "Pong"), (0, "bad_frame")], summary
