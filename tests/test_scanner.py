"""The Scanner engine end to end with real workers: the three ways in (bytes, fd,
stream), external variables, crash retry, the yara breaker and fail-open/closed,
timeouts, hot reload, bounds and bad descriptors, and a clean shutdown."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import resource
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from samples import EICAR, EICAR_SHA256, SLOW_RULE

from sentinel_ipc.errors import (
    BadFileDescriptorError,
    BusyError,
    ErrorCode,
    RequestTimeoutError,
    RulesError,
    ScanError,
    ScanTooLargeError,
    ShuttingDownError,
)
from sentinel_ipc.resilience import BREAKER_PRESETS, RETRY_PRESETS
from sentinel_ipc.scanning import (
    ScanMeta,
    Scanner,
    ScannerConfig,
    ScannerSettings,
    ScanStream,
    open_scanner,
)
from sentinel_ipc.scanning.pool import PoolConfig, WorkerPool
from sentinel_ipc.scanning.rules import (
    BUILTIN_RULES_DIR,
    CACHE_DIRNAME,
    RulesInfo,
    load_rules_sync,
)

EXT_RULE = """
rule Sentinel_Test_Extension
{
    meta:
        description = "test only: matches on the request's file extension"
        severity = "low"
    condition:
        extension == ".sentinel-test"
}
"""
#: The yara presets, with waits short enough for a test (thresholds unchanged).
FAST_RETRY = dataclasses.replace(RETRY_PRESETS["yara"], initial=0.01, max_delay=0.02)
SHORT_BREAKER = dataclasses.replace(BREAKER_PRESETS["yara"], open_timeout=0.5)


def slow_input(seconds: float) -> bytes:
    return b"SLOW" + b"A" * int(seconds * 160_000)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def rule_names(outcome: Any) -> list[str]:
    return [m.rule for m in outcome.matches]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared so the compiled-rules cache is reused across tests."""
    return tmp_path_factory.mktemp("scanner-data")


@pytest.fixture(scope="module")
def test_rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scanner-rules")
    for src in BUILTIN_RULES_DIR.glob("*.yar"):
        shutil.copy(src, root / src.name)
    (root / "slow.yar").write_text(SLOW_RULE)
    (root / "ext.yar").write_text(EXT_RULE)
    return root


@asynccontextmanager
async def scanner_for(rules: Path | None, data_dir: Path, **options: Any) -> AsyncIterator[Scanner]:
    options.setdefault("workers", 2)
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("breaker", SHORT_BREAKER)
    config = ScannerConfig(rules_dir=str(rules) if rules else None, **options)
    pids: set[int] = set()
    async with open_scanner(config, data_dir) as scanner:
        await scanner.wait_workers()
        yield scanner
        pids.update(scanner.worker_pids())
    assert scanner.worker_pids() == []
    assert all(gone(pid) for pid in pids)


async def kill_busy_workers(scanner: Scanner, count: int) -> None:
    """kill -9 the next ``count`` workers seen busy (from outside, like an OOM killer)."""
    killed: set[int] = set()
    while len(killed) < count:
        for pid in scanner.statistics().pool.busy_pids:
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        await trio.sleep(0.005)


# --- configuration ---------------------------------------------------------------------


