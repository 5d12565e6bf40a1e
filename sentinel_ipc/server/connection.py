"""One client connection: read frames, run requests concurrently, write replies.

Theory of operation
-------------------
The read loop owns the socket's receive side. It feeds bytes (and any
SCM_RIGHTS descriptors, tagged with their stream offset) into a
:class:`~sentinel_ipc.framing.FrameDecoder`, decodes each frame into a
request and either runs it inline (``ordered`` routes) or starts it as a
task in the connection's nursery. Replies from any task go out through
:meth:`Connection.send`: one non-blocking write when nobody is mid-write,
else send_all serialised by a lock, so frames never interleave.
Replies produced inside the read loop (inline requests, decode errors) are
corked: gathered and written with one send when the loop has no complete
frame left (or ``_CORK_LIMIT`` bytes are waiting), so a pipelined burst of
pings costs one write instead of one per reply.

Bounds, each answered with a typed ``error`` rather than a queue:

* requests in flight on this connection / on the whole server -> ``busy``;
* a frame that has started must complete within ``frame_read_timeout``
  (slowloris) -> ``timeout`` and close;
* a reply the peer does not take within ``write_timeout`` -> close (the peer
  is not reading; its requests' slots come back);
* an oversized length header -> ``frame_too_large`` and close, body unread;
* a reply whose payload would pass ``max_frame_bytes`` (one the client must
  refuse, and lose the connection with it) is never written: the request gets
  ``reply_too_large`` instead and the connection stays usable; an oversized
  pushed event becomes an ``events_dropped`` notice (see :meth:`Connection._checked`);
* an undecodable body -> ``bad_frame`` with id 0 and close (the stream is
  no longer trustworthy); a decodable but wrong message -> ``invalid_message``
  / ``unknown_type`` with the request's id, and the connection stays usable;
* descriptors: at most ``_MAX_PENDING_FDS`` held; a descriptor not claimed by
  the frame it arrived with is closed;
* a peer refused with ``busy`` or ``rate_limited`` that sends another refused
  request before the ``retry_after`` it was given is not read from for that
  long (at most ``_MAX_THROTTLE``): its pipelined flood waits in its own socket
  buffer instead of costing the daemon a decode and a reply per frame.

A peer that hangs up, even mid-frame, ends only its own connection.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import socket
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ..codec import DecodeFailure, decode_request, encode_framed
from ..errors import (
    BadFrameError,
    BusyError,
    ErrorCode,
    FrameTooLargeError,
    ReplyTooLargeError,
    RequestTimeoutError,
    SentinelError,
    ShuttingDownError,
    UnknownMessageTypeError,
)
from ..framing import HEADER_SIZE, NEED_DATA, FrameDecoder
from ..logs import log_event
from ..messages import Error, Event, Reply, type_tag
from ..paging import PAGING_ADVICE
from .dispatch import Dispatcher, RequestContext, Route, check_admin
from .peer import PeerCredentials, is_admin
from .usage import UidUsage

if TYPE_CHECKING:
    from .server import Server

_MAX_PENDING_FDS = 16
_RECV_MIN = 64 * 1024
#: Frames at least this long are received into a buffer of their own (no copies)
#: whose memory is first reserved from the server's receive budget.
_DIRECT_FRAME = 256 * 1024
_RECV_MAX = 1024 * 1024
_ANCBUF = socket.CMSG_SPACE(_MAX_PENDING_FDS * 4)
_CORK_LIMIT = 64 * 1024
#: Longest a flooding peer's reads are paused at a time.
_MAX_THROTTLE = 1.0
#: Refusals that tell the peer when to come back (``retry_after``).
_TOLD_TO_WAIT = frozenset({ErrorCode.BUSY, ErrorCode.RATE_LIMITED})


def error_reply(request_id: int, exc: SentinelError) -> Error:
    return Error(
        id=request_id,
        code=exc.code,
        message=exc.message,
        retryable=exc.retryable,
        retry_after_ms=exc.retry_after_ms,
    )


class Connection:
    """Server side of one accepted socket."""

    def __init__(
        self,
        server: Server,
        sock: trio.socket.SocketType,
        peer: PeerCredentials,
        conn_id: int,
        usage: UidUsage | None = None,
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.conn_id = conn_id
        #: The peer uid's share of the server's bounds (shared by its connections).
        self.usage = usage if usage is not None else UidUsage(peer.uid)
        self.is_admin = is_admin(peer, frozenset(server.config.admin_uids))
        #: The largest payload this connection sends or accepts (``[server]``).
        self.max_frame_bytes = server.config.max_frame_bytes
        self.protocol_version: int | None = None
        self.in_flight = 0
        #: Per-connection state subsystems attach (scan streams, subscriptions...).
        self.state: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self._send_lock = trio.Lock()
        self._stream = trio.SocketStream(sock)
        # Large frames: a body buffer of their own, received into directly,
        # allocated only once the server's receive budget has room for it.
        self._decoder = FrameDecoder(
            server.config.max_frame_bytes, direct_threshold=_DIRECT_FRAME, hold_large=True
        )
        self._reserved = 0  # bytes of the receive budget held by the frame in progress
        self._received = 0  # stream offset of the next byte to arrive
        self._frame_start = 0  # stream offset where the next frame starts
        self._fds: deque[tuple[int, int]] = deque()  # (stream offset, fd)
        self._closed = False
        #: True while the read loop waits for the first byte of a frame.
        self._idle = False
        #: When the frame in progress must be complete (slowloris bound); the
        #: timer covers the whole frame, so dribbling bytes does not extend it.
        self._frame_deadline: float | None = None
        #: Inline replies not yet written (see "corked" in the module docstring).
        self._corked = bytearray()
        #: No reads before this trio time (see :meth:`throttle`); 0.0: not throttled.
        self._throttle_until = 0.0
        #: The peer was told (busy, rate_limited) not to retry before this trio time.
        self._told_to_wait_until = 0.0

    # -- public API for handlers ---------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        return self.server.dispatcher

    async def send(self, message: msgspec.Struct) -> None:
        """Send one message; safe from any task. Raises trio.BrokenResourceError /
        trio.ClosedResourceError when the peer is gone.

        One over ``max_frame_bytes`` is not sent: see :meth:`_checked`."""
        frame = self._checked(message)
        if frame:
            await self._write(frame)

    def _checked(self, message: msgspec.Struct) -> bytes:
        """``message`` framed, or what goes out instead when its payload would pass
        ``max_frame_bytes`` (b"" for nothing).

        Why: the peer must refuse such a frame as soon as it reads the header,
        and then it can only close the connection, failing every request in
        flight on it; a retry asks for the same reply again. So a reply gets a
        :class:`ReplyTooLargeError` under its request's id instead (not
        retryable; the message names the size, the limit and the way out), and
        a pushed event, which no request waits for, becomes an
        ``events_dropped`` notice of one. Either is logged once.
        """
        frame = encode_framed(message)
        size = len(frame) - HEADER_SIZE
        if size <= self.max_frame_bytes:
            return frame
        tag = type_tag(type(message))
        request_id: int = getattr(message, "id", 0)
        log_event(
            "reply_too_large", logging.WARNING, conn=self.conn_id, type=tag, id=request_id,
            bytes=size, limit=self.max_frame_bytes,
        )
        what = f"{size} bytes, over this daemon's max_frame_bytes of {self.max_frame_bytes}"
        if isinstance(message, Event):
            notice = Event(
                id=message.id, topic="events", kind="events_dropped", at=message.at, dropped=1,
                reason=f"a {message.kind!r} event was dropped: it would be {what}",
            )
            frame = encode_framed(notice)
            return frame if len(frame) - HEADER_SIZE <= self.max_frame_bytes else b""
        advice = PAGING_ADVICE.get(type(message), "")
        exc = ReplyTooLargeError(
            f"the {tag} reply would be {what}; "
            + (f"{advice}, or raise [server] max_frame_bytes" if advice
               else "raise [server] max_frame_bytes")
        )
        self.server.note_error(exc.code)
        return encode_framed(error_reply(request_id, exc))

    async def _write(self, frame: bytes) -> None:
        """``frame`` after any corked replies; frames never interleave.

        When nobody is mid-write, one non-blocking ``write`` goes first: a reply
        usually fits the socket buffer, and then the send lock and send_all's
        machinery (about a quarter of a ping's CPU) are skipped. Nothing awaits
        between the check and the write, so no other task can write in between.
        What the socket does not take is finished with send_all under the lock,
        which a later writer then waits for.
        """
        lock = self._send_lock
        if lock.locked():  # another task is mid-write: our turn comes after it
            await lock.acquire()
            frame = self._after_corked(frame)
        else:
            frame = self._after_corked(frame)
            if not frame:
                return
            sent = self._write_nowait(frame)
            if sent == len(frame):
                # Still one scheduler pass, as send_all would: other tasks run,
                # and the peer's next request has usually arrived when the read
                # loop asks for it (no EAGAIN, no epoll re-arm).
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            frame = frame[sent:]  # the socket buffer is full: finish under the lock
            lock.acquire_nowait()  # free: nothing awaited since locked() said so
        try:
            if frame:
                with trio.move_on_after(self.server.config.write_timeout) as scope:
                    await self._stream.send_all(frame)
                if scope.cancelled_caught:
                    self._abandon()
                    raise trio.BrokenResourceError("the peer does not read its replies")
        finally:
            lock.release()

    def _abandon(self) -> None:
        """End a connection whose peer has not taken a reply within ``write_timeout``.

        Its requests hold in-flight slots (the server-wide ones too) until their
        replies are written, so a peer that never reads would hold them for as
        long as it stays connected, and everyone else would get ``busy``.
        Closing the socket wakes every task blocked on it: waiting writers fail
        at once, the read loop returns, and the requests' slots come back.
        """
        if self._closed:
            return
        self._closed = True
        self.server.note_error(ErrorCode.TIMEOUT)
        log_event(
            "connection_abandoned", logging.WARNING, conn=self.conn_id, uid=self.peer.uid,
            pid=self.peer.pid, in_flight=self.in_flight,
            reason=f"a reply not read within {self.server.config.write_timeout:g} s",
        )
        with contextlib.suppress(OSError):
            self.sock.close()

    def _after_corked(self, frame: bytes) -> bytes:
        """``frame`` behind the corked inline replies, which go first (and are taken)."""
        if not self._corked:
            return frame
        frame = bytes(self._corked) + frame
        self._corked.clear()
        return frame

    def _write_nowait(self, data: bytes) -> int:
        """Bytes of ``data`` the socket took at once (0 when its buffer is full).

        Raises what ``send_all`` would: trio.ClosedResourceError once we closed
        the socket, trio.BrokenResourceError when the peer is gone."""
        fd = self.sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the connection is closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc

    def throttle(self, seconds: float) -> None:
        """Read nothing more from this peer for ``seconds`` (at most ``_MAX_THROTTLE``).

        For a peer that keeps sending refused requests (:meth:`_refused`): it would
        otherwise have the daemon read, decode and refuse every frame it sends, at
        the expense of every other client. Not reading makes its sends block instead.
        """
        until = trio.current_time() + min(seconds, _MAX_THROTTLE)
        if until > self._throttle_until:
            self._throttle_until = until

    def _refused(self, exc: SentinelError) -> None:
        """A request was refused with ``busy`` or ``rate_limited``: the peer was told
        to wait ``retry_after``. One that sends another refused request within that
        time is flooding (a pipelined burst, or a client that ignores the hint):
        its reads pause for the wait (:meth:`throttle`), so that its frames stop
        costing the daemon a decode and a refusal each at everyone else's expense.
        Its requests in flight and their replies are not held up; a single
        refusal, or requests that are served, pause nothing."""
        if exc.code not in _TOLD_TO_WAIT or not exc.retry_after:
            return
        now = trio.current_time()
        if now < self._told_to_wait_until:
            self.throttle(exc.retry_after)
        self._told_to_wait_until = max(self._told_to_wait_until, now + exc.retry_after)

    async def _wait_throttle(self) -> None:
        """Honour :meth:`throttle`: write what is corked, then read nothing until the
        time is up. A frame in progress gets the pause added to its deadline."""
        pause = self._throttle_until - trio.current_time()
        self._throttle_until = 0.0
        if pause <= 0 or self.server.draining:
            return
        await self._flush_quietly()
        if self._frame_deadline is not None:
            self._frame_deadline += pause
        await trio.sleep(pause)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the connection ends (release per-connection state)."""
        self._closers.append(callback)

    # -- main loop ---------------------------------------------------------------

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self._read_loop(nursery)
                # Peer closed its side or we decided to close: let in-flight
                # requests finish (bounded by shutdown cancellation), then close.
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            # A bug in serving one peer costs that peer its connection, never the
            # daemon: every other connection lives in the same nursery.
            log_event(
                "connection_failed",
                logging.ERROR,
                conn=self.conn_id,
                error="".join(traceback.format_exception(exc))[-4000:],
            )
        finally:
            self._closed = True
            self._give_back_budget()
            self._close_fds()
            for callback in reversed(self._closers):
                try:
                    callback()
                except Exception:
                    log_event("connection_close_callback_failed", logging.ERROR, conn=self.conn_id)
            with contextlib.suppress(OSError):
                self.sock.close()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        config = self.server.config
        while True:
            if self._throttle_until:
                await self._wait_throttle()
            try:
                frame = self._decoder.next_frame()
            except FrameTooLargeError as exc:
                self.server.note_error(exc.code)
                await self._fatal(0, exc)
                return
            except BadFrameError as exc:  # the peer hung up inside a frame
                log_event(
                    "connection_truncated", logging.INFO, conn=self.conn_id, reason=exc.message
                )
                await self._flush_quietly()
                return
            if frame is not NEED_DATA:
                self._frame_deadline = None
                try:
                    keep = await self._handle_frame(frame, nursery)
                finally:
                    del frame  # decoded: the request holds its own copy
                    self._give_back_budget()
                if not keep:
                    return
                continue
            if self._corked:  # no complete frame left: write the gathered replies
                await self._flush_quietly()
            if self._decoder.eof:
                return
            if self.server.draining and self.in_flight == 0:
                return
            try:
                if self._decoder.in_frame:
                    if self._frame_deadline is None:
                        self._frame_deadline = trio.current_time() + config.frame_read_timeout
                    with trio.move_on_at(self._frame_deadline) as scope:
                        await self._receive()
                    if scope.cancelled_caught:
                        self.server.note_error(ErrorCode.TIMEOUT)
                        await self._fatal(
                            0,
                            RequestTimeoutError(
                                f"frame not completed within {config.frame_read_timeout:g} s"
                            ),
                        )
                        return
                else:
                    # No cancel scope here: entering one costs about as much as
                    # the rest of a ping. wake_for_drain() uses notify_closing.
                    self._idle = True
                    try:
                        await self._receive()
                    except trio.ClosedResourceError:
                        return  # woken for drain with nothing in flight
                    finally:
                        self._idle = False
            except trio.ClosedResourceError:
                return  # abandoned (see _abandon) while waiting for bytes
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                    return
                raise

    async def _receive(self) -> None:
        decoder = self._decoder
        needed = decoder.body_needed
        if needed is not None:
            # Under the frame's read deadline: a frame that cannot get memory
            # in time ends like any frame not completed in time.
            await self.server.receive_budget.take(needed)
            self._reserved = needed
            decoder.allocate_body()
        view = decoder.body_view()
        if view is not None:
            count, ancdata, _flags, _addr = await self.sock.recvmsg_into([view], _ANCBUF)
            view.release()
            self._note_received(ancdata, count)
            if count:
                decoder.body_received(count)
            else:
                decoder.receive_data(b"")
            return
        if needed is not None:
            return  # the body was already buffered: the frame is complete
        size = min(max(decoder.wanted(), _RECV_MIN), _RECV_MAX)
        data, ancdata, _flags, _addr = await self.sock.recvmsg(size, _ANCBUF)
        self._note_received(ancdata, len(data))
        decoder.receive_data(data)

    def _give_back_budget(self) -> None:
        if self._reserved:
            self.server.receive_budget.give(self._reserved)
            self._reserved = 0

    def _note_received(self, ancdata: list[tuple[int, int, bytes]], count: int) -> None:
        """Advance the stream offset by ``count`` bytes just read, keeping the
        descriptors that came with them."""
        # The kernel may return bytes of earlier writes before the write that
        # carried the descriptors, but stops right after that write: so the
        # descriptors belong to the frame holding the *last* byte read.
        fd_offset = self._received + count - 1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
                for fd in fds:
                    if len(self._fds) >= _MAX_PENDING_FDS:
                        os.close(fd)
                    else:
                        self._fds.append((fd_offset, fd))
        self._received += count

    async def _handle_frame(self, payload: bytes | bytearray, nursery: trio.Nursery) -> bool:
        """Decode and start one request; False when the connection must close."""
        start = self._frame_start
        self._frame_start = end = start + HEADER_SIZE + len(payload)
        fds = self._claim_fds(start, end)
        try:
            request = decode_request(payload)
        except DecodeFailure as failure:
            self._close_list(fds)
            self.server.note_error(failure.error.code)
            if failure.fatal:
                await self._fatal(failure.request_id, failure.error)
                return False
            await self._send_quietly(error_reply(failure.request_id, failure.error), cork=True)
            return True
        route = self.dispatcher.route(type(request))
        if route is None:
            self._close_list(fds)
            exc = UnknownMessageTypeError(
                f"message type {type_tag(type(request))!r} is not served by this daemon"
            )
            await self._send_quietly(error_reply(request.id, exc), cork=True)
            return True
        ctx = RequestContext(peer=self.peer, is_admin=self.is_admin, connection=self, fds=fds)
        if route.ordered:
            await self._run(request, route, ctx)
            return True
        refusal = self._admission_refusal()
        if refusal is not None:
            self._close_list(fds)
            self.server.note_error(refusal.code)
            self._refused(refusal)
            await self._send_quietly(error_reply(request.id, refusal), cork=True)
            return True
        self.in_flight += 1
        self.server.in_flight += 1
        self.usage.in_flight += 1
        nursery.start_soon(self._run_counted, request, route, ctx)
        return True

    def _admission_refusal(self) -> SentinelError | None:
        config = self.server.config
        if self.server.draining:
            return ShuttingDownError("the daemon is shutting down", retry_after=1.0)
        if self.in_flight >= config.max_in_flight_per_connection:
            return BusyError(
                f"{self.in_flight} requests already in flight on this connection "
                f"(limit {config.max_in_flight_per_connection})",
                retry_after=0.05,
            )
        per_uid = self.server.in_flight_per_uid
        if per_uid is not None and self.usage.in_flight >= per_uid:
            return BusyError(
                f"uid {self.peer.uid} has {self.usage.in_flight} requests in flight "
                f"(limit per user {per_uid})",
                retry_after=0.1,
            )
        if self.server.in_flight >= config.max_in_flight_total:
            return BusyError(
                f"the daemon has {self.server.in_flight} requests in flight "
                f"(limit {config.max_in_flight_total})",
                retry_after=0.1,
            )
        return None

    async def _run_counted(self, request: Any, route: Route[Any], ctx: RequestContext) -> None:
        try:
            await self._run(request, route, ctx)
        finally:
            self.in_flight -= 1
            self.server.in_flight -= 1
            self.usage.in_flight -= 1
            self.server.request_finished()
            if self.in_flight == 0 and self.server.draining:
                self.wake_for_drain()

    async def _run(self, request: Any, route: Route[Any], ctx: RequestContext) -> None:
        reply: Reply | None
        try:
            if route.admin and not ctx.is_admin:
                # type_tag() walks msgspec type info (~90 us): only on refusal.
                what = type_tag(type(request))
                self.server.audit_refusal(self.peer, what)
                check_admin(route, ctx, what)
            reply = await route.handler(request, ctx)
        except SentinelError as exc:
            self.server.note_error(exc.code)
            self._refused(exc)
            reply = error_reply(request.id, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        except Exception as exc:
            self.server.note_error(ErrorCode.INTERNAL)
            log_event(
                "handler_failed",
                logging.ERROR,
                conn=self.conn_id,
                type=type_tag(type(request)),
                error=repr(exc),
            )
            reply = Error(
                id=request.id,
                code=ErrorCode.INTERNAL,
                message=f"internal error while handling {type_tag(type(request))}: {exc}",
                retryable=True,
            )
        finally:
            self._close_list(ctx.fds)
        if reply is not None:
            await self._send_quietly(reply, cork=route.ordered)

    async def send_error(self, request_id: int, exc: SentinelError) -> None:
        """An error reply no request is waiting on right now (a stream the scanner
        dropped), counted like any other; a peer that is gone is ignored."""
        self.server.note_error(exc.code)
        await self._send_quietly(error_reply(request_id, exc))

    async def _send_quietly(self, message: msgspec.Struct, *, cork: bool = False) -> None:
        """Send, ignoring a peer that is gone. ``cork``: only from the read loop's
        own task; the reply waits for the loop's next flush (or the next send)."""
        if cork:
            self._corked += self._checked(message)
            if len(self._corked) < _CORK_LIMIT:
                return
            await self._flush_quietly()
            return
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.send(message)

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._write(b"")

    async def _fatal(self, request_id: int, exc: SentinelError) -> None:
        reply = error_reply(request_id, exc)
        await self._send_quietly(reply)
        log_event("connection_protocol_error", logging.INFO, conn=self.conn_id, code=reply.code)

    def wake_for_drain(self) -> None:
        """Draining: end the read loop of an idle connection with nothing in flight.

        notify_closing() makes the idle receive raise ClosedResourceError; the
        loop returns and serve() closes the socket. A busy connection is left
        alone: it is called again when its last request finishes.
        """
        if self._idle and self.in_flight == 0:
            trio.lowlevel.notify_closing(self.sock)

    # -- descriptors ---------------------------------------------------------

    def _claim_fds(self, start: int, end: int) -> list[int]:
        claimed: list[int] = []
        while self._fds and self._fds[0][0] < end:
            offset, fd = self._fds.popleft()
            if offset >= start:
                claimed.append(fd)
            else:
                with contextlib.suppress(OSError):
                    os.close(fd)
        return claimed

    @staticmethod
    def _close_list(fds: list[int]) -> None:
        while fds:
            with contextlib.suppress(OSError):
                os.close(fds.pop())

    def _close_fds(self) -> None:
        while self._fds:
            _, fd = self._fds.popleft()
            with contextlib.suppress(OSError):
                os.close(fd)
