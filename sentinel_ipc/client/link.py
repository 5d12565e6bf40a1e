"""One live connection to the daemon, shared by every call in flight.

Theory of operation
-------------------
Callers *register* an id, *send* their frame and *wait*. There is no reader
task of its own: whichever waiting caller finds nobody reading becomes the
*leader* and reads frames for everyone, handing each reply to the caller
registered under its id (replies may come in any order); the others
(*followers*) sleep on their own event. When the leader's own reply arrives
it leaves and passes the *baton* to one follower still waiting, which leads
next. A lone caller is therefore always the leader and reads its own reply
with no task switch in between, which is most of the client's cost budget
(a hand-off between tasks costs about as much as the whole breaker, retry
and id bookkeeping together).

Pushed ``event`` frames go to the subscription registered under the
subscribe id. While subscriptions exist an *idle reader* (a background task
of the connector) takes the leader role whenever no caller holds it, so
events are read even when nobody calls.

Per-call deadlines do not use a cancel scope per call (one costs as much as
the rest of the client's work): a :class:`~sentinel_ipc.client.timer.Timer`
marks the expired call and wakes it. A follower is woken through its event;
a leader blocked in ``recv`` (or a sender blocked because the daemon stopped
reading) is *kicked* with ``trio.lowlevel.notify_closing``, which wakes the
socket's waiters without closing it; a kicked task that was not the one
expiring simply resumes.

A link dies exactly once (:meth:`Link.fail`): EOF, a reset, a broken send, a
frame interrupted half-way. Every waiter is then woken with the cause, and the
connector decides, per request, whether to re-send it on a new link.

Bounds: at most ``max_in_flight`` calls on one link (the daemon's announced
limit), so the client queues locally instead of collecting ``busy`` replies;
frames over the daemon's ``max_frame_bytes`` are refused before sending.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Sequence

import msgspec
import trio

from ..codec import encode_framed, next_reply
from ..errors import (
    LocalProtocolError,
    RequestTimeoutError,
    SentinelError,
    TransportError,
)
from ..framing import HEADER_SIZE, FrameDecoder
from ..logs import log_event
from ..messages import DEFAULT_MAX_FRAME_BYTES, Error, Event, Reply, Welcome
from ..transport import read_nowait
from .errors import error_from_reply

EventSink = Callable[[Event], None]

_RECV = 256 * 1024


class _Kicked(Exception):
    """The socket's waiters were woken by a timer, not by the socket."""


class Pending:
    """One call waiting for its reply: settled once, by a reply, the link's
    death or its deadline."""

    __slots__ = (
        "deadline",
        "error",
        "event",
        "link",
        "on_reply",
        "reply",
        "sent",
        "timed_out",
        "timer_key",
        "waiting",
    )

    def __init__(self, link: Link, deadline: float = float("inf")) -> None:
        self.link = link
        self.deadline = deadline
        self.event = trio.Event()
        self.reply: Reply | None = None
        self.error: SentinelError | None = None
        self.timed_out = False
        #: The whole request frame reached the socket: a loss now leaves a
        #: non-idempotent request's outcome unknown.
        self.sent = False
        self.waiting = False  # a follower asleep on ``event``
        self.timer_key = -1
        #: Run as the reply is matched, before any later frame is read (a
        #: renewed subscription announces itself before its events).
        self.on_reply: Callable[[Reply], None] | None = None

    @property
    def done(self) -> bool:
        return self.reply is not None or self.error is not None

    def expire(self) -> None:
        """Called by the timer at ``deadline``."""
        if self.done or self.timed_out:
            return
        self.timed_out = True
        link = self.link
        if link.leader is self or not self.sent:
            link.kick()  # blocked in recv or send: wake the socket's waiters
        else:
            self.event.set()


