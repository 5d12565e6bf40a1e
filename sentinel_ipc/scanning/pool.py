"""The trio side of the worker pool: spawn, supervise, replace, recycle, swap.

Theory of operation
-------------------
The pool keeps ``workers`` processes (:mod:`.worker`) of the current rules
*generation* alive. Each worker has one ``SOCK_SEQPACKET`` socket to the
daemon and does one job at a time; a job is a datagram plus the descriptor to
scan (``SCM_RIGHTS``).

* **Idle workers** sit in a memory channel. :meth:`WorkerPool.acquire` takes
  one, waiting at most ``wait_timeout`` (-> :class:`NoWorkerAvailable`). At most
  ``max_queue`` tasks may wait at once; one more gets :class:`BusyError`
  straight away. Channel order makes waiting fair (FIFO).
* **A maintainer task** spawns workers whenever fewer than ``workers`` of the
  current generation are alive or starting, with an exponential back-off after
  start failures so that a broken rules file cannot fork-bomb the machine.
* **A reaper task per worker** waits for its exit. A worker that dies while
  idle is simply replaced; one that dies during a job makes that job raise
  :class:`~sentinel_ipc.errors.WorkerCrashedError` (the engine retries it on
  another worker).
* **Timeouts**: the job carries YARA's own timeout; if no reply comes by the
  hard deadline the worker is killed (SIGKILL) and replaced, and the job
  raises :class:`~sentinel_ipc.errors.ScanTimeoutError`.
* **Cancellation**: a job cancelled after its datagram was sent may still be
  answered. The worker is handed to a drain task that waits for (and discards)
  that answer until the hard deadline, then returns the worker to the idle
  set, or kills it. A worker is never given a new job while an old answer may
  still arrive.
* **Recycling**: after ``max_scans_per_worker`` jobs, or once its RSS (which
  the worker reports with each answer) passes ``max_worker_rss_bytes``, a
  worker is retired after its job and replaced.
* **Rule swap**: :meth:`WorkerPool.swap_rules` starts a full set of workers
  on the new rules *beside* the old ones, and only when they are ready makes
  their generation current. From that instant every acquire gets a new
  worker; old workers finish the jobs they hold and are then retired. If none
  of the new workers can load the rules, the old generation keeps serving.
* **Shutdown**: leaving :meth:`WorkerPool.run` (cancellation) kills every
  worker with SIGKILL and reaps it; nothing is left behind.
"""

from __future__ import annotations

import array
import contextlib
import enum
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import trio

from ..errors import BusyError, ScanError, ScanTimeoutError, WorkerCrashedError
from ..logs import log_event
from .rules import RulesInfo
from .worker import MAX_DATAGRAM, FromWorker, Job, Ready, Result, StartFailed

WORKER_SCRIPT = str(Path(__file__).resolve().parent / "worker.py")


class NoWorkerAvailable(ScanError):
    """No worker could be had within the bounded wait (all busy, or none alive)."""

    default_retryable = True

    def __init__(self, message: str, *, alive: int) -> None:
        super().__init__(message)
        #: Workers alive when the wait ended: 0 means the pool is broken, not busy.
        self.alive = alive


