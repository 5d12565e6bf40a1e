#!/usr/bin/env python3
"""Scan throughput, side by side: raw yara-python vs Sentinel's Scanner (vs the daemon).

    python tools/bench_scan.py --rules DIR --corpus DIR [--workers N] [--modes ...]
    python tools/bench_scan.py --rules /work/shared/bench/rules --corpus /tmp/c60 \
        --total-mib 60 --files 100     # quick run: makes a 60 MiB corpus if /tmp/c60 has none

Every mode scans the same bytes (the corpus, read into memory first) with the
same compiled rules (one namespace per file, externals defined):

* ``raw1``   raw yara-python, one process, ``Rules.match(data=...)`` per file;
* ``rawN``   the same in N forked processes pulling files from a shared counter
             (the fair "N-process" baseline the issue's bar is measured against);
* ``rawN_sha`` rawN plus ``hashlib.sha256`` of each file: the least work a
             verdict needs (every ``scan_result`` carries the file's sha256, and
             hash policies decide on it), so the daemon's ratio to it is its
             overhead proper, apart from the hashing no daemon can skip;
* ``engine`` Sentinel's Scanner called in-process (``scan_bytes``: memfd + worker
             pool + breaker/retry + sha256), ``--concurrency`` scans in flight;
* ``engine_fd`` the Scanner's ``scan_fd`` on the corpus files (no copy at all);
* ``daemon`` the same bytes through sentineld with ``Client.scan(bytes)``, as
             an application calls it: from 64 KiB on, the client copies the
             bytes into one of its pooled memfds and passes it (``scan_fd``);
* ``daemon_frames`` the same bytes carried in ``scan`` frames (or a chunked
             stream past the frame limit), the path of a client that cannot
             pass descriptors (``memfd_min_bytes=None``);
* ``daemon_fd`` the same files through sentineld, each passed as a descriptor
             (``scan_fd``): no byte crosses the socket.
* ``daemon_c`` the same files through sentineld from the native C client
             (clients/c's ``sentinel-scan``, built here with ``make``): each file
             passed as a descriptor, ``--concurrency`` requests pipelined on one
             connection; what a browser's own code does. Skipped without a C
             compiler.

Prints MB/s, files/s and p50/p99 per-file latency per mode, the ratios to
``rawN``, and as its last line (machine-readable):
``bench_scan: daemon_mbps=<float> raw_mbps=<float> ratio=<float> ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel_ipc.scanning.rules import EXTERNALS, load_rules_sync

MAKE_CORPUS = Path("/work/shared/bench/make_corpus.py")


@dataclass
class ModeResult:
    name: str
    seconds: float
    total_bytes: int
    latencies: list[float]
    files: int
    matched_files: int
    note: str = ""
    #: CPU seconds (user + system) of every process doing the work, timed part only.
    cpu_seconds: float = math.nan

    @property
    def cpu_per_gb(self) -> float:
        """CPU seconds per GB scanned: the efficiency, robust on a shared machine."""
        return self.cpu_seconds / (self.total_bytes / 1e9) if self.total_bytes else math.nan

    @property
    def mbps(self) -> float:
        return self.total_bytes / self.seconds / 1e6 if self.seconds else math.nan

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds else math.nan

    def pct(self, q: float) -> float:
        if not self.latencies:
            return math.nan
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1000


# ---------------------------------------------------------------------------
# corpus and rules
# ---------------------------------------------------------------------------


def load_corpus(corpus: Path) -> list[tuple[str, bytes]]:
    names = sorted(p.name for p in corpus.iterdir() if p.is_file() and p.name != "manifest.json")
    return [(name, (corpus / name).read_bytes()) for name in names]


def ensure_corpus(corpus: Path, total_mib: float, files: int, seed: int) -> None:
    if (corpus / "manifest.json").exists():
        return
    cmd = [sys.executable, str(MAKE_CORPUS), str(corpus), "--seed", str(seed),
           "--total-mib", str(total_mib), "--files", str(files)]
    print("making corpus:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# ---------------------------------------------------------------------------
# raw yara-python baselines
# ---------------------------------------------------------------------------


def cpu_seconds(processes: Iterable[Any]) -> float:
    """CPU seconds (user + system) of some psutil processes, summed."""
    return float(sum(t.user + t.system for t in (p.cpu_times() for p in processes)))


def tree_cpu(process: Any) -> tuple[float, float]:
    """CPU seconds of ``process`` itself, and of its live children."""
    return cpu_seconds([process]), cpu_seconds(process.children(recursive=True))


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def same_externals(name: str, data: bytes) -> dict[str, str]:
    """The external variables the daemon fills for a file of this name and content
    (``--raw-externals``): rules conditioned on them then do the same work in both."""
    from sentinel_ipc.scanning.rules import externals_for
    from sentinel_ipc.scanning.worker import guess_filetype

    ext = dict(externals_for(None, name))
    ext["filetype"] = guess_filetype(data[:16])
    return ext


def _raw_match(rules: Any, name: str, data: bytes) -> Any:
    if _CHILD.get("externals"):
        return rules.match(data=data, externals=same_externals(name, data))
    return rules.match(data=data)


def raw_one_process(compiled: str, corpus: list[tuple[str, bytes]]) -> ModeResult:
    import yara

    rules = yara.load(compiled)
    lat: list[float] = []
    matched = 0
    cpu0 = _cpu_self()
    start = time.perf_counter()
    for name, data in corpus:
        t = time.perf_counter()
        if _raw_match(rules, name, data):
            matched += 1
        lat.append(time.perf_counter() - t)
    seconds = time.perf_counter() - start
    return ModeResult("raw1", seconds, sum(len(d) for _, d in corpus), lat, len(corpus), matched,
                      cpu_seconds=_cpu_self() - cpu0)


_CHILD: dict[str, Any] = {}


def _raw_child(compiled: str, counter: Any, barrier: Any, out: Any) -> None:
    import yara

    rules = yara.load(compiled)
    corpus = _CHILD["corpus"]
    digest = _CHILD.get("sha256", False)
    lat: list[tuple[float, int]] = []
    barrier.wait()
    cpu0 = _cpu_self()
    while True:
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        if i >= len(corpus):
            break
        t = time.perf_counter()
        m = _raw_match(rules, corpus[i][0], corpus[i][1])
        if digest:
            hashlib.sha256(corpus[i][1]).hexdigest()
        lat.append((time.perf_counter() - t, 1 if m else 0))
    out.put((lat, _cpu_self() - cpu0))


def raw_n_processes(compiled: str, corpus: list[tuple[str, bytes]], n: int,
                    sha256: bool = False) -> ModeResult:
    """N forked processes; the corpus is inherited (copy-on-write), not pickled.
    With ``sha256`` each file is also hashed, as every verdict must be."""
    ctx = mp.get_context("fork")
    _CHILD["corpus"] = corpus
    _CHILD["sha256"] = sha256
    counter = ctx.Value("q", 0)
    barrier = ctx.Barrier(n + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=_raw_child, args=(compiled, counter, barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    results = [out.get() for _ in procs]
    seconds = time.perf_counter() - start
    for p in procs:
        p.join()
    lat = [x for r, _cpu in results for x, _ in r]
    matched = sum(m for r, _cpu in results for _, m in r)
    return ModeResult(f"raw{n}_sha" if sha256 else f"raw{n}", seconds,
                      sum(len(d) for _, d in corpus), lat, len(corpus),
                      matched, cpu_seconds=sum(cpu for _r, cpu in results))


# ---------------------------------------------------------------------------
# Sentinel's Scanner, in-process
# ---------------------------------------------------------------------------


def engine_mode(rules_dir: str, data_dir: Path, corpus: list[tuple[str, bytes]],
                corpus_dir: Path, workers: int, concurrency: int, use_fd: bool) -> ModeResult:
    import psutil
    import trio

    from sentinel_ipc.scanning import ScanMeta, ScannerConfig, open_scanner

    lat: list[float] = []
    matched = 0
    unscanned = 0
    seconds = 0.0
    cpu = 0.0

    def cpu_of(pids: list[int]) -> float:
        return _cpu_self() + cpu_seconds(psutil.Process(pid) for pid in pids)

    async def main() -> None:
        nonlocal matched, unscanned, seconds, cpu
        config = ScannerConfig(rules_dir=rules_dir, workers=workers)
        async with open_scanner(config, data_dir) as scanner:
            # Let every worker finish starting before the clock runs.
            await scanner.wait_workers(workers)
            await scanner.self_test()
            next_index = 0

            async def client() -> None:
                nonlocal next_index, matched, unscanned
                while next_index < len(corpus):
                    i = next_index
                    next_index += 1
                    name, data = corpus[i]
                    t = time.perf_counter()
                    if use_fd:
                        fd = os.open(corpus_dir / name, os.O_RDONLY | os.O_CLOEXEC)
                        try:
                            outcome = await scanner.scan_fd(fd, ScanMeta(filename=name))
                        finally:
                            os.close(fd)
                    else:
                        outcome = await scanner.scan_bytes(data, ScanMeta(filename=name))
                    lat.append(time.perf_counter() - t)
                    matched += bool(outcome.matches)
                    unscanned += not outcome.scanned

            pids = scanner.worker_pids()
            cpu0 = cpu_of(pids)
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(client)
            seconds = time.perf_counter() - start
            # A replaced worker would take its CPU time with it: then no figure.
            cpu = cpu_of(pids) - cpu0 if scanner.worker_pids() == pids else math.nan

    trio.run(main)
    name = "engine_fd" if use_fd else "engine"
    note = f"{unscanned} unscanned" if unscanned else ""
    return ModeResult(name, seconds, sum(len(d) for _, d in corpus), lat, len(corpus), matched,
                      note, cpu_seconds=cpu)


# ---------------------------------------------------------------------------
# The daemon (filled in by the daemon-side step)
# ---------------------------------------------------------------------------


class DaemonUnderTest:
    """One ``sentineld --rules rules_dir`` for one measurement: started, probed
    until its scanner answers, stopped (and reaped) on exit.

    The daemon's rate limits are lifted through its config file so that they do
    not cap the measurement. It uses its own default worker count (the CPU
    count), like ``--workers`` here by default.
    """

    def __init__(self, rules_dir: str, data_dir: Path, concurrency: int) -> None:
        self.run_dir = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
        self.socket_path = self.run_dir / "s.sock"
        config_path = self.run_dir / "sentinel.toml"
        config_path.write_text(
            "[rate_limit]\nburst = 1000000\nscans_per_second = 1000000.0\n"
            f"max_concurrent_scans_per_connection = {max(5, concurrency)}\n"
        )
        self._log = open(self.run_dir / "sentineld.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket",
             str(self.socket_path), "--data-dir", str(data_dir / "daemon"), "--rules", rules_dir,
             "--config", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    async def ready(self, client_mod: Any) -> bool:
        """Wait for the socket, then for a probe scan with a rules version. False
        (mode skipped) when the daemon does not scan (no scanner wired)."""
        import trio

        # Plain connects first: the client's ipc breaker would open after ten
        # refusals and hold the probe off for its 10 s open time.
        with trio.move_on_after(120):
            while self.proc.poll() is None:
                try:
                    await (await trio.open_unix_socket(str(self.socket_path))).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
        config = client_mod.ClientConfig(scan_timeout=600.0, timeout=30.0)
        async with client_mod.open_client(self.socket_path, config=config) as probe:
            try:
                result = await probe.scan(b"bench probe", filename="probe.txt", timeout=60.0)
            except Exception as exc:
                print(f"daemon: probe scan failed ({type(exc).__name__}: {exc})",
                      file=sys.stderr)
                return False
        if not result.rules_version:
            print("daemon: scan_result without rules_version; scanner not wired",
                  file=sys.stderr)
            return False
        return True

    def cpu(self) -> tuple[float, float, frozenset[int]]:
        """CPU seconds of the daemon and of its workers, and the workers' pids
        (a replaced worker takes its CPU time with it: compare the pid sets)."""
        import psutil

        daemon = psutil.Process(self.proc.pid)
        own, workers = tree_cpu(daemon)
        return own, workers, frozenset(c.pid for c in daemon.children())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def scan_via_daemon(rules_dir: str, data_dir: Path, corpus: list[tuple[str, bytes]],
                    workers: int, concurrency: int,
                    fd_dir: Path | None = None, frames: bool = False) -> ModeResult | None:
    """The daemon path: scan every corpus file through sentineld's socket with
    ``concurrency`` client connections of the Python library (``Client.scan``:
    a pooled memfd from 64 KiB on; with ``frames``, always a ``scan`` frame, or a
    chunked stream past the frame limit).

    With ``fd_dir``, each file is opened there and passed as a descriptor
    (``scan_fd``, SCM_RIGHTS): what a browser that has the download on disk does;
    no byte crosses the socket.

    Returns None (mode skipped) when there is no client library, or when the
    daemon does not answer a probe scan with a ``scan_result``.
    """
    try:
        client_mod = importlib.import_module("sentinel_ipc.client")
    except ImportError:
        return None
    import trio

    daemon = DaemonUnderTest(rules_dir, data_dir, concurrency)
    lat: list[float] = []
    matched = 0
    unscanned = 0
    seconds = math.nan
    cpu = math.nan
    cpu_note = ""
    available = False

    async def main() -> None:
        nonlocal matched, unscanned, seconds, cpu, cpu_note, available
        if not await daemon.ready(client_mod):
            return
        available = True
        config = client_mod.ClientConfig(scan_timeout=600.0, timeout=30.0)
        if frames:
            config = dataclasses.replace(config, memfd_min_bytes=None)
        next_index = 0

        async def one_client() -> None:
            nonlocal next_index, matched, unscanned
            async with client_mod.open_client(daemon.socket_path, config=config) as client:
                while next_index < len(corpus):
                    i = next_index
                    next_index += 1
                    name, data = corpus[i]
                    t = time.perf_counter()
                    if fd_dir is None:
                        reply = await client.scan(data, filename=name)
                    else:
                        fd = os.open(fd_dir / name, os.O_RDONLY | os.O_CLOEXEC)
                        try:
                            reply = await client.scan_fd(fd, filename=name)
                        finally:
                            os.close(fd)
                    lat.append(time.perf_counter() - t)
                    matched += bool(reply.matches)
                    unscanned += bool(reply.degraded)

        client0, (daemon0, workers0, pids0) = _cpu_self(), daemon.cpu()
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(one_client)
        seconds = time.perf_counter() - start
        daemon1, workers1, pids1 = daemon.cpu()
        if pids1 == pids0:
            split = (_cpu_self() - client0, daemon1 - daemon0, workers1 - workers0)
            cpu = sum(split)
            cpu_note = "cpu s: client {:.2f} daemon {:.2f} workers {:.2f}".format(*split)

    try:
        trio.run(main)
    finally:
        daemon.stop()
    if not available:
        return None
    note = "; ".join(x for x in (f"{unscanned} degraded" if unscanned else "", cpu_note) if x)
    name = "daemon_fd" if fd_dir is not None else "daemon_frames" if frames else "daemon"
    return ModeResult(name, seconds, sum(len(d) for _, d in corpus), lat, len(corpus),
                      matched, note, cpu_seconds=cpu)


NATIVE_CLIENT_DIR = Path(__file__).resolve().parents[1] / "clients" / "c"


def build_native_client(out_dir: Path) -> Path | None:
    """Build clients/c's ``sentinel-scan`` into ``out_dir``; None (mode skipped)
    without a C compiler or when the build fails."""
    try:
        subprocess.run(["make", "-s", "-C", str(NATIVE_CLIENT_DIR), f"O={out_dir}",
                        str(out_dir / "sentinel-scan")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        print(f"daemon_c: cannot build the C client ({exc}) {detail.decode(errors='replace')}",
              file=sys.stderr)
        return None
    return out_dir / "sentinel-scan"


def scan_via_native_client(rules_dir: str, data_dir: Path, corpus: list[tuple[str, bytes]],
                           corpus_dir: Path, concurrency: int,
                           binary: Path | None) -> ModeResult | None:
    """The daemon path as a browser takes it: clients/c's ``sentinel-scan`` passes
    each corpus file as a descriptor (``scan_fd``), ``concurrency`` requests in
    flight on one connection. Its CPU counts with the daemon's, as the Python
    client's does in the other modes; wall time includes its start and connect."""
    if binary is None:
        return None
    try:
        client_mod = importlib.import_module("sentinel_ipc.client")
    except ImportError:
        return None
    import trio

    daemon = DaemonUnderTest(rules_dir, data_dir, concurrency)
    file_list = daemon.run_dir / "files.txt"
    file_list.write_text("".join(f"{corpus_dir / name}\n" for name, _ in corpus))
    latency_file = daemon.run_dir / "latencies.txt"
    try:
        if not trio.run(daemon.ready, client_mod):
            return None
        daemon0, workers0, pids0 = daemon.cpu()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run = subprocess.run(
            [str(binary), "-q", "--stats", "-j", str(concurrency), "-s",
             str(daemon.socket_path), "--latencies", str(latency_file),
             "--files-from", str(file_list)],
            capture_output=True, text=True, check=False,
        )
        seconds = time.perf_counter() - start
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        daemon1, workers1, pids1 = daemon.cpu()
    finally:
        daemon.stop()
    stats = dict(
        field.split("=", 1) for field in run.stdout.strip().splitlines()[-1].split()[1:]
    ) if run.stdout.strip() else {}
    if run.returncode not in (0, 1) or int(stats.get("errors", "1")) != 0:
        print(f"daemon_c: sentinel-scan exit {run.returncode}: {run.stderr.strip()[-500:]} "
              f"{run.stdout.strip()[-300:]}", file=sys.stderr)
        return None
    lat = [float(line) / 1000 for line in latency_file.read_text().split()]
    client_cpu = (children1.ru_utime + children1.ru_stime
                  - children0.ru_utime - children0.ru_stime)
    cpu = math.nan
    note = ""
    if pids1 == pids0:
        split = (client_cpu, daemon1 - daemon0, workers1 - workers0)
        cpu = sum(split)
        note = "cpu s: client {:.2f} daemon {:.2f} workers {:.2f}".format(*split)
    degraded = int(stats.get("degraded", "0"))
    if degraded:
        note = f"{degraded} degraded; " + note
    return ModeResult("daemon_c", seconds, sum(len(d) for _, d in corpus), lat, len(corpus),
                      int(stats.get("matched", "0")), note, cpu_seconds=cpu)


