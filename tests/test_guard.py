"""The trio driver (guarded_call) under trio's MockClock: no test sleeps in
real time, yet every backoff, open timeout and deadline really elapses."""

from __future__ import annotations

import dataclasses
import random
import uuid
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from sentinel_ipc.errors import BusyError, CircuitOpenError, RetryGaveUpError
from sentinel_ipc.resilience import (
    RETRY_COUNTERS,
    RETRY_PRESETS,
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    RetryBudget,
    RetryCounters,
    RetryFinished,
    RetryOutcome,
    RetryPolicy,
    RetryScheduled,
    guarded_call,
    guarded_call_sync,
)


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


@dataclass
class Recorder:
    scheduled: list[RetryScheduled] = field(default_factory=list)
    finished: list[RetryFinished] = field(default_factory=list)

    def on_retry_scheduled(self, record: RetryScheduled) -> None:
        self.scheduled.append(record)

    def on_retry_finished(self, record: RetryFinished) -> None:
        self.finished.append(record)

    @property
    def outcomes(self) -> list[RetryOutcome]:
        return [f.outcome for f in self.finished]


class Dependency:
    """An async callable failing the first ``failures`` calls with ``error``."""

    def __init__(self, failures: int = 0, error: type[Exception] = Flaky) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.called_at: list[float] = []

    async def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        self.called_at.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")
        return value


def no_jitter(**kwargs: object) -> RetryPolicy:
    settings: dict[str, object] = {"on": Flaky, "jitter": 0.0, "initial": 0.1, "max_delay": 1.0}
    settings.update(kwargs)
    return RetryPolicy(**settings)  # type: ignore[arg-type]


def breaker(**kwargs: object) -> CircuitBreaker:
    return CircuitBreaker("dep", BreakerConfig(**kwargs), clock=trio.current_time)  # type: ignore[arg-type]


# --- the SPEC's retry cases, driven -------------------------------------------------


async def test_first_try_success(autojump_clock: trio.testing.MockClock) -> None:
    dep, rec, b = Dependency(), Recorder(), breaker()
    result = await guarded_call(dep, "v", breaker=b, retry=no_jitter(), observer=rec)
    assert result == "v" and dep.calls == 1
    assert rec.outcomes == [RetryOutcome.SUCCESS_NO_RETRY] and rec.scheduled == []
    assert b.statistics().successes == 1


async def test_second_try_success_after_the_backoff(autojump_clock: trio.testing.MockClock) -> None:
    dep, rec = Dependency(failures=1), Recorder()
    start = trio.current_time()
    assert await guarded_call(dep, retry=no_jitter(), observer=rec, operation="db") == "ok"
    assert dep.calls == 2
    assert dep.called_at[1] - dep.called_at[0] == pytest.approx(0.1)
    (scheduled,) = rec.scheduled
    assert (scheduled.operation, scheduled.attempt, scheduled.delay) == ("db", 1, 0.1)
    assert isinstance(scheduled.error, Flaky)
    (finished,) = rec.finished
    assert finished.outcome is RetryOutcome.SUCCESS_WITH_RETRY and finished.attempts == 2
    assert finished.elapsed == pytest.approx(trio.current_time() - start)


async def test_failure_after_max_attempts(autojump_clock: trio.testing.MockClock) -> None:
    dep, rec = Dependency(failures=99), Recorder()
    with pytest.raises(RetryGaveUpError) as info:
        await guarded_call(dep, retry=no_jitter(attempts=3), observer=rec)
    assert dep.calls == 3 and info.value.reason == "attempts"
    assert isinstance(info.value.__cause__, Flaky) and str(info.value.__cause__) == "failure 3"
    gaps = [b - a for a, b in zip(dep.called_at, dep.called_at[1:], strict=False)]
    assert gaps == pytest.approx([0.1, 0.2])  # the backoff delays, really slept
    assert rec.outcomes == [RetryOutcome.FAILED_WITH_RETRY]


