"""The policy snapshot as a base file plus an append-only delta log.

A write used to rewrite every cached policy before it was acknowledged; now it
appends its change to ``policy_snapshot.log`` (one line, one fsync) and the
base ``policy_snapshot.json`` is rewritten only on a reload from the database
or when the log passes its bound. These tests hold the files to that, and to
the guarantees the whole-file rewrite gave: everything acknowledged is in the
files before the reply (a load, or a database rebuilt from them after a
kill -9, has it), a removed policy never comes back, damage is cut or
skipped, never guessed at.

Real SQLite files and a real PolicyService (a 20,000-policy table, so the
base is megabytes and a rewrite would show), real damage made to the real
files (a torn last line, a flipped byte, an old log copied back beside a
newer base), and a real daemon SIGKILLed and restarted without its database.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import trio
from test_policy_daemon import Wire
from test_policy_faults_daemon import fault_config
from test_policy_scale import config, service, write_table

from sentinel_ipc.messages import (
    PolicyImportItem,
    PolicyList,
    PolicyListResult,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
)
from sentinel_ipc.policy.snapshot import (
    LOG_MIN_BOUND,
    SNAPSHOT_LOG_FILENAME,
    LogPut,
    LogRemove,
    SnapshotError,
    SnapshotFile,
    SnapshotWriter,
    apply_log,
    decode_log_record,
    encode_changes,
    encode_log_record,
    load_snapshot,
    load_snapshot_file,
    log_path_for,
    save_snapshot_file,
)
from sentinel_ipc.transport import open_framed_connection

NOW = 1_767_139_200.0
TABLE = 20_000


def rec(policy_id: int, **kw: Any) -> PolicyRecord:
    return PolicyRecord(id=policy_id, action="block", rule_name=f"R{policy_id}", **kw)


def base_of(policies: list[PolicyRecord], generation: int) -> SnapshotFile:
    return SnapshotFile(
        saved_at=NOW,
        max_policy_id=max(p.id for p in policies),
        policies=policies,
        generation=generation,
    )


def db_ids(db: Path) -> tuple[set[int], int]:
    """Active policy ids in the database, and the highest id it handed out."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        ids = {int(r[0]) for r in conn.execute("SELECT id FROM policies")}
        top = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'policies'").fetchone()
    finally:
        conn.close()
    return ids, max([int(top[0]) if top else 0, *ids])


def stat_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def log_lines(data: Path) -> list[bytes]:
    path = data / SNAPSHOT_LOG_FILENAME
    return path.read_bytes().splitlines() if path.exists() else []


def generation(data: Path) -> int:
    return int(json.loads((data / "policy_snapshot.json").read_bytes())["generation"])


def loaded_ids(data: Path) -> set[int]:
    snap = load_snapshot_file(data / "policy_snapshot.json")
    assert snap is not None
    return {p.id for p in snap.policies}


def sha_of(n: int) -> str:
    return f"{n:064x}"


# --- the format (pure) -------------------------------------------------------------


def test_log_path_is_beside_the_base() -> None:
    assert log_path_for(Path("/d/policy_snapshot.json")) == Path("/d") / SNAPSHOT_LOG_FILENAME
    assert log_path_for(Path("/d/x.log")) != Path("/d/x.log")


def test_a_record_round_trips_and_any_flipped_byte_is_refused() -> None:
    line = encode_log_record(LogPut(generation=3, policy=rec(7), max_policy_id=9))
    assert line.endswith(b"\n") and line[8:9] == b" "
    assert decode_log_record(line[:-1]) == LogPut(generation=3, policy=rec(7), max_policy_id=9)
    for at in range(len(line) - 1):
        damaged = bytearray(line[:-1])
        damaged[at] ^= 0x01
        with pytest.raises(ValueError):
            decode_log_record(bytes(damaged))


