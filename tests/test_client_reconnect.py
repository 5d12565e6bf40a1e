"""Connection loss: kill -9 and restart, daemon absent (breaker), EOF mid-reply,
socket removed, outcome-unknown writes, subscription renewal, and closing a
subscription (``unsubscribe``) across reconnects and unanswering daemons."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from client_peer import PeerConn, start_peer

from sentinel_ipc.client import IPC_BREAKER, ClientConfig, ConnectionLostError, open_client
from sentinel_ipc.client.reconnect import UNSUBSCRIBE_TIMEOUT
from sentinel_ipc.codec import encode_framed
from sentinel_ipc.errors import (
    CircuitOpenError,
    RequestTimeoutError,
    RetryExhaustedError,
    RetryGaveUpError,
    SentinelError,
    TransportError,
    UnknownMessageTypeError,
)
from sentinel_ipc.messages import (
    Ack,
    Error,
    Event,
    Ping,
    Pong,
    Reload,
    ReloadResult,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from sentinel_ipc.resilience import RETRY_PRESETS

#: The ipc retry preset's shape (5 attempts, x1.5) with millisecond waits, so
#: that real-time tests do not sleep through backoffs.
FAST_RETRY = dataclasses.replace(RETRY_PRESETS["ipc"], initial=0.001, max_delay=0.005)


def fast_breaker(**changes: object) -> ClientConfig:
    """The ipc breaker preset with a short open timeout, for tests in real time."""
    breaker = dataclasses.replace(IPC_BREAKER, **changes)  # type: ignore[arg-type]
    return ClientConfig(breaker=breaker, retry=FAST_RETRY)


async def test_sigkill_and_restart_while_calling(daemon_factory: Any) -> None:
    d = daemon_factory()
    timeout = 2.0
    outcomes: list[tuple[str, float]] = []
    done = trio.Event()

    async with open_client(d.socket_path, config=fast_breaker(open_timeout=0.3)) as client:
        await client.ping()

        async def caller() -> None:
            while not done.is_set():
                start = time.monotonic()
                try:
                    await client.ping(timeout=timeout)
                    outcome = "ok"
                except SentinelError as exc:  # typed, never anything else
                    outcome = type(exc).__name__
                outcomes.append((outcome, time.monotonic() - start))
                await trio.sleep(0.01)

        async def chaos() -> None:
            await trio.sleep(0.3)
            for _ in range(2):
                d.kill()  # SIGKILL: stale socket file left behind
                await trio.sleep(0.2)
                await trio.to_thread.run_sync(d.start)
                await trio.sleep(0.6)  # > open_timeout: the callers get back in
            done.set()

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(caller)
            nursery.start_soon(chaos)

        assert client.connects >= 3  # first connect + one per restart
        await client.ping()
    worst = max(elapsed for _, elapsed in outcomes)
    assert worst < timeout + 0.5, worst  # no call hangs past its timeout
    assert sum(1 for o, _ in outcomes if o == "ok") > 100
    errors = {o for o, _ in outcomes if o != "ok"}
    assert errors <= {"RetryGaveUpError", "CircuitOpenError", "RequestTimeoutError"}, errors


async def test_daemon_absent_breaker_opens_fails_fast_and_recovers(
    daemon_factory: Any, autojump_clock: trio.testing.MockClock
) -> None:
    """SPEC presets as they are (5 attempts; 10 failures; 10 s open), on a mock clock."""
    d = daemon_factory(start=False)
    assert IPC_BREAKER.failure_threshold == 10 and IPC_BREAKER.open_timeout == 10.0
    async with open_client(d.socket_path) as client:
        for _ in range(2):  # 2 calls x 5 attempts = the 10 failures that open it
            with pytest.raises(RetryGaveUpError) as info:
                await client.ping()
            assert info.value.attempts == 5 and info.value.reason == "attempts"
            assert isinstance(info.value.__cause__, TransportError)
            assert "No such file" in str(info.value.__cause__) or "ENOENT" in str(
                info.value.__cause__
            )
        stats = client.breaker_statistics()
        assert stats.state == "open" and stats.failures == 10

        start = trio.current_time()
        for _ in range(50):
            with pytest.raises(CircuitOpenError) as opened:
                await client.ping()
        assert trio.current_time() == start  # failed at once: no wait, no connect
        assert opened.value.retry_after == pytest.approx(10.0)

        # The daemon comes back; real I/O from now on, so stop auto-jumping.
        autojump_clock.autojump_threshold = float("inf")
        await trio.to_thread.run_sync(d.start)
        with pytest.raises(CircuitOpenError):
            await client.ping()  # still open: it does not probe early
        autojump_clock.jump(10.0)
        await client.ping()  # the half-open trial reconnects and closes it
        assert client.breaker_statistics().state == "closed"
        await client.ping()


async def test_breaker_recovers_in_real_time_with_a_short_open_timeout(daemon_factory: Any) -> None:
    d = daemon_factory(start=False)
    config = fast_breaker(open_timeout=0.3)
    async with open_client(d.socket_path, config=config) as client:
        for _ in range(2):
            with pytest.raises(RetryExhaustedError):
                await client.ping()
        with pytest.raises(CircuitOpenError) as info:
            await client.ping()
        assert 0 < (info.value.retry_after or 0) <= 0.3
        await trio.to_thread.run_sync(d.start)
        await trio.sleep(0.35)
        await client.ping()
        assert client.breaker_statistics().state == "closed"


async def test_timeouts_count_against_the_breaker(daemon_factory: Any) -> None:
    d = daemon_factory()
    async with open_client(d.socket_path, config=fast_breaker(failure_threshold=3,
                                                              open_timeout=0.3)) as client:
        await client.ping()
        d.signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                with pytest.raises(RequestTimeoutError):
                    await client.ping(timeout=0.1)
            with pytest.raises(CircuitOpenError):
                await client.ping(timeout=0.1)
        finally:
            d.signal(signal.SIGCONT)
        await trio.sleep(0.35)
        await client.ping(timeout=5)
        assert client.breaker_statistics().state == "closed"


async def test_socket_removed_existing_link_lives_new_connects_retry(daemon_factory: Any) -> None:
    d = daemon_factory()
    async with open_client(d.socket_path) as old:
        await old.ping()
        os.unlink(d.socket_path)
        async with open_client(d.socket_path, config=ClientConfig(retry=FAST_RETRY)) as new:
            with pytest.raises(RetryGaveUpError) as info:
                await new.ping()
            assert info.value.attempts == RETRY_PRESETS["ipc"].attempts
        await old.ping()  # its connection does not need the path
        assert old.connects == 1


async def test_eof_in_the_middle_of_a_reply_resends_an_idempotent_request(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        request, _ = await conn.recv()
        assert isinstance(request, Ping)
        frame = encode_framed(Pong(id=request.id))
        if conn.number == 1:
            await conn.send_raw(frame[: len(frame) - 2])  # half a reply, then EOF
            return
        await conn.send_raw(frame)
        await conn.recv()

    async with trio.open_nursery() as nursery:
        peer = await start_peer(nursery, path, script)
        async with open_client(path) as client:
            await client.ping()
            assert client.connects == 2
        assert len(peer.connections) == 2
        nursery.cancel_scope.cancel()


async def test_lost_after_sending_a_non_idempotent_request_is_not_resent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peer.sock"
    reloads: list[int] = []

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while True:
            request, _ = await conn.recv()
            if request is None:
                return
            if isinstance(request, Reload):
                reloads.append(conn.number)
                return  # applied (maybe), then the daemon dies before replying
            await conn.send(Pong(id=request.id))  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            with pytest.raises(ConnectionLostError, match="unknown") as info:
                await client.reload()
            assert info.value.retryable is False
            await client.ping()  # a new connection for what follows
        assert reloads == [1]
        nursery.cancel_scope.cancel()


async def test_non_idempotent_request_is_retried_while_it_could_not_be_sent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "late.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        request, _ = await conn.recv()
        assert isinstance(request, Reload)
        await conn.send(ReloadResult(id=request.id, rules_version="v2", rule_count=3))

    retry = dataclasses.replace(FAST_RETRY, initial=0.02, max_delay=0.05)
    async with open_client(path, config=ClientConfig(retry=retry)) as client, \
            trio.open_nursery() as nursery:

        async def late_start() -> None:
            # The caller's first attempt found no socket; it now sleeps its backoff.
            await trio.testing.wait_all_tasks_blocked(0.005)
            assert client.breaker_statistics().failures >= 1
            await start_peer(nursery, path, script)

        nursery.start_soon(late_start)
        result = await client.reload()
        assert result.rules_version == "v2"
        assert client.breaker_statistics().failures >= 1
        nursery.cancel_scope.cancel()


async def test_subscriptions_are_renewed_after_a_reconnect(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        request, _ = await conn.recv()
        assert isinstance(request, Subscribe)
        await conn.send(Subscribed(id=request.id, topics=request.topics))
        await conn.send(
            Event(id=request.id, topic="services", kind="state", service="database",
                  state="failed", previous="healthy", message=f"conn {conn.number}")
        )
        if conn.number == 1:
            return  # the daemon goes away; the client must come back by itself
        while (request := (await conn.recv())[0]) is not None:
            if isinstance(request, Unsubscribe):
                await conn.send(Ack(id=request.id))

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            seen: list[Event] = []
            sub = await client.subscribe(["services"], callback=seen.append)
            got = []
            with trio.fail_after(10):
                async for event in sub:
                    got.append((event.topic, event.kind, event.message))
                    if event.message == "conn 2":
                        break
            await sub.aclose()
            assert [g[:2] for g in got] == [
                ("services", "state"),
                ("client", "connection_lost"),
                ("client", "resubscribed"),
                ("services", "state"),
            ]
            assert len(seen) == 4  # the callback saw the same events
            assert client.connects == 2
        nursery.cancel_scope.cancel()


def _received(conn: PeerConn, kind: type[Any]) -> list[Any]:
    return [r for r in conn.received if isinstance(r, kind)]


async def test_closing_a_renewed_subscription_unsubscribes_the_renewals_id(
    tmp_path: Path,
) -> None:
    """After a reconnect the daemon knows the subscription by the id of the
    renewing ``subscribe``; the first id ended with the old connection. So
    ``unsubscribe`` must name the renewal's id, on the new connection only,
    and a closed subscription is not renewed on the next one."""
    path = tmp_path / "peer.sock"
    unsubscribed = trio.Event()

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while (request := (await conn.recv())[0]) is not None:
            if isinstance(request, Subscribe):
                await conn.send(Subscribed(id=request.id, topics=request.topics))
                if conn.number == 1:
                    return  # the daemon goes away after the first subscribe
            elif isinstance(request, Unsubscribe):
                unsubscribed.set()
                await conn.send(Ack(id=request.id))
            elif isinstance(request, Ping):
                await conn.send(Pong(id=request.id))

    async with trio.open_nursery() as nursery:
        peer = await start_peer(nursery, path, script)
        async with open_client(path, config=fast_breaker(open_timeout=0.3)) as client:
            sub = await client.subscribe(["services"])
            with trio.fail_after(10):
                async for event in sub:
                    if event.kind == "resubscribed":
                        break
            await sub.aclose()
            first, second = peer.connections[:2]
            (renewal,) = _received(second, Subscribe)
            with trio.fail_after(5):  # usually sent by aclose; by the renewal if it raced it
                await unsubscribed.wait()
            assert [u.subscription for u in _received(second, Unsubscribe)] == [renewal.id]
            assert _received(first, Unsubscribe) == []
            second.close()
            with trio.fail_after(10):
                while len(peer.connections) < 3:
                    with contextlib.suppress(SentinelError):
                        await client.ping()
            assert _received(peer.connections[2], Subscribe) == []
        nursery.cancel_scope.cancel()


async def test_a_subscription_closed_while_its_renewal_is_in_flight_is_unsubscribed(
    tmp_path: Path,
) -> None:
    """Closed between sending the renewing ``subscribe`` and its reply, a
    subscription has no id the daemon acknowledged yet: the reply, when it
    comes, must be followed by an ``unsubscribe`` for it, or the daemon keeps
    a slot for a subscription nobody holds."""
    path = tmp_path / "peer.sock"
    renewal_arrived = trio.Event()
    answer_renewal = trio.Event()
    unsubscribed = trio.Event()

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while (request := (await conn.recv())[0]) is not None:
            if isinstance(request, Subscribe):
                if conn.number == 1:
                    await conn.send(Subscribed(id=request.id, topics=request.topics))
                    return
                renewal_arrived.set()
                await answer_renewal.wait()
                await conn.send(Subscribed(id=request.id, topics=request.topics))
            elif isinstance(request, Unsubscribe):
                unsubscribed.set()
                await conn.send(Ack(id=request.id))

    async with trio.open_nursery() as nursery:
        peer = await start_peer(nursery, path, script)
        async with open_client(path, config=fast_breaker(open_timeout=0.3)) as client:
            sub = await client.subscribe(["services"])
            with trio.fail_after(10):
                await renewal_arrived.wait()
            await sub.aclose()  # nothing acknowledged on this link: nothing to name yet
            second = peer.connections[1]
            assert _received(second, Unsubscribe) == []
            answer_renewal.set()
            (renewal,) = _received(second, Subscribe)
            with trio.fail_after(5):
                await unsubscribed.wait()
            assert [u.subscription for u in _received(second, Unsubscribe)] == [renewal.id]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("daemon", ["silent", "unknown_type", "hangs_up"])
async def test_closing_a_subscription_never_raises_and_stays_quick(
    tmp_path: Path, daemon: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ``unsubscribe`` is best effort: a daemon that never answers it, one
    too old to know it, or one that hangs up on it cost at most
    ``UNSUBSCRIBE_TIMEOUT``, are logged at debug level, never raised, and the
    client stays usable."""
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while (request := (await conn.recv())[0]) is not None:
            if isinstance(request, Subscribe):
                await conn.send(Subscribed(id=request.id, topics=request.topics))
            elif isinstance(request, Ping):
                await conn.send(Pong(id=request.id))
            elif isinstance(request, Unsubscribe):
                if daemon == "hangs_up":
                    return
                if daemon == "unknown_type":
                    await conn.send(Error(id=request.id, code="unknown_type",
                                          message="unsubscribe is not served by this daemon"))

    caplog.set_level(logging.DEBUG, logger="sentinel")
    async with trio.open_nursery() as nursery:
        peer = await start_peer(nursery, path, script)
        async with open_client(path, config=fast_breaker(open_timeout=0.3)) as client:
            sub = await client.subscribe(["services"])
            (subscribe,) = _received(peer.connections[0], Subscribe)
            started = trio.current_time()
            await sub.aclose()
            took = trio.current_time() - started
            assert took < UNSUBSCRIBE_TIMEOUT + 0.5
            if daemon == "silent":
                assert took >= UNSUBSCRIBE_TIMEOUT * 0.9  # it did wait for the ack
            (unsubscribe,) = _received(peer.connections[0], Unsubscribe)
            assert unsubscribe.subscription == subscribe.id
            failed = [r for r in caplog.records if r.getMessage() == "client_unsubscribe_failed"]
            assert [r.levelno for r in failed] == [logging.DEBUG]
            await client.ping()  # usable (after a reconnect, for the one that hung up)
            assert client.connects == (2 if daemon == "hangs_up" else 1)
        nursery.cancel_scope.cancel()