class Link:
    """A connected, greeted socket plus the table of calls waiting on it."""

    def __init__(self, sock: trio.socket.SocketType, generation: int) -> None:
        self.sock = sock
        self.generation = generation
        self.welcome: Welcome | None = None
        self.max_frame_bytes = DEFAULT_MAX_FRAME_BYTES
        self.max_in_flight = 64
        self.pending: dict[int, Pending] = {}
        #: subscribe id -> sink for the ``event`` frames pushed under that id.
        self.event_routes: dict[int, EventSink] = {}
        self.closed = False
        self.cause: SentinelError | None = None
        self.closed_event = trio.Event()
        self.leader: Pending | None = None
        self.idle_reader: Pending | None = None
        self.in_flight = 0
        self._slot_waiters = trio.lowlevel.ParkingLot()
        self._sending = False
        self._send_waiters = trio.lowlevel.ParkingLot()
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._server_error: Error | None = None
        self._kicks = 0
        # The same descriptor as a plain socket, for the non-blocking peeks
        # (detached, never closed, before the trio socket closes).
        self._raw = socket.socket(fileno=sock.fileno())

    # --- setup ------------------------------------------------------------------

    async def handshake(self, hello: msgspec.Struct) -> Reply:
        """Send ``hello`` and read the one reply (before anything else is in flight)."""
        await self.send(encode_framed(hello))
        return await self._receive()

    def adopt(self, welcome: Welcome) -> None:
        self.welcome = welcome
        limits = welcome.limits
        self.max_frame_bytes = min(welcome.max_frame_bytes, limits.max_frame_bytes)
        self.max_in_flight = max(1, limits.max_in_flight_per_connection)

    # --- calls ---------------------------------------------------------------------

    async def wait_for_slot(self) -> None:
        """Wait for room under the daemon's in-flight limit (only when it is full)."""
        while self.in_flight >= self.max_in_flight:
            if self.closed:
                raise self.lost()
            await self._slot_waiters.park()

    def release_slot(self) -> None:
        self.in_flight -= 1
        if self._slot_waiters:
            self._slot_waiters.unpark()

    def register(self, request_id: int, deadline: float = float("inf")) -> Pending:
        if self.closed:
            raise self.lost()
        pending = Pending(self, deadline)
        self.pending[request_id] = pending
        return pending

    def unregister(self, request_id: int) -> None:
        self.pending.pop(request_id, None)

    def encode(self, message: msgspec.Struct) -> bytes:
        frame = encode_framed(message)
        if len(frame) - HEADER_SIZE > self.max_frame_bytes:
            raise LocalProtocolError(
                f"refusing to send a {len(frame) - HEADER_SIZE}-byte frame: the daemon's "
                f"limit is {self.max_frame_bytes} bytes (stream large scans instead)"
            )
        return frame

    def peer_closed(self) -> bool:
        """True when the daemon already hung up (EOF waiting unread), checked
        without blocking, so a non-idempotent request is not sent into a dead
        connection (where its outcome would be unknown for nothing)."""
        if self.closed:
            return True
        try:
            peek = self._raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return peek == b""

    def read_nowait(self) -> None:
        """Dispatch whatever replies have already arrived, without blocking.

        For a task that is busy sending (a streamed scan) while nobody leads
        the reads: an early ``error`` for its stream must stop it.
        """
        if self.leader is not None or self.closed:
            return
        while True:
            broken = self._dispatch_buffered()
            if broken is not None:
                self.fail(broken)
                return
            try:
                data = self._raw.recv(_RECV, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(TransportError(f"receive failed: {exc.strerror or exc}"))
                return
            if not data:
                self.fail(TransportError("the daemon closed the connection"))
                return
            self._decoder.receive_data(data)

    def _dispatch_buffered(self) -> SentinelError | None:
        """Hand every complete reply already buffered to its caller; the
        protocol error that ends the stream, if one comes instead."""
        while True:
            try:
                reply = next_reply(self._decoder)
            except SentinelError as exc:
                return exc
            if reply is None:
                return None
            self._dispatch(reply)

    async def send(
        self, frame: bytes, fds: Sequence[int] = (), pending: Pending | None = None
    ) -> None:
        """Write one whole frame (``fds`` travel in the same ``sendmsg``).

        Raises :class:`TransportError`, or :class:`RequestTimeoutError` when
        ``pending`` expired while the daemon was not reading. A frame cut off
        half-way kills the link: the byte stream is no longer at a boundary.
        """
        if self.closed:
            raise self.lost()
        while self._sending:
            await self._send_waiters.park()
            if self.closed:
                raise self.lost()
        if pending is not None and pending.timed_out:
            raise RequestTimeoutError("no turn to send in time", retryable=False)
        self._sending = True
        sock = self.sock
        view = memoryview(frame)
        offset = 0
        try:
            while offset < len(view):
                try:
                    if fds and offset == 0:
                        ancillary = array.array("i", fds).tobytes()
                        offset = await sock.sendmsg(
                            [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ancillary)]
                        )
                    else:
                        offset += await sock.send(view[offset:])
                except trio.ClosedResourceError:
                    if self.closed:
                        raise
                    if pending is not None and pending.timed_out:
                        raise RequestTimeoutError(
                            "the daemon stopped reading (send timed out)", retryable=False
                        ) from None
                    continue  # kicked for another call's deadline: go on
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if self.cause is not None:
                raise self.cause from exc
            error = self._refusal()
            if error is None:
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                error = TransportError(f"send failed: {detail or type(exc).__name__}")
            error.__cause__ = exc
            self.fail(error)
            raise error from exc
        except BaseException:
            if 0 < offset < len(view):
                self.fail(TransportError("a send was interrupted half-way through a frame"))
            raise
        finally:
            self._sending = False
            if self._send_waiters:
                self._send_waiters.unpark()

    def _refusal(self) -> SentinelError | None:
        """After a failed send: the daemon's reason, if it gave one before it
        hung up.

        A daemon refusing a connection (over ``max_connections``, draining,
        another user) writes an ``error`` with id 0 and closes at once; a hello
        sent after that gets EPIPE. The refusal, still unread, is the useful
        answer: a retryable ``busy`` with its ``retry_after``, not a broken pipe.
        Replies that arrived with it reach their callers.
        """
        read_nowait(self.sock.fileno(), self._decoder)
        self._dispatch_buffered()  # the link dies next anyway: a broken frame is moot
        hint = self._server_error
        return None if hint is None else error_from_reply(hint)

    async def wait(self, pending: Pending) -> Reply:
        """The reply for ``pending`` (leading the reads if nobody does).

        Raises the typed error of an ``error`` reply, the link's cause if it
        died first (a :class:`SentinelError`), or a non-retryable
        :class:`RequestTimeoutError` at the deadline.
        """
        try:
            while True:
                reply = pending.reply
                if reply is not None:
                    if type(reply) is Error:
                        raise error_from_reply(reply)
                    return reply
                if pending.error is not None:
                    raise pending.error
                if pending.timed_out:
                    raise RequestTimeoutError("no reply in time", retryable=False)
                if self.leader is None:
                    self.leader = pending
                    try:
                        await self._lead(pending)
                    finally:
                        self.leader = None
                else:
                    pending.waiting = True
                    try:
                        await pending.event.wait()
                    finally:
                        pending.waiting = False
                    if not pending.done and not pending.timed_out:
                        pending.event = trio.Event()  # woken to lead: re-arm
        finally:
            # However this caller leaves (its reply, its deadline, a cancel),
            # the reads must go on for the others: hand the baton on. A
            # follower woken to lead that leaves instead passes it too.
            if self.leader is None:
                self._pass_baton()

    async def _lead(self, pending: Pending) -> None:
        while not pending.done and not pending.timed_out and not self.closed:
            try:
                reply = await self._receive()
            except _Kicked:
                continue
            except SentinelError as exc:
                self.fail(self._describe(exc))
                return
            self._dispatch(reply)

    def _dispatch(self, reply: Reply) -> None:
        if type(reply) is Event:
            sink = self.event_routes.get(reply.id)
            if sink is not None:
                sink(reply)
            return
        pending = self.pending.pop(reply.id, None)
        if pending is not None:
            if not pending.done:
                pending.reply = reply
                pending.event.set()
                if pending.on_reply is not None:
                    pending.on_reply(reply)
        elif reply.id == 0 and type(reply) is Error:
            # The daemon could not read one of our frames; it closes next.
            self._server_error = reply
            log_event("client_server_error", logging.WARNING, code=reply.code,
                      message=reply.message)
        # Any other id: a late reply for a call that gave up. Dropped.

    def _pass_baton(self) -> None:
        if self.closed:
            return
        for waiter in self.pending.values():
            if waiter.waiting and not waiter.event.is_set():
                waiter.event.set()
                return
        idle = self.idle_reader
        if idle is not None and idle.waiting and not idle.event.is_set():
            idle.event.set()

    async def read_while_idle(self) -> None:
        """Lead the reads whenever no caller does, until the link dies (for
        subscriptions: events arrive when nobody calls)."""
        me = Pending(self)
        self.idle_reader = me
        try:
            while not self.closed:
                if self.leader is None:
                    self.leader = me
                    try:
                        await self._lead(me)
                    finally:
                        self.leader = None
                        self._pass_baton()
                else:
                    me.waiting = True
                    try:
                        await me.event.wait()
                    finally:
                        me.waiting = False
                    me.event = trio.Event()
        finally:
            if self.idle_reader is me:
                self.idle_reader = None

    async def _receive(self) -> Reply:
        decoder = self._decoder
        while True:
            reply = next_reply(decoder)
            if reply is not None:
                return reply
            try:
                data = await self.sock.recv(_RECV)
            except trio.ClosedResourceError:
                if self.closed:
                    raise self.lost() from None
                raise _Kicked from None
            except OSError as exc:
                kind = errno.errorcode.get(exc.errno or 0, "")
                raise TransportError(f"receive failed: {kind} {exc.strerror or exc}") from exc
            if not data:
                if decoder.in_frame:
                    raise TransportError("the daemon closed the connection inside a reply")
                raise TransportError("the daemon closed the connection")
            decoder.receive_data(data)

    def kick(self) -> None:
        """Wake every task blocked on this socket (they re-check their state)."""
        if not self.closed:
            self._kicks += 1
            trio.lowlevel.notify_closing(self.sock)

    def _describe(self, exc: SentinelError) -> SentinelError:
        hint = self._server_error
        if hint is None or not isinstance(exc, TransportError):
            return exc
        error = TransportError(
            f"the daemon closed the connection after an error: {hint.code}: {hint.message}"
        )
        error.__cause__ = exc
        return error

    # --- death -------------------------------------------------------------------

    def lost(self) -> SentinelError:
        return self.cause or TransportError("the connection is closed")

    def fail(self, cause: SentinelError) -> None:
        """Close the link (once) and wake every waiter with ``cause``."""
        if self.closed:
            return
        self.closed = True
        self.cause = cause
        for pending in self.pending.values():
            if not pending.done:
                pending.error = cause
                pending.event.set()
        self.pending.clear()
        if self.idle_reader is not None:
            self.idle_reader.event.set()
        self._slot_waiters.unpark_all()
        self._send_waiters.unpark_all()
        self._raw.detach()
        with contextlib.suppress(OSError):
            self.sock.close()  # also wakes a leader blocked in recv
        self.closed_event.set()


__all__ = ["EventSink", "Link", "Pending"]
