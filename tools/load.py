#!/usr/bin/env python3
"""Load and exhaustion: many connections, slowloris, a scan flood, a soak.

    python tools/load.py [--connections 1000] [--slowloris 20] [--flood-seconds 6]
                         [--soak 600] [--only connections,flood,soak]

Three scenarios, each against its own real ``sentineld`` (temp dirs):

``connections``
    ``--connections`` (1000, the daemon's ``max_connections``) connections are
    opened and held: most idle, ``--slowloris`` of them dribbling one byte of a
    frame every 0.5 s, one used to ask ``health`` over and over. Measured: the
    health latency (the bar: 50 ms) while all are held; that connection 1,001
    is answered ``busy`` (and closed); that the slowloris senders are cut at the
    daemon's ``frame_read_timeout`` (set to ``--slowloris-timeout``) while the
    idle connections stay open.

``flood``
    A client of another uid (``nobody``, via setpriv: the rate limit is per
    peer uid) floods scans on several connections, many in flight; it must get
    ``rate_limited``. Meanwhile a polite client (our uid) scans at 5 per second
    (under its own limit); its latency with the flood is compared with its
    latency alone (the bar: not slowed by more than 2x). Skipped, with the
    reason, when we cannot become another uid.

``soak``
    Full scan load (``--clients`` connections, ``--in-flight`` scans each, rate
    limits lifted) for ``--soak`` seconds on a small generated corpus; the
    daemon's RSS (and its workers') sampled every few seconds: start, peak,
    end. The bar: memory stays bounded (no steady growth).

The soft ``RLIMIT_NOFILE`` of this process is raised (the daemon inherits it);
``--daemon-nofile`` sets the daemon's own soft limit instead, to see what it
does with fewer descriptors than connections.

Last line (machine-readable)::

    load: health_p99_ms=F busy_ok=0|1 slowloris_cut=N/N flood_rate_limited=N
          others_slowdown=F soak_rss_start_mb=F soak_rss_end_mb=F
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import CorpusFile, make_corpus, pct  # noqa: E402

from sentinel_ipc.client import ClientConfig, open_client  # noqa: E402
from sentinel_ipc.codec import encode_framed  # noqa: E402
from sentinel_ipc.errors import SentinelError  # noqa: E402
from sentinel_ipc.messages import (  # noqa: E402
    Error,
    Health,
    HealthReport,
    Metrics,
    MetricsReport,
    Ping,
)
from sentinel_ipc.transport import (  # noqa: E402
    FramedConnection,
    connect_unix,
    open_framed_connection,
)

NOBODY = 65534


# --- a daemon --------------------------------------------------------------------------


class Daemon:
    """A sentineld in its own temp dir with the given TOML config."""

    def __init__(self, config: str, nofile: int | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="sentinel-load-"))
        self.socket_path = self.base / "run" / "sentinel.sock"
        self.log_path = self.base / "sentineld.log"
        (self.base / "sentineld.toml").write_text(config)
        self.nofile = nofile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sentinel_ipc.cli.sentineld",
                 "--socket", str(self.socket_path), "--data-dir", str(self.base / "data"),
                 "--config", str(self.base / "sentineld.toml")],
                stdout=log, stderr=log, cwd=str(ROOT), preexec_fn=limit,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + 60
        while not blocking_ping(self.socket_path):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sentineld did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> tuple[float, float]:
        """(daemon, daemon + workers) RSS in MiB."""
        proc = psutil.Process(self.pid)
        own = proc.memory_info().rss
        total = own
        for child in proc.children():
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss
        return own / 2**20, total / 2**20

    def stop(self) -> int:
        code = -9
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            code = self.proc.returncode
        if os.environ.get("SENTINEL_LOAD_KEEP"):
            print(f"  (kept {self.base})")
        else:
            shutil.rmtree(self.base, ignore_errors=True)
        return code


@contextlib.contextmanager
def daemon(config: str, nofile: int | None = None) -> Iterator[Daemon]:
    d = Daemon(config, nofile).start()
    try:
        yield d
    finally:
        code = d.stop()
        if code != 0:
            print(f"  (sentineld exited {code})")


def blocking_ping(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(str(path))
            s.sendall(encode_framed(Ping(id=1)))
            return s.recv(64)[4:5] != b""
    except OSError:
        return False


def raise_nofile(want: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        soft = min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


# --- connections + slowloris -----------------------------------------------------------


async def scenario_connections(args: argparse.Namespace) -> dict[str, Any]:
    total = args.connections
    config = (f"[server]\nmax_connections = {total}\n"
              f"frame_read_timeout = {args.slowloris_timeout}\n")
    result: dict[str, Any] = {}
    with daemon(config, args.daemon_nofile) as d:
        path = d.socket_path
        idle: list[socket.socket] = []
        slow: list[socket.socket] = []
        opened_at = time.monotonic()
        # The probe first, so that it is surely among those accepted.
        probe = FramedConnection(await connect_unix(path), 64 * 2**20)
        await probe_health(probe)
        try:
            for i in range(total - 1):
                s = await connect_patiently(path, deadline=time.monotonic() + 10)
                (slow if i < args.slowloris else idle).append(s)
            open_s = time.monotonic() - opened_at
            # Wait until the daemon has accepted them all (connect() returns from the backlog).
            with trio.move_on_after(10):
                while await active_connections(probe) < total:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            result["accepted"] = await active_connections(probe)
            busy_reply = await one_more(path)  # all held: number max+1 is refused
            cut: dict[int, float] = {}
            latencies: list[float] = []
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for n, s in enumerate(slow):
                    nursery.start_soon(slowloris, s, n, cut, started)
                # Sample health for the slowloris timeout and a bit; then, on a
                # loaded machine, keep waiting (bounded) for late cuts rather
                # than count a slowloris the daemon cut a moment late as kept.
                deadline = started + args.slowloris_timeout + 1.5
                give_up = deadline + 15
                while time.monotonic() < deadline or (
                    len(cut) < len(slow) and time.monotonic() < give_up
                ):
                    t0 = time.perf_counter()
                    await probe_health(probe)
                    latencies.append(time.perf_counter() - t0)
                    await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            after_cut = await one_more(path)  # the slowloris slots are free again
            idle_open = sum(1 for s in idle if still_open(s))
            probe.close()
        finally:
            for s in idle + slow:
                s.close()
        result |= {
            "connections": total,
            "open_seconds": open_s,
            "health_samples": len(latencies),
            "health_p50_ms": float(pct(latencies, 50)),
            "health_p99_ms": float(pct(latencies, 99)),
            "health_max_ms": max(latencies) * 1000,
            "busy": busy_reply,
            "busy_ok": busy_reply.startswith("busy"),
            "after_cut": after_cut,
            "slowloris": len(slow),
            "slowloris_cut": len(cut),
            "slowloris_cut_after_s": (statistics.median(cut.values()) if cut else None),
            "idle_still_open": idle_open,
            "idle": len(idle),
        }
    return result


async def connect_patiently(path: Path, deadline: float) -> socket.socket:
    """A non-blocking connect that waits while the daemon's listen backlog is full
    (EAGAIN on a Unix socket) instead of failing."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    while True:
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise RuntimeError("the daemon accepts no more connections (backlog full "
                                   "for 10 s: out of descriptors?)") from None
            await trio.sleep(0.005)


