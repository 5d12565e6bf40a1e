"""Subscriptions: pushed ``event`` frames, delivered to an async iterator and/or
a callback, surviving reconnects.

A :class:`Subscription` belongs to the client, not to a connection: after a
reconnect the client sends a new ``subscribe`` on the new link and keeps
delivering into the same object. Between the two it delivers local events of
topic ``"client"`` (kinds ``connection_lost`` and ``resubscribed``), so a UI
can say "reconnecting..." instead of showing stale state.

A slow consumer never blocks the reader: the buffer is bounded and on
overflow the oldest event is dropped and counted (``dropped``; the next event
handed out carries the count in its ``dropped`` field).

Closing one ends it on the daemon too (``unsubscribe``), because the daemon
holds at most 8 subscriptions per connection and the client keeps one
connection for its whole life: a UI panel that opens and closes
subscriptions for hours would otherwise be refused its 9th.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
import trio

from ..logs import log_event
from ..messages import Event

if TYPE_CHECKING:
    from types import TracebackType

#: Topic of the events the client itself generates.
CLIENT_TOPIC = "client"
#: Kind of the daemon's degraded-mode notice (issue 6): a banner with two actions.
DEGRADED_TOPIC = "degraded"

EventCallback = Callable[[Event], object]


def local_event(kind: str, message: str, at: float) -> Event:
    return Event(id=0, topic=CLIENT_TOPIC, kind=kind, message=message, at=at)


class Subscription:
    """Events for ``topics``; iterate with ``async for``, or pass ``callback``.

    Close it to stop delivery: ``await sub.aclose()`` (or leaving ``async
    with``) stops it at once here and sends ``unsubscribe`` for its current
    daemon-side subscription, waiting for the ``ack`` (at most about a second)
    so that the daemon's slot is free when it returns. That part is best
    effort and never raises because the daemon is gone: with no link up
    nothing is sent (the daemon's side ended with the connection); a daemon
    that does not answer in time, hangs up, or is too old to know
    ``unsubscribe`` is logged at debug level and ``aclose`` returns normally.
    ``close()`` (for code that cannot await) sends the same ``unsubscribe``
    in the background. A closed subscription is never renewed after a
    reconnect.
    """

    def __init__(
        self,
        topics: tuple[str, ...],
        *,
        buffer: int,
        callback: EventCallback | None,
        on_close: Callable[[Subscription], None],
        on_aclose: Callable[[Subscription], Awaitable[None]],
    ) -> None:
        self.topics = topics
        self.callback = callback
        self.dropped = 0
        self.closed = False
        #: Generation of the link this subscription is registered on (-1: none).
        self.generation = -1
        #: Id of its ``subscribe`` on that link once the daemon acknowledged it
        #: (what ``unsubscribe`` names); None while none is acknowledged.
        self.remote_id: int | None = None
        self._buffer: collections.deque[Event] = collections.deque()
        self._limit = buffer
        self._unreported_drops = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._on_close = on_close
        self._on_aclose = on_aclose

    def deliver(self, event: Event) -> None:
        """Called by the reader task; never blocks, never raises."""
        if self.closed:
            return
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception as exc:
                log_event("client_event_callback_failed", logging.ERROR, error=repr(exc))
        if len(self._buffer) >= self._limit:
            self._buffer.popleft()
            self.dropped += 1
            self._unreported_drops += 1
        self._buffer.append(event)
        self._lot.unpark_all()

    def receive_nowait(self) -> Event:
        """The next buffered event; ``trio.WouldBlock`` if there is none."""
        if not self._buffer:
            if self.closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        event = self._buffer.popleft()
        if self._unreported_drops:
            event = msgspec.structs.replace(event, dropped=event.dropped + self._unreported_drops)
            self._unreported_drops = 0
        return event

    async def receive(self) -> Event:
        """Wait for the next event; ``trio.EndOfChannel`` once closed and drained."""
        while True:
            try:
                event = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await trio.lowlevel.checkpoint()
            return event

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    def _end_locally(self) -> bool:
        """Stop delivery; False if it was already closed."""
        if self.closed:
            return False
        self.closed = True
        self._lot.unpark_all()
        return True

    def close(self) -> None:
        """Stop delivery now; the daemon-side ``unsubscribe`` goes out in the
        background. Never raises."""
        if self._end_locally():
            self._on_close(self)

    async def aclose(self) -> None:
        """Stop delivery and end the daemon-side subscription (see the class
        docstring: bounded, best effort, never raises because the daemon is gone)."""
        if not self._end_locally():
            await trio.lowlevel.checkpoint()
        else:
            await self._on_aclose(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


__all__ = ["CLIENT_TOPIC", "DEGRADED_TOPIC", "EventCallback", "Subscription", "local_event"]
