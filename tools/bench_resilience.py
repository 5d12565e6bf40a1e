#!/usr/bin/env python3
"""Cost of the resilience layer per call, side by side, in one run.

    python tools/bench_resilience.py [--calls N] [--repeat R]

Four ways to make the same call, on two paths:

* ``direct``   the call itself;
* ``breaker``  through a closed CircuitBreaker (database preset);
* ``retry``    through a RetryPolicy that succeeds first time (database preset);
* ``both``     breaker + retry together (what Sentinel's callers do).

``sync`` uses :func:`guarded_call_sync` around a plain function; ``async``
uses :func:`guarded_call` around an ``async def`` inside ``trio.run`` (the
production path). Each figure is the best of ``--repeat`` runs of ``--calls``
calls, GC off, in ns per call; "added" is the difference to ``direct`` on the
same path, "ratio" the quotient.

The last line is machine-readable and reports the async path, breaker and
retry together: ``bench_resilience: added_ns=<float> ratio=<float>``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel_ipc.resilience import (
    BREAKER_PRESETS,
    RETRY_PRESETS,
    CircuitBreaker,
    guarded_call,
    guarded_call_sync,
)

MODES = ("direct", "breaker", "retry", "both")


def payload(x: int) -> int:
    return x + 1


async def apayload(x: int) -> int:
    return x + 1


def best_of(repeat: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(repeat))


def bench_sync(calls: int, repeat: int) -> dict[str, float]:
    breaker = CircuitBreaker("database", BREAKER_PRESETS["database"], clock=time.monotonic)
    retry = RETRY_PRESETS["database"]
    variants: dict[str, Callable[[], object]] = {
        "direct": lambda: payload(1),
        "breaker": lambda: guarded_call_sync(payload, 1, breaker=breaker, operation="bench"),
        "retry": lambda: guarded_call_sync(payload, 1, retry=retry, operation="bench"),
        "both": lambda: guarded_call_sync(
            payload, 1, breaker=breaker, retry=retry, operation="bench"
        ),
    }
    results = {}
    for name, fn in variants.items():

        def run(fn: Callable[[], object] = fn) -> float:
            start = time.perf_counter_ns()
            for _ in range(calls):
                fn()
            return (time.perf_counter_ns() - start) / calls

        results[name] = best_of(repeat, run)
    return results


def bench_async(calls: int, repeat: int) -> dict[str, float]:
    results: dict[str, float] = {}

    async def main() -> None:
        breaker = CircuitBreaker("database", BREAKER_PRESETS["database"], clock=trio.current_time)
        retry = RETRY_PRESETS["database"]

        async def direct() -> object:
            return await apayload(1)

        async def via_breaker() -> object:
            return await guarded_call(apayload, 1, breaker=breaker, operation="bench")

        async def via_retry() -> object:
            return await guarded_call(apayload, 1, retry=retry, operation="bench")

        async def via_both() -> object:
            return await guarded_call(apayload, 1, breaker=breaker, retry=retry, operation="bench")

        variants: dict[str, Callable[[], Awaitable[object]]] = {
            "direct": direct,
            "breaker": via_breaker,
            "retry": via_retry,
            "both": via_both,
        }
        for name, fn in variants.items():
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter_ns()
                for _ in range(calls):
                    await fn()
                best = min(best, (time.perf_counter_ns() - start) / calls)
            results[name] = best
        stats = breaker.statistics()
        assert stats.successes == 2 * calls * repeat and stats.state == "closed"

    trio.run(main)
    return results


def report(path: str, results: dict[str, float]) -> None:
    base = results["direct"]
    print(f"{path}:")
    for name in MODES:
        ns = results[name]
        added = ns - base
        print(f"  {name:8s} {ns:9.1f} ns/call   added {added:8.1f} ns   ratio {ns / base:6.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        sync = bench_sync(args.calls, args.repeat)
        asyn = bench_async(args.calls, args.repeat)
    finally:
        if gc_was_enabled:
            gc.enable()
    print(f"python {sys.version.split()[0]}, {args.calls} calls x best of {args.repeat}")
    report("sync (guarded_call_sync)", sync)
    report("async (guarded_call, trio)", asyn)
    added = asyn["both"] - asyn["direct"]
    ratio = asyn["both"] / asyn["direct"]
    print(f"bench_resilience: added_ns={added:.1f} ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
