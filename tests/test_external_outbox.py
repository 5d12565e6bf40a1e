"""The durable outbox on real files: order, ids, restarts, torn tails, bounds,
compaction, a real write failure (RLIMIT_FSIZE), and a model-based random run."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sentinel_ipc.external.outbox import (
    EVENT_OVERHEAD,
    LOG_NAME,
    Outbox,
    OutboxLockedError,
    Priority,
)

LOW, NORMAL, HIGH = Priority.LOW, Priority.NORMAL, Priority.HIGH


def body(n: int, pad: int = 0) -> bytes:
    return json.dumps({"kind": "test", "payload": {"n": n, "pad": "x" * pad}}).encode()


def open_box(path: Path, **kw: int) -> Outbox:
    kw.setdefault("compact_min_bytes", 1 << 30)
    return Outbox.open(path, **kw)


def test_append_batch_ack_in_order_with_unique_ids(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    events = [box.append("test", NORMAL, body(i), 1000.0 + i)[0] for i in range(10)]
    assert all(e is not None for e in events)
    ids = [e.id for e in events if e is not None]
    assert len(set(ids)) == 10
    assert all(i.startswith(box.origin + "-") for i in ids)
    assert box.batch(4, 1 << 20) == []  # nothing is handed out before it is durable
    box.flush()
    first = box.batch(4, 1 << 20)
    assert [e.id for e in first] == ids[:4]
    decoded = json.loads(first[0].body)
    assert decoded["id"] == ids[0] and decoded["seq"] == first[0].seq
    assert decoded["payload"] == {"n": 0, "pad": ""}
    assert box.mark_delivered(e.seq for e in first) == 4
    assert [e.id for e in box.batch(100, 1 << 20)] == ids[4:]
    assert box.mark_delivered([first[0].seq]) == 0  # a repeated ack changes nothing
    stats = box.statistics(2000.0)
    assert stats.pending == 6 and stats.delivered_total == 4
    assert stats.oldest_ts == 1004.0 and stats.oldest_age == 2000.0 - 1004.0
    box.close()


def test_batch_respects_byte_bound_but_always_returns_one(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    for i in range(5):
        box.append("test", NORMAL, body(i, pad=1000), 0.0)
    box.flush()
    assert len(box.batch(100, 2500)) == 2
    assert len(box.batch(100, 10)) == 1
    box.close()


def test_reopen_replays_pending_events_and_never_reuses_a_sequence(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    for i in range(6):
        box.append("test", HIGH if i % 2 else LOW, body(i), float(i))
    box.mark_delivered([1, 2])
    box.flush()
    origin = box.origin
    box.close()

    again = open_box(tmp_path)
    assert again.origin == origin
    assert [e.seq for e in again.batch(100, 1 << 20)] == [3, 4, 5, 6]
    assert again.statistics(0).delivered_total == 2
    assert again.statistics(0).by_priority == {"low": 2, "normal": 0, "high": 2}
    new, _ = again.append("test", NORMAL, body(99), 99.0)
    assert new is not None and new.seq == 7
    again.close()


def test_unflushed_records_are_lost_but_flushed_ones_survive(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    box.append("test", NORMAL, body(1), 0.0)
    box.flush()
    box.append("test", NORMAL, body(2), 0.0)  # staged only
    box.close()
    again = open_box(tmp_path)
    assert [e.seq for e in again.batch(10, 1 << 20)] == [1]
    again.close()


def test_torn_tail_is_cut_and_earlier_events_survive(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    for i in range(3):
        box.append("test", NORMAL, body(i), 0.0)
    box.flush()
    box.close()
    log = tmp_path / LOG_NAME
    good_size = log.stat().st_size
    with open(log, "ab") as fh:  # a crash mid-append: a header promising more than follows
        fh.write(b"\x00\x00\x01\x00\xde\xad\xbe\xefpartial")
    again = open_box(tmp_path)
    assert [e.seq for e in again.batch(10, 1 << 20)] == [1, 2, 3]
    assert again.statistics(0).replay_truncated_bytes == 15
    assert log.stat().st_size == good_size
    again.append("test", NORMAL, body(4), 0.0)
    again.flush()
    again.close()
    third = open_box(tmp_path)
    assert [e.seq for e in third.batch(10, 1 << 20)] == [1, 2, 3, 4]
    third.close()


def test_corrupt_record_checksum_ends_replay_there(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    box.append("test", NORMAL, body(1), 0.0)
    box.flush()
    size_after_first = (tmp_path / LOG_NAME).stat().st_size
    box.append("test", NORMAL, body(2), 0.0)
    box.flush()
    box.close()
    with open(tmp_path / LOG_NAME, "r+b") as fh:  # flip one byte inside the second event
        fh.seek(size_after_first + 12)
        byte = fh.read(1)
        fh.seek(size_after_first + 12)
        fh.write(bytes([byte[0] ^ 0xFF]))
    again = open_box(tmp_path)
    assert [e.seq for e in again.batch(10, 1 << 20)] == [1]
    assert again.statistics(0).replay_truncated_bytes > 0
    again.close()


def test_second_open_of_the_same_outbox_is_refused(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    with pytest.raises(OutboxLockedError):
        open_box(tmp_path)
    box.close()
    open_box(tmp_path).close()


def test_full_outbox_drops_oldest_low_priority_first_and_counts_it(tmp_path: Path) -> None:
    box = open_box(tmp_path, max_events=5)
    lows = [box.append("low", LOW, body(i), 0.0)[0] for i in range(3)]
    highs = [box.append("high", HIGH, body(i), 0.0)[0] for i in range(2)]
    assert all(e is not None for e in lows + highs)

    event, dropped = box.append("normal", NORMAL, body(10), 0.0)
    assert event is not None
    assert [d.seq for d in dropped] == [lows[0].seq]  # type: ignore[union-attr]

    # A low newcomer may evict an older low one...
    event, dropped = box.append("low", LOW, body(11), 0.0)
    assert event is not None and [d.seq for d in dropped] == [lows[1].seq]  # type: ignore[union-attr]
    # ...a high one evicts the lowest priority first (oldest first within it),
    # then the normal one, never a high one.
    for _ in range(2):
        event, dropped = box.append("high", HIGH, body(12), 0.0)
        assert event is not None and len(dropped) == 1 and dropped[0].priority == LOW
    assert box.statistics(0).by_priority == {"low": 0, "normal": 1, "high": 4}
    event, dropped = box.append("high", HIGH, body(13), 0.0)
    assert event is not None and dropped[0].priority == NORMAL
    # Only high events left: a low or normal newcomer is the one dropped.
    event, dropped = box.append("low", LOW, body(14), 0.0)
    assert event is None and len(dropped) == 1 and dropped[0].kind == "low"
    stats = box.statistics(0)
    assert stats.pending == 5 and stats.by_priority["high"] == 5
    assert stats.dropped_total == 6
    box.flush()
    box.close()
    again = open_box(tmp_path, max_events=5)
    assert again.statistics(0).dropped_total == 6  # the count survives a restart
    assert again.statistics(0).by_priority["high"] == 5
    again.close()


def test_byte_bound_and_oversized_events(tmp_path: Path) -> None:
    box = open_box(tmp_path, max_bytes=4096 + 10 * EVENT_OVERHEAD, max_event_bytes=2048)
    event, _ = box.append("big", HIGH, body(0, pad=3000), 0.0)
    assert event is None and box.statistics(0).refused_total == 1
    box.flush()
    box.close()
    box = open_box(tmp_path, max_bytes=4096 + 10 * EVENT_OVERHEAD, max_event_bytes=2048)
    assert box.statistics(0).refused_total == 1
    for i in range(4):
        assert box.append("e", LOW, body(i, pad=900), 0.0)[0] is not None
    event, dropped = box.append("e", LOW, body(9, pad=900), 0.0)
    assert event is not None and len(dropped) >= 1
    assert box.statistics(0).pending_bytes <= box.max_bytes
    box.close()


def test_smaller_bound_on_reopen_evicts_down_to_it(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    for i in range(10):
        box.append("e", LOW if i < 5 else HIGH, body(i), 0.0)
    box.flush()
    box.close()
    again = open_box(tmp_path, max_events=6)
    stats = again.statistics(0)
    assert stats.pending == 6 and stats.dropped_total == 4
    assert stats.by_priority == {"low": 1, "normal": 0, "high": 5}
    again.close()


def test_compaction_bounds_the_file_and_keeps_the_state(tmp_path: Path) -> None:
    box = open_box(tmp_path, compact_min_bytes=16 * 1024)
    compactions = 0
    for round_ in range(60):
        for i in range(20):
            box.append("e", NORMAL, body(round_ * 100 + i, pad=50), 0.0)
        batch = box.batch(18, 1 << 20)
        box.mark_delivered(e.seq for e in batch)
        box.flush()
        if box.needs_compaction():
            plan = box.plan_compaction()
            assert plan is not None
            # Something staged after the plan is a delta on top of it.
            box.append("late", HIGH, body(-1), 0.0)
            box.compact(plan)
            box.flush()
            compactions += 1
    assert compactions >= 2
    assert box.statistics(0).compactions == compactions
    assert (tmp_path / LOG_NAME).stat().st_size < 64 * 1024
    expected = [(e.seq, e.id, e.body) for e in box.batch(10_000, 1 << 30)]
    totals = box.statistics(0)
    box.close()
    again = open_box(tmp_path)
    assert [(e.seq, e.id, e.body) for e in again.batch(10_000, 1 << 30)] == expected
    assert again.statistics(0).delivered_total == totals.delivered_total
    assert not (tmp_path / (LOG_NAME + ".compact")).exists()
    again.close()


def test_plan_compaction_waits_for_staged_records(tmp_path: Path) -> None:
    box = open_box(tmp_path)
    box.append("e", NORMAL, body(1), 0.0)
    assert box.plan_compaction() is None
    box.flush()
    assert box.plan_compaction() is not None
    box.close()


def test_failed_write_is_undone_and_retried(tmp_path: Path) -> None:
    """A real write failure: RLIMIT_FSIZE makes the kernel refuse to grow the file
    (EFBIG), in a child process so the limit touches nothing else."""
    script = textwrap.dedent(
        f"""
        import errno, json, os, resource, signal
        from sentinel_ipc.external.outbox import Outbox, Priority
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        box = Outbox.open({str(tmp_path)!r}, compact_min_bytes=1 << 30)
        box.append("small", Priority.HIGH, b'{{"n": 1}}', 0.0)
        box.flush()
        size = os.path.getsize(box.path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))
        box.append("big", Priority.HIGH, json.dumps({{"pad": "x" * 5000}}).encode(), 0.0)
        try:
            box.flush()
        except OSError as exc:
            assert exc.errno == errno.EFBIG, exc
        else:
            raise SystemExit("write should have failed")
        assert os.path.getsize(box.path) == size, "torn write left behind"
        stats = box.statistics(0)
        assert stats.write_errors == 1 and stats.unsynced == 1 and stats.last_write_error
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        box.flush()
        assert box.statistics(0).last_write_error is None
        box.close()
        again = Outbox.open({str(tmp_path)!r})
        print([e.kind for e in again.batch(10, 1 << 20)])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['small', 'big']"


