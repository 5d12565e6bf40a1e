"""Client-side cost per call: the client's ``ping()`` (breaker + retry policy +
id matching + per-call timeout + reader task) against a raw ``FramedConnection``
ping round trip, in the same run, against the same real daemon.

    python tools/bench_client.py [--batches 40] [--per-batch 300]

Batches alternate (raw, client, raw, client, ...) so that load on the machine
hits both alike; the figures are the median and the minimum of per-batch
means. The last line is machine-readable:

    bench_client: raw_us=<float> client_us=<float> added_us=<float> ratio=<float>

``ratio`` is added / raw (the issue's bar: < 0.05), from the medians.
Also printed: pipelined throughput with many callers on the one connection.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from sentinel_ipc.client import open_client
from sentinel_ipc.messages import Ping
from sentinel_ipc.transport import open_framed_connection


def start_daemon(base: Path) -> subprocess.Popen[bytes]:
    sock = base / "run" / "sentinel.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket", str(sock),
         "--data-dir", str(base / "data")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("bench_client: sentineld did not start")
        time.sleep(0.05)
    return proc


async def bench(sock: Path, batches: int, per_batch: int) -> tuple[float, float, float, float]:
    raw_means: list[float] = []
    client_means: list[float] = []
    async with open_framed_connection(sock) as conn, open_client(sock) as client:
        await client.ping()
        for i in range(per_batch):  # warm both paths
            await conn.send(Ping(id=i + 1))
            await conn.receive()
            await client.ping()
        next_id = per_batch + 1
        for _ in range(batches):
            start = time.perf_counter()
            for _ in range(per_batch):
                await conn.send(Ping(id=next_id))
                await conn.receive()
                next_id += 1
            raw_means.append((time.perf_counter() - start) / per_batch)
            start = time.perf_counter()
            for _ in range(per_batch):
                await client.ping()
            client_means.append((time.perf_counter() - start) / per_batch)

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
    return (
        statistics.median(raw_means),
        statistics.median(client_means),
        min(raw_means),
        min(client_means),
    ) + (pipelined,)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--per-batch", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-client-") as tmp:
        base = Path(tmp)
        proc = start_daemon(base)
        try:
            raw, client, raw_min, client_min, pipelined = trio.run(  # type: ignore[misc]
                bench, base / "run" / "sentinel.sock", args.batches, args.per_batch
            )
        finally:
            proc.terminate()
            proc.wait(20)
    added = client - raw
    print(f"raw FramedConnection ping round trip : median {raw * 1e6:8.1f} us   "
          f"min {raw_min * 1e6:8.1f} us")
    print(f"Client.ping() (breaker+retry+ids)    : median {client * 1e6:8.1f} us   "
          f"min {client_min * 1e6:8.1f} us")
    print(f"added per call                       : median {added * 1e6:8.1f} us   "
          f"min {(client_min - raw_min) * 1e6:8.1f} us")
    print(f"ratio added/raw                      : median {added / raw:8.3f}      "
          f"min {(client_min - raw_min) / raw_min:8.3f}")
    print(f"pipelined, 32 callers, one connection: {pipelined:8.0f} calls/s "
          f"(sequential raw: {1 / raw:8.0f}/s)")
    print(f"bench_client: raw_us={raw * 1e6:.2f} client_us={client * 1e6:.2f} "
          f"added_us={added * 1e6:.2f} ratio={added / raw:.4f}")


if __name__ == "__main__":
    main()