async def test_not_retryable_raises_the_error_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dep, rec = Dependency(failures=1, error=Fatal), Recorder()
    with pytest.raises(Fatal, match="failure 1"):
        await guarded_call(dep, retry=no_jitter(), observer=rec)
    assert dep.calls == 1 and rec.outcomes == [RetryOutcome.FAILED_NO_RETRY]


async def test_without_a_policy_errors_pass_through(autojump_clock: trio.testing.MockClock) -> None:
    dep, b = Dependency(failures=1), breaker(failure_threshold=1)
    with pytest.raises(Flaky):
        await guarded_call(dep, breaker=b)
    assert b.statistics().state is BreakerState.OPEN


async def test_server_hint_sets_the_wait(autojump_clock: trio.testing.MockClock) -> None:
    async def busy_once() -> str:
        busy_once.calls += 1  # type: ignore[attr-defined]
        if busy_once.calls == 1:  # type: ignore[attr-defined]
            raise BusyError("busy", retry_after=0.75)
        return "ok"

    busy_once.calls = 0  # type: ignore[attr-defined]
    start = trio.current_time()
    assert await guarded_call(busy_once, retry=RETRY_PRESETS["ipc"]) == "ok"
    assert trio.current_time() - start == pytest.approx(0.75)


async def test_concurrent_retries_are_independent(autojump_clock: trio.testing.MockClock) -> None:
    shared = no_jitter(attempts=3)
    rec = Recorder()
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        dep = Dependency(failures=i % 4)  # 0..3 failures: 3 exhausts 3 attempts
        try:
            results[i] = await guarded_call(
                dep, f"r{i}", retry=shared, observer=rec, operation=f"op{i}"
            )
        except RetryGaveUpError as error:
            assert error.attempts == 3
            results[i] = "gave up"

    async with trio.open_nursery() as nursery:
        for i in range(60):
            nursery.start_soon(one, i)
    for i in range(60):
        assert results[i] == ("gave up" if i % 4 == 3 else f"r{i}")
        retries = [s for s in rec.scheduled if s.operation == f"op{i}"]
        assert [s.attempt for s in retries] == list(range(1, min(i % 4, 2) + 1))
    assert shared.history == ()


async def test_retry_metrics_count_every_outcome(autojump_clock: trio.testing.MockClock) -> None:
    op = f"metrics-{uuid.uuid4().hex}"  # a label no other test uses
    before = RETRY_COUNTERS.statistics()
    policy = no_jitter(attempts=2)
    await guarded_call(Dependency(), retry=policy, operation=op)
    await guarded_call(Dependency(failures=1), retry=policy, operation=op)
    with pytest.raises(Fatal):
        await guarded_call(Dependency(failures=1, error=Fatal), retry=policy, operation=op)
    with pytest.raises(RetryGaveUpError):
        await guarded_call(Dependency(failures=5), retry=policy, operation=op)
    empty = RetryBudget(ratio=0.0, min_per_second=0.0)
    with pytest.raises(RetryGaveUpError, match="budget"):
        await guarded_call(Dependency(failures=5), retry=policy, budget=empty, operation=op)
    after = RETRY_COUNTERS.statistics()
    assert before.retries.get(op) is None
    assert {o: after.outcome(op, o) for o in RetryOutcome} == {
        RetryOutcome.SUCCESS_NO_RETRY: 1,
        RetryOutcome.SUCCESS_WITH_RETRY: 1,
        RetryOutcome.FAILED_NO_RETRY: 1,
        RetryOutcome.FAILED_WITH_RETRY: 1,
        RetryOutcome.BUDGET_EXHAUSTED: 1,
    }
    assert after.retries[op] == 2


def _named(name: str, **kwargs: object) -> RetryPolicy:
    """A no-jitter policy carrying ``name``, as the presets carry theirs."""
    return dataclasses.replace(no_jitter(**kwargs), name=name)