def test_random_operations_match_a_model_across_restarts(
    tmp_path: Path, rng: random.Random
) -> None:
    """Appends, acks, drops, flushes, compactions and restarts in random order;
    after each restart the outbox holds exactly the events a simple model says."""
    max_events = 12
    box = open_box(tmp_path, max_events=max_events, compact_min_bytes=2048)
    model: dict[int, tuple[int, bytes]] = {}  # seq -> (priority, body), durable view
    live: dict[int, tuple[int, bytes]] = {}  # in-memory view
    for _step in range(400):
        op = rng.random()
        if op < 0.5:
            prio = rng.choice(list(Priority))
            event, dropped = box.append("e", prio, body(rng.randrange(1000)), 0.0)
            for d in dropped:
                live.pop(d.seq, None)
            if event is not None:
                live[event.seq] = (int(prio), event.body)
        elif op < 0.7:
            batch = box.batch(rng.randint(1, 5), 1 << 20)
            box.mark_delivered(e.seq for e in batch)
            for e in batch:
                live.pop(e.seq)
        elif op < 0.85:
            box.flush()
            model = dict(live)
            if box.needs_compaction() and (plan := box.plan_compaction()) is not None:
                box.compact(plan)
        else:
            if rng.random() < 0.5:
                box.flush()
                model = dict(live)
            box.close()
            box = open_box(tmp_path, max_events=max_events, compact_min_bytes=2048)
            # Unflushed changes are gone: what remains is the durable view.
            live = dict(model)
        got = {e.seq: (int(e.priority), e.body) for e in box.pending()}
        assert got == live
        assert len(got) <= max_events
        assert list(got) == sorted(got)  # delivery order is sequence order
        durable = [e.seq for e in box.batch(1000, 1 << 30)]
        assert durable == list(got)[: len(durable)]
    box.close()


def test_outbox_files_are_private(tmp_path: Path) -> None:
    box = open_box(tmp_path / "ob")
    assert os.stat(tmp_path / "ob").st_mode & 0o777 == 0o700
    assert os.stat(tmp_path / "ob" / LOG_NAME).st_mode & 0o777 == 0o600
    box.close()
