"""One live connection to the daemon, shared by every call in flight.

Theory of operation
-------------------
A :class:`Link` owns one socket. Callers *register* an id, *send* their frame
and *wait*; one reader task (:meth:`Link.run_reader`) receives every frame and
hands each reply to the waiter registered under its id, so any number of
requests share the connection and replies may come back in any order. Pushed
``event`` frames go to the subscription registered under the subscribe id.

A link dies exactly once (:meth:`Link.fail`): EOF, a reset, a broken send, a
frame interrupted half-way. Every waiter is then woken with the cause, and
the :class:`~sentinel_ipc.client.reconnect.Connector` decides, per request,
whether to re-send it on a new link (idempotent, or never sent) or to report
that its outcome is unknown.

Bounds: at most ``max_in_flight`` calls wait on one link (the daemon's
announced limit), so the client queues locally instead of collecting ``busy``
replies. Frames over the daemon's ``max_frame_bytes`` are refused before
sending (``LocalProtocolError``).
"""

from __future__ import annotations

import array
import contextlib
import logging
import socket
from collections.abc import Callable, Sequence

import msgspec
import trio

from ..codec import encode_framed
from ..errors import LocalProtocolError, ProtocolError, SentinelError, TransportError
from ..framing import HEADER_SIZE
from ..logs import log_event
from ..messages import Error, Event, Reply, Welcome
from ..transport import FramedConnection
from .errors import error_from_reply

EventSink = Callable[[Event], None]


class Pending:
    """One call waiting for its reply: set once, by the reader or by :meth:`Link.fail`."""

    __slots__ = ("error", "event", "on_reply", "reply", "sent")

    def __init__(self) -> None:
        self.event = trio.Event()
        #: Run by the reader as the reply is matched, before any later frame is
        #: read (a renewed subscription announces itself before its events).
        self.on_reply: Callable[[Reply], None] | None = None
        self.reply: Reply | None = None
        self.error: SentinelError | None = None
        #: The whole request frame reached the socket: a loss now leaves its
        #: outcome unknown.
        self.sent = False

    @property
    def done(self) -> bool:
        return self.event.is_set()


class Link:
    """A connected, greeted socket plus the table of calls waiting on it."""

    def __init__(self, conn: FramedConnection, welcome: Welcome, generation: int) -> None:
        self.conn = conn
        self.welcome = welcome
        self.generation = generation
        limits = welcome.limits
        self.max_frame_bytes = min(welcome.max_frame_bytes, limits.max_frame_bytes)
        self.max_in_flight = max(1, limits.max_in_flight_per_connection)
        self.pending: dict[int, Pending] = {}
        #: subscribe id -> sink for the ``event`` frames pushed under that id.
        self.event_routes: dict[int, EventSink] = {}
        self.closed = False
        self.cause: SentinelError | None = None
        self.closed_event = trio.Event()
        self._in_flight = 0
        self._slot_waiters = trio.lowlevel.ParkingLot()
        self._send_lock = trio.Lock()
        self._server_error: Error | None = None

    # --- calls ---------------------------------------------------------------

    async def acquire_slot(self) -> None:
        """Wait for room under the daemon's in-flight limit (usually: none needed)."""
        while self._in_flight >= self.max_in_flight:
            if self.closed:
                raise self.lost()
            await self._slot_waiters.park()
        if self.closed:
            raise self.lost()
        self._in_flight += 1

    def release_slot(self) -> None:
        self._in_flight -= 1
        self._slot_waiters.unpark()

    def register(self, request_id: int) -> Pending:
        if self.closed:
            raise self.lost()
        pending = Pending()
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

    async def send(self, frame: bytes, fds: Sequence[int] = ()) -> None:
        """Write one whole frame (``fds`` travel in the same ``sendmsg``).

        Raises :class:`TransportError`. A frame interrupted half-way (a cancel
        while the socket was full) kills the link: the byte stream is no longer
        at a frame boundary.
        """
        if self.closed:
            raise self.lost()
        sock = self.conn.sock
        async with self._send_lock:
            view = memoryview(frame)
            offset = 0
            try:
                if fds:
                    ancillary = array.array("i", fds).tobytes()
                    offset = await sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ancillary)]
                    )
                while offset < len(view):
                    offset += await sock.send(view[offset:])
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
                if self.cause is not None:
                    raise self.cause from exc
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                error = TransportError(f"send failed: {detail or type(exc).__name__}")
                error.__cause__ = exc
                self.fail(error)
                raise error from exc
            except BaseException:
                if 0 < offset < len(view):
                    self.fail(TransportError("a send was interrupted half-way through a frame"))
                raise

    async def wait(self, pending: Pending) -> Reply:
        """The reply for ``pending``: a typed error for an ``error`` reply, the
        link's cause (a :class:`SentinelError`) if it died first."""
        await pending.event.wait()
        reply = pending.reply
        if reply is None:
            assert pending.error is not None
            raise pending.error
        if type(reply) is Error:
            raise error_from_reply(reply)
        return reply

    # --- the reader ------------------------------------------------------------

    async def run_reader(self, on_event: EventSink | None = None) -> None:
        """Receive until the link dies; never raises (the cause goes to the waiters)."""
        try:
            while True:
                reply = await self.conn.receive()
                if type(reply) is Event:
                    sink = self.event_routes.get(reply.id) or on_event
                    if sink is not None:
                        sink(reply)
                    continue
                pending = self.pending.pop(reply.id, None)
                if pending is not None:
                    if not pending.event.is_set():
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
        except (TransportError, ProtocolError) as exc:
            self.fail(self._describe(exc))
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            error = TransportError(f"receive failed: {exc}")
            error.__cause__ = exc
            self.fail(error)
        finally:
            if not self.closed:  # cancelled: the client is closing
                self.fail(TransportError("the client closed the connection"))

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
            if not pending.event.is_set():
                pending.error = cause
                pending.event.set()
        self.pending.clear()
        self._slot_waiters.unpark_all()
        with contextlib.suppress(OSError):
            self.conn.close()
        self.closed_event.set()


__all__ = ["EventSink", "Link", "Pending"]