def test_settings_from_toml_give_the_spec_presets_by_default() -> None:
    config = msgspec.toml.decode(b'rules_dir = "/r"\nworkers = 3\n',
                                 type=ScannerSettings).to_config()
    assert config.rules_dir == "/r" and config.workers == 3
    default = ScannerConfig()
    assert config.scan_timeout == default.scan_timeout == 30.0
    assert config.max_stream_bytes == 512 * 1024 * 1024
    preset = BREAKER_PRESETS["yara"]
    assert (config.breaker.failure_threshold, config.breaker.open_timeout,
            config.breaker.success_threshold) == (3, 60.0, 3) == (
            preset.failure_threshold, preset.open_timeout, preset.success_threshold)
    assert config.breaker.is_failure == preset.is_failure
    assert (config.retry.attempts, config.retry.initial, config.retry.max_delay,
            config.retry.multiplier) == (2, 1.0, 5.0, 3.0)
    assert (config.max_open_streams, config.stream_idle_timeout) == (64, 30.0)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (b"workers = 0", "scanner.workers must be > 0"),
        (b"scan_timeout = -1.0", "scanner.scan_timeout must be > 0"),
        (b"stream_idle_timeout = 0.0", "scanner.stream_idle_timeout must be > 0"),
        (b"stream_idle_timeout = nan", "scanner.stream_idle_timeout must be > 0"),
        (b"max_open_streams = 0", "scanner.max_open_streams must be > 0"),
        (b"wrokers = 2", "unknown field `wrokers`"),
        (b"max_queue = \"x\"", "Expected `int`, got `str` - at `$.max_queue`"),
    ],
)
def test_bad_settings_name_the_key(toml: bytes, message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message.replace("$", r"\$")):
        msgspec.toml.decode(toml, type=ScannerSettings)


# --- detection through each way in ------------------------------------------------


async def test_eicar_detected_via_bytes_fd_and_stream(data_dir: Path, tmp_path: Path) -> None:
    async with scanner_for(None, data_dir) as scanner:
        meta = ScanMeta(url="https://example.com/eicar.com", filename="eicar.com")
        by_bytes = await scanner.scan_bytes(EICAR, meta)

        path = tmp_path / "eicar.com"
        path.write_bytes(EICAR)
        fd = os.open(path, os.O_RDONLY)
        try:
            by_fd = await scanner.scan_fd(fd, meta)
            assert os.fstat(fd).st_size == len(EICAR)  # still the caller's, still open
        finally:
            os.close(fd)

        with scanner.open_stream(meta, declared_size=len(EICAR)) as stream:
            for i in range(0, len(EICAR), 10):
                stream.write(EICAR[i:i + 10])
            by_stream = await stream.finish()
            # Until abort() the content stays readable (for quarantine), exactly as sent.
            assert os.pread(stream.fileno(), 1000, 0) == EICAR
            with pytest.raises(ScanError):
                stream.write(b"late")
        assert stream.closed
        assert scanner.statistics().open_streams == 0

        for outcome in (by_bytes, by_fd, by_stream):
            assert rule_names(outcome) == ["EICAR_Test_File"]
            assert outcome.matches[0].namespace == "eicar"
            assert outcome.matches[0].meta["description"]
            assert outcome.sha256 == EICAR_SHA256 and outcome.size == len(EICAR)
            assert outcome.scanned and not outcome.degraded and outcome.warnings == []
            assert outcome.rules_version == scanner.rules_version != ""
            assert outcome.default_action(fail_closed=False) == "block"
        assert scanner.rule_count >= 5
        assert scanner.statistics().scans_matched == 3


async def test_clean_bytes_are_scanned_and_allowed(data_dir: Path) -> None:
    async with scanner_for(None, data_dir) as scanner:
        data = b"just a text file\n" * 1000
        outcome = await scanner.scan_bytes(memoryview(data), ScanMeta(filename="notes.txt"))
        assert outcome.scanned and outcome.matches == []
        assert outcome.sha256 == hashlib.sha256(data).hexdigest() and outcome.size == len(data)
        assert outcome.default_action(fail_closed=True) == "allow"


async def test_rule_with_external_variable_extension(data_dir: Path, test_rules: Path) -> None:
    async with scanner_for(test_rules, data_dir) as scanner:
        hit = await scanner.scan_bytes(b"anything", ScanMeta(filename="Report.SENTINEL-TEST"))
        assert rule_names(hit) == ["Sentinel_Test_Extension"]
        via_url = await scanner.scan_bytes(
            b"anything", ScanMeta(url="https://example.com/dl/x.sentinel-test?token=1"))
        assert rule_names(via_url) == ["Sentinel_Test_Extension"]
        miss = await scanner.scan_bytes(b"anything", ScanMeta(filename="report.txt"))
        assert miss.matches == []
        # Built-in rule on the same external: an ELF named like a PDF.
        elf = await scanner.scan_bytes(b"\x7fELF" + b"\0" * 64, ScanMeta(filename="cv.pdf"))
        assert rule_names(elf) == ["Executable_With_Document_Extension"]
        assert elf.filetype == "ELF"


