"""Pushed events: the event bus, and the degraded-mode notices with their two buttons.

The bus
-------
A client sends ``subscribe {id, topics}``; from then on the daemon pushes
``event`` frames (carrying the subscribe request's ``id``) on that connection.
:meth:`EventBus.publish` never blocks and never fails: it appends to each
matching subscriber's bounded buffer and wakes that subscriber's pump task,
which writes to the socket. A slow or stuck client therefore only ever stalls
its own pump; when its buffer is full, further events are dropped and counted,
and once there is room again it receives **one** ``events_dropped`` event
saying how many it missed (one per overflow, however long it lasts), in the
place where the missing events would have been.

Topics: ``services`` (``service_state`` on every change of a service's
degradation state), ``degraded`` (``degraded_notice`` / ``degraded_cleared``),
``breakers`` (``breaker_transition``).

Three bounds: ``max_subscribers`` in the whole daemon,
:data:`MAX_SUBSCRIPTIONS_PER_CONNECTION` on one connection (the subscribe
handler checks it with :func:`check_connection_room`) and, on a socket shared
with other users, a quarter of ``max_subscribers`` per peer uid
(:attr:`EventBus.max_per_owner`, :meth:`EventBus.subscribe`'s ``owner``), so
that neither one connection nor one user's many connections can take every
slot of the daemon-wide one and lock out everyone else (the browser showing
the degraded-mode notices) for as long as they stay connected.

A subscription ends when its connection closes, or at ``unsubscribe {id,
subscription}`` (:func:`take_subscriptions` finds it among the connection's,
:meth:`EventBus.unsubscribe` frees both slots at once). The connection lives
on then, so :meth:`Subscription.stop` never cancels a pump in the middle of
writing a frame (a cut frame would corrupt the stream for every later
reply); the pump leaves after that frame instead. Since the ``ack`` is
written after it (the connection's writes queue in order), no ``event`` with
the subscription's id follows the ``ack``.

The notices
-----------
When a service leaves ``healthy``, subscribers of ``degraded`` get a notice a
person can read, SPEC section 3's sentence for the database: "Sentinel
operating in degraded mode — database connection lost, using cached security
policies" (an em dash; every service's notice has that shape), with the two
actions *Retry Connection* (the client sends ``service_retry``)
and *Continue with Cache* (``degraded_ack``). Acknowledging suppresses
repeats (reminders, the replay to a new subscriber) until the service's state
changes again (the FallbackManager keeps and persists that flag);
:class:`NoticeBoard` spaces the reminders.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

import msgspec
import trio

from ..errors import BusyError, InvalidMessageError, NotFoundError
from ..logs import log_event
from ..messages import Event

__all__ = [
    "ACTION_CONTINUE",
    "ACTION_RETRY",
    "MAX_SUBSCRIPTIONS_PER_CONNECTION",
    "NOTICE_ACTIONS",
    "TOPICS",
    "EventBus",
    "NoticeBoard",
    "Subscription",
    "check_connection_room",
    "notice_text",
    "open_event_bus",
    "take_subscriptions",
]

TOPICS = frozenset({"services", "degraded", "breakers"})
ACTION_RETRY = "Retry Connection"  # -> service_retry {service}
ACTION_CONTINUE = "Continue with Cache"  # -> degraded_ack {service}
NOTICE_ACTIONS = (ACTION_RETRY, ACTION_CONTINUE)
#: Subscriptions one connection may hold. One subscription carries any set of
#: topics, so a client needs few; one connection then takes at most 8 of the
#: daemon-wide ``max_subscribers`` (256), and filling those takes 32 connections.
MAX_SUBSCRIPTIONS_PER_CONNECTION: Final = 8

#: SPEC section 3 quotes the database's notice: "Sentinel operating in degraded
#: mode — database connection lost, using cached security policies". Every
#: notice is this prefix, what is wrong, a comma, and what the daemon does instead.
_PREFIX = "Sentinel operating in degraded mode — "


def notice_text(service: str, state: str, *, fail_open: bool = True) -> str:
    """The sentence a UI shows for ``service`` in ``state`` (not ``healthy``)."""
    if service == "database":
        if state == "critical":
            rest = ("database connection lost, cached security policies unavailable"
                    " (only scan results decide)")
        else:
            rest = "database connection lost, using cached security policies"
    elif service in ("yara", "scanner"):
        if state == "critical":
            instead = "hash policies cannot be applied either"
        elif fail_open:
            instead = "downloads allowed with a warning"
        else:
            instead = "downloads blocked until the scanner recovers"
        rest = f"scanner unavailable, {instead}"
    elif service == "ipc":
        rest = "IPC link unstable, operations queued and delivered after reconnect"
    elif service == "disk":
        rest = "disk space low, logs and quarantine may fail"
    elif service == "memory":
        rest = "memory use high, workers recycled"
    elif service in ("network", "external") or service.startswith("http"):
        rest = f"network service {service} unreachable, outgoing operations queued for retry"
    else:
        rest = f"{service} unavailable"
    return _PREFIX + rest


class NoticeBoard:
    """When each outstanding degraded-mode notice was last sent, for reminders.

    Acknowledgements themselves live in the FallbackManager (its
    ``acknowledge()`` flag lapses on the service's next state change and is
    part of its persisted snapshot); this only spaces the reminders.
    """

    def __init__(self) -> None:
        self._last_sent: dict[str, float] = {}

    def state_changed(self, service: str) -> None:
        """A new state: its notice is new, not a reminder."""
        self._last_sent.pop(service, None)

    def sent(self, service: str, now: float) -> None:
        self._last_sent[service] = now

    def reminder_due(
        self, service: str, state: str, *, acknowledged: bool, now: float, interval: float
    ) -> bool:
        if state == "healthy" or acknowledged or interval <= 0:
            return False
        last = self._last_sent.get(service)
        return last is None or now - last >= interval


class _Dropped:
    """Placeholder in a buffer where events were dropped."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


