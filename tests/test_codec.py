"""The codec: messages <-> MessagePack payloads, and how bad payloads are classified."""

from __future__ import annotations

import itertools
import random
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import inspect as mi

from sentinel_ipc.codec import DecodeFailure, decode_reply, decode_request, encode, encode_framed
from sentinel_ipc.errors import (
    BadFrameError,
    ErrorCode,
    InvalidMessageError,
    UnknownMessageTypeError,
)
from sentinel_ipc.framing import NEED_DATA, FrameDecoder, encode_frame
from sentinel_ipc.messages import (
    REPLY_TAGS,
    REPLY_TYPES,
    REQUEST_TAGS,
    REQUEST_TYPES,
    Error,
    Hello,
    Ping,
    Pong,
    Scan,
    ScanResult,
    type_tag,
)

# --- a hypothesis strategy for any message, built from the msgspec type info ----------

_any_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def strategy_for(t: mi.Type) -> st.SearchStrategy[Any]:
    if isinstance(t, mi.IntType):
        return st.integers(-(2**63), 2**64 - 1)
    if isinstance(t, mi.FloatType):
        return st.floats(allow_nan=False)
    if isinstance(t, mi.StrType):
        return st.text(max_size=20)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=64)
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.AnyType):
        return _any_value
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.ListType):
        return st.lists(strategy_for(t.item_type), max_size=3)
    if isinstance(t, mi.DictType):
        return st.dictionaries(strategy_for(t.key_type), strategy_for(t.value_type), max_size=3)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(strategy_for(u) for u in t.types))
    if isinstance(t, mi.StructType):
        fields = {f.name: strategy_for(f.type) for f in t.fields}
        return st.fixed_dictionaries(fields).map(lambda kw: t.cls(**kw))
    raise TypeError(f"no strategy for {t!r}")


def message_strategy(types: tuple[type[Any], ...]) -> st.SearchStrategy[Any]:
    return st.one_of(*(strategy_for(mi.type_info(cls)) for cls in types))


requests = message_strategy(REQUEST_TYPES)
replies = message_strategy(REPLY_TYPES)


# --- round trips ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(message=requests)
def test_any_request_round_trips(message: Any) -> None:
    assert decode_request(encode(message)) == message


@settings(max_examples=300, deadline=None)
@given(message=replies)
def test_any_reply_round_trips(message: Any) -> None:
    assert decode_reply(encode(message)) == message


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(requests, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=25),
)
def test_any_message_sequence_split_anywhere_decodes_to_the_same_messages(
    messages: list[Any], cuts: list[int]
) -> None:
    stream = b"".join(encode_framed(m) for m in messages)
    decoder = FrameDecoder(1 << 20)
    decoded: list[Any] = []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    for start, end in itertools.pairwise(bounds):
        decoder.receive_data(stream[start:end])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, bytes)
            decoded.append(decode_request(frame))
    assert decoded == messages
    assert not decoder.in_frame


def test_encode_framed_is_encode_frame_of_encode(rng: random.Random) -> None:
    for _ in range(50):
        message = Scan(id=rng.randrange(2**63), data=rng.randbytes(rng.randrange(300)))
        assert encode_framed(message) == encode_frame(encode(message))


def test_every_message_is_a_map_with_type_and_id_fields() -> None:
    """What every peer relies on: a string `type` tag and an integer `id` in each map."""
    for cls in (*REQUEST_TYPES, *REPLY_TYPES):
        fields = {f.name: f for f in mi.type_info(cls).fields}  # type: ignore[attr-defined]
        assert isinstance(fields["id"].type, mi.IntType) and fields["id"].required
        assert mi.type_info(cls).tag_field == "type"  # type: ignore[attr-defined]
    assert REQUEST_TAGS.isdisjoint(REPLY_TAGS)


# --- classification of bad payloads ----------------------------------------------------


def _failure(payload: bytes, decode: Any = decode_request) -> DecodeFailure:
    with pytest.raises(DecodeFailure) as info:
        decode(payload)
    return info.value


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x81",
        msgspec.msgpack.encode([1, 2]),
        msgspec.msgpack.encode(3),
        msgspec.msgpack.encode({"type": "ping", "id": 1}) + b"\x90",
    ],
    ids=["empty", "never-used-byte", "truncated-map", "array", "int", "trailing"],
)
def test_a_payload_that_is_not_one_message_map_is_fatal_with_id_0(payload: bytes) -> None:
    failure = _failure(payload)
    assert isinstance(failure.error, BadFrameError)
    assert failure.error.code == ErrorCode.BAD_FRAME
    assert failure.fatal and failure.request_id == 0
    assert not failure.error.retryable


