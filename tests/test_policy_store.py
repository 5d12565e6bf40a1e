"""The storage side of the PolicyGraph against real SQLite files: schema and
migrations, validation at the database, idempotency, exactly-once replay, the
journal's durability rules, the snapshot file, the store thread, and the
bounded threat history."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import trio

from sentinel_ipc.errors import (
    DatabaseLockedError,
    DatabaseMovedError,
    JournalFullError,
    NotFoundError,
    PolicyConflictError,
    PolicyStoreError,
)
from sentinel_ipc.messages import PolicyRecord, RuleMatch
from sentinel_ipc.policy import store as store_module
from sentinel_ipc.policy.journal import (
    AddPolicy,
    Journal,
    RecordDecision,
    RemovePolicy,
    encode_line,
)
from sentinel_ipc.policy.schema import MIGRATIONS, SCHEMA_VERSION
from sentinel_ipc.policy.snapshot import (
    PolicySnapshot,
    SnapshotError,
    SnapshotFile,
    load_snapshot_file,
    save_snapshot_file,
)
from sentinel_ipc.policy.store import PolicyStore, StoreThread, map_sqlite_error
from sentinel_ipc.policy.validation import ThreatDraft, validate_policy

NOW = time.time()
H = "ab" * 32


def draft(**kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("action", "block")
    return validate_policy(now=NOW, created_by="test", **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = PolicyStore(tmp_path / "policy_graph.db", busy_timeout_ms=20)
    s.ensure_open()
    yield s
    s.close()


# --- schema -------------------------------------------------------------------------


def test_new_database_is_wal_versioned_and_has_the_tables(store: PolicyStore) -> None:
    conn = sqlite3.connect(store.path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(policies)")}
    assert {
        "id",
        "rule_name",
        "url_pattern",
        "file_hash",
        "mime_type",
        "action",
        "created_at",
        "created_by",
        "expires_at",
        "hit_count",
        "last_hit",
        "reason",
    } <= cols
    cols = {r[1] for r in conn.execute("PRAGMA table_info(threat_history)")}
    assert {
        "id",
        "detected_at",
        "url",
        "filename",
        "file_hash",
        "mime_type",
        "file_size",
        "rule_names",
        "severity",
        "action_taken",
        "policy_id",
    } <= cols
    conn.close()


def test_migration_from_version_1_keeps_rows_and_fills_derived_column(tmp_path: Path) -> None:
    path = tmp_path / "policy_graph.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0])
    conn.execute(
        "INSERT INTO policies (url_pattern, action, created_at) "
        "VALUES ('https://[x]/*', 'block', 1)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    s = PolicyStore(path)
    events = s.ensure_open()
    assert [e.kind for e in events] == ["migrated"]
    (p,) = s.list_policies()
    assert p.url_pattern == "https://[x]/*"
    # the derived GLOB column was filled: the database path finds the policy
    assert [
        r.id for r in s.candidates(sha256=None, url="https://[x]/a", rule_names=(), now=NOW)
    ] == [p.id]
    s.close()


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "policy_graph.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(PolicyStoreError, match="newer"):
        PolicyStore(path).ensure_open()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
    conn.close()


def test_columns_read_by_name(store: PolicyStore) -> None:
    """A column order different from the code's still reads right."""
    p, _ = store.add(draft(sha256=H, reason="r"), key=None, now=NOW)
    conn = sqlite3.connect(store.path)
    conn.executescript(
        "CREATE TABLE p2 AS SELECT reason, action, id, url_glob, rule_name, url_pattern, file_hash,"
        " mime_type, created_at, created_by, expires_at, hit_count, last_hit FROM policies;"
        "DROP TABLE policies; ALTER TABLE p2 RENAME TO policies;"
    )
    conn.close()
    assert store.list_policies()[0] == p


# --- writes -------------------------------------------------------------------------


def test_duplicate_identity_is_a_conflict(store: PolicyStore) -> None:
    store.add(draft(rule_name="R", url_pattern="https://a/*"), key=None, now=NOW)
    with pytest.raises(PolicyConflictError, match="already exists"):
        store.add(draft(rule_name="R", url_pattern="https://a/*", action="warn"), key=None, now=NOW)
    store.add(draft(rule_name="R"), key=None, now=NOW)  # another combination is fine
    assert len(store.list_policies()) == 2


def test_idempotency_key_applies_once(store: PolicyStore) -> None:
    a, dup_a = store.add(draft(sha256=H), key="k1", now=NOW)
    b, dup_b = store.add(draft(sha256=H), key="k1", now=NOW)
    assert (a.id, dup_a, dup_b) == (b.id, False, True)
    assert store.remove(a.id, key="k2", now=NOW) is False
    assert store.remove(a.id, key="k2", now=NOW) is True  # re-sent: no NotFoundError
    with pytest.raises(NotFoundError):
        store.remove(a.id, key="k3", now=NOW)
    with pytest.raises(NotFoundError, match="since been removed"):
        store.add(draft(sha256=H), key="k1", now=NOW)


