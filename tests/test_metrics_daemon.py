"""SPEC section 4's metrics as a real ``sentineld`` exports them.

Scraped over the daemon's socket, as an operator's exporter would, after real
scans: what ``sentinel_retries_total`` counts (retries made, not traffic) and
whose resident memory ``sentinel_memory_rss_bytes`` reports (the daemon's own,
not the sum with its scan workers).
"""

from __future__ import annotations

from typing import Any

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
