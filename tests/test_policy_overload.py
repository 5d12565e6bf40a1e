"""A busy policy database is not a broken one.

Every store call's ``op_timeout`` counts its wait in the store thread's queue,
and a timeout used to be a database failure: a flood of cheap requests (or an
event loop too busy to let the store thread run) put a healthy database in
degraded mode and opened its breaker. Now a call that timed out while waiting
its turn, with the thread finishing the calls ahead of it, is
``StoreOverloadedError`` (``busy``): the breaker does not count it, the service
stays healthy, the one call falls back (a write to the journal, replayed
once); and clients' reads are refused ``busy`` before they join a long queue.
A thread stuck on one call is still a failure.

Real parts: a real SQLite file, the real store thread running real store calls,
a real ``sentineld`` for the flood.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from daemon_harness import DaemonProcess, traversable_dir
from test_policy_faults import EVIL, fast_config, held_lock, service
from test_policy_paging import seed_policies, start_seeded
from test_security import NOBODY, can_be_nobody

from sentinel_ipc.codec import encode_framed
from sentinel_ipc.errors import BusyError, SentinelError
from sentinel_ipc.messages import Error, Health, HealthReport, PolicyList, PolicyListResult
from sentinel_ipc.policy.service import _queued_too_long
from sentinel_ipc.policy.snapshot import load_snapshot
from sentinel_ipc.policy.store import StoreJob
from sentinel_ipc.resilience import BreakerState
from sentinel_ipc.transport import open_framed_connection

TABLE = 20_000


def sha(n: int) -> str:
    return hashlib.sha256(f"overload {n}".encode()).hexdigest()


def test_a_timeout_is_overload_only_when_the_call_mostly_waited_its_turn() -> None:
    now = time.monotonic()
    job: StoreJob[Any] = StoreJob()
    # Not started: overload while the call at the head runs less than op_timeout.
    assert _queued_too_long(job, now - 0.5, op_timeout=2.0)
    assert _queued_too_long(job, None, op_timeout=2.0)
    assert not _queued_too_long(job, now - 2.5, op_timeout=2.0)  # the thread is stuck
    assert not _queued_too_long(job, now - 2.5, op_timeout=2.0, read=True)
    # Started: overload if it began late (it mostly waited), or it is a read.
    job.started_at = now - 0.3
    assert _queued_too_long(job, job.started_at, op_timeout=2.0)
    job.started_at = now - 1.5
    assert not _queued_too_long(job, job.started_at, op_timeout=2.0)  # the call is slow
    assert _queued_too_long(job, job.started_at, op_timeout=2.0, read=True)  # optional work


async def test_a_write_behind_a_long_queue_is_journaled_not_a_failure(tmp_path: Path) -> None:
    """Seconds of real 5,000-row page reads fill the store thread's queue, far longer
    than ``op_timeout``: a policy add behind them times out waiting its turn.
    It is journaled (``queued``) and applied once; the service never goes
    degraded and the breaker counts no failure; the cache and its file then
    hold the policy under its database id, not a provisional one."""
    seed_policies(tmp_path / "policy_graph.db", TABLE)
    # Small load pages, so that start-up's own loads stay far under op_timeout.
    config = fast_config(
        op_timeout=1.0, load_chunk=1000, verify_interval=3600.0, refresh_interval=3600.0
    )
    async with service(tmp_path, config) as svc:
        # Start-up is not what this test is about: on a loaded machine its first
        # calls may pass op_timeout (it then recovers by itself). Only what the
        # overload below adds is counted.
        with trio.fail_after(30):
            while svc.degraded:  # noqa: ASYNC110 - the maintenance task recovers
                await trio.sleep(0.05)
        failures_before = svc.breaker.statistics().failures
        overloaded_before = svc.overloaded_calls
        store, thread = svc._store, svc._thread

        def page() -> int:  # real work on the store thread; the rows are dropped
            return len(store.list_policies_page(0, 5000))

        one = min(_timed(page) for _ in range(3))
        # Several seconds of calls ahead: the add and the decision below each
        # wait op_timeout behind them, and some are still left after both.
        jobs = [thread.submit(page) for _ in range(max(40, int(4.0 / max(one, 1e-3))))]
        with pytest.raises(BusyError):  # a client's read: refused before it queues
            await svc.list_page(0, 10)
        policy_id, queued = await svc.add(action="block", sha256=sha(1), created_by="t")
        assert queued and policy_id is None, (policy_id, queued)  # journaled
        # A detection behind the same queue: the cached policies decide (they
        # mirror the healthy database), not marked degraded; its record waits
        # in the journal.
        verdict = await svc.decide(sha256=sha(9), url=None, matches=EVIL)
        assert (verdict.action, verdict.degraded) == ("block", False), verdict
        assert not svc.degraded, svc.degraded_reason
        assert svc.overloaded_calls - overloaded_before == 2
        stats = svc.breaker.statistics()
        assert stats.state is BreakerState.CLOSED, stats
        assert stats.failures == failures_before, stats
        for job in jobs:
            assert await job.result() == 5000
        with trio.fail_after(10):
            while svc.journal_depth:  # noqa: ASYNC110 - the maintenance task replays
                await trio.sleep(0.02)
        listing, degraded = await svc.list()
        assert not degraded and not svc.degraded
        assert [p.file_hash for p in listing].count(sha(1)) == 1
        threats = await svc.threats(100)
        assert [t.file_hash for t in threats].count(sha(9)) == 1  # the record, replayed once
        real = next(p for p in listing if p.file_hash == sha(1))

        def cached() -> list[int]:
            return [p.id for p in svc._snapshot.index.policies() if p.file_hash == sha(1)]

        with trio.fail_after(10):  # the cache reloads at once: the database's id, once
            while cached() != [real.id]:  # noqa: ASYNC110 - the maintenance task reloads
                await trio.sleep(0.02)
    on_disk = load_snapshot(tmp_path / "policy_snapshot.json")
    assert on_disk is not None
    assert [p.id for p in on_disk.file.policies if p.file_hash == sha(1)] == [real.id]


async def test_a_call_behind_a_stuck_call_is_still_a_failure(tmp_path: Path) -> None:
    """The thread is stuck on one call (another connection holds the write lock
    longer than ``op_timeout``) and finishes nothing: the call queued behind it
    is a database failure, and the service goes degraded as before."""
    db = tmp_path / "policy_graph.db"
    config = fast_config(busy_timeout_ms=2000, op_timeout=0.2, verify_interval=3600.0)
    async with service(tmp_path, config) as svc:
        await svc.add(action="block", sha256=sha(2), created_by="t")
        with held_lock(db):
            stuck = svc._thread.submit(
                partial(svc._store.add, _draft(sha(3)), key="stuck", now=1.0)
            )
            await trio.sleep(0.05)  # it has begun, waiting for the lock
            _, queued = await svc.add(action="block", sha256=sha(4), created_by="t")
            assert queued
            assert svc.degraded and "not responding" in (svc.degraded_reason or "")
            assert svc.overloaded_calls == 0
        with contextlib.suppress(SentinelError):  # it gets the lock once released, or not
            await stuck.result()


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _draft(file_hash: str) -> Any:
    from sentinel_ipc.policy.validation import PolicyDraft

    return PolicyDraft(action="block", file_hash=file_hash, created_by="t")


async def test_a_flood_of_page_reads_gets_busy_and_the_daemon_stays_healthy(
    tmp_path: Path,
) -> None:
    """Four connections pipeline 1,000-row pages as fast as they can against a
    daemon whose ``op_timeout`` is short (0.6 s): the reads beyond the queue's bound get
    ``busy`` (retryable), every other one its page, and the database never
    leaves healthy (before, the queue's timeouts opened the breaker)."""
    d = start_seeded(tmp_path, TABLE, {
        "policy": {"op_timeout": 0.6, "verify_interval": 3600.0},
        "resilience": {"check_interval": 3600.0},
    })
    counts: dict[str, int] = {}
    try:
        # Start-up is not what this test is about: on a loaded machine its first
        # calls may pass the short op_timeout (the daemon then recovers by itself).
        # The flood starts on a healthy database; only what follows is checked.
        async with open_framed_connection(d.socket_path) as conn:
            with trio.fail_after(30):
                for n in range(10_000):
                    await conn.send(Health(id=n + 1))
                    report = await conn.receive()
                    assert isinstance(report, HealthReport), report
                    if report.components["database"].status == "healthy":
                        break
                    await trio.sleep(0.1)
        log_mark = len(d.log())

        async def flood(conn_no: int) -> None:
            async with open_framed_connection(d.socket_path) as conn:
                sent = 0
                done = trio.Event()

                async def send() -> None:
                    nonlocal sent
                    with trio.move_on_after(3.0):
                        while True:
                            after = (sent * 997 + conn_no * 4999) % TABLE
                            await conn.send(PolicyList(id=sent + 1, after_id=after, limit=1000))
                            sent += 1
                            await trio.lowlevel.checkpoint()
                    done.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    got = 0
                    with trio.fail_after(30):  # every request answered
                        while not (done.is_set() and got == sent):
                            reply = await conn.receive()
                            kind = reply.code if isinstance(reply, Error) else type(reply).__name__
                            counts[kind] = counts.get(kind, 0) + 1
                            got += 1

        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(flood, n)
        async with open_framed_connection(d.socket_path) as conn:
            await conn.send(Health(id=1))
            health = await conn.receive()
        log = d.log()[log_mark:]
    finally:
        d.stop()
    assert counts.get("busy", 0) > 0, counts  # the bound was reached
    assert counts.get(PolicyListResult.__name__, 0) > 0, counts
    assert set(counts) <= {"busy", PolicyListResult.__name__}, counts
    assert isinstance(health, HealthReport), health
    assert health.components["database"].status == "healthy", health.components
    assert "policy database degraded" not in log, log[-3000:]
    assert "breaker database open" not in log


# A flood of policy_list pages from a process run as nobody (standard library
# only): ``conns`` connections, each pipelining ``depth`` page requests at a
# time and reading their replies, until ``seconds`` have passed. Prints counts.
NOBODY_FLOODER = r"""
import json, socket, sys, threading, time
job = json.load(sys.stdin)
burst = bytes.fromhex(job["burst"])
deadline = time.monotonic() + job["seconds"]
counts = {"replies": 0}
lock = threading.Lock()

def flood():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(job["socket"])
    buf = b""
    while time.monotonic() < deadline:
        s.sendall(burst)
        got = 0
        while got < job["depth"]:
            while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
            size = 4 + int.from_bytes(buf[:4], "big")
            buf = buf[size:]
            got += 1
        with lock:
            counts["replies"] += got
    s.close()

threads = [threading.Thread(target=flood) for _ in range(job["conns"])]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(counts))
"""


@can_be_nobody
async def test_one_user_flooding_policy_reads_leaves_room_for_another(tmp_path: Path) -> None:
    """On a socket shared with other users, ``nobody`` pipelines 1,000-row pages
    over four connections while root lists page by page. The store thread takes
    ``max_queued_reads`` (16) client reads at a time; each user may hold a
    quarter of them (``read_share``), so root's pages are served, none ``busy``.
    Before the share the flood held all 16, and root got ``busy`` for some."""
    with traversable_dir("sentinel-readshare-") as base:
        d = DaemonProcess(base, {
            "server": {"socket_mode": 0o666},
            # A long op_timeout: only the count of queued reads bounds them here,
            # not their time at the pace of a loaded machine.
            "policy": {"verify_interval": 3600.0, "op_timeout": 8.0},
            "resilience": {"check_interval": 3600.0},
        })
        d.data_dir.mkdir(parents=True)
        seed_policies(d.data_dir / "policy_graph.db", TABLE)
        d.start()
        try:
            os.chmod(d.socket_path.parent, 0o755)
            burst = b"".join(
                encode_framed(PolicyList(id=i + 1, after_id=(i * 1999) % TABLE, limit=1000))
                for i in range(64)
            )
            job = {"socket": str(d.socket_path), "burst": burst.hex(), "depth": 64,
                   "conns": 4, "seconds": 4.0}
            flood: list[subprocess.CompletedProcess[bytes]] = []
            answers: dict[str, int] = {}

            async def run_flooder() -> None:
                flood.append(await trio.run_process(
                    ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     sys.executable, "-c", NOBODY_FLOODER],
                    stdin=json.dumps(job).encode(), capture_stdout=True, capture_stderr=True,
                    check=False, cwd="/",
                ))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_flooder)
                await trio.sleep(0.5)  # the flood is under way
                async with open_framed_connection(d.socket_path) as conn:
                    for i in range(30):
                        await conn.send(PolicyList(id=i + 1, after_id=i * 500, limit=1000))
                        reply = await conn.receive()
                        kind = reply.code if isinstance(reply, Error) else type(reply).__name__
                        answers[kind] = answers.get(kind, 0) + 1
                        await trio.sleep(0.05)
        finally:
            d.stop()
    assert flood[0].returncode == 0, flood[0].stderr[-2000:]
    assert json.loads(flood[0].stdout)["replies"] > 0  # the flood was served too
    assert answers == {PolicyListResult.__name__: 30}, answers