# ---------------------------------------------------------------------------


def report(results: Sequence[ModeResult], base: ModeResult | None) -> None:
    print(f"{'mode':<10} {'MB/s':>8} {'files/s':>8} {'p50 ms':>8} {'p99 ms':>9} "
          f"{'x rawN':>7} {'cpu s/GB':>9} {'cpu x rawN':>10} {'matched':>7}  note")
    for r in results:
        ratio = r.mbps / base.mbps if base else math.nan
        cpu_ratio = r.cpu_per_gb / base.cpu_per_gb if base else math.nan
        print(f"{r.name:<10} {r.mbps:8.1f} {r.files_per_s:8.1f} {r.pct(0.5):8.2f} "
              f"{r.pct(0.99):9.2f} {ratio:7.3f} {r.cpu_per_gb:9.2f} {cpu_ratio:10.3f} "
              f"{r.matched_files:7d}  {r.note}")


def quartiles(values: Sequence[float]) -> tuple[float, float] | None:
    """First and third quartile of per-round ratios (None under 4 rounds): how far
    the machine's noise moves a single round, next to the median."""
    if len(values) < 4:
        return None
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def spread_note(quarts: tuple[float, float] | None) -> str:
    return "" if quarts is None else f" (quartiles {quarts[0]:.3f}-{quarts[1]:.3f})"


