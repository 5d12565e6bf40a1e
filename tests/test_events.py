"""Event bus and degraded-mode notices: bounded per-subscriber buffers, one
``events_dropped`` per overflow, a stuck subscriber never blocks the
publisher, acknowledgements that lapse when the state changes, at most
``MAX_SUBSCRIPTIONS_PER_CONNECTION`` subscriptions per connection, and
``unsubscribe`` ending one of them. Real trio socket pairs where a slow
reader matters; a real ``sentineld`` for the per-connection bound and
``unsubscribe`` on the wire."""

from __future__ import annotations

import socket
from typing import Any

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing

from sentinel_ipc.codec import encode_framed
from sentinel_ipc.errors import BusyError, InvalidMessageError, NotFoundError
from sentinel_ipc.messages import (
    Ack,
    BreakerControl,
    Breakers,
    BreakersReport,
    Error,
    Event,
    Ping,
    Pong,
    Reply,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from sentinel_ipc.observability.events import (
    MAX_SUBSCRIPTIONS_PER_CONNECTION,
    NOTICE_ACTIONS,
    EventBus,
    NoticeBoard,
    Subscription,
    check_connection_room,
    notice_text,
    open_event_bus,
    take_subscriptions,
)
from sentinel_ipc.transport import FramedConnection, open_framed_connection


class Collector:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.gate = trio.Event()
        self.gate.set()

    async def send(self, event: Event) -> None:
        await self.gate.wait()
        self.events.append(event)


#: SPEC section 3, character for character (U+2014 EM DASH, no final period).
SPEC_DATABASE_NOTICE = (
    "Sentinel operating in degraded mode \u2014 database connection lost, "
    "using cached security policies"
)


def test_database_notice_text_is_exactly_the_spec_s() -> None:
    """A UI may match or translate the SPEC's sentence: it must be that sentence."""
    assert notice_text("database", "failed") == SPEC_DATABASE_NOTICE
    assert notice_text("database", "degraded") == SPEC_DATABASE_NOTICE
    assert "\u2014" in SPEC_DATABASE_NOTICE
    assert NOTICE_ACTIONS == ("Retry Connection", "Continue with Cache")


@pytest.mark.parametrize("service, state, fail_open, rest", [
    ("database", "critical", True,
     "database connection lost, cached security policies unavailable (only scan results decide)"),
    ("yara", "failed", True, "scanner unavailable, downloads allowed with a warning"),
    ("yara", "failed", False, "scanner unavailable, downloads blocked until the scanner recovers"),
    ("yara", "critical", True, "scanner unavailable, hash policies cannot be applied either"),
    ("ipc", "degraded", True,
     "IPC link unstable, operations queued and delivered after reconnect"),
    ("disk", "degraded", True, "disk space low, logs and quarantine may fail"),
    ("memory", "degraded", True, "memory use high, workers recycled"),
    ("external", "failed", True,
     "network service external unreachable, outgoing operations queued for retry"),
    ("whatever", "degraded", True, "whatever unavailable"),
])
def test_every_notice_has_the_spec_s_shape(
    service: str, state: str, fail_open: bool, rest: str
) -> None:
    """The other services' notices read like the database's: the SPEC's prefix
    with its em dash, what is wrong, a comma, what the daemon does instead."""
    text = notice_text(service, state, fail_open=fail_open)
    assert text == "Sentinel operating in degraded mode \u2014 " + rest
    assert not text.endswith(".")


def test_noticeboard_spaces_reminders_and_never_reminds_of_an_acknowledged_notice() -> None:
    board = NoticeBoard()
    due = board.reminder_due
    assert due("database", "failed", acknowledged=False, now=0.0, interval=60.0)
    board.sent("database", 10.0)
    assert not due("database", "failed", acknowledged=False, now=69.0, interval=60.0)
    assert due("database", "failed", acknowledged=False, now=70.0, interval=60.0)
    assert not due("database", "failed", acknowledged=True, now=1000.0, interval=60.0)
    assert not due("database", "healthy", acknowledged=False, now=1000.0, interval=60.0)
    assert not due("database", "failed", acknowledged=False, now=1000.0, interval=0.0)
    board.state_changed("database")
    assert due("database", "critical", acknowledged=False, now=11.0, interval=60.0)


async def test_subscribers_get_only_their_topics_with_their_request_id() -> None:
    async with open_event_bus(clock=lambda: 123.0) as bus:
        a, b = Collector(), Collector()
        bus.subscribe(7, ["services"], a.send)
        bus.subscribe(8, ["degraded", "services"], b.send)
        assert bus.publish("services", "service_state", service="database", state="failed",
                           previous="healthy", reason="breaker open") == 2
        assert bus.publish("degraded", "degraded_notice", service="database",
                           message=notice_text("database", "failed"),
                           actions=NOTICE_ACTIONS) == 1
        await trio.testing.wait_all_tasks_blocked()
        assert [(e.id, e.kind) for e in a.events] == [(7, "service_state")]
        assert [(e.id, e.kind) for e in b.events] == [(8, "service_state"), (8, "degraded_notice")]
        notice = b.events[1]
        assert notice.actions == list(NOTICE_ACTIONS)
        assert notice.at == 123.0
        assert a.events[0].previous == "healthy" and a.events[0].state == "failed"


async def test_initial_events_come_first() -> None:
    async with open_event_bus(clock=lambda: 1.0) as bus:
        c = Collector()
        initial = [Event(id=0, topic="services", kind="service_state", service="yara",
                         state="failed")]
        bus.subscribe(3, ["services"], c.send, initial=initial)
        bus.publish("services", "service_state", service="yara", state="healthy")
        await trio.testing.wait_all_tasks_blocked()
        assert [(e.id, e.state) for e in c.events] == [(3, "failed"), (3, "healthy")]


async def test_overflow_gives_exactly_one_events_dropped_in_place() -> None:
    async with open_event_bus(buffer_size=4, clock=lambda: 0.0) as bus:
        c = Collector()
        c.gate = trio.Event()  # the subscriber is stuck
        sub = bus.subscribe(1, ["services"], c.send)
        await trio.testing.wait_all_tasks_blocked()
        # The pump holds event 0 (blocked in send); 1..4 fill the buffer; 5..9 drop.
        bus.publish("services", "service_state", reason="0")
        await trio.testing.wait_all_tasks_blocked()
        for n in range(1, 10):
            bus.publish("services", "service_state", reason=str(n))
        assert sub.dropped_total == 5
        c.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        bus.publish("services", "service_state", reason="after")
        await trio.testing.wait_all_tasks_blocked()
        kinds = [(e.kind, e.reason if e.kind != "events_dropped" else e.dropped) for e in c.events]
        assert kinds == [
            ("service_state", "0"),
            ("service_state", "1"),
            ("service_state", "2"),
            ("service_state", "3"),
            ("service_state", "4"),
            ("events_dropped", 5),
            ("service_state", "after"),
        ]
        dropped = c.events[5]
        assert dropped.topic == "events" and dropped.id == 1


async def test_a_stuck_socket_subscriber_never_blocks_the_publisher() -> None:
    """A real client that never reads: the publisher goes on at full speed, the
    subscriber's memory stays bounded, and a healthy subscriber still gets all."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    try:
        async with open_event_bus(buffer_size=16, clock=lambda: 0.0) as bus:

            async def send_frame(event: Event) -> None:
                await stream.send_all(encode_framed(event))

            stuck = bus.subscribe(1, ["services"], send_frame)
            good = Collector()
            good_sub = bus.subscribe(2, ["services"], good.send)
            with trio.fail_after(5):  # the publisher itself is never held up
                for n in range(3000):
                    bus.publish("services", "service_state", reason="x" * 200 + str(n))
                    await trio.lowlevel.checkpoint()  # the healthy subscriber keeps up
            await trio.testing.wait_all_tasks_blocked()
            assert len(good.events) == 3000
            assert good_sub.dropped_total == 0
            assert len(stuck.buffer) <= 17
            assert stuck.dropped_total > 2000
    finally:
        stream.socket.close()
        b.close()


async def test_a_closed_connection_ends_its_pump() -> None:
    a, b = socket.socketpair()
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    async with open_event_bus(clock=lambda: 0.0) as bus:

        async def send_frame(event: Event) -> None:
            await stream.send_all(encode_framed(event))

        sub = bus.subscribe(1, ["services"], send_frame)
        b.close()
        for _ in range(50):
            bus.publish("services", "service_state")
            await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()
        assert sub.closed
        assert bus.subscribers == 0
    stream.socket.close()


async def test_subscribe_validates_topics_and_bounds_subscribers() -> None:
    async with open_event_bus(max_subscribers=2, clock=lambda: 0.0) as bus:
        c = Collector()
        with pytest.raises(InvalidMessageError, match="unknown event topic"):
            bus.subscribe(1, ["services", "gossip"], c.send)
        with pytest.raises(InvalidMessageError, match="at least one topic"):
            bus.subscribe(1, [], c.send)
        first = bus.subscribe(1, ["services"], c.send)
        bus.subscribe(2, ["services"], c.send)
        with pytest.raises(BusyError):
            bus.subscribe(3, ["services"], c.send)
        first.close()
        bus.subscribe(4, ["services"], c.send)  # a closed one frees its slot


async def test_events_encode_as_wire_frames() -> None:
    async with open_event_bus(clock=lambda: 5.0) as bus:
        c = Collector()
        bus.subscribe(11, ["degraded"], c.send)
        bus.publish("degraded", "degraded_notice", service="database", state="failed",
                    message=notice_text("database", "failed"), actions=NOTICE_ACTIONS)
        await trio.testing.wait_all_tasks_blocked()
        wire = msgspec.msgpack.decode(msgspec.msgpack.encode(c.events[0]), type=Event)
        assert wire == c.events[0]


def test_event_bus_needs_a_nursery_type() -> None:
    # EventBus is constructed by open_event_bus; its signature stays explicit.
    assert EventBus.__init__.__kwdefaults__ == {
        "buffer_size": 256, "max_subscribers": 256, "max_per_owner": None,
    }


async def test_a_connection_past_its_subscriptions_gets_a_busy_that_is_not_retryable() -> None:
    """Waiting never frees a slot (only the client's own unsubscribe or its
    connection closing does), so the refusal must not invite a retry."""
    async with open_event_bus(clock=lambda: 0.0) as bus:
        c = Collector()
        held: list[Subscription] = []
        for n in range(MAX_SUBSCRIPTIONS_PER_CONNECTION):
            check_connection_room(held)
            held.append(bus.subscribe(n, ["services"], c.send))
        with pytest.raises(BusyError, match="limit 8") as refused:
            check_connection_room(held)
        assert refused.value.retryable is False and refused.value.retry_after is None
        held[3].close()  # a subscription that ended (its connection's send failed)
        check_connection_room(held)
        assert len(held) == MAX_SUBSCRIPTIONS_PER_CONNECTION - 1


async def test_unsubscribe_lets_the_frame_being_written_finish_and_frees_the_slot_at_once(
) -> None:
    """``unsubscribe`` leaves the connection open, so ending a subscription must
    not cancel its pump half-way through writing a frame (the stream would be
    corrupt for every later reply); the daemon-wide slot is free at once."""
    async with open_event_bus(max_subscribers=1, clock=lambda: 0.0) as bus:
        c = Collector()
        c.gate = trio.Event()  # the pump is blocked inside send
        sub = bus.subscribe(1, ["services"], c.send)
        bus.publish("services", "service_state", reason="being written")
        await trio.testing.wait_all_tasks_blocked()
        bus.publish("services", "service_state", reason="queued")
        bus.unsubscribe(sub)
        assert sub.closed and bus.subscribers == 0
        assert bus.publish("services", "service_state", reason="after") == 0
        other = Collector()
        bus.subscribe(2, ["services"], other.send)  # the only slot is free already
        c.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [e.reason for e in c.events] == ["being written"]
        assert sub.delivered == 1 and not sub.buffer


async def test_take_subscriptions_finds_only_the_live_ones_with_that_id() -> None:
    async with open_event_bus(clock=lambda: 0.0) as bus:
        c = Collector()
        held = [bus.subscribe(n, ["services"], c.send) for n in (1, 2, 2, 3)]
        held[3].close()  # ended on its own (a failed send)
        taken = take_subscriptions(held, 2)
        assert [s.request_id for s in taken] == [2, 2]  # a reused id: both end
        assert [s.request_id for s in held] == [1]
        for missing in (2, 3, 99):  # already taken, already ended, never made
            with pytest.raises(NotFoundError, match=f"no subscription with id {missing}"):
                take_subscriptions(held, missing)
        assert [s.request_id for s in held] == [1]


async def _replies(conn: FramedConnection, count: int) -> list[Reply]:
    """The next ``count`` replies that are not pushed events."""
    replies: list[Reply] = []
    with trio.fail_after(15):
        while len(replies) < count:
            reply = await conn.receive()
            if not isinstance(reply, Event):
                replies.append(reply)
    return replies


async def test_one_connection_cannot_take_every_subscriber_slot(daemon_factory: Any) -> None:
    """Audit: one connection sent subscribe until the daemon-wide bound was reached,
    and every other client (the browser showing degraded-mode notices) got
    ``busy`` for as long as it stayed connected. Now it gets its 8, then a
    non-retryable ``busy`` on the same connection, which stays usable; another
    connection still subscribes. (The bound is 16 here, so that 20 pipelined
    subscribes would have taken all of it.)"""
    d = daemon_factory(config={"resilience": {"max_subscribers": 16}})
    wanted = 20
    async with open_framed_connection(d.socket_path) as greedy:
        for n in range(1, wanted + 1):
            await greedy.send(Subscribe(id=n, topics=["services", "degraded"]))
        replies = await _replies(greedy, wanted)
        accepted = sorted(r.id for r in replies if isinstance(r, Subscribed))
        refused = [r for r in replies if isinstance(r, Error)]
        assert len(accepted) == MAX_SUBSCRIPTIONS_PER_CONNECTION
        assert len(refused) == wanted - MAX_SUBSCRIPTIONS_PER_CONNECTION
        assert {(r.code, r.retryable, r.retry_after_ms) for r in refused} == {
            ("busy", False, None)
        }
        assert all("limit 8" in r.message for r in refused)
        assert sorted([*accepted, *(r.id for r in refused)]) == list(range(1, wanted + 1))
        await greedy.send(Ping(id=99))  # refused, not disconnected
        assert isinstance((await _replies(greedy, 1))[0], Pong)
        async with open_framed_connection(d.socket_path) as browser:
            await browser.send(Subscribe(id=1, topics=["degraded"]))
            (reply,) = await _replies(browser, 1)
            assert isinstance(reply, Subscribed), reply
            assert reply.topics == ["degraded"]
    d.stop()


async def _until_transitions(
    conn: FramedConnection, want: set[int], state: str
) -> tuple[list[Event], list[Reply]]:
    """Frames until every subscribe id in ``want`` got a ``breaker_transition``
    to ``state``: (every event, every other reply) read meanwhile."""
    events: list[Event] = []
    others: list[Reply] = []
    seen: set[int] = set()
    with trio.fail_after(15):
        while not want <= seen:
            frame = await conn.receive()
            if isinstance(frame, Event):
                events.append(frame)
                if frame.kind == "breaker_transition" and frame.state == state:
                    seen.add(frame.id)
            else:
                others.append(frame)
    return events, others


async def test_unsubscribe_frees_a_slot_and_ends_only_that_subscription(
    daemon_factory: Any,
) -> None:
    """A long-lived client (a browser UI panel) opens and closes subscriptions
    on one connection for hours; with 8 per connection it needs
    ``unsubscribe`` to get past its 9th. After the ``ack`` the slot is free at
    once, no event carries the ended id, and the other subscriptions go on;
    an id the connection does not hold (unknown, another connection's, ended
    already) is ``not_found`` and the connection stays usable."""
    d = daemon_factory()
    async with open_framed_connection(d.socket_path) as conn, \
            open_framed_connection(d.socket_path) as other:
        await other.send(Breakers(id=1))
        (report,) = await _replies(other, 1)
        assert isinstance(report, BreakersReport) and report.breakers, report
        breaker = report.breakers[0].name

        subscribed = list(range(1, MAX_SUBSCRIPTIONS_PER_CONNECTION + 1))
        for n in subscribed:
            await conn.send(Subscribe(id=n, topics=["breakers"]))
        replies = await _replies(conn, len(subscribed))
        assert sorted(r.id for r in replies if isinstance(r, Subscribed)) == subscribed
        await conn.send(Subscribe(id=9, topics=["breakers"]))
        (refused,) = await _replies(conn, 1)
        assert isinstance(refused, Error) and refused.code == "busy" and not refused.retryable

        await other.send(BreakerControl(id=2, name=breaker, action="trip"))
        assert isinstance((await _replies(other, 1))[0], Ack)
        await _until_transitions(conn, set(subscribed), "forced_open")  # 3 among them

        await conn.send(Unsubscribe(id=10, subscription=3))
        (ack,) = await _replies(conn, 1)
        assert isinstance(ack, Ack) and ack.id == 10, ack
        await conn.send(Subscribe(id=11, topics=["breakers"]))  # the 9th now fits
        (again,) = await _replies(conn, 1)
        assert isinstance(again, Subscribed) and again.id == 11, again

        await other.send(Unsubscribe(id=3, subscription=1))  # conn's id 1, not other's
        (foreign,) = await _replies(other, 1)
        for n, wanted in ((12, 3), (13, 999)):  # ended already; never made
            await conn.send(Unsubscribe(id=n, subscription=wanted))
        await conn.send(Ping(id=14))
        unknown = sorted(await _replies(conn, 3), key=lambda r: r.id)  # by id: ping is inline
        for reply in (foreign, *unknown[:2]):
            assert isinstance(reply, Error), reply
            assert (reply.code, reply.retryable) == ("not_found", False), reply
        assert [r.id for r in unknown] == [12, 13, 14] and unknown[2] == Pong(id=14)

        await other.send(BreakerControl(id=4, name=breaker, action="reset"))
        assert isinstance((await _replies(other, 1))[0], Ack)
        live = {1, 2, 4, 5, 6, 7, 8, 11}  # 1 still live: other's unsubscribe missed it
        events, _ = await _until_transitions(conn, live, "closed")
        assert {e.id for e in events} <= live, [e.id for e in events]
    d.stop()
