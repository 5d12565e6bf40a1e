"""The worker pool with real worker processes: jobs, crashes (kill -9), hard
timeouts, cancellation, recycling, bounded waiting, rule swaps, memory limits,
and no leaked process or descriptor afterwards."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from samples import EICAR, SLOW_RULE

from sentinel_ipc.errors import BusyError, ScanError, ScanTimeoutError, WorkerCrashedError
from sentinel_ipc.scanning.pool import NoWorkerAvailable, PoolConfig, WorkerPool
from sentinel_ipc.scanning.rules import BUILTIN_RULES_DIR, RulesInfo, load_rules_sync
from sentinel_ipc.scanning.worker import Result

NEW_RULE = 'rule Sentinel_Test_New { strings: $a = "NEWRULE-MARKER" condition: $a }'
BIG = 1 << 40


def slow_input(seconds: float) -> bytes:
    """Input the slow rule chews on for about ``seconds`` on an idle core."""
    return b"SLOW" + b"A" * int(seconds * 160_000)


def rules_dir(root: Path, *extra: tuple[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for src in BUILTIN_RULES_DIR.glob("*.yar"):
        (root / src.name).write_text(src.read_text())
    for name, text in extra:
        (root / name).write_text(text)
    return root


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> RulesInfo:
    base = tmp_path_factory.mktemp("pool")
    root = rules_dir(base / "rules", ("slow.yar", SLOW_RULE))
    return load_rules_sync(str(root), base / "cache")


@pytest.fixture(scope="module")
def new_rules(tmp_path_factory: pytest.TempPathFactory) -> RulesInfo:
    base = tmp_path_factory.mktemp("pool-new")
    root = rules_dir(base / "rules", ("slow.yar", SLOW_RULE), ("new.yar", NEW_RULE))
    return load_rules_sync(str(root), base / "cache")


def memfd(data: bytes) -> int:
    fd = os.memfd_create("test")
    os.write(fd, data)
    return fd


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@asynccontextmanager
async def running_pool(rules: RulesInfo, **options: Any) -> AsyncIterator[WorkerPool]:
    """A started pool; on exit asserts that every worker process was reaped."""
    options.setdefault("workers", 2)
    pool = WorkerPool(PoolConfig(**options), rules)
    seen: set[int] = set()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        try:
            yield pool
            seen.update(pool.worker_pids())
        finally:
            nursery.cancel_scope.cancel()
    assert pool.worker_pids() == []
    assert all(gone(pid) for pid in seen)


async def job(pool: WorkerPool, data: bytes, *, hard_timeout: float = 30.0,
              externals: dict[str, str] | None = None, max_bytes: int = BIG) -> Result:
    fd = memfd(data)
    try:
        handle = await pool.acquire()
        try:
            return await pool.run_job(handle, fd, externals or {}, yara_timeout=30,
                                      hard_timeout=hard_timeout, max_bytes=max_bytes)
        finally:
            pool.release(handle)
    finally:
        os.close(fd)


async def wait_busy(pool: WorkerPool) -> int:
    """The pid of a worker that is busy, as soon as one is."""
    while not pool.statistics().busy_pids:  # noqa: ASYNC110 - another process
        await trio.sleep(0.005)
    return pool.statistics().busy_pids[0]


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - state of other processes
            await trio.sleep(0.01)


# --- the happy path ---------------------------------------------------------------


async def test_job_answers_matches_hash_size_and_filetype(rules: RulesInfo) -> None:
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        assert len(pool.worker_pids()) == 2
        result = await job(pool, EICAR)
        assert [m.rule for m in result.matches] == ["EICAR_Test_File"]
        assert result.matches[0].namespace == "eicar"
        assert result.matches[0].meta["severity"] == "high"
        assert result.sha256 == hashlib.sha256(EICAR).hexdigest()
        assert result.size == len(EICAR) and result.kind == ""
        elf = await job(pool, b"\x7fELF" + b"\0" * 100, externals={"extension": ".pdf"})
        assert elf.filetype == "ELF"
        assert [m.rule for m in elf.matches] == ["Executable_With_Document_Extension"]
        empty = await job(pool, b"")
        assert empty.size == 0 and empty.sha256 == hashlib.sha256(b"").hexdigest()
        stats = pool.statistics()
        assert stats.scans_total == 3 and stats.crashes_total == 0 and stats.idle == 2


def _ids(pid: int) -> tuple[list[int], list[int], str]:
    """(Uid line, Gid line, Groups line) of /proc/PID/status: real, effective, saved, fs."""
    lines = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return ([int(x) for x in lines["Uid"].split()], [int(x) for x in lines["Gid"].split()],
            lines["Groups"].strip())


@pytest.mark.skipif(os.geteuid() != 0, reason="a root daemon's workers drop to nobody")
async def test_a_root_daemons_workers_scan_as_nobody(rules: RulesInfo, tmp_path: Path) -> None:
    """YARA parses hostile bytes: a bug in it must not hand out a root process.
    The worker still scans what the daemon passes, even a file only root may open."""
    secret = tmp_path / "root-only.com"
    secret.write_bytes(EICAR)
    os.chmod(secret, 0o600)
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        for pid in pool.worker_pids():
            uid, gid, groups = _ids(pid)
            assert uid == [65534] * 4 and gid == [65534] * 4 and groups == "", (uid, gid)
            status = Path(f"/proc/{pid}/status").read_text()
            assert "NoNewPrivs:\t1" in status
        fd = os.open(secret, os.O_RDONLY)
        try:
            handle = await pool.acquire()
            try:
                result = await pool.run_job(handle, fd, {}, yara_timeout=30, hard_timeout=30,
                                            max_bytes=BIG)
            finally:
                pool.release(handle)
        finally:
            os.close(fd)
        assert [m.rule for m in result.matches] == ["EICAR_Test_File"]
    async with running_pool(rules, workers=1, drop_root=False) as pool:
        await pool.wait_alive()
        (pid,) = pool.worker_pids()
        assert _ids(pid)[0] == [0] * 4


async def test_file_over_max_bytes_is_refused_by_the_worker(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1) as pool:
        result = await job(pool, b"x" * 100, max_bytes=10)
        assert result.kind == "too_large"


async def test_workers_yield_cpu_to_the_daemon_and_ignore_sigint(rules: RulesInfo) -> None:
    import psutil

    from sentinel_ipc.scanning.worker import WORKER_NICENESS

    async with running_pool(rules) as pool:
        await pool.wait_alive()
        pids = pool.worker_pids()
        assert pids and all(psutil.Process(p).nice() == WORKER_NICENESS for p in pids)
        for pid in pids:
            os.kill(pid, signal.SIGINT)  # a Ctrl-C reaching the process group
        assert [m.rule for m in (await job(pool, EICAR)).matches] == ["EICAR_Test_File"]
        assert sorted(pool.worker_pids()) == sorted(pids)  # nobody died
        assert pool.statistics().crashes_total == 0


# --- crashes -------------------------------------------------------------------------


async def test_idle_worker_killed_is_replaced(rules: RulesInfo) -> None:
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: pool.statistics().crashes_total == 1)  # reaped and counted
        await wait_for(lambda: victim not in pool.worker_pids()
                       and pool.statistics().alive == 2)
        assert [m.rule for m in (await job(pool, EICAR)).matches] == ["EICAR_Test_File"]


async def test_worker_killed_mid_job_raises_worker_crashed(rules: RulesInfo) -> None:
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        async with trio.open_nursery() as nursery:

            async def killer() -> None:
                os.kill(await wait_busy(pool), signal.SIGKILL)

            nursery.start_soon(killer)
            with pytest.raises(WorkerCrashedError, match="SIGKILL") as info:
                await job(pool, slow_input(2.0))
        assert info.value.retryable
        await wait_for(lambda: pool.statistics().alive == 2)
        assert pool.statistics().crashes_total == 1
        assert (await job(pool, EICAR)).matches


async def test_out_of_memory_is_reported_and_the_worker_replaced(rules: RulesInfo) -> None:
    # A 2 GiB sparse memfd cannot be mapped under a 1 GiB address-space limit.
    async with running_pool(rules, workers=1, worker_memory_limit_bytes=1 << 30) as pool:
        pid = pool.worker_pids()[0]
        fd = os.memfd_create("huge")
        os.ftruncate(fd, 2 << 30)
        try:
            handle = await pool.acquire()
            with pytest.raises(WorkerCrashedError, match="out of memory"):
                await pool.run_job(handle, fd, {}, yara_timeout=30, hard_timeout=30,
                                   max_bytes=BIG)
            pool.release(handle)
        finally:
            os.close(fd)
        await wait_for(lambda: pool.statistics().alive == 1 and pid not in pool.worker_pids())
        assert (await job(pool, EICAR)).matches


# --- timeouts and cancellation -------------------------------------------------------


async def test_hard_timeout_kills_and_replaces_the_worker(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1) as pool:
        pid = pool.worker_pids()[0]
        with pytest.raises(ScanTimeoutError, match="killed"):
            await job(pool, slow_input(3.0), hard_timeout=0.3)
        await wait_for(lambda: pool.statistics().alive == 1 and gone(pid))
        assert pid not in pool.worker_pids()
        stats = pool.statistics()
        assert stats.hard_timeouts_total == 1 and stats.crashes_total == 0
        assert (await job(pool, EICAR)).matches


async def test_cancelled_job_is_drained_and_the_worker_reused(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1) as pool:
        pid = pool.worker_pids()[0]
        with trio.move_on_after(0.05) as scope:
            await job(pool, slow_input(0.3))
        assert scope.cancelled_caught
        assert pool.statistics().draining == 1
        # The next job waits for the old answer to be drained, then gets the same worker.
        result = await job(pool, EICAR)
        assert result.matches and pool.worker_pids() == [pid]
        assert pool.statistics().spawned_total == 1


async def test_cancelled_job_that_outlives_its_deadline_gets_the_worker_killed(
    rules: RulesInfo,
) -> None:
    async with running_pool(rules, workers=1) as pool:
        pid = pool.worker_pids()[0]
        with trio.move_on_after(0.05):
            await job(pool, slow_input(3.0), hard_timeout=0.3)
        await wait_for(lambda: pid not in pool.worker_pids() and pool.statistics().alive == 1)
        assert (await job(pool, EICAR)).matches


# --- recycling ----------------------------------------------------------------------


async def test_worker_recycled_after_max_scans(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1, max_scans_per_worker=2) as pool:
        first = pool.worker_pids()
        await job(pool, b"one")
        assert pool.worker_pids() == first
        await job(pool, b"two")
        await wait_for(lambda: pool.statistics().alive == 1 and pool.worker_pids() != first)
        assert pool.statistics().recycled_total == 1
        await wait_for(lambda: pool.statistics().restarts_total == 1)
        assert pool.statistics().crashes_total == 0


async def test_worker_recycled_when_rss_passes_the_limit(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1, max_worker_rss_bytes=1) as pool:
        first = pool.worker_pids()
        await job(pool, b"x")
        await wait_for(lambda: pool.statistics().alive == 1 and pool.worker_pids() != first)
        assert pool.statistics().recycled_total == 1


# --- bounded waiting --------------------------------------------------------------------


async def test_full_queue_is_busy_and_long_wait_is_no_worker(rules: RulesInfo) -> None:
    async with running_pool(rules, workers=1, max_queue=1, wait_timeout=0.3) as pool:
        held = await pool.acquire()
        async with trio.open_nursery() as nursery:
            waiter_error: list[BaseException] = []

            async def waiter() -> None:
                try:
                    await pool.acquire()
                except NoWorkerAvailable as exc:
                    waiter_error.append(exc)

            nursery.start_soon(waiter)
            await wait_for(lambda: pool.statistics().waiting == 1)
            with pytest.raises(BusyError) as busy:
                await pool.acquire()
            assert busy.value.retryable and busy.value.retry_after is not None
            assert busy.value.retry_after > 0
        assert len(waiter_error) == 1
        exc = waiter_error[0]
        assert isinstance(exc, NoWorkerAvailable) and exc.alive == 1
        assert "busy" in exc.message
        pool.release(held)
        assert (await job(pool, EICAR)).matches


async def test_unloadable_rules_fail_fast_and_spawning_backs_off(
    rules: RulesInfo, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.yarc"
    garbage.write_bytes(b"not compiled rules")
    broken = msgspec.structs.replace(rules, compiled_path=str(garbage))
    async with running_pool(broken, workers=2, spawn_backoff_initial=0.1) as pool:
        with trio.fail_after(1):
            with pytest.raises(NoWorkerAvailable) as info:
                await pool.acquire()
        assert info.value.alive == 0 and "failed to start" in info.value.message
        await trio.sleep(0.5)
        stats = pool.statistics()
        assert stats.alive == 0 and stats.start_failures_total >= 2
        # Back-off: 2 at once, then one probe at 0.1, 0.2, 0.4 s ... not a fork storm.
        assert stats.spawned_total <= 7


# --- rule swaps ---------------------------------------------------------------------------


async def test_swap_rules_new_scans_see_new_rules_old_job_finishes(
    rules: RulesInfo, new_rules: RulesInfo
) -> None:
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        old_pids = set(pool.worker_pids())
        marker = b"xx NEWRULE-MARKER xx"
        assert (await job(pool, marker)).matches == []
        async with trio.open_nursery() as nursery:
            slow_result: list[Result] = []

            async def slow_job() -> None:
                slow_result.append(await job(pool, slow_input(0.5)))

            nursery.start_soon(slow_job)
            await wait_busy(pool)
            await pool.swap_rules(new_rules)
            assert pool.rules.version == new_rules.version
            assert [m.rule for m in (await job(pool, marker)).matches] == ["Sentinel_Test_New"]
        # The in-flight job finished on the old set.
        assert [m.rule for m in slow_result[0].matches] == ["Sentinel_Test_Slow"]
        await wait_for(lambda: not old_pids & set(pool.worker_pids()))
        assert pool.statistics().alive == 2 and pool.statistics().crashes_total == 0


async def test_swap_to_unloadable_rules_keeps_the_old_generation(
    rules: RulesInfo, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.yarc"
    garbage.write_bytes(b"nope")
    broken = msgspec.structs.replace(rules, compiled_path=str(garbage), version="broken")
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        pids = pool.worker_pids()
        with pytest.raises(ScanError, match="no worker could load the new rules"):
            await pool.swap_rules(broken)
        assert pool.rules.version == rules.version and pool.worker_pids() == pids
        assert (await job(pool, EICAR)).matches


# --- shutdown ------------------------------------------------------------------------------


async def test_closing_the_pool_leaves_no_process_or_descriptor(rules: RulesInfo) -> None:
    before = open_fds()
    pids: list[int] = []
    async with running_pool(rules, workers=2) as pool:
        await pool.wait_alive()
        await job(pool, EICAR)
        pids = pool.worker_pids()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job, pool, slow_input(3.0))
            await wait_busy(pool)
            nursery.cancel_scope.cancel()  # leaves a worker draining at shutdown
    assert len(pids) == 2 and all(gone(pid) for pid in pids)
    assert open_fds() == before


def _gone_or_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


_ORPHAN_SCRIPT = """
import os, sys, trio
from pathlib import Path
import msgspec
from sentinel_ipc.scanning.pool import PoolConfig, WorkerPool
from sentinel_ipc.scanning.rules import RulesInfo