@dataclass(eq=False)
class Subscription:
    """One subscriber: its topics, bounded buffer and pump."""

    request_id: int
    topics: frozenset[str]
    send: Callable[[Event], Awaitable[None]]
    limit: int
    #: The subscriber's peer uid (None: not counted against a per-user share).
    owner: int | None = None
    buffer: deque[Event | _Dropped] = field(default_factory=deque)
    delivered: int = 0
    dropped_total: int = 0
    closed: bool = False
    #: The pump is between taking an event and having written it.
    _sending: bool = False
    _wake: trio.Event = field(default_factory=trio.Event)
    _armed: trio.Event = field(default_factory=trio.Event)
    _scope: trio.CancelScope | None = None

    def resume(self) -> None:
        """Start delivering (a subscription made ``paused`` waits for this, so the
        ``subscribed`` reply can go out before the first event)."""
        self._armed.set()

    def offer(self, event: Event) -> bool:
        """Queue ``event`` without blocking; False if it was dropped."""
        if self.closed:
            return False
        buffer = self.buffer
        if len(buffer) >= self.limit:
            tail = buffer[-1] if buffer else None
            if isinstance(tail, _Dropped):
                tail.count += 1
            else:
                buffer.append(_Dropped())  # one slot over the limit, at most
            self.dropped_total += 1
            self._wake.set()
            return False
        buffer.append(event)
        self._wake.set()
        return True

    def close(self) -> None:
        """End at once, even mid-frame: for a connection that is closing anyway."""
        self.closed = True
        self.buffer.clear()
        if self._scope is not None:
            self._scope.cancel()

    def stop(self) -> None:
        """End without cutting a frame: for a connection that lives on (``unsubscribe``).

        Nothing more is queued; a pump that is writing an event finishes that
        frame and then leaves, any other pump is cancelled now.
        """
        self.closed = True
        self.buffer.clear()
        if self._scope is not None and not self._sending:
            self._scope.cancel()

    async def pump(self, clock: Callable[[], float]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            if self.closed:
                return
            try:
                await self._armed.wait()
                while not self.closed:
                    while not self.buffer:
                        self._wake = trio.Event()
                        await self._wake.wait()
                    item = self.buffer.popleft()
                    if isinstance(item, _Dropped):
                        event = Event(
                            id=self.request_id,
                            topic="events",
                            kind="events_dropped",
                            reason=f"{item.count} event(s) dropped: the subscriber read too slowly",
                            at=clock(),
                            dropped=item.count,
                        )
                    else:
                        event = item
                    self._sending = True
                    try:
                        await self.send(event)
                    finally:
                        self._sending = False
                    self.delivered += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self.closed = True
                self.buffer.clear()


def check_connection_room(
    held: list[Subscription], limit: int = MAX_SUBSCRIPTIONS_PER_CONNECTION
) -> None:
    """Drop the closed subscriptions from ``held`` (one connection's), and raise
    :class:`BusyError` with ``retryable=False`` if ``limit`` live ones remain.

    Why ``busy``: the request is well formed and would succeed on another
    connection; it is refused because a bound is reached, which is what
    ``busy`` means on the wire. ``invalid_message`` would tell the client its
    frame was wrong and send its developer looking at the encoding.

    Why not retryable (and no ``retry_after``): the same request on the same
    connection succeeds only once the client itself ends one of its
    subscriptions (``unsubscribe``, or closing the connection); waiting and
    re-sending changes nothing, and a client that honours ``retryable`` must
    not loop on it.
    """
    held[:] = [sub for sub in held if not sub.closed]
    if len(held) >= limit:
        raise BusyError(
            f"this connection already holds {len(held)} subscriptions (limit {limit}); "
            "unsubscribe one it no longer needs, or subscribe once with all the topics "
            "you need",
            retryable=False,
        )


def take_subscriptions(held: list[Subscription], request_id: int) -> list[Subscription]:
    """Remove from ``held`` (one connection's) the live subscriptions made by the
    subscribe with id ``request_id``, and return them (for ``unsubscribe``).

    Usually one; a client that reused the id for several subscribes gets all
    of them ended, since their events carry the same id and it could not tell
    them apart anyway. Raises :class:`NotFoundError` when there is none: never
    made on this connection (ids are per connection, so another connection's
    are never found), already ended, or sent before its ``subscribed`` reply
    (the two requests may be handled in either order).
    """
    live = [sub for sub in held if not sub.closed]
    taken = [sub for sub in live if sub.request_id == request_id]
    if not taken:
        raise NotFoundError(
            f"this connection has no subscription with id {request_id} "
            f"(live ones: {sorted({sub.request_id for sub in live})})"
        )
    held[:] = [sub for sub in live if sub.request_id != request_id]
    return taken


class EventBus:
    """Fan-out of events to subscribers; see the module docstring."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        buffer_size: int = 256,
        max_subscribers: int = 256,
        max_per_owner: int | None = None,
        clock: Callable[[], float],
    ) -> None:
        self._nursery = nursery
        self.buffer_size = buffer_size
        self.max_subscribers = max_subscribers
        #: Subscriptions one peer uid may hold (None: no per-user bound).
        self.max_per_owner = max_per_owner
        self.clock = clock
        self._subs: set[Subscription] = set()
        self.published = 0

    @property
    def subscribers(self) -> int:
        return sum(1 for s in self._subs if not s.closed)

    def subscribe(
        self,
        request_id: int,
        topics: Iterable[str],
        send: Callable[[Event], Awaitable[None]],
        *,
        initial: Iterable[Event] = (),
        paused: bool = False,
        owner: int | None = None,
    ) -> Subscription:
        """Start delivering events of ``topics`` through ``send``; ``initial``
        events (the current state) are queued first. With ``paused``, delivery
        starts at :meth:`Subscription.resume`. Raises
        :class:`InvalidMessageError` for an unknown topic and :class:`BusyError`
        over ``max_subscribers``, or when ``owner`` (a peer uid) already holds
        :attr:`max_per_owner` of them."""
        wanted = frozenset(topics)
        unknown = sorted(wanted - TOPICS)
        if unknown or not wanted:
            raise InvalidMessageError(
                f"unknown event topic(s) {unknown}; known topics are {sorted(TOPICS)}"
                if unknown
                else f"subscribe needs at least one topic of {sorted(TOPICS)}"
            )
        self._subs = {s for s in self._subs if not s.closed}
        if len(self._subs) >= self.max_subscribers:
            raise BusyError(
                f"{len(self._subs)} subscribers already (limit {self.max_subscribers})",
                retry_after=1.0,
            )
        if owner is not None and self.max_per_owner is not None:
            held = sum(1 for s in self._subs if s.owner == owner)
            if held >= self.max_per_owner:
                raise BusyError(
                    f"uid {owner} holds {held} subscriptions "
                    f"(limit per user {self.max_per_owner})",
                    retry_after=1.0,
                )
        sub = Subscription(request_id, wanted, send, self.buffer_size, owner=owner)
        for event in initial:
            if event.topic in wanted:
                sub.offer(_with_id(event, request_id))
        if not paused:
            sub.resume()
        self._subs.add(sub)
        self._nursery.start_soon(sub.pump, self.clock)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """End ``sub`` (see :meth:`Subscription.stop`) and free its slot at once."""
        sub.stop()
        self._subs.discard(sub)

    def publish(
        self,
        topic: str,
        kind: str,
        *,
        service: str | None = None,
        state: str | None = None,
        previous: str | None = None,
        reason: str | None = None,
        message: str | None = None,
        actions: Iterable[str] = (),
        at: float | None = None,
    ) -> int:
        """Queue one event for every subscriber of ``topic``; returns how many got it."""
        self.published += 1
        event = Event(
            id=0,
            topic=topic,
            kind=kind,
            service=service,
            state=state,
            previous=previous,
            reason=reason,
            at=self.clock() if at is None else at,
            message=message,
            actions=list(actions),
        )
        queued = 0
        closed = False
        for sub in self._subs:
            if sub.closed:
                closed = True
                continue
            if topic in sub.topics and sub.offer(_with_id(event, sub.request_id)):
                queued += 1
        if closed:
            self._subs = {s for s in self._subs if not s.closed}
        return queued

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs.clear()


def _with_id(event: Event, request_id: int) -> Event:
    return msgspec.structs.replace(event, id=request_id)


@contextlib.asynccontextmanager
async def open_event_bus(
    *, buffer_size: int = 256, max_subscribers: int = 256, max_per_owner: int | None = None,
    clock: Callable[[], float],
) -> AsyncIterator[EventBus]:
    """An :class:`EventBus` whose pumps live in its own nursery, all cancelled on exit."""
    async with trio.open_nursery() as nursery:
        bus = EventBus(
            nursery, buffer_size=buffer_size, max_subscribers=max_subscribers,
            max_per_owner=max_per_owner, clock=clock,
        )
        try:
            yield bus
        finally:
            bus.close()
            nursery.cancel_scope.cancel()
            log_event("event_bus_closed", logging.DEBUG, published=bus.published)