def test_ids_are_never_reused(store: PolicyStore) -> None:
    a, _ = store.add(draft(sha256=H), key=None, now=NOW)
    store.remove(a.id, key=None, now=NOW)
    b, _ = store.add(draft(sha256=H), key=None, now=NOW)
    assert b.id > a.id


def test_decide_records_hit_and_threat(store: PolicyStore) -> None:
    p, _ = store.add(draft(rule_name="Evil", action="quarantine"), key=None, now=NOW)
    kwargs = {"default_match_action": "block", "severity_actions": {}}
    r = store.decide(
        sha256=H,
        url="https://x/",
        matches=[RuleMatch(rule="Evil", meta={"severity": "high"})],
        now=NOW,
        record=True,
        decide_kwargs=kwargs,
        filename="f.exe",
        size=12,
        record_key="r:1",
    )
    assert (r.decision.action, r.decision.policy_id, r.recorded) == ("quarantine", p.id, True)
    assert r.hit_policy is not None and r.hit_policy.hit_count == 1
    # the same record key again (a timed-out attempt that still ran) is not applied twice
    store.decide(
        sha256=H,
        url="https://x/",
        matches=[RuleMatch(rule="Evil")],
        now=NOW,
        record=True,
        decide_kwargs=kwargs,
        record_key="r:1",
    )
    (t,) = store.threats(10)
    assert (t.file_hash, t.rule_names, t.action_taken, t.policy_id, t.severity, t.file_size) == (
        H,
        ["Evil"],
        "quarantine",
        p.id,
        "high",
        12,
    )
    assert store.get_policy(p.id).hit_count == 1  # type: ignore[union-attr]
    # a clean allow writes nothing
    r = store.decide(
        sha256="0" * 64, url=None, matches=[], now=NOW, record=True, decide_kwargs=kwargs
    )
    assert not r.recorded and len(store.threats(10)) == 1


# --- replay -------------------------------------------------------------------------


def test_replay_is_exactly_once_across_repeats(store: PolicyStore) -> None:
    existing, _ = store.add(draft(rule_name="Old"), key=None, now=NOW)
    threat = ThreatDraft(detected_at=NOW, file_hash=H, action_taken="block", rule_names=["X"])
    ops = [
        AddPolicy(seq=1, key="a:1", at=NOW, policy=draft(sha256=H)),
        RecordDecision(seq=2, key="r:1", at=NOW, hit_policy_id=existing.id, threat=threat),
        RemovePolicy(seq=3, key="d:1", at=NOW, policy_id=existing.id),
        AddPolicy(seq=4, key="a:2", at=NOW, policy=draft(sha256=H, action="warn")),  # conflict
        RemovePolicy(seq=5, key="d:2", at=NOW, policy_id=424242),  # unknown
    ]
    first = store.replay(ops, batch=2)
    assert [o.status for o in first] == ["applied", "applied", "applied", "conflict", "not_found"]
    # a crash before the journal was discarded: the whole journal again, then some of it
    assert all(o.status == "duplicate" for o in store.replay(ops))
    assert all(o.status == "duplicate" for o in store.replay(ops[2:]))
    policies = store.list_policies()
    assert [(p.file_hash, p.action) for p in policies] == [(H, "block")]
    assert len(store.threats(10)) == 1
    assert policies[0].created_at == NOW  # the original time of the write


# --- identity / verification ----------------------------------------------------------


def test_deleted_and_replaced_files_are_detected(store: PolicyStore, tmp_path: Path) -> None:
    store.verify()
    os.rename(store.path, tmp_path / "elsewhere.db")
    with pytest.raises(DatabaseMovedError, match="deleted"):
        store.list_policies()
    (tmp_path / "policy_graph.db").write_bytes(b"not this one")
    with pytest.raises(DatabaseMovedError, match="replaced"):
        store.verify()


def test_locked_database_maps_to_retryable_error(store: PolicyStore) -> None:
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(DatabaseLockedError) as err:
            store.add(draft(sha256=H), key=None, now=NOW)
        assert err.value.retryable
        store.list_policies()  # WAL: readers are not blocked by a writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert map_sqlite_error(sqlite3.IntegrityError("x"), "w").__class__ is PolicyStoreError


def test_seeding_a_missing_database_from_the_snapshot(tmp_path: Path) -> None:
    seed = [PolicyRecord(id=7, action="block", file_hash=H, hit_count=3)]
    s = PolicyStore(tmp_path / "policy_graph.db")
    kinds = [e.kind for e in s.ensure_open(seed, seed_max_id=9)]
    assert kinds == ["created", "seeded"]
    assert [(p.id, p.hit_count) for p in s.list_policies()] == [(7, 3)]
    p, _ = s.add(draft(rule_name="New"), key=None, now=NOW)
    assert p.id == 10  # past every id ever handed out
    s.close()


