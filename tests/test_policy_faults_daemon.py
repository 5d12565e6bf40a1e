"""Issue 5 point 7: real database faults against a real ``sentineld``.

The library half (``test_policy_faults.py``) drives a PolicyService in-process;
here every fault is made under a running daemon, and everything is observed
the way a client sees it, over the socket:

* another connection holds ``BEGIN EXCLUSIVE`` on the daemon's database;
* the file is replaced by random bytes; the file is deleted;
* ``chmod 000`` on the file, with the daemon running as ``nobody`` (root
  ignores file modes);
* the data dir made read-only (``chattr +i``: binds root too) after the
  database was deleted, so it cannot be recreated;
* the daemon SIGKILLed and restarted in the middle of an outage.

In each: scans keep getting verdicts (``degraded: true``, ``database`` among
the reasons) decided from the cached policies; a hash never seen falls
through to the rules; writes are answered ``queued: true``; after recovery
(by itself, or at once on ``service_retry``) every write made during the
outage is in the database exactly once, and the daemon never restarted.

Timings are shortened by configuration (breaker open 1 s, verify and probe
every 0.2 s); no test sleeps through a backoff, they poll for a state.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from test_policy_daemon import EICAR, EMBEDDED, Wire, audit_events, sha

from sentinel_ipc.messages import (
    Ack,
    Error,
    PolicyAdd,
    PolicyDecision,
    PolicyList,
    PolicyListResult,
    PolicyQuery,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
    ScanResult,
    ServiceRetry,
    Threats,
)
from sentinel_ipc.transport import open_framed_connection

NOBODY = 65534
KNOWN_BAD = b"known bad file " * 300
ROOT = Path(__file__).resolve().parent.parent
UNSEEN_QUERY = "0f" * 32  # never a policy: policy_query on it tells the service's state


def fault_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"socket_mode": 0o666},
        "scanner": {"workers": 1},
        "rate_limit": {"burst": 1000, "scans_per_second": 1000.0},
        "resilience": {
            "breakers": {
                "database": {"failure_threshold": 2, "open_timeout": 1.0, "success_threshold": 1}
            },
        },
        "policy": {"verify_interval": 0.2, "probe_interval": 0.2},
    }
    for key, value in extra.items():
        config.setdefault(key, {}).update(value)
    return config


# --- the scenario every fault goes through ------------------------------------


class Seeded(msgspec.Struct):
    allow_eicar: int
    block_bad: int
    block_site: int


async def seed(w: Wire) -> Seeded:
    """Three policies, made while healthy, and one hit on the known-bad hash."""
    s = Seeded(
        allow_eicar=await w.add("allow", sha256=sha(EICAR)),
        block_bad=await w.add("block", sha256=sha(KNOWN_BAD)),
        block_site=await w.add("block", url_pattern="https://evil.example/*"),
    )
    r = await w.scan(KNOWN_BAD)
    assert (r.action, r.policy_id, r.degraded) == ("block", s.block_bad, False)
    return s


async def state(w: Wire) -> PolicyDecision:
    d: PolicyDecision = await w.ok(PolicyQuery, PolicyDecision, sha256=UNSEEN_QUERY)
    return d


async def wait_state(w: Wire, degraded: bool, timeout: float = 15.0) -> None:
    """Poll the daemon (over the wire: there is nothing to wait on in this process)."""
    with trio.move_on_after(timeout):
        for _ in range(100_000):
            if (await state(w)).degraded == degraded:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"degraded={degraded} not reached within {timeout}s")


async def wait_degraded(w: Wire) -> None:
    await wait_state(w, True)


async def wait_healthy(w: Wire) -> None:
    await wait_state(w, False)


def degraded_verdict(r: ScanResult, why: str = "") -> None:
    assert r.degraded, r
    assert "database" in r.degraded_reasons, r
    assert any("cached" in w and why in w for w in r.warnings), r.warnings


async def outage_reason(w: Wire) -> str:
    """The reason the verdicts give (the warning says why the database is down)."""
    r = await w.scan(b"reason probe " + os.urandom(8))
    degraded_verdict(r)
    [warning] = [x for x in r.warnings if "cached" in x]
    return warning


class Outage(msgspec.Struct):
    """What was written during one outage, to find exactly once afterwards."""

    new_block: bytes  # a file blocked by a policy queued during the outage
    unseen: bytes  # a file no policy knows, scanned during the outage (a detection)
    key: str  # the idempotency key of a queued add sent twice
    removed: int | None  # a policy removed during the outage


async def outage(w: Wire, s: Seeded, tag: str, *, remove: bool = True) -> Outage:
    """Verdicts, a cache miss and queued writes while the database is down."""
    # Verdicts from the cached policies, marked degraded.
    r = await w.scan(EICAR, url="https://dl.example/eicar.com")
    assert (r.action, r.policy_id) == ("allow", s.allow_eicar)
    degraded_verdict(r)
    r = await w.scan(KNOWN_BAD)
    assert (r.action, r.policy_id) == ("block", s.block_bad)
    degraded_verdict(r)
    # A hash never seen: the rules decide (EICAR_Embedded, default block), degraded.
    unseen = EMBEDDED + f" unseen {tag} ".encode() + os.urandom(8)
    r = await w.scan(unseen, filename=f"unseen-{tag}.bin")
    assert (r.action, r.policy_id) == ("block", None)
    assert [m.rule for m in r.matches] == ["EICAR_Embedded"]
    degraded_verdict(r)
    r = await w.scan(os.urandom(2048))
    assert (r.action, r.policy_id) == ("allow", None)
    degraded_verdict(r)

    # Writes are journaled and answered queued; they apply to verdicts at once.
    new_block = f"new known-bad file {tag} ".encode() * 50
    q = await w.ok(PolicyAdd, PolicyResult, action="block", sha256=sha(new_block))
    assert (q.policy_id, q.queued) == (None, True)
    key = f"outage-{tag}"
    for _ in range(2):  # a client retry: the same idempotency key
        q = await w.ok(
            PolicyAdd, PolicyResult, action="warn", rule_name=f"Rule_{tag}", idempotency_key=key
        )
        assert q.queued
    await w.error(PolicyAdd, "policy_conflict", action="warn", sha256=sha(new_block))
    r = await w.scan(new_block)
    assert (r.action, r.policy_id) == ("block", None)  # queued: no database id yet
    assert r.reason and "queued" in r.reason
    degraded_verdict(r)
    removed = None
    if remove:
        q = await w.ok(PolicyRemove, PolicyResult, policy_id=s.block_site)
        assert (q.policy_id, q.queued) == (s.block_site, True)
        removed = s.block_site
        r = await w.scan(b"clean " * 10 + tag.encode(), url="https://evil.example/x")
        assert (r.action, r.policy_id) == ("allow", None)
        degraded_verdict(r)

    # Reads that need the database say so.
    listed: PolicyListResult = await w.ok(PolicyList, PolicyListResult)
    assert listed.degraded
    e = await w.call(Threats, limit=10)
    assert isinstance(e, Error) and e.code == "unavailable" and e.retryable is not False, e
    return Outage(new_block=new_block, unseen=unseen, key=key, removed=removed)


async def after_recovery(
    w: Wire, s: Seeded, outages: list[Outage], known_bad_hits: int | None
) -> None:
    """Every write of every outage in the database exactly once; verdicts healthy."""
    assert not (await state(w)).degraded
    listed: PolicyListResult = await w.ok(PolicyList, PolicyListResult)
    assert not listed.degraded
    policies = listed.policies
    ids = [p.id for p in policies]
    assert len(ids) == len(set(ids))

    def having(**fields: Any) -> list[PolicyRecord]:
        return [p for p in policies if all(getattr(p, k) == v for k, v in fields.items())]

    assert [p.id for p in having(file_hash=sha(EICAR))] == [s.allow_eicar]
    [bad] = having(file_hash=sha(KNOWN_BAD))
    assert bad.id == s.block_bad
    if known_bad_hits is not None:
        assert bad.hit_count == known_bad_hits
    removed = {o.removed for o in outages}
    assert bool(having(id=s.block_site)) == (s.block_site not in removed)
    threats = await w.threats(1000)
    for o in outages:
        [new] = having(file_hash=sha(o.new_block))
        assert (new.action, new.hit_count) == ("block", 1)  # the outage's hit, replayed
        assert len(having(rule_name=o.key.replace("outage-", "Rule_"))) == 1
        rows = [t for t in threats if t.file_hash == sha(o.unseen)]
        assert [(t.action_taken, t.rule_names) for t in rows] == [("block", ["EICAR_Embedded"])]
        [row] = [t for t in threats if t.file_hash == sha(o.new_block)]
        assert row.policy_id == new.id  # decided by the queued policy: linked on replay
        r = await w.scan(o.new_block)
        assert (r.action, r.policy_id, r.degraded) == ("block", new.id, False)
    r = await w.scan(EICAR)
    assert (r.action, r.policy_id, r.degraded, r.degraded_reasons) == (
        "allow",
        s.allow_eicar,
        False,
        [],
    )


async def retry_now(w: Wire) -> None:
    """The notice's *Retry Connection*: recovered when the ack comes back."""
    ack = await w.ok(ServiceRetry, Ack, service="database")
    assert "policy store recovered" in ack.detail, ack.detail
    assert not (await state(w)).degraded


