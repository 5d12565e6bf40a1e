"""SPEC section 4's metrics as a real ``sentineld`` exports them.

Scraped over the daemon's socket, as an operator's exporter would, after real
scans: what ``sentinel_retries_total`` counts (retries made, not traffic) and
whose resident memory ``sentinel_memory_rss_bytes`` reports (the daemon's own,
not the sum with its scan workers).
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

from sentinel_ipc.client import open_client
from sentinel_ipc.resilience import RETRY_POLICIES

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def family(samples: Samples, name: str) -> Samples:
    return {k: v for k, v in samples.items() if k[0] == name}


async def test_clean_scans_add_nothing_to_retries_total(daemon_factory: Any) -> None:
    """``rate(sentinel_retries_total)`` is an alert on retries: first-try
    successes (every clean scan) must leave it alone, while the separate
    outcome family still shows that the scans ran under the yara retry policy."""
    d = daemon_factory()
    async with open_client(d.socket_path) as client:
        before = parse((await client.metrics(timeout=10)).text)
        for n in range(2):
            result = await client.scan(f"clean file {n}".encode() * 100, timeout=30)
            assert result.action == "allow" and not result.degraded
        after = parse((await client.metrics(timeout=10)).text)

    retries = family(after, "sentinel_retries_total")
    assert {dict(labels)["operation"] for _, labels in retries} == set(RETRY_POLICIES)
    assert retries == family(before, "sentinel_retries_total")
    assert all(value == 0 for value in retries.values()), retries

    key = ("sentinel_retry_outcomes_total",
           (("call", "yara"), ("operation", "yara"), ("outcome", "success_no_retry")))
    assert after[key] - before.get(key, 0.0) == 2
    d.stop()


def _statm_rss(pid: int) -> int:
    """Resident set of ``pid`` in bytes, from /proc/<pid>/statm (second field, pages)."""
    with open(f"/proc/{pid}/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def test_memory_rss_is_the_daemon_process_alone(daemon_factory: Any) -> None:
    """SPEC: "process RSS < 2 GB, else degraded" and ``sentinel_memory_rss_bytes``
    are the daemon's own memory; the workers have their own per-worker limit.
    Summed with the workers the figure was about twice the process RSS."""
    d = daemon_factory(config={"scanner": {"workers": 2},
                               "resilience": {"check_interval": 0.2}})
    daemon = psutil.Process(d.pid)
    async with open_client(d.socket_path) as client:
        await client.scan(b"warm the workers up" * 100, timeout=30)
        workers = daemon.children(recursive=True)
        assert workers, "the daemon should have scan worker processes"
        workers_rss = sum(w.memory_info().rss for w in workers)
        await trio.sleep(0.5)  # a memory check round after the scan
        own_rss = _statm_rss(d.pid)
        text = (await client.metrics(timeout=10)).text
        report = await client.health(timeout=10)
    exported = parse(text)[("sentinel_memory_rss_bytes", ())]

    tolerance = max(8 * 1024 * 1024, 0.15 * own_rss)
    assert abs(exported - own_rss) <= tolerance, (exported, own_rss, workers_rss)
    assert workers_rss > 2 * tolerance  # so the sum would have been told apart
    memory = report.components["memory"]
    assert memory.value is not None and abs(memory.value - own_rss) <= tolerance
    assert memory.status == "healthy"
    d.stop()
