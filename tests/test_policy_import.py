"""``policy_import``: a hash blocklist added in batches (one write per batch).

Against a real ``sentineld`` and its real SQLite file: ``sentinelctl policy
import`` run as a subprocess (2,500 hashes, then again: all existing), the
all-or-nothing validation, the 1000-item bound, the refusal to another uid,
the idempotency key, and an import during an outage (another connection holds
``BEGIN EXCLUSIVE``: queued, then in the database exactly once after
recovery). At the store level: ``add_many`` is one transaction (a failure in
the middle of a batch leaves nothing) and a re-sent batch is a no-op.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from test_policy_daemon import Wire, audit_events, wait_audit
from test_policy_faults_daemon import exclusive_lock, fault_config, wait_healthy
from test_security import (  # noqa: F401  (shared_base is a fixture)
    as_nobody,
    can_be_nobody,
    open_daemon,
    running,
    shared_base,
)

from sentinel_ipc.errors import PolicyConflictError
from sentinel_ipc.messages import (
    Error,
    PolicyAdd,
    PolicyImport,
    PolicyImportItem,
    PolicyImportResult,
    PolicyList,
    PolicyListResult,
    PolicyResult,
)
from sentinel_ipc.policy.store import PolicyStore
from sentinel_ipc.policy.validation import PolicyDraft, validate_policy
from sentinel_ipc.transport import open_framed_connection

ROOT = Path(__file__).resolve().parent.parent


def hashes(n: int, salt: str) -> list[str]:
    """``n`` distinct sha256-shaped strings (the daemon never hashes them)."""
    import hashlib

    return [hashlib.sha256(f"{salt}-{i}".encode()).hexdigest() for i in range(n)]


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentinel_ipc.cli.sentinelctl", "--socket", str(sock),
         "--timeout", "20", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )


def db_hash_counts(data_dir: Path) -> dict[str, int]:
    """file_hash -> rows, read straight from the daemon's database."""
    conn = sqlite3.connect(f"file:{data_dir / 'policy_graph.db'}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(
            "SELECT file_hash, count(*) FROM policies WHERE file_hash IS NOT NULL "
            "GROUP BY file_hash"
        ).fetchall()
    finally:
        conn.close()
    return dict(rows)


def items(shas: list[str], action: str = "block") -> list[PolicyImportItem]:
    return [PolicyImportItem(action=action, sha256=h) for h in shas]  # type: ignore[arg-type]


async def listed_hashes(w: Wire) -> set[str]:
    found: set[str] = set()
    after = 0
    while True:
        page: PolicyListResult = await w.ok(PolicyList, PolicyListResult, after_id=after,
                                            limit=1000)
        found.update(p.file_hash for p in page.policies if p.file_hash)
        if page.next_after_id is None:
            return found
        after = page.next_after_id


# --- sentinelctl ------------------------------------------------------------------------


