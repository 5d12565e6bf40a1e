"""The Scanner: rules + worker pool + the yara breaker and retry + the verdict inputs.

Theory of operation
-------------------
Every scan ends as a descriptor handed to a worker (:mod:`.pool`):

* ``scan_bytes``: the bytes are written once into a memfd;
* ``scan_fd``: the caller's descriptor itself, after checking that it is a
  readable regular file (or memfd) no larger than ``max_stream_bytes``; the
  daemon never opens a path on a client's behalf;
* ``open_stream``: chunks are appended to a memfd as they arrive, bounded by
  ``max_stream_bytes`` per stream and ``max_pending_bytes`` over all of them.
  At most ``max_open_streams`` are open at once (each holds a memfd), and a
  stream that gets no chunk for ``stream_idle_timeout`` seconds is dropped
  (:meth:`Scanner.expire_idle_streams`): otherwise a client that stops
  mid-stream would hold its buffer bytes, and everyone else's scans would get
  ``busy``, for as long as it stays connected.

The worker maps the descriptor, matches it and hashes it, so the daemon copies
the bytes at most once and hashes nothing on the happy path. The daemon keeps a
few memfds of up to ``buffer_reuse_max_bytes`` for reuse (at most
``buffer_pool_bytes`` in all, and ``_IDLE_MEMFDS_PER_WORKER`` per worker: an
empty memfd counts no bytes, yet costs a descriptor;
:class:`~sentinel_ipc.memfd.MemfdPool`): writing
into pages that already exist is about five times cheaper than into a fresh
memfd, whose pages must be allocated and zeroed. A memfd goes back to the pool
only after a scan that ended normally
(the worker has unmapped and closed it before it answers); after a
cancellation a draining worker may still read it, so it is closed instead.
The job carries the length to scan, since a reused memfd may be longer.

One scan attempt = take an idle worker (bounded wait, bounded queue) and run
one job. Attempts run under :func:`~sentinel_ipc.resilience.guarded_call` with
the ``yara`` breaker (3 failures -> open 60 s -> 3 trial successes close it)
and the ``yara`` retry policy (2 attempts, 1 s, x3): a worker crash or memory
exhaustion is retried once on another worker and counted by the breaker.

When no verdict can be had, the scan is *not* an error: the outcome says
``scanned=False, degraded=True`` with the reason in ``warnings`` ("file was
not scanned: ..."), and the caller applies fail-open (allow with the warning)
or fail-closed (block) -- see :meth:`ScanOutcome.default_action`. That covers
an open breaker, retries exhausted, no worker within ``worker_wait_timeout``
and a scan timeout. The sha256 is still computed (in a thread), so hash
policies keep working while the scanner is down. What raises:
:class:`~sentinel_ipc.errors.BusyError` when the wait queue, the buffer budget or
the open streams are full, or no descriptor can be had for a buffer (retryable,
``retry_after``), :class:`~sentinel_ipc.errors.ScanTooLargeError`
and :class:`~sentinel_ipc.errors.BadFileDescriptorError` (the request itself is
wrong), a non-retryable :class:`~sentinel_ipc.errors.ScanError` when the client's
file cannot be read or shrank under the scan, and
:class:`~sentinel_ipc.errors.ShuttingDownError` once the scanner is closed.

What counts against the breaker: worker crashes and memory exhaustion (the
preset's classifier), and "no worker is running at all" (the pool cannot
start workers). What does not: a full queue or all workers merely busy
(overload is not a broken scanner), timeouts (the input is slow, not the
scanner broken: otherwise one crafted file could switch scanning off for
everyone), and bad requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import msgspec
import trio

from ..errors import (
    BadFileDescriptorError,
    BusyError,
    CircuitOpenError,
    RequestTimeoutError,
    RetryExhaustedError,
    RulesError,
    ScanError,
    ScanTimeoutError,
    ScanTooLargeError,
    ShuttingDownError,
    WorkerCrashedError,
)
from ..fsutil import pwrite_all
from ..logs import log_event
from ..memfd import MemfdPool, sealed_memfd
from ..messages import Action, RuleMatch
from ..resilience import (
    BREAKER_PRESETS,
    RETRY_PRESETS,
    BreakerConfig,
    CircuitBreaker,
    Excluding,
    RetryPolicy,
    guarded_call,
)
from .pool import NoWorkerAvailable, PoolConfig, PoolStatistics, WorkerPool
from .rules import CACHE_DIRNAME, RulesInfo, externals_for, load_rules, prune_cache
from .worker import Result

MIB = 1024 * 1024
#: Idle memfds kept for reuse, per worker: enough for the scans running and the
#: next ones, few enough that descriptors stay bounded (an empty memfd counts no
#: bytes against ``buffer_pool_bytes``, yet each one is a descriptor).
_IDLE_MEMFDS_PER_WORKER = 2
#: Errors creating or filling a buffer that mean "out of descriptors or memory
#: right now": answered ``busy`` (retryable), not as a bug.
_EXHAUSTED_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC})
#: A small buffer every rule set can scan (the health check).
SELF_TEST_DATA = b"Sentinel scanner self-test.\n" * 8


class ScanMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What the client told us about the file; fills YARA's external variables."""

    url: str | None = None
    filename: str | None = None
    mime_type: str | None = None


