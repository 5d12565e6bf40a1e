#!/usr/bin/env python3
"""Fault injection under load: break a real sentineld on purpose and check its promises.

    python tools/chaos.py [--duration SECONDS] [--seed N] [--clients N] [--keep]

What it does
------------
1. Builds a private world in a temp dir: a corpus (clean files, a few EICAR
   files, two large files that are streamed), a rules directory (copies of the
   built-in rules), a data dir (a small tmpfs when ``mount -t tmpfs`` works, so
   the disk can really fill up) and a config with shortened breaker timeouts.
2. Starts a real ``sentineld`` subprocess. As root it runs without the
   capabilities that let root ignore file modes (``setpriv --bounding-set
   -dac_override,-dac_read_search``): an unreadable database must be
   unreadable to the daemon. (Not as ``nobody``: its worker processes must
   exec the same Python, which may live where only root can reach.)
3. Runs a mixed load through the client library: scanners (bytes, descriptor
   and stream scans, several in flight per connection), writers (``policy_add``
   with an idempotency key through the client's outbox, one at a time), and a
   health poller.
4. Injects a schedule of real faults, each held for a while and then repaired,
   and measures how long the daemon takes to be back to normal (health back to
   what it was before, a probe scan of EICAR blocked and not degraded, the
   policy list served by the database):

   ============== ==========================================================
   worker_kill    kill -9 of one scan worker, scans in flight
   workers_kill   a crash loop: every worker killed as soon as it appears
                  (the yara breaker opens; verdicts are fail-open, marked
                  degraded; hash policies still apply)
   client_drops   raw clients hanging up mid-header, mid-body, mid-stream,
                  with a descriptor in flight, before reading their reply
   db_locked      another process holds ``BEGIN EXCLUSIVE`` on the database
   daemon_kill    kill -9 of the daemon (workers must follow it), restart
   db_unreadable  ``chmod 000`` on the database file, then ``chmod 600``
   rules_broken   a bad ``.yar`` added and ``reload`` sent (must fail with a
                  typed error, old rules keep serving), then fixed, reloaded
   db_corrupt     the database file overwritten with random bytes
   workers_kill   (again, so the breaker's half-open path runs twice)
   db_deleted     the database file and its -wal/-shm deleted
   disk_full      the data dir's tmpfs filled to the last byte, then freed
   ============== ==========================================================

5. Stops the load, lets the outboxes drain, and checks: every request got a
   verdict, a reply or a typed error (none hung: *unanswered*); every write the
   daemon acknowledged (``policy_result``, queued or not) is in the final
   policy list (*lost*), exactly once (*duplicates*); the daemon holds no more
   descriptors or child processes than before, and no worker outlives its
   daemon (*leaked*); known files got the right verdict (*wrong*).

Unanswered means: the caller got nothing within its timeout, or an exception
outside Sentinel's error tree. A typed error is any ``SentinelError``: the
daemon's own ``error`` replies, and the client library's errors while the
daemon is unreachable (``unavailable``, ``retry_exhausted``, ``circuit_open``).

``--duration`` bounds the run: the first round of faults always runs in full
(about 30 s), further rounds start while time remains; a fault once started is
seen through (its recovery wait is bounded by 30 s). The last line is
machine-readable::

    chaos: faults=N requests=N unanswered=N lost=N duplicates=N leaked=N

The exit status is 1 when any of unanswered / lost / duplicates / leaked is
not 0 (or a verdict was wrong, or a fault was not recovered from), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentinel_ipc.client import (  # noqa: E402
    IPC_BREAKER,
    ClientConfig,
    error_from_reply,
    open_client,
)
from sentinel_ipc.codec import encode_framed  # noqa: E402
from sentinel_ipc.errors import (  # noqa: E402
    CircuitOpenError,
    RequestTimeoutError,
    RetryExhaustedError,
    SentinelError,
    TransportError,
)
from sentinel_ipc.messages import (  # noqa: E402
    Action,
    Error,
    Health,
    HealthReport,
    PolicyAdd,
    PolicyList,
    PolicyListResult,
    PolicyResult,
    Reload,
    ReloadResult,
    Reply,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanFd,
    ScanResult,
    ServiceRetry,
)
from sentinel_ipc.transport import open_framed_connection  # noqa: E402

EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e44415244"
    "2d414e544956495255532d544553542d46494c452124482b482a"
)
BUILTIN_RULES = ROOT / "sentinel_ipc" / "scanning" / "builtin_rules"
#: A fault's recovery is waited for at most this long (SPEC: recovery < 30 s).
RECOVERY_BOUND = 30.0
#: Normal must hold this long to count as recovered.
STABLE = 0.75
#: A call that has not returned this long after its own timeout has hung.
WATCHDOG_GRACE = 10.0
CLIENT_TIMEOUT = 10.0
SCAN_TIMEOUT = 20.0
TMPFS_BYTES = 64 * 1024 * 1024
FAULTS = ("worker_kill", "client_drops", "db_locked", "daemon_kill", "db_unreadable",
          "rules_broken", "db_corrupt", "workers_kill", "db_deleted", "disk_full")
#: Audit kinds the load writes all the time; a fault's report lists the others.
ROUTINE_AUDIT = frozenset({"detection", "policy_add", "policy_remove"})

CONFIG = """\
[server]
frame_read_timeout = 2.0

[rate_limit]
burst = 100000
scans_per_second = 100000.0
max_concurrent_scans_per_connection = 16

[scanner]
rules_dir = "{rules_dir}"
workers = {workers}
worker_wait_timeout = 5.0

[policy]
verify_interval = 0.25
probe_interval = 0.25

[resilience]
check_interval = 1.0
failing_check_interval = 0.25

[resilience.breakers.database]
failure_threshold = 5
open_timeout = 2.0
success_threshold = 2

[resilience.breakers.yara]
failure_threshold = 3
open_timeout = 3.0
success_threshold = 3

[resilience.retries.yara]
attempts = 2
initial = 0.2
max_delay = 1.0
multiplier = 3.0

