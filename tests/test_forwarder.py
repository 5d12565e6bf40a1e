"""Event forwarding against a real HTTP receiver on 127.0.0.1: order and batches,
an outage of several minutes (trio MockClock) with every event arriving by id,
restarts and a kill -9 with events in the outbox, a full outbox, a refused
event, an auth failure, health and metrics, and a real daemon forwarding."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import trio
import trio.testing
from http_fixture import HttpFixture, serve_http

from sentinel_ipc.external import (
    ForwardConfig,
    HttpTimeouts,
    external_health,
    open_event_forwarder,
)
from sentinel_ipc.external.metrics import ExternalCollector, external_check
from sentinel_ipc.resilience import BreakerState

ROOT = Path(__file__).resolve().parent.parent
#: Under MockClock(autojump_threshold=0) any pending timeout is jumped to while a
#: real socket is waited on, so those tests run without network timeouts.
NO_TIMEOUTS = HttpTimeouts(connect=None, read=None, total=None)


@pytest.fixture
def receiver() -> Iterator[HttpFixture]:
    with serve_http() as fixture:
        yield fixture


def config(receiver: HttpFixture, **kw: Any) -> ForwardConfig:
    base: dict[str, Any] = {"url": receiver.url + "/events"}
    base.update(kw)
    return ForwardConfig(**base)


async def wait_until(predicate: Any, *, real_timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a sleep per poll) until true; bounded in real time.

    Under MockClock(autojump_threshold=0) a bare ``trio.sleep(30)`` can pass
    while a real request or fsync is still in flight; waiting for the condition
    itself is what makes those tests deterministic."""
    limit = time.monotonic() + real_timeout
    while not predicate():
        assert time.monotonic() < limit, "condition not reached in time"
        await trio.sleep(0.5)


def assert_exactly_once(receiver: HttpFixture, ids: list[str]) -> int:
    """Every id arrived; returns (and prints) how many arrived more than once."""
    got = receiver.unique_ids()
    missing = [i for i in ids if i not in got]
    assert not missing, f"{len(missing)} events never arrived: {missing[:5]}"
    duplicates = receiver.duplicates()
    print(f"\n[forwarder] {len(ids)} events, {duplicates} duplicate deliveries")
    return duplicates


async def test_events_arrive_in_order_in_bounded_batches(
    receiver: HttpFixture, tmp_path: Path
) -> None:
    async with open_event_forwarder(config(receiver, batch_size=4), tmp_path) as fwd:
        ids = [fwd.emit("detection", "high", {"n": i, "path": Path("/x")}) for i in range(10)]
        assert all(isinstance(i, str) for i in ids)
        with trio.fail_after(10):
            await fwd.wait_delivered()
        stats = fwd.statistics()
    assert receiver.received_ids == ids  # in order, each once
    assert all(len(b["events"]) <= 4 for b in receiver.batches)
    first = receiver.batches[0]["events"][0]
    assert first["kind"] == "detection" and first["priority"] == "high"
    assert first["payload"] == {"n": 0, "path": "/x"} and first["time"].endswith("Z")
    assert receiver.batches[0]["dropped_total"] == 0
    origin = str(ids[0]).rsplit("-", 1)[0]
    assert all(h["Idempotency-Key"].startswith(origin) for h in receiver.headers_seen)
    assert stats.outbox.delivered_total == 10 and stats.outbox.pending == 0
    assert stats.batches_sent == len(receiver.batches)


