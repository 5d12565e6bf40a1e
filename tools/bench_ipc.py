#!/usr/bin/env python3
"""Ping round trips through the daemon, beside two echo baselines, in one run.

    python tools/bench_ipc.py [--seconds S] [--rounds R] [--connections N] [--window W]

Three servers, each a real subprocess on its own Unix socket, all driven by
the same client code in this process:

* ``raw``    a blocking-socket echo server, one thread per connection, stdlib
  only: ``recv`` -> ``sendall`` of the same bytes. The floor of any Python server.
* ``trio``   a minimal trio + msgspec server: decode each ``ping`` frame with a
  typed decoder, answer an encoded ``pong``. What the daemon's stack costs at
  the least.
* ``daemon`` the real ``sentineld`` (default config) answering ``ping``.

Three loads, each measured for ``--seconds`` after a short warm-up, the
servers taking turns for ``--rounds`` rounds (medians reported; each ratio is
taken within a round, so machine noise hits both sides alike):

* ``seq``    one connection, one request at a time;
* ``pipe``   one connection, ``--window`` (64) requests in flight;
* ``conc``   ``--connections`` (16) connections, each one request at a time,
  driven by one epoll loop (so the client costs the same for every server).

For each: round trips per second, p50/p99 latency (us), and the ratios
trio/raw, daemon/raw and daemon/trio. The issue's bar: trio reaches ~50% of raw
on one connection and ~2x with 16 connections; the daemon's ping path should
stay within 80% of trio (daemon/trio >= 0.8).

The last line is machine-readable: ``bench_ipc: key=<float> ...``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentinel_ipc.codec import encode_framed  # noqa: E402
from sentinel_ipc.messages import Ping  # noqa: E402

SERVERS = ("raw", "trio", "daemon")
LOADS = ("seq", "pipe", "conc")
_FRAMES = [encode_framed(Ping(id=i)) for i in range(1, 4097)]


# ---------------------------------------------------------------------------
# Baseline servers (run as `bench_ipc.py --serve raw|trio --socket PATH`)
# ---------------------------------------------------------------------------


def serve_raw(path: str) -> None:
    """Blocking echo, one thread per connection."""

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(128)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()


def serve_trio(path: str) -> None:
    """trio + msgspec: typed decode of each frame, encoded reply, one send per read."""
    import msgspec
    import trio

    from sentinel_ipc.messages import Pong, Request

    decoder = msgspec.msgpack.Decoder(Request)
    encoder = msgspec.msgpack.Encoder()

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
                out = bytearray()
                pos = 0
                while len(buf) - pos >= 4:
                    size = int.from_bytes(buf[pos : pos + 4], "big")
                    if len(buf) - pos - 4 < size:
                        break
                    request = decoder.decode(buf[pos + 4 : pos + 4 + size])
                    pos += 4 + size
                    reply = encoder.encode(Pong(id=request.id))
                    out += len(reply).to_bytes(4, "big") + reply
                del buf[:pos]
                if out:
                    await stream.send_all(out)

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(128)
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(main)


# ---------------------------------------------------------------------------
# Client loads (in this process; identical for every server)
# ---------------------------------------------------------------------------


class Result:
    def __init__(self, count: int, elapsed: float, latencies: list[float]) -> None:
        self.count = count
        self.rps = count / elapsed
        #: Server CPU (user + system) per round trip, us: robust on a busy machine.
        self.cpu_us = 0.0
        ordered = sorted(latencies)
        self.p50 = ordered[len(ordered) // 2] * 1e6 if ordered else 0.0
        self.p99 = (
            ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6 if ordered else 0.0
        )


def _complete_frames(buf: bytearray) -> int:
    """Drop complete frames from the front of ``buf``; return how many."""
    pos = count = 0
    while len(buf) - pos >= 4:
        size = int.from_bytes(buf[pos : pos + 4], "big")
        if len(buf) - pos - 4 < size:
            break
        pos += 4 + size
        count += 1
    del buf[:pos]
    return count


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    return sock


def load_seq(path: Path, seconds: float) -> Result:
    latencies: list[float] = []
    buf = bytearray()
    clock = time.perf_counter
    with _connect(path) as sock:
        start = clock()
        deadline = start + seconds
        i = 0
        while (t0 := clock()) < deadline:
            sock.sendall(_FRAMES[i & 4095])
            i += 1
            while not _complete_frames(buf):
                buf += sock.recv(65536)
            latencies.append(clock() - t0)
        elapsed = clock() - start
    return Result(len(latencies), elapsed, latencies)


def load_pipe(path: Path, seconds: float, window: int) -> Result:
    latencies: list[float] = []
    sent: collections.deque[float] = collections.deque()
    buf = bytearray()
    clock = time.perf_counter
    i = 0
    with _connect(path) as sock:
        start = clock()
        deadline = start + seconds
        sock.sendall(b"".join(_FRAMES[j & 4095] for j in range(window)))
        sent.extend([start] * window)
        i = window
        while sent:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError("server closed the connection")
            buf += data
            done = _complete_frames(buf)
            now = clock()
            for _ in range(done):
                latencies.append(now - sent.popleft())
            if done and now < deadline:
                sock.sendall(b"".join(_FRAMES[(i + j) & 4095] for j in range(done)))
                i += done
                sent.extend([now] * done)
        elapsed = clock() - start
    return Result(len(latencies), elapsed, latencies)


def load_conc(path: Path, seconds: float, connections: int) -> Result:
    latencies: list[float] = []
    clock = time.perf_counter
    selector = selectors.DefaultSelector()
    socks = [_connect(path) for _ in range(connections)]
    state: dict[socket.socket, list[float]] = {}
    bufs = {s: bytearray() for s in socks}
    try:
        start = clock()
        deadline = start + seconds
        for n, s in enumerate(socks):
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
            state[s] = [clock()]
            s.send(_FRAMES[n])
        active = connections
        i = connections
        while active:
            for key, _ in selector.select():
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                buf = bufs[ready]
                buf += ready.recv(65536)
                if not _complete_frames(buf):
                    continue
                now = clock()
                latencies.append(now - state[ready][0])
                if now < deadline:
                    state[ready][0] = now
                    ready.send(_FRAMES[i & 4095])  # a ~20-byte frame: never partial
                    i += 1
                else:
                    selector.unregister(ready)
                    active -= 1
        elapsed = clock() - start
    finally:
        selector.close()
        for s in socks:
            s.close()
    return Result(len(latencies), elapsed, latencies)


# ---------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------


def _wait_answering(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError, RuntimeError):
            if path.exists():
                load_seq(path, 0.01)
                return
        time.sleep(0.05)
    raise RuntimeError(f"{path} not answering after {timeout}s")


@contextlib.contextmanager
def started(kind: str, base: Path) -> Iterator[subprocess.Popen[bytes]]:
    path = base / kind / "s.sock"
    path.parent.mkdir(mode=0o700)
    if kind == "daemon":
        (base / "daemon.toml").write_text('[logging]\nlevel = "warning"\n')
        command = [
            sys.executable,
            "-m",
            "sentinel_ipc.cli.sentineld",
            "--socket",
            str(path),
            "--data-dir",
            str(base / "data"),
            "--config",
            str(base / "daemon.toml"),
        ]
    else:
        command = [sys.executable, __file__, "--serve", kind, "--socket", str(path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _wait_answering(path, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds of the server process and its children (the daemon's workers)."""
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


