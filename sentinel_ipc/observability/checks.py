"""The health checks of SPEC section 4, as factories of async check functions.

Each factory returns a callable the :class:`~.health.HealthRegistry` runs
under the check's timeout. Blocking probes (SQLite, statvfs) run in a worker
thread that is *abandoned* when the timeout fires, so a hung file system or a
locked database can never stall the event loop; :class:`ThreadProbe` then
refuses to start a second thread while the first is still stuck, so a hung
dependency costs one thread, not one per check interval.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import psutil
import trio

from .health import CheckOutcome

__all__ = [
    "DiskCheck",
    "MemoryCheck",
    "ThreadProbe",
    "database_check",
    "http_check",
    "ipc_check",
    "mount_point",
    "yara_check",
]

T = TypeVar("T")
MB = 1024 * 1024


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1024**3), ("MB", MB), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


class ThreadProbe:
    """Run one blocking probe at a time in a worker thread, abandoned on cancel.

    Raises :class:`ThreadProbe.Busy` when the previous probe's thread has not returned
    yet (it hung past its timeout): the caller reports that instead of piling
    up threads on a dependency that is already stuck.
    """

    class Busy(Exception):
        pass

    def __init__(self, what: str) -> None:
        self.what = what
        self._busy = False

    @property
    def busy(self) -> bool:
        return self._busy

    async def run(self, fn: Callable[[], T]) -> T:
        if self._busy:
            raise ThreadProbe.Busy(f"the previous {self.what} probe is still running (hung)")
        self._busy = True

        def guarded() -> T:
            try:
                return fn()
            finally:
                self._busy = False

        return await trio.to_thread.run_sync(guarded, abandon_on_cancel=True)


# -- database ------------------------------------------------------------------


def probe_database(path: Path, expected_tables: Iterable[str] = ()) -> CheckOutcome:
    """Open ``path`` afresh (read-only), ``SELECT 1`` and read the schema.

    A fresh connection, not the store's long-open one: an open connection
    keeps working on a file that was deleted, replaced or corrupted under it,
    so only a new open of the *path* notices.
    """
    if not path.exists():
        return CheckOutcome(ok=False, message=f"database file {path} does not exist")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.2)
    except sqlite3.Error as exc:
        return CheckOutcome(ok=False, message=f"cannot open {path}: {exc}")
    try:
        con.execute("SELECT 1").fetchone()
        tables = {
            str(row[0])
            for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        version = int(con.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        return CheckOutcome(ok=False, message=f"cannot read the schema of {path}: {exc}")
    finally:
        con.close()
    missing = sorted(set(expected_tables) - tables)
    if missing:
        return CheckOutcome(
            ok=False, message=f"{path} lacks table(s) {', '.join(missing)} (schema v{version})"
        )
    return CheckOutcome(ok=True, message=f"{path.name}: schema v{version}, {len(tables)} tables")


def database_check(
    path: Path,
    *,
    expected_tables: Iterable[str] = ("policies", "threat_history"),
    extra: Callable[[], Awaitable[CheckOutcome | None]] | None = None,
) -> Callable[[], Awaitable[CheckOutcome]]:
    """Check the policy database at ``path``; ``extra`` (the store's own check,
    e.g. "does the path still name the open file") runs after a good probe."""
    probe = ThreadProbe("database")
    tables = tuple(expected_tables)

    async def check() -> CheckOutcome:
        try:
            outcome = await probe.run(lambda: probe_database(path, tables))
        except ThreadProbe.Busy as exc:
            return CheckOutcome(ok=False, message=str(exc))
        if outcome.ok and extra is not None:
            more = await extra()
            if more is not None and not more.ok:
                return more
        return outcome

    return check


# -- yara ------------------------------------------------------------------------


def yara_check(
    self_test: Callable[[], Awaitable[object]],
    *,
    timeout: float | None = None,
    progress: Callable[[], int] | None = None,
) -> Callable[[], Awaitable[CheckOutcome]]:
    """Scan a small buffer through the real worker pool (the scanner's ``self_test``).

    ``self_test`` may return a number (milliseconds), ``None``/``True`` (passed),
    ``False`` (failed), or an object with ``ok`` and ``message``; an exception is
    a failure. Under full load every worker may be busy and the test scan waits
    in line: with ``timeout`` and ``progress`` (a counter of scans the pool
    completed), a test that fails while the pool *did* complete scans since the
    previous check is reported healthy-but-busy, not as a dead scanner.
    """
    last_progress = progress() if progress is not None else 0

    async def check() -> CheckOutcome:
        nonlocal last_progress
        start = trio.current_time()
        failure = ""
        result: object = None
        scope = trio.CancelScope(deadline=math.inf if timeout is None else start + timeout)
        with scope:
            try:
                result = await self_test()
            except Exception as exc:
                failure = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            assert timeout is not None
            failure = f"timed out after {timeout * 1000:.0f} ms"
        elapsed_ms = (trio.current_time() - start) * 1000
        if not failure:
            ok = getattr(result, "ok", result if isinstance(result, bool) else True)
            message = getattr(result, "message", None)
            if not ok:
                failure = message if isinstance(message, str) and message else "test scan failed"
            elif not isinstance(message, str) or not message:
                message = f"test scan through the worker pool took {elapsed_ms:.1f} ms"
        if progress is not None:
            before, last_progress = last_progress, progress()
            if failure and last_progress > before:
                return CheckOutcome(
                    ok=True,
                    message=f"workers busy: {last_progress - before} scans completed since the "
                    f"last check (test scan: {failure})",
                )
        if failure:
            return CheckOutcome(ok=False, message=failure)
        assert isinstance(message, str)
        return CheckOutcome(ok=True, message=message)

    return check


# -- ipc -------------------------------------------------------------------------


def ipc_check(active: Callable[[], int], limit: int) -> Callable[[], Awaitable[CheckOutcome]]:
    """Active connections below ``limit``, else degraded."""

    async def check() -> CheckOutcome:
        count = active()
        if count < limit:
            return CheckOutcome(
                ok=True, message=f"{count} active connections (limit {limit})", value=count
            )
        return CheckOutcome(
            ok=False,
            message=f"{count} active connections, at or above the limit of {limit}",
            value=count,
        )

    return check


# -- disk ------------------------------------------------------------------------


def mount_point(path: Path) -> str:
    """The mount point holding ``path`` (a bounded metric label)."""
    current = os.path.realpath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    while not os.path.ismount(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


class DiskCheck:
    """Free space of the data dir, the temp dir (and extras) above ``min_free``,
    else unhealthy. ``free_by_mount`` keeps the last figures for the metrics."""

    def __init__(self, paths: Mapping[str, Path], min_free: int) -> None:
        self.paths = dict(paths)
        self.min_free = min_free
        self.free_by_mount: dict[str, int] = {}
        self._probe = ThreadProbe("disk")

    @classmethod
    def default(cls, data_dir: Path, min_free: int, extra: Iterable[str] = ()) -> DiskCheck:
        paths = {"data dir": data_dir, "temp dir": Path(tempfile.gettempdir())}
        for item in extra:
            paths[item] = Path(item)
        return cls(paths, min_free)

    def _measure(self) -> dict[str, tuple[str, int | None, str | None]]:
        out: dict[str, tuple[str, int | None, str | None]] = {}
        for label, path in self.paths.items():
            mount = mount_point(path)
            try:
                out[label] = (mount, shutil.disk_usage(path).free, None)
            except OSError as exc:
                out[label] = (mount, None, exc.strerror or str(exc))
        return out

    async def __call__(self) -> CheckOutcome:
        try:
            figures = await self._probe.run(self._measure)
        except ThreadProbe.Busy as exc:
            return CheckOutcome(ok=False, message=str(exc))
        low: list[str] = []
        parts: list[str] = []
        smallest: int | None = None
        for label, (mount, free, error) in figures.items():
            path = self.paths[label]
            if free is None:
                low.append(f"{label} {path}: {error}")
                continue
            self.free_by_mount[mount] = free
            smallest = free if smallest is None else min(smallest, free)
            text = f"{label} {path}: {_fmt_bytes(free)} free"
            parts.append(text)
            if free < self.min_free:
                low.append(f"{text} (below {_fmt_bytes(self.min_free)})")
        if low:
            return CheckOutcome(ok=False, message="; ".join(low), value=smallest)
        return CheckOutcome(ok=True, message="; ".join(parts), value=smallest)


# -- memory ----------------------------------------------------------------------


class MemoryCheck:
    """SPEC's memory check: the daemon process's own RSS below ``limit``, else
    degraded. The workers' RSS is measured too, but only reported in the
    message: each worker has its own limit (``max_worker_rss_bytes``, the pool
    recycles one past it), and adding them in would make the daemon look
    twice its size. ``last_rss`` keeps the daemon's RSS for
    ``sentinel_memory_rss_bytes``; ``last_workers_rss`` the workers' total."""

    def __init__(self, worker_pids: Callable[[], Iterable[int]], limit: int) -> None:
        self.worker_pids = worker_pids
        self.limit = limit
        self.last_rss = 0
        self.last_workers_rss = 0
        self._procs: dict[int, psutil.Process] = {}

    def _rss(self, pid: int) -> int | None:
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
            return int(proc.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self._procs.pop(pid, None)
            return None

    def measure(self) -> tuple[int, int, int]:
        """(daemon rss, workers' rss, number of workers measured)."""
        own = self._rss(os.getpid()) or 0
        workers = 0
        count = 0
        pids: set[int] = set()
        with contextlib.suppress(Exception):
            pids = {p for p in self.worker_pids() if p != os.getpid()}
        for pid in pids:
            rss = self._rss(pid)
            if rss is not None:
                workers += rss
                count += 1
        for stale in set(self._procs) - pids - {os.getpid()}:
            del self._procs[stale]
        return own, workers, count

    async def __call__(self) -> CheckOutcome:
        own, workers, count = self.measure()
        self.last_rss = own
        self.last_workers_rss = workers
        text = (
            f"daemon {_fmt_bytes(own)} (limit {_fmt_bytes(self.limit)});"
            f" {count} worker(s) {_fmt_bytes(workers)} besides, not counted"
            " (the pool limits each worker)"
        )
        return CheckOutcome(ok=own < self.limit, message=text, value=own)


# -- network ---------------------------------------------------------------------


def http_check(url: str) -> Callable[[], Awaitable[CheckOutcome]]:
    """``GET url`` answers 2xx/3xx. The registry's timeout bounds it; an answer
    that never comes is reported as "timed out after N ms"."""
    import httpx

    async def check() -> CheckOutcome:
        async with httpx.AsyncClient(trust_env=False, timeout=None) as client:
            try:
                response = await client.get(url)
            except httpx.HTTPError as exc:
                return CheckOutcome(ok=False, message=f"GET {url}: {type(exc).__name__}: {exc}")
        ok = response.status_code < 400
        return CheckOutcome(
            ok=ok, message=f"GET {url}: HTTP {response.status_code}", value=response.status_code
        )

    return check