async def test_retries_are_counted_under_the_policy_name_when_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """sentinel_retries_total{operation} is per retry policy, and counts the
    attempts after the first: 0 for a first-try success, 1 for a success on
    the 2nd attempt. The call site keeps its own label in the outcomes."""
    policy = _named(f"policy-{uuid.uuid4().hex}")
    call = "database_add"
    await guarded_call(Dependency(), retry=policy, operation=call)
    first = RETRY_COUNTERS.statistics()
    assert first.retries.get(policy.name, 0) == 0
    assert first.calls[(policy.name, call, RetryOutcome.SUCCESS_NO_RETRY)] == 1

    rec = Recorder()
    await guarded_call(Dependency(failures=1), retry=policy, operation=call, observer=rec)
    second = RETRY_COUNTERS.statistics()
    assert second.retries[policy.name] == 1
    assert second.calls[(policy.name, call, RetryOutcome.SUCCESS_WITH_RETRY)] == 1
    assert rec.scheduled[0].policy == rec.finished[0].policy == policy.name
    assert rec.scheduled[0].operation == rec.finished[0].operation == call


async def test_a_retry_cancelled_in_its_backoff_was_not_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A retry counts when its attempt starts, not when it is scheduled: a call
    cancelled while waiting made one attempt and no retry."""
    policy = _named(f"policy-{uuid.uuid4().hex}", initial=1.0)
    dep = Dependency(failures=99)
    before = dict(RETRY_COUNTERS.statistics().retries)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(guarded_call, dep, retry=policy, operation="scan"))
            await trio.sleep(0.5)  # inside the 1 s backoff
            scope.cancel()
    assert dep.calls == 1
    assert dict(RETRY_COUNTERS.statistics().retries) == before  # under no label at all


async def test_a_policy_with_a_history_makes_its_first_attempt_a_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The IPC client makes the first attempt itself and hands guarded_call the
    incremented policy: that attempt is a retry, and its success is a success
    with retry (it used to count as a first-try success, and the retry was
    counted before the wait, made or not)."""
    policy = _named(f"policy-{uuid.uuid4().hex}")
    continued = policy.increment(Flaky("refused"), now=trio.current_time(), rng=random.Random(1))
    await trio.sleep(continued.next_delay)
    assert await guarded_call(Dependency(), retry=continued, operation="ipc") == "ok"
    stats = RETRY_COUNTERS.statistics()
    assert stats.retries[policy.name] == 1
    assert stats.calls[(policy.name, "ipc", RetryOutcome.SUCCESS_WITH_RETRY)] == 1
    assert stats.calls[(policy.name, "ipc", RetryOutcome.SUCCESS_NO_RETRY)] == 0


