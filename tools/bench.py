#!/usr/bin/env python3
"""Every benchmark in one command, one table: each figure beside its baseline
from the same run, and the ratio.

    python tools/bench.py [--quick] [--only ipc,resilience,client,scan,policy,recovery,memory]
                          [--markdown FILE]

Runs each tool in ``tools/`` as a subprocess, reads its machine-readable last
line (``<tool>: key=value ...``), and prints one table:

=========== ===================================================== =========================
step        figure                                                baseline (same run)
=========== ===================================================== =========================
ipc         daemon ping round trips/s (sequential, pipelined,      a minimal trio + msgspec
            16 connections)                                        echo server
resilience  a call through breaker + retry (ns)                    the same call, direct
client      the client library's ping (us)                         a raw framed ping
scan        daemon scan throughput (MB/s), signature-base rules,   raw yara-python in N
            a small corpus from /work/shared/bench/make_corpus.py  processes on the same rules
policy      decision p99 from the snapshot / from the database     dict lookup / indexed SELECT
recovery    back to normal after kill -9 / a database outage /     daemon cold start / the
            a worker crash loop / a full disk (tools/chaos.py)     breaker's open timeout
memory      daemon RSS idle, and after full scan load              a bare interpreter with the
                                                                   same libraries; RSS idle
=========== ===================================================== =========================

``--quick`` shortens every step (for a smoke run; the figures get noisier).
The scan step is skipped, with the reason, when ``/work/shared/bench`` (the
rule set and the corpus generator) is not there. A step that fails is
reported as such and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
SHARED = ROOT.parent / "shared" / "bench"
STEPS = ("ipc", "resilience", "client", "scan", "policy", "recovery", "memory")
LAST_LINE = re.compile(r"^(\w+): (.*)$")


@dataclass
class Row:
    step: str
    what: str
    figure: float | None
    baseline: float | None
    baseline_what: str
    unit: str
    bar: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.figure is None or not self.baseline:
            return None
        return self.figure / self.baseline


def run_tool(args: list[str], timeout: float, env: dict[str, str] | None = None
             ) -> tuple[dict[str, float], str]:
    """Run ``python tools/<args>``; the key=value pairs of its last machine line."""
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout,
        cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    out = proc.stdout
    for line in reversed(out.strip().splitlines()):
        match = LAST_LINE.match(line)
        if match and "=" in match.group(2):
            fields: dict[str, float] = {}
            for pair in match.group(2).split():
                key, _, value = pair.partition("=")
                try:
                    fields[key] = float(value.split("/")[0])
                except ValueError:
                    continue
            return fields, out
    raise RuntimeError(f"{args[0]} printed no machine-readable line (exit {proc.returncode}):\n"
                       f"{out[-1500:]}\n{proc.stderr[-1500:]}")


# --- the steps ------------------------------------------------------------------------


def step_ipc(quick: bool) -> list[Row]:
    seconds = "0.5" if quick else "2"
    f, _ = run_tool([str(TOOLS / "bench_ipc.py"), "--seconds", seconds], 600)
    rows = []
    for load, what in (("seq", "sequential, 1 connection"), ("pipe", "64 in flight, 1 connection"),
                       ("conc", "16 connections")):
        rows.append(Row("ipc", f"daemon ping round trips/s, {what}", f.get(f"daemon_{load}_rps"),
                        f.get(f"trio_{load}_rps"), "trio + msgspec echo", "rt/s", ">= 0.8"))
    rows.append(Row("ipc", "daemon ping p50 latency, sequential", f.get("daemon_seq_p50_us"),
                    f.get("trio_seq_p50_us"), "trio + msgspec echo", "us"))
    return rows


def step_resilience(quick: bool) -> list[Row]:
    calls = "50000" if quick else "200000"
    f, _ = run_tool([str(TOOLS / "bench_resilience.py"), "--calls", calls, "--repeat", "3"], 600)
    added, ratio = f["added_ns"], f["ratio"]
    direct = added / (ratio - 1) if ratio != 1 else None
    both = direct * ratio if direct is not None else None
    return [Row("resilience", "async call through breaker + retry", both, direct,
                "the same call, direct", "ns", "added < 10 ms (SPEC)",
                f"added {added:.0f} ns")]


def step_client(quick: bool) -> list[Row]:
    batches = "10" if quick else "40"
    f, _ = run_tool([str(TOOLS / "bench_client.py"), "--batches", batches], 600)
    return [Row("client", "client library ping (breaker, retry, id matching)", f["client_us"],
                f["raw_us"], "raw framed ping", "us", "added < 5% of a ping",
                f"added {f['added_us']:.1f} us")]


def step_scan(quick: bool) -> list[Row]:
    maker = SHARED / "make_corpus.py"
    rules = SHARED / "rules"
    if not maker.exists() or not rules.is_dir():
        return [Row("scan", "daemon scan throughput", None, None, "raw yara-python", "MB/s",
                    note=f"skipped: {SHARED} (rules and corpus generator) is not there")]
    corpus = Path(tempfile.mkdtemp(prefix="bench-corpus-"))
    try:
        mib, files = ("20", "40") if quick else ("60", "100")
        subprocess.run([sys.executable, str(maker), str(corpus), "--seed", "1",
                        "--total-mib", mib, "--files", files], check=True,
                       stdout=subprocess.DEVNULL, timeout=600)
        f, _ = run_tool([str(TOOLS / "bench_scan.py"), "--rules", str(rules), "--corpus",
                         str(corpus), "--modes", "rawN,daemon", "--rounds",
                         "1" if quick else "2"], 3600)
    finally:
        shutil.rmtree(corpus, ignore_errors=True)
    return [Row("scan", f"daemon scan throughput, signature-base rules, {mib} MiB corpus",
                f["daemon_mbps"], f["raw_mbps"], "raw yara-python, N processes", "MB/s",
                ">= 0.9")]


def step_policy(quick: bool) -> list[Row]:
    q = ["--queries", "5000", "--service-queries", "2000", "--record-queries", "500"] if quick \
        else []
    f, _ = run_tool([str(TOOLS / "bench_policy.py"), *q], 600)
    return [
        Row("policy", "decision p99 from the snapshot, 10,000 policies", f["snapshot_p99_us"],
            f["dict_p99_us"], "dict lookup", "us", "< 1000 us"),
        Row("policy", "decision p99 from the database, 10,000 policies", f["db_p99_us"],
            f["select_p99_us"], "indexed sqlite3 SELECT", "us", "< 5000 us"),
    ]


def step_recovery(quick: bool) -> list[Row]:
    out = Path(tempfile.mkstemp(prefix="bench-chaos-", suffix=".json")[1])
    try:
        run_tool([str(TOOLS / "chaos.py"), "--duration", "1", "--faults",
                  "daemon_kill,db_unreadable,workers_kill,disk_full", "--json", str(out)], 900)
        data = json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)
    faults = {f["name"]: f for f in data["faults"]}

    def rec(name: str) -> float | None:
        fault = faults.get(name)
        return None if fault is None or fault["skipped"] else fault["recovery"]

    skipped = faults.get("disk_full", {}).get("skipped")
    return [
        Row("recovery", "back to normal after kill -9 of the daemon", rec("daemon_kill"),
            data["startup_s"], "first start of the daemon", "s", "< 30 s (SPEC)"),
        Row("recovery", "back to normal after the database is readable again",
            rec("db_unreadable"), 2.0, "database breaker open timeout (config)", "s",
            "< open timeout + probe"),
        Row("recovery", "back to normal after a worker crash loop ends", rec("workers_kill"),
            3.0, "yara breaker open timeout (config)", "s", "< open timeout + probe"),
        Row("recovery", "back to normal after the full disk is freed", rec("disk_full"), 2.0,
            "database breaker open timeout (config)", "s", "< open timeout + probe",
            note=f"skipped: {skipped}" if skipped else ""),
    ]


BARE = ("import resource, trio, msgspec, yara, sqlite3, prometheus_client, psutil; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def step_memory(quick: bool) -> list[Row]:
    bare = subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True,
                          check=True, timeout=60)
    bare_mib = int(bare.stdout.strip()) / 1024
    sys.path.insert(0, str(TOOLS))
    from load import Daemon

    d = Daemon("").start()
    try:
        time.sleep(2.0)
        idle, idle_total = d.rss_mb()
    finally:
        d.stop()
    soak = "8" if quick else "30"
    out = Path(tempfile.mkstemp(prefix="bench-soak-", suffix=".json")[1])
    try:
        run_tool([str(TOOLS / "load.py"), "--only", "soak", "--soak", soak, "--json",
                  str(out)], 900)
        s = json.loads(out.read_text())["soak"]
    finally:
        out.unlink(missing_ok=True)
    return [
        Row("memory", "daemon RSS, idle (without its workers)", idle, bare_mib,
            "bare interpreter, same libraries", "MiB", "< +50 MB (SPEC)",
            f"+{idle - bare_mib:.1f} MiB; with workers {idle_total:.0f} MiB"),
        Row("memory", f"daemon RSS after {soak} s of full scan load", s["rss_end_mb"],
            s["rss_start_mb"], "RSS at the start of the load", "MiB", "bounded",
            f"{s['scans']} scans, {s['mb_per_s']:.0f} MB/s"),
    ]


STEP_FUNCS: dict[str, Callable[[bool], list[Row]]] = {
    "ipc": step_ipc, "resilience": step_resilience, "client": step_client, "scan": step_scan,
    "policy": step_policy, "recovery": step_recovery, "memory": step_memory,
}


# --- output ---------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | figure | baseline (same run) | ratio | bar | note |",
             "|---|---:|---:|---:|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        figure = "-" if r.figure is None else f"{fmt(r.figure)} {r.unit}"
        base = "-" if r.baseline is None else f"{fmt(r.baseline)} {r.unit} ({r.baseline_what})"
        lines.append(f"| {r.step}: {r.what} | {figure} | {base} | {ratio} | {r.bar} | "
                     f"{r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs, noisier figures")
    parser.add_argument("--only", type=lambda t: t.split(","), default=list(STEPS),
                        help=f"comma-separated steps (of: {', '.join(STEPS)})")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    unknown = set(args.only) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    rows: list[Row] = []
    failed = []
    started = time.monotonic()
    for step in STEPS:
        if step not in args.only:
            continue
        t0 = time.monotonic()
        print(f"== {step}", file=sys.stderr, flush=True)
        try:
            rows.extend(STEP_FUNCS[step](args.quick))
        except (RuntimeError, subprocess.SubprocessError, KeyError, OSError, ValueError) as exc:
            failed.append(step)
            rows.append(Row(step, "FAILED", None, None, "", "", note=str(exc).splitlines()[0]))
            print(f"   {step} failed: {exc}", file=sys.stderr)
        print(f"   {step}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    text = table(rows)
    header = (f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
              f"{time.strftime('%Y-%m-%d')}, {time.monotonic() - started:.0f} s"
              f"{', --quick' if args.quick else ''}")
    print(header)
    print(text)
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
