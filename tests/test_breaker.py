"""CircuitBreaker, the pure state machine: every transition, trip rule and
manual action, driven by a manual clock (``now`` passed in)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_ipc.errors import CircuitOpenError, LocalProtocolError
from sentinel_ipc.resilience import (
    BREAKER_PRESETS,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CallOutcome,
    CircuitBreaker,
    Permit,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
FORCED_OPEN, DISABLED = BreakerState.FORCED_OPEN, BreakerState.DISABLED


class Boom(Exception):
    pass


class NotOurs(Exception):
    """An error the classifier says nothing about the dependency."""


def only_boom(error: BaseException) -> bool:
    return isinstance(error, Boom)


# --- a tiny script language for table-driven cases --------------------------------
#
# (t, op): at time t do op. ops:
#   ok / fail / ignore   acquire and settle at once (acquire must succeed)
#   reject               acquire must raise CircuitOpenError
#   hold                 acquire and keep the permit (a call in flight)
#   hold_ok / hold_fail / hold_release   settle the oldest held permit
#   trip / trip5 / reset / disable / half_open / tick   manual actions; tick = statistics()


@dataclass
class Run:
    breaker: CircuitBreaker
    events: list[BreakerTransition] = field(default_factory=list)
    held: list[Permit] = field(default_factory=list)
    rejections: list[CircuitOpenError] = field(default_factory=list)


def run(config: BreakerConfig, script: list[tuple[float, str]]) -> Run:
    breaker = CircuitBreaker("dep", config)
    result = Run(breaker)
    breaker.add_listener(result.events.append)
    for t, op in script:
        if op in ("ok", "fail", "ignore"):
            permit = breaker.acquire(t)
            if op == "ok":
                breaker.record_success(permit, t)
            elif op == "fail":
                assert breaker.record_error(permit, Boom("down"), t) is CallOutcome.FAILURE
            else:
                assert breaker.record_error(permit, NotOurs("meh"), t) is CallOutcome.IGNORED
        elif op == "reject":
            with pytest.raises(CircuitOpenError) as info:
                breaker.acquire(t)
            result.rejections.append(info.value)
        elif op == "hold":
            result.held.append(breaker.acquire(t))
        elif op == "hold_ok":
            breaker.record_success(result.held.pop(0), t)
        elif op == "hold_fail":
            breaker.record_failure(result.held.pop(0), t, Boom("late"))
        elif op == "hold_release":
            breaker.release(result.held.pop(0))
        elif op == "trip":
            breaker.trip(t)
        elif op == "trip5":
            breaker.trip(t, timeout=5.0)
        elif op == "reset":
            breaker.reset(t)
        elif op == "disable":
            breaker.disable(t)
        elif op == "half_open":
            breaker.half_open(t)
        elif op == "tick":
            breaker.statistics(t)
        else:  # pragma: no cover - a typo in a table
            raise AssertionError(op)
    return result


def fails(n: int, start: float = 0.0, step: float = 0.1) -> list[tuple[float, str]]:
    return [(start + i * step, "fail") for i in range(n)]


SPEC_DB = BreakerConfig(
    failure_threshold=5, open_timeout=30.0, success_threshold=2, is_failure=only_boom
)


@dataclass(frozen=True)
class Case:
    name: str
    script: list[tuple[float, str]]
    state: BreakerState
    transitions: list[tuple[BreakerState, BreakerState]]
    config: BreakerConfig = SPEC_DB


CASES = [
    Case("below threshold stays closed", fails(4), CLOSED, []),
    Case("trips at threshold", fails(5), OPEN, [(CLOSED, OPEN)]),
    Case("a success resets the streak", [*fails(4), (1, "ok"), *fails(4, 2)], CLOSED, []),
    Case("ignored errors count as neither", [(t, "ignore") for t in range(20)], CLOSED, []),
    Case(
        "ignored errors do not break a streak",
        [*fails(4), (1, "ignore"), (2, "fail")],
        OPEN,
        [(CLOSED, OPEN)],
    ),
    Case("stays open during the timeout", [*fails(5), (30.3, "reject")], OPEN, [(CLOSED, OPEN)]),
    Case(
        "half-open after the timeout",
        [*fails(5), (30.4, "hold")],
        HALF_OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN)],
    ),
    Case(
        "half-open: one success is not enough (M=2)",
        [*fails(5), (31, "ok")],
        HALF_OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN)],
    ),
    Case(
        "half-open: M successes close",
        [*fails(5), (31, "ok"), (32, "ok")],
        CLOSED,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)],
    ),
    Case(
        "half-open: a failure reopens",
        [*fails(5), (31, "ok"), (32, "fail"), (61.9, "reject")],
        OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)],
    ),
    Case(
        "half-open: second caller rejected while the trial is in flight",
        [*fails(5), (31, "hold"), (31.5, "reject"), (32, "hold_ok"), (33, "ok")],
        CLOSED,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)],
    ),
    Case(
        "half-open: a released (cancelled) trial frees its slot at once",
        [*fails(5), (31, "hold"), (31.1, "hold_release"), (31.2, "ok"), (31.3, "ok")],
        CLOSED,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)],
    ),
    Case(
        "half-open: a hung trial is declared failed after half_open_max_wait",
        [*fails(5), (31, "hold"), (60, "reject"), (61, "tick")],
        OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)],
    ),
    Case(
        "a late report from a timed-out trial changes nothing",
        [*fails(5), (31, "hold"), (61, "tick"), (62, "hold_ok"), (63, "reject")],
        OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN)],
    ),
    Case(
        "a late failure admitted while closed does not reopen twice",
        [(0, "hold"), *fails(5, 1), (32, "ok"), (32.5, "hold_fail"), (33, "ok")],
        CLOSED,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)],
    ),
    Case(
        "manual trip: forced open",
        [(0, "trip"), (1e6, "reject")],
        FORCED_OPEN,
        [(CLOSED, FORCED_OPEN)],
    ),
    Case(
        "manual trip twice: one event",
        [(0, "trip"), (1, "trip")],
        FORCED_OPEN,
        [(CLOSED, FORCED_OPEN)],
    ),
    Case(
        "manual reset closes from forced open",
        [(0, "trip"), (1, "reset"), (2, "ok")],
        CLOSED,
        [(CLOSED, FORCED_OPEN), (FORCED_OPEN, CLOSED)],
    ),
    Case(
        "manual reset forgets the failure streak",
        [*fails(4), (1, "reset"), *fails(4, 2)],
        CLOSED,
        [],
    ),
    Case(
        "manual trip with a timeout: open, then half-open by itself",
        [(0, "trip5"), (4.9, "reject"), (5, "hold")],
        HALF_OPEN,
        [(CLOSED, OPEN), (OPEN, HALF_OPEN)],
    ),
    Case(
        "manual half-open from forced open",
        [(0, "trip"), (1, "half_open"), (2, "ok"), (3, "ok")],
        CLOSED,
        [(CLOSED, FORCED_OPEN), (FORCED_OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)],
    ),
    Case("manual half-open of a closed breaker does nothing", [(0, "half_open")], CLOSED, []),
    Case(
        "disabled: everything passes, nothing trips",
        [(0, "disable"), *fails(50, 1)],
        DISABLED,
        [(CLOSED, DISABLED)],
    ),
    Case(
        "disabled then reset: counting starts afresh",
        [(0, "disable"), *fails(50, 1), (10, "reset"), *fails(4, 11)],
        CLOSED,
        [(CLOSED, DISABLED), (DISABLED, CLOSED)],
    ),
    Case(
        "failure rate over the window trips before the streak does",
        [(i, "fail" if i % 2 else "ok") for i in range(10)],
        OPEN,
        [(CLOSED, OPEN)],
        BreakerConfig(
            failure_threshold=100,
            failure_rate_threshold=0.5,
            minimum_calls=10,
            window=60.0,
            is_failure=only_boom,
        ),
    ),
    Case(
        "failure rate needs the minimum number of calls",
        [(i, "fail" if i % 2 else "ok") for i in range(9)],
        CLOSED,
        [],
        BreakerConfig(failure_threshold=100, failure_rate_threshold=0.5, minimum_calls=10),
    ),
    Case(
        "old failures leave the window",
        [
            *[(i, "fail" if i % 2 else "ok") for i in range(8)],
            *[(100 + i, "ok") for i in range(2)],
            (101, "fail"),
        ],
        CLOSED,
        [],
        BreakerConfig(
            failure_threshold=100,
            failure_rate_threshold=0.5,
            minimum_calls=10,
            window=60.0,
            is_failure=only_boom,
        ),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_transition_table(case: Case) -> None:
    result = run(case.config, case.script)
    last_t = case.script[-1][0]
    assert result.breaker.statistics(last_t).state is case.state
    assert [(e.from_state, e.to_state) for e in result.events] == case.transitions
    # Exactly one event per transition: each starts where the previous ended.
    for before, after in zip(result.events, result.events[1:], strict=False):
        assert after.from_state is before.to_state


def test_open_rejection_carries_time_left() -> None:
    result = run(SPEC_DB, [*fails(5), (10.4, "reject")])
    error = result.rejections[0]
    assert error.breaker == "dep"
    assert error.retry_after == pytest.approx(30.0 - (10.4 - 0.4))
    assert error.retryable is True
    assert "open" in str(error)


def test_forced_open_rejection_has_no_retry_hint() -> None:
    result = run(SPEC_DB, [(0, "trip"), (1, "reject")])
    assert result.rejections[0].retry_after is None


def test_transition_record_contents() -> None:
    result = run(SPEC_DB, fails(5))
    (event,) = result.events
    assert (event.breaker, event.from_state, event.to_state) == ("dep", CLOSED, OPEN)
    assert event.at == pytest.approx(0.4)
    assert "5 consecutive failures" in event.reason and "Boom: down" in event.reason


def test_open_timeout_grows_on_repeated_reopen_and_is_capped() -> None:
    config = BreakerConfig(
        failure_threshold=1,
        success_threshold=1,
        open_timeout=10.0,
        open_timeout_multiplier=2.0,
        max_open_timeout=25.0,
    )
    breaker = CircuitBreaker("dep", config)
    t = 0.0
    breaker.record_failure(breaker.acquire(t), t)
    timeouts = []
    for _ in range(4):
        stats = breaker.statistics(t)
        timeouts.append(stats.open_timeout)
        t += stats.open_timeout
        breaker.record_failure(breaker.acquire(t), t)  # the trial fails: reopen
    assert timeouts == [10.0, 20.0, 25.0, 25.0]
    t += 25.0
    breaker.record_success(breaker.acquire(t), t)
    assert breaker.statistics(t).state is CLOSED
    breaker.record_failure(breaker.acquire(t), t)
    assert breaker.statistics(t).open_timeout == 10.0  # closing forgot the growth


def test_slow_call_rate_trips_and_slow_trial_reopens() -> None:
    config = BreakerConfig(
        failure_threshold=100,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.5,
        minimum_calls=4,
        open_timeout=10.0,
    )
    breaker = CircuitBreaker("dep", config)
    events: list[BreakerTransition] = []
    breaker.add_listener(events.append)
    for i in range(4):
        permit = breaker.acquire(float(i * 10))
        breaker.record_success(permit, i * 10 + (2.0 if i % 2 else 0.1))
    assert breaker.statistics(40.0).state is OPEN
    assert "slower than 1 s" in events[-1].reason
    trial = breaker.acquire(60.0)
    breaker.record_success(trial, 61.5)  # slow even though it succeeded
    assert breaker.statistics(61.5).state is OPEN
    assert breaker.statistics(61.5).slow_calls == 3


@pytest.mark.parametrize("max_calls", [1, 3])
def test_half_open_admits_exactly_the_permitted_trials(max_calls: int) -> None:
    breaker = CircuitBreaker(
        "dep", BreakerConfig(failure_threshold=1, open_timeout=5.0, half_open_max_calls=max_calls)
    )
    breaker.record_failure(breaker.acquire(0.0), 0.0)
    admitted, rejected = [], 0
    for _ in range(200):
        try:
            admitted.append(breaker.acquire(5.0))
        except CircuitOpenError as error:
            rejected += 1
            assert error.retry_after is not None and error.retry_after > 0
    assert len(admitted) == max_calls and rejected == 200 - max_calls
    assert breaker.statistics(5.0).trials_in_flight == max_calls


def test_statistics_count_calls_by_outcome() -> None:
    breaker = CircuitBreaker("db", BreakerConfig(failure_threshold=3, is_failure=only_boom))
    for t in range(7):
        breaker.record_success(breaker.acquire(t), t)
    for t in range(2):
        breaker.record_error(breaker.acquire(10 + t), NotOurs(), 10 + t)
    for t in range(3):
        breaker.record_error(breaker.acquire(20 + t), Boom(), 20 + t)
    for _ in range(4):
        with pytest.raises(CircuitOpenError):
            breaker.acquire(23.0)
    stats = breaker.statistics(23.0)
    assert (stats.successes, stats.failures, stats.ignored, stats.rejected) == (7, 3, 2, 4)
    assert [stats.total(o) for o in CallOutcome] == [7, 3, 2, 4]
    assert stats.state is OPEN and stats.opened_at == 22 and stats.state_changed_at == 22
    assert stats.last_failure_at == 22
    assert stats.retry_after == pytest.approx(29.0)
    assert stats.consecutive_failures == 0  # entering open cleared the streak


def test_settling_a_permit_twice_is_a_local_error() -> None:
    breaker = CircuitBreaker("dep", BreakerConfig(failure_threshold=1, open_timeout=1.0))
    breaker.record_failure(breaker.acquire(0.0), 0.0)
    trial = breaker.acquire(1.0)
    breaker.release(trial)
    with pytest.raises(LocalProtocolError, match="settled twice"):
        breaker.record_failure(trial, 1.0)
    assert breaker.statistics(1.0).state is HALF_OPEN  # the second report changed nothing


def test_closed_breaker_shares_one_permit_and_needs_no_time() -> None:
    """The hot path: no allocation, no clock (see Permit)."""
    breaker = CircuitBreaker("dep", BreakerConfig(failure_threshold=2))  # no clock at all
    first, second = breaker.acquire(), breaker.acquire()
    assert first is second and first.started is None
    breaker.record_success(first)
    breaker.record_failure(second, 1.0)
    breaker.record_failure(breaker.acquire(), 2.0)
    assert breaker.statistics(2.0).state is OPEN
    stale = first  # admitted before the breaker opened: changes nothing now
    breaker.record_failure(stale, 3.0)
    assert breaker.statistics(3.0).failures == 3 and breaker.state is OPEN
    measured = CircuitBreaker("dep", BreakerConfig(slow_call_duration=1.0))
    assert measured.acquire(0.0) is not measured.acquire(0.0)


def test_a_raising_listener_is_counted_not_propagated() -> None:
    breaker = CircuitBreaker("dep", BreakerConfig(failure_threshold=1))
    seen: list[BreakerTransition] = []

    def broken(_: BreakerTransition) -> None:
        raise RuntimeError("metrics bug")

    breaker.add_listener(broken)
    breaker.add_listener(seen.append)
    breaker.record_failure(breaker.acquire(0.0), 0.0)
    assert len(seen) == 1
    assert breaker.statistics(0.0).listener_errors == 1
    breaker.remove_listener(broken)
    breaker.reset(1.0)
    assert breaker.statistics(1.0).listener_errors == 1 and len(seen) == 2


def test_clock_is_used_when_now_is_omitted() -> None:
    t = [0.0]
    breaker = CircuitBreaker("dep", BreakerConfig(failure_threshold=1), clock=lambda: t[0])
    breaker.record_failure(breaker.acquire())
    t[0] = 29.0
    assert breaker.statistics().retry_after == pytest.approx(1.0)
    with pytest.raises(TypeError, match="no clock"):
        CircuitBreaker("x").statistics()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"open_timeout": -1}, "open_timeout"),
        ({"open_timeout": math.inf}, "open_timeout"),
        ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
        ({"slow_call_rate_threshold": 0.5}, "slow_call_duration"),
        ({"open_timeout_multiplier": 0.5}, "open_timeout_multiplier"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BreakerConfig(**kwargs)


def test_presets_follow_the_spec() -> None:
    table = {
        name: (c.failure_threshold, c.open_timeout, c.success_threshold)
        for name, c in BREAKER_PRESETS.items()
    }
    assert table == {
        "database": (5, 30.0, 2),
        "yara": (3, 60.0, 3),
        "ipc": (10, 10.0, 1),
        "external": (3, 60.0, 2),
    }


# --- persistence -------------------------------------------------------------------


def test_snapshot_round_trip_open_keeps_the_time_left() -> None:
    breaker = CircuitBreaker("db", SPEC_DB)
    for t in range(5):
        breaker.record_error(breaker.acquire(t), Boom(), t)
    data = json.loads(json.dumps(breaker.snapshot(14.0)))  # through JSON, as on disk
    assert data["state"] == "open" and data["open_remaining"] == pytest.approx(20.0)

    restored = CircuitBreaker("db", SPEC_DB)
    events: list[BreakerTransition] = []
    restored.add_listener(events.append)
    restored.restore(data, 1000.0, elapsed=5.0)  # new process, new clock; 5 s went by
    stats = restored.statistics(1000.0)
    assert stats.state is OPEN and stats.retry_after == pytest.approx(15.0)
    assert stats.failures == 5 and stats.last_failure_at == pytest.approx(1000.0 - 10 - 5)
    assert [(e.from_state, e.to_state, e.reason) for e in events] == [
        (CLOSED, OPEN, "restored from a snapshot")
    ]
    with pytest.raises(CircuitOpenError):
        restored.acquire(1014.9)
    restored.acquire(1015.0)  # a trial
    assert restored.statistics(1015.0).state is HALF_OPEN


def test_restored_from_half_open_comes_back_open_with_no_stuck_trial() -> None:
    breaker = CircuitBreaker("db", SPEC_DB)
    for t in range(5):
        breaker.record_failure(breaker.acquire(t), t)
    breaker.acquire(40.0)  # a trial in flight when the process dies
    data = breaker.snapshot(41.0)
    assert data["state"] == "half_open"

    restored = CircuitBreaker("db", SPEC_DB)
    restored.restore(data, 0.0)
    assert restored.state is OPEN  # with no time left: the next call is a fresh trial
    trial = restored.acquire(0.0)  # the old trial's permit did not come back
    assert trial.trial
    with pytest.raises(CircuitOpenError):
        restored.acquire(0.0)


@pytest.mark.parametrize("state", ["forced_open", "disabled", "closed"])
def test_snapshot_round_trip_manual_and_closed_states(state: str) -> None:
    breaker = CircuitBreaker("db", SPEC_DB)
    breaker.record_failure(breaker.acquire(0.0), 0.0)
    breaker.record_failure(breaker.acquire(0.0), 0.0)
    if state == "forced_open":
        breaker.trip(1.0)
    elif state == "disabled":
        breaker.disable(1.0)
    restored = CircuitBreaker("db", SPEC_DB)
    restored.restore(breaker.snapshot(2.0), 50.0, elapsed=1e6)
    assert restored.statistics(50.0).state == state
    if state == "closed":
        assert restored.statistics(50.0).consecutive_failures == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(name="other"), "is for 'other'"),
        (lambda d: d.update(state="melted"), "unknown state"),
        (lambda d: d.pop("reopens"), r"missing \$\.reopens"),
        (lambda d: d["totals"].update(success="7"), r"at \$\.totals\.success"),
        (lambda d: d.update(open_timeout=float("nan")), "finite"),
    ],
)
def test_restore_rejects_malformed_snapshots(mutate: Any, message: str) -> None:
    data = CircuitBreaker("db", SPEC_DB).snapshot(0.0)
    mutate(data)
    with pytest.raises(ValueError, match=message):
        CircuitBreaker("db", SPEC_DB).restore(data, 0.0)


# --- properties -------------------------------------------------------------------

OPS = st.sampled_from(
    [
        "ok",
        "fail",
        "ignore",
        "hold",
        "hold_ok",
        "hold_fail",
        "hold_release",
        "trip",
        "reset",
        "half_open",
        "tick",
        "acquire",
    ]
)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0, 20), OPS), max_size=60),
    max_calls=st.integers(1, 3),
)
def test_invariants_under_any_sequence(steps: list[tuple[float, str]], max_calls: int) -> None:
    config = BreakerConfig(
        failure_threshold=2,
        open_timeout=3.0,
        success_threshold=2,
        half_open_max_calls=max_calls,
        half_open_max_wait=4.0,
        is_failure=only_boom,
    )
    breaker = CircuitBreaker("dep", config)
    events: list[BreakerTransition] = []
    breaker.add_listener(events.append)
    held: list[Permit] = []
    t = 0.0
    for dt, op in steps:
        t += dt
        try:
            if op in ("ok", "fail", "ignore", "hold", "acquire"):
                permit = breaker.acquire(t)
                if op == "ok":
                    breaker.record_success(permit, t)
                elif op == "fail":
                    breaker.record_failure(permit, t)
                elif op == "ignore":
                    breaker.release(permit)
                else:
                    held.append(permit)
            elif op.startswith("hold_") and held:
                permit = held.pop(0)
                {"hold_ok": breaker.record_success, "hold_fail": breaker.record_failure}.get(
                    op, lambda p, _t: breaker.release(p)
                )(permit, t)
            elif op == "trip":
                breaker.trip(t)
            elif op == "reset":
                breaker.reset(t)
            elif op == "half_open":
                breaker.half_open(t)
            else:
                breaker.statistics(t)
        except CircuitOpenError:
            assert breaker.state in (OPEN, HALF_OPEN, FORCED_OPEN)
        stats = breaker.statistics(t)
        assert stats.trials_in_flight <= max_calls
        assert stats.state is not HALF_OPEN or stats.trials_in_flight <= max_calls
        if stats.state is OPEN:
            assert stats.retry_after is not None and 0 < stats.retry_after <= 3.0 + 1e-9
    state = CLOSED
    for event in events:  # one event per transition, chained, never a self-loop
        assert event.from_state is state and event.to_state is not state
        state = event.to_state
    assert state is breaker.state