class ScanOutcome(msgspec.Struct, kw_only=True):
    """The scanner's part of a verdict.

    ``scanned`` is False when no worker could scan the file (breaker open, no
    worker, crash after retries, timeout); then ``degraded`` is True and
    ``warnings`` says why, and the caller decides fail-open or fail-closed.
    """

    sha256: str
    size: int
    matches: list[RuleMatch]
    rules_version: str
    scanned: bool
    degraded: bool = False
    warnings: list[str] = []
    scan_ms: float = 0.0
    #: Content type guessed from the magic bytes (the ``filetype`` external).
    filetype: str = ""

    def default_action(self, fail_closed: bool) -> Action:
        """The verdict before policies: block on any match; an unscanned file is
        allowed (fail-open) or blocked (fail-closed)."""
        if self.matches:
            return "block"
        if not self.scanned:
            return "block" if fail_closed else "allow"
        return "allow"


def _yara_breaker() -> BreakerConfig:
    return BREAKER_PRESETS["yara"]


def _yara_retry() -> RetryPolicy:
    return RETRY_PRESETS["yara"]


def _default_workers() -> int:
    return os.cpu_count() or 1


class _ScannerLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The plain settings shared by ScannerConfig and the TOML section ScannerSettings."""

    #: Directory of .yar/.yara files; None: the built-in rules.
    rules_dir: str | None = None
    workers: int = msgspec.field(default_factory=_default_workers)
    #: Per-scan time limit: YARA's own timeout (rounded up to whole seconds) ...
    scan_timeout: float = 30.0
    #: ... and this much later the worker is killed if it still has not answered.
    kill_grace: float = 5.0
    max_scans_per_worker: int = 10_000
    max_worker_rss_bytes: int = 1024 * MIB
    #: RLIMIT_AS per worker (0: none); must fit the rules plus the largest file.
    worker_memory_limit_bytes: int = 4096 * MIB
    #: Longest a scan waits for an idle worker before it is answered unscanned.
    worker_wait_timeout: float = 10.0
    worker_start_timeout: float = 60.0
    #: Scans that may wait for a worker at once; one more gets BusyError.
    max_queue: int = 256
    #: Largest file (stream, fd or bytes) the scanner accepts.
    max_stream_bytes: int = 512 * MIB
    #: Bytes buffered in memfds (streams and byte scans) at once, over all scans.
    max_pending_bytes: int = 2048 * MIB
    #: memfds kept for reuse: at most this many bytes in all, each at most the next.
    buffer_pool_bytes: int = 64 * MIB
    buffer_reuse_max_bytes: int = 16 * MIB
    compile_timeout: float = 300.0
    #: Chunked scan streams open at once, over all connections; one more gets
    #: BusyError. Each holds a memfd, so this bounds the daemon's descriptors.
    max_open_streams: int = 64
    #: A stream that gets no chunk for this many seconds is dropped (its buffer
    #: freed) and its owner told with a RequestTimeoutError.
    stream_idle_timeout: float = 30.0

    def __post_init__(self) -> None:
        positive = ("workers", "scan_timeout", "max_scans_per_worker", "max_worker_rss_bytes",
                    "worker_wait_timeout", "worker_start_timeout", "max_queue",
                    "max_stream_bytes", "max_pending_bytes", "compile_timeout",
                    "max_open_streams", "stream_idle_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"scanner.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("kill_grace", "worker_memory_limit_bytes", "buffer_pool_bytes",
                     "buffer_reuse_max_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"scanner.{name} must be >= 0, got {getattr(self, name)!r}")


class ScannerConfig(_ScannerLimits, frozen=True, kw_only=True):
    """What :func:`open_scanner` takes: the settings plus the breaker and retry
    policy objects (the yara presets of SPEC section 3 by default). Built from
    the config file through :class:`ScannerSettings`."""

    breaker: BreakerConfig = msgspec.field(default_factory=_yara_breaker)
    retry: RetryPolicy = msgspec.field(default_factory=_yara_retry)
    #: When the scanner cannot scan: block (True) or allow with a warning (False).
    fail_closed: bool = False


class ScannerSettings(_ScannerLimits, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[scanner]`` section of the TOML config: plain values only.

    The yara breaker, the yara retry policy and the fail mode are *not* here:
    they live in ``[resilience]`` with every other threshold (one place for
    each knob), and the daemon passes them to :meth:`to_config`.
    """

    def to_config(
        self,
        *,
        breaker: BreakerConfig | None = None,
        retry: RetryPolicy | None = None,
        fail_closed: bool = False,
    ) -> ScannerConfig:
        """The engine's config; breaker and retry default to the SPEC's yara presets."""
        plain = {name: getattr(self, name) for name in _ScannerLimits.__struct_fields__}
        return ScannerConfig(
            **plain,
            breaker=breaker if breaker is not None else _yara_breaker(),
            retry=retry if retry is not None else _yara_retry(),
            fail_closed=fail_closed,
        )


class ScannerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    pool: PoolStatistics
    breaker_state: str
    rules_version: str
    rule_count: int
    scans_total: int
    scans_unscanned: int
    scans_matched: int
    busy_rejections: int
    pending_bytes: int
    open_streams: int
    #: Bytes held in memfds kept for reuse.
    buffer_bytes_retained: int
    #: Streams dropped because no chunk came for ``stream_idle_timeout``.
    streams_expired: int = 0


# ---------------------------------------------------------------------------
# Error classification on top of the yara presets
# ---------------------------------------------------------------------------


def _pool_broken(error: BaseException) -> bool:
    return isinstance(error, NoWorkerAvailable) and error.alive == 0


@dataclasses.dataclass(frozen=True)
class _IsFailure:
    """The preset's failure test, minus overload, plus "no worker can run at all"."""

    base: BreakerConfig

    def __call__(self, error: BaseException) -> bool:
        if _pool_broken(error):
            return True
        if isinstance(error, (BusyError, NoWorkerAvailable, ScanTimeoutError)):
            return False
        return bool(self.base.is_failure(error))


# ---------------------------------------------------------------------------
# Descriptors
# ---------------------------------------------------------------------------


def _check_scan_fd(fd: int, max_bytes: int) -> int:
    """Validate a caller's descriptor; return its size. Never opens anything."""
    if not isinstance(fd, int) or fd < 0:
        raise BadFileDescriptorError(f"not a file descriptor: {fd!r}")
    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise BadFileDescriptorError("the file descriptor is closed or invalid") from None
        raise BadFileDescriptorError(
            f"cannot inspect the file descriptor: {exc.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a pipe" if stat.S_ISFIFO(st.st_mode)
            else "a directory" if stat.S_ISDIR(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise BadFileDescriptorError(f"the file descriptor is {kind}; only regular files "
                                     "and memfds can be scanned")
    if flags & getattr(os, "O_PATH", 0) or (flags & os.O_ACCMODE) == os.O_WRONLY:
        raise BadFileDescriptorError("the file descriptor is not open for reading")
    if st.st_size > max_bytes:
        raise ScanTooLargeError(f"file is {st.st_size} bytes, over the {max_bytes}-byte limit")
    return st.st_size


def _hash_fd(fd: int, size: int) -> str:
    """sha256 of a descriptor's first ``size`` bytes, without moving its offset."""
    h = hashlib.sha256()
    if size:
        try:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
                h.update(m)
            return h.hexdigest()
        except (OSError, ValueError):
            pass
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(4 * MIB, size - offset), offset)
            if not chunk:
                break
            h.update(chunk)
            offset += len(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# The scanner
# ---------------------------------------------------------------------------


class Scanner:
    """Scans bytes, descriptors and streams with the current rules. See the module doc.

    Create with :func:`open_scanner`.
    """

    def __init__(self, config: ScannerConfig, pool: WorkerPool, cache_dir: Path) -> None:
        self.config = config
        self._pool = pool
        self._cache_dir = cache_dir
        self._rules_dir = config.rules_dir
        self.breaker = CircuitBreaker(
            "yara",
            dataclasses.replace(config.breaker, is_failure=_IsFailure(config.breaker)),
            clock=trio.current_time,
        )
        # Overload and a timed-out scan reach the caller at once: a retry would
        # queue the same work again (a timeout) or lengthen the queue (busy).
        self._retry = dataclasses.replace(config.retry, on=Excluding(
            config.retry.classify, (BusyError, NoWorkerAvailable, ScanTimeoutError)))
        self._yara_timeout = max(1, int(-(-config.scan_timeout // 1)))
        self._hard_timeout = config.scan_timeout + config.kill_grace
        self._reload_lock = trio.Lock()
        self._pending = 0
        self._buffers = MemfdPool(config.buffer_pool_bytes, config.buffer_reuse_max_bytes,
                                  max_count=_IDLE_MEMFDS_PER_WORKER * config.workers)
        self._streams: set[ScanStream] = set()
        #: Set when a stream opens: wakes :meth:`expire_idle_streams` when it had none.
        self._stream_opened = trio.Event()
        self._closed = False
        self._scans = 0
        self._unscanned = 0
        self._matched = 0
        self._busy = 0
        self._expired = 0

    # -- public ---------------------------------------------------------------

    @property
    def rules(self) -> RulesInfo:
        return self._pool.rules

    @property
    def rules_version(self) -> str:
        return self._pool.rules.version

    @property
    def rule_count(self) -> int:
        return self._pool.rules.rule_count

    async def scan_bytes(self, data: bytes | memoryview, meta: ScanMeta) -> ScanOutcome:
        """Scan an in-memory buffer (copied once, into a memfd).

        Raises ScanTooLargeError, BusyError, ShuttingDownError.
        """
        size = memoryview(data).nbytes
        if size > self.config.max_stream_bytes:
            raise ScanTooLargeError(
                f"{size} bytes, over the {self.config.max_stream_bytes}-byte limit"
            )
        if self._closed:
            raise ShuttingDownError("the scanner is shutting down")
        self._reserve(size)
        try:
            fd, capacity = await self._buffers.holding(data)
        except OSError as exc:
            self._release(size)
            raise self._buffer_error(exc) from exc
        except BaseException:
            self._release(size)
            raise
        reuse = False
        try:
            outcome = await self._scan(fd, size, meta, owned=True, data=data)
            reuse = True
            return outcome
        finally:
            if reuse:
                self._buffers.give(fd, capacity)
            else:
                self._buffers.discard(fd)
            self._release(size)

    async def scan_fd(self, fd: int, meta: ScanMeta, size: int | None = None) -> ScanOutcome:
        """Scan through a caller-owned descriptor (regular file or memfd); the
        caller keeps ownership (the worker gets its own duplicate).

        With ``size``, only the first ``size`` bytes are scanned (and hashed):
        a client that reuses a memfd larger than this file's bytes says how
        many are this file's. The descriptor must hold at least that many.

        Raises BadFileDescriptorError, ScanTooLargeError, BusyError,
        ShuttingDownError, ScanError (file unreadable, or shrank during the scan).
        """
        holds = _check_scan_fd(fd, self.config.max_stream_bytes)
        if size is None:
            return await self._scan(fd, holds, meta, owned=False, data=None)
        if size < 0:
            raise ScanError("size must not be negative", retryable=False)
        if size > holds:
            raise BadFileDescriptorError(
                f"the descriptor holds {holds} bytes, fewer than the size {size}"
            )
        return await self._scan(fd, size, meta, owned=False, data=None, exact=True)

    def open_stream(self, meta: ScanMeta, declared_size: int | None = None, *,
                    on_idle: IdleCallback | None = None) -> ScanStream:
        """A chunked scan: ``write()`` chunks, then ``await finish()`` (or ``abort()``).

        A stream that gets no chunk for ``stream_idle_timeout`` seconds before
        ``finish()`` is dropped by :meth:`expire_idle_streams`; then
        ``on_idle(stream)`` is awaited in the scanner's own task group, so that
        the owner can tell its client, and the stream's ``write()`` and
        ``finish()`` raise RequestTimeoutError.

        Raises ScanTooLargeError at once when ``declared_size`` is over the limit;
        BusyError when ``max_open_streams`` are open or no memfd can be had
        (out of descriptors).
        """
        if self._closed:
            raise ScanError("the scanner is closed", retryable=True)
        limit = self.config.max_stream_bytes
        if declared_size is not None and declared_size > limit:
            raise ScanTooLargeError(f"declared size {declared_size} is over the {limit}-byte limit")
        if declared_size is not None and declared_size < 0:
            raise ScanError("declared size must not be negative", retryable=False)
        if len(self._streams) >= self.config.max_open_streams:
            self._busy += 1
            raise BusyError(
                f"{len(self._streams)} scan streams are open in the daemon "
                f"(limit {self.config.max_open_streams})",
                retry_after=0.5,
            )
        try:
            fd, capacity = self._buffers.take(declared_size or 0)
        except OSError as exc:
            raise self._buffer_error(exc) from exc
        stream = ScanStream(self, meta, fd, capacity, declared_size, on_idle)
        self._streams.add(stream)
        self._stream_opened.set()
        return stream

    async def expire_idle_streams(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drop every stream that got no chunk for ``stream_idle_timeout`` seconds,
        until cancelled (:func:`open_scanner` runs this).

        An open stream holds its bytes against ``max_pending_bytes`` and a memfd;
        without a time limit, a client that stops sending mid-stream would keep
        them until it disconnects. A stream being scanned (``finish()`` called)
        is not idle. A dropped stream's ``on_idle`` callback runs in this task's
        nursery; one that raises is logged, never fatal to the scanner.
        """
        timeout = self.config.stream_idle_timeout
        async with trio.open_nursery() as callbacks:
            task_status.started()
            while True:
                self._stream_opened = trio.Event()
                waiting = [s for s in self._streams if s.awaiting_chunks]
                if not waiting:
                    await self._stream_opened.wait()
                    continue
                # A chunk only moves a deadline later, and a new stream's is the
                # latest of all: waking at the earliest one never misses one.
                await trio.sleep_until(min(s.last_active for s in waiting) + timeout)
                now = trio.current_time()
                for stream in [s for s in self._streams if s.awaiting_chunks]:
                    # The same sum as the deadline slept until, so that rounding
                    # can never leave a stream unexpired (and this loop spinning).
                    if stream.last_active + timeout <= now:
                        self._expire(stream, callbacks)

    def _expire(self, stream: ScanStream, callbacks: trio.Nursery) -> None:
        stream._expire()
        self._expired += 1
        log_event("scan_stream_idle", 20, bytes=stream.size,
                  seconds=self.config.stream_idle_timeout)
        if stream._on_idle is not None:
            callbacks.start_soon(self._run_on_idle, stream._on_idle, stream)

    @staticmethod
    async def _run_on_idle(callback: IdleCallback, stream: ScanStream) -> None:
        try:
            await callback(stream)
        except Exception as exc:
            log_event("scan_stream_idle_callback_failed", 40, error=repr(exc))

    async def reload(self, rules_dir: str | None = None) -> RulesInfo:
        """Compile ``rules_dir`` (default: the current one) beside the current set and
        swap atomically; in-flight scans finish on the old set.

        Raises RulesError ("file:line: message") and keeps the old set serving
        when the new one does not compile or the workers cannot load it.
        """
        async with self._reload_lock:
            target = rules_dir if rules_dir is not None else self._rules_dir
            info = await load_rules(target, self._cache_dir,
                                    compile_timeout=self.config.compile_timeout)
            if info.key != self._pool.rules.key:
                try:
                    await self._pool.swap_rules(info)
                except ScanError as exc:
                    raise RulesError(
                        f"rules compiled but could not be loaded: {exc.message}"
                    ) from exc
            self._rules_dir = target
            await trio.to_thread.run_sync(prune_cache, self._cache_dir, info.key)
            log_event("scan_rules_loaded", 20, version=info.version, rules=info.rule_count,
                      cached=info.cached, seconds=info.compile_seconds)
            return info

    async def self_test(self, timeout: float = 2.0) -> float:
        """Scan a small buffer on a worker (the 'yara' health check); milliseconds.

        Bypasses the breaker (it must be able to say the scanner works again).
        Raises ScanError when no worker answers correctly within ``timeout``.
        """
        started = time.perf_counter()
        fd = sealed_memfd(SELF_TEST_DATA)
        try:
            with trio.move_on_after(timeout) as scope:
                handle = await self._pool.acquire()
                try:
                    result = await self._pool.run_job(
                        handle, fd, externals_for(None, "self-test.txt"),
                        yara_timeout=max(1, int(-(-timeout // 1))), hard_timeout=timeout + 1,
                        max_bytes=len(SELF_TEST_DATA))
                finally:
                    self._pool.release(handle)
        except ScanError as exc:
            raise ScanError(f"scanner self-test failed: {exc.message}") from exc
        finally:
            os.close(fd)
        if scope.cancelled_caught:
            raise ScanError(f"scanner self-test did not finish within {timeout:g} s")
        expected = hashlib.sha256(SELF_TEST_DATA).hexdigest()
        if result.kind or result.sha256 != expected:
            raise ScanError(f"scanner self-test failed: {result.error or 'wrong digest'}")
        return (time.perf_counter() - started) * 1000

    def statistics(self) -> ScannerStatistics:
        return ScannerStatistics(
            pool=self._pool.statistics(),
            breaker_state=str(self.breaker.statistics().state),
            rules_version=self.rules_version,
            rule_count=self.rule_count,
            scans_total=self._scans,
            scans_unscanned=self._unscanned,
            scans_matched=self._matched,
            busy_rejections=self._busy,
            pending_bytes=self._pending,
            open_streams=len(self._streams),
            buffer_bytes_retained=self._buffers.retained,
            streams_expired=self._expired,
        )

    def worker_pids(self) -> list[int]:
        """Pids of every worker process not yet reaped."""
        return self._pool.worker_pids()

    async def wait_workers(self, count: int | None = None) -> None:
        """Wait until ``count`` (default: all configured) workers are up (tests, tools)."""
        await self._pool.wait_alive(count)

    def kill_worker(self, pid: int) -> bool:
        """SIGKILL one worker (chaos tools, operators); True if the pid was ours."""
        return self._pool.kill_worker(pid)

    # -- internals ------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        if self._pending + size > self.config.max_pending_bytes:
            self._busy += 1
            raise BusyError(
                f"scanner is buffering {self._pending >> 20} MiB already "
                f"(limit {self.config.max_pending_bytes >> 20} MiB)",
                retry_after=1.0,
            )
        self._pending += size

    def _release(self, size: int) -> None:
        self._pending -= size

    def _buffer_error(self, exc: OSError) -> ScanError | BusyError:
        """What a failure to create or fill a buffer memfd tells the client: out of
        descriptors or memory is overload (``busy``, retryable), not a bug."""
        if exc.errno in _EXHAUSTED_ERRNOS:
            self._busy += 1
            return BusyError(f"the scanner cannot get a buffer right now: {exc.strerror}",
                             retry_after=1.0)
        return ScanError(f"cannot buffer the file: {exc.strerror}", retryable=True)

    async def _attempt(self, fd: int, size: int, length: int, externals: dict[str, str],
                       owned: bool) -> tuple[Result, RulesInfo]:
        """One try on one worker. Raises what the breaker and retry policy judge."""
        handle = await self._pool.acquire()
        try:
            try:
                result = await self._pool.run_job(
                    handle, fd, externals,
                    yara_timeout=self._yara_timeout, hard_timeout=self._hard_timeout,
                    max_bytes=self.config.max_stream_bytes, length=length,
                )
            except WorkerCrashedError as exc:
                if not owned and _shrank(fd, size):
                    # SIGBUS: the client truncated the file under the mapping. Its
                    # fault, not the scanner's: neither retried nor counted.
                    raise ScanError("the file shrank while it was being scanned",
                                    retryable=False) from exc
                raise
        finally:
            self._pool.release(handle)
        if result.kind == "timeout":
            raise ScanTimeoutError(f"scan timed out after {self._yara_timeout} s")
        if result.kind == "too_large":
            raise ScanTooLargeError(result.error)
        if result.kind == "io":
            raise ScanError(f"cannot read the file: {result.error}", retryable=False)
        if result.kind:
            raise ScanError(f"YARA error: {result.error}", retryable=True)
        return result, handle.rules

    async def _scan(self, fd: int, size: int, meta: ScanMeta, *, owned: bool,
                    data: bytes | memoryview | None, exact: bool = False) -> ScanOutcome:
        """``owned``: our own memfd. The worker scans ``size`` bytes when the
        memfd is ours (it may be larger) or ``exact``; else the whole file."""
        if self._closed:
            raise ShuttingDownError("the scanner is shutting down")
        started = time.perf_counter()
        self._scans += 1
        externals = externals_for(meta.url, meta.filename)
        try:
            result, rules = await guarded_call(
                self._attempt, fd, size, size if owned or exact else -1, externals, owned,
                breaker=self.breaker, retry=self._retry, operation="yara",
            )
        except BusyError:
            self._busy += 1
            raise
        except (ScanTooLargeError, BadFileDescriptorError):
            raise
        except CircuitOpenError as exc:
            wait = f"; retrying in {exc.retry_after:.0f} s" if exc.retry_after else ""
            reason = f"the scanner is unavailable (circuit breaker open{wait})"
        except RetryExhaustedError as exc:
            cause = exc.__cause__
            detail = cause.message if isinstance(cause, ScanError) else str(cause or exc)
            reason = f"scan failed after retries: {detail}"
        except NoWorkerAvailable as exc:
            reason = exc.message
        except ScanTimeoutError as exc:
            reason = exc.message
        except WorkerCrashedError as exc:
            reason = exc.message
        except ScanError as exc:
            if not exc.retryable:
                raise
            reason = exc.message
        else:
            matches = [
                RuleMatch(rule=m.rule, namespace=m.namespace, tags=m.tags, meta=m.meta)
                for m in result.matches
            ]
            if matches:
                self._matched += 1
            return ScanOutcome(
                sha256=result.sha256,
                size=result.size,
                matches=matches,
                rules_version=rules.version,
                scanned=True,
                scan_ms=(time.perf_counter() - started) * 1000,
                filetype=result.filetype,
            )
        return await self._unscanned_outcome(fd, size, data, reason, started)

    async def _unscanned_outcome(self, fd: int, size: int, data: bytes | memoryview | None,
                                 reason: str, started: float) -> ScanOutcome:
        self._unscanned += 1
        log_event("scan_unscanned", 30, reason=reason, fail_closed=self.config.fail_closed)
        if data is not None:
            digest = await trio.to_thread.run_sync(lambda: hashlib.sha256(data).hexdigest())
        else:
            try:
                digest = await trio.to_thread.run_sync(_hash_fd, fd, size)
            except OSError:
                digest = ""
        return ScanOutcome(
            sha256=digest,
            size=size,
            matches=[],
            rules_version=self.rules_version,
            scanned=False,
            degraded=True,
            warnings=[f"file was not scanned: {reason}"],
            scan_ms=(time.perf_counter() - started) * 1000,
        )

    def _close(self) -> None:
        self._closed = True
        for stream in list(self._streams):
            stream.abort()
        self._buffers.close()


def _shrank(fd: int, size: int) -> bool:
    try:
        return os.fstat(fd).st_size < size
    except OSError:
        return False


#: Awaited by the scanner with a stream it dropped for idleness (see open_stream).
IdleCallback = Callable[["ScanStream"], Awaitable[None]]


class ScanStream:
    """A file arriving in chunks, buffered in a memfd (never in the Python heap).

    ``write(chunk)`` appends (ScanTooLargeError past ``max_stream_bytes``: the
    stream is dropped at once); ``await finish()`` scans; ``abort()`` releases
    the buffer and must always be called in the end (a ``finally``, or use the
    stream as a context manager). Between ``finish()`` and ``abort()`` the
    content stays readable through :meth:`fileno` (exactly ``size`` bytes), so
    the verdict step can quarantine it without another copy. A stream that
    waits longer than ``stream_idle_timeout`` for a chunk is aborted by the
    scanner; from then on ``write()`` and ``finish()`` raise
    RequestTimeoutError (:meth:`idle_error`).
    """

    def __init__(self, scanner: Scanner, meta: ScanMeta, fd: int, capacity: int,
                 declared_size: int | None, on_idle: IdleCallback | None = None) -> None:
        self._scanner = scanner
        self.meta = meta
        self.declared_size = declared_size
        self._fd = fd
        self._capacity = capacity
        self.size = 0
        self._done = False
        self._finished = False
        #: A scan of the memfd started and did not end normally (a worker may hold it).
        self._sent = False
        self._on_idle = on_idle
        #: trio time of the last chunk (or of the opening).
        self.last_active = trio.current_time()
        #: True once dropped for waiting longer than ``stream_idle_timeout``.
        self.expired = False

    @property
    def closed(self) -> bool:
        """True once aborted (the buffer is released)."""
        return self._done

    @property
    def awaiting_chunks(self) -> bool:
        """Open and not yet finishing: the idle time limit applies."""
        return not (self._done or self._finished)

    def idle_error(self) -> RequestTimeoutError:
        """What the owner tells its client about a stream dropped for idleness."""
        return RequestTimeoutError(
            f"scan stream dropped: no chunk for {self._scanner.config.stream_idle_timeout:g} s "
            f"(after {self.size} bytes); start it again with scan_begin"
        )

    def fileno(self) -> int:
        """The memfd holding the content (valid until ``abort()``)."""
        if self._done:
            raise ScanError("the scan stream is closed", retryable=False)
        return self._fd

    def write(self, chunk: bytes | memoryview) -> None:
        """Append a chunk. Raises ScanTooLargeError / BusyError (stream dropped),
        RequestTimeoutError (dropped earlier for idleness)."""
        if self.expired:
            raise self.idle_error()
        if self._done or self._finished:
            raise ScanError("the scan stream is already finished or aborted", retryable=False)
        n = memoryview(chunk).nbytes
        limit = self._scanner.config.max_stream_bytes
        if self.size + n > limit:
            self.abort()
            raise ScanTooLargeError(f"stream passed the {limit}-byte limit")
        try:
            self._scanner._reserve(n)
        except BusyError:
            self.abort()
            raise
        self.size += n
        try:
            pwrite_all(self._fd, chunk, self.size - n)
        except OSError as exc:
            self.abort()
            raise self._scanner._buffer_error(exc) from exc
        self.last_active = trio.current_time()

    async def finish(self) -> ScanOutcome:
        """Scan what was written. On an error the stream is aborted; on success it
        stays open for :meth:`fileno` until ``abort()``."""
        if self.expired:
            raise self.idle_error()
        if self._done or self._finished:
            raise ScanError("the scan stream is already finished or aborted", retryable=False)
        self._finished = True
        if self._capacity > self.size:
            # A reused memfd may be longer than this file: cut it to the file.
            os.ftruncate(self._fd, self.size)
            self._capacity = self.size
        self._sent = True
        try:
            outcome = await self._scanner._scan(self._fd, self.size, self.meta, owned=True,
                                                data=None)
        except BaseException:
            self.abort()  # a worker may still read the memfd: closed, not reused
            raise
        self._sent = False  # ended normally: the worker is done with the memfd
        return outcome

    def _expire(self) -> None:
        self.expired = True
        self.abort()

    def abort(self) -> None:
        """Drop the stream and its buffer (idempotent)."""
        if self._done:
            return
        self._done = True
        if self._sent or self._scanner._closed:
            self._scanner._buffers.discard(self._fd)
        else:
            self._scanner._buffers.give(self._fd, max(self._capacity, self.size))
        self._scanner._release(self.size)
        self._scanner._streams.discard(self)

    def __enter__(self) -> ScanStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


@contextlib.asynccontextmanager
async def open_scanner(config: ScannerConfig, data_dir: Path | str) -> AsyncIterator[Scanner]:
    """Load the rules (compile or cache), start the pool, yield the Scanner.

    Raises RulesError when the configured rules do not compile. On exit every
    worker is killed and reaped and every open stream dropped.
    """
    cache_dir = Path(data_dir) / CACHE_DIRNAME
    info = await load_rules(config.rules_dir, cache_dir, compile_timeout=config.compile_timeout)
    pool = WorkerPool(
        PoolConfig(
            workers=config.workers,
            max_scans_per_worker=config.max_scans_per_worker,
            max_worker_rss_bytes=config.max_worker_rss_bytes,
            worker_memory_limit_bytes=config.worker_memory_limit_bytes,
            wait_timeout=config.worker_wait_timeout,
            max_queue=config.max_queue,
            start_timeout=config.worker_start_timeout,
        ),
        info,
    )
    scanner = Scanner(config, pool, cache_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await nursery.start(scanner.expire_idle_streams)
        log_event("scanner_started", 20, rules=info.rule_count, version=info.version,
                  workers=config.workers, cached=info.cached)
        try:
            yield scanner
        finally:
            scanner._close()
            nursery.cancel_scope.cancel()
