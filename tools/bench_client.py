"""Client-side cost per call: the client's ``ping()`` (breaker + retry policy +
id matching + per-call timeout + reader task) against a raw ``FramedConnection``
ping round trip, in the same run, against the same real daemon.

    python tools/bench_client.py [--batches 40] [--per-batch 300]

Batches alternate (raw, client, raw, client, ...) so that load on the machine
hits both alike; the figures are the median and the minimum of per-batch
means. The last line is machine-readable:

    bench_client: raw_us=<f> client_us=<f> added_us=<f> ratio=<f> added_cpu_us=<f> cpu_ratio=<f>

``ratio`` is added / raw (the issue's bar: < 0.05), from the medians of wall
time; ``cpu_ratio`` divides the client process's extra CPU time per call by
the same round trip (less sensitive to other load on the machine).
Also printed: pipelined throughput with many callers on the one connection.

    python tools/bench_client.py --scan-sizes 16,32,64,128,256 [--per-batch 300]

instead measures ``Client.scan(bytes)`` per buffer size (KiB), with the bytes
in ``scan`` frames (``memfd_min_bytes=None``, the baseline) and in a pooled
memfd passed with ``scan_fd`` (``memfd_min_bytes=0``), batches alternating, 4
calls in flight, against a daemon with its built-in rules: calls/s and the CPU
per call of the client, the daemon and its workers together. This is where
``ClientConfig.memfd_min_bytes`` (64 KiB) comes from. Last line:

    bench_client_scan: <kib>k_ratio=<memfd CPU / frames CPU> ...
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from sentinel_ipc.client import Client, ClientConfig, open_client
from sentinel_ipc.messages import Ping
from sentinel_ipc.transport import open_framed_connection


def start_daemon(base: Path, *extra: str) -> subprocess.Popen[bytes]:
    sock = base / "run" / "sentinel.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket", str(sock),
         "--data-dir", str(base / "data"), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench_client: sentineld did not start")
        time.sleep(0.05)
    return proc


async def bench(sock: Path, batches: int, per_batch: int) -> dict[str, float]:
    raw_means: list[float] = []
    client_means: list[float] = []
    raw_cpu: list[float] = []
    client_cpu: list[float] = []
    async with open_framed_connection(sock) as conn, open_client(sock) as client:
        await client.ping()
        for i in range(per_batch):  # warm both paths
            await conn.send(Ping(id=i + 1))
            await conn.receive()
            await client.ping()
        next_id = per_batch + 1
        for _ in range(batches):
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(per_batch):
                await conn.send(Ping(id=next_id))
                await conn.receive()
                next_id += 1
            raw_means.append((time.perf_counter() - start) / per_batch)
            raw_cpu.append((time.process_time() - cpu) / per_batch)
            cpu, start = time.process_time(), time.perf_counter()
            for _ in range(per_batch):
                await client.ping()
            client_means.append((time.perf_counter() - start) / per_batch)
            client_cpu.append((time.process_time() - cpu) / per_batch)

        # Pipelining: many callers sharing the one connection.
        callers, calls = 32, per_batch * 4

        async def caller(n: int) -> None:
            for _ in range(n):
                await client.ping()

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller, calls // callers)
        pipelined = calls / (time.perf_counter() - start)
        assert client.connects == 1
    return {
        "raw": statistics.median(raw_means),
        "client": statistics.median(client_means),
        "raw_min": min(raw_means),
        "client_min": min(client_means),
        "raw_cpu": sum(raw_cpu) / len(raw_cpu),
        "client_cpu": sum(client_cpu) / len(client_cpu),
        "pipelined": pipelined,
    }


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process, of its children it has reaped and of its live
    ones: the daemon and its workers, including the workers recycled meanwhile."""
    import psutil

    root = psutil.Process(pid)
    mine = root.cpu_times()
    total = mine.user + mine.system + mine.children_user + mine.children_system
    for child in root.children():
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:  # reaped since: counted in children_* next time
            continue
        total += times.user + times.system
    return total


async def _scan_calls(client: Client, data: bytes, calls: int, in_flight: int) -> None:
    left = calls

    async def caller() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await client.scan(data, filename="bench.bin")

    async with trio.open_nursery() as nursery:
        for _ in range(in_flight):
            nursery.start_soon(caller)


