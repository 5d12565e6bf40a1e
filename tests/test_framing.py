"""FrameDecoder / encode_frame: the sans-I/O length-prefix framing."""

from __future__ import annotations

import ast
import itertools
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sentinel_ipc
from sentinel_ipc.errors import BadFrameError, FrameTooLargeError, LocalProtocolError
from sentinel_ipc.framing import HEADER_SIZE, MAX_FRAME_LIMIT, NEED_DATA, FrameDecoder, encode_frame

LIMIT = 1024


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        assert isinstance(frame, (bytes, bytearray))
        frames.append(bytes(frame))
    return frames


def feed_in_pieces(
    stream: bytes, cuts: list[int], limit: int = LIMIT, decoder: FrameDecoder | None = None
) -> list[bytes]:
    """Feed ``stream`` split at ``cuts``, collecting frames after every piece."""
    decoder = decoder or FrameDecoder(limit)
    frames: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        if end > start:
            decoder.receive_data(stream[start:end])
            frames += drain(decoder)
    decoder.receive_data(b"")
    frames += drain(decoder)  # EOF at a frame boundary is clean
    assert decoder.eof and not decoder.in_frame and decoder.buffered == 0
    return frames


# --- encoding ---------------------------------------------------------------


def test_encode_frame_prefixes_a_big_endian_length() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 258)[:4] == b"\x00\x00\x01\x02"


def test_encode_frame_refuses_a_payload_over_the_limit() -> None:
    assert encode_frame(b"x" * 10, max_frame_bytes=10)[:4] == b"\x00\x00\x00\x0a"
    with pytest.raises(LocalProtocolError, match="11-byte frame: the limit is 10"):
        encode_frame(b"x" * 11, max_frame_bytes=10)


@pytest.mark.parametrize("limit", [0, -1, MAX_FRAME_LIMIT + 1])
def test_decoder_limit_must_fit_the_header(limit: int) -> None:
    with pytest.raises(ValueError):
        FrameDecoder(limit)


