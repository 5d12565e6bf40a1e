"""Issue 4 end to end: scanning through a real ``sentineld`` and its real worker processes.

Every test talks the wire protocol to a daemon started as a subprocess
(``daemon_factory``) and makes real faults: workers are SIGKILLed while they
scan (found as the daemon's child processes holding a scan buffer), a rule
that is slow on crafted input runs past a small ``scan_timeout``, rule files
are broken on disk before a ``reload`` or a SIGHUP, a worker is SIGSTOPped to
hold a scan in flight across a reload. Every daemon is stopped at the end and
must leave no process behind.

Timing: workers = 1 or 2, inputs of a few hundred KiB; the slow rule burns
about one second per 160 KB on an idle core, so the tests that need a scan in
progress give it a second or more and never wait on the exact figure.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psutil
import pytest
import trio
from daemon_harness import DaemonProcess
from samples import EICAR, EICAR_SHA256, slow_rule

from sentinel_ipc.messages import (
    Breakers,
    BreakersReport,
    Error,
    Health,
    HealthReport,
    Ping,
    PolicyAdd,
    PolicyResult,
    Pong,
    Reload,
    ReloadResult,
    Reply,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ScanFd,
    ScanResult,
)
from sentinel_ipc.scanning import BUILTIN_RULES_DIR
from sentinel_ipc.transport import FramedConnection, open_framed_connection

CLEAN = b"An ordinary download: nothing to see here.\n" * 200
MIB = 1024 * 1024

SLOW_RULE = slow_rule("high")  # a match blocks
EXTERNALS_RULE = """
rule Sentinel_Test_Extension : external
{
    meta:
        description = "test only: the request's file extension"
        severity = "high"
    condition:
        extension == ".sentinel-test"
}

rule Sentinel_Test_Filename
{
    meta:
        description = "test only: the request's base name"
        severity = "medium"
    condition:
        filename == "dropper.bin"
}
"""
GOOD_V2 = """
rule Sentinel_Test_Marker_V2
{
    meta:
        description = "test only: appears with the second rule set"
        severity = "low"
    strings:
        $m = "SENTINEL-MARKER-V2"
    condition:
        $m
}
"""
#: A syntax error on line 4 (the condition has no expression).
BROKEN_RULE = """rule Sentinel_Test_Broken
{
    condition:
        and
}
"""
FAST_RETRY = {"yara": {"attempts": 2, "initial": 0.05, "max_delay": 0.1, "multiplier": 2.0}}


def slow_input(seconds: float) -> bytes:
    """Input the slow rule chews on for about ``seconds`` on an idle core."""
    return b"SLOW" + b"A" * int(seconds * 160_000)


# --- helpers -------------------------------------------------------------------------------


class Peer:
    """One raw protocol connection; replies are collected by id (they may come
    back out of order)."""

    def __init__(self, conn: FramedConnection) -> None:
        self.conn = conn
        self.replies: dict[int, list[Reply]] = {}

    async def send(self, msg: msgspec.Struct, fds: Sequence[int] = ()) -> None:
        await self.conn.send(msg, fds)

    async def reply(self, request_id: int, timeout: float = 30.0) -> Reply:
        with trio.fail_after(timeout):
            while not self.replies.get(request_id):
                got = await self.conn.receive()
                self.replies.setdefault(got.id, []).append(got)
        return self.replies[request_id].pop(0)

    async def call(self, msg: Any, fds: Sequence[int] = (), timeout: float = 30.0) -> Reply:
        await self.send(msg, fds)
        return await self.reply(msg.id, timeout)

    async def scan(self, request_id: int, data: bytes, **meta: Any) -> ScanResult:
        reply = await self.call(Scan(id=request_id, data=data, **meta))
        assert isinstance(reply, ScanResult), reply
        return reply


@contextlib.asynccontextmanager
async def connect(d: DaemonProcess) -> AsyncIterator[Peer]:
    async with open_framed_connection(d.socket_path) as conn:
        yield Peer(conn)


def rules_dir(root: Path, *files: tuple[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files:
        (root / name).write_text(text)
    return root


def with_eicar(root: Path, *files: tuple[str, str]) -> Path:
    """A rules directory holding the built-in EICAR rules beside ``files``."""
    return rules_dir(root, ("eicar.yar", (BUILTIN_RULES_DIR / "eicar.yar").read_text()), *files)


def workers_of(d: DaemonProcess) -> list[psutil.Process]:
    """The daemon's scan worker processes (live children running worker.py)."""
    found = []
    for child in psutil.Process(d.pid).children():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE and any(
                arg.endswith("worker.py") for arg in child.cmdline()
            ):
                found.append(child)
    return found


def holds_scan_buffer(proc: psutil.Process, min_bytes: int = 4096) -> bool:
    """A worker is mid-job exactly while it holds the job's memfd. Small ones are
    skipped: the health check's self-test (a few hundred bytes) is not our scan."""
    fd_dir = f"/proc/{proc.pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if (os.readlink(f"{fd_dir}/{name}").startswith("/memfd:sentinel-scan")
                    and os.stat(f"{fd_dir}/{name}").st_size >= min_bytes):
                return True
    return False


async def wait_busy_worker(d: DaemonProcess, timeout: float = 10.0) -> psutil.Process:
    """The worker scanning one of our (large) inputs, as soon as one is."""
    with trio.fail_after(timeout):
        while True:
            for proc in workers_of(d):
                if holds_scan_buffer(proc):
                    return proc
            await trio.sleep(0.005)