async def main():
    pool = WorkerPool(PoolConfig(workers=2), msgspec.json.decode(sys.argv[1], type=RulesInfo))
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_alive()
        fd = os.memfd_create("slow")
        os.write(fd, b"SLOW" + b"A" * 1_600_000)
        handle = await pool.acquire()
        nursery.start_soon(lambda: pool.run_job(handle, fd, {}, yara_timeout=60,
                                                hard_timeout=60, max_bytes=1 << 30))
        while not pool.statistics().busy_pids:
            await trio.sleep(0.01)
        print(" ".join(map(str, pool.worker_pids())), flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_workers_exit_when_the_daemon_is_killed_even_mid_scan(rules: RulesInfo) -> None:
    """kill -9 of the daemon: its workers (one busy for ~10 s) exit within a second."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", _ORPHAN_SCRIPT, msgspec.json.encode(rules).decode()],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        with trio.fail_after(20):
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some()
                assert chunk, "the pool script died before reporting its workers"
                line += chunk
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2
        proc.kill()
        await proc.wait()
        await wait_for(lambda: all(_gone_or_zombie(pid) for pid in pids), timeout=2.0)
    finally:
        proc.kill()
        await proc.wait()
        await proc.stdout.aclose()


async def test_workers_outlive_the_thread_that_spawned_them(
    rules: RulesInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trio starts processes from its thread cache, whose idle threads exit (after
    10 s; 0.4 s here, longer than a worker takes to start). A worker tied to its
    parent *thread* (PR_SET_PDEATHSIG) would be killed then; ours watch the
    daemon's socket instead."""
    from trio._core import _thread_cache

    monkeypatch.setattr(_thread_cache, "IDLE_TIMEOUT", 0.4)
    async with running_pool(rules) as pool:
        await pool.wait_alive()
        pids = pool.worker_pids()
        await trio.sleep(1.0)
        assert pool.worker_pids() == pids and pool.statistics().crashes_total == 0
        assert (await job(pool, EICAR)).matches
