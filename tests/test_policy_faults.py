"""Real faults against the PolicyService and a real SQLite file (issue 5.7, library half).

Each fault is made for real: another connection holding ``BEGIN EXCLUSIVE``;
the file replaced by random bytes, or overwritten in place; the file (and its
``-wal``/``-shm``) deleted; the files made unwritable; a restart in the middle
of an outage; a database call that hangs.

"Read-only" needs care because the tests run as root, and root ignores file
modes. Two ways round it, both used:

* ``chattr +i`` (the immutable flag) binds root too: on the ``-wal`` file it
  makes every write fail with an I/O error, on the data directory it forbids
  creating files there (what a read-only directory does);
* the ``chmod`` cases of the issue (``chmod 000`` on the database, a read-only
  data dir across a restart) run the service in a subprocess as ``nobody``.

In every case: verdicts keep coming (from the snapshot, ``degraded`` with a
reason), a hash never seen falls through to the rules, writes made during the
outage are answered ``queued`` and are in the database exactly once after
recovery, and recovery needs no restart.

Timing: breaker open timeouts and retry backoffs are shortened by
configuration (milliseconds); one test runs the real 30 s preset on trio's
MockClock. Nothing sleeps through a real backoff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from sentinel_ipc.audit import AuditLog, open_audit_log
from sentinel_ipc.errors import JournalFullError, PolicyConflictError, UnavailableError
from sentinel_ipc.messages import RuleMatch
from sentinel_ipc.policy import PolicyConfig, PolicyService, open_policy_service
from sentinel_ipc.policy.service import DEFAULT_BREAKER
from sentinel_ipc.resilience import RETRY_PRESETS, BreakerState

ROOT = Path(__file__).resolve().parent.parent
H_ALLOW = "a1" * 32  # "always allow" policy, matches notwithstanding
H_BLOCK = "b2" * 32  # known-bad file
H_NEW = "c3" * 32  # a block added during the outage
H_UNSEEN = "d4" * 32  # a hash the snapshot has never seen
H_OUTAGE = "e5" * 32  # detections during the outage
EVIL = [RuleMatch(rule="Evil", meta={"severity": "high"})]


def fast_config(**kw: object) -> PolicyConfig:
    """The presets, with milliseconds where they have seconds."""
    base: dict[str, object] = {
        "retry": dataclasses.replace(
            RETRY_PRESETS["database"], initial=0.001, max_delay=0.004, timeout=3.0
        ),
        "breaker": dataclasses.replace(DEFAULT_BREAKER, open_timeout=0.2, half_open_max_wait=3.0),
        "busy_timeout_ms": 10,
        "op_timeout": 3.0,
        "verify_interval": 0.05,
        "probe_interval": 0.05,
    }
    base.update(kw)
    return PolicyConfig(**base)  # type: ignore[arg-type]


async def wait_for(pred: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    with trio.move_on_after(timeout):
        while not pred():  # noqa: ASYNC110 - polling service state by design
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what or pred}")


def db_state(path: Path) -> tuple[list[tuple], list[tuple]]:
    """(policies, threats) as another program would see them."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        policies = conn.execute(
            "SELECT id, file_hash, url_pattern, rule_name, action FROM policies ORDER BY id"
        ).fetchall()
        threats = conn.execute(
            "SELECT file_hash, action_taken FROM threat_history ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return policies, threats


def page_count(path: Path) -> int:
    """The database's size in pages, as a fresh reader sees it (page 1)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()


def audit_kinds(path: Path) -> list[str]:
    return [json.loads(x)["kind"] for x in path.read_text().splitlines()]


@asynccontextmanager
async def service(
    data: Path, config: PolicyConfig | None = None, audit: AuditLog | None = None
) -> AsyncIterator[PolicyService]:
    async with open_policy_service(config or fast_config(), data, audit) as svc:
        yield svc


async def seed(svc: PolicyService) -> dict[str, int]:
    ids = {}
    ids["allow"], _ = await svc.add(action="allow", sha256=H_ALLOW, created_by="t")  # type: ignore[assignment]
    ids["block"], _ = await svc.add(action="block", sha256=H_BLOCK, created_by="t")  # type: ignore[assignment]
    ids["url"], _ = await svc.add(  # type: ignore[assignment]
        action="quarantine", url_pattern="https://bad.example/*", created_by="t"
    )
    ids["rule"], _ = await svc.add(action="warn", rule_name="Adware", created_by="t")  # type: ignore[assignment]
    d = await svc.decide(sha256=H_BLOCK, url=None, matches=[])  # one threat row before the fault
    assert d.action == "block" and not d.degraded
    return ids


async def check_degraded_decisions(svc: PolicyService, reason_part: str) -> None:
    """Verdicts from the snapshot, marked degraded, a cache miss falling through to rules."""
    d = await svc.decide(sha256=H_ALLOW, url=None, matches=EVIL)
    assert (d.action, d.degraded) == ("allow", True), d
    assert reason_part in (d.degraded_reason or ""), d.degraded_reason
    assert any("cached security policies" in w for w in d.warnings)
    d = await svc.decide(sha256=H_BLOCK, url=None, matches=[])
    assert (d.action, d.degraded) == ("block", True)
    d = await svc.decide(sha256=H_UNSEEN, url="https://bad.example/x", matches=[])
    assert (d.action, d.degraded) == ("quarantine", True)
    # cache miss: a hash never seen -> the rule decision, marked degraded
    d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
    assert (d.action, d.policy_id, d.degraded) == ("block", None, True)
    d = await svc.decide(
        sha256=H_UNSEEN, url=None, matches=[RuleMatch(rule="L", meta={"severity": "low"})]
    )
    assert (d.action, d.degraded) == ("warn", True)
    d = await svc.decide(sha256=H_UNSEEN, url=None, matches=[])
    assert (d.action, d.degraded) == ("allow", True)


async def outage_writes(svc: PolicyService, ids: dict[str, int]) -> None:
    assert await svc.add(action="block", sha256=H_NEW, created_by="t", idempotency_key="K1") == (
        None,
        True,
    )
    # re-sent by a client after a reconnect: still one write
    assert await svc.add(action="block", sha256=H_NEW, created_by="t", idempotency_key="K1") == (
        None,
        True,
    )
    assert await svc.add(action="allow", rule_name="Harmless", created_by="t") == (None, True)
    assert await svc.remove(ids["rule"]) == (ids["rule"], True)
    with pytest.raises(PolicyConflictError):  # checked against the cached policies
        await svc.add(action="warn", sha256=H_BLOCK, created_by="t")
    # the queued writes apply at once to verdicts
    d = await svc.decide(sha256=H_NEW, url=None, matches=[])
    assert (d.action, d.degraded) == ("block", True) and "queued" in d.reason
    d = await svc.decide(sha256=H_OUTAGE, url=None, matches=[RuleMatch(rule="Adware")])
    assert d.action == "block"  # the warn policy for Adware was removed
    policies, degraded = await svc.list()
    assert degraded and ids["rule"] not in {p.id for p in policies}


def check_after_recovery(path: Path, ids: dict[str, int], outage_detections: int) -> None:
    policies, threats = db_state(path)
    hashes = [p[1] for p in policies if p[1]]
    assert sorted(hashes) == sorted([H_ALLOW, H_BLOCK, H_NEW]), policies
    assert [p[3] for p in policies if p[3]] == ["Harmless"]
    assert ids["rule"] not in [p[0] for p in policies]
    assert sum(t[0] == H_OUTAGE for t in threats) == outage_detections, threats


async def recovered(svc: PolicyService) -> None:
    await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="recovery")
    d = await svc.decide(sha256=H_NEW, url=None, matches=[])
    assert (d.action, d.degraded) == ("block", False) and d.policy_id is not None
    assert (await svc.list())[1] is False


# --- the faults ------------------------------------------------------------------


@contextmanager
def held_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Another program holds the database with ``BEGIN EXCLUSIVE``. (In WAL mode
    that blocks writers; readers still read. The harsher exclusive *locking
    mode* cannot even be taken while the daemon has the file open.)"""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.close()


async def test_locked_database(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    async with (
        open_audit_log(tmp_path / "audit.jsonl") as audit,
        service(tmp_path, audit=audit) as svc,
    ):
        states: list[tuple[bool, str | None]] = []
        svc.add_state_listener(lambda deg, why: states.append((deg, why)))
        ids = await seed(svc)
        with held_lock(db):
            # the first write finds the lock: queued, and the service degrades
            await outage_writes(svc, ids)
            assert svc.degraded and svc.degraded_reason == "database locked"
            await check_degraded_decisions(svc, "database locked")
            assert svc.journal_depth >= 5
            with pytest.raises(UnavailableError):
                await svc.threats()
            with pytest.raises(UnavailableError, match="database locked"):
                await svc.check_health()
            await trio.sleep(0.3)  # the lock outlives a few probes: still degraded
            assert svc.degraded
        await recovered(svc)
        assert await svc.check_health() < 1.0
    check_after_recovery(db, ids, outage_detections=2)
    assert states[0] == (True, "database locked") and states[-1] == (False, None)
    kinds = audit_kinds(tmp_path / "audit.jsonl")
    assert "degraded" in kinds and "recovered" in kinds and "journal_replay" in kinds
    assert kinds.count("policy_add") == 4 + 2  # seed + two queued adds (the re-send is not one)


async def test_file_replaced_by_random_bytes(tmp_path: Path) -> None:
    """Replaced under the open connection: the old file's content is salvaged
    through the connection, the random file moved aside as .corrupt-<time>."""
    db = tmp_path / "policy_graph.db"
    async with (
        open_audit_log(tmp_path / "audit.jsonl") as audit,
        service(tmp_path, audit=audit) as svc,
    ):
        ids = await seed(svc)
        junk = tmp_path / "junk"
        junk.write_bytes(os.urandom(64 * 1024))
        os.replace(junk, db)
        d = await svc.decide(sha256=H_ALLOW, url=None, matches=EVIL)
        assert d.action == "allow"  # whichever path answered, the policy held
        await wait_for(lambda: not svc.degraded, what="repair")
        await outage_writes_or_direct(svc, ids)
    (aside,) = tmp_path.glob("policy_graph.db.corrupt-*")
    assert len(aside.read_bytes()) == 64 * 1024
    policies, threats = db_state(db)
    assert {p[1] for p in policies if p[1]} == {H_ALLOW, H_BLOCK, H_NEW}
    assert threats[0] == (H_BLOCK, "block")  # history kept: salvaged, not rebuilt
    kinds = audit_kinds(tmp_path / "audit.jsonl")
    assert "database_moved_detected" in kinds and "database_corrupt_moved_aside" in kinds


async def outage_writes_or_direct(svc: PolicyService, ids: dict[str, int]) -> None:
    await svc.add(action="block", sha256=H_NEW, created_by="t", idempotency_key="K1")
    await svc.add(action="block", sha256=H_NEW, created_by="t", idempotency_key="K1")
    await svc.remove(ids["rule"])


@asynccontextmanager
async def seeded_without_timer(
    data: Path,
) -> AsyncIterator[tuple[PolicyService, dict[str, int]]]:
    """A seeded service with its audit log, and no periodic verification: only
    the test's own calls look at the file."""
    async with (
        open_audit_log(data / "audit.jsonl") as audit,
        service(data, fast_config(verify_interval=3600.0), audit) as svc,
    ):
        yield svc, await seed(svc)


def checkpoint(db: Path) -> int:
    """Another program checkpoints the WAL into the file (TRUNCATE), as a backup
    tool would; returns the page size."""
    ck = sqlite3.connect(db)
    try:
        ck.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(ck.execute("PRAGMA page_size").fetchone()[0])
    finally:
        ck.close()


def check_rebuilt(data: Path) -> tuple[list[tuple], list[tuple]]:
    """The corrupt file was moved aside once, and the rebuilt database holds the
    policies (from the snapshot and the journal); returns (policies, threats)."""
    assert len(list(data.glob("policy_graph.db.corrupt-*"))) == 1
    policies, threats = db_state(data / "policy_graph.db")
    assert {p[1] for p in policies if p[1]} == {H_ALLOW, H_BLOCK, H_NEW}
    kinds = audit_kinds(data / "audit.jsonl")
    assert "database_corrupt_moved_aside" in kinds and "database_rebuilt" in kinds
    return policies, threats


async def test_file_overwritten_in_place(tmp_path: Path) -> None:
    """Same inode, random bytes: the open connection serves its cache and notices
    nothing; the periodic verification (the file's header) does. The file is moved
    aside and rebuilt from the snapshot and the journal."""
    db = tmp_path / "policy_graph.db"
    async with seeded_without_timer(tmp_path) as (svc, ids):
        checkpoint(db)
        size = db.stat().st_size
        with open(db, "r+b") as f:  # noqa: ASYNC230 - the fault itself, done synchronously
            f.write(os.urandom(size))
        with pytest.raises(Exception, match="does not start with SQLite's header"):
            await svc.check_health()
        assert svc.degraded and svc.degraded_reason == "database corrupt"
        await wait_for(lambda: not svc.degraded, what="rebuild")
        await outage_writes_or_direct(svc, ids)
        d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
        assert not d.degraded
    policies, threats = check_rebuilt(tmp_path)
    assert ids["rule"] not in [p[0] for p in policies]
    assert (H_OUTAGE, "block") in threats


async def test_file_overwritten_in_place_while_page_one_is_in_the_wal(tmp_path: Path) -> None:
    """The chaos run's case: writes after the checkpoint grew the file, so page 1
    (size, schema) lives in the WAL, and a fresh open reads a valid schema from
    there although the whole file is garbage. Verification reads the file's own
    header through SQLite's descriptor, so it notices at once."""
    db = tmp_path / "policy_graph.db"
    async with seeded_without_timer(tmp_path) as (svc, ids):
        checkpoint(db)
        pages = page_count(db)
        for n in range(150):  # threat rows until the file grows: page 1 changes
            await svc.decide(sha256=f"{n:064x}", url=None, matches=EVIL)
            if page_count(db) > pages:
                break
        with open(db, "r+b") as f:  # noqa: ASYNC230 - the fault itself, done synchronously
            f.write(os.urandom(db.stat().st_size))
        # The precondition: a fresh open still sees the grown size and a valid schema.
        assert page_count(db) > pages
        with pytest.raises(Exception, match="does not start with SQLite's header"):
            await svc.check_health()
        assert svc.degraded and svc.degraded_reason == "database corrupt"
        await wait_for(lambda: not svc.degraded, what="rebuild")
        await outage_writes_or_direct(svc, ids)
    check_rebuilt(tmp_path)


async def test_garbage_past_page_one_is_found_by_the_operation_and_rebuilt(
    tmp_path: Path,
) -> None:
    """A disk that garbles the middle of the file: header and schema (page 1)
    intact, so verification passes and only the operation that reads a garbled
    page reports corruption. Recovery must then read every page (quick_check)
    and rebuild, not find the schema fine and fail its probe forever."""
    db = tmp_path / "policy_graph.db"
    async with seeded_without_timer(tmp_path) as (svc, ids):
        page_size = checkpoint(db)  # every page in the file
        with open(db, "r+b") as f:  # noqa: ASYNC230 - the fault itself, done synchronously
            f.seek(page_size)
            f.write(b"\xa5" * (db.stat().st_size - page_size))  # no valid b-tree page type
        await svc.check_health()  # blind to it: page 1 is fine
        listing, degraded = await svc.list()  # the policies' pages are garbled
        assert degraded and svc.degraded_reason == "database corrupt"
        assert {p.id for p in listing} == set(ids.values())  # from the snapshot
        await wait_for(lambda: not svc.degraded, what="rebuild")
        await outage_writes_or_direct(svc, ids)
    check_rebuilt(tmp_path)


@pytest.mark.parametrize("with_wal", [False, True], ids=["db-only", "db-wal-shm"])
async def test_file_deleted(tmp_path: Path, with_wal: bool) -> None:
    db = tmp_path / "policy_graph.db"
    async with (
        open_audit_log(tmp_path / "audit.jsonl") as audit,
        service(tmp_path, audit=audit) as svc,
    ):
        ids = await seed(svc)
        for suffix in ("", "-wal", "-shm") if with_wal else ("",):
            os.unlink(f"{db}{suffix}")
        await outage_writes_or_direct(svc, ids)
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="repair")
        d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
        assert (d.action, d.degraded) == ("block", False)
        assert db.exists()
    policies, threats = db_state(db)
    assert {p[1] for p in policies if p[1]} == {H_ALLOW, H_BLOCK, H_NEW}
    assert ids["rule"] not in [p[0] for p in policies]
    assert threats[0] == (H_BLOCK, "block") and threats[-1] == (H_OUTAGE, "block")
    assert "database_salvaged" in audit_kinds(tmp_path / "audit.jsonl")


async def test_data_dir_deleted(tmp_path: Path) -> None:
    """``rm -rf`` of the whole data dir under a running service: the directory,
    the database (salvaged through the open connection), the snapshot and the
    journal all come back; nothing written is lost."""
    data = tmp_path / "data"
    async with service(data) as svc:
        ids = await seed(svc)
        shutil.rmtree(data)
        await outage_writes_or_direct(svc, ids)
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="repair")
        d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
        assert (d.action, d.degraded) == ("block", False)
    policies, threats = db_state(data / "policy_graph.db")
    assert sorted(p[1] for p in policies if p[1]) == sorted([H_ALLOW, H_BLOCK, H_NEW])
    assert threats[0] == (H_BLOCK, "block") and threats[-1] == (H_OUTAGE, "block")
    assert (data / "policy_snapshot.json").exists()


@contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i``: no writes, no new names in a directory -- for root too."""
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def _chattr_works(tmp: Path) -> bool:
    probe = tmp / "chattr-probe"
    probe.touch()
    try:
        return subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        probe.unlink()


async def test_unwritable_files_root_proof(tmp_path: Path) -> None:
    """The -wal file and the data dir immutable: every database write fails with
    an I/O error, the snapshot cannot be saved; verdicts and queued writes go on."""
    if shutil.which("chattr") is None or not _chattr_works(tmp_path):
        pytest.skip("no chattr +i on this file system")
    db = tmp_path / "policy_graph.db"
    async with (
        open_audit_log(tmp_path / "logs" / "audit.jsonl") as audit,
        service(tmp_path, audit=audit) as svc,
    ):
        ids = await seed(svc)
        with immutable(Path(f"{db}-wal"), tmp_path):
            await outage_writes(svc, ids)
            assert svc.degraded_reason and "disk I/O error" in svc.degraded_reason
            await check_degraded_decisions(svc, "disk I/O error")
            await trio.sleep(0.2)
            assert svc.degraded
        await recovered(svc)
    check_after_recovery(db, ids, outage_detections=2)


async def test_restart_in_the_middle_of_an_outage(tmp_path: Path) -> None:
    """A daemon restarted while the database is locked decides from the persisted
    snapshot plus the journal of the previous run, then replays that journal."""
    db = tmp_path / "policy_graph.db"
    async with service(tmp_path) as svc:
        ids = await seed(svc)
    with held_lock(db) as lock:
        async with service(tmp_path) as svc:
            await outage_writes(svc, ids)
            await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
        # restart, lock still held
        async with service(tmp_path) as svc:
            assert svc.degraded and svc.degraded_reason == "database locked"
            assert svc.journal_depth >= 5
            d = await svc.decide(sha256=H_NEW, url=None, matches=[])  # queued by the first run
            assert (d.action, d.degraded) == ("block", True)
            await check_degraded_decisions(svc, "database locked")
        # a third start, still locked, then the lock goes away: recovery without a restart
        async with service(tmp_path) as svc:
            assert svc.degraded
            lock.execute("ROLLBACK")
            await recovered(svc)
    check_after_recovery(db, ids, outage_detections=3)


async def test_restart_with_a_corrupt_database(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    async with service(tmp_path) as svc:
        ids = await seed(svc)
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(os.urandom(8192))
    async with service(tmp_path) as svc:
        assert not svc.degraded  # rebuilt from the snapshot at startup
        d = await svc.decide(sha256=H_ALLOW, url=None, matches=EVIL)
        assert (d.action, d.policy_id, d.degraded) == ("allow", ids["allow"], False)
    assert len(list(tmp_path.glob("policy_graph.db.corrupt-*"))) == 1


async def test_hanging_database_call_is_bounded_and_applied_once(tmp_path: Path) -> None:
    """A call stuck behind a lock longer than op_timeout: the caller gets a
    degraded verdict in time, and the record is not applied twice when the
    stuck call finally commits and the journal is replayed."""
    db = tmp_path / "policy_graph.db"
    config = fast_config(busy_timeout_ms=1500, op_timeout=0.15)
    async with service(tmp_path, config) as svc:
        await seed(svc)
        with held_lock(db):
            start = trio.current_time()
            d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
            assert d.degraded and "not responding" in (d.degraded_reason or "")
            assert trio.current_time() - start < 1.2
            await svc.add(action="block", sha256=H_NEW, created_by="t")
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="recovery")
        await trio.sleep(0.2)  # let every abandoned call finish
    policies, threats = db_state(db)
    assert sum(t[0] == H_OUTAGE for t in threats) == 1
    assert sum(p[1] == H_NEW for p in policies) == 1


async def test_clean_files_are_not_queued_behind_a_stuck_database_write(tmp_path: Path) -> None:
    """A clean file that no policy decides records nothing, so while the
    database is healthy it is decided from the snapshot (which mirrors it):
    a write stuck behind another program's lock does not delay it. What a
    policy decides still goes through the database and counts its hit."""
    db = tmp_path / "policy_graph.db"
    config = fast_config(busy_timeout_ms=1500, op_timeout=3.0)
    async with service(tmp_path, config) as svc:
        ids = await seed(svc)
        _, threats_before = db_state(db)
        with held_lock(db):
            async with trio.open_nursery() as nursery:
                # Blocks the store thread for busy_timeout (1.5 s) on the lock.
                nursery.start_soon(
                    partial(svc.add, action="warn", rule_name="Stuck", created_by="t")
                )
                await trio.sleep(0.1)
                start = trio.current_time()
                d = await svc.decide(sha256=H_UNSEEN, url="https://fine.example/x", matches=[])
                assert trio.current_time() - start < 0.5
                assert (d.action, d.policy_id, d.degraded) == ("allow", None, False)
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="recovery")
        d = await svc.decide(sha256=H_ALLOW, url=None, matches=[])
        assert (d.action, d.policy_id, d.degraded) == ("allow", ids["allow"], False)
        d = await svc.decide(sha256=H_UNSEEN, url="https://bad.example/y", matches=[])
        assert (d.action, d.policy_id) == ("quarantine", ids["url"])
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        hits = conn.execute("SELECT hit_count FROM policies WHERE id = ?", (ids["allow"],))
        assert hits.fetchone()[0] == 1
    finally:
        conn.close()
    _, threats = db_state(db)
    assert threats == [*threats_before, (H_UNSEEN, "quarantine")]  # none for the clean file


async def test_many_concurrent_verdicts_during_an_outage(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    async with service(tmp_path) as svc:
        await seed(svc)
        results = []
        with held_lock(db):
            await svc.add(action="allow", rule_name="Harmless", created_by="t")  # trips degraded
            async with trio.open_nursery() as n:
                for i in range(200):
                    sha = f"{i:064x}"

                    async def one(sha: str = sha) -> None:
                        results.append(await svc.decide(sha256=sha, url=None, matches=EVIL))

                    n.start_soon(one)
            assert len(results) == 200 and all(r.degraded and r.action == "block" for r in results)
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="recovery")
    _, threats = db_state(db)
    assert len({t[0] for t in threats if t[0].startswith("0" * 40)}) == 200
    assert len([t for t in threats if t[0].startswith("0" * 40)]) == 200


async def test_retry_now_recovers_without_waiting_for_the_breaker(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    config = fast_config(breaker=DEFAULT_BREAKER)  # the real preset: 30 s open
    async with service(tmp_path, config) as svc:
        await seed(svc)
        with held_lock(db):
            await svc.add(action="allow", rule_name="Harmless", created_by="t")
            await wait_for(lambda: svc.breaker.state is BreakerState.OPEN, what="breaker open")
            assert await svc.retry_now() is False  # still locked: the trial fails, open again
            assert svc.breaker.state is BreakerState.OPEN
        start = trio.current_time()
        assert await svc.retry_now() is True
        assert trio.current_time() - start < 5 and not svc.degraded and svc.journal_depth == 0
        assert svc.breaker.statistics().retry_after is None
    policies, _ = db_state(db)
    assert [p[3] for p in policies if p[3]] == ["Adware", "Harmless"]


async def test_breaker_preset_timing_on_a_mock_clock(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """The real database preset (5 failures, 30 s open, 2 successes): degraded
    verdicts while open, no trial before 30 s, recovery by itself after."""
    clock = mock_clock
    db = tmp_path / "policy_graph.db"
    config = fast_config(
        breaker=DEFAULT_BREAKER,
        retry=dataclasses.replace(RETRY_PRESETS["database"], attempts=1),  # no sleeps to jump
        op_timeout=30.0,
        verify_interval=1e6,
        probe_interval=1e6,
    )

    async def run() -> None:
        async def real_sleep(s: float) -> None:
            await trio.to_thread.run_sync(time.sleep, s)  # real time: the store thread works

        async with service(tmp_path, config) as svc:
            await seed(svc)
            with held_lock(db):
                for i in range(5):
                    await svc.add(action="allow", rule_name=f"R{i}", created_by="t")
                    d = await svc.decide(sha256=H_OUTAGE, url=None, matches=EVIL)
                    assert d.degraded
                # degraded decisions never touch the database; the probes did the counting
                for _ in range(50):
                    if svc.breaker.state is BreakerState.OPEN:
                        break
                    clock.jump(1e6)  # wake the maintenance task for its next probe
                    await real_sleep(0.02)
                assert svc.breaker.state is BreakerState.OPEN
                assert svc.breaker.statistics().retry_after == pytest.approx(30.0)
            clock.jump(29.0)
            await real_sleep(0.2)
            assert svc.degraded and svc.breaker.state is BreakerState.OPEN  # no trial yet
            clock.jump(1.5)
            for _ in range(200):
                if not svc.degraded:
                    break
                await real_sleep(0.01)
            assert not svc.degraded and svc.breaker.state is BreakerState.CLOSED

    await run()
    policies, _ = db_state(db)
    assert sorted(p[3] for p in policies if p[3]) == ["Adware", "R0", "R1", "R2", "R3", "R4"]


async def test_journal_full_is_bounded_and_refuses_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    async with service(tmp_path, fast_config(max_journal_bytes=4096)) as svc:
        await seed(svc)
        with held_lock(db):
            await svc.add(action="allow", rule_name="Harmless", created_by="t")
            for i in range(40):
                d = await svc.decide(sha256=f"{i:064x}", url=None, matches=EVIL)
                assert d.action == "block"  # verdicts never stop
            assert svc.records_dropped > 0
            assert any("could not be queued" in w for w in d.warnings)
            with pytest.raises(JournalFullError):
                for i in range(100):
                    await svc.add(action="block", rule_name=f"R{i}", created_by="t")
        await wait_for(lambda: not svc.degraded and svc.journal_depth == 0, what="recovery")


# --- chmod as nobody -----------------------------------------------------------------

NOBODY_SCENARIO = textwrap.dedent(
    """
    import dataclasses, json, os, sys, trio
    from pathlib import Path
    from sentinel_ipc.messages import RuleMatch
    from sentinel_ipc.policy import PolicyConfig, open_policy_service
    from sentinel_ipc.policy.service import DEFAULT_BREAKER
    from sentinel_ipc.resilience import RETRY_PRESETS

    data, case = Path(sys.argv[1]), sys.argv[2]
    db = data / "policy_graph.db"
    cfg = PolicyConfig(
        retry=dataclasses.replace(RETRY_PRESETS["database"], initial=0.001, max_delay=0.004),
        breaker=dataclasses.replace(DEFAULT_BREAKER, open_timeout=0.2),
        busy_timeout_ms=10, verify_interval=0.05, probe_interval=0.05)
    out = {}

    async def until(pred):
        with trio.fail_after(15):
            while not pred():
                await trio.sleep(0.01)

    async def main():
        async with open_policy_service(cfg, data) as svc:
            pid, _ = await svc.add(action="block", sha256="b2" * 32, created_by="t")
            if case == "chmod-db":
                os.chmod(db, 0)
                await until(lambda: svc.degraded)
                out["reason"] = svc.degraded_reason
        if case == "ro-dir":
            os.chmod(data, 0o500)
        async with open_policy_service(cfg, data) as svc:
            out["degraded"] = svc.degraded
            out["reason2"] = svc.degraded_reason
            d = await svc.decide(sha256="b2" * 32, url=None, matches=[])
            out["cached"] = [d.action, d.degraded]
            d = await svc.decide(sha256="d4" * 32, url=None, matches=[RuleMatch(rule="Evil")])
            out["miss"] = [d.action, d.degraded]
            queued = await svc.add(action="allow", rule_name="Harmless", created_by="t")
            out["queued"] = list(queued)
            out["queued_again"] = list(
                await svc.add(action="allow", rule_name="X", created_by="t", idempotency_key="k")
            )
            await svc.add(action="allow", rule_name="X", created_by="t", idempotency_key="k")
            os.chmod(db, 0o600)
            os.chmod(data, 0o700)
            await until(lambda: not svc.degraded and svc.journal_depth == 0)
            policies, degraded = await svc.list()
            out["after"] = sorted(p.rule_name or p.file_hash for p in policies)
            out["threats"] = len(await svc.threats())

    trio.run(main)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("case", ["chmod-db", "ro-dir"])
def test_permission_faults_as_nobody(case: str) -> None:
    """``chmod 000`` on the database file (the open connection keeps working; the
    verification's fresh open is refused), and a read-only data dir across a
    restart (SQLite cannot create its -wal): run as ``nobody``, for whom the
    modes bind."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as nobody")
    data = Path(tempfile.mkdtemp(prefix="sentinel-nobody-"))
    try:
        os.chown(data, 65534, 65534)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(data)}
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-c",
                NOBODY_SCENARIO,
                str(data),
                case,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=str(data),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        os.chmod(data, 0o700)
        shutil.rmtree(data, ignore_errors=True)
    if case == "chmod-db":
        assert "unable to open" in out["reason"] or "denied" in out["reason"], out
    assert out["degraded"] is True and out["reason2"], out
    assert out["cached"] == ["block", True]
    assert out["miss"] == ["block", True]
    assert out["queued"] == [None, True] and out["queued_again"] == [None, True]
    assert out["after"] == sorted(["Harmless", "X", "b2" * 32])
    assert out["threats"] == 2