async def wait_workers(d: DaemonProcess, count: int, *, without: Sequence[int] = (),
                       timeout: float = 15.0) -> list[int]:
    """Pids of ``count`` live workers, none in ``without``, once that many are up."""
    with trio.fail_after(timeout):
        while True:
            pids = sorted(p.pid for p in workers_of(d) if p.pid not in without)
            if len(pids) >= count:
                return pids
            await trio.sleep(0.02)


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - state of another process
            await trio.sleep(0.02)


async def trio_first(*waits: Awaitable[Reply]) -> Reply:
    """The reply of whichever wait finishes first; the others are cancelled."""
    send, receive = trio.open_memory_channel[Reply](len(waits))
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def one(w: Awaitable[Reply] = wait) -> None:
                send.send_nowait(await w)

            nursery.start_soon(one)
        first = await receive.receive()
        nursery.cancel_scope.cancel()
    return first


def descendants(d: DaemonProcess) -> list[psutil.Process]:
    try:
        return psutil.Process(d.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_gone(procs: Sequence[psutil.Process], timeout: float = 5.0) -> None:
    """Every process in ``procs`` has exited (not just been orphaned)."""
    deadline = time.monotonic() + timeout
    left = list(procs)
    while left and time.monotonic() < deadline:
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.02)
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def stop_cleanly(d: DaemonProcess) -> None:
    """SIGTERM; exit 0, and no worker (nor any other child) outlives the daemon."""
    children = descendants(d)
    assert d.stop() == 0
    assert_gone(children)


def no_zombies(d: DaemonProcess) -> None:
    """Dead workers are reaped by the daemon, not left as zombies."""
    deadline = time.monotonic() + 5.0
    while True:
        zombies = [c.pid for c in psutil.Process(d.pid).children()
                   if c.status() == psutil.STATUS_ZOMBIE]
        if not zombies or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not zombies, f"unreaped children: {zombies}"


def log_events(d: DaemonProcess, event: str) -> list[str]:
    return [line for line in d.log().splitlines() if f"event={event} " in line + " "]


def assert_eicar(result: ScanResult, request_id: int) -> None:
    assert result.id == request_id
    assert result.action == "block", result
    assert [m.rule for m in result.matches] == ["EICAR_Test_File"], result.matches
    match = result.matches[0]
    assert match.namespace == "eicar"
    assert match.tags == []
    assert match.meta["severity"] == "high"
    assert "EICAR" in match.meta["description"]
    assert result.sha256 == EICAR_SHA256
    assert result.size == len(EICAR)
    assert re.fullmatch(r"[0-9a-f]{12,64}", result.rules_version), result.rules_version
    assert 0 < result.scan_ms < 30_000
    assert not result.degraded and result.warnings == [], result


# --- one daemon on the built-in rules for the requests that leave it as they found it -----


@pytest.fixture(scope="module")
def plain_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        tmp_path_factory.mktemp("scan-plain"),
        {"scanner": {"workers": 1, "max_stream_bytes": 64 * 1024}},
    )
    d.start()
    try:
        yield d
        no_zombies(d)
        stop_cleanly(d)
    finally:
        d.kill()


async def test_eicar_is_detected_through_each_scan_message(
    plain_daemon: DaemonProcess, tmp_path: Path
) -> None:
    async with connect(plain_daemon) as peer:
        assert_eicar(await peer.scan(1, EICAR, filename="eicar.com"), 1)

        await peer.send(ScanBegin(id=2, filename="eicar.com", size=len(EICAR)))
        for i in range(0, len(EICAR), 20):  # four chunks
            await peer.send(ScanChunk(id=2, data=EICAR[i : i + 20]))
        streamed = await peer.call(ScanEnd(id=2))
        assert isinstance(streamed, ScanResult), streamed
        assert_eicar(streamed, 2)

        # scan_fd: a regular file on disk, passed with SCM_RIGHTS; the daemon never
        # sees its path (the name below is metadata only).
        path = tmp_path / "download.part"
        path.write_bytes(EICAR)
        fd = os.open(path, os.O_RDONLY)
        try:
            by_fd = await peer.call(ScanFd(id=3, filename="eicar.com"), [fd])
        finally:
            os.close(fd)
        assert isinstance(by_fd, ScanResult), by_fd
        assert_eicar(by_fd, 3)

        # Same rules, same version, in every verdict and in health.
        health = await peer.call(Health(id=4))
        assert isinstance(health, HealthReport)
        assert health.rules_version == streamed.rules_version == by_fd.rules_version


async def test_a_clean_file_is_allowed_through_each_scan_message(
    plain_daemon: DaemonProcess, tmp_path: Path
) -> None:
    digest = hashlib.sha256(CLEAN).hexdigest()
    async with connect(plain_daemon) as peer:
        results: list[Reply] = [await peer.scan(10, CLEAN, filename="readme.txt")]
        await peer.send(ScanBegin(id=11, filename="readme.txt"))
        await peer.send(ScanChunk(id=11, data=CLEAN[:1000]))
        await peer.send(ScanChunk(id=11, data=CLEAN[1000:]))
        results.append(await peer.call(ScanEnd(id=11)))
        path = tmp_path / "readme.txt"
        path.write_bytes(CLEAN)
        fd = os.open(path, os.O_RDONLY)
        try:
            results.append(await peer.call(ScanFd(id=12), [fd]))
        finally:
            os.close(fd)
    for result in results:
        assert isinstance(result, ScanResult), result
        assert (result.action, result.matches, result.degraded) == ("allow", [], False), result
        assert (result.sha256, result.size) == (digest, len(CLEAN))
        assert result.warnings == []


