"""Metrics hooks of the resilience core: frozen records, observers, counters.

This module is pure (no trio, time, random, socket or sqlite3) and has no
dependency on prometheus_client: the core only *counts* and *tells*; a helper in
the metrics layer maps what it counts onto Prometheus families at scrape time.

How to subscribe, metric by metric
----------------------------------

Breaker state transitions (``sentinel_circuit_breaker_transitions_total{breaker,from,to}``)
    ``breaker.add_listener(callback)``. The callback receives one frozen
    :class:`BreakerTransition` (``breaker``, ``from_state``, ``to_state``, ``at``,
    ``reason``) per transition, synchronously, after the new state is in place.
    Exactly one record per transition; none when a manual action leaves the state
    as it was. A listener that raises is counted in
    ``statistics().listener_errors`` and never disturbs the breaker or the call.

Current breaker state (``sentinel_circuit_breaker_state{breaker,state}``)
    ``breaker.statistics().state`` (a :class:`~.breaker.BreakerState`, a ``str``).

Calls by outcome (``sentinel_circuit_breaker_calls_total{breaker,outcome}``)
    ``breaker.statistics()`` has monotonic totals ``successes``, ``failures``,
    ``ignored`` and ``rejected`` (the four :class:`CallOutcome` values). Read them
    in a custom collector at scrape time: exact, and it costs the call path nothing.

Retries by operation and outcome (``sentinel_retries_total{operation,outcome}``)
    Every driver call that has a retry policy and makes at least one attempt
    ends in exactly one :class:`RetryOutcome` (``success_no_retry``,
    ``success_with_retry``, ``failed_no_retry``, ``failed_with_retry``,
    ``budget_exhausted``); a call the breaker rejects before its first attempt
    counts as ``rejected`` on the breaker only, and a cancelled call counts
    nowhere (cancellation is not an outcome of the dependency). The drivers
    count it in the process-wide :data:`RETRY_COUNTERS` (read
    ``RETRY_COUNTERS.statistics().outcomes[(operation, outcome)]``), and, if the
    caller passed ``observer=``, call ``observer.on_retry_finished(RetryFinished)``.
    Each retry about to be slept for calls ``observer.on_retry_scheduled(RetryScheduled)``
    and bumps ``RETRY_COUNTERS.statistics().retries[operation]``.
    ``operation`` is the caller's bounded label ("database", "ipc", ...).

Example (the metrics layer)::

    def collect():  # called by a prometheus_client custom collector
        for b in breakers:
            s = b.statistics()
            for outcome in CallOutcome:
                yield ("sentinel_circuit_breaker_calls_total",
                       {"breaker": s.name, "outcome": outcome}, s.total(outcome))
        for (operation, outcome), n in RETRY_COUNTERS.statistics().outcomes.items():
            yield ("sentinel_retries_total", {"operation": operation, "outcome": outcome}, n)

    breaker.add_listener(lambda t: transitions.labels(t.breaker, t.from_state, t.to_state).inc())

The module also holds :class:`SlidingWindow`, the bucketed time-window counter the
breaker's rate trips and the retry budget share.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sentinel_ipc.resilience.breaker import BreakerState

__all__ = [
    "RETRY_COUNTERS",
    "BreakerTransition",
    "CallOutcome",
    "RetryCounters",
    "RetryCountersStatistics",
    "RetryFinished",
    "RetryObserver",
    "RetryOutcome",
    "RetryScheduled",
    "SlidingWindow",
]


class CallOutcome(enum.StrEnum):
    """How one call through a breaker ended, from the breaker's point of view."""

    SUCCESS = "success"
    FAILURE = "failure"  # the failure classifier said: the dependency is unwell
    IGNORED = "ignored"  # an error that says nothing about the dependency (or a cancellation)
    REJECTED = "rejected"  # refused by an open / half-open breaker; the callable never ran


class RetryOutcome(enum.StrEnum):
    """How one retried operation ended. Bounded: safe as a metric label."""

    SUCCESS_NO_RETRY = "success_no_retry"
    SUCCESS_WITH_RETRY = "success_with_retry"
    FAILED_NO_RETRY = "failed_no_retry"
    FAILED_WITH_RETRY = "failed_with_retry"
    BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True, slots=True)
class BreakerTransition:
    """One state change of a breaker; ``at`` is in the breaker's clock (monotonic s)."""

    breaker: str
    from_state: BreakerState
    to_state: BreakerState
    at: float
    reason: str


@dataclass(frozen=True, slots=True)
class RetryScheduled:
    """A retry is about to wait ``delay`` seconds after attempt ``attempt`` failed."""

    operation: str
    attempt: int
    delay: float
    error: BaseException
    at: float
    hinted: bool  # delay came from the error's retry_after hint, not the backoff


@dataclass(frozen=True, slots=True)
class RetryFinished:
    """A retried operation ended; ``error`` is what the caller got (None on success)."""

    operation: str
    outcome: RetryOutcome
    attempts: int
    elapsed: float
    error: BaseException | None


