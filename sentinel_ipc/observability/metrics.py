"""Sentinel's metrics on a private prometheus_client registry.

Two kinds of metric live here:

* **observed** ones the request path feeds as things happen: scans by action,
  scan and YARA durations (histograms), bytes scanned, database query time,
  breaker transitions (a breaker listener);
* **read at scrape time** by a custom collector: uptime, active connections,
  disk free, the daemon's RSS, breaker states and calls by outcome
  (``CircuitBreaker.statistics()``), retries made per retry policy and
  retried calls by outcome (``RETRY_COUNTERS``), service states (the
  FallbackManager) and errors by code (the server's counter). Reading at
  scrape time is exact and costs the call path nothing.

Retries: ``sentinel_retries_total{operation}`` is SPEC's "retries per
operation": the attempts after the first, by retry policy (database, ipc,
file, yara, external), so a call that succeeds at once adds nothing and
``rate()`` of it alerts on trouble, not on traffic.
``sentinel_retry_outcomes_total{operation,call,outcome}`` counts how every
call with a retry policy ended, by policy, call site (``database_add``,
``yara``, ``reputation``, ...) and outcome, first-try successes included.

Every label is bounded: actions, breaker names, states, outcomes, services,
error codes and mount points come from fixed or configured sets, never from a
client. ``render()`` produces the Prometheus text format (0.0.4, what
``promtool check metrics`` and every scraper read) or OpenMetrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Literal

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.exposition import generate_latest as _generate_text
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as _OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as _generate_openmetrics

from ..messages import ACTIONS
from ..resilience.instruments import RETRY_COUNTERS, RetryCountersStatistics

if TYPE_CHECKING:
    from sentinel_ipc.resilience.breaker import CircuitBreaker
    from sentinel_ipc.resilience.instruments import BreakerTransition

__all__ = ["BREAKER_STATES", "SERVICE_STATES", "SentinelMetrics"]

# The ``*_created`` series prometheus_client adds to counters and histograms
# would double the families in the text format and mean nothing to an operator
# of a single daemon. Process-wide, which is what the daemon wants.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

BREAKER_STATES = ("closed", "open", "half_open", "forced_open", "disabled")
SERVICE_STATES = ("healthy", "degraded", "failed", "critical")
CALL_OUTCOMES = ("success", "failure", "ignored", "rejected")

_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_DB_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

Format = Literal["prometheus", "openmetrics"]


class SentinelMetrics:
    """The daemon's metrics. Sources read at scrape time are plain callables the
    composition root sets (``connections``, ``disk_free``, ``rss``, ``breakers``,
    ``service_states``, ``errors``); unset ones are simply not exported.
    ``retry_counters`` reads the process-wide ``RETRY_COUNTERS`` unless replaced.
    ``rss`` is the daemon process's own resident memory (SPEC's "process RSS"),
    not its workers'."""

    def __init__(self, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._mono = monotonic
        self._started = monotonic()
        self.registry = CollectorRegistry(auto_describe=True)
        self.scans = Counter(
            "sentinel_scans", "Scans answered, by verdict action.", ["action"],
            registry=self.registry,
        )
        self.scan_duration = Histogram(
            "sentinel_scan_duration_seconds",
            "Time from a scan request to its verdict, in seconds.",
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        self.scan_bytes = Counter(
            "sentinel_scan_bytes", "Bytes scanned.", registry=self.registry
        )
        self.database_query_duration = Histogram(
            "sentinel_database_query_duration_seconds",
            "Duration of policy-database queries (store calls and health probes), in seconds.",
            buckets=_DB_BUCKETS, registry=self.registry,
        )
        self.yara_scan_duration = Histogram(
            "sentinel_yara_scan_duration_seconds",
            "Time a worker spent matching YARA rules on one scan, in seconds.",
            buckets=_DURATION_BUCKETS, registry=self.registry,
        )
        for action in ACTIONS:  # export zeros, so rate() works from the first scrape
            self.scans.labels(action)
        self._transitions: dict[tuple[str, str, str], int] = {}
        self.connections: Callable[[], int] | None = None
        #: (bytes reserved, frames waiting) of the server's receive budget.
        self.receive_buffer: Callable[[], tuple[int, int]] | None = None
        self.disk_free: Callable[[], Mapping[str, int]] | None = None
        self.rss: Callable[[], int | None] | None = None
        self.workers_rss: Callable[[], int | None] | None = None
        #: Counts of the scanner's own events, by the names in ``_SCANNER_EVENTS``.
        self.scanner_events: Callable[[], Mapping[str, int]] | None = None
        self.breakers: Callable[[], Iterable[CircuitBreaker]] | None = None
        self.service_states: Callable[[], Mapping[str, str]] | None = None
        self.errors: Callable[[], Mapping[str, int]] | None = None
        self.retry_counters: Callable[[], RetryCountersStatistics] | None = (
            RETRY_COUNTERS.statistics
        )
        self.registry.register(_ScrapeCollector(self))

    # -- observation hooks (cheap; call from the request path) -----------------

    def observe_scan(
        self,
        action: str,
        seconds: float,
        size: int,
        yara_seconds: float | None = None,
    ) -> None:
        label = action if action in ACTIONS else "error"
        self.scans.labels(label).inc()
        self.scan_duration.observe(max(0.0, seconds))
        if size > 0:
            self.scan_bytes.inc(size)
        if yara_seconds is not None and yara_seconds > 0:
            self.yara_scan_duration.observe(yara_seconds)

    def observe_database_query(self, seconds: float) -> None:
        self.database_query_duration.observe(max(0.0, seconds))

    def on_breaker_transition(self, transition: BreakerTransition) -> None:
        """A breaker listener: counts ``sentinel_circuit_breaker_transitions_total``."""
        key = (transition.breaker, str(transition.from_state), str(transition.to_state))
        self._transitions[key] = self._transitions.get(key, 0) + 1

    def transitions(self) -> dict[tuple[str, str, str], int]:
        return dict(self._transitions)

    def uptime(self) -> float:
        return max(0.0, self._mono() - self._started)

    # -- exposition --------------------------------------------------------------

    def render(self, fmt: Format = "prometheus") -> tuple[str, str]:
        """(content type, text) in the Prometheus text format or OpenMetrics."""
        if fmt == "openmetrics":
            return _OPENMETRICS_TYPE, _generate_openmetrics(self.registry).decode()  # type: ignore[no-untyped-call]
        return CONTENT_TYPE_PLAIN_0_0_4, _generate_text(self.registry).decode()


#: The scanner's counters, exported as ``sentinel_scan_<name>``: what an
#: operator alerts on when the scanner is unwell before its breaker opens.
_SCANNER_EVENTS: dict[str, str] = {
    "worker_crashes_total": "Scan workers that died unasked (crash, kill -9, out of memory).",
    "hard_timeouts_total": "Scans past their hard deadline, whose worker was killed.",
    "workers_recycled_total": "Scan workers retired after their scan count or memory limit.",
    "streams_expired_total": "Chunked scan streams dropped for getting no chunk in time.",
}


class _ScrapeCollector:
    """Reads the live figures at scrape time (see the module docstring)."""

    def __init__(self, metrics: SentinelMetrics) -> None:
        self._m = metrics

    def describe(self) -> Iterable[Metric]:
        # Families only; the registry uses names to reject duplicates.
        return list(self._families(with_samples=False))

    def collect(self) -> Iterable[Metric]:
        return list(self._families(with_samples=True))

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        m = self._m
        uptime = GaugeMetricFamily(
            "sentinel_uptime_seconds", "Seconds since the daemon started."
        )
        connections = GaugeMetricFamily(
            "sentinel_ipc_connections_active", "Client connections open on the Unix socket."
        )
        receive_reserved = GaugeMetricFamily(
            "sentinel_ipc_receive_buffer_bytes",
            "Bytes reserved for large frames being received, all connections together.",
        )
        receive_waiting = GaugeMetricFamily(
            "sentinel_ipc_receive_buffer_waiting",
            "Large frames waiting for room in the receive budget (their senders held back).",
        )
        disk = GaugeMetricFamily(
            "sentinel_disk_free_bytes",
            "Free bytes on the file systems of the data dir and the temp dir.",
            labels=["mount"],
        )
        rss = GaugeMetricFamily(
            "sentinel_memory_rss_bytes",
            "Resident memory of the daemon process itself (its scan workers not included),"
            " as of the last memory health check.",
        )
        workers_rss = GaugeMetricFamily(
            "sentinel_scan_workers_rss_bytes",
            "Resident memory of the scan worker processes together, as of the last memory"
            " health check (each worker is also recycled past its own limit).",
        )
        scanner_events = [
            CounterMetricFamily(f"sentinel_scan_{name}", text)
            for name, text in _SCANNER_EVENTS.items()
        ]
        state = GaugeMetricFamily(
            "sentinel_circuit_breaker_state",
            "1 for the state each circuit breaker is in, 0 for the others.",
            labels=["breaker", "state"],
        )
        transitions = CounterMetricFamily(
            "sentinel_circuit_breaker_transitions",
            "Circuit breaker state transitions.",
            labels=["breaker", "from", "to"],
        )
        calls = CounterMetricFamily(
            "sentinel_circuit_breaker_calls",
            "Calls through each circuit breaker, by outcome.",
            labels=["breaker", "outcome"],
        )
        retries = CounterMetricFamily(
            "sentinel_retries",
            "Retries made (attempts after the first), by retry policy"
            " (database, ipc, file, yara, external). A first-try success adds nothing.",
            labels=["operation"],
        )
        retry_outcomes = CounterMetricFamily(
            "sentinel_retry_outcomes",
            "Calls that ran under a retry policy, by policy (operation), call site (call)"
            " and how they ended (outcome; success_no_retry is a first-try success).",
            labels=["operation", "call", "outcome"],
        )
        services = GaugeMetricFamily(
            "sentinel_service_state",
            "1 for the degradation state each service is in, 0 for the others.",
            labels=["service", "state"],
        )
        errors = CounterMetricFamily(
            "sentinel_errors", "Error replies sent, by error code.", labels=["code"]
        )
        if with_samples:
            uptime.add_metric([], m.uptime())
            if m.connections is not None:
                connections.add_metric([], float(m.connections()))
            if m.receive_buffer is not None:
                reserved, waiting = m.receive_buffer()
                receive_reserved.add_metric([], float(reserved))
                receive_waiting.add_metric([], float(waiting))
            if m.disk_free is not None:
                for mount, free in sorted(m.disk_free().items()):
                    disk.add_metric([mount], float(free))
            if m.rss is not None and (value := m.rss()) is not None:
                rss.add_metric([], float(value))
            if m.workers_rss is not None and (value := m.workers_rss()) is not None:
                workers_rss.add_metric([], float(value))
            if m.scanner_events is not None:
                scanner_counts = m.scanner_events()
                for family, name in zip(scanner_events, _SCANNER_EVENTS, strict=True):
                    if name in scanner_counts:
                        family.add_metric([], scanner_counts[name])
            if m.breakers is not None:
                for breaker in m.breakers():
                    stats = breaker.statistics()
                    for name in BREAKER_STATES:
                        state.add_metric([stats.name, name], 1.0 if stats.state == name else 0.0)
                    calls.add_metric([stats.name, "success"], stats.successes)
                    calls.add_metric([stats.name, "failure"], stats.failures)
                    calls.add_metric([stats.name, "ignored"], stats.ignored)
                    calls.add_metric([stats.name, "rejected"], stats.rejected)
            for (breaker_name, old, new), count in sorted(m.transitions().items()):
                transitions.add_metric([breaker_name, old, new], count)
            if m.retry_counters is not None:
                counts = m.retry_counters()
                for policy, count in sorted(counts.retries.items()):
                    retries.add_metric([policy], count)
                for (policy, call, outcome), count in sorted(counts.calls.items()):
                    retry_outcomes.add_metric([policy, call, str(outcome)], count)
            if m.service_states is not None:
                for service, current in sorted(m.service_states().items()):
                    for name in SERVICE_STATES:
                        services.add_metric([service, name], 1.0 if current == name else 0.0)
            if m.errors is not None:
                for code, count in sorted(m.errors().items()):
                    errors.add_metric([code], count)
        yield from (uptime, connections, receive_reserved, receive_waiting, disk, rss,
                    workers_rss, *scanner_events, state, transitions, calls, retries,
                    retry_outcomes, services, errors)