async def test_reused_buffers_never_leak_an_earlier_file_into_a_scan(data_dir: Path) -> None:
    async with scanner_for(None, data_dir, workers=1, buffer_pool_bytes=100_000,
                           buffer_reuse_max_bytes=50_000) as scanner:
        long_with_eicar = b"x" * 5000 + EICAR
        short = b"x" * 100
        assert rule_names(await scanner.scan_bytes(long_with_eicar, ScanMeta())) == [
            "EICAR_Embedded"]
        assert scanner.statistics().buffer_bytes_retained == len(long_with_eicar)
        clean = await scanner.scan_bytes(short, ScanMeta())  # same memfd, longer than this
        assert clean.matches == [] and clean.size == 100
        assert clean.sha256 == hashlib.sha256(short).hexdigest()
        with scanner.open_stream(ScanMeta()) as stream:  # reuses it as well
            stream.write(b"y" * 10)
            streamed = await stream.finish()
            assert os.fstat(stream.fileno()).st_size == 10  # cut to the file for quarantine
        assert streamed.matches == [] and streamed.size == 10
        assert streamed.sha256 == hashlib.sha256(b"y" * 10).hexdigest()
        # Over the per-buffer bound: scanned, then not kept.
        big = b"z" * 60_000
        assert (await scanner.scan_bytes(big, ScanMeta())).size == 60_000
        assert scanner.statistics().buffer_bytes_retained <= 50_000


# --- crashes, retry, breaker, fail-open / fail-closed -----------------------------------


async def test_kill_9_mid_scan_still_yields_the_verdict(data_dir: Path,
                                                        test_rules: Path) -> None:
    async with scanner_for(test_rules, data_dir) as scanner:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_busy_workers, scanner, 1)
            outcome = await scanner.scan_bytes(slow_input(0.4), ScanMeta(filename="x.bin"))
        assert outcome.scanned and not outcome.degraded
        assert rule_names(outcome) == ["Sentinel_Test_Slow"]
        stats = scanner.statistics()
        assert stats.pool.crashes_total == 1
        assert scanner.breaker.statistics().failures == 1  # counted, but below the threshold
        assert stats.breaker_state == "closed"


async def test_repeated_crashes_open_the_breaker_then_it_recovers(
    data_dir: Path, test_rules: Path
) -> None:
    async with scanner_for(test_rules, data_dir) as scanner:
        # Scan 1: crashes on both attempts (2 failures) -> not scanned.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_busy_workers, scanner, 2)
            first = await scanner.scan_bytes(slow_input(2.0), ScanMeta())
        assert not first.scanned and first.degraded
        assert first.warnings[0].startswith("file was not scanned: scan failed after retries")
        assert "SIGKILL" in first.warnings[0]
        # Scan 2: a third crash opens the breaker; the retry is refused.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(kill_busy_workers, scanner, 1)
            second = await scanner.scan_bytes(slow_input(2.0), ScanMeta())
        assert not second.scanned and "circuit breaker open" in second.warnings[0]
        assert scanner.statistics().breaker_state == "open"

        # While open: answered at once, unscanned, EICAR not even looked at, hash still right.
        with trio.fail_after(0.3):
            blind = await scanner.scan_bytes(EICAR, ScanMeta())
        assert not blind.scanned and blind.degraded and blind.matches == []
        assert blind.sha256 == EICAR_SHA256
        assert blind.default_action(fail_closed=False) == "allow"
        assert blind.default_action(fail_closed=True) == "block"

        # Workers are healthy again; after the open timeout, 3 trial scans close it.
        await scanner.wait_workers()
        await trio.sleep(0.55)
        for _ in range(3):
            healed = await scanner.scan_bytes(EICAR, ScanMeta())
            assert healed.scanned and rule_names(healed) == ["EICAR_Test_File"]
        assert scanner.statistics().breaker_state == "closed"
        assert scanner.statistics().scans_unscanned == 3