async def active_connections(conn: FramedConnection) -> int:
    """The daemon's own count, read at scrape time from its metrics."""
    await conn.send(Metrics(id=3))
    reply = await conn.receive()
    assert isinstance(reply, MetricsReport), reply
    for line in reply.text.splitlines():
        if line.startswith("sentinel_ipc_connections_active "):
            return int(float(line.split()[1]))
    return 0


async def probe_health(conn: FramedConnection) -> HealthReport:
    await conn.send(Health(id=1))
    reply = await conn.receive()
    assert isinstance(reply, HealthReport), reply
    return reply


async def slowloris(s: socket.socket, n: int, cut: dict[int, float], started: float) -> None:
    """One byte of a 1 KiB frame every 0.5 s; note when the daemon hangs up."""
    data = struct.pack(">I", 1024) + b"\x82" + b"x" * 1023
    sock = trio.socket.from_stdlib_socket(s)
    for byte in data:
        try:
            await sock.send(bytes([byte]))
        except OSError:
            break
        with trio.move_on_after(0.5):
            with contextlib.suppress(OSError):
                await sock.recv(4096)
            # Anything at all (the ``timeout`` error frame, or EOF): we were cut.
            cut[n] = time.monotonic() - started
            return
    cut.setdefault(n, time.monotonic() - started)


