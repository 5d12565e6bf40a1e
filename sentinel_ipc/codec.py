"""Message <-> payload codec: MessagePack via reusable typed msgspec codecs.

Decoding a request distinguishes the three ways a frame can be bad, because
the server answers each differently (PROTOCOL.md, "Errors"):

* the payload is not MessagePack, or not a map: :class:`BadFrameError`; the
  server replies with id 0 and closes, since it cannot tell where the peer's
  stream is;
* the map has an unknown ``type``: :class:`UnknownMessageTypeError`;
* a field is missing or has the wrong type: :class:`InvalidMessageError`,
  whose message names the field (``at `$.id```).

The last two carry the request ``id`` when one could be read, so the reply
reaches the right caller and the connection stays usable.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import BadFrameError, InvalidMessageError, ProtocolError, UnknownMessageTypeError
from .framing import HEADER, NEED_DATA, FrameDecoder
from .messages import REPLY_TAGS, REQUEST_TAGS, Reply, Request


class _Envelope(msgspec.Struct):
    """The two fields every message has, read leniently for error replies."""

    type: Any = None
    id: Any = None


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode(message: msgspec.Struct) -> bytes:
    """The MessagePack payload of ``message`` (no length prefix)."""
    return _encoder.encode(message)


def encode_framed(message: msgspec.Struct) -> bytes:
    """``message`` as a complete frame: length prefix + payload."""
    # Encode, then concatenate: about twice as fast as encode_into() a
    # bytearray plus bytes(), for small replies and large ones alike.
    payload = _encoder.encode(message)
    return HEADER.pack(len(payload)) + payload


class DecodeFailure(Exception):
    """Carries the typed protocol error and the request id, when one was readable.

    ``fatal`` is true when the stream cannot be trusted any more (the payload
    was not a message map at all): the server replies with id 0 and closes.
    """

    def __init__(self, error: ProtocolError, request_id: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.request_id = request_id

    @property
    def fatal(self) -> bool:
        return isinstance(self.error, BadFrameError)


def _undecodable(exc: RecursionError | UnicodeDecodeError) -> DecodeFailure:
    """What msgspec raises besides its own errors: RecursionError for values nested
    deeper than Python's recursion limit (a 2 KB frame of nested arrays), and
    UnicodeDecodeError for a string that is not UTF-8. Neither may escape."""
    if isinstance(exc, RecursionError):
        return DecodeFailure(BadFrameError("undecodable frame: values nested too deeply"), 0)
    return DecodeFailure(BadFrameError(f"undecodable frame: a string is not UTF-8 ({exc})"), 0)


def _classify(
    payload: bytes | bytearray, exc: msgspec.ValidationError, tags: frozenset[str]
) -> DecodeFailure:
    try:
        env = _envelope_decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        # Valid MessagePack, but not a map: nothing to reply to by id.
        return DecodeFailure(BadFrameError(f"frame is not a message map: {exc}"), 0)
    except (RecursionError, UnicodeDecodeError) as other:
        return _undecodable(other)
    request_id = env.id if type(env.id) is int and 0 <= env.id < 2**63 else 0
    if not isinstance(env.type, str):
        error: ProtocolError = InvalidMessageError(
            "message has no string `type` field - at `$.type`"
        )
    elif env.type not in tags:
        error = UnknownMessageTypeError(f"unknown message type {env.type!r} - at `$.type`")
    else:
        error = InvalidMessageError(f"invalid {env.type!r} message: {exc}")
    return DecodeFailure(error, request_id)


def decode_request(payload: bytes | bytearray) -> Request:
    """Decode a client's payload. Raises :class:`DecodeFailure` (never anything else)."""
    try:
        request: Request = _request_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _classify(payload, exc, REQUEST_TAGS) from exc
    except msgspec.DecodeError as exc:
        raise DecodeFailure(BadFrameError(f"undecodable frame: {exc}"), 0) from exc
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _undecodable(exc) from exc
    return request


def decode_reply(payload: bytes | bytearray) -> Reply:
    """Decode a server's payload. Raises :class:`DecodeFailure` (never anything else)."""
    try:
        reply: Reply = _reply_decoder.decode(payload)
    except msgspec.ValidationError as exc:
        raise _classify(payload, exc, REPLY_TAGS) from exc
    except msgspec.DecodeError as exc:
        raise DecodeFailure(BadFrameError(f"undecodable frame: {exc}"), 0) from exc
    except (RecursionError, UnicodeDecodeError) as exc:
        raise _undecodable(exc) from exc
    return reply


def next_reply(decoder: FrameDecoder) -> Reply | None:
    """The next complete reply buffered in ``decoder``, or None until more bytes come.

    Raises the typed :class:`~sentinel_ipc.errors.ProtocolError` for a frame
    that is too large, truncated or undecodable: a client's stream is then lost.
    """
    frame = decoder.next_frame()
    if frame is NEED_DATA:
        return None
    assert isinstance(frame, (bytes, bytearray))
    try:
        return decode_reply(frame)
    except DecodeFailure as failure:
        raise failure.error from failure