# --- splitting ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
)
def test_any_frames_split_at_any_boundaries_decode_to_the_same_payloads(
    payloads: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    assert feed_in_pieces(stream, [c for c in cuts if c < len(stream)]) == payloads


def feed_like_the_server(stream: bytes, cuts: list[int], threshold: int) -> list[bytes]:
    """Feed ``stream`` as the server does with ``hold_large``: allocate a large
    frame's body when asked, receive into it directly while it is offered, and
    hand anything else to ``receive_data``."""
    decoder = FrameDecoder(LIMIT, direct_threshold=threshold, hold_large=True)
    frames: list[bytes] = []
    bounds = [0, *sorted(set(cuts)), len(stream)]
    for start, end in itertools.pairwise(bounds):
        piece = memoryview(stream)[start:end]
        while piece:
            frames += drain(decoder)
            if decoder.body_needed is not None:
                decoder.allocate_body()
            view = decoder.body_view()
            if view is None:
                decoder.receive_data(piece)
                break
            n = min(len(view), len(piece))
            view[:n] = piece[:n]
            decoder.body_received(n)
            piece = piece[n:]
        frames += drain(decoder)
        while decoder.body_needed is not None:  # whole frames already buffered
            decoder.allocate_body()
            frames += drain(decoder)
    decoder.receive_data(b"")
    frames += drain(decoder)
    assert decoder.eof and not decoder.in_frame and decoder.buffered == 0
    return frames


@settings(max_examples=300, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
    threshold=st.integers(min_value=1, max_value=400),
)
def test_large_frames_in_their_own_buffers_decode_to_the_same_payloads(
    payloads: list[bytes], cuts: list[int], threshold: int
) -> None:
    """Whatever the threshold, and whether the body is received directly or
    through receive_data, the frames are the same as with one shared buffer."""
    stream = b"".join(encode_frame(p) for p in payloads)
    cuts = [c for c in cuts if c < len(stream)]
    direct = FrameDecoder(LIMIT, direct_threshold=threshold)
    assert feed_in_pieces(stream, cuts, decoder=direct) == payloads
    assert feed_like_the_server(stream, cuts, threshold) == payloads


def test_a_large_frame_is_returned_in_its_own_buffer_without_a_copy() -> None:
    decoder = FrameDecoder(LIMIT, direct_threshold=100)
    decoder.receive_data(encode_frame(b"a" * 300)[:50])
    assert decoder.next_frame() is NEED_DATA
    view = decoder.body_view()
    assert view is not None and len(view) == 254  # 300 - (50 - 4 header bytes)
    view[:254] = b"a" * 254
    decoder.body_received(254)
    frame = decoder.next_frame()
    assert isinstance(frame, bytearray) and frame == b"a" * 300
    assert decoder.body_view() is None and not decoder.in_frame


def test_with_hold_large_a_header_alone_allocates_nothing() -> None:
    """The length in a header is only a claim: the server reserves memory for
    it before the decoder allocates (allocate_body)."""
    decoder = FrameDecoder(LIMIT, direct_threshold=100, hold_large=True)
    decoder.receive_data(encode_frame(b"b" * 1000)[:10])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.body_needed == 1000 and decoder.body_view() is None
    assert decoder.buffered == 6 and decoder.in_frame
    decoder.allocate_body()
    assert decoder.body_needed is None
    view = decoder.body_view()
    assert view is not None and len(view) == 994
    with pytest.raises(LocalProtocolError):
        decoder.body_received(995)  # more than the frame holds
    with pytest.raises(LocalProtocolError):
        decoder.allocate_body()  # twice
    decoder.receive_data(b"")  # the peer hangs up inside the frame
    with pytest.raises(BadFrameError, match="closed inside a frame"):
        decoder.next_frame()


def test_small_frames_are_unaffected_by_the_threshold() -> None:
    decoder = FrameDecoder(LIMIT, direct_threshold=100, hold_large=True)
    decoder.receive_data(encode_frame(b"small") + encode_frame(b"x" * 99))
    assert decoder.body_needed is None
    assert drain(decoder) == [b"small", b"x" * 99]


def test_one_byte_at_a_time(rng: random.Random) -> None:
    payloads = [rng.randbytes(rng.randrange(0, 200)) for _ in range(20)]
    stream = b"".join(encode_frame(p) for p in payloads)
    assert feed_in_pieces(stream, list(range(len(stream)))) == payloads


def test_many_frames_in_one_piece_come_out_in_order() -> None:
    payloads = [bytes([i]) * i for i in range(50)]
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(b"".join(encode_frame(p) for p in payloads))
    assert drain(decoder) == payloads
    assert decoder.buffered == 0


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    assert feed_in_pieces(encode_frame(b"z" * LIMIT), [1, 4, 500]) == [b"z" * LIMIT]


def test_zero_length_frames_are_framed_like_any_other() -> None:
    """Framing passes an empty payload through; the codec is what rejects it."""
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(encode_frame(b"") + encode_frame(b"a") + encode_frame(b""))
    assert drain(decoder) == [b"", b"a", b""]
    assert not decoder.in_frame


# --- oversize: refused on the header ---------------------------------------------


def test_oversized_length_is_refused_as_soon_as_the_header_is_complete() -> None:
    decoder = FrameDecoder(LIMIT)
    header = (LIMIT + 1).to_bytes(4, "big")
    for byte in header[:-1]:
        decoder.receive_data(bytes([byte]))
        assert decoder.next_frame() is NEED_DATA
    decoder.receive_data(header[-1:])
    with pytest.raises(FrameTooLargeError, match=f"{LIMIT + 1} bytes exceeds the limit of {LIMIT}"):
        decoder.next_frame()
    assert decoder.buffered == 0  # nothing kept, nothing waited for
    with pytest.raises(FrameTooLargeError):  # sticky: the stream cannot be resynchronised
        decoder.next_frame()


def test_oversized_header_after_good_frames_still_delivers_those_first() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(encode_frame(b"ok") + b"\xff\xff\xff\xff" + b"body" * 100)
    assert decoder.next_frame() == b"ok"
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()
    assert decoder.buffered == 0


def test_the_largest_header_value_is_never_allocated() -> None:
    decoder = FrameDecoder(64 * 1024 * 1024)
    decoder.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(FrameTooLargeError):
        decoder.next_frame()
    assert decoder.buffered == 0


def test_wanted_is_a_read_size_hint_bounded_by_the_frame() -> None:
    decoder = FrameDecoder(LIMIT)
    assert decoder.wanted() == HEADER_SIZE
    decoder.receive_data(b"\x00\x00")
    assert decoder.wanted() == 2
    decoder.receive_data(b"\x00\x64")
    assert decoder.next_frame() is NEED_DATA
    assert decoder.wanted() == 100
    decoder.receive_data(b"x" * 40)
    assert decoder.next_frame() is NEED_DATA
    assert decoder.wanted() == 60


# --- end of stream ----------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05", b"\x00\x00\x00\x05abcd"],
    ids=["1-byte-header", "3-byte-header", "header-only", "body-short-by-one"],
)
def test_eof_inside_a_frame_is_a_bad_frame(partial: bytes) -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(partial)
    assert decoder.next_frame() is NEED_DATA
    assert decoder.in_frame  # the slowloris timer would be running
    decoder.receive_data(b"")
    with pytest.raises(BadFrameError, match="closed inside a frame"):
        decoder.next_frame()


def test_eof_at_a_boundary_is_clean_and_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder(LIMIT)
    decoder.receive_data(encode_frame(b"last"))
    decoder.receive_data(b"")
    assert decoder.next_frame() == b"last"  # frames before EOF are still delivered
    assert decoder.next_frame() is NEED_DATA
    assert decoder.eof
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"more")


def test_in_frame_tracks_partial_frames() -> None:
    decoder = FrameDecoder(LIMIT)
    assert not decoder.in_frame
    decoder.receive_data(b"\x00\x00\x00\x02a")
    assert decoder.next_frame() is NEED_DATA
    assert decoder.in_frame and decoder.buffered == 1
    decoder.receive_data(b"b")
    assert decoder.next_frame() == b"ab"
    assert not decoder.in_frame


# --- purity -------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["framing.py", "codec.py", "messages.py"])
def test_sans_io_modules_import_no_io_library(module: str) -> None:
    path = Path(sentinel_ipc.__file__).parent / module
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "time", "random", "sqlite3", "asyncio", "os"}
