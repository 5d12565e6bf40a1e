"""Metrics and health of the external integrations, as plain counters and frozen records.

The integrations only count (plain dicts, no prometheus_client on the call
path). At scrape time :func:`collect` yields ``(name, kind, labels, value)``
samples and :class:`ExternalCollector` wraps the same figures as a
prometheus_client collector (``registry.register(ExternalCollector(...))``):

``sentinel_external_requests_total{target,outcome}`` (counter)
    one per HTTP attempt; ``target`` is ``reputation`` or ``forward``;
    ``outcome`` is one of :data:`OUTCOMES` (bounded).
``sentinel_external_request_duration_seconds{target}`` (histogram)
    real seconds per HTTP attempt, buckets :data:`BUCKETS`.
``sentinel_outbox_events{state}`` (gauge)
    events in the outbox now: ``pending`` (not yet delivered), ``unsynced``
    (records not yet fsynced).
``sentinel_outbox_events_removed_total{outcome}`` (counter)
    events that left the outbox: ``delivered``, ``dropped`` (outbox full),
    ``rejected`` (refused for good by the receiver), ``refused`` (too large to
    accept). Survive restarts.
``sentinel_outbox_oldest_event_age_seconds`` (gauge)
``sentinel_reputation_lookups_total{result}`` (counter)
    ``known_bad``, ``known_good``, ``unknown``, ``unavailable``, ``cache_hit``.

:func:`external_health` turns the same state into the ``external`` health
component (breaker states, outbox depth, age of the oldest undelivered event).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sentinel_ipc.observability.health import CheckOutcome

    from .forwarder import EventForwarder
    from .reputation import ReputationClient

__all__ = [
    "BUCKETS",
    "OUTCOMES",
    "ExternalCollector",
    "ExternalHealth",
    "ExternalMetrics",
    "ExternalMetricsStatistics",
    "Histogram",
    "collect",
    "external_check",
    "external_health",
]

OUTCOMES = (
    "ok",
    "http_4xx",
    "http_5xx",
    "timeout",
    "connect_error",
    "protocol_error",
    "invalid_response",
    "circuit_open",
    "deadline",
)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Sample = tuple[str, Literal["counter", "gauge", "histogram"], dict[str, str], float]


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts (Prometheus style: ``le`` upper bounds, +Inf last)."""

    buckets: tuple[float, ...]
    counts: tuple[int, ...]  # cumulative, one per bucket plus +Inf
    count: int
    sum: float


@dataclass(frozen=True, slots=True)
class ExternalMetricsStatistics:
    requests: Mapping[tuple[str, str], int]
    durations: Mapping[str, Histogram]
    lookups: Mapping[str, int]

    def requests_for(self, target: str, outcome: str) -> int:
        return self.requests.get((target, outcome), 0)


class ExternalMetrics:
    """Counts HTTP attempts by target and outcome, and their durations."""

    __slots__ = ("_durations", "_lookups", "_requests")

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str], int] = {}
        self._durations: dict[str, list[float]] = {}  # per target: bucket counts, count, sum
        self._lookups: dict[str, int] = {}

    def count(self, target: str, outcome: str) -> None:
        """An attempt that never reached the network (circuit open, deadline)."""
        key = (target, outcome if outcome in OUTCOMES else "protocol_error")
        self._requests[key] = self._requests.get(key, 0) + 1

    def observe(self, target: str, outcome: str, seconds: float) -> None:
        self.count(target, outcome)
        row = self._durations.get(target)
        if row is None:
            row = self._durations[target] = [0.0] * (len(BUCKETS) + 3)
        row[bisect.bisect_left(BUCKETS, seconds)] += 1
        row[-2] += 1
        row[-1] += seconds

    def count_lookup(self, result: str) -> None:
        self._lookups[result] = self._lookups.get(result, 0) + 1

    def statistics(self) -> ExternalMetricsStatistics:
        durations: dict[str, Histogram] = {}
        for target, row in self._durations.items():
            cumulative: list[int] = []
            running = 0
            for n in row[: len(BUCKETS) + 1]:
                running += int(n)
                cumulative.append(running)
            durations[target] = Histogram(BUCKETS, tuple(cumulative), int(row[-2]), row[-1])
        return ExternalMetricsStatistics(
            requests=MappingProxyType(dict(self._requests)),
            durations=MappingProxyType(durations),
            lookups=MappingProxyType(dict(self._lookups)),
        )


