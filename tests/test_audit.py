"""The audit log: JSON Lines, size rotation, never blocking, drops counted."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import trio

from sentinel_ipc.audit import AuditLog, open_audit_log


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


async def test_events_are_json_lines_with_time_and_kind(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with open_audit_log(path) as audit:
        assert audit.record(
            "policy_add", policy_id=3, path=tmp_path, tags={"b", "a"}, err=ValueError("x")
        )
        audit.record("detection", sha256="ab" * 32, rules=["EICAR"])
    got = lines(path)
    assert [e["kind"] for e in got] == ["policy_add", "detection"]
    assert got[0]["policy_id"] == 3 and got[0]["path"] == str(tmp_path)
    assert sorted(got[0]["tags"]) == ["a", "b"] and got[0]["err"] == "ValueError: x"
    assert abs(got[0]["ts"] - time.time()) < 60
    assert os.stat(path).st_mode & 0o777 == 0o600


async def test_rotation_by_size_keeps_the_configured_backups(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with open_audit_log(path, max_bytes=2048, backups=3) as audit:
        for i in range(400):
            audit.record("detection", n=i, pad="x" * 40)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert all(p.stat().st_size <= 2048 for p in tmp_path.iterdir())
    # newest events in the live file, older in .1, and in order across the set
    kept = [e["n"] for name in reversed(files[1:]) for e in lines(tmp_path / name)]
    kept += [e["n"] for e in lines(path)]
    assert kept == sorted(kept) and kept[-1] == 399
    assert audit.statistics().rotations >= 3


async def test_record_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    """A wedged writer (the file system stalls): record() still returns at once;
    what does not fit is counted and reported in an audit_dropped line."""
    audit = AuditLog(tmp_path / "audit.jsonl", queue_size=5)
    audit.start()
    gate = threading.Event()
    real_write = audit._write_batch

    def stalled(batch: list[object]) -> None:
        gate.wait(5)
        real_write(batch)

    audit._write_batch = stalled  # type: ignore[method-assign]
    audit.record("first")
    await trio.sleep(0.05)  # the writer has taken it and is stuck
    start = time.perf_counter()
    results = [audit.record("e", n=i) for i in range(100)]
    assert time.perf_counter() - start < 0.5
    assert results.count(True) == 5 and audit.statistics().dropped == 95
    gate.set()
    await trio.to_thread.run_sync(audit.close)
    got = lines(tmp_path / "audit.jsonl")
    dropped = [e for e in got if e["kind"] == "audit_dropped"]
    assert dropped and dropped[0]["count"] == 95
    assert sum(e["kind"] == "e" for e in got) == 5


async def test_write_errors_do_not_kill_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    async with open_audit_log(path) as audit:
        audit.record("before")
        await trio.sleep(0.05)
        # The disk fills up under the writer: its descriptor now points at /dev/full (ENOSPC).
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, audit._file.fileno())
        os.close(full)
        audit.record("lost")
        await trio.sleep(0.05)
        audit.record("after")
    kinds = [e["kind"] for e in lines(path)]
    assert kinds[0] == "before" and kinds[-1] == "after"
    assert "audit_dropped" in kinds
    assert audit.statistics().errors >= 1