def test_apply_log_cuts_a_torn_tail_skips_damage_and_ignores_other_generations() -> None:
    base = base_of([rec(1), rec(2)], generation=3)
    lines = encode_changes([rec(3), 1], 3, 3).splitlines(keepends=True)
    lines.append(encode_log_record(LogPut(generation=2, policy=rec(9), max_policy_id=9)))
    flipped = bytearray(encode_log_record(LogPut(generation=3, policy=rec(4), max_policy_id=4)))
    flipped[20] ^= 0x20
    lines.append(bytes(flipped))
    lines.append(encode_log_record(LogPut(generation=3, policy=rec(5), max_policy_id=5)))
    torn = encode_log_record(LogRemove(generation=3, policy_id=2))
    data = b"".join(lines) + torn[: len(torn) // 2]
    merged, replay = apply_log(base, data)
    assert sorted(p.id for p in merged.policies) == [2, 3, 5]  # 1 removed, 4 damaged, 9 stale
    assert merged.max_policy_id == 5 and merged.generation == 3  # the stale put's 9 is ignored
    assert (replay.applied, replay.stale, replay.corrupt) == (3, 1, 1)
    assert replay.torn_bytes == len(torn) // 2 and replay.max_generation == 3
    assert not replay.clean
    # a complete torn-free log of the base's generation alone is clean
    assert apply_log(base, b"".join(lines[:2]))[1].clean


def test_a_base_written_before_the_log_existed_loads_as_generation_0(tmp_path: Path) -> None:
    path = tmp_path / "policy_snapshot.json"
    path.write_text(
        '{"format":1,"saved_at":1.0,"max_policy_id":4,'
        '"policies":[{"id":4,"action":"block","rule_name":"R4"}]}'
    )
    log_path_for(path).write_bytes(encode_changes([rec(5)], 0, 5))
    snap = load_snapshot_file(path)
    assert snap is not None and snap.generation == 0
    assert [p.id for p in snap.policies] == [4, 5] and snap.max_policy_id == 5


def test_an_unreadable_log_falls_back_to_the_base_a_damaged_base_is_still_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "policy_snapshot.json"
    save_snapshot_file(path, base_of([rec(1)], generation=2))
    log_path_for(path).mkdir()  # read() fails with EISDIR: unreadable, not empty
    loaded = load_snapshot(path)
    assert loaded is not None and loaded.log_error is not None and not loaded.clean
    assert [p.id for p in loaded.file.policies] == [1]
    log_path_for(path).rmdir()
    log_path_for(path).write_bytes(encode_changes([rec(2)], 2, 2))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(SnapshotError, match="damaged"):
        load_snapshot_file(path)


# --- a real service on a 20,000-policy table ------------------------------------------


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    write_table(d / "policy_graph.db", TABLE)
    return d


async def test_single_writes_append_to_the_log_and_leave_the_base_alone(data: Path) -> None:
    """Each add and remove is one more log line, on disk before the call
    returns; the multi-megabyte base is not touched; a fresh load is exact."""
    async with service(data, config()) as svc:
        base = data / "policy_snapshot.json"
        before = stat_id(base)
        assert before[2] > 2_000_000 and log_lines(data) == []
        added = []
        for n in range(20):
            policy_id, queued = await svc.add(action="block", sha256=sha_of(n), created_by="t")
            assert policy_id is not None and not queued
            added.append(policy_id)
            assert len(log_lines(data)) == n + 1  # written before the add returned
        for n, policy_id in enumerate([3, 17, added[4], added[11]]):
            await svc.remove(policy_id)
            assert len(log_lines(data)) == 21 + n
        assert stat_id(base) == before
        ids, top = db_ids(data / "policy_graph.db")
        assert loaded_ids(data) == ids and len(ids) == TABLE + 20 - 4
        snap = load_snapshot_file(base)
        assert snap is not None and snap.max_policy_id == top == TABLE + 20


async def test_past_its_bound_the_log_is_compacted_into_a_new_base(data: Path) -> None:
    """Import batches (1,000 records a line each) fill the log to its bound
    (1 MiB: the base is about 4 MB); the next persist rewrites the base with
    the next generation and empties the log; the load stays exact."""
    async with service(data, config()) as svc:
        start_generation = generation(data)
        sizes: list[int] = []
        batch = 0
        while generation(data) == start_generation:
            assert batch < 20, "never compacted"
            items = [
                PolicyImportItem(action="block", sha256=sha_of(batch * 1000 + i))
                for i in range(1000)
            ]
            result = await svc.import_policies(items, created_by="t")
            assert result.added == 1000 and not result.queued
            sizes.append((data / SNAPSHOT_LOG_FILENAME).stat().st_size)
            batch += 1
        assert len(sizes) >= 2 and 0 < sizes[-2] <= LOG_MIN_BOUND  # appended until then
        assert generation(data) == start_generation + 1 and sizes[-1] == 0
        ids, _ = db_ids(data / "policy_graph.db")
        assert loaded_ids(data) == ids and len(ids) == TABLE + 1000 * batch
        await svc.add(action="block", sha256=sha_of(10**6), created_by="t")
        assert len(log_lines(data)) == 1  # appending again, to the new generation
        assert loaded_ids(data) == db_ids(data / "policy_graph.db")[0]


async def test_a_torn_last_line_and_a_flipped_byte_lose_only_their_own_records(
    data: Path,
) -> None:
    """A crash mid-append leaves a torn last line: cut off (that write was
    never acknowledged). A flipped byte in a middle record: that record is
    skipped, the others applied. The service never appends after damage: its
    next persist rewrites the base."""
    async with service(data, config()) as svc:
        added = [
            (await svc.add(action="block", sha256=sha_of(n), created_by="t"))[0]
            for n in range(6)
        ]
    log_path = data / SNAPSHOT_LOG_FILENAME
    lines = log_path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 6
    flipped = bytearray(lines[2])
    flipped[30] ^= 0x04
    log_path.write_bytes(b"".join([*lines[:2], bytes(flipped), *lines[3:5], lines[5][:40]]))
    loaded = load_snapshot(data / "policy_snapshot.json")
    assert loaded is not None and loaded.replay is not None
    assert (loaded.replay.corrupt, loaded.replay.applied) == (1, 4)
    assert loaded.replay.torn_bytes == 40
    ids = {p.id for p in loaded.file.policies}
    assert {added[0], added[1], added[3], added[4]} <= ids
    assert added[2] not in ids and added[5] not in ids and len(ids) == TABLE + 4
    writer = SnapshotWriter(data / "policy_snapshot.json")
    writer.adopt(loaded)
    assert not writer.append([rec(TABLE + 99)], TABLE + 99)  # never after damage
    assert log_path.read_bytes().endswith(lines[5][:40])  # nothing written
    start_generation = generation(data)
    async with service(data, config()) as svc:
        await svc.add(action="block", sha256=sha_of(99), created_by="t")
    assert generation(data) > start_generation  # the damaged log is gone with its base
    assert len(log_lines(data)) == 1
    assert loaded_ids(data) == db_ids(data / "policy_graph.db")[0]


async def test_an_old_log_beside_a_newer_base_cannot_bring_a_removed_policy_back(
    data: Path,
) -> None:
    """The crash between a base rewrite's rename and the log's truncation,
    made for real: a log holding the put of a policy, copied back beside the
    base rewritten after that policy was removed. Its records are of the old
    generation: ignored at load, and the database rebuilt from these files
    does not have the policy either."""
    stale = data.parent / "stale.log"
    async with service(data, config()) as svc:
        victim, _ = await svc.add(action="block", sha256=sha_of(1), created_by="t")
        keeper, _ = await svc.add(action="block", sha256=sha_of(2), created_by="t")
        assert victim is not None and keeper is not None
        shutil.copy(data / SNAPSHOT_LOG_FILENAME, stale)
        await svc.remove(victim)
        old_generation = generation(data)
        assert await svc.refresh_snapshot()  # a reload from the database: a base rewrite
        assert generation(data) == old_generation + 1 and log_lines(data) == []
    shutil.copy(stale, data / SNAPSHOT_LOG_FILENAME)
    loaded = load_snapshot(data / "policy_snapshot.json")
    assert loaded is not None and loaded.replay is not None
    assert loaded.replay.stale == 2 and loaded.replay.applied == 0
    ids = {p.id for p in loaded.file.policies}
    assert victim not in ids and keeper in ids
    for name in ("policy_graph.db", "policy_graph.db-wal", "policy_graph.db-shm"):
        (data / name).unlink(missing_ok=True)
    async with service(data, config()) as svc:
        assert not svc.degraded
    ids, top = db_ids(data / "policy_graph.db")
    assert victim not in ids and keeper in ids and len(ids) == TABLE + 1
    assert top >= victim  # the removed id is never handed out again


async def test_a_base_deleted_under_the_service_is_rewritten_not_appended_beside(
    data: Path,
) -> None:
    """A log appended to without its base would be read by nobody: a base
    that is gone (or replaced) makes the next persist rewrite it."""
    async with service(data, config()) as svc:
        await svc.add(action="block", sha256=sha_of(1), created_by="t")
        (data / "policy_snapshot.json").unlink()
        await svc.add(action="block", sha256=sha_of(2), created_by="t")
        assert log_lines(data) == []
        assert loaded_ids(data) == db_ids(data / "policy_graph.db")[0]


# --- a real daemon ---------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["deleted", "corrupted"])
async def test_a_database_lost_after_a_kill_is_rebuilt_with_every_acknowledged_write(
    daemon_factory: Any, fault: str
) -> None:
    """Writes acknowledged over the socket reach only the log (the base is
    the one written at start); the daemon is SIGKILLed, its database deleted
    or overwritten with garbage; the restarted daemon rebuilds it from base +
    log: every acknowledged add, no removed policy."""
    d = daemon_factory(config=fault_config())
    base = d.data_dir / "policy_snapshot.json"
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        first = await w.add("block", sha256=sha_of(0))
        base_before = stat_id(base)
        added = [first] + [await w.add("block", sha256=sha_of(n)) for n in range(1, 12)]
        removed = [added[3], added[7]]
        for policy_id in removed:
            gone: PolicyResult = await w.ok(PolicyRemove, PolicyResult, policy_id=policy_id)
            assert not gone.queued
    # 12 adds and 2 removes, one line each; the base written at start untouched
    assert stat_id(base) == base_before and len(log_lines(d.data_dir)) == 14
    d.kill()
    db = d.data_dir / "policy_graph.db"
    for name in ("policy_graph.db-wal", "policy_graph.db-shm"):
        (d.data_dir / name).unlink(missing_ok=True)
    if fault == "deleted":
        db.unlink()
    else:
        db.write_bytes(os.urandom(64 * 1024))
    d.restart()
    expected = set(added) - set(removed)
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        for _ in range(200):
            r: PolicyListResult = await w.ok(PolicyList, PolicyListResult)
            if not r.degraded:
                break
            await trio.sleep(0.05)
        assert not r.degraded
        assert {p.id for p in r.policies} == expected
        new = await w.add("block", sha256=sha_of(100))
        assert new > max(added)  # no id handed out again
    d.stop()
    assert db_ids(db)[0] == expected | {new}