async def one_more(path: Path) -> str:
    """Connection number max+1: what does it get?"""
    try:
        sock = await connect_unix(path)
    except SentinelError as exc:
        return f"connect failed: {exc.message}"
    conn = FramedConnection(sock, 2**20)
    try:
        with trio.move_on_after(5):
            await conn.send(Ping(id=2))
            reply = await conn.receive()
            if isinstance(reply, Error):
                return f"{reply.code} (id {reply.id}, retry_after_ms {reply.retry_after_ms})"
            return type(reply).__name__
        return "no answer within 5 s"
    except SentinelError as exc:
        return f"closed: {exc.message}"
    finally:
        conn.close()


def still_open(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


# --- flood -----------------------------------------------------------------------------

FLOODER = r"""
import json, socket, struct, sys, time, os
sys.path.insert(0, os.environ["SENTINEL_ROOT"])
from sentinel_ipc.codec import encode_framed, decode_reply
from sentinel_ipc.messages import Scan, Error
path, seconds, conns, window = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = os.urandom(64 * 1024)
socks = []
for _ in range(conns):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.setblocking(True)
    socks.append([s, b"", 0])
counts = {}
next_id = 1
end = time.monotonic() + seconds
import selectors
sel = selectors.DefaultSelector()
for entry in socks:
    sel.register(entry[0], selectors.EVENT_READ, entry)
while time.monotonic() < end:
    for entry in socks:
        while entry[2] < window:
            entry[0].sendall(encode_framed(Scan(id=next_id, data=data)))
            next_id += 1
            entry[2] += 1
    for key, _ in sel.select(0.05):
        entry = key.data
        chunk = entry[0].recv(1 << 20)
        if not chunk:
            raise SystemExit("daemon closed a flood connection")
        entry[1] += chunk
        while len(entry[1]) >= 4 and len(entry[1]) >= 4 + int.from_bytes(entry[1][:4], "big"):
            size = int.from_bytes(entry[1][:4], "big")
            reply = decode_reply(entry[1][4:4 + size])
            entry[1] = entry[1][4 + size:]
            entry[2] -= 1
            key_ = reply.code if isinstance(reply, Error) else type(reply).__name__
            counts[key_] = counts.get(key_, 0) + 1
print(json.dumps(counts))
"""


async def polite(
    path: Path, seconds: float, rate: float, data: bytes
) -> tuple[list[float], Counter[str]]:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    async with open_client(path, config=ClientConfig(client_name="polite")) as client:
        await client.ping()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                await client.scan(data, filename="polite.bin")
                latencies.append(time.perf_counter() - t0)
            except SentinelError as exc:
                errors[exc.code] += 1
            await trio.sleep(max(0.0, 1 / rate - (time.perf_counter() - t0)))
    return latencies, errors


async def scenario_flood(args: argparse.Namespace) -> dict[str, Any]:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return {"skipped": "needs root and setpriv to flood as another uid (rate limits "
                           "are per peer uid)"}
    config = "[server]\nsocket_mode = 0o666\n"
    data = random.Random(1).randbytes(32 * 1024)
    with daemon(config, args.daemon_nofile) as d:
        os.chmod(d.base, 0o711)
        os.chmod(d.socket_path.parent, 0o711)
        alone, alone_errors = await polite(d.socket_path, args.flood_seconds, 5.0, data)
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               sys.executable, "-c", FLOODER, str(d.socket_path), str(args.flood_seconds + 1.0),
               str(args.flood_connections), "32"]
        async with trio.open_nursery() as nursery:
            flood: list[Any] = []

            async def run_flooder() -> None:
                done = await trio.run_process(
                    cmd, capture_stdout=True, capture_stderr=True, check=False, cwd="/",
                    env={**os.environ, "SENTINEL_ROOT": str(ROOT)},
                )
                flood.append(done)

            nursery.start_soon(run_flooder)
            await trio.sleep(0.5)  # the flood is on
            during, during_errors = await polite(d.socket_path, args.flood_seconds, 5.0, data)
        done = flood[0]
        if done.returncode != 0:
            raise RuntimeError(f"flooder failed: {done.stderr.decode()[-2000:]}")
        counts = json.loads(done.stdout)
    p50_alone, p50_during = statistics.median(alone), statistics.median(during)
    return {
        "flood": counts,
        "flood_rate_limited": counts.get("rate_limited", 0),
        "flood_verdicts": counts.get("ScanResult", 0),
        "polite_alone_p50_ms": p50_alone * 1000,
        "polite_alone_p99_ms": float(pct(alone, 99)),
        "polite_flood_p50_ms": p50_during * 1000,
        "polite_flood_p99_ms": float(pct(during, 99)),
        "polite_scans": len(alone) + len(during),
        "polite_errors": dict(alone_errors + during_errors),
        "slowdown": p50_during / p50_alone,
    }