async def test_retry_counters_as_an_observer_count_retries_when_the_call_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A caller's own RetryCounters (observer=) sees no "retry made" hook, so it
    counts attempts - 1 when the call ends, and nothing for a scheduled retry."""
    own = RetryCounters()
    policy = _named("mine")
    await guarded_call(Dependency(failures=2), retry=policy, operation="x", observer=own)
    stats = own.statistics()
    assert stats.retries == {"mine": 2}
    assert stats.calls[("mine", "x", RetryOutcome.SUCCESS_WITH_RETRY)] == 1
    assert stats.outcome("x", RetryOutcome.SUCCESS_WITH_RETRY) == 1


# --- deadlines and cancellation ------------------------------------------------------


async def test_never_sleeps_past_the_cancel_scope_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dep = Dependency(failures=99)
    start = trio.current_time()
    with trio.move_on_after(0.25) as scope:
        with pytest.raises(RetryGaveUpError) as info:
            await guarded_call(dep, retry=no_jitter(attempts=10))
    # Attempt 1 at 0, wait 0.1, attempt 2 at 0.1; the next wait (0.2) would
    # end at 0.3 > 0.25: give up now, with the last error, not a cancellation.
    assert info.value.reason == "deadline" and not scope.cancelled_caught
    assert dep.calls == 2 and trio.current_time() - start == pytest.approx(0.1)
    assert str(info.value.__cause__) == "failure 2"


async def test_cancellation_is_never_retried_nor_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    b = breaker(failure_threshold=1)
    with trio.move_on_after(5) as scope:
        await guarded_call(hang, breaker=b, retry=no_jitter(on=BaseException, attempts=5))
    assert scope.cancelled_caught and calls == 1
    stats = b.statistics()
    assert (stats.state, stats.failures, stats.ignored) == (BreakerState.CLOSED, 0, 1)


async def test_cancelled_half_open_trial_releases_its_permit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b = breaker(failure_threshold=1, open_timeout=10.0, success_threshold=1)
    with pytest.raises(Flaky):
        await guarded_call(Dependency(failures=1), breaker=b)
    await trio.sleep(10)
    with trio.move_on_after(1):
        await guarded_call(trio.sleep_forever, breaker=b)  # the trial, cancelled
    assert b.statistics().state is BreakerState.HALF_OPEN
    assert b.statistics().trials_in_flight == 0
    assert await guarded_call(Dependency(), breaker=b) == "ok"  # admitted at once
    assert b.statistics().state is BreakerState.CLOSED


async def test_hung_trial_cannot_keep_half_open_stuck(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b = breaker(failure_threshold=1, open_timeout=10.0, half_open_max_wait=30.0)
    with pytest.raises(Flaky):
        await guarded_call(Dependency(failures=1), breaker=b)
    await trio.sleep(10)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(guarded_call, trio.sleep_forever, breaker=b))  # hangs
        await trio.sleep(1)
        with pytest.raises(CircuitOpenError):
            await guarded_call(Dependency(), breaker=b)
        await trio.sleep(29)  # the hung trial is declared failed: open again
        stats = b.statistics()
        assert stats.state is BreakerState.OPEN and stats.reopens == 1
        await trio.sleep(10)
        assert await guarded_call(Dependency(), breaker=b) == "ok"  # a new trial runs
        nursery.cancel_scope.cancel()


# --- breaker through the driver ----------------------------------------------------------


@pytest.mark.parametrize("max_calls", [1, 3])
async def test_200_concurrent_callers_in_half_open(
    autojump_clock: trio.testing.MockClock, max_calls: int
) -> None:
    b = breaker(
        failure_threshold=1,
        open_timeout=5.0,
        half_open_max_calls=max_calls,
        success_threshold=max_calls,
    )
    with pytest.raises(Flaky):
        await guarded_call(Dependency(failures=1), breaker=b)
    await trio.sleep(5)
    release = trio.Event()
    entered = 0
    outcomes: list[str] = []

    async def trial() -> str:
        nonlocal entered
        entered += 1
        await release.wait()
        return "ok"

    async def caller() -> None:
        try:
            outcomes.append(await guarded_call(trial, breaker=b))
        except CircuitOpenError as error:
            assert error.retry_after is not None
            outcomes.append("rejected")

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        assert entered == max_calls
        assert outcomes.count("rejected") == 200 - max_calls
        release.set()
    assert outcomes.count("ok") == max_calls
    stats = b.statistics()
    assert stats.state is BreakerState.CLOSED and stats.rejected == 200 - max_calls


async def test_breaker_opening_between_attempts_ends_the_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b, dep, rec = breaker(failure_threshold=2), Dependency(failures=99), Recorder()
    with pytest.raises(CircuitOpenError) as info:
        await guarded_call(dep, breaker=b, retry=no_jitter(attempts=5), observer=rec)
    assert dep.calls == 2 and str(info.value.__cause__) == "failure 2"
    assert rec.outcomes == [RetryOutcome.FAILED_WITH_RETRY]
    with pytest.raises(CircuitOpenError):  # and later callers fail fast
        await guarded_call(dep, breaker=b)
    assert dep.calls == 2


async def test_breaker_statistics_are_accurate_through_the_driver(
    autojump_clock: trio.testing.MockClock,
) -> None:
    b = breaker(failure_threshold=3, is_failure=lambda e: isinstance(e, Flaky))
    for _ in range(4):
        await guarded_call(Dependency(), breaker=b)
    with pytest.raises(Fatal):
        await guarded_call(Dependency(failures=1, error=Fatal), breaker=b)  # ignored
    for _ in range(3):
        with pytest.raises(Flaky):
            await guarded_call(Dependency(failures=1), breaker=b)
    for _ in range(2):
        with pytest.raises(CircuitOpenError):
            await guarded_call(Dependency(), breaker=b)
    stats = b.statistics()
    assert (stats.successes, stats.failures, stats.ignored, stats.rejected) == (4, 3, 1, 2)
    assert stats.state is BreakerState.OPEN


async def test_recovery_within_one_open_timeout(autojump_clock: trio.testing.MockClock) -> None:
    b = breaker(failure_threshold=5, open_timeout=30.0, success_threshold=2)
    down = Dependency(failures=10**9)
    for _ in range(5):
        with pytest.raises(Flaky):
            await guarded_call(down, breaker=b)
    opened = trio.current_time()
    healthy = Dependency()
    while True:
        try:
            await guarded_call(healthy, breaker=b)
            if b.statistics().state is BreakerState.CLOSED:
                break
        except CircuitOpenError as error:
            assert error.retry_after is not None
            await trio.sleep(error.retry_after)
    assert trio.current_time() - opened == pytest.approx(30.0)
    assert healthy.calls == 2


# --- the blocking twin --------------------------------------------------------------


def test_guarded_call_sync_counts_retries_made_under_the_policy() -> None:
    """The blocking driver counts like the trio one: 0 retries for a first-try
    success, 1 for a success on the 2nd attempt, under the policy's name."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    failures = [Flaky("busy")]

    def fails_once() -> str:
        if failures:
            raise failures.pop()
        return "ok"

    policy = _named(f"policy-{uuid.uuid4().hex}")
    run = partial(guarded_call_sync, retry=policy, operation="file_read",
                  clock=lambda: now[0], sleep=sleep)
    assert run(lambda: "ok") == "ok"
    assert RETRY_COUNTERS.statistics().retries.get(policy.name, 0) == 0
    assert run(fails_once) == "ok" and slept == pytest.approx([0.1])
    stats = RETRY_COUNTERS.statistics()
    assert stats.retries[policy.name] == 1
    assert stats.calls[(policy.name, "file_read", RetryOutcome.SUCCESS_WITH_RETRY)] == 1
    assert stats.calls[(policy.name, "file_read", RetryOutcome.SUCCESS_NO_RETRY)] == 1


def test_guarded_call_sync_with_an_injected_clock_and_sleep() -> None:
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    attempts = 0

    def flaky_twice() -> str:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise Flaky(str(attempts))
        return "ok"

    b = CircuitBreaker("dep", BreakerConfig(failure_threshold=5), clock=lambda: now[0])
    rec = Recorder()
    result = guarded_call_sync(
        flaky_twice,
        breaker=b,
        retry=no_jitter(),
        observer=rec,
        clock=lambda: now[0],
        sleep=sleep,
        rng=random.Random(1),
    )
    assert result == "ok" and slept == pytest.approx([0.1, 0.2])
    assert rec.outcomes == [RetryOutcome.SUCCESS_WITH_RETRY]
    assert rec.finished[0].attempts == 3
    stats = b.statistics()
    assert (stats.successes, stats.failures) == (1, 2)
    attempts = 0
    with pytest.raises(RetryGaveUpError, match="deadline"):
        guarded_call_sync(
            flaky_twice,
            retry=no_jitter(),
            clock=lambda: now[0],
            sleep=sleep,
            deadline=now[0] + 0.05,
        )
