"""Golden vectors (protocol/vectors.json), every one run both ways.

Valid vectors: the frame decodes to the message, and (canonical ones) the
message encodes to exactly the frame. Invalid vectors: the sans-I/O decoder
reports the expected error code, and a real daemon answers the same frame with
that code and closes the connection, or keeps it usable, as the vector says.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from daemon_harness import DaemonProcess

from sentinel_ipc.codec import DecodeFailure, decode_reply, decode_request, encode_framed
from sentinel_ipc.errors import BadFrameError, ErrorCode, FrameTooLargeError
from sentinel_ipc.framing import HEADER, NEED_DATA, FrameDecoder
from sentinel_ipc.messages import Error, Ping, Pong, Reply, Request
from sentinel_ipc.schema import PROTOCOL_DIR

VECTORS: list[dict[str, Any]] = json.loads((PROTOCOL_DIR / "vectors.json").read_text())


@pytest.fixture(scope="module")
def vector_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon (default config) for every invalid vector: start-up is the slow part."""
    d = DaemonProcess(tmp_path_factory.mktemp("vectors"))
    d.start()
    try:
        yield d
    finally:
        d.stop()


def _read_replies(sock: socket.socket, stop_after: int | None) -> tuple[list[Reply], bool]:
    """Replies until EOF (closed=True), ``stop_after`` replies or 2 s of silence."""
    decoder = FrameDecoder(64 * 1024 * 1024)
    replies: list[Reply] = []
    sock.settimeout(2.0)
    while stop_after is None or len(replies) < stop_after:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return replies, False
        except ConnectionResetError:  # the server closed with our bytes unread
            return replies, True
        if not data:
            return replies, True
        decoder.receive_data(data)
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, bytes)
            replies.append(decode_reply(frame))
    return replies, False


def _exchange(path: Path, frame: bytes, *, eof: bool, expect_close: bool) -> tuple[Any, bool]:
    """Send ``frame`` raw; return (the only reply or None, was the connection closed?).

    When no close is expected, a ping right after must be answered: the
    connection is still usable.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(frame)
        if eof:
            sock.shutdown(socket.SHUT_WR)
        replies, closed = _read_replies(sock, None if expect_close or eof else 1)
        assert len(replies) <= 1, replies
        if not closed:
            sock.sendall(encode_framed(Ping(id=99)))
            more, closed = _read_replies(sock, 1)
            assert more == [Pong(id=99)] and not closed
        return (replies[0] if replies else None), closed


def _check_valid(vector: dict[str, Any], frame: bytes) -> None:
    request = vector["direction"] == "request"
    union: Any = Request if request else Reply
    message = msgspec.json.decode(json.dumps(vector["message"]), type=union)

    decoder = FrameDecoder(64 * 1024 * 1024)
    decoder.receive_data(frame)
    payload = decoder.next_frame()
    assert isinstance(payload, bytes)
    assert decoder.next_frame() is NEED_DATA and decoder.buffered == 0
    decoded = (decode_request if request else decode_reply)(payload)

    assert decoded == message
    assert type(decoded) is type(message)
    if vector["canonical"]:
        assert encode_framed(message) == frame
        assert json.loads(msgspec.json.encode(decoded)) == vector["message"]


def _check_invalid_sans_io(vector: dict[str, Any], frame: bytes) -> None:
    code = vector["expected_error_code"]
    decoder = FrameDecoder(vector["max_frame_bytes"])
    decoder.receive_data(frame)
    if vector["eof"]:
        decoder.receive_data(b"")
    if code == ErrorCode.FRAME_TOO_LARGE:
        with pytest.raises(FrameTooLargeError) as too_large:
            decoder.next_frame()
        assert too_large.value.code == code
        assert decoder.buffered == 0  # nothing of the body is kept
        assert vector["close"] and vector["expected_id"] == 0
        return
    if vector["eof"]:
        with pytest.raises(BadFrameError) as truncated:
            decoder.next_frame()
        assert truncated.value.code == code
        return
    payload = decoder.next_frame()
    assert isinstance(payload, bytes)
    assert len(payload) + HEADER.size == len(frame)
    with pytest.raises(DecodeFailure) as failure:
        decode_request(payload)
    assert failure.value.error.code == code
    assert failure.value.request_id == vector["expected_id"]
    assert failure.value.fatal is vector["close"]
    if vector["message_contains"]:
        assert vector["message_contains"] in failure.value.error.message


def _check_invalid_daemon(vector: dict[str, Any], frame: bytes, daemon: DaemonProcess) -> None:
    reply, closed = _exchange(
        daemon.socket_path, frame, eof=vector["eof"], expect_close=vector["close"]
    )
    assert closed is vector["close"]
    if vector["eof"]:
        assert reply is None  # the peer is gone: nothing to answer
        return
    assert isinstance(reply, Error), reply
    assert reply.code == vector["expected_error_code"]
    assert reply.id == vector["expected_id"]
    assert reply.retryable is False
    if vector["message_contains"]:
        assert vector["message_contains"] in reply.message


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector(vector: dict[str, Any], request: pytest.FixtureRequest) -> None:
    frame = bytes.fromhex(vector["frame_hex"])
    if vector["valid"]:
        _check_valid(vector, frame)
        return
    _check_invalid_sans_io(vector, frame)
    daemon: DaemonProcess = request.getfixturevalue("vector_daemon")
    _check_invalid_daemon(vector, frame, daemon)
    assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()