# --- soak ------------------------------------------------------------------------------


async def scenario_soak(args: argparse.Namespace) -> dict[str, Any]:
    config = ("[rate_limit]\nburst = 1000000\nscans_per_second = 1000000.0\n"
              "max_concurrent_scans_per_connection = 64\n")
    corpus_dir = Path(tempfile.mkdtemp(prefix="sentinel-load-corpus-"))
    corpus = make_corpus(corpus_dir, random.Random(7))
    counts: Counter[str] = Counter()
    samples: list[tuple[float, float, float]] = []
    try:
        with daemon(config, args.daemon_nofile) as d:
            stop = trio.Event()

            async def scanner(seed: int) -> None:
                rng = random.Random(seed)
                async with open_client(d.socket_path, config=ClientConfig(client_name="soak")) \
                        as client:

                    async def loop() -> None:
                        while not stop.is_set():
                            f: CorpusFile = rng.choice(corpus)
                            try:
                                if len(f.data) > 1024 * 1024:
                                    await client.scan_stream(f.path, filename=f.name)
                                else:
                                    await client.scan(f.data, filename=f.name)
                                counts["verdict"] += 1
                                counts["bytes"] += len(f.data)
                            except SentinelError as exc:
                                counts[exc.code] += 1

                    async with trio.open_nursery() as inner:
                        for _ in range(args.in_flight):
                            inner.start_soon(loop)

            probe_s: dict[str, list[float]] = {"health": [], "metrics": []}

            async def prober() -> None:
                """Issue 6's bar: health and metrics answer fast under full scan load."""
                async with open_framed_connection(d.socket_path) as conn:
                    n = 0
                    while not stop.is_set():
                        probes = (("health", Health(id=n)), ("metrics", Metrics(id=n)))
                        for kind, request in probes:
                            t0 = time.perf_counter()
                            await conn.send(request)
                            await conn.receive()
                            probe_s[kind].append(time.perf_counter() - t0)
                        n += 1
                        await trio.sleep(0.2)

            start = time.monotonic()
            async with trio.open_nursery() as nursery:
                for i in range(args.clients):
                    nursery.start_soon(scanner, i)
                warmup = min(5.0, args.soak * 0.1)
                await trio.sleep(warmup)
                nursery.start_soon(prober)
                interval = max(1.0, min(10.0, args.soak / 20))
                while time.monotonic() - start < args.soak:
                    own, total = d.rss_mb()
                    samples.append((time.monotonic() - start, own, total))
                    left = args.soak - (time.monotonic() - start)
                    await trio.sleep(min(interval, max(0.0, left)))
                own, total = d.rss_mb()
                samples.append((time.monotonic() - start, own, total))
                stop.set()
            elapsed = time.monotonic() - start
            alive = blocking_ping(d.socket_path)
    finally:
        shutil.rmtree(corpus_dir, ignore_errors=True)
    return {
        "seconds": elapsed,
        "scans": counts["verdict"],
        "scans_per_s": counts["verdict"] / elapsed,
        "mb_per_s": counts["bytes"] / elapsed / 2**20,
        "errors": {k: v for k, v in counts.items() if k not in ("verdict", "bytes")},
        "rss_start_mb": samples[0][1],
        "rss_end_mb": samples[-1][1],
        "rss_peak_mb": max(s[1] for s in samples),
        "total_start_mb": samples[0][2],
        "total_end_mb": samples[-1][2],
        "samples": samples,
        "alive": alive,
        **{
            f"{kind}_p{q}_ms": float(pct(values, q)) if values else 0.0
            for kind, values in probe_s.items()
            for q in (50, 99)
        },
    }


# --- main ------------------------------------------------------------------------------


