"""Metrics: every family of issue 6 point 3, fed by real breakers and the retry
counters, in a text that prometheus_client's parser reads back (and, when
``promtool`` is installed, that ``promtool check metrics`` accepts)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from collections.abc import Iterable

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from sentinel_ipc.observability.metrics import SentinelMetrics
from sentinel_ipc.resilience import (
    RETRY_COUNTERS,
    RETRY_POLICIES,
    RETRY_PRESETS,
    BreakerConfig,
    CircuitBreaker,
    RetryCounters,
    RetryOutcome,
    guarded_call,
)

REQUIRED_FAMILIES = {
    # family name as the parser reports it (counters lose "_total")
    "sentinel_uptime_seconds": "gauge",
    "sentinel_scans": "counter",
    "sentinel_scan_duration_seconds": "histogram",
    "sentinel_scan_bytes": "counter",
    "sentinel_database_query_duration_seconds": "histogram",
    "sentinel_yara_scan_duration_seconds": "histogram",
    "sentinel_ipc_connections_active": "gauge",
    "sentinel_ipc_receive_buffer_bytes": "gauge",
    "sentinel_ipc_receive_buffer_waiting": "gauge",
    "sentinel_disk_free_bytes": "gauge",
    "sentinel_memory_rss_bytes": "gauge",
    "sentinel_circuit_breaker_state": "gauge",
    "sentinel_circuit_breaker_transitions": "counter",
    "sentinel_circuit_breaker_calls": "counter",
    "sentinel_retries": "counter",
    "sentinel_retry_outcomes": "counter",
    "sentinel_service_state": "gauge",
    "sentinel_errors": "counter",
}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def families(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def fed_metrics() -> tuple[SentinelMetrics, CircuitBreaker]:
    clock = Clock()
    metrics = SentinelMetrics(monotonic=clock)
    db = CircuitBreaker("database", BreakerConfig(failure_threshold=2, open_timeout=5.0,
                                                  success_threshold=1), clock=clock)
    yara = CircuitBreaker("yara", BreakerConfig(), clock=clock)
    db.add_listener(metrics.on_breaker_transition)
    for _ in range(2):
        db.record_failure(db.acquire())
    with pytest.raises(Exception, match="open"):
        db.acquire()
    clock.now = 6.0
    db.record_success(db.acquire())  # half-open trial closes it
    yara.record_success(yara.acquire())
    metrics.breakers = lambda: [db, yara]
    metrics.connections = lambda: 3
    metrics.receive_buffer = lambda: (3 << 20, 2)
    metrics.disk_free = lambda: {"/": 5_000_000_000, "/tmp": 2_000_000_000}
    metrics.rss = lambda: 123_456_789
    metrics.service_states = lambda: {"database": "failed", "yara": "healthy"}
    metrics.errors = lambda: {"busy": 2, "circuit_open": 1}
    counters = RetryCounters(RETRY_POLICIES)
    for _ in range(4):  # four calls that each needed one retry
        counters.count_retry("database")
        counters.count_outcome("database_add", RetryOutcome.SUCCESS_WITH_RETRY, "database")
    for _ in range(7):  # and seven that did not
        counters.count_first_try_success("database_decide", "database")
    metrics.retry_counters = counters.statistics
    metrics.observe_scan("block", 0.02, 68, yara_seconds=0.004)
    metrics.observe_scan("allow", 0.01, 1000)
    metrics.observe_scan("bogus-from-a-bug", 0.01, 0)
    metrics.observe_database_query(0.0004)
    clock.now = 42.0
    return metrics, db


def test_every_required_family_is_present_with_its_type() -> None:
    metrics, _ = fed_metrics()
    _, text = metrics.render()
    found = families(text)
    for name, kind in REQUIRED_FAMILIES.items():
        assert found.get(name) == kind, f"{name}: {found.get(name)!r}"


def test_values_are_what_the_sources_say() -> None:
    metrics, db = fed_metrics()
    content_type, text = metrics.render("prometheus")
    assert content_type.startswith("text/plain; version=0.0.4")
    s = samples(text)
    assert s[("sentinel_uptime_seconds", ())] == 42.0
    assert s[("sentinel_scans_total", (("action", "block"),))] == 1
    assert s[("sentinel_scans_total", (("action", "allow"),))] == 1
    assert s[("sentinel_scans_total", (("action", "quarantine"),))] == 0  # pre-declared
    assert s[("sentinel_scans_total", (("action", "error"),))] == 1  # unknown label bounded
    assert s[("sentinel_scan_bytes_total", ())] == 1068
    assert s[("sentinel_scan_duration_seconds_count", ())] == 3
    assert s[("sentinel_yara_scan_duration_seconds_count", ())] == 1
    assert s[("sentinel_database_query_duration_seconds_count", ())] == 1
    assert s[("sentinel_ipc_connections_active", ())] == 3
    assert s[("sentinel_ipc_receive_buffer_bytes", ())] == 3 << 20
    assert s[("sentinel_ipc_receive_buffer_waiting", ())] == 2
    assert s[("sentinel_disk_free_bytes", (("mount", "/tmp"),))] == 2_000_000_000
    assert s[("sentinel_memory_rss_bytes", ())] == 123_456_789
    state = lambda name: s[(  # noqa: E731
        "sentinel_circuit_breaker_state", (("breaker", "database"), ("state", name))
    )]
    assert state("closed") == 1 and state("open") == 0 and state("half_open") == 0
    transitions = {
        (dict(k[1])["from"], dict(k[1])["to"]): v
        for k, v in s.items()
        if k[0] == "sentinel_circuit_breaker_transitions_total"
    }
    assert transitions == {("closed", "open"): 1, ("open", "half_open"): 1,
                           ("half_open", "closed"): 1}
    stats = db.statistics()
    calls = lambda outcome: s[(  # noqa: E731
        "sentinel_circuit_breaker_calls_total", (("breaker", "database"), ("outcome", outcome))
    )]
    assert calls("failure") == stats.failures == 2
    assert calls("rejected") == stats.rejected == 1
    assert calls("success") == stats.successes == 1
    retries = {dict(k[1])["operation"]: v for k, v in s.items()
               if k[0] == "sentinel_retries_total"}
    assert retries == {"database": 4, "ipc": 0, "file": 0, "yara": 0, "external": 0}
    outcome = lambda call, name: s[(  # noqa: E731
        "sentinel_retry_outcomes_total",
        (("call", call), ("operation", "database"), ("outcome", name)),
    )]
    assert outcome("database_add", "success_with_retry") == 4
    assert outcome("database_decide", "success_no_retry") == 7
    assert outcome("database_decide", "failed_no_retry") == 0  # every outcome, from the start
    assert s[("sentinel_service_state", (("service", "database"), ("state", "failed")))] == 1
    assert s[("sentinel_service_state", (("service", "database"), ("state", "healthy")))] == 0
    assert s[("sentinel_errors_total", (("code", "busy"),))] == 2


def test_openmetrics_rendering_parses_and_ends_with_eof() -> None:
    metrics, _ = fed_metrics()
    content_type, text = metrics.render("openmetrics")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse

    names = {f.name for f in om_parse(text)}
    assert {"sentinel_scans", "sentinel_circuit_breaker_state", "sentinel_errors"} <= names


def test_unset_sources_leave_families_empty_but_valid() -> None:
    metrics = SentinelMetrics()
    _, text = metrics.render()
    found = families(text)
    assert found["sentinel_uptime_seconds"] == "gauge"
    assert not [k for k in samples(text) if k[0] == "sentinel_ipc_connections_active"]


def test_retry_counters_of_the_resilience_core_flow_through() -> None:
    """By default the metrics read the process-wide counters the drivers feed."""
    metrics = SentinelMetrics()
    call = f"metrics-test-{uuid.uuid4().hex}"  # a label no other test uses
    RETRY_COUNTERS.count_outcome(call, RetryOutcome.BUDGET_EXHAUSTED, "database")
    RETRY_COUNTERS.count_retry("database")
    s = samples(metrics.render()[1])
    labels = (("call", call), ("operation", "database"), ("outcome", "budget_exhausted"))
    assert s[("sentinel_retry_outcomes_total", labels)] == 1
    expected = RETRY_COUNTERS.statistics().retries["database"]
    assert expected >= 1
    assert s[("sentinel_retries_total", (("operation", "database"),))] == expected


class Flaky(Exception):
    pass


async def test_retries_total_counts_retries_made_by_policy_not_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SPEC section 4 asks for "retries per operation": a call that succeeds at
    once is traffic and adds 0 (else rate() alerts on every clean scan); one
    that succeeds on its 2nd attempt adds 1, under its retry policy's name
    ("database"), not its call site's ("database_add")."""
    metrics = SentinelMetrics()
    policy = dataclasses.replace(RETRY_PRESETS["database"], on=Flaky, jitter=0.0)

    def retries_total() -> dict[str, float]:
        return {dict(labels)["operation"]: value
                for (name, labels), value in samples(metrics.render()[1]).items()
                if name == "sentinel_retries_total"}

    async def ok() -> str:
        return "ok"

    failed = False

    async def fails_once() -> str:
        nonlocal failed
        if not failed:
            failed = True
            raise Flaky("database is locked")
        return "ok"

    start = retries_total()
    assert await guarded_call(ok, retry=policy, operation="database_list") == "ok"
    assert retries_total() == start

    began = trio.current_time()
    assert await guarded_call(fails_once, retry=policy, operation="database_add") == "ok"
    assert trio.current_time() - began == pytest.approx(0.1)  # the backoff elapsed, mock time
    after = retries_total()
    assert after["database"] == start["database"] + 1
    assert {k: v for k, v in after.items() if k != "database"} == {
        k: v for k, v in start.items() if k != "database"
    }
    assert "database_add" not in after and set(RETRY_POLICIES) <= set(after)


def _promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not on PATH (Debian package 'prometheus')")
def test_promtool_check_metrics_accepts_the_text() -> None:
    metrics, _ = fed_metrics()
    result = _promtool(metrics.render()[1])
    assert result.returncode == 0, result.stdout + result.stderr
    complaints = result.stdout.strip() + result.stderr.strip()
    assert complaints == "", complaints


def _label_values(text: str, label: str) -> Iterable[str]:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if label in s.labels:
                yield s.labels[label]


def test_labels_are_bounded() -> None:
    metrics, _ = fed_metrics()
    for _ in range(100):
        metrics.observe_scan(f"client-controlled-{_}", 0.001, 1)
    text = metrics.render()[1]
    assert set(_label_values(text, "action")) <= {"allow", "warn", "quarantine", "block", "error"}