async def test_breaker_tripped_by_hand_gives_fail_open_outcome(data_dir: Path,
                                                               tmp_path: Path) -> None:
    async with scanner_for(None, data_dir, fail_closed=True) as scanner:
        scanner.breaker.trip()
        path = tmp_path / "f.bin"
        path.write_bytes(EICAR)
        fd = os.open(path, os.O_RDONLY)
        try:
            outcome = await scanner.scan_fd(fd, ScanMeta())
        finally:
            os.close(fd)
        assert not outcome.scanned and outcome.sha256 == EICAR_SHA256
        assert outcome.warnings == [
            "file was not scanned: the scanner is unavailable (circuit breaker open)"
        ]
        assert outcome.default_action(scanner.config.fail_closed) == "block"
        scanner.breaker.reset()
        assert (await scanner.scan_bytes(EICAR, ScanMeta())).scanned


# --- timeouts -----------------------------------------------------------------------------


async def test_yara_timeout_ends_the_scan_and_keeps_the_worker(data_dir: Path,
                                                               test_rules: Path) -> None:
    async with scanner_for(test_rules, data_dir, workers=1, scan_timeout=1.0,
                           kill_grace=2.0) as scanner:
        pids = scanner.worker_pids()
        outcome = await scanner.scan_bytes(slow_input(4.0), ScanMeta())
        assert not outcome.scanned and outcome.degraded
        assert outcome.warnings == ["file was not scanned: scan timed out after 1 s"]
        assert 900 < outcome.scan_ms < 2500
        assert scanner.worker_pids() == pids  # YARA stopped itself: no kill needed
        assert scanner.breaker.statistics().failures == 0  # slow input is not a broken scanner


async def test_scan_past_the_hard_deadline_kills_the_worker(data_dir: Path,
                                                            test_rules: Path) -> None:
    # YARA's timeout is whole seconds (1 s here); the hard deadline comes first.
    async with scanner_for(test_rules, data_dir, workers=1, scan_timeout=0.3,
                           kill_grace=0.2) as scanner:
        pid = scanner.worker_pids()[0]
        outcome = await scanner.scan_bytes(slow_input(3.0), ScanMeta())
        assert not outcome.scanned and "killed" in outcome.warnings[0]
        assert outcome.scan_ms < 900
        await scanner.wait_workers()
        with trio.fail_after(5):
            while not gone(pid):  # noqa: ASYNC110 - waiting for the kernel to reap it
                await trio.sleep(0.01)
        assert pid not in scanner.worker_pids()
        assert scanner.statistics().pool.hard_timeouts_total == 1
        assert (await scanner.scan_bytes(EICAR, ScanMeta())).matches


# --- hot reload -----------------------------------------------------------------------------