# --- the journal --------------------------------------------------------------------


def test_journal_survives_reopen_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal.open(path)
    stored = j.append([AddPolicy(key="a", at=NOW, policy=draft(sha256=H))])
    j.append([RemovePolicy(key="b", at=NOW, policy_id=3)])
    assert [op.seq for op in j.pending()] == [1, 2] and stored[0].seq == 1
    j.close()
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(encode_line(RemovePolicy(seq=3, key="c", at=NOW, policy_id=4))[:25])
    j = Journal.open(path)
    assert [op.key for op in j.pending()] == ["a", "b"]
    assert j.statistics().corrupt_lines == 1
    j.append([RemovePolicy(key="d", at=NOW, policy_id=5)])
    j.close()
    j = Journal.open(path)
    assert [(op.seq, op.key) for op in j.pending()] == [(1, "a"), (2, "b"), (3, "d")]
    j.close()


def test_journal_skips_a_damaged_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal.open(path)
    for k in "abc":
        j.append([RemovePolicy(key=k, at=NOW, policy_id=1)])
    j.close()
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"b"', b'"X"')  # bit flip: checksum no longer matches
    path.write_bytes(b"".join(lines))
    j = Journal.open(path)
    assert [op.key for op in j.pending()] == ["a", "c"]
    j.discard_through(1)
    j.close()
    assert [op.key for op in Journal.open(path).pending()] == ["c"]