# --- helpers for the faults -----------------------------------------------------


def db_files(data_dir: Path) -> list[Path]:
    db = data_dir / "policy_graph.db"
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


@contextlib.contextmanager
def exclusive_lock(db: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(str(db), isolation_level=None, timeout=5)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


def chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def _chattr_works() -> bool:
    if shutil.which("chattr") is None:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.touch()
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        return ok


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """``chattr +i``: no writes, no new names in a directory, for root too; always undone."""
    done: list[Path] = []
    try:
        for p in paths:
            chattr("+i", p)
            done.append(p)
        yield
    finally:
        for p in reversed(done):
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)


SETPRIV = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@functools.cache
def nobody_python() -> tuple[str, str] | None:
    """(interpreter, PYTHONPATH) with which ``nobody`` can run the daemon *and* its
    children, or None. The dev venv's interpreter may live under a directory
    nobody may enter (pyenv under /root): then a system interpreter of the same
    version runs with the venv's site-packages and the source tree on its path."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        return None
    paths = sysconfig.get_paths()
    pythonpath = os.pathsep.join(dict.fromkeys([str(ROOT), paths["purelib"], paths["platlib"]]))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (
        sys.executable,
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ):
        probe = subprocess.run(
            [
                *SETPRIV,
                "env",
                f"PYTHONPATH={pythonpath}",
                candidate,
                "-c",
                "import subprocess, sys, yara, sentinel_ipc;"
                "subprocess.run([sys.executable, '-c', ''], check=True)",
            ],
            capture_output=True,
            cwd="/",
            timeout=30,
        )
        if probe.returncode == 0:
            return candidate, pythonpath
    return None


needs_chattr = pytest.mark.skipif(not _chattr_works(), reason="no chattr +i on this file system")
needs_nobody = pytest.mark.skipif(
    nobody_python() is None,
    reason="needs root, setpriv and a Python interpreter that nobody may execute",
)


# --- the faults -------------------------------------------------------------------


async def test_exclusive_lock_held_by_another_connection(daemon_factory: Any) -> None:
    """Reads still work in WAL mode, writes get SQLITE_BUSY: the first threat
    record fails its retries and the verdict comes from the snapshot."""
    d = daemon_factory(config=fault_config())
    pid = d.pid
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        s = await seed(w)
        with exclusive_lock(d.data_dir / "policy_graph.db"):
            o = await outage(w, s, "lock")
            assert "database locked" in await outage_reason(w)
            await trio.sleep(1.2)  # past the breaker's open timeout: probes fail, still degraded
            assert (await state(w)).degraded
        await wait_healthy(w)  # by itself
        await after_recovery(w, s, [o], known_bad_hits=2)
    assert d.pid == pid and d.proc.poll() is None
    d.stop()
    kinds = [e["kind"] for e in audit_events(d.data_dir)]
    assert "degraded" in kinds and "recovered" in kinds and "breaker_transition" in kinds


@pytest.mark.parametrize("how", ["renamed_over", "overwritten_in_place"])
async def test_file_replaced_with_random_bytes(daemon_factory: Any, how: str) -> None:
    """Renamed over: the open connection still has the old file, whose content
    is salvaged; nothing is lost. Overwritten in place (after a checkpoint, so
    the WAL does not mask it): "file is not a database" at the next
    verification; the file is moved aside and rebuilt from the snapshot and
    the journal. Policies survive (the snapshot follows every write); the
    threat history stays in the file moved aside."""
    d = daemon_factory(config=fault_config())
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        s = await seed(w)
        db = d.data_dir / "policy_graph.db"
        if how == "renamed_over":
            tmp = db.with_name("random.tmp")
            tmp.write_bytes(os.urandom(64 * 1024))
            os.replace(tmp, db)
        else:
            with contextlib.closing(sqlite3.connect(str(db))) as other:
                other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.write_bytes(os.urandom(db.stat().st_size))  # same inode, in place
        # Writes and scans race the detection; each gets an answer and lands once.
        new = await w.ok(PolicyAdd, PolicyResult, action="block", sha256="1e" * 32)
        assert new.queued or new.policy_id is not None
        r = await w.scan(KNOWN_BAD)
        assert (r.action, r.policy_id) == ("block", s.block_bad)
        await wait_healthy(w)
        listed = await w.ok(PolicyList, PolicyListResult)
        assert [p.file_hash for p in listed.policies].count("1e" * 32) == 1
        threats = [t.file_hash for t in await w.threats()]
        if how == "renamed_over":
            await after_recovery(w, s, [], known_bad_hits=2)
            assert threats.count(sha(KNOWN_BAD)) == 2
        else:
            await after_recovery(w, s, [], known_bad_hits=None)
            assert threats.count(sha(KNOWN_BAD)) <= 1
    d.stop()
    aside = list(d.data_dir.glob("policy_graph.db.corrupt-*"))
    kinds = {e["kind"] for e in audit_events(d.data_dir)}
    if how == "renamed_over":
        assert "database_salvaged" in kinds
    else:
        assert [p.name.count("-wal") for p in aside] == [0]  # the main file, moved aside
        assert "database_corrupt_moved_aside" in kinds


async def test_file_deleted(daemon_factory: Any) -> None:
    """The open connection would go on writing to the deleted file: the daemon
    sees it, salvages the content and carries on with a new file at the path."""
    d = daemon_factory(config=fault_config())
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        s = await seed(w)
        for f in db_files(d.data_dir):
            f.unlink(missing_ok=True)
        new = await w.ok(PolicyAdd, PolicyResult, action="block", sha256="1d" * 32)
        r = await w.scan(KNOWN_BAD)
        assert (r.action, r.policy_id) == ("block", s.block_bad)
        await wait_healthy(w)
        assert (d.data_dir / "policy_graph.db").exists()
        listed = await w.ok(PolicyList, PolicyListResult)
        assert [p.file_hash for p in listed.policies].count("1d" * 32) == 1
        assert new.queued or new.policy_id is not None
        await after_recovery(w, s, [], known_bad_hits=2)
        threats = await w.threats()
        assert [t.file_hash for t in threats].count(sha(KNOWN_BAD)) == 2
    d.stop()


@needs_chattr
@pytest.mark.parametrize("how", ["database_deleted", "database_files_immutable"])
async def test_data_dir_read_only(daemon_factory: Any, how: str) -> None:
    """The data dir made read-only with ``chattr +i`` (it binds root too), with
    the database either deleted first (it cannot be recreated) or its files
    immutable as well (every write fails with an I/O error). The journal, an
    existing file, still takes the writes; the snapshot cannot be saved. The
    old content is never given up: a deleted file is salvaged through the
    connection that still has it open, once the dir is writable again.

    Known limit: ``chattr +i`` on the ``-shm`` file kills the daemon with
    SIGBUS (SQLite keeps the WAL index in a shared mapping of that file; the
    first write fault on an immutable mapping is a bus error). Nothing in the
    process can catch that; the restart case below shows what a supervisor's
    restart then finds."""
    d = daemon_factory(config=fault_config())
    pid = d.pid
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        s = await seed(w)
        files = db_files(d.data_dir)
        if how == "database_deleted":
            for f in files:
                f.unlink(missing_ok=True)
            frozen, why = [d.data_dir], ("deleted or replaced",)
        else:
            # Not the -shm: SQLite maps it shared, and a write fault on an
            # immutable mapping is SIGBUS, which kills any process (see below).
            frozen = [d.data_dir, *(f for f in files[:2] if f.exists())]
            why = ("I/O error", "permission denied")  # a write, or the verification
        with immutable(*frozen):
            if how == "database_files_immutable":
                await w.scan(EICAR)  # its threat row is the write that fails
            await wait_degraded(w)
            reason = await outage_reason(w)
            assert any(x in reason for x in why), reason
            o = await outage(w, s, "rodir")
            await trio.sleep(0.5)
            assert (await state(w)).degraded
            ack = await w.ok(ServiceRetry, Ack, service="database")
            assert "still down" in ack.detail, ack.detail
        await retry_now(w)
        await after_recovery(w, s, [o], known_bad_hits=2)
        threats = [t.file_hash for t in await w.threats()]
        assert threats.count(sha(KNOWN_BAD)) == 2, threats  # the seed's row too
    assert d.pid == pid
    d.stop()
    if how == "database_deleted":
        assert "database_salvaged" in {e["kind"] for e in audit_events(d.data_dir)}


@needs_nobody
async def test_chmod_000_with_the_daemon_running_as_nobody(daemon_factory: Any) -> None:
    """Root ignores file modes, so the daemon runs as ``nobody`` (its socket and
    data dirs owned by nobody; root, the test, is in its admin_uids)."""
    found = nobody_python()
    assert found is not None
    python, pythonpath = found
    base = Path(tempfile.mkdtemp(prefix="sentinel-nobody-"))
    try:
        base.chmod(0o755)
        d = daemon_factory(
            config=fault_config(server={"admin_uids": [0]}),
            env={"PYTHONPATH": pythonpath},
            start=False,
        )
        d.socket_path = base / "run" / "sentinel.sock"
        d.data_dir = base / "data"
        d.config_path = base / "config.toml"
        for p in (d.socket_path.parent, d.data_dir):
            p.mkdir(mode=0o700)
            os.chown(p, NOBODY, NOBODY)
        command = d.command
        d.command = lambda: [*SETPRIV, python, *command()[1:]]
        d.start()
        pid = d.pid
        db = d.data_dir / "policy_graph.db"
        assert db.stat().st_uid == NOBODY
        async with open_framed_connection(d.socket_path) as conn:
            w = Wire(conn)
            s = await seed(w)
            db.chmod(0)
            try:
                await wait_degraded(w)
                assert "permission denied" in await outage_reason(w)
                o = await outage(w, s, "chmod")
                await trio.sleep(1.2)
                assert (await state(w)).degraded
            finally:
                db.chmod(0o600)
            await retry_now(w)
            await after_recovery(w, s, [o], known_bad_hits=2)
        assert d.pid == pid
        d.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_restart_in_the_middle_of_an_outage(daemon_factory: Any) -> None:
    """SIGKILL while degraded (writes journaled), start again with the database
    still locked: the new daemon decides from the persisted snapshot plus the
    journal, queues more, and replays both runs' writes once the lock goes."""
    d = daemon_factory(config=fault_config())
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        s = await seed(w)
    with exclusive_lock(d.data_dir / "policy_graph.db"):
        async with open_framed_connection(d.socket_path) as conn:
            w = Wire(conn)
            o1 = await outage(w, s, "run1")
        d.kill()
        d.start()
        pid = d.pid
        async with open_framed_connection(d.socket_path) as conn:
            w = Wire(conn)
            st = await state(w)
            assert st.degraded
            # the first run's queued writes decide already (a dry run: no hit)
            q = await w.ok(PolicyQuery, PolicyDecision, sha256=sha(o1.new_block))
            assert (q.action, q.policy_id, q.degraded) == ("block", None, True)
            o2 = await outage(w, s, "run2", remove=False)
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        await wait_healthy(w)
        await after_recovery(w, s, [o1, o2], known_bad_hits=3)
    assert d.pid == pid
    d.stop()
