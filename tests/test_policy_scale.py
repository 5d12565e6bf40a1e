"""The PolicyGraph with a large table (an imported hash blocklist).

Every store call runs on ONE store thread, bounded by ``[policy] op_timeout``,
and the bound counts the wait in the thread's queue. A whole-table operation
in one call (the snapshot load at start, after recovery and at each refresh;
the unpaged list; a rebuild seeded from the snapshot) grows with the table: at
300,000 policies it passes the default 2 s, and so does every call queued
behind it. The service therefore loads page by page, each page its own call;
a write made while a refresh loads is kept (the write generation); and the
store's recovery is bounded per step of progress, not as a whole.

The property is relative, not absolute: a one-call load must take longer
than ``op_timeout`` while each page fits in it with room to spare. Rather
than 300,000 rows (tens of seconds to seed and load), the module builds
100,000 once, measures on this machine how long the one-call load and the
store's open (which reads every page: ``quick_check``) take, and sets
``op_timeout`` between the two (their geometric mean) and the page size to
1/40 of the table. So the old code times out here for the same reason it
times out at 300,000 policies with the defaults, whatever the machine's speed.

Real SQLite files throughout; the table is written straight into the
``policies`` table with the schema's columns (one ``executemany``: a second,
where the store's replay takes ten). The one ordering test uses another
connection's write lock as a gate, not a sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from test_policy_faults import held_lock

from sentinel_ipc.errors import PolicyStoreError
from sentinel_ipc.messages import PolicyRecord, RuleMatch
from sentinel_ipc.observability.config import ResilienceConfig
from sentinel_ipc.policy import PolicyConfig, PolicyService, open_policy_service
from sentinel_ipc.policy.service import DEFAULT_BREAKER
from sentinel_ipc.policy.settings import PolicySettings
from sentinel_ipc.policy.snapshot import SnapshotFile, save_snapshot_file
from sentinel_ipc.policy.store import SEED_CHUNK, PolicyStore
from sentinel_ipc.policy.validation import PolicyDraft
from sentinel_ipc.resilience import RETRY_PRESETS, BreakerState, BreakerTransition

COUNT = 100_000
NOW = 1_767_139_200.0
H_NEW = "c3" * 32
H_SCAN = "e5" * 32
EVIL = [RuleMatch(rule="Evil", meta={"severity": "high"})]


@dataclasses.dataclass(frozen=True)
class Table:
    """A closed database of ``count`` policies, and the bounds measured on it."""

    path: Path
    count: int
    op_timeout: float
    load_chunk: int


def write_table(db: Path, count: int) -> None:
    """``count`` rule-name policies (ids 1..count) straight into the table."""
    store = PolicyStore(db)
    store.ensure_open()
    store.close()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO policies (id, rule_name, action, created_at, created_by) "
            "VALUES (?, ?, 'block', ?, 'test')",
            ((n, f"Rule{n}", NOW + n) for n in range(1, count + 1)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Table:
    path = tmp_path_factory.mktemp("scale") / "template.db"
    write_table(path, COUNT)
    store = PolicyStore(path)
    opens: list[float] = []
    loads: list[float] = []
    try:
        for _ in range(2):
            store.close()
            opens.append(timed(store.recover))
            loads.append(timed(partial(store.load_active, NOW)))
    finally:
        store.close()
    t_open, t_load = max(opens), min(loads)
    # The premise: loading the table costs well more than opening it.
    assert t_load > 2 * t_open, (t_open, t_load)
    op_timeout = math.sqrt(t_open * t_load)
    print(f"open {t_open:.3f} s, one-call load {t_load:.3f} s -> op_timeout {op_timeout:.3f} s")
    return Table(path, COUNT, op_timeout, COUNT // 40)


def config(**kw: Any) -> PolicyConfig:
    """Millisecond backoffs; no timer-driven verification or refresh unless asked."""
    base: dict[str, Any] = {
        "retry": dataclasses.replace(RETRY_PRESETS["database"], initial=0.001, max_delay=0.004),
        "breaker": dataclasses.replace(DEFAULT_BREAKER, open_timeout=0.2),
        "busy_timeout_ms": 10,
        "op_timeout": 5.0,
        "verify_interval": 3600.0,
        "probe_interval": 0.05,
        "refresh_interval": 3600.0,
    }
    base.update(kw)
    return PolicyConfig(**base)


def scaled(table: Table, **kw: Any) -> PolicyConfig:
    return config(op_timeout=table.op_timeout, load_chunk=table.load_chunk, **kw)


@contextlib.asynccontextmanager
async def service(data: Path, cfg: PolicyConfig) -> AsyncIterator[PolicyService]:
    async with open_policy_service(cfg, data) as svc:
        yield svc


async def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not pred():  # noqa: ASYNC110 - polling service state by design
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out waiting for {what}")


def row_count(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM policies").fetchone()[0])
    finally:
        conn.close()


class Watch:
    """The service's state changes and the database breaker's transitions."""

    def __init__(self, svc: PolicyService) -> None:
        self.reasons: list[str | None] = [svc.degraded_reason]
        self.transitions: list[BreakerTransition] = []
        svc.add_state_listener(lambda degraded, reason: self.reasons.append(reason))
        svc.breaker.add_listener(self.transitions.append)

    def check_no_failed_attempt(self) -> None:
        assert not [r for r in self.reasons if r and "not responding" in r], self.reasons
        opened = [t for t in self.transitions if t.to_state is BreakerState.OPEN]
        assert not opened, opened


# --- the store ----------------------------------------------------------------


def test_load_active_page_is_a_keyset_page_of_the_active_policies(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "policy_graph.db")
    store.ensure_open()
    try:
        ids = [
            store.add(
                PolicyDraft(action="block", rule_name=f"R{n}", created_by="t",
                            expires_at=NOW + 10 if n in (2, 5) else None),
                key=None, now=NOW,
            )[0].id
            for n in range(8)
        ]
        store.remove(ids[-1], key=None, now=NOW)
        pages, after = [], 0
        while True:
            rows, top = store.load_active_page(after, 2, NOW + 20)
            assert top == ids[-1]  # the removed top id is still the highest handed out
            pages.append([p.id for p in rows])
            if len(rows) < 2:
                break
            after = rows[-1].id
        active = [i for n, i in enumerate(ids[:-1]) if n not in (2, 5)]
        assert [i for page in pages for i in page] == active
        assert all(len(page) <= 2 for page in pages)
        assert [p.id for p in store.load_active(NOW + 20)[0]] == active
    finally:
        store.close()


def test_a_seed_that_fails_half_way_is_seeded_again(tmp_path: Path) -> None:
    """A new database is created and seeded in one transaction: a seed that
    fails after some chunks went in leaves no schema behind, so the next open
    seeds again instead of taking an empty database for a valid one."""
    db = tmp_path / "policy_graph.db"
    good = [
        PolicyRecord(id=n, action="block", rule_name=f"R{n}", created_at=NOW, created_by="t")
        for n in range(1, 2 * SEED_CHUNK + 2)
    ]
    unbindable: Any = object()
    bad = PolicyRecord(id=len(good) + 1, action="block", rule_name="Bad", reason=unbindable)
    store = PolicyStore(db)
    with pytest.raises(PolicyStoreError):
        store.recover([*good, bad], len(good) + 1)
    assert not store.is_open
    try:
        kinds = [e.kind for e in store.recover(good, len(good) + 1)]
        assert kinds == ["created", "seeded"]
        policies, top = store.load_active(NOW)
        assert [p.id for p in policies] == [p.id for p in good]
        assert top == len(good) + 1
    finally:
        store.close()


def test_load_chunk_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="load_chunk"):
        PolicySettings(load_chunk=0)
    assert PolicySettings(load_chunk=7).to_config(ResilienceConfig(), []).load_chunk == 7


# --- the service ----------------------------------------------------------------


async def test_a_large_table_loads_in_pages_and_other_calls_run_between_them(
    tmp_path: Path, table: Table
) -> None:
    """Start, refresh and the unpaged list each read the whole table, which in
    one call takes longer than op_timeout: the service starts healthy with
    every policy, and a write and a detection issued during a refresh complete
    between two of its pages, without a timeout."""
    shutil.copy(table.path, tmp_path / "policy_graph.db")
    async with service(tmp_path, scaled(table)) as svc:
        assert not svc.degraded, svc.degraded_reason
        assert svc.snapshot_size == table.count
        watch = Watch(svc)
        calls: list[str] = []
        first_page = trio.Event()

        def observe(operation: str, seconds: float) -> None:
            calls.append(operation)
            if operation == "load":
                first_page.set()

        svc.add_query_observer(observe)
        replaced: list[bool] = []
        added: list[tuple[int | None, bool]] = []
        verdicts = []

        async def refresh() -> None:
            replaced.append(await svc.refresh_snapshot())

        async def add() -> None:
            added.append(await svc.add(action="block", sha256=H_NEW, created_by="t"))

        async def detect() -> None:
            verdicts.append(await svc.decide(sha256=H_SCAN, url=None, matches=EVIL))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh)
            await first_page.wait()
            nursery.start_soon(add)
            nursery.start_soon(detect)
        ((policy_id, queued),) = added
        assert policy_id is not None and not queued
        (verdict,) = verdicts
        assert (verdict.action, verdict.degraded) == ("block", False)
        # Both ran between pages of the refresh's load.
        for operation in ("add", "decide"):
            at = calls.index(operation)
            assert "load" in calls[:at] and "load" in calls[at + 1 :], calls
        # The add landed during the load: the refresh gave way, the add stays.
        assert replaced == [False]
        assert svc.snapshot_size == table.count + 1
        assert not svc.degraded
        assert await svc.refresh_snapshot()
        assert svc.snapshot_size == table.count + 1

        policies, degraded = await svc.list()
        assert not degraded and not svc.degraded
        ids = [p.id for p in policies]
        assert len(ids) == table.count + 1 and ids == sorted(set(ids))
        assert ids[-1] == policy_id
        decision = await svc.decide(sha256=H_NEW, url=None, matches=[])
        assert (decision.action, decision.policy_id, decision.degraded) == (
            "block", policy_id, False,
        )
        watch.check_no_failed_attempt()
        assert len(watch.reasons) == 1  # never degraded


@pytest.mark.parametrize(("write", "load_chunk"), [("add", 100), ("remove", 1)])
async def test_a_write_that_lands_during_a_refresh_is_kept(
    tmp_path: Path, write: str, load_chunk: int
) -> None:
    """Deterministic order: another program's write lock holds a write on the
    store thread; the refresh's first page queues behind it and the test's
    write waits for the write lock. Released, the write completes while the
    refresh loads (an add after its only page, a remove after the removed
    policy's page), before the refresh can replace the snapshot. Without the
    write generation the replacement would drop the add, or bring the removed
    policy back, until the next refresh (300 s by default)."""
    db = tmp_path / "policy_graph.db"
    cfg = config(load_chunk=load_chunk, busy_timeout_ms=5000, op_timeout=10.0)
    async with service(tmp_path, cfg) as svc:
        ids = []
        for n in range(6):
            policy_id, _ = await svc.add(action="block", rule_name=f"Rule{n}", created_by="t")
            ids.append(policy_id)
        replaced: list[bool] = []

        async def refresh() -> None:
            replaced.append(await svc.refresh_snapshot())

        async def the_write() -> None:
            if write == "add":
                await svc.add(action="block", sha256=H_NEW, created_by="t")
            else:
                assert ids[0] is not None
                await svc.remove(ids[0])

        with held_lock(db) as other:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(svc.add, action="warn", rule_name="Gate", created_by="t")
                )
                await trio.testing.wait_all_tasks_blocked()  # the store thread waits on the lock
                nursery.start_soon(refresh)
                await trio.testing.wait_all_tasks_blocked()  # its first page is queued
                nursery.start_soon(the_write)
                await trio.testing.wait_all_tasks_blocked()  # waits for the write lock
                other.execute("ROLLBACK")
        expected = 6 + 1 + (1 if write == "add" else -1)
        assert row_count(db) == expected
        assert svc.snapshot_size == expected
        assert replaced == [False]
        # Given way, the refresh comes again soon (probe_interval), not after
        # refresh_interval (an hour here): it picks up a change another
        # program made to the file, which only a refresh can see.
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute(
                "INSERT INTO policies (rule_name, action, created_at) "
                "VALUES ('OutOfBand', 'warn', ?)",
                (NOW,),
            )
        finally:
            conn.close()
        await wait_for(lambda: svc.snapshot_size == expected + 1, 10.0, "the retried refresh")
        assert not svc.degraded


async def test_recovery_reloads_a_large_table(tmp_path: Path, table: Table) -> None:
    """After an outage the snapshot is reloaded (under the write lock, page by
    page): a load in one call would time out at every attempt, and the
    service would never leave degraded mode."""
    db = tmp_path / "policy_graph.db"
    shutil.copy(table.path, db)
    async with service(tmp_path, scaled(table)) as svc:
        assert not svc.degraded, svc.degraded_reason
        with held_lock(db):
            policy_id, queued = await svc.add(action="block", sha256=H_NEW, created_by="t")
            assert (policy_id, queued, svc.degraded) == (None, True, True)
        await wait_for(
            lambda: not svc.degraded and svc.journal_depth == 0, 20.0, "recovery"
        )
        assert svc.snapshot_size == table.count + 1
        decision = await svc.decide(sha256=H_NEW, url=None, matches=[])
        assert (decision.action, decision.degraded) == ("block", False)
    assert row_count(db) == table.count + 1


def large_snapshot(data: Path, count: int) -> None:
    policies = [
        PolicyRecord(id=n, action="block", rule_name=f"Rule{n}", created_at=NOW, created_by="t")
        for n in range(1, count + 1)
    ]
    data.mkdir(parents=True, exist_ok=True)
    save_snapshot_file(
        data / "policy_snapshot.json",
        SnapshotFile(saved_at=NOW, max_policy_id=count, policies=policies),
    )


async def test_a_missing_database_is_rebuilt_from_a_large_snapshot(
    tmp_path: Path, table: Table
) -> None:
    """Start-up with the snapshot but no database: the rebuild (one
    transaction, far longer than op_timeout) does not hold the daemon back,
    which decides from the snapshot meanwhile, and the recovery waits for it
    by its progress: no attempt times out, the breaker never opens."""
    large_snapshot(tmp_path, table.count)
    async with service(tmp_path, scaled(table)) as svc:
        watch = Watch(svc)
        assert svc.snapshot_size == table.count
        if svc.degraded:
            assert svc.degraded_reason == "database being rebuilt from cached policies"
            decision = await svc.decide(sha256=H_SCAN, url=None, matches=[RuleMatch(rule="Rule7")])
            assert (decision.action, decision.degraded) == ("block", True)
        await wait_for(lambda: not svc.degraded, 30.0, "the rebuilt database")
        watch.check_no_failed_attempt()
        assert svc.snapshot_size == table.count
    assert row_count(tmp_path / "policy_graph.db") == table.count


async def test_a_corrupt_database_is_rebuilt_from_a_large_snapshot(
    tmp_path: Path, table: Table
) -> None:
    """The file is overwritten while the service runs: recovery moves it aside
    and rebuilds it from the snapshot (all of it) in one store call, bounded
    per step of progress, not as a whole."""
    db = tmp_path / "policy_graph.db"
    shutil.copy(table.path, db)
    async with service(tmp_path, scaled(table, verify_interval=0.05)) as svc:
        assert not svc.degraded, svc.degraded_reason
        watch = Watch(svc)
        with db.open("r+b") as f:
            f.write(b"this is not a database at all...")
        await wait_for(lambda: svc.degraded, 10.0, "the corruption to be noticed")
        await wait_for(lambda: not svc.degraded, 30.0, "the rebuilt database")
        watch.check_no_failed_attempt()
        assert "database corrupt" in watch.reasons
        assert svc.snapshot_size == table.count
    assert row_count(db) == table.count
    assert list(tmp_path.glob("policy_graph.db.corrupt-*"))