def test_journal_recreated_when_deleted_under_it(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    j = Journal.open(path)
    j.append([RemovePolicy(key="a", at=NOW, policy_id=1)])
    path.unlink()  # an append now would go to a file nobody reads again
    j.append([RemovePolicy(key="b", at=NOW, policy_id=2)])
    j.close()
    assert [op.key for op in Journal.open(path).pending()] == ["a", "b"]


def test_journal_is_bounded_and_keeps_room_for_policy_writes(tmp_path: Path) -> None:
    j = Journal.open(tmp_path / "j.jsonl", max_bytes=2000)
    threat = ThreatDraft(detected_at=NOW, file_hash=H, action_taken="block")
    with pytest.raises(JournalFullError):
        for _ in range(100):
            j.append([RecordDecision(key=os.urandom(4).hex(), at=NOW, threat=threat)])
    assert j.statistics().size_bytes <= 1800
    j.append([RemovePolicy(key="p", at=NOW, policy_id=1)])  # a policy write still fits
    j.discard_through(j.pending()[-1].seq)
    assert j.depth == 0 and (tmp_path / "j.jsonl").stat().st_size == 0
    j.close()


# --- the snapshot file --------------------------------------------------------------


def test_snapshot_round_trip_and_damage(tmp_path: Path) -> None:
    path = tmp_path / "snap.json"
    assert load_snapshot_file(path) is None
    snap = SnapshotFile(
        saved_at=NOW, max_policy_id=5, policies=[PolicyRecord(id=5, action="allow", file_hash=H)]
    )
    save_snapshot_file(path, snap)
    assert load_snapshot_file(path) == snap
    assert [p.name for p in tmp_path.iterdir()] == ["snap.json"]  # no temporary left behind
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(SnapshotError, match="damaged"):
        load_snapshot_file(path)


def test_snapshot_overlay_of_journaled_writes() -> None:
    snap = PolicySnapshot([PolicyRecord(id=1, action="block", file_hash=H)], max_policy_id=4)
    snap.overlay(AddPolicy(seq=9, key="k", at=NOW, policy=draft(rule_name="R", action="warn")))
    snap.overlay(RemovePolicy(seq=10, key="k2", at=NOW, policy_id=1))
    assert [(p.id, p.rule_name) for p in snap.index.policies()] == [(-9, "R")]
    assert snap.real_policies() == [] and snap.to_file(NOW).policies == []
    # an add that reached the database before the journal was discarded is not doubled
    snap.put(PolicyRecord(id=5, action="warn", rule_name="S"))
    snap.overlay(AddPolicy(seq=11, key="k3", at=NOW, policy=draft(rule_name="S", action="warn")))
    assert len(snap) == 2


# --- the store thread ---------------------------------------------------------------


async def test_store_thread_runs_in_order_on_one_thread() -> None:
    t = StoreThread("test-store")
    seen: list[tuple[int, int]] = []

    def job(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * 2

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(lambda i=i: t.run(lambda: job(i)))
    assert sorted(i for i, _ in seen) == list(range(50))
    assert len({tid for _, tid in seen}) == 1 and seen[0][1] != threading.get_ident()
    with pytest.raises(ZeroDivisionError):
        await t.run(lambda: 1 // 0)
    assert await t.run(lambda: 21 * 2) == 42
    assert await t.aclose()


async def test_store_thread_is_bounded_and_cancellable() -> None:
    t = StoreThread("test-store", max_pending=2)
    gate = threading.Event()
    finished: list[int] = []

    def slow(i: int) -> None:
        gate.wait(5)
        finished.append(i)

    with trio.move_on_after(0.05):  # the caller gives up; the call still completes
        await t.run(lambda: slow(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(t.run, lambda: slow(2))
        await trio.sleep(0.01)
        from sentinel_ipc.errors import BusyError

        with pytest.raises(BusyError):
            await t.run(lambda: None)
        gate.set()
    assert finished == [1, 2]
    assert await t.aclose()


def test_threat_rule_names_are_json(store: PolicyStore) -> None:
    store.record(
        None,
        ThreatDraft(detected_at=NOW, file_hash=H, action_taken="warn", rule_names=["a", "b"]),
        now=NOW,
    )
    raw = sqlite3.connect(store.path).execute("SELECT rule_names FROM threat_history").fetchone()[0]
    assert json.loads(raw) == ["a", "b"]


# --- retention of the threat history ---------------------------------------------------


def threat_no(n: int) -> ThreatDraft:
    """The ``n``-th detection: its number is in its time and its filename."""
    return ThreatDraft(
        detected_at=NOW + n, file_hash=H, action_taken="block", filename=f"{n}.exe"
    )


def threat_rows(store: PolicyStore) -> int:
    conn = sqlite3.connect(store.path)
    try:
        return int(conn.execute("SELECT count(*) FROM threat_history").fetchone()[0])
    finally:
        conn.close()


def test_threat_history_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    """Every detection adds a row; without a bound the table (and the file) grew
    for ever. With a bound of 50, 120 records leave the newest 50, newest first."""
    store = PolicyStore(tmp_path / "policy_graph.db", threat_history_max_rows=50)
    store.ensure_open()
    for n in range(120):
        store.record(None, threat_no(n), now=NOW + n, key=f"r:{n}")
        assert threat_rows(store) == min(n + 1, 50)
    kept = store.threats(1000)
    assert [t.filename for t in kept] == [f"{n}.exe" for n in range(119, 69, -1)]
    assert [t.id for t in kept] == sorted((t.id for t in kept), reverse=True)
    store.close()


def test_replay_of_an_outage_prunes_and_stays_exactly_once(tmp_path: Path) -> None:
    """Threat rows journaled during an outage are replayed through the same insert,
    so they are pruned too; replaying the journal again (a crash before it was
    discarded) adds nothing, because the keys, not the rows, say what was applied."""
    store = PolicyStore(tmp_path / "policy_graph.db", threat_history_max_rows=50)
    store.ensure_open()
    for n in range(30):  # before the outage
        store.record(None, threat_no(n), now=NOW + n, key=f"r:{n}")
    ops = [
        RecordDecision(seq=n, key=f"j:{n}", at=NOW + n, threat=threat_no(n))
        for n in range(30, 150)
    ]
    assert {o.status for o in store.replay(ops, batch=64)} == {"applied"}
    newest = [t.filename for t in store.threats(1000)]
    assert newest == [f"{n}.exe" for n in range(149, 99, -1)]
    assert {o.status for o in store.replay(ops)} == {"duplicate"}
    assert {o.status for o in store.replay(ops[-10:])} == {"duplicate"}
    assert [t.filename for t in store.threats(1000)] == newest
    store.close()


def test_a_table_far_over_the_bound_shrinks_a_batch_per_insert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database from a version that kept every row (or a lowered setting): one
    insert deletes at most a batch, so no single write stalls on a huge delete,
    and the table reaches the bound over the following inserts."""
    monkeypatch.setattr(store_module, "_PRUNE_BATCH", 100)
    path = tmp_path / "policy_graph.db"
    unbounded = PolicyStore(path)
    unbounded.ensure_open()
    for n in range(250):
        unbounded.record(None, threat_no(n), now=NOW)
    unbounded.close()
    store = PolicyStore(path, threat_history_max_rows=10)
    store.ensure_open()
    assert threat_rows(store) == 250  # opening deletes nothing
    sizes = []
    for n in range(250, 254):
        store.record(None, threat_no(n), now=NOW)
        sizes.append(threat_rows(store))
    assert sizes == [151, 52, 10, 10]
    assert [t.filename for t in store.threats(100)] == [f"{n}.exe" for n in range(253, 243, -1)]
    store.close()


def test_a_threat_history_bound_below_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="threat_history_max_rows"):
        PolicyStore(tmp_path / "policy_graph.db", threat_history_max_rows=0)