async def test_breaker_trip_via_daemon_control_is_not_the_clients_breaker(
    tmp_path: Path,
) -> None:
    """Control replies are plain acks; the client's own breaker is separate."""
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while True:
            request, _ = await conn.recv()
            if request is None:
                return
            await conn.send(Ack(id=request.id, detail="tripped"))  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            assert (await client.breaker_trip("database")).detail == "tripped"
            assert client.breaker_statistics().state == "closed"
        nursery.cancel_scope.cancel()


# --- against the real daemon's subscribe / breakers / scans (as they land) --------------------


async def test_real_subscription_survives_a_daemon_kill(daemon_factory: Any) -> None:
    d = daemon_factory()
    config = fast_breaker(open_timeout=0.3)
    async with open_client(d.socket_path, config=config) as client:
        sub = await client.subscribe(["services", "degraded"])
        d.kill()
        await trio.to_thread.run_sync(d.start)
        kinds = []
        with trio.fail_after(15):
            async for event in sub:
                if event.topic == "client":
                    kinds.append(event.kind)
                if kinds[-1:] == ["resubscribed"]:
                    break
        assert kinds == ["connection_lost", "resubscribed"]
        assert client.connects == 2  # reconnected by the keeper: nobody was calling
        await sub.aclose()


async def test_degraded_notice_reaches_a_subscriber_and_the_buttons_work(
    daemon_factory: Any
) -> None:
    d = daemon_factory()
    async with open_client(d.socket_path) as client:
        names = [b.name for b in (await client.breakers()).breakers]
        if "database" not in names:
            pytest.skip("no database breaker in the daemon yet")
        notices: list[Event] = []
        sub = await client.subscribe(["degraded"], callback=notices.append)
        await client.breaker_trip("database")
        try:
            with trio.fail_after(10):
                async for event in sub:
                    if event.kind == "degraded_notice" and event.service == "database":
                        break
            notice = notices[-1]
            assert "degraded mode" in (notice.message or "")
            assert notice.actions == ["Retry Connection", "Continue with Cache"]
            assert isinstance(await client.acknowledge_degraded("database"), Ack)
        finally:
            await client.breaker_reset("database")
        await sub.aclose()