def test_sentinelctl_imports_a_blocklist_and_again_finds_it_all_existing(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(config={"scanner": {"workers": 1}})
    shas = hashes(2500, "ctl")
    blocklist = tmp_path / "feed.txt"
    lines = ["# threat feed, 2,500 hashes", ""]
    lines += [h.upper() if i % 7 == 0 else h for i, h in enumerate(shas)]
    lines.insert(100, "   ")
    lines.insert(200, f"{shas[5]}  # repeated: counts once")
    blocklist.write_text("\n".join(lines) + "\n")

    first = ctl(d.socket_path, "policy", "import", str(blocklist), "--reason", "feed")
    assert (first.returncode, first.stdout.strip()) == (0, "added 2500, existing 0"), first
    counts = db_hash_counts(d.data_dir)
    assert set(counts) == set(shas) and set(counts.values()) == {1}

    listing = ctl(d.socket_path, "--json", "policy", "list")
    assert listing.returncode == 0, listing.stderr
    policies = json.loads(listing.stdout)["policies"]
    assert {p["file_hash"] for p in policies} == set(shas)
    assert {(p["action"], p["reason"]) for p in policies} == {("block", "feed")}

    again = ctl(d.socket_path, "--json", "policy", "import", str(blocklist))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {
        "added": 0, "existing": 2500, "queued": False, "hashes": 2501,
    }
    assert db_hash_counts(d.data_dir) == counts


def test_sentinelctl_refuses_a_bad_line_by_number_and_sends_nothing(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(config={"scanner": {"workers": 1}})
    shas = hashes(1500, "bad")
    feed = tmp_path / "feed.txt"
    feed.write_text("\n".join([*shas[:1200], "not-a-hash", *shas[1200:]]) + "\n")
    result = ctl(d.socket_path, "policy", "import", str(feed))
    assert result.returncode == 2
    assert f"{feed}:1201:" in result.stderr and "nothing was sent" in result.stderr
    assert db_hash_counts(d.data_dir) == {}
    missing = ctl(d.socket_path, "policy", "import", str(tmp_path / "absent.txt"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


# --- the request ------------------------------------------------------------------------


async def test_import_semantics_over_the_wire(daemon_factory: Any) -> None:
    d = daemon_factory(config={"scanner": {"workers": 1}})
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        single: PolicyResult = await w.ok(PolicyAdd, PolicyResult, action="allow",
                                          sha256=hashes(1, "pre")[0])
        shas = hashes(10, "wire")
        batch = [*items(shas[:5]), PolicyImportItem(action="allow", sha256=hashes(1, "pre")[0]),
                 *items(shas[5:]), PolicyImportItem(action="warn", sha256=shas[2])]
        r: PolicyImportResult = await w.ok(PolicyImport, PolicyImportResult, policies=batch,
                                           idempotency_key="feed-1")
        assert (r.added, r.existing, r.queued) == (10, 1, False)
        assert len(r.policy_ids) == 10 and r.policy_ids == sorted(r.policy_ids)
        assert single.policy_id not in r.policy_ids
        rows = db_hash_counts(d.data_dir)
        assert all(rows[h] == 1 for h in shas) and len(rows) == 11

        # The same key again: nothing applied, the first answer.
        again = await w.ok(PolicyImport, PolicyImportResult, policies=batch,
                           idempotency_key="feed-1")
        assert (again.added, again.existing, again.policy_ids) == (10, 1, r.policy_ids)
        # Without the key: an import is re-runnable; all of it exists now.
        rerun = await w.ok(PolicyImport, PolicyImportResult, policies=batch)
        assert (rerun.added, rerun.existing, rerun.policy_ids) == (0, 11, [])

        # One invalid item refuses the whole request, naming it; nothing added.
        fresh = hashes(5, "invalid")
        bad = [*items(fresh[:3]), PolicyImportItem(action="block", sha256="xyz"),
               *items(fresh[3:])]
        err = await w.error(PolicyImport, "policy_invalid", policies=bad)
        assert "policies[3]" in err.message and "sha256" in err.message
        no_target = [*items(fresh[:1]), PolicyImportItem(action="block")]
        err = await w.error(PolicyImport, "policy_invalid", policies=no_target)
        assert "policies[1]" in err.message

        # Over the bound: invalid_message; nothing added.
        err = await w.error(PolicyImport, "invalid_message", policies=items(hashes(1001, "big")))
        assert "1000" in err.message
        assert not set(fresh) & set(db_hash_counts(d.data_dir))
        assert not (await listed_hashes(w)) & set(fresh)

        empty = await w.ok(PolicyImport, PolicyImportResult, policies=[])
        assert (empty.added, empty.existing, empty.policy_ids) == (0, 0, [])
        # Each import still answers in one frame at the bound (1000 ids).
        full = await w.ok(PolicyImport, PolicyImportResult, policies=items(hashes(1000, "full")))
        assert full.added == 1000 and len(set(full.policy_ids)) == 1000


@can_be_nobody
def test_another_user_is_refused_an_import(shared_base: Path) -> None:  # noqa: F811
    with running(open_daemon(shared_base, {"scanner": {"workers": 1}})) as d:
        [reply] = as_nobody(d.socket_path, [PolicyImport(id=5, policies=items(hashes(3, "x")))])
        assert isinstance(reply, Error) and (reply.id, reply.code) == (5, "forbidden"), reply
        assert db_hash_counts(d.data_dir) == {}


# --- during an outage ---------------------------------------------------------------------


async def test_an_import_during_an_outage_is_queued_then_applied_exactly_once(
    daemon_factory: Any,
) -> None:
    d = daemon_factory(config=fault_config(scanner={"workers": 1}))
    before, during = hashes(300, "before"), hashes(1000, "during")
    db = d.data_dir / "policy_graph.db"
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        r = await w.ok(PolicyImport, PolicyImportResult, policies=items(before))
        assert (r.added, r.queued) == (300, False)
        with exclusive_lock(db):
            # 100 known (existing, by the cache), 899 new, one repeated.
            batch = items([*before[:100], *during[:899], during[0]])
            q: PolicyImportResult = await w.ok(PolicyImport, PolicyImportResult,
                                               policies=batch, idempotency_key="outage-1")
            assert (q.queued, q.added, q.existing, q.policy_ids) == (True, 899, 100, [])
            # Another batch while degraded, then the first re-sent: queued once.
            q2 = await w.ok(PolicyImport, PolicyImportResult, policies=items(during[899:]))
            assert (q2.queued, q2.added, q2.existing) == (True, 101, 0)
            resent = await w.ok(PolicyImport, PolicyImportResult, policies=batch,
                                idempotency_key="outage-1")
            assert (resent.queued, resent.added, resent.existing) == (True, 899, 100)
        await wait_healthy(w)
        with trio.fail_after(20):  # the replay may finish just after the switch
            for _ in range(1000):
                if set(during) <= await listed_hashes(w):
                    break
                await trio.sleep(0.1)
        counts = db_hash_counts(d.data_dir)
        assert set(counts) == set(before) | set(during)
        assert set(counts.values()) == {1}
        # After recovery the import is re-runnable as ever.
        rerun = await w.ok(PolicyImport, PolicyImportResult, policies=items(during))
        assert (rerun.added, rerun.existing, rerun.queued) == (0, 1000, False)
    # One audit event per batch that added something, not one per policy.
    events = wait_audit(d.data_dir, lambda e: e.get("kind") == "policy_import"
                        and e.get("added") == 101)
    assert events and not audit_events(d.data_dir, "policy_add")
    assert [(e["queued"], e["added"]) for e in audit_events(d.data_dir, "policy_import")] == [
        (False, 300), (True, 899), (True, 101)]


# --- the store ------------------------------------------------------------------------------


def draft(sha: str, action: str = "block") -> PolicyDraft:
    return validate_policy(action=action, now=1000.0, sha256=sha, created_by="test")


def test_add_many_is_one_transaction_and_a_resent_batch_a_no_op(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "policy_graph.db", busy_timeout_ms=20)
    store.ensure_open()
    try:
        shas = hashes(6, "store")
        existing = store.add(draft(shas[0]), key="single", now=1.0)[0]
        # A failure in the middle of the batch (the table's CHECK refuses an
        # action the validation would never let through) leaves nothing.
        broken = [(f"b/{i}", draft(h)) for i, h in enumerate(shas[1:])]
        broken.insert(3, ("b/x", PolicyDraft(action="explode", file_hash="f" * 64)))  # type: ignore[arg-type]
        with pytest.raises(PolicyConflictError):
            store.add_many(broken, now=2.0)
        assert [p.id for p in store.list_policies()] == [existing.id]
        assert store.lookup_key("b/0") == (False, None)

        batch = [(f"k/{i}", draft(h)) for i, h in enumerate(shas)]
        first = store.add_many(batch, now=3.0)
        assert [(o.added, o.policy is not None) for o in first] == [
            (False, False), *[(True, True)] * 5]
        assert first[0].policy_id == existing.id
        ids = [o.policy_id for o in first[1:]]
        assert [p.id for p in store.list_policies()] == [existing.id, *ids]

        again = store.add_many(batch, now=4.0)
        assert [(o.policy_id, o.added, o.policy) for o in again] == [
            (None, False, None), *[(i, True, None) for i in ids]]
        assert len(store.list_policies()) == 6
    finally:
        store.close()


def test_blocklist_file_parsing(tmp_path: Path) -> None:
    from sentinel_ipc.cli.sentinelctl import CommandError, read_hash_file

    good = hashes(3, "parse")
    feed = tmp_path / "f.txt"
    feed.write_text(f"# head\n\n{good[0].upper()}\n  {good[1]}  # trailing\n{good[2]}")
    assert read_hash_file(feed) == good
    feed.write_text(f"{good[0]}\n{good[1][:-1]}\n")
    with pytest.raises(CommandError, match=r":2: not a sha256"):
        read_hash_file(feed)
    assert os.path.exists(feed)