def print_round_ratios(baseline: str, rounds: dict[str, list[float]],
                       names: Sequence[str]) -> dict[str, float]:
    """Print, and return, each named mode's median ratio to ``baseline`` over the
    rounds they ran side by side, with its quartiles."""
    medians: dict[str, float] = {}
    notes: list[str] = []
    for name in names:
        ratios = [m / b for m, b in zip(rounds[name], rounds[baseline], strict=False)]
        if ratios:
            medians[name] = statistics.median(ratios)
            notes.append(f"{name} {medians[name]:.3f}" + spread_note(quartiles(ratios)))
    print(f"median of per-round ratios to {baseline}: " + ", ".join(notes))
    return medians


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", required=True, help="directory of .yar/.yara files")
    ap.add_argument("--corpus", required=True, type=Path, help="corpus directory")
    ap.add_argument("--make-corpus", action="store_true",
                    help="generate the corpus with make_corpus.py if it does not exist "
                         "(done anyway when DIR has no manifest.json)")
    ap.add_argument("--total-mib", type=float, default=300.0, help="with --make-corpus")
    ap.add_argument("--files", type=int, default=400, help="with --make-corpus")
    ap.add_argument("--seed", type=int, default=1, help="with --make-corpus")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--concurrency", type=int, default=0,
                    help="scans in flight for engine/daemon (default: 2 x workers, so a "
                         "worker never idles while the next file is still on the wire)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the modes this many times, interleaved (every other round in "
                         "reverse order); report each mode's best round (a shared machine "
                         "only ever slows a round down), and the median and quartiles of "
                         "the per-round ratios")
    ap.add_argument("--raw-externals", action="store_true",
                    help="raw modes fill the external variables (filename, extension, "
                         "filetype...) as the daemon does, so both do the same rule work")
    ap.add_argument("--modes",
                    default="raw1,rawN,engine,engine_fd,daemon,daemon_frames,daemon_fd,daemon_c")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="where compiled rules are cached (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    args = ap.parse_args(argv)
    from sentinel_ipc.logs import configure_logging

    configure_logging("warning")  # worker deaths and unscanned files show up in the log

    if args.make_corpus or not (args.corpus / "manifest.json").exists():
        ensure_corpus(args.corpus, args.total_mib, args.files, args.seed)
    corpus = load_corpus(args.corpus)
    total = sum(len(d) for _, d in corpus)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-scan-"))
    info = load_rules_sync(args.rules, data_dir / "rules-cache")
    concurrency = args.concurrency or 2 * args.workers
    _CHILD["externals"] = args.raw_externals
    print(f"corpus: {len(corpus)} files, {total / 2**20:.1f} MiB; rules: {info.rule_count} "
          f"in {info.namespaces} files (version {info.version}); externals "
          f"{','.join(EXTERNALS)}; workers={args.workers} concurrency={concurrency}; "
          f"cpus={os.cpu_count()}")

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    native: list[Path | None] = []

    def native_client() -> Path | None:
        if not native:  # built once, on first use
            native.append(build_native_client(data_dir / "native-client"))
        return native[0]

    runners: dict[str, Callable[[], ModeResult | None]] = {
        "raw1": lambda: raw_one_process(info.compiled_path, corpus),
        "rawN": lambda: raw_n_processes(info.compiled_path, corpus, args.workers),
        "rawN_sha": lambda: raw_n_processes(info.compiled_path, corpus, args.workers,
                                            sha256=True),
        "engine": lambda: engine_mode(args.rules, data_dir, corpus, args.corpus, args.workers,
                                      concurrency, use_fd=False),
        "engine_fd": lambda: engine_mode(args.rules, data_dir, corpus, args.corpus,
                                         args.workers, concurrency, use_fd=True),
        "daemon": lambda: scan_via_daemon(args.rules, data_dir, corpus, args.workers,
                                          concurrency),
        "daemon_frames": lambda: scan_via_daemon(args.rules, data_dir, corpus, args.workers,
                                                 concurrency, frames=True),
        "daemon_fd": lambda: scan_via_daemon(args.rules, data_dir, corpus, args.workers,
                                             concurrency, fd_dir=args.corpus),
        "daemon_c": lambda: scan_via_native_client(args.rules, data_dir, corpus, args.corpus,
                                                   concurrency, native_client()),
    }
    for mode in modes:
        if mode not in runners:
            ap.error(f"unknown mode {mode!r}")
    best: dict[str, ModeResult] = {}
    rounds: dict[str, list[float]] = {}
    for round_no in range(1, args.rounds + 1):
        # Every other round runs the modes in reverse order, so that a machine
        # that speeds up or slows down over the run favours no mode.
        for mode in modes if round_no % 2 else modes[::-1]:
            result = runners[mode]()
            if result is None:
                if round_no == 1:
                    print(f"{mode}: not available (see above); skipped",
                          file=sys.stderr)
                continue
            rounds.setdefault(result.name, []).append(result.mbps)
            if result.name not in best or result.mbps > best[result.name].mbps:
                best[result.name] = result
            busy = result.cpu_seconds / (result.seconds * (os.cpu_count() or 1))
            print(f"  round {round_no} {result.name}: {result.mbps:.1f} MB/s, "
                  f"{result.cpu_seconds:.2f} cpu s ({busy:.0%} of the cores) {result.note}",
                  file=sys.stderr)
    results = list(best.values())
    for r in results:
        if len(rounds[r.name]) > 1:
            r.note = (r.note + " " if r.note else "") + "rounds: " + " ".join(
                f"{x:.1f}" for x in rounds[r.name])
    base = next((r for r in results if r.name == f"raw{args.workers}"), None)
    report(results, base)
    # Best-of-rounds can pair a lucky round of one mode with an unlucky one of
    # another; the median of within-round ratios is the steadier figure.
    round_ratio: dict[str, float] = {}
    if base is not None and len(rounds.get(base.name, [])) > 1:
        round_ratio = print_round_ratios(base.name, rounds, [
            r.name for r in results if r is not base])
    # The same against the raw work plus the digest every verdict needs.
    sha_name = f"raw{args.workers}_sha"
    sha_ratio: dict[str, float] = {}
    if len(rounds.get(sha_name, [])) > 1:
        sha_ratio = print_round_ratios(sha_name, rounds, [
            r.name for r in results if r.name.startswith(("daemon", "engine"))])

    def mbps(name: str) -> float:
        r = next((r for r in results if r.name == name), None)
        return r.mbps if r else math.nan

    raw = base.mbps if base else math.nan
    daemon = mbps("daemon")
    engine = mbps("engine")
    if args.json:
        args.json.write_text(json.dumps({
            r.name: {"mbps": r.mbps, "files_per_s": r.files_per_s, "p50_ms": r.pct(0.5),
                     "p99_ms": r.pct(0.99), "matched": r.matched_files} for r in results
        }, indent=2))
    print(f"bench_scan: daemon_mbps={daemon:.1f} raw_mbps={raw:.1f} ratio={daemon / raw:.3f} "
          f"engine_mbps={engine:.1f} engine_ratio={engine / raw:.3f} "
          f"engine_fd_mbps={mbps('engine_fd'):.1f} raw1_mbps={mbps('raw1'):.1f} "
          f"daemon_round_ratio={round_ratio.get('daemon', math.nan):.3f} "
          f"daemon_frames_round_ratio={round_ratio.get('daemon_frames', math.nan):.3f} "
          f"daemon_fd_round_ratio={round_ratio.get('daemon_fd', math.nan):.3f} "
          f"daemon_c_mbps={mbps('daemon_c'):.1f} "
          f"daemon_c_round_ratio={round_ratio.get('daemon_c', math.nan):.3f} "
          f"raw_sha_mbps={mbps(sha_name):.1f} "
          f"daemon_c_sha_round_ratio={sha_ratio.get('daemon_c', math.nan):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