async def test_outage_of_several_minutes_loses_no_event(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The receiver is gone for ~5 minutes of (mock) time while detections keep
    coming; the breaker opens and probes; after recovery every event arrives, in
    order, by id; duplicates are counted and reported."""
    transitions: list[tuple[str, str]] = []
    receiver.go_away()
    cfg = config(receiver, timeouts=NO_TIMEOUTS, batch_size=7)
    started_real = time.monotonic()
    async with open_event_forwarder(cfg, tmp_path) as fwd:
        fwd.breaker.add_listener(lambda t: transitions.append((t.from_state, t.to_state)))
        t0 = trio.current_time()
        ids: list[str] = []
        for i in range(30):  # one event every 10 s for 5 minutes
            event_id = fwd.emit("detection", "high", {"n": i})
            assert event_id is not None
            ids.append(event_id)
            await trio.sleep(10)
        assert trio.current_time() - t0 >= 300
        await wait_until(
            lambda: transitions.count((BreakerState.HALF_OPEN, BreakerState.OPEN)) >= 2
        )
        stats = fwd.statistics()
        assert stats.outbox.pending == 30 and receiver.received_ids == []
        assert stats.consecutive_failures >= 3 and stats.last_error
        assert (BreakerState.CLOSED, BreakerState.OPEN) in transitions
        assert transitions.count((BreakerState.HALF_OPEN, BreakerState.OPEN)) >= 2  # it probed
        assert external_health(None, fwd, now=time.time(), max_age=1e9).status == "degraded"

        receiver.come_back()
        recovered_at = trio.current_time()
        await fwd.wait_delivered()
        recovery = trio.current_time() - recovered_at
        assert fwd.breaker.statistics().state is BreakerState.CLOSED
        assert transitions[-1] == (BreakerState.HALF_OPEN, BreakerState.CLOSED)
        assert fwd.statistics().outbox.delivered_total == 30
    assert_exactly_once(receiver, ids)
    assert receiver.received_ids == sorted(set(receiver.received_ids), key=ids.index)
    # Recovery waits at most the breaker's open time (60 s) plus its jitter.
    assert recovery <= 60 * 1.1 + 1, recovery
    assert time.monotonic() - started_real < 20  # mock time, not real sleeps


async def test_round_backoff_never_waits_longer_than_backoff_max(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The retry formula jitters *above* its capped ceiling (SPEC section 3);
    between rounds the forwarder clamps again, so ``backoff_max`` is the
    longest wait an operator ever sees. The breaker is disabled here so the
    round backoff alone decides."""
    receiver.go_away()
    cfg = config(receiver, timeouts=NO_TIMEOUTS, backoff_initial=1.0, backoff_max=4.0)
    waits: list[float] = []
    async with open_event_forwarder(cfg, tmp_path, rng=random.Random(7)) as fwd:
        fwd.breaker.disable(trio.current_time())
        fwd.emit("detection", "high", {})
        for _ in range(40):
            await wait_until(lambda: fwd.statistics().next_attempt_in is not None)
            next_in = fwd.statistics().next_attempt_in
            assert next_in is not None
            waits.append(next_in)
            await trio.sleep(next_in + 0.01)
    assert len(waits) == 40 and max(waits) <= 4.0, waits
    assert max(waits) > 3.0  # the backoff did grow up to the cap


async def test_retry_connection_cuts_the_backoff_short(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The degraded notice's *Retry Connection* half-opens the breaker; the
    sender then tries at once instead of sleeping out its backoff."""
    receiver.go_away()
    async with open_event_forwarder(config(receiver, timeouts=NO_TIMEOUTS), tmp_path) as fwd:
        event_id = fwd.emit("detection", "high", {})
        await wait_until(lambda: fwd.breaker.state is BreakerState.OPEN)
        await wait_until(lambda: (fwd.statistics().next_attempt_in or 0) > 30)  # backing off
        receiver.come_back()
        pressed = trio.current_time()
        assert fwd.breaker.half_open(trio.current_time(), reason="Retry Connection")
        await fwd.wait_delivered()
        assert trio.current_time() - pressed < 1.0
    assert receiver.received_ids == [event_id]


async def test_restart_delivers_what_was_left_in_the_outbox(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.go_away()
    cfg = config(receiver, timeouts=NO_TIMEOUTS)
    async with open_event_forwarder(cfg, tmp_path) as fwd:
        ids = [fwd.emit("policy_change", "normal", {"n": i}) for i in range(20)]
        await wait_until(lambda: fwd.statistics().consecutive_failures >= 2)
        assert len(fwd.outbox) == 20
    # Closed with everything still pending; the receiver comes back; a new
    # forwarder on the same outbox delivers all of it.
    receiver.come_back()
    async with open_event_forwarder(cfg, tmp_path) as fwd:
        assert fwd.statistics().outbox.pending == 20
        more = fwd.emit("policy_change", "normal", {"n": 20})
        await fwd.wait_delivered()
    assert_exactly_once(receiver, [i for i in ids if i] + [more or ""])
    seqs = [int(i.rsplit("-", 1)[1]) for i in receiver.received_ids]
    assert seqs == sorted(seqs) and seqs[-1] == 21


async def test_kill_9_keeps_every_flushed_event(receiver: HttpFixture, tmp_path: Path) -> None:
    """A real crash: a child process queues events while the receiver is down,
    waits for ``flush()``, and is killed with SIGKILL. Everything it flushed is
    delivered by the next forwarder on the same data dir."""
    receiver.go_away()
    script = textwrap.dedent(
        f"""
        import trio
        from sentinel_ipc.external import ForwardConfig, open_event_forwarder
        async def main():
            cfg = ForwardConfig(url={receiver.url + "/events"!r})
            async with open_event_forwarder(cfg, {str(tmp_path)!r}) as fwd:
                ids = [fwd.emit("quarantine", "high", {{"n": i}}) for i in range(50)]
                await fwd.flush()
                print(",".join(ids), flush=True)
                await trio.sleep(60)
        trio.run(main)
        """
    )
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert child.stdout is not None
        output = b""
        with trio.fail_after(20):
            while not output.endswith(b"\n"):
                chunk = await child.stdout.receive_some()
                assert chunk, "child exited before flushing"
                output += chunk
        ids = output.decode().strip().split(",")
        assert len(ids) == 50
    finally:
        child.kill()  # SIGKILL: no shutdown code runs
        with trio.fail_after(10):
            await child.wait()
        if child.stdout is not None:
            await child.stdout.aclose()
    assert child.returncode == -signal.SIGKILL
    receiver.come_back()
    async with open_event_forwarder(config(receiver), tmp_path) as fwd:
        with trio.fail_after(10):
            await fwd.wait_delivered()
    assert_exactly_once(receiver, ids)


async def test_full_outbox_drops_oldest_low_priority_and_reports_it(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.go_away()
    cfg = config(receiver, timeouts=NO_TIMEOUTS, outbox_max_events=10)
    async with open_event_forwarder(cfg, tmp_path) as fwd:
        high = [fwd.emit("detection", "high", {"n": i}) for i in range(5)]
        low = [fwd.emit("daemon_started", "low", {"n": i}) for i in range(20)]
        assert all(high) and all(low)  # a low event was accepted, evicting an older one
        await fwd.flush()
        stats = fwd.statistics().outbox
        assert stats.pending == 10 and stats.dropped_total == 15
        assert stats.by_priority == {"low": 5, "normal": 0, "high": 5}
        receiver.come_back()
        fwd.retry_now()
        await fwd.wait_delivered()
    got = receiver.unique_ids()
    assert set(high) <= got  # no high-priority event was given up
    assert got & set(low) == set(low[-5:])  # the newest low ones survived
    assert receiver.batches[-1]["dropped_total"] == 15  # the receiver is told
    assert fwd.statistics().outbox.dropped_total == 15


async def test_refused_event_is_isolated_and_the_rest_delivered(
    receiver: HttpFixture, tmp_path: Path
) -> None:
    receiver.reject_kinds = {"poison"}
    async with open_event_forwarder(config(receiver, batch_size=8), tmp_path) as fwd:
        ids = []
        for i in range(9):
            ids.append(fwd.emit("poison" if i == 5 else "detection", "normal", {"n": i}))
        with trio.fail_after(10):
            await fwd.wait_delivered()
        stats = fwd.statistics()
    good = [i for n, i in enumerate(ids) if n != 5]
    assert receiver.received_ids == good
    assert stats.outbox.rejected_total == 1 and stats.outbox.delivered_total == 8
    assert receiver.rejected_batches >= 2  # the batch was halved down to the poison event
    assert stats.breaker_state == "closed"  # a 400 is not an outage


async def test_auth_failure_keeps_events_and_is_reported(
    receiver: HttpFixture, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver.set_mode("fail", status=401)
    cfg = config(receiver, timeouts=NO_TIMEOUTS)
    async with open_event_forwarder(cfg, tmp_path) as fwd:
        event_id = fwd.emit("detection", "high", {})
        await wait_until(lambda: fwd.statistics().consecutive_failures >= 2)
        stats = fwd.statistics()
        assert stats.outbox.pending == 1 and "401" in (stats.last_error or "")
        assert stats.breaker_state == "closed"  # our fault, not the receiver's outage
        assert receiver.requests_by_mode["fail"] >= 2  # retried, with backoff
        receiver.set_mode("ok")
        fwd.retry_now()
        await fwd.wait_delivered()
    assert receiver.received_ids == [event_id]


async def test_connection_closed_mid_answer_is_retried(
    receiver: HttpFixture, tmp_path: Path
) -> None:
    receiver.set_mode("close", times=2)
    async with open_event_forwarder(config(receiver), tmp_path) as fwd:
        ids = [fwd.emit("detection", "high", {"n": i}) for i in range(3)]
        with trio.fail_after(10):
            await fwd.wait_delivered()
        requests = fwd.metrics.statistics()
    assert_exactly_once(receiver, [i for i in ids if i])
    assert requests.requests_for("forward", "protocol_error") == 2
    assert requests.requests_for("forward", "ok") >= 1


async def test_health_and_prometheus_metrics(receiver: HttpFixture, tmp_path: Path) -> None:
    async with open_event_forwarder(config(receiver), tmp_path) as fwd:
        fwd.emit("detection", "high", {})
        with trio.fail_after(10):
            await fwd.wait_delivered()
        outcome = await external_check(None, fwd)()
        assert outcome.ok and outcome.value == 0.0
        registry = prometheus_client.CollectorRegistry()
        registry.register(ExternalCollector(fwd.metrics, lambda: fwd))
        text = prometheus_client.generate_latest(registry).decode()
    assert 'sentinel_external_requests_total{outcome="ok",target="forward"} 1.0' in text
    assert 'sentinel_external_request_duration_seconds_count{target="forward"} 1.0' in text
    assert 'sentinel_outbox_events{state="pending"} 0.0' in text
    assert 'sentinel_outbox_events_removed_total{outcome="delivered"} 1.0' in text
    assert "sentinel_outbox_oldest_event_age_seconds 0.0" in text


def test_real_daemon_forwards_and_reports_external_state(
    receiver: HttpFixture, daemon_factory: Any, tmp_path: Path
) -> None:
    """sentineld with [forward] and [reputation]: its outbox lives in the data dir,
    its first event reaches the receiver, health has an ``external`` component,
    the breakers and the metrics include the integrations; it stops cleanly."""
    from sentinel_ipc.client import open_client

    daemon = daemon_factory(
        config={
            "forward": {"url": receiver.url + "/events"},
            "reputation": {"url": receiver.url + "/reputation"},
        }
    )
    deadline = time.monotonic() + 15
    while not receiver.batches and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.batches, daemon.log()
    event = receiver.batches[0]["events"][0]
    assert event["kind"] == "daemon_started" and event["payload"]["pid"] == daemon.pid
    assert (Path(daemon.data_dir) / "outbox" / "outbox.log").exists()

    async def ask() -> tuple[Any, Any, Any]:
        async with open_client(daemon.socket_path) as client:
            return (
                await client.health(timeout=5),
                await client.breakers(timeout=5),
                await client.metrics(timeout=5),
            )

    health, breakers, metrics = trio.run(ask)
    assert health.components["external"].status == "healthy", health
    names = {b.name for b in breakers.breakers}
    assert {"external.forward", "external.reputation"} <= names
    assert 'sentinel_external_requests_total{outcome="ok",target="forward"}' in metrics.text
    assert 'sentinel_outbox_events{state="pending"}' in metrics.text
    daemon.stop()
    assert json.dumps(event)  # plain JSON all the way


async def test_real_daemon_forwards_under_the_configured_external_breaker_and_retry(
    receiver: HttpFixture, daemon_factory: Any
) -> None:
    """``[resilience.breakers.external]`` and ``[resilience.retries.external]``
    reach the forwarder the daemon builds: against a receiver that refuses every
    connection, one attempt per round (``attempts = 1``) and ``failure_threshold
    = 1`` open its breaker after a single failed POST. SPEC's defaults would make
    three attempts, three failures, before it opened."""
    from sentinel_ipc.client import open_client

    receiver.go_away()
    daemon = daemon_factory(config={
        "forward": {"url": receiver.url + "/events"},
        "resilience": {
            "breakers": {"external": {
                "failure_threshold": 1, "open_timeout": 60.0, "success_threshold": 2,
            }},
            "retries": {"external": {
                "attempts": 1, "initial": 0.01, "max_delay": 0.01, "multiplier": 1.0,
            }},
        },
    })
    async with open_client(daemon.socket_path) as client:
        with trio.fail_after(15):
            while True:
                report = await client.breakers(timeout=5)
                info = {b.name: b for b in report.breakers}["external.forward"]
                if info.state != "closed":
                    break
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # a retry the policy should not make would land here
        report = await client.breakers(timeout=5)
    info = {b.name: b for b in report.breakers}["external.forward"]
    assert info.state == "open" and info.failures_total == 1, info
    daemon.stop()