@dataclass(frozen=True, slots=True)
class ExternalHealth:
    """The ``external`` health component. ``status``: healthy, degraded or disabled."""

    status: Literal["healthy", "degraded", "disabled"]
    message: str
    breakers: dict[str, str] = field(default_factory=dict)
    outbox_depth: int = 0
    oldest_undelivered_age: float | None = None
    dropped_total: int = 0
    last_error: str | None = None


def external_health(
    reputation: ReputationClient | None,
    forwarder: EventForwarder | None,
    *,
    now: float,
    max_age: float = 300.0,
) -> ExternalHealth:
    """Degraded when a breaker is not closed, the outbox cannot be written, or the
    oldest undelivered event is older than ``max_age`` seconds. ``now`` is
    wall-clock seconds (event ages are wall-clock, since they survive restarts)."""
    if reputation is None and forwarder is None:
        return ExternalHealth("disabled", "no external integration configured")
    problems: list[str] = []
    breakers: dict[str, str] = {}
    depth, age, dropped, last_error = 0, None, 0, None
    if reputation is not None:
        state = str(reputation.breaker.statistics().state)
        breakers[reputation.breaker.name] = state
        if state != "closed":
            problems.append(f"reputation service breaker {state}")
    if forwarder is not None:
        stats = forwarder.statistics(now=now)
        breakers[forwarder.breaker.name] = stats.breaker_state
        box = stats.outbox
        depth, age, dropped = box.pending, box.oldest_age, box.dropped_total
        last_error = stats.last_error
        if stats.breaker_state != "closed":
            problems.append(f"event receiver breaker {stats.breaker_state}")
        if stats.outbox.last_write_error:
            problems.append(f"outbox not writable: {stats.outbox.last_write_error}")
        if age is not None and age > max_age:
            problems.append(f"{depth} events waiting, oldest {age:.0f} s")
    if problems:
        return ExternalHealth(
            "degraded", "; ".join(problems), breakers, depth, age, dropped, last_error
        )
    return ExternalHealth("healthy", "ok", breakers, depth, age, dropped, last_error)


def collect(
    metrics: ExternalMetrics,
    forwarder: EventForwarder | None = None,
    *,
    now: float,
) -> Iterator[Sample]:
    """Samples for a Prometheus custom collector (see the module docstring)."""
    stats = metrics.statistics()
    for (target, outcome), n in sorted(stats.requests.items()):
        yield (
            "sentinel_external_requests_total",
            "counter",
            {"target": target, "outcome": outcome},
            float(n),
        )
    for target, hist in sorted(stats.durations.items()):
        for le, n in zip((*hist.buckets, float("inf")), hist.counts, strict=True):
            yield (
                "sentinel_external_request_duration_seconds_bucket",
                "histogram",
                {"target": target, "le": "+Inf" if le == float("inf") else f"{le:g}"},
                float(n),
            )
        yield ("sentinel_external_request_duration_seconds_count", "histogram",
               {"target": target}, float(hist.count))
        yield ("sentinel_external_request_duration_seconds_sum", "histogram",
               {"target": target}, hist.sum)
    for result, n in sorted(stats.lookups.items()):
        yield ("sentinel_reputation_lookups_total", "counter", {"result": result}, float(n))
    if forwarder is not None:
        box = forwarder.statistics(now=now).outbox
        yield ("sentinel_outbox_events", "gauge", {"state": "pending"}, float(box.pending))
        yield ("sentinel_outbox_events", "gauge", {"state": "unsynced"}, float(box.unsynced))
        for outcome, n in (
            ("delivered", box.delivered_total),
            ("dropped", box.dropped_total),
            ("rejected", box.rejected_total),
            ("refused", box.refused_total),
        ):
            yield (
                "sentinel_outbox_events_removed_total", "counter", {"outcome": outcome}, float(n)
            )
        yield (
            "sentinel_outbox_oldest_event_age_seconds",
            "gauge",
            {},
            float(box.oldest_age or 0.0),
        )


