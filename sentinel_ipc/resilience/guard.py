"""Drivers: run a callable under a breaker, a retry policy and a retry budget.

:func:`guarded_call` is the trio driver; :func:`guarded_call_sync` the same loop
for plain threads (injected clock and sleep). Both only *drive* the pure
machines in ``breaker``, ``retry`` and ``budget``: every decision is made there.

Per attempt: the breaker admits it (or raises :class:`CircuitOpenError`), the
callable runs, the outcome settles the breaker's permit, and on an error the
policy's ``increment`` decides between raising and waiting. Rules the trio
driver keeps:

* Cancellation is never retried and never counted as a failure: a
  ``trio.Cancelled`` (any non-``Exception``) releases the breaker permit
  (so a cancelled half-open trial frees its slot at once) and propagates.
* A wait that would reach the enclosing cancel scope's deadline
  (``trio.current_effective_deadline()``) is not started: the call gives up at
  once with :class:`RetryGaveUpError` (reason "deadline") chained from the last
  error, instead of being cancelled in its sleep with nothing to show.
* Concurrent calls share no mutable retry state: each threads its own copy of
  the immutable policy. They do share the breaker and the budget, on purpose.
* A breaker that opens between attempts ends the call with
  :class:`CircuitOpenError` chained from the last error.

Counting (``RETRY_COUNTERS``, see ``instruments``): every attempt after the
first is one retry of the policy (``RetryPolicy.name``, else ``operation``),
counted as it starts; every call with a policy ends in one outcome, counted
under (policy, ``operation``, outcome). A policy passed in with a history
(a caller that made the first attempt itself, as the IPC client does) makes
its first attempt here a retry.

Time is ``trio.current_time()`` (so trio's ``MockClock`` drives everything in
tests). A breaker driven here and also read elsewhere (``statistics()``) must
be read on the same time base: construct it with ``clock=trio.current_time``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from sentinel_ipc.errors import CircuitOpenError, RetryGaveUpError
from sentinel_ipc.resilience.breaker import CircuitBreaker, Permit
from sentinel_ipc.resilience.budget import RetryBudget
from sentinel_ipc.resilience.instruments import (
    RETRY_COUNTERS,
    RetryFinished,
    RetryObserver,
    RetryOutcome,
    RetryScheduled,
)
from sentinel_ipc.resilience.retry import RandomSource, RetryAttempt, RetryPolicy

__all__ = ["guarded_call", "guarded_call_sync"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

# Jitter only needs to differ between processes and calls; tests inject their own.
_RNG = random.Random()
# Bound once: the attribute lookup is a measurable part of a closed-breaker call.
_current_time = trio.current_time


async def guarded_call(
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    *args: *Ts,
    breaker: CircuitBreaker | None = None,
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    operation: str = "",
    observer: RetryObserver | None = None,
    rng: RandomSource | None = None,
) -> T:
    """``await fn(*args)`` under ``breaker``, ``retry`` and ``budget`` (each optional).

    ``operation`` is the call site's bounded label for the retry counters
    (``RETRY_COUNTERS`` always; ``observer`` too if given); retries are
    counted under ``retry.name``, or ``operation`` for an unnamed policy.

    Raises :class:`CircuitOpenError` (breaker open or half-open and full),
    :class:`RetryGaveUpError` (a ``RetryExhaustedError``: retryable but out of
    attempts, time, deadline or budget; chained from the last error), or the
    callable's own error when it is not retryable (or there is no policy).
    """
    now = _current_time()
    if budget is not None:
        budget.deposit(now)
    permit = breaker.acquire(now) if breaker is not None else None
    if retry is not None and retry.history:
        RETRY_COUNTERS.count_retry(retry.name or operation)
    try:
        result = await fn(*args)
    except BaseException as exc:
        error: BaseException = exc
    else:
        if breaker is not None and permit is not None:
            # A shared permit (closed breaker, nothing measured) needs no end time.
            breaker.record_success(permit, None if permit.started is None else _current_time())
        if retry is not None:
            if observer is None and not retry.history:
                RETRY_COUNTERS.count_first_try_success(operation, retry.name or operation)
            else:
                _finish(
                    observer,
                    operation,
                    retry,
                    RetryOutcome.SUCCESS_WITH_RETRY
                    if retry.history
                    else RetryOutcome.SUCCESS_NO_RETRY,
                    retry.attempt,
                    _current_time() - now,
                    None,
                )
        return result
    # Leave the except block before awaiting anything, so that errors of
    # later attempts are not chained to this one as "during handling of".
    return await _retry_loop(
        fn, args, error, permit, now, breaker, retry, budget, operation, observer, rng or _RNG
    )


async def _retry_loop(
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    args: tuple[*Ts],
    error: BaseException,
    permit: Permit | None,
    started: float,
    breaker: CircuitBreaker | None,
    retry: RetryPolicy | None,
    budget: RetryBudget | None,
    operation: str,
    observer: RetryObserver | None,
    rng: RandomSource,
) -> T:
    policy = retry
    while True:
        now = trio.current_time()
        _settle_error(breaker, permit, error, now)
        if policy is None or not isinstance(error, Exception):
            raise error
        previous = policy
        try:
            policy = policy.increment(
                error,
                now=now,
                rng=rng,
                started_at=started,
                deadline=trio.current_effective_deadline(),
                budget=budget,
                operation=operation,
            )
        except BaseException as final:
            _finish(
                observer,
                operation,
                previous,
                _failed_outcome(final, previous),
                previous.attempt,
                now - started,
                final,
            )
            raise
        attempt = policy.history[-1]
        _scheduled(observer, operation, policy, attempt, error, now)
        await trio.sleep(attempt.delay)
        if breaker is not None:
            try:
                permit = breaker.acquire(trio.current_time())
            except CircuitOpenError as rejected:
                _finish(
                    observer,
                    operation,
                    policy,
                    RetryOutcome.FAILED_WITH_RETRY,
                    policy.attempt - 1,
                    trio.current_time() - started,
                    rejected,
                )
                raise rejected from error
        RETRY_COUNTERS.count_retry(policy.name or operation)
        try:
            result = await fn(*args)
        except BaseException as exc:
            error = exc
            continue
        end = trio.current_time()
        if breaker is not None:
            assert permit is not None
            breaker.record_success(permit, end)
        _finish(
            observer,
            operation,
            policy,
            RetryOutcome.SUCCESS_WITH_RETRY,
            policy.attempt,
            end - started,
            None,
        )
        return result


def guarded_call_sync(
    fn: Callable[[Unpack[Ts]], T],
    *args: *Ts,
    breaker: CircuitBreaker | None = None,
    retry: RetryPolicy | None = None,
    budget: RetryBudget | None = None,
    operation: str = "",
    observer: RetryObserver | None = None,
    rng: RandomSource | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
    deadline: float | None = None,
) -> T:
    """:func:`guarded_call` for blocking code in a plain thread.

    ``clock`` must be the breaker's time base; ``deadline`` (on that clock)
    plays the cancel scope's part. The breaker and budget are not thread-safe:
    give each thread its own, or drive them from one thread only.
    """
    now = started = clock()
    if budget is not None:
        budget.deposit(now)
    permit = breaker.acquire(now) if breaker is not None else None
    policy = retry
    rng = rng or _RNG
    deadline = math.inf if deadline is None else deadline
    while True:
        if policy is not None and policy.history:
            RETRY_COUNTERS.count_retry(policy.name or operation)
        try:
            result = fn(*args)
        except BaseException as exc:
            error: BaseException = exc
        else:
            if breaker is not None and permit is not None:
                breaker.record_success(permit, None if permit.started is None else clock())
            if policy is not None:
                if not policy.history and observer is None:
                    RETRY_COUNTERS.count_first_try_success(operation, policy.name or operation)
                else:
                    outcome = (
                        RetryOutcome.SUCCESS_WITH_RETRY
                        if policy.history
                        else RetryOutcome.SUCCESS_NO_RETRY
                    )
                    _finish(
                        observer, operation, policy, outcome, policy.attempt,
                        clock() - started, None,
                    )
            return result
        now = clock()
        _settle_error(breaker, permit, error, now)
        if policy is None or not isinstance(error, Exception):
            raise error
        previous = policy
        try:
            policy = policy.increment(
                error,
                now=now,
                rng=rng,
                started_at=started,
                deadline=deadline,
                budget=budget,
                operation=operation,
            )
        except BaseException as final:
            _finish(
                observer,
                operation,
                previous,
                _failed_outcome(final, previous),
                previous.attempt,
                now - started,
                final,
            )
            raise
        attempt = policy.history[-1]
        _scheduled(observer, operation, policy, attempt, error, now)
        sleep(attempt.delay)
        if breaker is not None:
            try:
                permit = breaker.acquire(clock())
            except CircuitOpenError as rejected:
                _finish(
                    observer,
                    operation,
                    policy,
                    RetryOutcome.FAILED_WITH_RETRY,
                    policy.attempt - 1,
                    clock() - started,
                    rejected,
                )
                raise rejected from error


# --- shared steps -----------------------------------------------------------------


def _settle_error(
    breaker: CircuitBreaker | None, permit: Permit | None, error: BaseException, now: float
) -> None:
    if breaker is None:
        return
    assert permit is not None
    if isinstance(error, Exception):
        breaker.record_error(permit, error, now)
    else:  # cancelled or interrupted: says nothing about the dependency
        breaker.release(permit)


def _failed_outcome(final: BaseException, policy: RetryPolicy) -> RetryOutcome:
    if isinstance(final, RetryGaveUpError) and final.reason == "budget":
        return RetryOutcome.BUDGET_EXHAUSTED
    return RetryOutcome.FAILED_WITH_RETRY if policy.history else RetryOutcome.FAILED_NO_RETRY


def _finish(
    observer: RetryObserver | None,
    operation: str,
    policy: RetryPolicy,
    outcome: RetryOutcome,
    attempts: int,
    elapsed: float,
    error: BaseException | None,
) -> None:
    name = policy.name or operation
    RETRY_COUNTERS.count_outcome(operation, outcome, name)
    if observer is not None:
        observer.on_retry_finished(
            RetryFinished(operation, outcome, attempts, elapsed, error, name)
        )


def _scheduled(
    observer: RetryObserver | None,
    operation: str,
    policy: RetryPolicy,
    attempt: RetryAttempt,
    error: BaseException,
    at: float,
) -> None:
    # Counted when the retry starts, not here: it may yet be cancelled in its wait.
    if observer is not None:
        observer.on_retry_scheduled(
            RetryScheduled(
                operation, attempt.attempt, attempt.delay, error, at, attempt.hinted,
                policy.name or operation,
            )
        )
