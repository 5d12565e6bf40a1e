"""FallbackManager, the pure degradation state machine: every (state, event)
pair, the derived system state, events, acknowledgements and persistence."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sentinel_ipc.resilience import (
    BreakerConfig,
    CircuitBreaker,
    FallbackEvent,
    FallbackManager,
    ServiceState,
    ServiceTransition,
)
from sentinel_ipc.resilience.fallback import TRANSITIONS

H, D, F, C = "healthy", "degraded", "failed", "critical"

# The table of the module docstring, written out again by hand so that a
# change to the code's table has to be a change to this one too.
EXPECTED = {
    "primary_ok": {H: H, D: H, F: H, C: H},
    "primary_degraded": {H: D, D: D, F: D, C: D},
    "primary_failed": {H: F, D: F, F: F, C: C},
    "fallback_failed": {H: H, D: D, F: C, C: C},
    "fallback_ok": {H: H, D: D, F: F, C: F},
}
# How to put a fresh service into each state.
SETUP = {
    H: [],
    D: ["primary_degraded"],
    F: ["primary_failed"],
    C: ["primary_failed", "fallback_failed"],
}
TABLE = [(start, event, end) for event, row in EXPECTED.items() for start, end in row.items()]


def manager(**kwargs: Any) -> tuple[FallbackManager, list[ServiceTransition]]:
    fm = FallbackManager(**kwargs)
    events: list[ServiceTransition] = []
    fm.add_listener(events.append)
    return fm, events


@pytest.mark.parametrize(("start", "event", "end"), TABLE, ids=[f"{s}-{e}" for s, e, _ in TABLE])
def test_every_state_and_event(start: str, event: str, end: str) -> None:
    fm, events = manager()
    t = 0.0
    for step in SETUP[start]:
        t += 1
        fm.handle("database", FallbackEvent(step), f"setup {step}", t)
    assert fm.status("database").state == start
    events.clear()
    result = fm.handle("database", FallbackEvent(event), "the event", 100.0)
    status = fm.status("database")
    assert status.state == end
    if start == end:
        assert result is None and events == []  # no event without a change
        assert status.changed_at == (None if start == H else t)
    else:
        assert result is not None and events == [result]
        assert (result.from_state, result.to_state, result.reason, result.at) == (
            start,
            end,
            "the event",
            100.0,
        )
        assert status.changed_at == 100.0 and status.reason == "the event"


def test_code_table_is_complete() -> None:
    assert len(TRANSITIONS) == len(ServiceState) * len(FallbackEvent) == len(TABLE)


SYSTEM_CASES = [
    ({}, H),
    ({"memory": "primary_degraded"}, D),
    ({"memory": "primary_degraded", "database": "primary_failed"}, F),
    ({"database": "primary_failed", "yara": "primary_failed"}, F),
    ({"disk": "primary_degraded", "database": "primary_failed", "ipc": "primary_degraded"}, F),
]


@pytest.mark.parametrize(("events", "system"), SYSTEM_CASES)
def test_system_state_is_the_worst_service_state(events: dict[str, str], system: str) -> None:
    fm, _ = manager()
    for t, (service, event) in enumerate(events.items()):
        fm.handle(service, FallbackEvent(event), "x", float(t))
    assert fm.system_state == system
    assert fm.statistics().degraded_mode is (system != H)


def test_system_transitions_mark_degraded_mode_start_and_end() -> None:
    fm, events = manager()
    fm.primary_failed("database", "database connection lost", 1.0)
    fm.primary_degraded("memory", "rss 2.1 GB", 2.0)
    fm.fallback_failed("database", "cache miss", 3.0)
    fm.primary_ok("memory", now=4.0)
    fm.primary_ok("database", now=5.0)
    assert [(e.service, e.system_from, e.system_to) for e in events] == [
        ("database", H, F),
        ("memory", F, F),
        ("database", F, C),
        ("memory", C, C),
        ("database", C, H),
    ]
    stats = fm.statistics()
    assert stats.system == H and stats.system_changed_at == 5.0 and stats.transitions == 5


def test_no_cascade_between_services() -> None:
    fm, events = manager()
    fm.primary_failed("database", "down", 1.0)
    fm.fallback_failed("database", "cache gone", 2.0)
    for other in ("yara", "ipc", "disk", "memory"):
        assert fm.status(other).state == H and fm.status(other).changed_at is None
    assert {e.service for e in events} == {"database"}


def test_same_state_refreshes_the_reason_without_an_event() -> None:
    fm, events = manager()
    fm.primary_failed("database", "connection lost", 1.0)
    fm.primary_failed("database", "file deleted under us", 9.0)
    status = fm.status("database")
    assert (status.reason, status.changed_at, len(events)) == ("file deleted under us", 1.0, 1)


def test_acknowledge_lasts_until_the_state_changes() -> None:
    fm, _ = manager()
    assert fm.acknowledge("database") is False  # healthy: nothing to acknowledge
    fm.primary_failed("database", "down", 1.0)
    assert fm.acknowledge("database") is True and fm.status("database").acknowledged
    fm.primary_failed("database", "still down", 2.0)  # same episode
    assert fm.status("database").acknowledged
    fm.fallback_failed("database", "cache broke", 3.0)  # a new state: announce again
    assert not fm.status("database").acknowledged


def test_later_services_and_unknown_names() -> None:
    fm, _ = manager(services=("database",))
    with pytest.raises(ValueError, match=r"unknown service 'network'.*register"):
        fm.primary_failed("network", "timeout", 0.0)
    fm.register("network")
    fm.register("network")  # idempotent
    fm.primary_failed("network", "timeout", 0.0)
    assert fm.services == ("database", "network") and fm.system_state == F
    with pytest.raises(ValueError):
        fm.register("")


def test_clock_and_listener_errors() -> None:
    t = [7.0]
    fm = FallbackManager(clock=lambda: t[0])

    def broken(_: ServiceTransition) -> None:
        raise RuntimeError("subscriber bug")

    fm.add_listener(broken)
    fm.primary_failed("yara", "worker pool crashed")
    assert fm.status("yara").changed_at == 7.0
    assert fm.statistics().listener_errors == 1
    fm.remove_listener(broken)
    fm.primary_ok("yara")
    assert fm.statistics().listener_errors == 1
    with pytest.raises(TypeError, match="no clock"):
        FallbackManager().primary_ok("database")


def test_fed_by_a_real_breaker() -> None:
    fm, events = manager()
    breaker = CircuitBreaker(
        "database", BreakerConfig(failure_threshold=2, open_timeout=10.0, success_threshold=1)
    )
    breaker.add_listener(fm.breaker_listener("database"))
    for t in (0.0, 1.0):
        breaker.record_failure(breaker.acquire(t), t, ConnectionError("gone"))
    status = fm.status("database")
    assert status.state == F and status.changed_at == 1.0
    assert "breaker database open" in status.reason and "ConnectionError: gone" in status.reason
    trial = breaker.acquire(11.0)  # half-open: not a recovery yet
    assert fm.status("database").state == F
    breaker.record_success(trial, 11.5)
    assert fm.status("database").state == H and fm.status("database").changed_at == 11.5
    breaker.trip(20.0)
    assert fm.status("database").state == F
    assert [e.to_state for e in events] == [F, H, F]


# --- persistence -------------------------------------------------------------------


def test_snapshot_round_trip_through_json() -> None:
    fm, _ = manager()
    fm.primary_failed("database", "database connection lost, using cached policies", 100.0)
    fm.acknowledge("database")
    fm.primary_degraded("memory", "rss high", 130.0)
    data = json.loads(json.dumps(fm.snapshot(150.0)))

    restored, events = manager()
    restored.restore(data, 5.0, elapsed=20.0)  # new process, new clock, 20 s later
    db = restored.status("database")
    assert (db.state, db.acknowledged) == (F, True)
    assert db.reason == "database connection lost, using cached policies"
    assert db.changed_at == pytest.approx(5.0 - 50.0 - 20.0)
    assert restored.status("memory").changed_at == pytest.approx(5.0 - 20.0 - 20.0)
    assert restored.status("yara").state == H and restored.status("yara").changed_at is None
    assert restored.system_state == F
    assert sorted((e.service, e.to_state) for e in events) == [("database", F), ("memory", D)]


def test_restore_registers_services_it_did_not_know() -> None:
    fm = FallbackManager(services=("database", "network"))
    fm.primary_failed("network", "timeout", 0.0)
    restored = FallbackManager(services=("database",))
    restored.restore(fm.snapshot(1.0), 0.0)
    assert restored.status("network").state == F


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"version": 2, "services": {}}, "version"),
        ({"version": 1}, r"\$\.services"),
        ({"version": 1, "services": {"db": {"state": "melted"}}}, r"unknown state.*db\.state"),
        ({"version": 1, "services": {"db": {"state": "failed", "reason": 3}}}, "reason"),
        (
            {"version": 1, "services": {"db": {"state": "failed", "changed_ago": "x"}}},
            "changed_ago",
        ),
        ({"version": 1, "services": {"db": []}}, r"object at \$\.services\.db"),
    ],
)
def test_restore_rejects_malformed_snapshots_and_changes_nothing(
    data: dict[str, Any], message: str
) -> None:
    fm, events = manager()
    with pytest.raises(ValueError, match=message):
        fm.restore(data, 0.0)
    assert events == [] and fm.system_state == H and "db" not in fm.services