[resilience.health]
min_free_bytes = {min_free}
"""


# --- bookkeeping ------------------------------------------------------------------------


@dataclass
class KindStats:
    """Outcomes of one kind of request (scan, write, health, control)."""

    sent: int = 0
    ok: int = 0
    typed: Counter[str] = field(default_factory=Counter)
    unanswered: int = 0
    untyped: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    @property
    def typed_total(self) -> int:
        return sum(self.typed.values())


@dataclass
class FaultRecord:
    name: str
    at: float
    held: float = 0.0
    #: Seconds from the injection until the daemon reported it (health not as
    #: before, or a degraded verdict / listing); None: never seen from outside.
    detected: float | None = None
    #: What health said while it lasted (components not healthy).
    seen: set[str] = field(default_factory=set)
    #: Audit events the daemon wrote while it lasted (routine kinds left out).
    audit: Counter[str] = field(default_factory=Counter)
    recovery: float | None = None
    note: str = ""
    skipped: str | None = None


@dataclass
class WriteRecord:
    key: str
    sha256: str
    acked: bool = False
    queued: bool = False
    outcome: str = "pending"


@dataclass
class Incarnation:
    """One daemon process: its fd / children profile when quiet, at start and end."""

    pid: int
    start: FdProfile | None = None
    end: FdProfile | None = None
    orphans: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FdProfile:
    total: int
    clients: int
    memfds: int
    workers: int
    zombies: int
    #: What each descriptor is (``readlink``), sockets and pipes without their inode.
    targets: Counter[str] = field(default_factory=Counter)
    #: The policy database's path (see ``parked``).
    database: str = ""

    @property
    def parked(self) -> int:
        """SQLite's parked descriptor: a verification opens the database afresh
        while the daemon's connection holds POSIX locks on it, so SQLite cannot
        close that descriptor and keeps it for the next open (see
        ``PolicyStore.verify``). One at most, reused: not a leak."""
        return min(1, max(0, self.targets[self.database] - 1))

    @property
    def own(self) -> int:
        """Descriptors the daemon holds for itself (not client sockets, not pooled
        memfds, not the parked database descriptor)."""
        return self.total - self.clients - self.memfds - self.parked


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    data: bytes
    expect: str  # "allow", "block", "block-unless-degraded"

    @property
    def name(self) -> str:
        return self.path.name


def client_side_timeout(exc: SentinelError) -> bool:
    """The client gave up waiting (no reply within the call's timeout)."""
    return isinstance(exc, RequestTimeoutError) and any(
        marker in exc.message
        for marker in ("no reply from the daemon", "no turn to send", "in flight for")
    )


def error_label(exc: SentinelError) -> str:
    """A short, bounded label: the wire code, and where it came from."""
    if isinstance(exc, CircuitOpenError):
        return f"circuit_open({exc.breaker})"
    if isinstance(exc, RetryExhaustedError) and isinstance(exc.__cause__, SentinelError):
        return f"retry_exhausted({exc.__cause__.code})"
    if isinstance(exc, TransportError):
        return "unreachable"
    return exc.code


# --- the daemon -------------------------------------------------------------------------


class Daemon:
    """A sentineld subprocess, optionally as another uid, with its process accounting."""

    def __init__(self, base: Path, data_dir: Path, drop_dac: bool, config_text: str) -> None:
        self.base = base
        self.data_dir = data_dir
        self.drop_dac = drop_dac
        self.socket_path = base / "run" / "sentinel.sock"
        self.log_path = base / "sentineld.log"
        self.config_path = base / "sentineld.toml"
        self.config_path.write_text(config_text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.incarnations: list[Incarnation] = []

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "sentinel_ipc.cli.sentineld",
            "--socket", str(self.socket_path),
            "--data-dir", str(self.data_dir),
            "--config", str(self.config_path),
        ]
        if self.drop_dac:
            cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
        return cmd

    @property
    def file_modes_apply(self) -> bool:
        """Whether chmod can lock the daemon out of a file."""
        return os.geteuid() != 0 or self.drop_dac

    async def start(self, timeout: float = 60.0) -> float:
        """Start and wait until it answers a ping; returns the seconds that took."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SENTINEL_")}
        env["PYTHONPATH"] = str(ROOT)
        started = time.monotonic()
        self.proc = self._spawn(env)
        self.incarnations.append(Incarnation(pid=self.proc.pid))
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sentineld exited with {self.proc.returncode}; see "
                                   f"{self.log_path}:\n{tail(self.log_path)}")
            if await ping(self.socket_path, 1.0):
                return time.monotonic() - started
            await trio.sleep(0.05)
        raise RuntimeError(f"sentineld not ready after {timeout:g} s:\n{tail(self.log_path)}")

    def _spawn(self, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                self.command(), stdout=log, stderr=log, env=env, cwd=str(ROOT),
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code (-9 if it had to be killed)."""
        proc = self.proc
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(timeout):
                while proc.poll() is None:  # noqa: ASYNC110 - polling a subprocess
                    await trio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
                return -9
        return proc.returncode

    def workers(self) -> list[psutil.Process]:
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        found = []
        for child in children:
            with contextlib.suppress(psutil.Error):
                if any("worker.py" in part for part in child.cmdline()):
                    found.append(child)
        return found

    def profile(self) -> FdProfile:
        """The daemon's descriptors (by kind) and child processes, now."""
        pid = self.pid
        total = memfds = 0
        targets: Counter[str] = Counter()
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                total += 1
                if target.startswith("/memfd:"):
                    memfds += 1
                else:
                    targets[target.split(":[")[0]] += 1
        proc = psutil.Process(pid)
        clients = 0
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="unix"):
                if str(conn.laddr) == str(self.socket_path) and conn.status != psutil.CONN_LISTEN:
                    clients += 1
        clients = max(0, clients - 1)  # the listening socket has the same address
        zombies = 0
        workers = 0
        for child in proc.children():
            with contextlib.suppress(psutil.Error):
                if child.status() == psutil.STATUS_ZOMBIE:
                    zombies += 1
                else:
                    workers += 1
        return FdProfile(total, clients, memfds, workers, zombies, targets,
                         str(self.data_dir / "policy_graph.db"))


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (our temp dir)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
    return found


