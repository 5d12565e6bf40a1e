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

Retries by retry policy (``sentinel_retries_total{operation}``)
    The retries *made*: every attempt after the first, counted as it starts
    (after its backoff, once the breaker admitted it), under the retry
    policy's name (``RetryPolicy.name``: database, ipc, file, yara, external;
    an unnamed policy under the caller's ``operation``). A call that succeeds
    at once adds nothing, so ``rate()`` of it is quiet on normal traffic.
    Read ``RETRY_COUNTERS.statistics().retries[policy]``; the five SPEC
    policies are there from the start, at 0.

Calls by policy, call site and outcome (``sentinel_retry_outcomes_total{operation,call,outcome}``)
    Every driver call that has a retry policy and makes at least one attempt
    ends in exactly one :class:`RetryOutcome` (``success_no_retry``,
    ``success_with_retry``, ``failed_no_retry``, ``failed_with_retry``,
    ``budget_exhausted``); a call the breaker rejects before its first attempt
    counts as ``rejected`` on the breaker only, and a cancelled call counts
    nowhere (cancellation is not an outcome of the dependency). ``call`` is
    the caller's bounded ``operation`` argument ("database_add", "yara",
    "reputation", ...). The drivers count it in the process-wide
    :data:`RETRY_COUNTERS` (``statistics().calls[(policy, call, outcome)]``)
    and, if the caller passed ``observer=``, call
    ``observer.on_retry_finished(RetryFinished)``. Each retry about to be
    slept for calls ``observer.on_retry_scheduled(RetryScheduled)``.

Example (the metrics layer)::

    def collect():  # called by a prometheus_client custom collector
        for b in breakers:
            s = b.statistics()
            for outcome in CallOutcome:
                yield ("sentinel_circuit_breaker_calls_total",
                       {"breaker": s.name, "outcome": outcome}, s.total(outcome))
        stats = RETRY_COUNTERS.statistics()
        for policy, n in stats.retries.items():
            yield ("sentinel_retries_total", {"operation": policy}, n)
        for (policy, call, outcome), n in stats.calls.items():
            yield ("sentinel_retry_outcomes_total",
                   {"operation": policy, "call": call, "outcome": outcome}, n)

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
    "RETRY_POLICIES",
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
    """A retry is about to wait ``delay`` seconds after attempt ``attempt`` failed.

    ``operation`` is the call site's label, ``policy`` the retry policy's name
    (the call site's label for an unnamed policy)."""

    operation: str
    attempt: int
    delay: float
    error: BaseException
    at: float
    hinted: bool  # delay came from the error's retry_after hint, not the backoff
    policy: str = ""


@dataclass(frozen=True, slots=True)
class RetryFinished:
    """A retried operation ended; ``error`` is what the caller got (None on success).

    ``attempts`` counts the attempts made, so ``attempts - 1`` retries."""

    operation: str
    outcome: RetryOutcome
    attempts: int
    elapsed: float
    error: BaseException | None
    policy: str = ""


class RetryObserver(Protocol):
    """What ``guarded_call(observer=...)`` calls. Both hooks run synchronously."""

    def on_retry_scheduled(self, record: RetryScheduled) -> None: ...

    def on_retry_finished(self, record: RetryFinished) -> None: ...


#: SPEC's retry policies (section 3) plus "external": the values of the
#: ``operation`` label of ``sentinel_retries_total``, exported from the start.
RETRY_POLICIES = ("database", "ipc", "file", "yara", "external")


@dataclass(frozen=True, slots=True)
class RetryCountersStatistics:
    """Frozen copy of a :class:`RetryCounters`.

    ``retries[policy]`` counts retries made (attempts after the first) under
    each retry policy; ``calls[(policy, call, outcome)]`` counts finished
    calls by policy, call site and outcome (first-try successes included).
    """

    retries: Mapping[str, int]
    calls: Mapping[tuple[str, str, RetryOutcome], int]

    def outcome(self, call: str, outcome: RetryOutcome) -> int:
        """Finished calls of call site ``call`` that ended in ``outcome``."""
        return sum(
            n for (_policy, c, o), n in self.calls.items() if c == call and o is outcome
        )


class RetryCounters:
    """Counts retries made and how calls ended. Cheap enough for every call.

    Outcome counts live in one small list per (policy, call site), indexed by
    outcome, so the per-call cost is a dict lookup and an integer add
    (hashing an enum member costs more than that). ``policy`` defaults to the
    call site's label, which is what an unnamed policy is counted under.

    As a :class:`RetryObserver` (for a caller that wants counts of its own) it
    counts on ``on_retry_finished``: the outcome, and ``attempts - 1`` retries.
    """

    __slots__ = ("_outcomes", "_retries")

    def __init__(self, policies: tuple[str, ...] = ()) -> None:
        self._outcomes: dict[tuple[str, str], list[int]] = {}
        self._retries: dict[str, int] = dict.fromkeys(policies, 0)

    def _row(self, call: str, policy: str | None) -> list[int]:
        key = (call if policy is None else policy, call)
        row = self._outcomes.get(key)
        if row is None:
            row = self._outcomes[key] = [0] * len(_OUTCOMES)
        return row

    def count_outcome(self, call: str, outcome: RetryOutcome, policy: str | None = None) -> None:
        self._row(call, policy)[_OUTCOME_INDEX[outcome]] += 1

    def count_first_try_success(self, call: str, policy: str | None = None) -> None:
        """``count_outcome(call, SUCCESS_NO_RETRY, policy)``, for the drivers' hot
        path: written out, one dict lookup and an add, no call to ``_row``."""
        key = (call if policy is None else policy, call)
        row = self._outcomes.get(key)
        if row is None:
            row = self._outcomes[key] = [0] * len(_OUTCOMES)
        row[0] += 1

    def count_retry(self, policy: str, n: int = 1) -> None:
        """``n`` more attempts after the first were made under ``policy``."""
        self._retries[policy] = self._retries.get(policy, 0) + n

    def on_retry_scheduled(self, record: RetryScheduled) -> None:
        """Nothing: a scheduled retry may still be cancelled in its backoff."""

    def on_retry_finished(self, record: RetryFinished) -> None:
        policy = record.policy or record.operation
        self.count_outcome(record.operation, record.outcome, policy)
        if record.attempts > 1:
            self.count_retry(policy, record.attempts - 1)

    def statistics(self) -> RetryCountersStatistics:
        """Every outcome of every (policy, call site) seen so far, zeros included,
        and the retries of every policy (the preset ones from the start): as
        Prometheus prefers series that exist from the start."""
        calls = {
            (policy, call, outcome): row[i]
            for (policy, call), row in self._outcomes.items()
            for i, outcome in enumerate(_OUTCOMES)
        }
        return RetryCountersStatistics(
            retries=MappingProxyType(dict(self._retries)),
            calls=MappingProxyType(calls),
        )


_OUTCOMES = tuple(RetryOutcome)  # SUCCESS_NO_RETRY first: count_first_try_success uses [0]
_OUTCOME_INDEX = {outcome: i for i, outcome in enumerate(_OUTCOMES)}
assert _OUTCOMES[0] is RetryOutcome.SUCCESS_NO_RETRY


#: Process-wide counters every driver feeds (what ``sentinel_retries_total`` and
#: ``sentinel_retry_outcomes_total`` expose).
RETRY_COUNTERS = RetryCounters(RETRY_POLICIES)


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