async def bench_scan_sizes(
    sock: Path, daemon_pid: int, sizes_kib: list[int], batches: int, per_batch: int
) -> dict[int, dict[str, list[float]]]:
    """Per size and path: calls/s and CPU per call (client + daemon tree), per batch."""
    paths = {"frames": ClientConfig(memfd_min_bytes=None), "memfd": ClientConfig(memfd_min_bytes=0)}
    found: dict[int, dict[str, list[float]]] = {}
    for kib in sizes_kib:
        data = os.urandom(kib * 1024)
        rows = found[kib] = {f"{p}_{k}": [] for p in paths for k in ("rate", "cpu")}
        for batch in range(batches + 1):  # batch 0 warms both paths up
            for name, config in paths.items():
                async with open_client(sock, config=config) as client:
                    cpu = time.process_time() + _tree_cpu(daemon_pid)
                    start = time.perf_counter()
                    await _scan_calls(client, data, per_batch, in_flight=4)
                    wall = time.perf_counter() - start
                    cpu = time.process_time() + _tree_cpu(daemon_pid) - cpu
                if batch:
                    rows[f"{name}_rate"].append(per_batch / wall)
                    rows[f"{name}_cpu"].append(cpu / per_batch)
    return found


def report_scan_sizes(found: dict[int, dict[str, list[float]]]) -> None:
    med = statistics.median
    print("size KiB   frames calls/s  CPU us/call   memfd calls/s  CPU us/call   "
          "memfd/frames CPU")
    ratios = []
    for kib, rows in found.items():
        ratio = med(m / f for m, f in zip(rows["memfd_cpu"], rows["frames_cpu"], strict=True))
        ratios.append(f"{kib}k_ratio={ratio:.3f}")
        print(f"{kib:8d} {med(rows['frames_rate']):15.0f} {med(rows['frames_cpu']) * 1e6:12.0f} "
              f"{med(rows['memfd_rate']):15.0f} {med(rows['memfd_cpu']) * 1e6:12.0f} "
              f"{ratio:18.3f}")
    print("(CPU: the client, the daemon and its workers, per call; medians of the batches;"
          " the ratio is taken within each batch pair)")
    print("bench_client_scan: " + " ".join(ratios))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=None,
                        help="default 40 (ping), 5 (--scan-sizes)")
    parser.add_argument("--per-batch", type=int, default=300)
    parser.add_argument("--scan-sizes", type=lambda t: [int(x) for x in t.split(",")],
                        help="KiB, comma-separated: Client.scan(bytes), frames vs memfd")
    args = parser.parse_args()
    if args.scan_sizes:
        with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
            base = Path(tmp)
            config = base / "sentinel.toml"
            # Scans as fast as the machine allows: no per-peer rate limit in the way.
            config.write_text("[rate_limit]\nburst = 1000000\nscans_per_second = 1000000.0\n")
            proc = start_daemon(base, "--config", str(config))
            try:
                found = trio.run(bench_scan_sizes, base / "run" / "sentinel.sock", proc.pid,
                                 args.scan_sizes, args.batches or 5, args.per_batch)
            finally:
                proc.terminate()
                proc.wait(20)
        report_scan_sizes(found)
        return
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        base = Path(tmp)
        proc = start_daemon(base)
        try:
            r = trio.run(bench, base / "run" / "sentinel.sock", args.batches or 40,
                         args.per_batch)
        finally:
            proc.terminate()
            proc.wait(20)
    raw, client = r["raw"], r["client"]
    added = client - raw
    cpu_added = r["client_cpu"] - r["raw_cpu"]
    us = 1e6
    print("                                       wall median   wall min   client CPU")
    print(f"raw FramedConnection ping round trip : {raw * us:9.1f} us {r['raw_min'] * us:8.1f} us"
          f" {r['raw_cpu'] * us:8.1f} us")
    print(f"Client.ping() (breaker+retry+ids)    : {client * us:9.1f} us "
          f"{r['client_min'] * us:8.1f} us {r['client_cpu'] * us:8.1f} us")
    print(f"added per call                       : {added * us:9.1f} us "
          f"{(r['client_min'] - r['raw_min']) * us:8.1f} us {cpu_added * us:8.1f} us")
    print(f"ratio added / raw round trip         : {added / raw:9.3f}    "
          f"{(r['client_min'] - r['raw_min']) / r['raw_min']:8.3f}    {cpu_added / raw:8.3f}")
    print(f"pipelined, 32 callers, one connection: {r['pipelined']:8.0f} calls/s "
          f"(sequential raw: {1 / raw:6.0f}/s)")
    print("(wall figures swing with machine load; the client-CPU column is the client's "
          "own work per call, the steadier measure of its added cost)")
    print(f"bench_client: raw_us={raw * us:.2f} client_us={client * us:.2f} "
          f"added_us={added * us:.2f} ratio={added / raw:.4f} "
          f"added_cpu_us={cpu_added * us:.2f} cpu_ratio={cpu_added / raw:.4f}")


if __name__ == "__main__":
    main()