class WorkerState(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DRAINING = "draining"  # a cancelled job's answer may still come
    RETIRED = "retired"  # told to go (or being killed); not to be used again
    DEAD = "dead"


@dataclass(eq=False)
class WorkerHandle:
    """The daemon's view of one worker process."""

    proc: trio.Process
    sock: trio.socket.SocketType
    generation: int
    rules: RulesInfo
    started_at: float
    state: WorkerState = WorkerState.STARTING
    scans: int = 0
    rss: int = 0
    next_job: int = 1
    #: Why we killed it (so its exit is not counted as a crash).
    kill_reason: str | None = None
    exited: trio.Event = field(default_factory=trio.Event)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.state not in (WorkerState.DEAD, WorkerState.RETIRED)

    def kill(self, reason: str) -> None:
        """SIGKILL the process (idempotent); its reaper does the rest."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.state is not WorkerState.DEAD:
            self.state = WorkerState.RETIRED
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def close_socket(self) -> None:
        self.sock.close()


class PoolConfig(msgspec.Struct, frozen=True, kw_only=True):
    workers: int
    max_scans_per_worker: int = 10_000
    max_worker_rss_bytes: int = 1024 * 1024 * 1024
    #: RLIMIT_AS for each worker (0: none). Must fit the rules plus the largest mapped file.
    worker_memory_limit_bytes: int = 0
    wait_timeout: float = 10.0
    max_queue: int = 256
    start_timeout: float = 60.0
    #: Start-failure back-off: initial and maximum delay before the next spawn.
    spawn_backoff_initial: float = 0.1
    spawn_backoff_max: float = 5.0
    #: A root daemon's workers drop to ``nobody`` once their rules are loaded
    #: (see the worker module). False keeps them root (debugging only).
    drop_root: bool = True


def worker_user(drop_root: bool) -> tuple[int, int] | None:
    """The (uid, gid) workers drop to: ``nobody``'s when we are root, else None
    (a worker of an ordinary user already has nothing more to lose)."""
    if not drop_root or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return (65534, 65534)
    return (entry.pw_uid, entry.pw_gid)


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the pool (``statistics()``), for health, metrics and tests."""

    target: int
    alive: int
    idle: int
    busy: int
    starting: int
    draining: int
    waiting: int
    generation: int
    rules_version: str
    scans_total: int
    crashes_total: int
    hard_timeouts_total: int
    recycled_total: int
    #: Workers of the current rules that exited and were (or are being) replaced.
    restarts_total: int
    spawned_total: int
    start_failures_total: int
    busy_pids: list[int]


_decoder = msgspec.msgpack.Decoder(FromWorker)
_encoder = msgspec.msgpack.Encoder()


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class WorkerPool:
    """N supervised YARA worker processes. Use :meth:`run` in a nursery."""

    def __init__(self, config: PoolConfig, rules: RulesInfo) -> None:
        if config.workers < 1:
            raise ValueError("a pool needs at least one worker")
        self.config = config
        self._rules = rules
        #: Whom workers drop to (looked up once: every spawn and recycle uses it).
        self._worker_user = worker_user(config.drop_root)
        self._generation = 1
        self._workers: set[WorkerHandle] = set()
        send, recv = trio.open_memory_channel[WorkerHandle](math.inf)
        self._idle_send, self._idle_recv = send, recv
        self._waiting = 0
        #: Every handle whose process may not have been reaped yet (shutdown kills these).
        self._unreaped: set[WorkerHandle] = set()
        self._changed = trio.Event()
        self._state_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._start_failures_in_row = 0
        self._last_start_error = ""
        self._swap_lock = trio.Lock()
        #: Set once the first worker start has finished, well or badly.
        self._settled = trio.Event()
        self._scans = 0
        self._crashes = 0
        self._hard_timeouts = 0
        self._recycled = 0
        self._restarts = 0
        self._spawned = 0
        self._start_failures = 0
        self._mean_scan_s = 0.05

    # -- public ---------------------------------------------------------------

    @property
    def rules(self) -> RulesInfo:
        return self._rules

    @property
    def last_start_error(self) -> str:
        return self._last_start_error

    def statistics(self) -> PoolStatistics:
        states = [w.state for w in self._workers]
        return PoolStatistics(
            target=self.config.workers,
            alive=sum(1 for s in states if s in (WorkerState.IDLE, WorkerState.BUSY,
                                                 WorkerState.DRAINING)),
            idle=states.count(WorkerState.IDLE),
            busy=states.count(WorkerState.BUSY),
            starting=states.count(WorkerState.STARTING),
            draining=states.count(WorkerState.DRAINING),
            waiting=self._waiting,
            generation=self._generation,
            rules_version=self._rules.version,
            scans_total=self._scans,
            crashes_total=self._crashes,
            hard_timeouts_total=self._hard_timeouts,
            recycled_total=self._recycled,
            restarts_total=self._restarts,
            spawned_total=self._spawned,
            start_failures_total=self._start_failures,
            busy_pids=sorted(w.pid for w in self._workers if w.state is WorkerState.BUSY),
        )

    def worker_pids(self) -> list[int]:
        """Pids of every worker process not yet reaped (any state)."""
        return sorted(w.pid for w in self._workers if w.proc.returncode is None)

    async def wait_alive(self, count: int | None = None) -> None:
        """Wait until ``count`` (default: all) workers of the current rules are alive."""
        want = self.config.workers if count is None else count
        while True:
            alive = sum(1 for w in self._workers if w.generation == self._generation
                        and w.state in (WorkerState.IDLE, WorkerState.BUSY, WorkerState.DRAINING))
            if alive >= want:
                return
            await self._state_changed.wait()

    def retry_after(self) -> float:
        """A hint for BusyError: roughly when a queue slot should free up."""
        per_worker = self._waiting / max(1, self.config.workers)
        return min(5.0, max(0.1, per_worker * self._mean_scan_s))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise the pool until cancelled; started() once the first worker start
        has succeeded or failed (or the start timeout passed). On exit every worker
        is killed and reaped."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._maintain)
                with trio.move_on_after(self.config.start_timeout):
                    await self._settled.wait()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._closing = True
            with trio.CancelScope(shield=True):
                await self._kill_all()

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[WorkerHandle]:
        """Hold an idle worker for one job (``async with pool.worker() as w``)."""
        handle = await self.acquire()
        try:
            yield handle
        finally:
            self.release(handle)

    async def acquire(self) -> WorkerHandle:
        """An idle worker of the current generation.

        Raises BusyError (retryable, ``retry_after``) when ``max_queue`` tasks are
        already waiting, NoWorkerAvailable when none frees up within ``wait_timeout``.
        """
        if self._closing:
            raise NoWorkerAvailable("the scanner is shutting down", alive=0)
        if self._waiting >= self.config.max_queue:
            raise BusyError(
                f"scan queue full ({self._waiting} waiting for {self.config.workers} workers)",
                retry_after=self.retry_after(),
            )
        if self._start_failures_in_row and not self.statistics().alive:
            # Workers cannot start: waiting would only delay the same answer.
            raise NoWorkerAvailable(
                f"no scan worker is running (last start failure: {self._last_start_error})",
                alive=0,
            )
        self._waiting += 1
        try:
            with trio.move_on_after(self.config.wait_timeout):
                while True:
                    try:
                        handle = await self._idle_recv.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        raise NoWorkerAvailable("the scanner is shutting down", alive=0) from None
                    if handle.state is not WorkerState.IDLE:
                        continue  # died or retired while queued
                    if handle.generation != self._generation:
                        self._retire(handle, "rules replaced")
                        continue
                    handle.state = WorkerState.BUSY
                    return handle
        finally:
            self._waiting -= 1
        alive = self.statistics().alive
        why = (
            f"all {alive} scan workers busy for {self.config.wait_timeout:g} s"
            if alive
            else "no scan worker is running"
            + (f" (last start failure: {self._last_start_error})" if self._last_start_error else "")
        )
        raise NoWorkerAvailable(why, alive=alive)

    def release(self, handle: WorkerHandle) -> None:
        """Give a worker back after a job (or drop it if it should go)."""
        if handle.state is not WorkerState.BUSY:
            return  # dead, retired, or draining: someone else owns its fate
        if handle.generation != self._generation:
            self._retire(handle, "rules replaced")
        elif handle.scans >= self.config.max_scans_per_worker:
            self._recycled += 1
            self._retire(handle, f"recycled after {handle.scans} scans")
        elif handle.rss > self.config.max_worker_rss_bytes:
            self._recycled += 1
            self._retire(handle, f"recycled at RSS {handle.rss >> 20} MiB")
        else:
            self._make_idle(handle)

    async def run_job(self, handle: WorkerHandle, fd: int, externals: dict[str, str], *,
                      yara_timeout: int, hard_timeout: float, max_bytes: int,
                      length: int = -1) -> Result:
        """Send one job to a worker held with :meth:`acquire` and wait for its answer.

        Raises WorkerCrashedError (the worker died or ran out of memory; retryable),
        ScanTimeoutError (no answer by ``hard_timeout``: the worker was killed),
        and returns the worker's Result otherwise (``kind`` may name a soft failure).
        """
        job_id = handle.next_job
        handle.next_job += 1
        job = Job(job=job_id, externals=externals, timeout=yara_timeout, max_bytes=max_bytes,
                  length=length)
        payload = _encoder.encode(job)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        deadline = trio.current_time() + hard_timeout
        sent = False
        started = time.perf_counter()
        try:
            with trio.move_on_at(deadline) as scope:
                await handle.sock.sendmsg([payload], ancillary)
                sent = True
                reply = await self._receive_result(handle, job_id)
        except BaseException as exc:
            if isinstance(exc, WorkerCrashedError):
                raise
            if sent and handle.state is WorkerState.BUSY:
                self._start_drain(handle, job_id, deadline)
            elif isinstance(exc, (OSError, trio.ClosedResourceError)):
                # sendmsg failed: the worker is gone (its reaper closed the socket).
                handle.kill("socket error")
                raise WorkerCrashedError(f"scan worker {handle.pid}: {exc}") from exc
            raise
        if scope.cancelled_caught:
            self._hard_timeouts += 1
            handle.kill("hard timeout")
            log_event("scan_worker_killed", 30, pid=handle.pid, reason="timeout",
                      seconds=round(hard_timeout, 3))
            raise ScanTimeoutError(
                f"scan did not finish within {hard_timeout:.1f} s; worker {handle.pid} killed"
            )
        self._scans += 1
        handle.scans += 1
        handle.rss = reply.rss
        elapsed = time.perf_counter() - started
        self._mean_scan_s = 0.9 * self._mean_scan_s + 0.1 * elapsed
        if reply.kind == "memory":
            # The worker exits after such an answer; don't hand it out again.
            handle.kill("memory exhaustion")
            raise WorkerCrashedError(f"scan worker {handle.pid} ran out of memory: {reply.error}")
        return reply

    async def swap_rules(self, rules: RulesInfo) -> None:
        """Start a full generation on ``rules`` beside the current one, then switch.

        Raises ScanError when not one new worker could load the rules (the old
        generation keeps serving).
        """
        async with self._swap_lock:
            generation = self._generation + 1
            started: list[WorkerHandle] = []
            errors: list[str] = []

            async def start_one() -> None:
                try:
                    started.append(await self._start_worker(generation, rules))
                except ScanError as exc:
                    errors.append(exc.message)

            async with trio.open_nursery() as nursery:
                for _ in range(self.config.workers):
                    nursery.start_soon(start_one)
            if not started:
                raise ScanError(
                    "no worker could load the new rules: " + (errors[0] if errors else "unknown"),
                    retryable=False,
                )
            self._rules = rules
            self._generation = generation
            for handle in started:
                self._adopt(handle)
            for handle in list(self._workers):
                if handle.generation != generation and handle.state is WorkerState.IDLE:
                    self._retire(handle, "rules replaced")
            self._poke()
            log_event("scan_rules_swapped", 20, version=rules.version, generation=generation,
                      workers=len(started))

    def kill_worker(self, pid: int) -> bool:
        """Kill one worker by pid (operators, chaos tools). True if it was ours."""
        for handle in self._workers:
            if handle.pid == pid and handle.proc.returncode is None:
                handle.kill("killed on request")
                return True
        return False

    # -- internals ------------------------------------------------------------

    async def _receive_result(self, handle: WorkerHandle, job_id: int) -> Result:
        while True:
            try:
                data = await handle.sock.recv(MAX_DATAGRAM)
            except (OSError, trio.ClosedResourceError) as exc:
                data = b""
                error: BaseException | None = exc
            else:
                error = None
            if not data:
                raise await self._crashed(handle, error)
            try:
                message = _decoder.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                handle.kill("protocol error")
                raise WorkerCrashedError(f"scan worker {handle.pid} sent garbage: {exc}") from exc
            if isinstance(message, Result) and message.job == job_id:
                return message
            # A stale answer (cannot happen: jobs never overlap), or noise: skip it.

    async def _crashed(
        self, handle: WorkerHandle, error: BaseException | None
    ) -> WorkerCrashedError:
        """The worker's socket hit EOF mid-job: wait briefly for its exit status."""
        with trio.move_on_after(1.0):
            await handle.exited.wait()
        if handle.proc.returncode is None:
            handle.kill("closed its socket during a job")
        handle.close_socket()
        how = _describe_exit(handle.proc.returncode)
        exc = WorkerCrashedError(f"scan worker {handle.pid} died during the scan ({how})")
        if error is not None:
            exc.__cause__ = error
        return exc

    def _start_drain(self, handle: WorkerHandle, job_id: int, deadline: float) -> None:
        handle.state = WorkerState.DRAINING
        if self._nursery is None or self._closing:
            handle.kill("cancelled during shutdown")
            return
        self._nursery.start_soon(self._drain, handle, job_id, deadline)

    async def _drain(self, handle: WorkerHandle, job_id: int, deadline: float) -> None:
        """Wait for a cancelled job's answer, then reuse the worker (or kill it)."""
        try:
            with trio.move_on_at(deadline):
                result = await self._receive_result(handle, job_id)
                if result.kind == "memory":
                    handle.kill("memory exhaustion")  # it exits after such an answer
                    return
                if handle.state is WorkerState.DRAINING:
                    handle.state = WorkerState.BUSY
                    self.release(handle)
                    return
        except WorkerCrashedError:
            return
        handle.kill("cancelled job did not finish")

    def _make_idle(self, handle: WorkerHandle) -> None:
        if self._closing:
            handle.kill("pool closed")
            return
        handle.state = WorkerState.IDLE
        self._idle_send.send_nowait(handle)

    def _retire(self, handle: WorkerHandle, reason: str) -> None:
        """Stop using a worker. It is killed: workers keep no state worth a graceful exit."""
        log_event("scan_worker_retired", 10, pid=handle.pid, reason=reason)
        handle.kill(reason)
        self._poke()

    def _adopt(self, handle: WorkerHandle) -> None:
        """A ready worker joins the pool: reaped by its own task, then idle."""
        assert self._nursery is not None
        self._workers.add(handle)
        self._nursery.start_soon(self._reap, handle)
        self._make_idle(handle)
        self._poke()

    def _poke(self) -> None:
        self._changed.set()
        self._state_changed.set()
        self._state_changed = trio.Event()

    def _live_current(self) -> int:
        return sum(
            1
            for w in self._workers
            if w.generation == self._generation and w.alive
        )

    async def _maintain(self) -> None:
        """Keep ``workers`` processes of the current generation alive or starting."""
        starting = 0

        async def spawn(generation: int) -> None:
            nonlocal starting
            try:
                handle = await self._start_worker(generation, self._rules)
            except ScanError as exc:
                self._start_failures_in_row += 1
                self._last_start_error = exc.message
                log_event("scan_worker_start_failed", 40, error=exc.message,
                          in_a_row=self._start_failures_in_row)
                handle = None
            finally:
                starting -= 1
                self._settled.set()
                self._poke()
            if handle is None:
                return
            self._start_failures_in_row = 0
            if handle.generation != self._generation or self._closing:
                handle.kill("generation replaced while starting")
                with trio.CancelScope(shield=True):
                    await self._reap_now(handle)
                return
            self._adopt(handle)

        assert self._nursery is not None
        while True:
            self._changed = trio.Event()
            if self._closing:
                return
            deficit = self.config.workers - self._live_current() - starting
            if deficit > 0 and self._start_failures_in_row:
                delay = min(
                    self.config.spawn_backoff_max,
                    self.config.spawn_backoff_initial * 2 ** (self._start_failures_in_row - 1),
                )
                await trio.sleep(delay)
                deficit = self.config.workers - self._live_current() - starting
                # One at a time while failing: a probe, not a stampede.
                deficit = min(deficit, 1)
            for _ in range(max(0, deficit)):
                starting += 1
                self._nursery.start_soon(spawn, self._generation)
            await self._changed.wait()

    async def _start_worker(self, generation: int, rules: RulesInfo) -> WorkerHandle:
        """Spawn a worker and wait for its Ready. Raises ScanError on any failure."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [
            sys.executable,
            WORKER_SCRIPT,
            "--sock", str(child.fileno()),
            "--rules", rules.compiled_path,
            "--memory-limit", str(self.config.worker_memory_limit_bytes),
            "--parent-pid", str(os.getpid()),
        ]
        user = self._worker_user
        if user is not None:
            cmd += ["--user", f"{user[0]}:{user[1]}"]
        try:
            proc = await trio.lowlevel.open_process(
                cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
            )
        except BaseException as exc:
            parent.close()
            if isinstance(exc, OSError):
                self._start_failures += 1
                raise ScanError(f"cannot start a scan worker: {exc}") from exc
            raise
        finally:
            child.close()
        self._spawned += 1
        handle = WorkerHandle(
            proc=proc,
            sock=trio.socket.from_stdlib_socket(parent),
            generation=generation,
            rules=rules,
            started_at=trio.current_time(),
        )
        self._unreaped.add(handle)
        error = ""
        try:
            with trio.move_on_after(self.config.start_timeout):
                data = await handle.sock.recv(MAX_DATAGRAM)
                message: FromWorker | None = _decoder.decode(data) if data else None
                if isinstance(message, Ready):
                    handle.rss = message.rss
                    return handle
                if isinstance(message, StartFailed):
                    error = message.error
                else:
                    await proc.wait()
                    error = f"worker {_describe_exit(proc.returncode)} while loading rules"
            if not error:
                error = f"worker not ready within {self.config.start_timeout:g} s"
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            error = f"worker handshake failed: {exc}"
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._reap_now(handle)
            raise
        with trio.CancelScope(shield=True):
            await self._reap_now(handle)
        self._start_failures += 1
        raise ScanError(f"scan worker failed to start: {error}", retryable=True)

    async def _reap_now(self, handle: WorkerHandle) -> None:
        handle.kill(handle.kill_reason or "start failed")
        await handle.proc.wait()
        self._unreaped.discard(handle)
        handle.state = WorkerState.DEAD
        handle.close_socket()
        handle.exited.set()

    async def _reap(self, handle: WorkerHandle) -> None:
        """Wait for a worker to exit, then account for it and get it replaced."""
        await handle.proc.wait()
        # Not in a finally: a cancelled reaper leaves the process to _kill_all.
        self._unreaped.discard(handle)
        was = handle.state
        handle.state = WorkerState.DEAD
        handle.exited.set()
        self._workers.discard(handle)
        # A task blocked on the socket (a job or a drain) wakes with
        # ClosedResourceError and reports the crash; nobody else reads it any more.
        handle.close_socket()
        if handle.generation == self._generation and not self._closing:
            self._restarts += 1
        if handle.kill_reason is None and not self._closing:
            self._crashes += 1
            log_event("scan_worker_died", 40, pid=handle.pid,
                      status=_describe_exit(handle.proc.returncode), state=was.value)
        self._poke()

    async def _kill_all(self) -> None:
        handles = list(self._unreaped | self._workers)
        for handle in handles:
            handle.kill("pool closed")
        with trio.move_on_after(10):
            for handle in handles:
                await handle.proc.wait()
        for handle in handles:
            handle.state = WorkerState.DEAD
            handle.close_socket()
            handle.exited.set()
        self._workers.clear()
        self._unreaped.clear()
        self._idle_send.close()


def pool_config_from(**kwargs: Any) -> PoolConfig:
    """PoolConfig with only the keys it knows (the engine's config has more)."""
    names = set(PoolConfig.__struct_fields__)
    return PoolConfig(**{k: v for k, v in kwargs.items() if k in names})