# --- raw probes (no client library: they measure the daemon, not the client) ------------


_probe_ids = itertools.count(1_000_000)


async def raw_call(path: Path, request: Any, timeout: float = 2.0) -> Reply | None:
    """One request on a fresh connection; None if the daemon did not answer in time."""
    request.id = next(_probe_ids)
    with trio.move_on_after(timeout):
        try:
            async with open_framed_connection(path) as conn:
                await conn.send(request)
                while True:
                    reply = await conn.receive()
                    if reply.id == request.id:
                        return reply
        except (SentinelError, OSError):
            return None
    return None


async def ping(path: Path, timeout: float) -> bool:
    from sentinel_ipc.messages import Ping, Pong

    return isinstance(await raw_call(path, Ping(id=0), timeout), Pong)


# --- the corpus -------------------------------------------------------------------------


WORDS = ("download", "browser", "policy", "sentinel", "verdict", "archive", "report", "file",
         "scan", "quarterly", "invoice", "update", "release", "notes", "image", "table")


def make_corpus(directory: Path, rng: random.Random) -> list[CorpusFile]:
    """Small clean files (random bytes, text), two large ones, and EICAR in four forms."""
    directory.mkdir(parents=True, exist_ok=True)
    files: list[CorpusFile] = []

    def add(name: str, data: bytes, expect: str) -> None:
        path = directory / name
        path.write_bytes(data)
        files.append(CorpusFile(path, data, expect))

    for i in range(28):
        size = int(math.exp(rng.uniform(math.log(512), math.log(512 * 1024))))
        if i % 2:
            data = b"\x00\x01" + rng.randbytes(size)  # never an MZ/ELF header
        else:
            text = " ".join(rng.choice(WORDS) for _ in range(size // 7 + 1))
            data = text.encode()[:size]
        add(f"clean-{i:02d}.{'bin' if i % 2 else 'txt'}", data, "allow")
    for i in range(2):
        add(f"large-{i}.bin", b"\x00\x02" + rng.randbytes(3 * 1024 * 1024 + rng.randrange(4096)),
            "allow")
    add("eicar.com", EICAR, "block-unless-degraded")
    add("eicar-embedded.txt", b"notes " * 300 + EICAR + b" end" * 50, "block-unless-degraded")
    add("eicar-padded.bin", rng.randbytes(70_000) + EICAR + rng.randbytes(1000),
        "block-unless-degraded")
    add("eicar-allowed.com", EICAR + b"\n", "allow")  # an "always allow" policy covers it
    # A clean file with a block policy on its hash: blocked even when the scanner is down.
    add("known-bad.bin", b"\x00\x03" + rng.randbytes(9000), "block")
    return files


# --- the run ----------------------------------------------------------------------------


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_id = f"{args.seed}-{os.getpid()}-{int(time.time())}"
        self.samples: dict[str, str] = {}
        self.stats: dict[str, KindStats] = {
            k: KindStats() for k in ("scan", "write", "health", "control")
        }
        self.faults: list[FaultRecord] = []
        self.writes: dict[str, WriteRecord] = {}
        self.wrong: Counter[str] = Counter()
        self.leaks: list[str] = []
        self.notes: list[str] = []
        self.stop = trio.Event()
        self.resume = trio.Event()
        self.resume.set()
        self.in_flight: Counter[str] = Counter()
        self.write_ids = itertools.count(1)
        self.t0 = 0.0
        self.startup = 0.0
        self.baseline_health = "healthy"
        self.corpus: list[CorpusFile] = []
        self.tmpfs: Path | None = None
        self.tmpfs_reason = ""
        self.daemon: Daemon | None = None
        self.base = Path()
        self.rules_dir = Path()
        self.data_dir = Path()
        self.probe_file = Path()
        self.allowed_sha = ""
        self.known_bad_sha = ""

    # --- world -------------------------------------------------------------------------

    def build_world(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sentinel-chaos-"))
        drop_dac = os.geteuid() == 0 and shutil.which("setpriv") is not None
        for sub in ("run", "rules"):
            (self.base / sub).mkdir(mode=0o700)
        self.rules_dir = self.base / "rules"
        for rule in sorted(BUILTIN_RULES.glob("*.yar")):
            shutil.copy(rule, self.rules_dir / rule.name)
        self.data_dir = self.base / "data"
        self.data_dir.mkdir(mode=0o700)
        if os.geteuid() == 0 and shutil.which("mount"):
            opts = f"size={TMPFS_BYTES},mode=0700"
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs",
                                   str(self.data_dir)], capture_output=True, text=True)
            if done.returncode == 0:
                self.tmpfs = self.data_dir
            else:
                self.tmpfs_reason = f"mount -t tmpfs failed: {done.stderr.strip()}"
        else:
            self.tmpfs_reason = "mount -t tmpfs needs root"
        self.corpus = make_corpus(self.base / "corpus", self.rng)
        self.allowed_sha = sha256_of(self.file("eicar-allowed.com").data)
        self.known_bad_sha = sha256_of(self.file("known-bad.bin").data)
        config = CONFIG.format(
            rules_dir=self.rules_dir, workers=self.args.workers,
            min_free=4 * 1024 * 1024 if self.tmpfs else 1024**3 // 8,
        )
        self.daemon = Daemon(self.base, self.data_dir, drop_dac, config)

    def file(self, name: str) -> CorpusFile:
        return next(f for f in self.corpus if f.name == name)

    def teardown(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
        # Anything still running from our temp dir is ours (found by id, killed by id).
        for pid in processes_mentioning(str(self.base)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.tmpfs is not None:
            if self.args.keep:
                shutil.copytree(self.tmpfs, self.base / "data-copy", dirs_exist_ok=True)
            subprocess.run(["umount", str(self.tmpfs)], capture_output=True)
        if self.args.keep:
            print(f"kept {self.base}")
        else:
            shutil.rmtree(self.base, ignore_errors=True)

    @property
    def d(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- load ---------------------------------------------------------------------------

    def client_config(self) -> ClientConfig:
        """The SPEC's ipc retry policy and breaker, the breaker's open timeout cut to
        1 s like the daemon's (10 s would idle the load after each restart)."""
        return ClientConfig(
            client_name="chaos", timeout=CLIENT_TIMEOUT, scan_timeout=SCAN_TIMEOUT,
            breaker=dataclasses.replace(IPC_BREAKER, open_timeout=1.0),
        )

    async def gate(self) -> bool:
        """Wait while the load is paused; False when the run is over."""
        if not self.resume.is_set():
            await self.resume.wait()
        return not self.stop.is_set()

    async def timed(self, kind: str, call: Callable[[], Awaitable[Any]],
                    timeout: float) -> tuple[Any, SentinelError | None]:
        """Run one request, count its outcome; returns (reply, typed error)."""
        stats = self.stats[kind]
        stats.sent += 1
        self.in_flight[kind] += 1
        start = time.monotonic()
        try:
            with trio.move_on_after(timeout + WATCHDOG_GRACE):
                try:
                    reply = await call()
                except SentinelError as exc:
                    if client_side_timeout(exc):
                        stats.unanswered += 1
                        stats.untyped[f"no reply in {timeout:g}s"] += 1
                    else:
                        label = error_label(exc)
                        stats.typed[label] += 1
                        self.samples.setdefault(label, f"{kind}: {exc.message}"[:300])
                    return None, exc
                except Exception as exc:
                    stats.unanswered += 1
                    stats.untyped[type(exc).__name__] += 1
                    print(f"  untyped {kind} failure: {exc!r}", file=sys.stderr)
                    return None, None
                stats.ok += 1
                stats.latencies.append(time.monotonic() - start)
                return reply, None
            stats.unanswered += 1
            stats.untyped["hung"] += 1
            return None, None
        finally:
            self.in_flight[kind] -= 1

    def check_verdict(self, f: CorpusFile, r: ScanResult) -> None:
        scanner_down = "scanner" in r.degraded_reasons
        if f.expect == "allow":
            ok = r.action == "allow"
        elif f.expect == "block":
            ok = r.action == "block"
        else:
            ok = r.action == "block" or (scanner_down and r.action == "allow")
        if not ok:
            self.wrong[f"{f.name}: {r.action} (degraded={r.degraded_reasons})"] += 1

    async def scanner(self, index: int) -> None:
        rng = random.Random(self.rng.random())
        async with open_client(self.d.socket_path, config=self.client_config()) as client:

            async def one_loop() -> None:
                while await self.gate():
                    f = rng.choice(self.corpus)
                    method = "stream" if len(f.data) > 1024 * 1024 else rng.choice(
                        ("bytes", "bytes", "fd", "stream"))

                    async def call(f: CorpusFile = f, method: str = method) -> ScanResult:
                        if method == "bytes":
                            return await client.scan(f.data, filename=f.name)
                        if method == "stream":
                            return await client.scan_stream(f.path, filename=f.name)
                        fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                        try:
                            return await client.scan_fd(fd, filename=f.name)
                        finally:
                            os.close(fd)

                    reply, error = await self.timed("scan", call, SCAN_TIMEOUT)
                    if isinstance(reply, ScanResult):
                        self.check_verdict(f, reply)
                    elif error is not None and error.retryable:
                        await trio.sleep(min(error.retry_after or 0.05, 0.5))

            async with trio.open_nursery() as nursery:
                for _ in range(self.args.in_flight):
                    nursery.start_soon(one_loop)

    async def writer(self, index: int) -> None:
        async with open_client(self.d.socket_path, config=self.client_config()) as client:
            while await self.gate():
                key = f"chaos-{self.run_id}-{next(self.write_ids)}"
                record = WriteRecord(key=key, sha256=hashlib.sha256(key.encode()).hexdigest())
                self.writes[key] = record

                async def call(record: WriteRecord = record) -> Reply:
                    ticket = await client.queue_policy_add(
                        "block", sha256=record.sha256, reason=f"chaos write {record.key}",
                        idempotency_key=record.key,
                    )
                    return await ticket.wait()  # the outbox re-sends until it is answered

                reply, error = await self.timed("write", call, 60.0)
                if isinstance(reply, PolicyResult):
                    record.acked, record.queued, record.outcome = True, reply.queued, "acked"
                elif error is not None:
                    record.outcome = error.code
                await trio.sleep(0.05)

    async def health_poller(self) -> None:
        async with open_client(self.d.socket_path, config=self.client_config()) as client:
            while await self.gate():
                await self.timed("health", lambda: client.health(timeout=5.0), 5.0)
                await trio.sleep(0.2)

    async def run_load(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                       ) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.args.clients):
                nursery.start_soon(self.scanner, i)
            for i in range(self.args.writers):
                nursery.start_soon(self.writer, i)
            nursery.start_soon(self.health_poller)
            task_status.started()

    async def pause(self) -> None:
        """Hold the load and wait until no scan or health request is in flight
        (bounded). A write waiting in a client's outbox holds nothing in the daemon."""
        self.resume = trio.Event()
        with trio.move_on_after(SCAN_TIMEOUT + WATCHDOG_GRACE):
            while self.in_flight["scan"] or self.in_flight["health"]:  # noqa: ASYNC110
                await trio.sleep(0.02)
        await trio.sleep(0.3)  # let the daemon close what finished

    def unpause(self) -> None:
        self.resume.set()

    # --- recovery -----------------------------------------------------------------------

    async def is_normal(self) -> bool:
        """Normal operation: health as before the faults, EICAR blocked by a
        non-degraded scan, and the policy list served by the database."""
        path = self.d.socket_path
        health = await raw_call(path, Health(id=0), 2.0)
        if not isinstance(health, HealthReport) or health.status != self.baseline_health:
            return False
        scan = await raw_call(path, Scan(id=0, data=EICAR, filename="probe.com"), 5.0)
        if not isinstance(scan, ScanResult) or scan.degraded or scan.action != "block":
            return False
        listing = await raw_call(path, PolicyList(id=0), 5.0)
        return isinstance(listing, PolicyListResult) and not listing.degraded

    async def wait_normal(self, since: float, bound: float = RECOVERY_BOUND) -> float | None:
        """Seconds from ``since`` (monotonic) until the daemon is normal and stays so
        for ``STABLE`` s, or None past ``bound``. (A fault the daemon notices only a
        moment later, such as a corrupt file at the next verification, breaks the
        first streak; recovery counts from the start of the streak that held.)"""
        deadline = since + bound
        streak: float | None = None
        while time.monotonic() < deadline:
            ok = await self.is_normal()
            now = time.monotonic()
            if not ok:
                streak = None
            elif streak is None:
                streak = now
            elif now - streak >= STABLE:
                return max(0.0, streak - since)
            await trio.sleep(0.05)
        return None

    # --- faults -------------------------------------------------------------------------

    async def fault(self, name: str, inject: Callable[[FaultRecord], Awaitable[float | None]],
                    ) -> None:
        """Run one fault; ``inject`` returns the monotonic time recovery counts from
        (None: skipped, with the reason in the record)."""
        record = FaultRecord(name=name, at=self.now())
        self.faults.append(record)
        print(f"[{record.at:6.1f}s] fault {name}", flush=True)
        audit_from = self.audit_size()
        mono0, wall0 = time.monotonic(), time.time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.observe, record, mono0)
            since = await inject(record)
            if since is not None and record.recovery is None:
                record.recovery = await self.wait_normal(since)
            nursery.cancel_scope.cancel()
        # The daemon's own account: it may notice and repair a fault between two
        # looks from outside (a corrupt file is rebuilt in milliseconds).
        events = self.audit_events(audit_from)
        record.audit = Counter(kind for _, kind in events)
        if events:
            first = events[0][0] - wall0
            record.detected = first if record.detected is None else min(record.detected, first)
        recovered = [ts for ts, kind in events if kind == "recovered"]
        if since is not None and record.recovery is not None and recovered:
            record.recovery = max(record.recovery, mono0 + (recovered[-1] - wall0) - since)
        if since is None:
            print(f"          skipped: {record.skipped}", flush=True)
            return
        shown = "NOT RECOVERED" if record.recovery is None else f"{record.recovery:.2f}s"
        seen = "-" if record.detected is None else f"{record.detected:.2f}s"
        print(f"          detected {seen}, recovered in {shown} {record.note}", flush=True)

    async def observe(self, record: FaultRecord, start: float) -> None:
        """Watch health from outside while the fault lasts."""
        while True:
            health = await raw_call(self.d.socket_path, Health(id=0), 1.0)
            status = health.status if isinstance(health, HealthReport) else "no answer"
            if status != self.baseline_health:
                if record.detected is None:
                    record.detected = time.monotonic() - start
                if isinstance(health, HealthReport):
                    record.seen.update(name for name, c in health.components.items()
                                       if c.status != "healthy")
                else:
                    record.seen.add("no answer")
            await trio.sleep(0.05)

    def audit_path(self) -> Path:
        return self.data_dir / "audit.jsonl"

    def audit_size(self) -> int:
        try:
            return self.audit_path().stat().st_size
        except OSError:
            return 0

    def audit_events(self, offset: int) -> list[tuple[float, str]]:
        """(wall time, kind) of the audit events written since ``offset``, routine
        kinds left out."""
        events: list[tuple[float, str]] = []
        try:
            with open(self.audit_path(), "rb") as fh:
                fh.seek(offset)
                lines = fh.read().splitlines()
        except OSError:
            return events
        for line in lines:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                entry = json.loads(line)
                if entry["kind"] not in ROUTINE_AUDIT:
                    events.append((float(entry["ts"]), str(entry["kind"])))
        return events

    async def hold(self) -> float:
        held = float(self.args.hold)
        await trio.sleep(held)
        return held

    async def f_worker_kill(self, r: FaultRecord) -> float | None:
        workers = self.d.workers()
        if not workers:
            r.skipped = "no worker to kill"
            return None
        victim = self.rng.choice(workers)
        victim.kill()
        r.note = f"(pid {victim.pid})"
        return time.monotonic()

    async def f_workers_kill(self, r: FaultRecord) -> float | None:
        """A crash loop: every worker killed as soon as it appears, for ``hold`` s."""
        killed = set()
        until = time.monotonic() + max(self.args.hold, 1.5)
        while time.monotonic() < until:
            for w in self.d.workers():
                with contextlib.suppress(psutil.Error):
                    w.kill()
                    killed.add(w.pid)
            await trio.sleep(0.05)
        r.held = max(self.args.hold, 1.5)
        r.note = f"({len(killed)} workers killed)"
        return time.monotonic()

    async def f_client_drops(self, r: FaultRecord) -> float | None:
        kinds = ("header", "body", "stream", "fd", "no-read", "reset")
        done: Counter[str] = Counter()
        for i in range(24):
            kind = kinds[i % len(kinds)]
            with contextlib.suppress(OSError, trio.TooSlowError), trio.fail_after(2.0):
                await drop_connection(self.d.socket_path, kind, self.corpus[i % 8])
                done[kind] += 1
        r.note = f"({sum(done.values())} drops: " + ", ".join(f"{k} {v}" for k, v in
                                                               sorted(done.items())) + ")"
        return time.monotonic()

    async def f_db_locked(self, r: FaultRecord) -> float | None:
        db = self.data_dir / "policy_graph.db"
        code = (
            "import sqlite3,sys,time\n"
            "c=sqlite3.connect(sys.argv[1],timeout=10,isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('locked',flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n"
            "c.execute('COMMIT');c.close()\n"
        )
        hold = max(self.args.hold, 2.0)  # longer than the database retry policy
        cmd = [sys.executable, "-c", code, str(db), str(hold)]
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        )
        if "locked" not in proc.stdout:
            r.skipped = f"could not take the lock: {proc.stderr.strip()[-200:]}"
            return None
        r.held = hold
        return time.monotonic()

    async def f_db_unreadable(self, r: FaultRecord) -> float | None:
        if not self.d.file_modes_apply:
            r.skipped = "no setpriv: the daemon runs as root with DAC override (ignores modes)"
            return None
        db = self.data_dir / "policy_graph.db"
        os.chmod(db, 0)
        try:
            r.held = await self.hold()
        finally:
            os.chmod(db, 0o600)
        return time.monotonic()

    async def f_db_corrupt(self, r: FaultRecord) -> float | None:
        """Random bytes over the database file, in place (the same inode), as a
        failing disk would leave it. First the WAL is checkpointed into the file
        and truncated (by another connection, as a backup tool would): a reader
        takes a page from the WAL when it has one, so garbage under pages the
        WAL still holds could go unseen."""
        db = self.data_dir / "policy_graph.db"
        written, busy = await trio.to_thread.run_sync(corrupt_in_place, db, self.rng)
        r.note = f"({written} random bytes{', checkpoint busy' if busy else ''})"
        return time.monotonic()

    async def f_db_deleted(self, r: FaultRecord) -> float | None:
        removed = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / f"policy_graph.db{suffix}").unlink()
                removed += 1
        r.note = f"({removed} files)"
        return time.monotonic()

    async def f_rules_broken(self, r: FaultRecord) -> float | None:
        bad = self.rules_dir / "zz-broken.yar"
        bad.write_text("rule Broken_By_Chaos {\n  strings: $a = \"x\"\n  condition: $a and\n}\n")
        try:
            await self.timed("control", lambda: self.reload_expecting_error(), 60.0)
            await self.hold()
        finally:
            bad.unlink()
        fixed = time.monotonic()
        await self.timed("control", lambda: self.reload_expecting_ok(), 60.0)
        r.note = "(bad reload refused with rules_invalid, fixed reload ok)"
        return fixed

    async def reload_expecting_error(self) -> Reply:
        reply = await raw_call(self.d.socket_path, Reload(id=0), 60.0)
        if isinstance(reply, Error):
            if reply.code != "rules_invalid":
                self.wrong[f"bad reload answered {reply.code}"] += 1
            raise error_from_reply(reply)  # counted as a typed error
        if reply is None:
            raise RequestTimeoutError("no reply from the daemon to reload", retryable=False)
        self.wrong["reload of a broken rule set succeeded"] += 1
        return reply

    async def reload_expecting_ok(self) -> Reply:
        reply = await raw_call(self.d.socket_path, Reload(id=0), 60.0)
        if reply is None:
            raise RequestTimeoutError("no reply from the daemon to reload", retryable=False)
        if not isinstance(reply, ReloadResult):
            self.wrong[f"fixed reload answered {reply}"] += 1
        return reply

    async def f_disk_full(self, r: FaultRecord) -> float | None:
        if self.tmpfs is None:
            r.skipped = self.tmpfs_reason or "no tmpfs data dir"
            return None
        filler = self.data_dir / "chaos-filler"
        filled = await trio.to_thread.run_sync(fill_disk, filler)
        try:
            r.held = await self.hold()
        finally:
            filler.unlink()
        r.note = f"({filled // 1024} KiB filler, 0 bytes free)"
        return time.monotonic()

    async def f_daemon_kill(self, r: FaultRecord) -> float | None:
        await self.pause()
        await self.measure_end()
        self.unpause()
        await trio.sleep(0.5)  # requests in flight when it dies
        old = self.d.pid
        old_workers = [w.pid for w in self.d.workers()]
        killed_at = time.monotonic()
        self.d.kill()
        # Workers must notice their daemon is gone and exit on their own.
        with trio.move_on_after(5.0):
            while any(psutil.pid_exists(p) and not zombie(p) for p in old_workers):  # noqa: ASYNC110
                await trio.sleep(0.05)
        orphans = [p for p in old_workers if psutil.pid_exists(p) and not zombie(p)]
        self.d.incarnations[-1].orphans = orphans
        if orphans:
            self.leaks.append(f"workers {orphans} of killed daemon {old} still alive after 5 s")
        startup = await self.d.start()
        r.recovery = await self.wait_normal(killed_at)
        await self.pause()
        self.measure_start()
        self.unpause()
        r.note = f"(pid {old} -> {self.d.pid}, restart {startup:.2f}s, orphans {len(orphans)})"
        return killed_at

    def measure_start(self) -> None:
        self.d.incarnations[-1].start = self.d.profile()

    async def measure_end(self) -> None:
        """The end profile, looked at a few times while quiet: a descriptor that
        lives for a moment (a verification's connection, a snapshot being
        written, a worker being replaced) is not a leak; a leaked one stays."""
        inc = self.d.incarnations[-1]
        best = self.d.profile()
        for _ in range(5):
            if inc.start is None or best.own <= inc.start.own:
                break
            await trio.sleep(0.2)
            look = self.d.profile()
            if look.own < best.own:
                best = look
        inc.end = best

    # --- the whole run ------------------------------------------------------------------

    def schedule(self) -> list[tuple[str, Callable[[FaultRecord], Awaitable[float | None]]]]:
        every = self.all_faults()
        if not self.args.faults:
            return every
        by_name = dict(every)
        return [(name, by_name[name]) for name in self.args.faults]

    def all_faults(self) -> list[tuple[str, Callable[[FaultRecord], Awaitable[float | None]]]]:
        return [
            ("worker_kill", self.f_worker_kill),
            ("client_drops", self.f_client_drops),
            ("db_locked", self.f_db_locked),
            ("daemon_kill", self.f_daemon_kill),
            ("db_unreadable", self.f_db_unreadable),
            ("rules_broken", self.f_rules_broken),
            ("db_corrupt", self.f_db_corrupt),
            ("workers_kill", self.f_workers_kill),
            ("db_deleted", self.f_db_deleted),
            ("disk_full", self.f_disk_full),
        ]

    async def main(self) -> int:
        self.build_world()
        try:
            return await self.run()
        finally:
            self.teardown()

    async def run(self) -> int:
        d = self.d
        print(f"chaos: base {self.base}, file modes bind the daemon: {d.file_modes_apply}, "
              f"data dir "
              f"{'tmpfs ' + str(TMPFS_BYTES // 2**20) + ' MiB' if self.tmpfs else 'plain dir'}",
              flush=True)
        startup = self.startup = await d.start()
        self.t0 = time.monotonic()
        print(f"sentineld pid {d.pid} ready in {startup:.2f}s", flush=True)
        await self.seed_policies()
        settle = await self.wait_normal(time.monotonic())
        if settle is None:
            raise RuntimeError("the daemon never reached normal operation before the faults")
        health = await raw_call(d.socket_path, Health(id=0))
        assert isinstance(health, HealthReport)
        self.baseline_health = health.status
        self.measure_start()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run_load)
            await trio.sleep(1.0)
            schedule = self.schedule()
            for n, (name, inject) in enumerate(itertools.cycle(schedule)):
                # The first round always runs in full; more start while time remains.
                if n >= len(schedule) and self.now() >= self.args.duration:
                    break
                await self.fault(name, inject)
                await trio.sleep(0.5)
            print(f"[{self.now():6.1f}s] stopping the load", flush=True)
            self.stop.set()
        await self.finish()
        return self.report()

    async def seed_policies(self) -> None:
        path = self.d.socket_path
        seeds: list[tuple[str, Action]] = [(self.allowed_sha, "allow"),
                                           (self.known_bad_sha, "block")]
        for sha, action in seeds:
            reply = await raw_call(path, PolicyAdd(id=0, action=action, sha256=sha,
                                                   reason="chaos seed"), 10.0)
            if not isinstance(reply, PolicyResult):
                raise RuntimeError(f"seeding policy failed: {reply}")

    async def finish(self) -> None:
        """After the load: recover, verify writes, leaks, and stop the daemon."""
        path = self.d.socket_path
        await raw_call(path, ServiceRetry(id=0, service="database"), 5.0)
        if await self.wait_normal(time.monotonic()) is None:
            self.notes.append("the daemon was not back to normal after the load")
        listing = await raw_call(path, PolicyList(id=0), 10.0)
        counts: Counter[str] = Counter()
        if isinstance(listing, PolicyListResult):
            counts.update(p.file_hash for p in listing.policies if p.file_hash)
            if listing.degraded:
                self.notes.append("final policy list came from the snapshot (degraded)")
        else:
            self.notes.append(f"final policy list failed: {listing}")
        self.lost = [w.key for w in self.writes.values() if w.acked and counts[w.sha256] == 0]
        self.duplicates = [w.key for w in self.writes.values() if counts[w.sha256] > 1]
        self.unacked_present = sum(
            1 for w in self.writes.values() if not w.acked and counts[w.sha256] == 1)
        await trio.sleep(0.5)  # the load's connections close
        await self.measure_end()
        self.check_fd_leaks()
        workers = [w.pid for w in self.d.workers()]
        self.exit_code = await self.d.stop()
        with trio.move_on_after(5.0):
            while processes_mentioning(str(self.base)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        left = processes_mentioning(str(self.base))
        if left:
            self.leaks.append(f"processes still alive after the daemon stopped: {left}")
        if self.exit_code != 0:
            self.notes.append(f"sentineld exited {self.exit_code} on SIGTERM")
        self.final_workers = workers

    def check_fd_leaks(self) -> None:
        for inc in self.d.incarnations:
            if inc.start is None or inc.end is None:
                continue
            if inc.end.own > inc.start.own:
                more = inc.end.targets - inc.start.targets
                self.leaks.append(
                    f"daemon {inc.pid}: {inc.end.own - inc.start.own} descriptors more "
                    f"({inc.start.own} -> {inc.end.own}, not counting client sockets, "
                    f"pooled memfds and SQLite's parked one; new: {dict(more)})")
            if inc.end.workers != inc.start.workers:
                self.leaks.append(f"daemon {inc.pid}: {inc.start.workers} -> "
                                  f"{inc.end.workers} worker processes")
            if inc.end.zombies:
                self.leaks.append(f"daemon {inc.pid}: {inc.end.zombies} zombie children")
            bound = self.args.clients * self.args.in_flight + 8
            if inc.end.memfds > bound:
                self.leaks.append(f"daemon {inc.pid}: {inc.end.memfds} memfds (bound {bound})")

    # --- the report ---------------------------------------------------------------------

    def report(self) -> int:
        faults = [f for f in self.faults if f.skipped is None]
        print()
        print("| fault | at (s) | held (s) | detected (s) | recovery (s) | health showed "
              "| audit | detail |")
        print("|---|---:|---:|---:|---:|---|---|---|")
        for f in self.faults:
            if f.skipped is not None:
                print(f"| {f.name} | {f.at:.1f} | - | - | skipped | | | {f.skipped} |")
                continue
            rec = "NOT RECOVERED" if f.recovery is None else f"{f.recovery:.2f}"
            det = "-" if f.detected is None else f"{f.detected:.2f}"
            audit = ", ".join(f"{k} {v}" if v > 1 else k for k, v in sorted(f.audit.items()))
            print(f"| {f.name} | {f.at:.1f} | {f.held:.1f} | {det} | {rec} | "
                  f"{', '.join(sorted(f.seen))} | {audit} | {f.note} |")
        print()
        print("| requests | sent | answered (verdict / reply) | typed error | unanswered "
              "| p50 / p99 (ms) |")
        print("|---|---:|---:|---:|---:|---:|")
        total = KindStats()
        for kind, s in self.stats.items():
            print(f"| {kind} | {s.sent} | {s.ok} | {s.typed_total} | {s.unanswered} | "
                  f"{pct(s.latencies, 50)} / {pct(s.latencies, 99)} |")
            total.sent += s.sent
            total.ok += s.ok
            total.typed.update(s.typed)
            total.unanswered += s.unanswered
            total.untyped.update(s.untyped)
        print(f"| **all** | {total.sent} | {total.ok} | {total.typed_total} | "
              f"{total.unanswered} | |")
        if total.typed:
            print("\ntyped errors: " + ", ".join(f"{k} {v}" for k, v in total.typed.most_common()))
            for label, sample in sorted(self.samples.items()):
                print(f"  e.g. {label}: {sample}")
        if total.untyped:
            print("UNANSWERED: " + ", ".join(f"{k} {v}" for k, v in total.untyped.most_common()))
        acked = sum(1 for w in self.writes.values() if w.acked)
        queued = sum(1 for w in self.writes.values() if w.acked and w.queued)
        print()
        print("| integrity | value |")
        print("|---|---:|")
        print(f"| writes acknowledged (of which queued in the journal) | {acked} ({queued}) |")
        print(f"| acknowledged writes lost | {len(self.lost)} |")
        print(f"| duplicate writes | {len(self.duplicates)} |")
        print(f"| wrong verdicts | {sum(self.wrong.values())} |")
        print(f"| leaked processes or fds | {len(self.leaks)} |")
        for inc in self.d.incarnations:
            first, last = inc.start, inc.end
            if first and last:
                print(f"| daemon {inc.pid}: own fds start/end, workers, memfds | "
                      f"{first.own}/{last.own}, {first.workers}/{last.workers}, {last.memfds} |")
        print(f"| sentineld exit code on SIGTERM | {self.exit_code} |")
        for what, items in (("lost", self.lost), ("duplicate", self.duplicates)):
            for key in items[:10]:
                print(f"{what}: {key} ({self.writes[key].outcome})")
        for line in self.leaks:
            print(f"LEAK: {line}")
        for wrong, n in self.wrong.items():
            print(f"WRONG VERDICT x{n}: {wrong}")
        for note in self.notes:
            print(f"note: {note}")
        unrecovered = [f.name for f in faults if f.recovery is None]
        if unrecovered:
            print(f"NOT RECOVERED within {RECOVERY_BOUND:g} s: {', '.join(unrecovered)}")
        print(f"chaos: faults={len(faults)} requests={total.sent} unanswered={total.unanswered} "
              f"lost={len(self.lost)} duplicates={len(self.duplicates)} leaked={len(self.leaks)}")
        bad = (total.unanswered or self.lost or self.duplicates or self.leaks or self.wrong
               or unrecovered)
        if self.args.json:
            self.args.json.write_text(json.dumps({
                "faults": [{"name": f.name, "at": f.at, "held": f.held, "detected": f.detected,
                            "recovery": f.recovery, "seen": sorted(f.seen),
                            "audit": dict(f.audit), "note": f.note, "skipped": f.skipped}
                           for f in self.faults],
                "requests": total.sent, "unanswered": total.unanswered, "lost": len(self.lost),
                "duplicates": len(self.duplicates), "leaked": len(self.leaks),
                "wrong": sum(self.wrong.values()), "startup_s": self.startup,
            }, indent=2))
        return 1 if bad else 0


# --- fault helpers ----------------------------------------------------------------------


def zombie(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return True


def corrupt_in_place(db: Path, rng: random.Random) -> tuple[int, bool]:
    """Checkpoint (TRUNCATE) the WAL, then overwrite ``db`` with random bytes."""
    conn = sqlite3.connect(str(db), timeout=5.0)
    busy = True
    try:
        for _ in range(40):
            busy = bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])
            if not busy:
                break
            time.sleep(0.025)
    finally:
        conn.close()
    with open(db, "r+b") as fh:
        size = max(os.fstat(fh.fileno()).st_size, 8192)
        fh.write(rng.randbytes(size))
        fh.flush()
        os.fsync(fh.fileno())
    return size, busy


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fill_disk(path: Path) -> int:
    """Write ``path`` until the file system has no byte left; returns bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    written = 0
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


async def drop_connection(path: Path, kind: str, sample: CorpusFile) -> None:
    """Connect and hang up at an awkward moment."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(str(path))
        frame = encode_framed(Scan(id=1, data=sample.data, filename=sample.name))
        if kind == "header":
            await sock.send(frame[:2])
        elif kind == "body":
            await sock.send(frame[: max(5, len(frame) // 2)])
        elif kind == "stream":
            await sock.send(encode_framed(ScanBegin(id=2, filename=sample.name)))
            await sock.send(encode_framed(ScanChunk(id=2, data=sample.data[:4096])))
            await trio.sleep(0.02)
        elif kind == "fd":
            fd = os.open(sample.path, os.O_RDONLY)
            try:
                payload = encode_framed(ScanFd(id=3, filename=sample.name))
                await sock.sendmsg([payload[: len(payload) - 3]],
                                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     fd.to_bytes(4, sys.byteorder, signed=True))])
            finally:
                os.close(fd)
        elif kind == "no-read":
            await sock.send(frame)  # a whole request, and gone before its reply
        elif kind == "reset":
            await sock.send(frame[: len(frame) // 3])
            # SO_LINGER on, 0 s: close() sends a reset instead of a FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def pct(values: list[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return f"{ordered[index] * 1000:.1f}"


def raise_fd_limit(want: int = 8192) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds during which faults are started (default 120)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--clients", type=int, default=4, help="scanning connections")
    parser.add_argument("--in-flight", type=int, default=2, help="scans in flight per client")
    parser.add_argument("--writers", type=int, default=2, help="policy-writing connections")
    parser.add_argument("--workers", type=int, default=2, help="the daemon's scan workers")
    parser.add_argument("--hold", type=float, default=None,
                        help="seconds each lasting fault is held (default: from --duration)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    parser.add_argument("--json", type=Path, help="also write the results here (tools/bench.py)")
    parser.add_argument("--faults", type=lambda text: text.split(","), default=None,
                        help=f"comma-separated subset, in order (of: {', '.join(FAULTS)})")
    args = parser.parse_args(argv)
    unknown = set(args.faults or ()) - set(FAULTS)
    if unknown:
        parser.error(f"unknown faults: {', '.join(sorted(unknown))}")
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.hold is None:
        args.hold = min(5.0, max(1.0, args.duration / 60))
    print(f"chaos: seed {args.seed}, duration {args.duration:g}s, hold {args.hold:g}s", flush=True)
    raise_fd_limit()
    return trio.run(Chaos(args).main)


if __name__ == "__main__":
    sys.exit(main())