@pytest.mark.parametrize(
    ("fields", "error", "request_id", "names"),
    [
        ({"type": "nope", "id": 5}, UnknownMessageTypeError, 5, "'nope'"),
        ({"type": "welcome", "id": 6}, UnknownMessageTypeError, 6, "'welcome'"),
        ({"id": 7}, InvalidMessageError, 7, "$.type"),
        ({"type": None, "id": 8}, InvalidMessageError, 8, "$.type"),
        ({"type": "hello", "id": 9, "protocol_version": 1}, InvalidMessageError, 9, "client"),
        ({"type": "threats", "id": 10, "limit": "all"}, InvalidMessageError, 10, "$.limit"),
        ({"type": "health", "id": 11, "probe": "deep"}, InvalidMessageError, 11, "$.probe"),
        ({"type": "ping", "id": 1.5}, InvalidMessageError, 0, "$.id"),
        ({"type": "ping", "id": True}, InvalidMessageError, 0, "$.id"),
        ({"type": "ping"}, InvalidMessageError, 0, "`id`"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_wrong_message_names_the_field_and_keeps_the_id(
    fields: dict[str, Any], error: type[Exception], request_id: int, names: str
) -> None:
    failure = _failure(msgspec.msgpack.encode(fields))
    assert type(failure.error) is error
    assert not failure.fatal
    assert failure.request_id == request_id
    assert names in failure.error.message


@pytest.mark.parametrize("bad_id", [-1, 2**63, 2**64 - 1])
def test_an_id_that_cannot_be_echoed_becomes_0(bad_id: int) -> None:
    """Error replies echo only ids in 0..2**63-1; others are answered with id 0."""
    failure = _failure(msgspec.msgpack.encode({"type": "nope", "id": bad_id}))
    assert failure.request_id == 0


def test_replies_and_requests_are_separate_unions() -> None:
    assert decode_reply(encode(Pong(id=3))) == Pong(id=3)
    failure = _failure(encode(Ping(id=3)), decode_reply)
    assert isinstance(failure.error, UnknownMessageTypeError) and failure.request_id == 3
    failure = _failure(encode(ScanResult(id=4, action="allow", sha256="", size=0)))
    assert isinstance(failure.error, UnknownMessageTypeError) and failure.request_id == 4


def test_unknown_fields_are_ignored_and_defaults_filled() -> None:
    payload = msgspec.msgpack.encode(
        {"type": "hello", "id": 2, "client": "c", "protocol_version": 1, "future": {"x": 1}}
    )
    assert decode_request(payload) == Hello(id=2, client="c", protocol_version=1)
    error = decode_reply(
        msgspec.msgpack.encode({"type": "error", "id": 1, "code": "x", "message": ""})
    )
    assert error == Error(id=1, code="x", message="", retryable=False, retry_after_ms=None)


@settings(max_examples=400, deadline=None)
@given(payload=st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_decode_failure_only(payload: bytes) -> None:
    try:
        decoded = decode_request(payload)
    except DecodeFailure as failure:
        assert failure.error.code in {
            ErrorCode.BAD_FRAME,
            ErrorCode.INVALID_MESSAGE,
            ErrorCode.UNKNOWN_TYPE,
        }
        assert failure.fatal == (failure.error.code == ErrorCode.BAD_FRAME)
    else:
        assert type_tag(type(decoded)) in REQUEST_TAGS


@settings(max_examples=400, deadline=None)
@given(
    tag=st.sampled_from(sorted(REQUEST_TAGS)) | st.text(max_size=6),
    request_id=st.integers(0, 2**63 - 1),
    extra=st.dictionaries(
        st.sampled_from(
            ["data", "client", "action", "limit", "topics", "probe", "policy_id", "name", "service"]
        ),
        _any_value | st.binary(max_size=4),
        max_size=3,
    ),
)
def test_arbitrary_maps_with_a_readable_id_are_answered_with_that_id(
    tag: str, request_id: int, extra: dict[str, Any]
) -> None:
    payload = msgspec.msgpack.encode({"type": tag, "id": request_id, **extra})
    try:
        decoded = decode_request(payload)
    except DecodeFailure as failure:
        assert not failure.fatal
        assert failure.request_id == request_id
        if tag not in REQUEST_TAGS:
            assert failure.error.code == ErrorCode.UNKNOWN_TYPE
        else:
            assert failure.error.code == ErrorCode.INVALID_MESSAGE
            assert "- at `$" in failure.error.message or "missing required" in (
                failure.error.message
            )
    else:
        assert decoded.id == request_id