async def test_real_stream_scan_restarts_after_a_daemon_kill(
    daemon_factory: Any, tmp_path: Path
) -> None:
    import hashlib

    d = daemon_factory()
    sample = tmp_path / "big.bin"
    content = os.urandom(256 * 1024)
    sample.write_bytes(content)
    config = dataclasses.replace(fast_breaker(open_timeout=0.3), chunk_size=16 * 1024)
    async with open_client(d.socket_path, config=config) as client:
        try:
            await client.scan(b"probe")
        except UnknownMessageTypeError:
            pytest.skip("scan not served yet")
        progress: list[int] = []

        def on_progress(sent: int, total: int | None) -> None:
            progress.append(sent)
            if len(progress) == 4 and client.connects == 1:
                d.kill()  # mid-stream, after the 4th chunk
                d.start()

        result = await client.scan_file(sample, method="stream", progress=on_progress)
        assert client.connects == 2
        assert result.sha256 == hashlib.sha256(content).hexdigest()
        assert result.size == len(content)
        assert progress.count(16 * 1024) == 2  # the stream started over from byte 0


async def test_closing_the_client_fails_calls_in_flight_at_once(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while (await conn.recv())[0] is not None:
            pass  # never answers

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            await client.connect()
            errors: list[BaseException] = []

            async def call() -> None:
                try:
                    await client.ping(timeout=30)
                except TransportError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as calls:
                for _ in range(3):
                    calls.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                start = trio.current_time()
                await client.aclose()
            assert trio.current_time() - start < 0.5  # no retries after close
            assert len(errors) == 3 and all("closed" in str(e) for e in errors)
            with pytest.raises(TransportError, match="closed"):
                await client.ping()
        nursery.cancel_scope.cancel()