class RetryObserver(Protocol):
    """What ``guarded_call(observer=...)`` calls. Both hooks run synchronously."""

    def on_retry_scheduled(self, record: RetryScheduled) -> None: ...

    def on_retry_finished(self, record: RetryFinished) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryCountersStatistics:
    """Frozen copy of a :class:`RetryCounters`.

    ``outcomes[(operation, outcome)]`` counts finished operations;
    ``retries[operation]`` counts retries (sleeps) scheduled.
    """

    outcomes: Mapping[tuple[str, RetryOutcome], int]
    retries: Mapping[str, int]

    def outcome(self, operation: str, outcome: RetryOutcome) -> int:
        return self.outcomes.get((operation, outcome), 0)


class RetryCounters:
    """A :class:`RetryObserver` that only counts. Cheap enough for every call.

    Counts live in one small list per operation, indexed by outcome, so the
    per-call cost is a dict lookup and an integer add (hashing an enum member
    costs more than that).
    """

    __slots__ = ("_outcomes", "_retries")

    def __init__(self) -> None:
        self._outcomes: dict[str, list[int]] = {}
        self._retries: dict[str, int] = {}

    def _row(self, operation: str) -> list[int]:
        row = self._outcomes.get(operation)
        if row is None:
            row = self._outcomes[operation] = [0] * len(_OUTCOMES)
        return row

    def count_outcome(self, operation: str, outcome: RetryOutcome) -> None:
        self._row(operation)[_OUTCOME_INDEX[outcome]] += 1

    def count_first_try_success(self, operation: str) -> None:
        """``count_outcome(operation, SUCCESS_NO_RETRY)``, for the drivers' hot path."""
        row = self._outcomes.get(operation)
        if row is None:
            row = self._outcomes[operation] = [0] * len(_OUTCOMES)
        row[0] += 1

    def count_retry(self, operation: str) -> None:
        self._retries[operation] = self._retries.get(operation, 0) + 1

    def on_retry_scheduled(self, record: RetryScheduled) -> None:
        self.count_retry(record.operation)

    def on_retry_finished(self, record: RetryFinished) -> None:
        self.count_outcome(record.operation, record.outcome)

    def statistics(self) -> RetryCountersStatistics:
        """Every outcome of every operation seen so far (zeros included, as
        Prometheus prefers series that exist from the start)."""
        outcomes = {
            (operation, outcome): row[i]
            for operation, row in self._outcomes.items()
            for i, outcome in enumerate(_OUTCOMES)
        }
        return RetryCountersStatistics(
            outcomes=MappingProxyType(outcomes),
            retries=MappingProxyType(dict(self._retries)),
        )


_OUTCOMES = tuple(RetryOutcome)  # SUCCESS_NO_RETRY first: count_first_try_success uses [0]
_OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(_OUTCOMES)}
assert _OUTCOMES[0] is RetryOutcome.SUCCESS_NO_RETRY


#: Process-wide counters every driver feeds (what ``sentinel_retries_total`` exposes).
RETRY_COUNTERS = RetryCounters()


class SlidingWindow:
    """Counts over the last ``length`` seconds, in ``buckets`` time buckets.

    Why buckets: a deque of timestamps costs memory per event and a scan per
    query; buckets cost O(1) per event and make the window exact to within one
    bucket (``length / buckets`` seconds), which is all a trip rule or a retry
    budget needs. Each event adds to one of ``fields`` parallel counters (the
    breaker counts calls, failures and slow calls in one window).

    Time going backwards (a caller passing a stale ``now``) lands in the newest
    bucket rather than corrupting older ones.
    """

    __slots__ = ("_counts", "_fields", "_head", "_n", "_totals", "_width")

    def __init__(self, length: float, *, buckets: int = 10, fields: int = 1) -> None:
        if not (length > 0 and math.isfinite(length)):
            raise ValueError(f"window length must be a positive number of seconds, got {length!r}")
        if buckets < 1 or fields < 1:
            raise ValueError("a window needs at least one bucket and one field")
        self._width = length / buckets
        self._n = buckets
        self._fields = fields
        self._counts = [[0] * fields for _ in range(buckets)]
        self._totals = [0] * fields
        self._head: int | None = None  # index of the newest bucket

    def _advance(self, now: float) -> int:
        """Move the window to ``now``; returns the slot of the current bucket."""
        idx = math.floor(now / self._width)
        head = self._head
        if head is None:
            self._head = idx
        elif idx > head:
            if idx - head >= self._n:
                for row in self._counts:
                    row[:] = [0] * self._fields
                self._totals = [0] * self._fields
            else:
                # Buckets head+1..idx reuse the slots of the ones falling out.
                for k in range(head + 1, idx + 1):
                    row = self._counts[k % self._n]
                    for f in range(self._fields):
                        self._totals[f] -= row[f]
                        row[f] = 0
            self._head = idx
        else:
            idx = head
        return idx % self._n

    def add(self, now: float, field: int = 0, amount: int = 1) -> None:
        slot = self._advance(now)
        self._counts[slot][field] += amount
        self._totals[field] += amount

    def total(self, now: float, field: int = 0) -> int:
        self._advance(now)
        return self._totals[field]

    def totals(self, now: float) -> tuple[int, ...]:
        self._advance(now)
        return tuple(self._totals)

    def clear(self) -> None:
        for row in self._counts:
            row[:] = [0] * self._fields
        self._totals = [0] * self._fields
        self._head = None