def median_result(results: list[Result]) -> Result:
    """The round with the median throughput (its latencies and CPU go with it)."""
    return sorted(results, key=lambda r: r.rps)[len(results) // 2]


def run_loads(
    path: Path, proc: subprocess.Popen[bytes], args: argparse.Namespace
) -> dict[str, Result]:
    loads: dict[str, Callable[[float], Result]] = {
        "seq": lambda s: load_seq(path, s),
        "pipe": lambda s: load_pipe(path, s, args.window),
        "conc": lambda s: load_conc(path, s, args.connections),
    }
    server = psutil.Process(proc.pid)
    results = {}
    for name, load in loads.items():
        load(min(0.3, args.seconds))  # warm-up: caches, allocator, branch predictors
        before = _cpu(server)
        result = load(args.seconds)
        result.cpu_us = (_cpu(server) - before) / max(result.count, 1) * 1e6
        results[name] = result
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="per load, server and round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3,
                        help="servers take turns this many times; medians are reported")
    parser.add_argument("--window", type=int, default=64, help="requests in flight (pipe)")
    parser.add_argument("--only", choices=SERVERS, action="append", help="servers to run")
    parser.add_argument("--serve", choices=("raw", "trio"), help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            (serve_raw if args.serve == "raw" else serve_trio)(args.socket)
        return 0

    servers = args.only or list(SERVERS)
    base = Path(tempfile.mkdtemp(prefix="bench-ipc-"))
    rounds: list[dict[str, dict[str, Result]]] = []
    try:
        with contextlib.ExitStack() as stack:
            procs = {kind: stack.enter_context(started(kind, base)) for kind in servers}
            # Servers take turns, round after round: on a shared machine the
            # noise then hits every server alike, and the medians compare.
            for _ in range(args.rounds):
                rounds.append(
                    {kind: run_loads(base / kind / "s.sock", procs[kind], args)
                     for kind in servers}
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    results = {
        kind: {load: median_result([r[kind][load] for r in rounds]) for load in LOADS}
        for kind in servers
    }

    print(
        f"cpus={os.cpu_count()} seconds={args.seconds:g} window={args.window} "
        f"connections={args.connections} rounds={args.rounds} (medians)"
    )
    header = f"{'load':6} {'server':7} {'rt/s':>10} {'p50 us':>9} {'p99 us':>9} {'cpu us/rt':>10}"
    print(header)
    for load in LOADS:
        for kind in servers:
            r = results[kind][load]
            print(f"{load:6} {kind:7} {r.rps:10.0f} {r.p50:9.1f} {r.p99:9.1f} {r.cpu_us:10.2f}")
    fields: dict[str, float] = {}
    for load in LOADS:
        for kind in servers:
            r = results[kind][load]
            fields[f"{kind}_{load}_rps"] = r.rps
            fields[f"{kind}_{load}_p50_us"] = r.p50
            fields[f"{kind}_{load}_p99_us"] = r.p99
            fields[f"{kind}_{load}_cpu_us"] = r.cpu_us
        # Ratios are taken within each round (same machine state), then the median.
        for a, b in (("trio", "raw"), ("daemon", "raw"), ("daemon", "trio")):
            if a in results and b in results:
                fields[f"{a}_vs_{b}_{load}"] = statistics.median(
                    r[a][load].rps / r[b][load].rps for r in rounds
                )
        if "trio" in results and "daemon" in results:
            # Server CPU per round trip, trio echo over daemon: 1.0 = as cheap.
            fields[f"daemon_vs_trio_{load}_cpu"] = statistics.median(
                r["trio"][load].cpu_us / r["daemon"][load].cpu_us for r in rounds
            )
    if {"trio", "raw", "daemon"} <= set(results):
        print("ratios (rt/s):")
        for load in LOADS:
            print(
                f"  {load:5} trio/raw={fields[f'trio_vs_raw_{load}']:.2f} "
                f"daemon/raw={fields[f'daemon_vs_raw_{load}']:.2f} "
                f"daemon/trio={fields[f'daemon_vs_trio_{load}']:.2f} "
                f"(cpu per rt: {fields[f'daemon_vs_trio_{load}_cpu']:.2f})"
                f"{'' if fields[f'daemon_vs_trio_{load}'] >= 0.8 else '  below the 0.8 bar'}"
            )
    print("bench_ipc: " + " ".join(f"{k}={v:.4g}" for k, v in fields.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
