"""SPEC section 4's metrics as a real ``sentineld`` exports them.

Scraped over the daemon's socket, as an operator's exporter would, after real
scans: what ``sentinel_retries_total`` counts (retries made, not traffic),
whose resident memory ``sentinel_memory_rss_bytes`` reports (the daemon's own,
not the sum with its scan workers), and the scanner's own counters and its
workers' memory.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

from sentinel_ipc.client import open_client
from sentinel_ipc.codec import decode_reply, encode_framed
from sentinel_ipc.messages import Error, ScanBegin, ScanChunk
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


async def test_the_scanners_own_events_and_its_workers_memory_are_exported(
    daemon_factory: Any,
) -> None:
    """What an operator alerts on before the yara breaker opens: workers dying,
    streams abandoned by their clients; and what the workers hold in memory
    (``sentinel_memory_rss_bytes`` is the daemon's own)."""
    d = daemon_factory(config={
        "scanner": {"workers": 2, "stream_idle_timeout": 0.5},
        "resilience": {"check_interval": 0.2},
    })
    daemon = psutil.Process(d.pid)
    async with open_client(d.socket_path) as client:
        await client.scan(b"warm the workers up" * 100, timeout=30)
        before = parse((await client.metrics(timeout=10)).text)
        assert before[("sentinel_scan_worker_crashes_total", ())] == 0
        assert before[("sentinel_scan_streams_expired_total", ())] == 0

        victim = daemon.children()[0]
        victim.kill()  # kill -9 of a worker
        # A stream whose client goes quiet after its first chunk.
        quiet = await trio.open_unix_socket(str(d.socket_path))
        await quiet.send_all(encode_framed(ScanBegin(id=7)) +
                             encode_framed(ScanChunk(id=7, data=b"partial")))
        with trio.fail_after(10):
            frame = b""
            while len(frame) < 4 or len(frame) < 4 + int.from_bytes(frame[:4], "big"):
                frame += await quiet.receive_some(65536)
        expired = decode_reply(frame[4:])
        assert isinstance(expired, Error) and expired.code == "timeout" and expired.id == 7
        await quiet.aclose()

        with trio.fail_after(10):
            while True:
                after = parse((await client.metrics(timeout=10)).text)
                if after[("sentinel_scan_worker_crashes_total", ())] >= 1:
                    break
                await trio.sleep(0.1)
        assert after[("sentinel_scan_worker_crashes_total", ())] == 1
        assert after[("sentinel_scan_streams_expired_total", ())] == 1
        assert after[("sentinel_scan_hard_timeouts_total", ())] == 0

        await trio.sleep(0.5)  # a memory check round with the replacement worker
        workers = daemon.children()
        text = (await client.metrics(timeout=10)).text
    workers_rss = sum(_statm_rss(w.pid) for w in workers)
    exported = parse(text)[("sentinel_scan_workers_rss_bytes", ())]
    assert abs(exported - workers_rss) <= max(8 * 1024 * 1024, 0.15 * workers_rss), (
        exported, workers_rss)
    d.stop()