async def test_an_oversize_stream_is_refused_at_once_and_dropped(
    plain_daemon: DaemonProcess,
) -> None:
    limit = 64 * 1024
    async with connect(plain_daemon) as peer:
        await peer.send(ScanBegin(id=20, filename="big.iso"))
        await peer.send(ScanChunk(id=20, data=b"x" * (limit - 10)))
        await peer.send(ScanChunk(id=20, data=b"x" * 11))  # one byte over
        # The error comes before any scan_end: the client can stop sending.
        refused = await peer.reply(20, timeout=10)
        assert isinstance(refused, Error) and refused.code == "too_large", refused
        assert not refused.retryable
        # The stream is gone: later chunks and the end are for an unknown stream.
        await peer.send(ScanChunk(id=20, data=b"more"))
        late = await peer.reply(20, timeout=10)
        assert isinstance(late, Error) and late.code == "not_found", late
        end = await peer.call(ScanEnd(id=20))
        assert isinstance(end, Error) and end.code == "not_found", end

        # A declared size over the limit is refused at scan_begin.
        declared = await peer.call(ScanBegin(id=21, size=limit + 1))
        assert isinstance(declared, Error) and declared.code == "too_large", declared
        # ... and bytes in one frame over the limit likewise.
        whole = await peer.call(Scan(id=22, data=b"y" * (limit + 1)))
        assert isinstance(whole, Error) and whole.code == "too_large", whole

        # The id is free again, and a stream under the limit still scans.
        await peer.send(ScanBegin(id=20))
        await peer.send(ScanChunk(id=20, data=EICAR))
        again = await peer.call(ScanEnd(id=20))
        assert isinstance(again, ScanResult) and again.action == "block", again


async def test_a_negative_stream_size_is_an_invalid_message(plain_daemon: DaemonProcess) -> None:
    async with connect(plain_daemon) as peer:
        refused = await peer.call(ScanBegin(id=23, filename="x.bin", size=-1))
        assert isinstance(refused, Error), refused
        assert (refused.id, refused.code, refused.retryable) == (23, "invalid_message", False)
        assert "scan_begin.size must not be negative, got -1" in refused.message
        # No stream was opened, and the connection is fine.
        late = await peer.call(ScanEnd(id=23))
        assert isinstance(late, Error) and late.code == "not_found", late
        assert_eicar(await peer.scan(24, EICAR), 24)