async def test_reload_swaps_rules_and_a_broken_file_keeps_the_old_set(
    data_dir: Path, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(BUILTIN_RULES_DIR, rules)
    marker = b"... SENTINEL-RELOAD-MARKER ..."
    async with scanner_for(rules, data_dir) as scanner:
        v1 = scanner.rules_version
        pids = scanner.worker_pids()
        same = await scanner.reload()
        assert same.version == v1 and scanner.worker_pids() == pids  # nothing changed

        (rules / "new.yar").write_text(
            'rule Reload_Marker { meta: description = "t" severity = "low" '
            'strings: $m = "SENTINEL-RELOAD-MARKER" condition: $m }')
        info = await scanner.reload()
        assert info.version != v1 and scanner.rules_version == info.version
        assert info.rule_count == scanner.rule_count
        hit = await scanner.scan_bytes(marker, ScanMeta())
        assert rule_names(hit) == ["Reload_Marker"] and hit.rules_version == info.version

        (rules / "zz_broken.yar").write_text("rule ok { condition: true }\nrule bad {\n"
                                             "  condition: no_such_thing\n}\n")
        with pytest.raises(RulesError) as error:
            await scanner.reload()
        assert error.value.message == 'zz_broken.yar:3: undefined identifier "no_such_thing"'
        assert error.value.code == ErrorCode.RULES_INVALID
        still = await scanner.scan_bytes(marker, ScanMeta())
        assert rule_names(still) == ["Reload_Marker"] and still.rules_version == info.version

        (rules / "zz_broken.yar").unlink()
        assert (await scanner.reload()).version == info.version


async def test_reload_while_scanning_loses_no_scan(data_dir: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(BUILTIN_RULES_DIR, rules)
    async with scanner_for(rules, data_dir) as scanner:
        outcomes: list[Any] = []

        async def scan_loop() -> None:
            for _ in range(40):
                outcomes.append(await scanner.scan_bytes(EICAR, ScanMeta()))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(scan_loop)
            (rules / "extra.yar").write_text("rule Extra { condition: false }")
            await scanner.reload()
        assert len(outcomes) == 120
        assert all(o.scanned and rule_names(o) == ["EICAR_Test_File"] for o in outcomes)
        assert len({o.rules_version for o in outcomes}) in (1, 2)


# --- bounds -----------------------------------------------------------------------------------


async def test_oversize_stream_bytes_and_fd_are_refused(data_dir: Path, tmp_path: Path) -> None:
    async with scanner_for(None, data_dir, max_stream_bytes=1000) as scanner:
        stream = scanner.open_stream(ScanMeta())
        stream.write(b"a" * 600)
        with pytest.raises(ScanTooLargeError) as error:
            stream.write(b"a" * 600)
        assert error.value.code == ErrorCode.TOO_LARGE and not error.value.retryable
        assert stream.closed and scanner.statistics().open_streams == 0
        assert scanner.statistics().pending_bytes == 0
        with pytest.raises(ScanError):
            stream.write(b"more")

        with pytest.raises(ScanTooLargeError):
            scanner.open_stream(ScanMeta(), declared_size=1001)
        with pytest.raises(ScanTooLargeError):
            await scanner.scan_bytes(b"b" * 1001, ScanMeta())
        path = tmp_path / "big"
        path.write_bytes(b"c" * 1001)
        fd = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(ScanTooLargeError):
                await scanner.scan_fd(fd, ScanMeta())
        finally:
            os.close(fd)
        # Exactly at the limit is fine.
        assert (await scanner.scan_bytes(b"d" * 1000, ScanMeta())).scanned


async def test_buffered_bytes_are_bounded_across_streams(data_dir: Path) -> None:
    async with scanner_for(None, data_dir, max_pending_bytes=1000) as scanner:
        a = scanner.open_stream(ScanMeta())
        b = scanner.open_stream(ScanMeta())
        a.write(b"x" * 600)
        with pytest.raises(BusyError) as error:
            b.write(b"y" * 600)
        assert error.value.retryable and b.closed
        assert (await a.finish()).scanned
        a.abort()
        assert scanner.statistics().pending_bytes == 0


async def test_full_queue_is_busy_and_a_long_wait_fails_open(data_dir: Path,
                                                             test_rules: Path) -> None:
    async with scanner_for(test_rules, data_dir, workers=1, max_queue=1,
                           worker_wait_timeout=0.3) as scanner:
        results: dict[str, Any] = {}

        async def scan(name: str, data: bytes) -> None:
            results[name] = await scanner.scan_bytes(data, ScanMeta())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(scan, "slow", slow_input(1.0))
            with trio.fail_after(5):
                while scanner.statistics().pool.busy == 0:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            nursery.start_soon(scan, "waiting", EICAR)
            with trio.fail_after(5):
                while scanner.statistics().pool.waiting == 0:  # noqa: ASYNC110
                    await trio.sleep(0.005)
            with pytest.raises(BusyError) as busy:
                await scanner.scan_bytes(EICAR, ScanMeta())
            assert busy.value.code == ErrorCode.BUSY and busy.value.retry_after
        assert rule_names(results["slow"]) == ["Sentinel_Test_Slow"]
        waited = results["waiting"]
        assert not waited.scanned and waited.sha256 == EICAR_SHA256
        assert "busy" in waited.warnings[0]
        # Overload is not a scanner failure.
        assert scanner.breaker.statistics().failures == 0
        assert scanner.statistics().busy_rejections == 1


def scan_memfds() -> int:
    """memfds this process holds for scan buffers."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}").startswith("/memfd:sentinel-scan")
    return count


async def test_open_streams_are_capped_and_few_idle_memfds_are_kept(data_dir: Path) -> None:
    """Each open stream holds a memfd, and each memfd given back used to be kept
    (an empty one counts no bytes): both are bounded, so descriptors are too."""
    async with scanner_for(None, data_dir, workers=2, max_open_streams=12) as scanner:
        before = scan_memfds()
        streams = [scanner.open_stream(ScanMeta()) for _ in range(12)]
        assert scan_memfds() == before + 12
        with pytest.raises(BusyError) as error:
            scanner.open_stream(ScanMeta())
        assert error.value.code == ErrorCode.BUSY and error.value.retryable
        assert error.value.retry_after and "limit 12" in error.value.message
        assert scanner.statistics().busy_rejections == 1
        streams.pop().abort()
        streams.append(scanner.open_stream(ScanMeta()))  # a slot is free again
        for stream in streams:
            stream.abort()
        # Two idle memfds per worker are kept for reuse; the other eight are closed.
        assert scan_memfds() == before + 4
        assert scanner.statistics().open_streams == 0


async def test_out_of_descriptors_for_a_buffer_is_busy_not_a_bug(data_dir: Path) -> None:
    async with scanner_for(None, data_dir, workers=1, max_open_streams=100_000) as scanner:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        streams: list[ScanStream] = []
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        try:
            # No descriptor above those open now: the next few holes, then EMFILE.
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
            with pytest.raises(BusyError) as error:
                for _ in range(highest + 1):
                    streams.append(scanner.open_stream(ScanMeta()))
            assert error.value.retryable and error.value.retry_after
            assert "Too many open files" in error.value.message
            with pytest.raises(BusyError):
                await scanner.scan_bytes(b"bytes need a memfd too", ScanMeta())
            assert scanner.statistics().pending_bytes == 0
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for stream in streams:
                stream.abort()
        # Descriptors free again: the same requests succeed.
        assert rule_names(await scanner.scan_bytes(EICAR, ScanMeta())) == ["EICAR_Test_File"]


@pytest.fixture(scope="module")
def builtin_rules(data_dir: Path) -> RulesInfo:
    return load_rules_sync(None, data_dir / CACHE_DIRNAME)


@contextmanager
def workerless_scanner(rules: RulesInfo, data_dir: Path, **options: Any) -> Iterator[Scanner]:
    """A Scanner whose workers never start, for streams on trio's MockClock: a
    stream touches no worker before finish(), and a worker start (real I/O with
    a time limit) would race the autojumping clock."""
    config = ScannerConfig(workers=1, **options)
    scanner = Scanner(config, WorkerPool(PoolConfig(workers=1), rules), data_dir / CACHE_DIRNAME)
    try:
        yield scanner
    finally:
        scanner._close()  # what open_scanner does on exit: streams and pooled memfds


async def test_a_stream_without_a_chunk_for_the_idle_timeout_is_dropped_and_its_owner_told(
    autojump_clock: trio.testing.MockClock, builtin_rules: RulesInfo, data_dir: Path
) -> None:
    told: list[tuple[float, ScanStream]] = []

    async def tell(stream: ScanStream) -> None:
        told.append((trio.current_time(), stream))

    async def fail(stream: ScanStream) -> None:
        raise RuntimeError("an owner's bug")

    with workerless_scanner(builtin_rules, data_dir, stream_idle_timeout=30.0) as scanner:
        async with trio.open_nursery() as nursery:
            await nursery.start(scanner.expire_idle_streams)
            await trio.sleep(100)  # no stream yet: the first one must wake the reaper
            opened = trio.current_time()
            idle = scanner.open_stream(ScanMeta(), on_idle=tell)
            idle.write(b"x" * 1000)
            buggy = scanner.open_stream(ScanMeta(), on_idle=fail)
            alive = scanner.open_stream(ScanMeta(), on_idle=tell)
            for _ in range(4):  # a chunk every 20 s keeps a stream open past 30 s
                await trio.sleep(20)
                alive.write(b"y" * 10)
            # Dropped 30 s after the last chunk (here: the opening), buffer released.
            assert told == [(pytest.approx(opened + 30.0), idle)]
            assert idle.closed and idle.expired and buggy.expired and not alive.closed
            stats = scanner.statistics()
            assert (stats.open_streams, stats.pending_bytes, stats.streams_expired) == (1, 40, 2)
            with pytest.raises(RequestTimeoutError) as error:
                idle.write(b"late")
            assert error.value.code == ErrorCode.TIMEOUT and error.value.retryable
            assert "no chunk for 30 s (after 1000 bytes)" in error.value.message
            with pytest.raises(RequestTimeoutError):
                await idle.finish()
            # The last chunk went in at +80 s; the reaper outlived the failing
            # callback and drops this one at +110 s.
            await trio.sleep(29)
            assert not alive.closed
            await trio.sleep(2)
            assert alive.expired and told[-1] == (pytest.approx(opened + 110.0), alive)
            assert scanner.statistics().pending_bytes == 0
            nursery.cancel_scope.cancel()


async def test_a_stream_being_scanned_is_not_idle(data_dir: Path, test_rules: Path) -> None:
    async with scanner_for(test_rules, data_dir, workers=1, stream_idle_timeout=0.2) as scanner:
        with scanner.open_stream(ScanMeta()) as stream:
            stream.write(slow_input(0.6))
            outcome = await stream.finish()  # three idle timeouts long
            assert outcome.scanned and rule_names(outcome) == ["Sentinel_Test_Slow"]
            await trio.sleep(0.3)  # scanned, its verdict not yet made: still not idle
            assert not stream.closed and os.pread(stream.fileno(), 4, 0) == b"SLOW"
        assert scanner.statistics().streams_expired == 0


# --- descriptors ------------------------------------------------------------------------------


def _bad_fds(tmp_path: Path) -> list[tuple[str, int]]:
    r, w = os.pipe()
    os.close(w)
    closed = 999_999  # above any descriptor this process has open
    wfile = tmp_path / "w"
    wfile.write_bytes(b"x")
    a, b = socket.socketpair()
    b.close()
    return [
        ("a pipe", r),
        ("a directory", os.open(tmp_path, os.O_RDONLY)),
        ("closed", closed),
        ("not open for reading", os.open(wfile, os.O_WRONLY)),
        ("not open for reading", os.open(wfile, os.O_PATH)),
        ("a socket", a.detach()),
        ("not a file descriptor", -1),
    ]


async def test_bad_descriptors_are_refused(data_dir: Path, tmp_path: Path) -> None:
    async with scanner_for(None, data_dir) as scanner:
        for expected, fd in _bad_fds(tmp_path):
            try:
                with pytest.raises(BadFileDescriptorError, match=expected) as error:
                    await scanner.scan_fd(fd, ScanMeta())
                assert error.value.code == ErrorCode.BAD_FD and not error.value.retryable
            finally:
                if 0 <= fd != 999_999:
                    os.close(fd)
        memfd = os.memfd_create("ok")
        os.write(memfd, EICAR)
        try:
            assert rule_names(await scanner.scan_fd(memfd, ScanMeta())) == ["EICAR_Test_File"]
        finally:
            os.close(memfd)
        assert scanner.statistics().scans_total == 1


async def test_file_truncated_during_scan_is_the_clients_fault(data_dir: Path,
                                                               test_rules: Path,
                                                               tmp_path: Path) -> None:
    path = tmp_path / "shrinking"
    path.write_bytes(slow_input(2.0))
    async with scanner_for(test_rules, data_dir) as scanner:
        fd = os.open(path, os.O_RDONLY)
        try:
            async with trio.open_nursery() as nursery:

                async def truncate_when_busy() -> None:
                    while not scanner.statistics().pool.busy:  # noqa: ASYNC110
                        await trio.sleep(0.005)
                    await trio.sleep(0.05)
                    os.truncate(path, 4)

                nursery.start_soon(truncate_when_busy)
                with pytest.raises(ScanError, match="shrank") as error:
                    await scanner.scan_fd(fd, ScanMeta())
        finally:
            os.close(fd)
        assert not error.value.retryable
        assert scanner.breaker.statistics().failures == 0


# --- health, cancellation, shutdown -----------------------------------------------------------


async def test_self_test_reports_milliseconds(data_dir: Path) -> None:
    async with scanner_for(None, data_dir) as scanner:
        ms = await scanner.self_test()
        assert 0 < ms < 2000


async def test_cancelled_scan_frees_its_buffer_and_the_scanner_goes_on(
    data_dir: Path, test_rules: Path
) -> None:
    async with scanner_for(test_rules, data_dir, workers=1) as scanner:
        with trio.move_on_after(0.05) as scope:
            await scanner.scan_bytes(slow_input(0.3), ScanMeta())
        assert scope.cancelled_caught
        assert scanner.statistics().pending_bytes == 0
        assert rule_names(await scanner.scan_bytes(EICAR, ScanMeta())) == ["EICAR_Test_File"]
        assert scanner.statistics().pool.crashes_total == 0


async def test_closing_leaves_no_worker_descriptor_or_stream(data_dir: Path) -> None:
    before = set(os.listdir("/proc/self/fd"))
    async with scanner_for(None, data_dir) as scanner:
        pids = scanner.worker_pids()
        assert len(pids) == 2
        dangling = scanner.open_stream(ScanMeta())
        dangling.write(b"never finished")
        await scanner.scan_bytes(EICAR, ScanMeta())
    assert dangling.closed
    assert all(gone(pid) for pid in pids)
    with pytest.raises(ShuttingDownError):
        await scanner.scan_bytes(EICAR, ScanMeta())
    assert set(os.listdir("/proc/self/fd")) == before


async def test_no_scan_is_lost_under_random_kills_and_cancellations(
    data_dir: Path, test_rules: Path, rng: Any
) -> None:
    """Every scan ends in an outcome (right verdict when scanned) or a typed error."""
    async with scanner_for(test_rules, data_dir, max_queue=64) as scanner:
        outcomes: list[Any] = []
        cancelled = 0

        async def client(n: int) -> None:
            nonlocal cancelled
            for i in range(8):
                data = EICAR if (n + i) % 2 else slow_input(0.02) + b"B"  # clean, not slow
                with trio.move_on_after(rng.uniform(0.005, 0.2) if i % 3 == 0 else 30) as scope:
                    outcomes.append((data is EICAR, await scanner.scan_bytes(data, ScanMeta())))
                cancelled += scope.cancelled_caught

        async def chaos() -> None:
            for _ in range(6):
                await trio.sleep(rng.uniform(0.02, 0.08))
                pids = scanner.worker_pids()
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(chaos)
            for n in range(6):
                nursery.start_soon(client, n)
        assert len(outcomes) + cancelled == 48
        for is_eicar, outcome in outcomes:
            if outcome.scanned:
                assert rule_names(outcome) == (["EICAR_Test_File"] if is_eicar else [])
            else:
                assert outcome.degraded and outcome.warnings[0].startswith("file was not scanned")
        with trio.fail_after(10):  # cancelled jobs drain, killed workers are replaced
            while scanner.statistics().pool.idle < 2:  # noqa: ASYNC110
                await trio.sleep(0.01)
        stats = scanner.statistics()
        assert stats.pending_bytes == 0 and stats.pool.alive == 2 and stats.pool.draining == 0
        assert stats.pool.crashes_total >= 1