def external_check(
    reputation: ReputationClient | None,
    forwarder: EventForwarder | None,
    *,
    wall_clock: Callable[[], float] = time.time,
    max_age: float = 300.0,
) -> Callable[[], Awaitable[CheckOutcome]]:
    """A check for the health registry: ``health.add("external", external_check(r, f),
    timeout=1.0)``. Healthy or degraded (never unhealthy: a verdict never needs
    the network); its figure is the outbox depth."""
    from sentinel_ipc.observability.health import CheckOutcome

    async def check() -> CheckOutcome:
        h = external_health(reputation, forwarder, now=wall_clock(), max_age=max_age)
        detail = h.message
        if forwarder is not None:
            age = "-" if h.oldest_undelivered_age is None else f"{h.oldest_undelivered_age:.0f} s"
            detail += f"; outbox {h.outbox_depth} waiting (oldest {age}), {h.dropped_total} dropped"
        if h.breakers:
            detail += "; breakers " + ", ".join(f"{k}={v}" for k, v in sorted(h.breakers.items()))
        return CheckOutcome(
            ok=h.status != "degraded",
            message=detail,
            value=float(h.outbox_depth),
            status="degraded" if h.status == "degraded" else "healthy",
        )

    return check


class ExternalCollector:
    """prometheus_client custom collector over :func:`collect`. ``forwarder`` is a
    callable so the collector can be registered before the forwarder exists."""

    def __init__(
        self,
        metrics: ExternalMetrics,
        forwarder: Callable[[], EventForwarder | None] = lambda: None,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self._forwarder = forwarder
        self._wall = wall_clock

    def describe(self) -> list[Any]:
        return self._families(with_samples=False)

    def collect(self) -> list[Any]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> list[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "sentinel_external_requests",
            "HTTP requests to external integrations, by target and outcome.",
            labels=["target", "outcome"],
        )
        duration = HistogramMetricFamily(
            "sentinel_external_request_duration_seconds",
            "Duration of HTTP requests to external integrations, in seconds.",
            labels=["target"],
        )
        lookups = CounterMetricFamily(
            "sentinel_reputation_lookups", "Reputation lookups, by result.", labels=["result"]
        )
        outbox = GaugeMetricFamily(
            "sentinel_outbox_events", "Events in the forwarding outbox, by state.",
            labels=["state"],
        )
        left = CounterMetricFamily(
            "sentinel_outbox_events_removed",
            "Events that left the forwarding outbox (or never entered), by outcome.",
            labels=["outcome"],
        )
        oldest = GaugeMetricFamily(
            "sentinel_outbox_oldest_event_age_seconds",
            "Age of the oldest undelivered event in the outbox (0 when empty).",
        )
        families: list[Any] = [requests, duration, lookups, outbox, left, oldest]
        if not with_samples:
            return families
        stats = self._metrics.statistics()
        for (target, outcome), n in sorted(stats.requests.items()):
            requests.add_metric([target, outcome], float(n))
        for target, hist in sorted(stats.durations.items()):
            buckets = [
                (f"{le:g}", float(n)) for le, n in zip(hist.buckets, hist.counts, strict=False)
            ]
            buckets.append(("+Inf", float(hist.counts[-1])))
            duration.add_metric([target], buckets, hist.sum)
        for result, n in sorted(stats.lookups.items()):
            lookups.add_metric([result], float(n))
        forwarder = self._forwarder()
        if forwarder is not None:
            box = forwarder.statistics(now=self._wall()).outbox
            outbox.add_metric(["pending"], float(box.pending))
            outbox.add_metric(["unsynced"], float(box.unsynced))
            oldest.add_metric([], float(box.oldest_age or 0.0))
            for outcome, n in (
                ("delivered", box.delivered_total),
                ("dropped", box.dropped_total),
                ("rejected", box.rejected_total),
                ("refused", box.refused_total),
            ):
                left.add_metric([outcome], float(n))
        return families