async def test_scan_fd_without_a_usable_descriptor_is_bad_fd(
    plain_daemon: DaemonProcess, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        async with connect(plain_daemon) as peer:
            cases: list[tuple[str, list[int]]] = [
                ("none", []), ("pipe", [read_end]), ("directory", [directory])
            ]
            for n, (kind, fds) in enumerate(cases):
                reply = await peer.call(ScanFd(id=30 + n, filename="x.exe"), fds)
                assert isinstance(reply, Error), (kind, reply)
                assert (reply.id, reply.code, reply.retryable) == (30 + n, "bad_fd", False)
                if kind != "none":
                    assert kind in reply.message, reply.message
            # The connection and the daemon are fine afterwards.
            assert_eicar(await peer.scan(40, EICAR), 40)
    finally:
        for fd in (read_end, write_end, directory):
            os.close(fd)


async def test_scan_fd_with_a_size_scans_and_hashes_only_that_many_bytes(
    plain_daemon: DaemonProcess,
) -> None:
    """What a client reusing a larger memfd relies on: the bytes past ``size``
    (here: a whole EICAR file, or clean text) are neither scanned nor hashed,
    and YARA's ``filesize`` is the size named."""
    fd = os.memfd_create("reused-buffer")
    try:
        async with connect(plain_daemon) as peer:
            os.pwrite(fd, CLEAN + EICAR, 0)
            clean = await peer.call(ScanFd(id=50, size=len(CLEAN)), [fd])
            assert isinstance(clean, ScanResult), clean
            assert (clean.action, clean.matches) == ("allow", [])
            assert (clean.sha256, clean.size) == (hashlib.sha256(CLEAN).hexdigest(), len(CLEAN))

            os.pwrite(fd, EICAR, 0)  # now EICAR, then the rest of CLEAN, then EICAR
            eicar = await peer.call(ScanFd(id=51, size=len(EICAR)), [fd])
            assert isinstance(eicar, ScanResult), eicar
            assert_eicar(eicar, 51)  # "$eicar at 0 and filesize <= 128"

            holds = os.fstat(fd).st_size
            over = await peer.call(ScanFd(id=52, size=holds + 1), [fd])
            assert isinstance(over, Error), over
            assert (over.code, over.retryable) == ("bad_fd", False)
            assert f"holds {holds} bytes" in over.message
            negative = await peer.call(ScanFd(id=53, size=-1), [fd])
            assert isinstance(negative, Error), negative
            # Out of range: the message is wrong, not the scanner (PROTOCOL.md, Errors).
            assert (negative.code, negative.retryable) == ("invalid_message", False)
            assert "scan_fd.size must not be negative" in negative.message
    finally:
        os.close(fd)


# --- rules from --rules DIR ----------------------------------------------------------------


async def test_rules_with_external_variables_match_on_the_request_metadata(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("externals.yar", EXTERNALS_RULE))
    d = daemon_factory(config={"scanner": {"workers": 1}}, extra_args=["--rules", str(rules)])
    async with connect(d) as peer:
        # ``extension`` is the lowercased suffix of the base name, with its dot.
        hit = await peer.scan(1, CLEAN, filename="C:\\Downloads\\Report.SENTINEL-TEST")
        assert hit.action == "block"
        assert [(m.rule, m.namespace, m.tags) for m in hit.matches] == [
            ("Sentinel_Test_Extension", "externals", ["external"])
        ]
        assert hit.matches[0].meta == {
            "description": "test only: the request's file extension", "severity": "high"
        }
        # ``filename`` is the base name of what the client gave, through every message.
        named = await peer.scan(2, CLEAN, filename="/tmp/x/dropper.bin")
        assert [m.rule for m in named.matches] == ["Sentinel_Test_Filename"]
        await peer.send(ScanBegin(id=3, filename="dropper.bin"))
        await peer.send(ScanChunk(id=3, data=CLEAN))
        streamed = await peer.call(ScanEnd(id=3))
        assert isinstance(streamed, ScanResult)
        assert [m.rule for m in streamed.matches] == ["Sentinel_Test_Filename"]
        fd = os.memfd_create("sample")
        try:
            os.write(fd, CLEAN)
            by_fd = await peer.call(ScanFd(id=4, filename="a.sentinel-test"), [fd])
        finally:
            os.close(fd)
        assert isinstance(by_fd, ScanResult)
        assert [m.rule for m in by_fd.matches] == ["Sentinel_Test_Extension"]
        # The same bytes under other names: nothing matches.
        for n, name in enumerate(["report.txt", "sentinel-test", "dropper.bin.txt", None]):
            other = await peer.scan(10 + n, CLEAN, filename=name)
            assert (other.action, other.matches) == ("allow", []), (name, other)
        # ... nor under a URL whose path ends differently; one that ends right matches.
        by_url = await peer.scan(20, CLEAN, url="https://example.org/get/dropper.bin?x=1")
        assert [m.rule for m in by_url.matches] == ["Sentinel_Test_Filename"]
        # The EICAR rule from the same directory still works.
        assert_eicar(await peer.scan(21, EICAR), 21)
    stop_cleanly(d)


def test_a_rule_that_does_not_compile_stops_start_up_naming_file_and_line(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("zz_broken.yar", BROKEN_RULE))
    d = daemon_factory(
        config={"scanner": {"workers": 1}}, extra_args=["--rules", str(rules)], start=False
    )
    d.start(wait=False)
    assert d.proc is not None
    code = d.proc.wait(60)
    assert code == 1  # "cannot start"
    log = d.log()
    assert re.search(r"^sentineld: zz_broken\.yar:4: syntax error", log, re.M), log[-2000:]
    assert "Traceback" not in log, log[-3000:]
    assert not d.socket_path.exists()


# --- worker crashes -------------------------------------------------------------------------


async def test_a_worker_killed_mid_scan_is_replaced_and_the_scan_completes(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(
        config={"scanner": {"workers": 2}, "resilience": {"retries": FAST_RETRY}},
        extra_args=["--rules", str(rules)],
    )
    before = await wait_workers(d, 2)
    data = slow_input(1.0)
    async with connect(d) as peer:
        await peer.send(Scan(id=1, data=data, filename="slow.bin"))
        victim = await wait_busy_worker(d)
        victim.kill()
        result = await peer.reply(1)
        assert isinstance(result, ScanResult), result
        # The right verdict, from a real scan on another worker, not a degraded guess.
        assert result.action == "block" and not result.degraded, result
        assert [m.rule for m in result.matches] == ["Sentinel_Test_Slow"]
        assert result.sha256 == hashlib.sha256(data).hexdigest()
        died = log_events(d, "scan_worker_died")
        assert len(died) == 1 and f"pid={victim.pid} " in died[0] and "state=busy" in died[0]
        # A replacement takes the dead worker's place; the pool is full again.
        after = await wait_workers(d, 2, without=[victim.pid])
        assert len(after) == 2
        assert set(before) - {victim.pid} <= set(after)
        no_zombies(d)
        assert_eicar(await peer.scan(2, EICAR), 2)
    stop_cleanly(d)


class Killer:
    """SIGKILLs the worker that holds a scan, ``times`` times, then stops."""

    def __init__(self, d: DaemonProcess, times: int) -> None:
        self.d = d
        self.times = times
        self.killed: list[int] = []
        self.done = trio.Event()

    async def run(self) -> None:
        while len(self.killed) < self.times:
            victim = await wait_busy_worker(self.d, timeout=30)
            with contextlib.suppress(psutil.Error):
                victim.kill()
                self.killed.append(victim.pid)
            # Wait for it to die so the same process is not counted twice.
            with contextlib.suppress(psutil.Error):
                await trio.to_thread.run_sync(victim.wait, 5)
        self.done.set()


def breaker_config(fail_mode: str, failure_threshold: int, open_timeout: float) -> dict[str, Any]:
    return {
        "scanner": {"workers": 1},
        "resilience": {
            "scanner_fail_mode": fail_mode,
            "retries": FAST_RETRY,
            "breakers": {
                "yara": {
                    "failure_threshold": failure_threshold,
                    "open_timeout": open_timeout,
                    "success_threshold": 2,
                }
            },
        },
    }


async def yara_breaker(peer: Peer, request_id: int) -> str:
    report = await peer.call(Breakers(id=request_id))
    assert isinstance(report, BreakersReport), report
    return next(b.state for b in report.breakers if b.name == "yara")


async def test_repeated_crashes_open_the_breaker_fail_open_then_recover(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(config=breaker_config("open", 3, 2.0), extra_args=["--rules", str(rules)])
    await wait_workers(d, 1)
    async with connect(d) as peer, trio.open_nursery() as nursery:
        killer = Killer(d, times=3)
        nursery.start_soon(killer.run)
        # Two attempts, both killed: the scan is answered, unscanned, fail-open.
        first = await peer.scan(1, slow_input(1.0), filename="a.bin")
        assert (first.action, first.degraded, first.matches) == ("allow", True, []), first
        assert first.degraded_reasons == ["scanner"]
        assert first.warnings and first.warnings[0].startswith("file was not scanned: ")
        assert "died" in first.warnings[0], first.warnings
        # The third crash opens the breaker.
        second = await peer.scan(2, slow_input(1.0), filename="b.bin")
        assert (second.action, second.degraded) == ("allow", True), second
        with trio.fail_after(10):
            await killer.done.wait()
        assert len(killer.killed) == 3
        assert await yara_breaker(peer, 3) == "open"

        # While it is open nothing reaches a worker, EICAR included: allowed, with why.
        eicar = await peer.scan(4, EICAR, filename="eicar.com")
        assert (eicar.action, eicar.degraded, eicar.matches) == ("allow", True, []), eicar
        assert eicar.sha256 == EICAR_SHA256  # still hashed, for the hash policies
        # Why it was not scanned, then what was done about it.
        assert len(eicar.warnings) == 2, eicar.warnings
        assert re.match(r"file was not scanned: .*circuit breaker open", eicar.warnings[0])
        assert "allowed without a scan (fail-open)" in eicar.warnings[1]
        assert eicar.degraded_reasons == ["scanner"]  # the database is fine
        # Hash policies still apply while the scanner is down.
        digest = hashlib.sha256(CLEAN).hexdigest()
        added = await peer.call(PolicyAdd(id=5, action="block", sha256=digest))
        assert isinstance(added, PolicyResult) and added.policy_id is not None, added
        blocked = await peer.scan(6, CLEAN, filename="clean.txt")
        assert (blocked.action, blocked.policy_id, blocked.degraded) == (
            "block", added.policy_id, True
        ), blocked
        other = await peer.scan(7, CLEAN + b"!", filename="other.txt")
        assert (other.action, other.degraded) == ("allow", True), other

        # Healthy workers again: after the open timeout, trial scans close it.
        with trio.fail_after(20):
            n = 100
            while True:
                n += 1
                trial = await peer.scan(n, EICAR, filename="eicar.com")
                if not trial.degraded:
                    break
                await trio.sleep(0.2)
        assert_eicar(trial, n)
        assert_eicar(await peer.scan(n + 1, EICAR), n + 1)
        assert await yara_breaker(peer, n + 2) == "closed"
    no_zombies(d)
    assert len(log_events(d, "scan_worker_died")) == 3
    stop_cleanly(d)


async def test_an_open_breaker_fails_closed_when_configured(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(config=breaker_config("closed", 1, 30.0), extra_args=["--rules", str(rules)])
    await wait_workers(d, 1)
    async with connect(d) as peer, trio.open_nursery() as nursery:
        killer = Killer(d, times=1)
        nursery.start_soon(killer.run)
        crashed = await peer.scan(1, slow_input(1.0))
        assert (crashed.action, crashed.degraded, crashed.matches) == ("block", True, [])
        assert crashed.warnings[0].startswith("file was not scanned: "), crashed.warnings
        assert await yara_breaker(peer, 2) == "open"
        clean = await peer.scan(3, CLEAN, filename="readme.txt")
        assert (clean.action, clean.degraded, clean.matches) == ("block", True, []), clean
        assert "circuit breaker open" in clean.warnings[0]
        assert "blocked (fail-closed)" in clean.warnings[1]
        assert clean.sha256 == hashlib.sha256(CLEAN).hexdigest()
        # An allow-by-hash policy still lets a known file through.
        allowed = await peer.call(PolicyAdd(id=4, action="allow", sha256=clean.sha256))
        assert isinstance(allowed, PolicyResult), allowed
        again = await peer.scan(5, CLEAN, filename="readme.txt")
        assert (again.action, again.policy_id) == ("allow", allowed.policy_id), again
    stop_cleanly(d)


# --- timeouts ------------------------------------------------------------------------------


async def test_a_scan_past_its_timeout_kills_the_worker_and_the_daemon_keeps_serving(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    # YARA's own timeout is whole seconds (1 s); the hard deadline (0.3 + 0.2 s) comes
    # first, so the worker has to be killed.
    d = daemon_factory(
        config={"scanner": {"workers": 1, "scan_timeout": 0.3, "kill_grace": 0.2}},
        extra_args=["--rules", str(rules)],
    )
    [pid] = await wait_workers(d, 1)
    async with connect(d) as peer:
        started = time.monotonic()
        slow = await peer.scan(1, slow_input(3.0), filename="slow.bin")
        assert time.monotonic() - started < 2.5  # not the 3 s the rule would take
        assert (slow.action, slow.degraded, slow.matches) == ("allow", True, []), slow
        assert re.match(r"file was not scanned: scan did not finish within 0\.5 s; "
                        rf"worker {pid} killed", slow.warnings[0]), slow.warnings
        # Killed and replaced; a timeout is the input's fault, not a broken scanner.
        assert len(await wait_workers(d, 1, without=[pid])) == 1
        await wait_for(lambda: not psutil.pid_exists(pid))  # killed and reaped
        assert await yara_breaker(peer, 2) == "closed"
        assert_eicar(await peer.scan(3, EICAR), 3)
        clean = await peer.scan(4, CLEAN)
        assert (clean.action, clean.degraded) == ("allow", False)
    assert len(log_events(d, "scan_worker_killed")) == 1
    assert not log_events(d, "scan_worker_died")  # a kill we meant is not a crash
    stop_cleanly(d)


# --- reload --------------------------------------------------------------------------------


async def test_reload_with_a_broken_rule_file_keeps_serving_the_old_rules(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(config={"scanner": {"workers": 1}}, extra_args=["--rules", str(rules)])
    marker = b"header SENTINEL-MARKER-V2 trailer"
    async with connect(d) as peer:
        v1 = (await peer.scan(1, EICAR)).rules_version
        broken = rules / "zz_broken.yar"
        broken.write_text(BROKEN_RULE)

        # 1. the reload request: rules_invalid naming file and line; v1 keeps serving.
        refused = await peer.call(Reload(id=2), timeout=60)
        assert isinstance(refused, Error) and refused.code == "rules_invalid", refused
        assert re.search(r"zz_broken\.yar:4: ", refused.message), refused.message
        still = await peer.scan(3, EICAR)
        assert_eicar(still, 3)
        assert still.rules_version == v1

        # 2. SIGHUP: the same failure, logged; the daemon neither exits nor swaps.
        d.signal(signal.SIGHUP)
        await wait_for(lambda: len(log_events(d, "rules_reload_failed")) == 2, timeout=30)
        assert "zz_broken.yar:4:" in log_events(d, "rules_reload_failed")[1]
        assert d.proc is not None and d.proc.poll() is None
        assert (await peer.scan(4, EICAR)).rules_version == v1

        # 3. fixed: a reload request swaps, the version changes, the new rule applies;
        # a scan in flight meanwhile (its worker held stopped) ends on the old set.
        broken.unlink()
        (rules / "marker.yar").write_text(GOOD_V2)
        await peer.send(Scan(id=50, data=slow_input(0.5)))
        old_worker = await wait_busy_worker(d)
        old_worker.suspend()
        try:
            swapped = await peer.call(Reload(id=5), timeout=60)
            assert isinstance(swapped, ReloadResult), swapped
            assert swapped.rules_version != v1 and swapped.namespaces == 3
            assert not peer.replies.get(50)  # still scanning
            hit = await peer.scan(6, marker)  # on a worker of the new set
        finally:
            old_worker.resume()
        assert [m.rule for m in hit.matches] == ["Sentinel_Test_Marker_V2"]
        assert hit.rules_version == swapped.rules_version
        in_flight = await peer.reply(50)
        assert isinstance(in_flight, ScanResult), in_flight
        assert [m.rule for m in in_flight.matches] == ["Sentinel_Test_Slow"]
        assert in_flight.rules_version == v1
        # Its worker is retired once the scan is done.
        await wait_for(lambda: not psutil.pid_exists(old_worker.pid))

        # 4. SIGHUP after a good change swaps too.
        (rules / "marker.yar").unlink()
        d.signal(signal.SIGHUP)
        with trio.fail_after(30):
            while True:
                result = await peer.scan(7, marker)
                if result.rules_version != swapped.rules_version:
                    break
                await trio.sleep(0.1)
        assert result.matches == [] and result.rules_version == v1  # the v1 sources again
        health = await peer.call(Health(id=8))
        assert isinstance(health, HealthReport) and health.rules_version == v1
    no_zombies(d)
    stop_cleanly(d)


def slow_to_compile(rules: int = 500) -> str:
    """A small rule set YARA needs minutes to compile (yara-python 4.5: a hex string
    with a nibble wildcard after a jump costs its atom extraction dearly)."""
    return "\n".join(
        f'rule Sentinel_Test_Bulk_{i} {{ strings: $a = "token-{i}-xyz" '
        f"$c = {{ {i % 256:02x} {i * 7 % 256:02x} ?? 4? 5A }} condition: any of them }}"
        for i in range(rules)
    )


def compilers_of(d: DaemonProcess) -> list[psutil.Process]:
    """The daemon's rule-compile child processes."""
    found = []
    for child in psutil.Process(d.pid).children():
        with contextlib.suppress(psutil.Error):
            if "--cache-dir" in child.cmdline():
                found.append(child)
    return found


async def test_sigterm_during_a_long_sighup_reload_stops_the_daemon_at_once(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The compile of a large rule set can take minutes; the signal that stops the
    daemon must not wait behind it (nor must the daemon leave the compiler behind)."""
    rules = with_eicar(tmp_path / "rules")
    d = daemon_factory(config={"scanner": {"workers": 1}}, extra_args=["--rules", str(rules)])
    (rules / "bulk.yar").write_text(slow_to_compile())
    d.signal(signal.SIGHUP)
    await wait_for(lambda: bool(compilers_of(d)), timeout=10)
    compilers = compilers_of(d)
    stop_cleanly(d)
    assert_gone(compilers)
    # The daemon did not finish the compile first: nothing was reloaded.
    assert not log_events(d, "rules_reloaded"), d.log()[-2000:]
    assert not log_events(d, "scan_rules_loaded")


# --- admission: rate limit, concurrency cap, bounded queue ----------------------------------


async def test_a_peer_over_its_token_bucket_is_rate_limited(daemon_factory: Any) -> None:
    d = daemon_factory(config={
        "scanner": {"workers": 1},
        "rate_limit": {"burst": 5, "scans_per_second": 1.0,
                       "max_concurrent_scans_per_connection": 20},
    })
    async with connect(d) as peer, connect(d) as other:
        # A burst in a few milliseconds (the bucket holds 5 and refills 1/s): 8 scans
        # on one connection, and a scan and a stream on a second connection of the
        # same peer (uid). The bucket is the peer's, and streams take from it too, so
        # exactly 5 of the 10 get in, whichever connection the daemon reads first
        # (plus one a second, should a loaded machine stretch the burst).
        started = time.monotonic()
        for n in range(1, 9):
            await peer.send(Scan(id=n, data=CLEAN))
        await other.send(Scan(id=20, data=CLEAN))
        await other.send(ScanBegin(id=21))
        await other.send(ScanChunk(id=21, data=CLEAN))
        await other.send(ScanEnd(id=21))  # not_found if scan_begin was refused
        replies = [await peer.reply(n) for n in range(1, 9)] + [await other.reply(20)]
        stream = await other.reply(21)
        if isinstance(stream, Error):
            assert (await other.reply(21)).code == "not_found"  # type: ignore[union-attr]
        replies.append(stream)
        refills = int(time.monotonic() - started)
        allowed = [r for r in replies if isinstance(r, ScanResult)]
        limited = [r for r in replies if isinstance(r, Error)]
        assert all(r.action == "allow" for r in allowed), replies
        assert 5 <= len(allowed) <= 5 + refills, (refills, replies)
        assert len(limited) == 10 - len(allowed), replies
        for e in limited:
            assert e.code == "rate_limited" and e.retryable, e
            assert e.retry_after_ms is not None and 0 < e.retry_after_ms <= 1000, e
            assert "over its scan rate (1/s, burst 5)" in e.message
        # After the advertised wait, a token is there again.
        wait_ms = max(e.retry_after_ms or 0 for e in limited)
        await trio.sleep(wait_ms / 1000 + 0.05)
        assert (await peer.scan(30, CLEAN)).action == "allow"
    stop_cleanly(d)


async def test_too_many_concurrent_scans_on_one_connection_are_rate_limited(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(
        config={"scanner": {"workers": 2},
                "rate_limit": {"max_concurrent_scans_per_connection": 2}},
        extra_args=["--rules", str(rules)],
    )
    await wait_workers(d, 2)
    data = slow_input(1.2)
    async with connect(d) as peer, connect(d) as other:
        # A stream, opened before: scan_begin and chunks are not scans in progress.
        await peer.send(ScanBegin(id=50, filename="eicar.com"))
        await peer.send(ScanChunk(id=50, data=EICAR))
        for n in range(4):
            await peer.send(Scan(id=n + 1, data=data))
        limited = [await peer.reply(n) for n in (3, 4)]  # refused at once ...
        for e in limited:
            assert isinstance(e, Error), e
            assert e.code == "rate_limited" and e.retryable and e.retry_after_ms, e
            assert "already running on this connection" in e.message
        # ... and so is the stream's end while the two scans run; the stream stays
        # open, so the retry the error invites can succeed.
        end = await peer.call(ScanEnd(id=50))
        assert isinstance(end, Error) and end.code == "rate_limited" and end.retryable, end
        # Another connection of the same peer has its own cap.
        assert_eicar(await other.scan(60, EICAR), 60)
        for n in (1, 2):
            result = await peer.reply(n)
            assert isinstance(result, ScanResult), result
            assert [m.rule for m in result.matches] == ["Sentinel_Test_Slow"]
        # Once they have finished, the connection may scan again.
        retried = await peer.call(ScanEnd(id=50))
        assert isinstance(retried, ScanResult), retried
        assert_eicar(retried, 50)
        assert (await peer.scan(10, CLEAN)).action == "allow"
    stop_cleanly(d)


async def test_a_full_scan_queue_answers_busy(daemon_factory: Any, tmp_path: Path) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(
        config={"scanner": {"workers": 1, "max_queue": 1}}, extra_args=["--rules", str(rules)]
    )
    await wait_workers(d, 1)
    data = slow_input(1.0)
    async with connect(d) as a, connect(d) as b:
        await a.send(Scan(id=1, data=data))
        await wait_busy_worker(d)  # the only worker holds scan 1
        # One of these waits for the worker (the queue holds one); the other is
        # answered at once. Which is which depends on which connection is read first.
        await a.send(Scan(id=2, data=data))
        await b.send(Scan(id=3, data=data))
        with trio.fail_after(0.8):  # "at once": well before scan 1 can finish
            busy = await trio_first(a.reply(2), b.reply(3))
        assert isinstance(busy, Error) and busy.code == "busy", busy
        assert busy.retryable and busy.retry_after_ms and busy.retry_after_ms > 0
        assert "scan queue full" in busy.message
        # Nothing queued was lost.
        waiting = 3 if busy.id == 2 else 2
        for peer, n in ((a, 1), (a if waiting == 2 else b, waiting)):
            result = await peer.reply(n)
            assert isinstance(result, ScanResult) and not result.degraded, result
            assert [m.rule for m in result.matches] == ["Sentinel_Test_Slow"]
        assert_eicar(await b.scan(4, EICAR), 4)
    stop_cleanly(d)


# --- stream bounds: idle streams, open streams, descriptors ---------------------------------


def open_fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.pid}/fd"))


async def synced(peer: Peer, request_id: int) -> None:
    """Every frame sent before this has been handled: a ping is answered after the
    inline requests (scan_begin, scan_chunk) that came before it on its connection."""
    assert isinstance(await peer.call(Ping(id=request_id)), Pong)


async def test_an_idle_stream_is_dropped_with_a_timeout_and_the_daemon_serves_others(
    daemon_factory: Any,
) -> None:
    """Two clients fill the buffer budget with half-sent streams and go quiet: the
    others get busy only until the idle timeout drops those streams."""
    d = daemon_factory(config={"scanner": {
        "workers": 1, "stream_idle_timeout": 1.0,
        "max_pending_bytes": MIB, "max_stream_bytes": MIB // 2,
    }})
    async with connect(d) as a, connect(d) as b, connect(d) as other:
        for peer in (a, b):
            await peer.send(ScanBegin(id=1, filename="half-sent.iso"))
            await peer.send(ScanChunk(id=1, data=b"x" * (MIB // 2)))
            await synced(peer, 2)
        full = await other.call(Scan(id=3, data=CLEAN))
        assert isinstance(full, Error) and full.code == "busy", full

        # Unasked, each quiet client is told, with its stream's id, and the budget is free.
        for peer in (a, b):
            dropped = await peer.reply(1, timeout=5)
            assert isinstance(dropped, Error), dropped
            assert (dropped.code, dropped.retryable) == ("timeout", True)
            assert "no chunk for 1 s" in dropped.message
        result = await other.call(Scan(id=4, data=CLEAN))
        assert isinstance(result, ScanResult) and result.action == "allow", result

        # The stream is gone, the connection is not.
        gone = await a.call(ScanEnd(id=1))
        assert isinstance(gone, Error) and gone.code == "not_found", gone
        # A stream that keeps sending outlives the timeout many times over.
        await a.send(ScanBegin(id=5, filename="slow-download.bin"))
        for _ in range(6):
            await a.send(ScanChunk(id=5, data=CLEAN))
            await trio.sleep(0.4)
        slow = await a.call(ScanEnd(id=5))
        assert isinstance(slow, ScanResult) and slow.size == 6 * len(CLEAN), slow
    assert len(log_events(d, "scan_stream_idle")) == 2
    stop_cleanly(d)


async def test_one_connection_cannot_buffer_more_than_its_share(daemon_factory: Any) -> None:
    """Half of max_pending_bytes per connection (or one largest file, if more)."""
    d = daemon_factory(config={"scanner": {
        "workers": 1, "max_pending_bytes": MIB, "max_stream_bytes": MIB // 4,
    }})
    async with connect(d) as a, connect(d) as b:
        for n in (1, 2):  # exactly its half
            await a.send(ScanBegin(id=n))
            await a.send(ScanChunk(id=n, data=b"a" * (MIB // 4)))
        await a.send(ScanBegin(id=3))
        await a.send(ScanChunk(id=3, data=b"a"))
        refused = await a.reply(3, timeout=10)
        assert isinstance(refused, Error) and refused.code == "busy", refused
        assert refused.retryable and refused.retry_after_ms
        assert "per connection" in refused.message
        # The rest of the budget is another client's.
        for n in (1, 2):
            await b.send(ScanBegin(id=n))
            await b.send(ScanChunk(id=n, data=b"b" * (MIB // 4)))
            done = await b.call(ScanEnd(id=n))
            assert isinstance(done, ScanResult) and done.size == MIB // 4, done
        # Once a stream of its own ends, the first client has room again.
        first = await a.call(ScanEnd(id=1))
        assert isinstance(first, ScanResult), first
        await a.send(ScanBegin(id=4))
        await a.send(ScanChunk(id=4, data=EICAR))
        assert_eicar(await a.call(ScanEnd(id=4)), 4)
    stop_cleanly(d)


async def test_open_streams_are_capped_and_descriptors_return_to_baseline(
    daemon_factory: Any,
) -> None:
    """Every open stream holds a memfd: a daemon-wide cap answers busy beyond it,
    and when the clients leave the daemon holds no more descriptors than before
    (the memfds kept for reuse are bounded too: two per worker)."""
    d = daemon_factory(config={
        "scanner": {"workers": 1, "max_open_streams": 16},
        "rate_limit": {"burst": 10_000, "scans_per_second": 10_000.0},
    })
    await wait_workers(d, 1)
    started = open_fds(d)
    async with connect(d) as warm:
        for n in range(8):
            await warm.send(ScanBegin(id=n + 1))
        await synced(warm, 100)
    # Its streams' memfds went back to the pool, which keeps two (one worker).
    await wait_for(lambda: open_fds(d) == started + 2)
    baseline = open_fds(d)

    for _round in range(2):
        async with contextlib.AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(connect(d)) for _ in range(4)]
            for peer in peers:
                for n in range(8):
                    await peer.send(ScanBegin(id=n + 1))
            for peer in peers:
                await synced(peer, 100)
            refused = [r for peer in peers for replies in peer.replies.values() for r in replies]
            assert len(refused) == 4 * 8 - 16, refused
            for error in refused:
                assert isinstance(error, Error) and error.code == "busy", error
                assert error.retryable and error.retry_after_ms
                assert "scan streams are open in the daemon (limit 16)" in error.message
            during = open_fds(d)
            assert during <= baseline + 4 + 16, (baseline, during)
            # Other clients are still served meanwhile.
            async with connect(d) as other:
                assert_eicar(await other.scan(1, EICAR), 1)
        await wait_for(lambda: open_fds(d) <= baseline)
    print(f"daemon fds: at start {started}, baseline {baseline}, 4 clients x 8 streams {during}, "
          f"after they closed {open_fds(d)}")
    stop_cleanly(d)


# --- no process outlives the daemon ---------------------------------------------------------


async def test_no_worker_outlives_a_daemon_killed_mid_scan(
    daemon_factory: Any, tmp_path: Path
) -> None:
    rules = with_eicar(tmp_path / "rules", ("slow.yar", SLOW_RULE))
    d = daemon_factory(config={"scanner": {"workers": 2}}, extra_args=["--rules", str(rules)])
    await wait_workers(d, 2)
    async with connect(d) as peer:
        await peer.send(Scan(id=1, data=slow_input(2.0)))
        await wait_busy_worker(d)
        children = descendants(d)
        assert len(children) >= 2
        d.kill()  # SIGKILL: no chance to clean up; the workers notice the hang-up
    assert_gone(children, timeout=10)