def print_report(results: dict[str, dict[str, Any]]) -> None:
    c, f, s = results.get("connections"), results.get("flood"), results.get("soak")
    print()
    print("| scenario | measure | value |")
    print("|---|---|---:|")
    if c:
        print(f"| connections | held, as counted by the daemon (max_connections) | "
              f"{c['accepted']} ({c['connections']}) |")
        print(f"| connections | health latency p50 / p99 / max (ms), {c['health_samples']} "
              f"samples | {c['health_p50_ms']:.1f} / {c['health_p99_ms']:.1f} / "
              f"{c['health_max_ms']:.1f} |")
        print(f"| connections | connection {c['connections'] + 1} | {c['busy']} |")
        print(f"| connections | a new connection once the slowloris are cut | "
              f"{c['after_cut']} |")
        after = c["slowloris_cut_after_s"]
        print(f"| connections | slowloris cut / sent (median after s) | {c['slowloris_cut']} / "
              f"{c['slowloris']} ({'-' if after is None else f'{after:.1f}'}) |")
        print(f"| connections | idle connections still open | {c['idle_still_open']} / "
              f"{c['idle']} |")
    if f:
        if "skipped" in f:
            print(f"| flood | skipped | {f['skipped']} |")
        else:
            print(f"| flood | flooder (nobody) replies | {json.dumps(f['flood'])} |")
            print(f"| flood | polite p50 alone / during flood (ms) | "
                  f"{f['polite_alone_p50_ms']:.1f} / {f['polite_flood_p50_ms']:.1f} |")
            print(f"| flood | polite p99 alone / during flood (ms) | "
                  f"{f['polite_alone_p99_ms']:.1f} / {f['polite_flood_p99_ms']:.1f} |")
            print(f"| flood | polite slowdown (p50 ratio; bar 2x) | {f['slowdown']:.2f} |")
            print(f"| flood | polite errors | {json.dumps(f['polite_errors'])} |")
    if s:
        print(f"| soak | {s['seconds']:.0f} s: scans, scans/s, MB/s | {s['scans']}, "
              f"{s['scans_per_s']:.0f}, {s['mb_per_s']:.1f} |")
        print(f"| soak | daemon RSS start / peak / end (MiB) | {s['rss_start_mb']:.1f} / "
              f"{s['rss_peak_mb']:.1f} / {s['rss_end_mb']:.1f} |")
        print(f"| soak | daemon + workers RSS start / end (MiB) | {s['total_start_mb']:.1f} / "
              f"{s['total_end_mb']:.1f} |")
        print(f"| soak | errors | {json.dumps(s['errors'])} |")
        print(f"| soak | health p50 / p99 (ms) under full scan load | {s['health_p50_ms']:.1f} / "
              f"{s['health_p99_ms']:.1f} |")
        print(f"| soak | metrics p50 / p99 (ms) under full scan load | "
              f"{s['metrics_p50_ms']:.1f} / {s['metrics_p99_ms']:.1f} |")
    parts = []
    if c:
        parts += [f"health_p99_ms={c['health_p99_ms']:.1f}", f"busy_ok={int(c['busy_ok'])}",
                  f"slowloris_cut={c['slowloris_cut']}/{c['slowloris']}"]
    if f and "skipped" not in f:
        parts += [f"flood_rate_limited={f['flood_rate_limited']}",
                  f"others_slowdown={f['slowdown']:.2f}"]
    if s:
        parts += [f"soak_rss_start_mb={s['rss_start_mb']:.1f}",
                  f"soak_rss_end_mb={s['rss_end_mb']:.1f}"]
    print("load: " + " ".join(parts))


async def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name, scenario in (("connections", scenario_connections), ("flood", scenario_flood),
                           ("soak", scenario_soak)):
        if name not in args.only:
            continue
        print(f"== {name}", flush=True)
        results[name] = await scenario(args)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--slowloris", type=int, default=20)
    parser.add_argument("--slowloris-timeout", type=float, default=3.0,
                        help="the daemon's server.frame_read_timeout for this scenario")
    parser.add_argument("--flood-seconds", type=float, default=6.0)
    parser.add_argument("--flood-connections", type=int, default=4)
    parser.add_argument("--soak", type=float, default=600.0, help="seconds of full scan load")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--only", type=lambda t: t.split(","),
                        default=["connections", "flood", "soak"])
    parser.add_argument("--daemon-nofile", type=int, default=None,
                        help="the daemon's soft RLIMIT_NOFILE (default: inherit ours)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    raise_nofile(args.connections + 512)
    results = trio.run(run, args)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    c, f, s = results.get("connections"), results.get("flood"), results.get("soak")
    failed = bool(
        (c and (not c["busy_ok"] or c["idle_still_open"] < c["idle"]))
        or (f and "skipped" not in f and (not f["flood_rate_limited"] or f["polite_errors"]))
        or (s and (not s["alive"] or s["errors"]))
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
