"""Blocking access to ``policy_graph.db``, and the one thread that runs it.

Theory of operation
-------------------
:class:`PolicyStore` is plain blocking code over one ``sqlite3`` connection. It
is not thread-safe and never runs on the event loop: :class:`StoreThread` owns
one dedicated OS thread and runs every store call there, in submission order,
handing results back to trio. (A thread pool with a limiter of one would also
serialise calls, but would move the connection between OS threads; one thread
keeps SQLite's view simple and makes a stuck call easy to reason about.)

The store maps every sqlite3 exception to the Sentinel error tree at this
boundary (:func:`map_sqlite_error`), so the retry policy and the breaker above
it classify Sentinel errors, never SQLite result codes:

=====================================  ===============================  =========
SQLite                                 Sentinel                         retried
=====================================  ===============================  =========
BUSY, LOCKED                           DatabaseLockedError              yes
IOERR*, CANTOPEN, PERM, READONLY,      DatabaseIOError                  yes
FULL, NOMEM, PROTOCOL
CORRUPT, NOTADB                        DatabaseCorruptError             no
CONSTRAINT*                            PolicyConflictError              no
anything else (SQL errors)             PolicyStoreError(retryable=no)   no
=====================================  ===============================  =========

Faults an open connection cannot see
------------------------------------
An open SQLite connection keeps reading and writing its file after the path
was deleted or replaced: everything written then goes to a file nobody will
open again. At connect time the store finds SQLite's own descriptor for the
file in ``/proc/self/fd`` and remembers its ``(st_dev, st_ino)``; before every
operation it compares that with ``os.stat(path)`` and raises
:class:`~sentinel_ipc.errors.DatabaseMovedError` when they differ. (It never
opens and closes a descriptor of its own on the database: closing any
descriptor drops every POSIX lock the process holds on the file, SQLite's
included.)

Likewise a connection whose pages are cached does not notice the file being
overwritten in place, or made unreadable. :meth:`PolicyStore.verify` checks
the file's header and opens the path afresh, read-only, and reads the schema:
the health check and the service's periodic verification use it. Garbage past
page 1 shows only when an operation reads it; the recovery after such an
operation reads every page (:meth:`PolicyStore.recover`).

Recovery (:meth:`PolicyStore.ensure_open`)
------------------------------------------
* path deleted or replaced under the open connection: copy the old file's
  content out through the still-open connection (SQLite's backup API: nothing
  written to it is lost), close it, delete the stale ``-wal``/``-shm`` (they
  belong to the old file and must never be replayed into a new one), then
  adopt a *valid* replacement (an administrator restoring a backup) keeping
  the salvaged copy beside it, or else install the salvaged copy;
* corrupt (fails ``quick_check``, or "file is not a database"): moved aside as
  ``policy_graph.db.corrupt-<UTC timestamp>`` (with its ``-wal``/``-shm``), and
  a new database is built. The open connection is judged by :meth:`verify`,
  and, once an operation has reported corruption, by a ``quick_check`` (see
  :meth:`PolicyStore.recover` for why verify alone can miss it);
* a new or empty database is seeded from the snapshot the caller passes in
  (with the policies' original ids, and the id sequence advanced past every
  id ever handed out), so a deleted database comes back with its policies.
  Schema and seed are one transaction: a seed cut short leaves no schema, and
  the next open seeds again. It may take long (300,000 policies: about 12 s),
  so it advances :attr:`PolicyStore.progress` every ``SEED_CHUNK`` rows (as
  the salvage copy does every few MB), and the service bounds the call per
  step of progress rather than as a whole.
The caller then replays the journal on top.

Whole-table reads (:meth:`PolicyStore.load_active`,
:meth:`PolicyStore.list_policies`) are one call each, for tools and tests; the
service reads the table in keyset pages (:meth:`PolicyStore.load_active_page`,
:meth:`PolicyStore.list_policies_page`) so that no call holds the thread long.

Retention of the threat history
-------------------------------
Every detection and every non-allow verdict adds a ``threat_history`` row, so
the table is bounded by row count: the store keeps the newest
``threat_history_max_rows`` (``[policy]``, default 100 000). Each insert,
inside its own transaction, deletes the rows whose id is at least that far
below the new one: ids come from ``AUTOINCREMENT``, so they only grow and the
oldest rows are a prefix of the primary key, and the delete is a range of it,
costing O(rows deleted) (one row per insert once at the bound) and no scan.
One insert deletes at most ``_PRUNE_BATCH`` rows, so a table far over the
bound (a database from a version that kept everything, a lowered setting)
shrinks over the following inserts without stalling any one of them. The
journal's replay writes its threat rows through the same insert, so it prunes
too; pruning never touches ``applied_writes``, which is what makes the replay
exactly-once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, Generic, Literal, TypeVar

import msgspec
import trio

from sentinel_ipc.errors import (
    DatabaseCorruptError,
    DatabaseIOError,
    DatabaseLockedError,
    DatabaseMovedError,
    NotFoundError,
    PolicyConflictError,
    PolicyStoreError,
    SentinelError,
    ShuttingDownError,
    StoreOverloadedError,
)
from sentinel_ipc.fsutil import fsync_dir
from sentinel_ipc.messages import PolicyRecord, RuleMatch, ThreatRecord
from sentinel_ipc.policy.decision import (
    Decision,
    PolicyIndex,
    choose_token,
    decide,
    pattern_tokens,
    rule_keys,
    url_tokens,
)
from sentinel_ipc.policy.journal import AddPolicy, JournalOp, RecordDecision, RemovePolicy
from sentinel_ipc.policy.schema import MIGRATIONS, SCHEMA_VERSION, sqlite_glob
from sentinel_ipc.policy.validation import PolicyDraft, ThreatDraft

log = logging.getLogger("sentinel.policy.store")

DB_FILENAME: Final = "policy_graph.db"
#: Idempotency keys are kept this long: long enough for any client retry or
#: outbox replay, short enough that the table stays small.
KEY_RETENTION_SECONDS: Final = 30 * 24 * 3600
#: Keys of decision records ("r:...") only guard against a timed-out call and
#: its journaled copy both landing: a day is plenty.
RECORD_KEY_RETENTION_SECONDS: Final = 24 * 3600
#: Rows of threat history kept by default (module docstring, "Retention").
DEFAULT_THREAT_HISTORY_MAX_ROWS: Final = 100_000
#: Most rows one insert prunes (about 12 ms of SQLite work); see "Retention".
_PRUNE_BATCH: Final = 10_000
#: Rows of a seeded rebuild per step of :attr:`PolicyStore.progress` (about
#: 25 ms of SQLite work each; see ``_seed``).
SEED_CHUNK: Final = 1_000
#: Pages the salvage copy of a moved file takes per step of progress.
_BACKUP_STEP_PAGES: Final = 2_048
_REQUIRED_TABLES: Final = frozenset({"policies", "threat_history", "applied_writes"})
#: access() with the effective uid (faccessat AT_EACCESS) where the platform has it.
_EFFECTIVE_IDS: Final = os.access in os.supports_effective_ids

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Error mapping
# ---------------------------------------------------------------------------

_LOCKED = ("SQLITE_BUSY", "SQLITE_LOCKED")
_IO = (
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_PERM",
    "SQLITE_READONLY",
    "SQLITE_FULL",
    "SQLITE_NOMEM",
    "SQLITE_PROTOCOL",
    "SQLITE_AUTH",
)
_CORRUPT = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
#: The first 16 bytes of every SQLite 3 database file.
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Errors of a backup that come from the side being *written* (the salvage copy).
_SALVAGE_TARGET = (
    "SQLITE_FULL",
    "SQLITE_CANTOPEN",
    "SQLITE_READONLY",
    "SQLITE_PERM",
    "SQLITE_IOERR_WRITE",
    "SQLITE_IOERR_FSYNC",
    "SQLITE_IOERR_DIR",
    "SQLITE_IOERR_TRUNCATE",
)


def _check_pages(conn: sqlite3.Connection, path: Path) -> None:
    """Read every page (``PRAGMA quick_check``): DatabaseCorruptError if one is
    bad. sqlite3 errors pass through, for the caller to map."""
    problems = [r[0] for r in conn.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise DatabaseCorruptError(
            f"policy database {path} failed quick_check: {'; '.join(problems[:5])}"
        )


def map_sqlite_error(exc: sqlite3.Error, what: str) -> SentinelError:
    """The Sentinel error for a sqlite3 exception (the caller raises it ``from exc``)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = f"policy database: {what}: {exc}"
    if name.startswith(_LOCKED):
        return DatabaseLockedError(text)
    if name.startswith(_CORRUPT):
        return DatabaseCorruptError(text)
    if name.startswith("SQLITE_CONSTRAINT"):
        return PolicyConflictError(text)
    if name.startswith(_IO):
        return DatabaseIOError(text)
    if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
        return DatabaseLockedError(text)
    return PolicyStoreError(text, retryable=False)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


class StoreEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something recovery did that an operator must hear about (logged and audited)."""

    kind: Literal[
        "created",
        "migrated",
        "seeded",
        "moved_detected",
        "salvaged",
        "replaced_adopted",
        "corrupt_moved_aside",
        "rebuilt",
    ]
    detail: str
    path: str | None = None


class ReplayOutcome(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    key: str
    op: str
    status: Literal["applied", "duplicate", "conflict", "not_found"]
    policy_id: int | None = None
    detail: str = ""


class ImportOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """One item of :meth:`PolicyStore.add_many`."""

    #: The added policy's id; for an existing one, the id it met (None when
    #: only a re-sent key said so).
    policy_id: int | None
    added: bool
    #: The row, when this call inserted it (not for a re-sent key).
    policy: PolicyRecord | None = None


class DecideResult(msgspec.Struct, frozen=True, kw_only=True):
    decision: Decision
    #: The deciding policy after its hit was counted (for the snapshot), if any.
    hit_policy: PolicyRecord | None = None
    recorded: bool = False


def threat_from(
    decision: Decision,
    *,
    sha256: str,
    url: str | None,
    matches: Sequence[RuleMatch],
    now: float,
    filename: str | None,
    mime_type: str | None,
    size: int,
) -> ThreatDraft | None:
    """The threat_history row for a decision: every detection and every non-allow verdict."""
    if not matches and decision.action == "allow":
        return None
    return ThreatDraft(
        detected_at=now,
        file_hash=sha256,
        action_taken=decision.action,
        url=url,
        filename=filename,
        mime_type=mime_type,
        file_size=size,
        rule_names=[m.rule for m in matches],
        severity=decision.severity,
        policy_id=decision.policy_id if decision.policy_id and decision.policy_id > 0 else None,
    )


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


def _utc_stamp(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))


def _row_policy(row: sqlite3.Row) -> PolicyRecord:
    return PolicyRecord(
        id=row["id"],
        action=row["action"],
        rule_name=row["rule_name"],
        url_pattern=row["url_pattern"],
        file_hash=row["file_hash"],
        mime_type=row["mime_type"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        hit_count=row["hit_count"],
        last_hit=row["last_hit"],
        reason=row["reason"],
    )


def _row_threat(row: sqlite3.Row) -> ThreatRecord:
    try:
        names = json.loads(row["rule_names"])
    except (TypeError, ValueError):
        names = []
    return ThreatRecord(
        id=row["id"],
        detected_at=row["detected_at"],
        url=row["url"],
        filename=row["filename"],
        file_hash=row["file_hash"],
        mime_type=row["mime_type"],
        file_size=row["file_size"],
        rule_names=[str(n) for n in names] if isinstance(names, list) else [],
        severity=row["severity"],
        action_taken=row["action_taken"],
        policy_id=row["policy_id"],
    )


_POLICY_COLUMNS = (
    "rule_name, url_pattern, url_glob, url_token, file_hash, mime_type, action, created_at, "
    "created_by, expires_at, hit_count, last_hit, reason"
)


class PolicyStore:
    """One connection to the policy database. Blocking; use from one thread only.

    Every public method raises a :class:`~sentinel_ipc.errors.SentinelError`
    (see the module table), never a bare sqlite3 exception.
    """

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 100,
        threat_history_max_rows: int = DEFAULT_THREAT_HISTORY_MAX_ROWS,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Raises ValueError for ``threat_history_max_rows`` below 1 (every row
        would be deleted as soon as it was written)."""
        if threat_history_max_rows < 1:
            raise ValueError(
                f"threat_history_max_rows must be at least 1 (got {threat_history_max_rows})"
            )
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.threat_history_max_rows = threat_history_max_rows
        self._wall = wall_clock
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        #: A descriptor SQLite holds on the database file (see ``_check_header``).
        self._sqlite_fd: int | None = None
        #: The identity whose move was already reported (recovery may need several tries).
        self._moved_reported: tuple[int, int] | None = None
        self._events: list[StoreEvent] = []
        self._events_lock = threading.Lock()
        #: Steps of a long call done so far (rows seeded, by chunk): the
        #: service's watchdog reads it from the trio thread and gives a call
        #: that advances it more time (an int read is atomic under the GIL).
        self.progress = 0

    # --- lifecycle ----------------------------------------------------------

    def _step(self, *_: object) -> None:
        """One step of a long call done (see :attr:`progress`)."""
        self.progress += 1

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        conn, self._conn, self._identity = self._conn, None, None
        self._sqlite_fd = None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error as exc:
                log.warning("policy database: error while closing: %s", exc)

    def ensure_open(
        self, seed: Sequence[PolicyRecord] = (), seed_max_id: int = 0
    ) -> list[StoreEvent]:
        """Make the connection usable, repairing what can be repaired (module docstring).

        ``seed``: the snapshot's policies, for a database that has to be built
        anew. Raises DatabaseLockedError / DatabaseIOError while the file cannot
        be used, PolicyStoreError for a schema newer than this code.
        """
        events = _EventList(self)
        if self._conn is not None:
            try:
                # The open connection may serve cached pages of a file that was
                # overwritten or made unreadable: judge the file afresh.
                self.verify()
                self._call("check", lambda c: c.execute("SELECT 1").fetchone())
                return events
            except DatabaseMovedError as exc:
                if self._moved_reported != self._identity:
                    self._moved_reported = self._identity
                    events.append(StoreEvent(kind="moved_detected", detail=exc.message))
                events.extend(self._recover_moved(seed, seed_max_id))
                return events
            except DatabaseCorruptError:
                self.close()
        events.extend(self._open(seed, seed_max_id, allow_rebuild=True))
        return events

    def recover(
        self,
        seed: Sequence[PolicyRecord] = (),
        seed_max_id: int = 0,
        *,
        check_integrity: bool = False,
    ) -> list[StoreEvent]:
        """:meth:`ensure_open`, then :meth:`probe`: one call, so that a database
        that opens but cannot be written counts as one failure, not a success
        and a failure (which would never let the breaker open).

        ``check_integrity``: an operation reported corruption, so read every
        page (``quick_check``) and rebuild if it fails. :meth:`verify` cannot
        tell: it reads the header, page 1 and the schema, which may be intact
        (or served from the WAL) while pages only the file holds are garbage.
        """
        events = _EventList(self)
        events.extend(self.ensure_open(seed, seed_max_id))
        if check_integrity and not any(e.kind == "rebuilt" for e in events):
            try:
                self._call("quick_check", lambda c: _check_pages(c, self.path))
            except DatabaseCorruptError as exc:
                self.close()
                events.extend(self._rebuild_corrupt(exc, seed, seed_max_id))
        self.probe()
        return events

    def drain_events(self) -> list[StoreEvent]:
        """Repairs done so far, also by calls that failed afterwards (for the audit)."""
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def _open(
        self, seed: Sequence[PolicyRecord], seed_max_id: int, *, allow_rebuild: bool
    ) -> list[StoreEvent]:
        events = _EventList(self)
        existed = self.path.exists()
        if not existed:
            # The whole data dir may have been deleted: a daemon recovers by itself.
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        conn = self._connect(self.path, "rwc")
        if not existed:
            # Policies and threat history are the user's business; SQLite gives its
            # -wal and -shm the mode of the main file.
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
        try:
            events.extend(self._prepare(conn, seed, seed_max_id, existed))
        except DatabaseCorruptError as exc:
            conn.close()
            if not allow_rebuild:
                raise
            events.extend(self._rebuild_corrupt(exc, seed, seed_max_id))
            return events
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._identity, self._sqlite_fd = self._find_identity(conn)
        return events

    def _connect(self, path: Path, mode: str) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"
        try:
            conn = sqlite3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False, timeout=0
            )
        except sqlite3.Error as exc:
            raise map_sqlite_error(exc, f"cannot open {path}") from exc
        conn.row_factory = sqlite3.Row
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        except sqlite3.Error as exc:
            conn.close()
            raise map_sqlite_error(exc, f"cannot open {path}") from exc
        return conn

    def _prepare(
        self,
        conn: sqlite3.Connection,
        seed: Sequence[PolicyRecord],
        seed_max_id: int,
        existed: bool,
    ) -> list[StoreEvent]:
        """Schema, WAL, integrity, seeding. Raises DatabaseCorruptError for a bad file."""
        events: list[StoreEvent] = []
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if version > SCHEMA_VERSION:
                raise PolicyStoreError(
                    f"policy database {self.path} has schema version {version}, newer than "
                    f"this Sentinel ({SCHEMA_VERSION}); refusing to write to it",
                    retryable=False,
                )
            if version == 0 and tables - {"sqlite_sequence"}:
                raise DatabaseCorruptError(
                    f"policy database {self.path} holds tables {sorted(tables)} but no "
                    "Sentinel schema version: not a PolicyGraph database"
                )
            if version > 0:
                _check_pages(conn, self.path)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning("policy database: journal_mode is %s, not wal", mode)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            # A new database is created and seeded in ONE transaction: should
            # the seed fail half-way (disk full, the process killed), the file
            # is left without a schema and the next open seeds it again. (With
            # the schema committed first, the next open would take the empty
            # database for a valid one, and the service would then replace the
            # cached policies with its empty table.)
            new = version == 0
            if new:
                conn.execute("BEGIN IMMEDIATE")
            for step in range(version, SCHEMA_VERSION):
                if not new:
                    conn.execute("BEGIN IMMEDIATE")
                for statement in _split_sql(MIGRATIONS[step]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {step + 1}")
                if not new:
                    conn.execute("COMMIT")
            if new:
                if seed or seed_max_id:
                    self._seed(conn, seed, seed_max_id)
                conn.execute("COMMIT")
                events.append(
                    StoreEvent(
                        kind="created",
                        detail=f"schema version {SCHEMA_VERSION} created",
                        path=str(self.path),
                    )
                )
                if seed or seed_max_id:
                    events.append(
                        StoreEvent(
                            kind="seeded",
                            detail=f"{len(seed)} policies restored from the snapshot"
                            + ("" if existed else " (the database file was missing)"),
                            path=str(self.path),
                        )
                    )
            if version < SCHEMA_VERSION:
                self._backfill_tokens(conn)
            if 0 < version < SCHEMA_VERSION:
                events.append(
                    StoreEvent(
                        kind="migrated",
                        detail=f"schema version {version} -> {SCHEMA_VERSION}",
                        path=str(self.path),
                    )
                )
            self._prune_keys(conn)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise map_sqlite_error(exc, f"cannot prepare {self.path}") from exc
        return events

    def _seed(self, conn: sqlite3.Connection, seed: Sequence[PolicyRecord], max_id: int) -> None:
        """Insert the snapshot's policies (inside the caller's transaction).

        Rows go in ``SEED_CHUNK`` at a time, each chunk advancing
        :attr:`progress`: a rebuild from a large snapshot runs far longer than
        ``op_timeout`` (300,000 policies: about 12 s on a 2-core machine), and
        the service's bound on this call is per step of progress, not on the
        whole (see ``PolicyService._thread_call``). One transaction, not one per
        chunk, so that a rebuild is all or nothing."""
        counts: Counter[str] = Counter()

        def token(pattern: str | None) -> str | None:
            if pattern is None:
                return None
            t = choose_token(pattern_tokens(pattern), counts.__getitem__)
            counts[t] += 1
            return t

        real = [p for p in seed if p.id > 0]
        for start in range(0, len(real), SEED_CHUNK):
            conn.executemany(
                f"INSERT OR IGNORE INTO policies (id, {_POLICY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        p.id,
                        p.rule_name,
                        p.url_pattern,
                        None if p.url_pattern is None else sqlite_glob(p.url_pattern),
                        token(p.url_pattern if p.file_hash is None else None),
                        p.file_hash,
                        p.mime_type,
                        p.action,
                        p.created_at,
                        p.created_by,
                        p.expires_at,
                        p.hit_count,
                        p.last_hit,
                        p.reason,
                    )
                    for p in real[start : start + SEED_CHUNK]
                ],
            )
            self.progress += 1
        top = max([max_id, *(p.id for p in seed)])
        if top > 0:
            updated = conn.execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'policies'", (top,)
            ).rowcount
            if not updated:
                conn.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('policies', ?)", (top,)
                )
        # The commit (and the WAL checkpoint it may run) gets a step of its own.
        self.progress += 1

    def _backfill_tokens(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute(
            "SELECT id, url_pattern FROM policies WHERE url_pattern IS NOT NULL "
            "AND file_hash IS NULL AND url_token IS NULL ORDER BY id"
        ).fetchall()
        if not rows:
            return
        conn.execute("BEGIN IMMEDIATE")
        for row in rows:
            conn.execute(
                "UPDATE policies SET url_token = ? WHERE id = ?",
                (_choose_db_token(conn, row["url_pattern"]), row["id"]),
            )
        conn.execute("COMMIT")

    def _prune_keys(self, conn: sqlite3.Connection) -> None:
        now = self._wall()
        conn.execute(
            "DELETE FROM applied_writes WHERE applied_at < ? "
            "OR (idempotency_key LIKE 'r:%' AND applied_at < ?)",
            (now - KEY_RETENTION_SECONDS, now - RECORD_KEY_RETENTION_SECONDS),
        )

    # --- identity -----------------------------------------------------------

    def _find_identity(self, conn: sqlite3.Connection) -> tuple[tuple[int, int], int | None]:
        """(st_dev, st_ino) of the file SQLite actually has open for this path,
        and one of SQLite's descriptors on it (None if /proc cannot tell)."""
        target = os.path.realpath(self.path)
        found: dict[tuple[int, int], int] = {}
        try:
            for name in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{name}") == target:
                        st = os.fstat(int(name))
                        found.setdefault((st.st_dev, st.st_ino), int(name))
                except OSError:
                    continue
        except OSError:
            pass
        st = os.stat(self.path)
        here = (st.st_dev, st.st_ino)
        if found and here not in found:
            # Replaced between connect and now: the connection holds the old file.
            return next(iter(found.items()))
        return here, found.get(here)

    def _check_header(self) -> None:
        """The file's first 16 bytes must be SQLite's magic string.

        A fresh connection cannot see this when the last write after a
        checkpoint changed page 1: SQLite then reads page 1 from the WAL, so a
        file overwritten in place still shows a valid schema. The header is read
        through SQLite's own descriptor with ``pread`` (opening and closing one of
        our own would drop every POSIX lock the process holds on the file); the
        store thread is the only one that makes SQLite close it, and ``fstat``
        confirms the number still names this file.
        """
        fd = self._sqlite_fd
        if fd is None or self._identity is None:
            return
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity:
                return
            head = os.pread(fd, len(_SQLITE_MAGIC), 0)
        except OSError:
            return  # the fresh open below judges the file
        if len(head) == len(_SQLITE_MAGIC) and head != _SQLITE_MAGIC:
            raise DatabaseCorruptError(
                f"policy database {self.path}: the file does not start with SQLite's "
                f"header ({head[:16]!r}): overwritten"
            )

    def _check_identity(self) -> None:
        if self._identity is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DatabaseMovedError(
                f"policy database {self.path} was deleted while open"
            ) from None
        except OSError as exc:
            raise DatabaseIOError(
                f"policy database {self.path}: cannot stat: {exc.strerror or exc}"
            ) from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise DatabaseMovedError(
                f"policy database {self.path} was replaced by another file while open"
            )

    # --- repair -------------------------------------------------------------

    def _recover_moved(self, seed: Sequence[PolicyRecord], seed_max_id: int) -> list[StoreEvent]:
        events = _EventList(self)
        old = self._conn
        assert old is not None
        salvage = self.path.with_name(f"{self.path.name}.salvage")
        salvaged = False
        with contextlib.suppress(OSError):  # the data dir itself may be gone
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _unlink_db_files(salvage)
            dst = sqlite3.connect(str(salvage), isolation_level=None)
            try:
                os.chmod(salvage, 0o600)  # it becomes the database: as private as the old
                # In steps, each one progress: the file may be large (300,000
                # policies: 130 MB, about 1.5 s to copy).
                old.backup(dst, pages=_BACKUP_STEP_PAGES, progress=self._step)
                ok = [r[0] for r in dst.execute("PRAGMA quick_check")] == ["ok"]
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
            salvaged = ok
        except (sqlite3.Error, OSError) as exc:
            name = getattr(exc, "sqlite_errorname", "") or ""
            if isinstance(exc, OSError) or name.startswith(_SALVAGE_TARGET):
                # The copy cannot be written (a read-only or full data dir). The
                # open connection holds the only copy of the content: keep it,
                # fail this attempt, and salvage when recovery tries again.
                _unlink_db_files(salvage)
                raise DatabaseIOError(
                    f"policy database {self.path} was deleted or replaced, and its "
                    f"content cannot be copied out yet: {exc}"
                ) from exc
            # The old file itself cannot be read: waiting would not help.
            log.error("policy database: cannot salvage the moved file: %s", exc)
        self.close()
        # The -wal/-shm at the path belong to the old file; a new file must never see them.
        for suffix in ("-wal", "-shm"):
            _unlink_quietly(Path(f"{self.path}{suffix}"))
        if salvaged:
            events.append(
                StoreEvent(
                    kind="salvaged",
                    detail="copied the open (moved) file's content before closing it",
                    path=str(salvage),
                )
            )
        if self.path.exists():
            try:
                events.extend(self._open(seed, seed_max_id, allow_rebuild=False))
            except DatabaseCorruptError as exc:
                aside = self._move_aside("corrupt")
                events.append(
                    StoreEvent(kind="corrupt_moved_aside", detail=exc.message, path=str(aside))
                )
            else:
                events.append(
                    StoreEvent(
                        kind="replaced_adopted",
                        detail="the file at the path is a valid PolicyGraph database; "
                        "adopted it"
                        + (f", the previous content is kept in {salvage}" if salvaged else ""),
                        path=str(self.path),
                    )
                )
                if salvaged:
                    stamp = _utc_stamp(self._wall())
                    kept = self.path.with_name(f"{self.path.name}.salvaged-{stamp}")
                    os.replace(salvage, kept)
                return events
        if salvaged:
            os.replace(salvage, self.path)
            fsync_dir(self.path.parent, strict=False)
        else:
            _unlink_db_files(salvage)
        events.extend(self._open(seed, seed_max_id, allow_rebuild=True))
        if not salvaged:
            events.append(self._rebuilt_event(len(seed)))
        return events

    def _rebuild_corrupt(
        self, exc: DatabaseCorruptError, seed: Sequence[PolicyRecord], seed_max_id: int
    ) -> list[StoreEvent]:
        """The file at the path (closed) is corrupt: move it aside, build anew."""
        events = _EventList(self)
        aside = self._move_aside("corrupt")
        events.append(StoreEvent(kind="corrupt_moved_aside", detail=exc.message, path=str(aside)))
        events.extend(self._open(seed, seed_max_id, allow_rebuild=False))
        events.append(self._rebuilt_event(len(seed)))
        return events

    def _rebuilt_event(self, policies: int) -> StoreEvent:
        return StoreEvent(
            kind="rebuilt",
            detail=f"new database built from the snapshot ({policies} policies)",
            path=str(self.path),
        )

    def _move_aside(self, why: str) -> Path:
        base = f"{self.path.name}.{why}-{_utc_stamp(self._wall())}"
        aside = self.path.with_name(base)
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{base}.{n}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{self.path}{suffix}")
            if src.exists():
                os.replace(src, Path(f"{aside}{suffix}"))
        fsync_dir(self.path.parent, strict=False)
        log.error("policy database: moved %s aside to %s", self.path, aside)
        return aside

    # --- helpers ------------------------------------------------------------

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseIOError(f"policy database {self.path} is not open")
        self._check_identity()
        return self._conn

    def _call(self, what: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise DatabaseIOError(f"policy database {self.path} is not open")
        try:
            return fn(conn)
        except BaseException as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise map_sqlite_error(exc, what) from exc
            raise

    def _write(self, what: str, fn: Callable[[sqlite3.Connection], T], *, durable: bool) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction. ``durable``: fsync at commit
        (policy changes); decision records ride on WAL's ``synchronous=NORMAL``."""
        self._require()

        def tx(conn: sqlite3.Connection) -> T:
            if durable:
                conn.execute("PRAGMA synchronous = FULL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise
                return result
            finally:
                if durable:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("PRAGMA synchronous = NORMAL")

        return self._call(what, tx)

    # --- health ---------------------------------------------------------------

    def verify(self) -> float:
        """Open the path afresh, read-only, and read the schema; the open
        connection must still name that file. Return the seconds it took.

        Raises DatabaseMovedError, DatabaseCorruptError, DatabaseIOError (for
        example permission denied), DatabaseLockedError.
        """
        start = time.perf_counter()
        self._require()
        # SQLite hands a new connection the descriptor an earlier one left behind
        # (it cannot close it while this process holds locks on the file), so
        # after the first verification the "fresh" open makes no open() call and
        # a file made unreadable passes. access() asks the kernel without opening.
        if not os.access(self.path, os.R_OK | os.W_OK, effective_ids=_EFFECTIVE_IDS):
            raise DatabaseIOError(
                f"policy database {self.path}: permission denied (cannot read and write it)"
            )
        self._check_header()
        fresh = self._connect(self.path, "ro")
        try:
            try:
                version = fresh.execute("PRAGMA user_version").fetchone()[0]
                tables = {
                    r[0] for r in fresh.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
            except sqlite3.Error as exc:
                raise map_sqlite_error(exc, "verification read") from exc
        finally:
            fresh.close()
        if version != SCHEMA_VERSION or not tables >= _REQUIRED_TABLES:
            raise DatabaseCorruptError(
                f"policy database {self.path}: schema version {version}, tables "
                f"{sorted(tables)}: not the expected schema {SCHEMA_VERSION}"
            )
        return time.perf_counter() - start

    def probe(self) -> None:
        """Can we read and take the write lock? (The half-open trial call.)"""
        self._require()

        def run(conn: sqlite3.Connection) -> None:
            conn.execute("SELECT count(*) FROM policies").fetchone()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")

        self._call("probe", run)

    # --- reads ----------------------------------------------------------------

    def load_active(self, now: float) -> tuple[list[PolicyRecord], int]:
        """Every active (unexpired) policy, and the highest id ever handed out.

        One call, however large the table (300,000 policies: about 2 s): for
        tools and tests. The service loads page by page
        (:meth:`load_active_page`), so that no store call outlasts its
        ``op_timeout`` and other calls run between the pages."""
        self._require()

        def run(conn: sqlite3.Connection) -> tuple[list[PolicyRecord], int]:
            rows = conn.execute(
                "SELECT * FROM policies WHERE expires_at IS NULL OR expires_at > ? ORDER BY id",
                (now,),
            ).fetchall()
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'policies'").fetchone()
            return [_row_policy(r) for r in rows], (seq["seq"] if seq else 0)

        return self._call("load policies", run)

    def load_active_page(
        self, after_id: int, limit: int, now: float
    ) -> tuple[list[PolicyRecord], int]:
        """At most ``limit`` active policies with ``id > after_id``, in id order,
        and the highest id ever handed out (``sqlite_sequence``).

        A keyset query on the primary key, as :meth:`list_policies_page`: each
        page costs ``limit`` rows however deep it starts. Pages read at
        different times are not one consistent view; the service guards its
        snapshot against writes made between them (see
        ``PolicyService.refresh_snapshot``)."""
        self._require()

        def run(conn: sqlite3.Connection) -> tuple[list[PolicyRecord], int]:
            rows = conn.execute(
                "SELECT * FROM policies WHERE id > ? "
                "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id LIMIT ?",
                (after_id, now, max(0, limit)),
            ).fetchall()
            seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'policies'").fetchone()
            return [_row_policy(r) for r in rows], (seq["seq"] if seq else 0)

        return self._call("load policies", run)

    def list_policies(self) -> list[PolicyRecord]:
        """Every policy, in one call (see :meth:`load_active`); the service pages."""
        self._require()
        return self._call(
            "list policies",
            lambda c: [_row_policy(r) for r in c.execute("SELECT * FROM policies ORDER BY id")],
        )

    def list_policies_page(self, after_id: int, limit: int) -> list[PolicyRecord]:
        """At most ``limit`` policies with ``id > after_id``, in id order.

        A keyset query on the primary key, not ``OFFSET``: each page costs
        ``limit`` rows however deep into the table it starts, and a policy
        added or removed between two pages shifts nothing (none is listed
        twice or skipped because of another)."""
        self._require()
        return self._call(
            "list policies",
            lambda c: [
                _row_policy(r)
                for r in c.execute(
                    "SELECT * FROM policies WHERE id > ? ORDER BY id LIMIT ?",
                    (after_id, max(0, limit)),
                )
            ],
        )

    def get_policy(self, policy_id: int) -> PolicyRecord | None:
        self._require()
        row = self._call(
            "get policy",
            lambda c: c.execute("SELECT * FROM policies WHERE id = ?", (policy_id,)).fetchone(),
        )
        return None if row is None else _row_policy(row)

    def threats(self, limit: int) -> list[ThreatRecord]:
        self._require()
        return self._call(
            "read threat history",
            lambda c: [
                _row_threat(r)
                for r in c.execute(
                    "SELECT * FROM threat_history ORDER BY id DESC LIMIT ?", (max(0, limit),)
                )
            ],
        )

    def candidates(
        self, *, sha256: str | None, url: str | None, rule_names: Sequence[str], now: float
    ) -> list[PolicyRecord]:
        """The policies that could apply, from three indexed lookups in one statement."""
        self._require()
        parts = [
            "SELECT * FROM policies WHERE file_hash = ? AND (expires_at IS NULL OR expires_at > ?)"
        ]
        params: list[Any] = [sha256 or "", now]
        if url is not None:
            # Only patterns filed under one of the URL's tokens (or under "": no
            # token) can match; the index finds them, GLOB confirms them.
            parts.append(
                "SELECT * FROM policies WHERE url_glob IS NOT NULL AND file_hash IS NULL "
                "AND url_token IN (SELECT value FROM json_each(?)) "
                "AND ? GLOB url_glob AND (expires_at IS NULL OR expires_at > ?)"
            )
            params += [json.dumps(["", *url_tokens(url)]), url, now]
        if rule_names:
            parts.append(
                "SELECT * FROM policies WHERE rule_name IN (SELECT value FROM json_each(?)) "
                "AND file_hash IS NULL AND url_pattern IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?)"
            )
            params += [json.dumps(list(rule_names)), now]
        sql = " UNION ALL ".join(parts)
        return self._call(
            "look up policies", lambda c: [_row_policy(r) for r in c.execute(sql, params)]
        )

    def decide(
        self,
        *,
        sha256: str,
        url: str | None,
        matches: Sequence[RuleMatch],
        now: float,
        record: bool,
        decide_kwargs: dict[str, Any],
        filename: str | None = None,
        mime_type: str | None = None,
        size: int = 0,
        record_key: str | None = None,
    ) -> DecideResult:
        """Decide from the database, and record the hit and the threat row in one
        transaction (under ``record_key``, so that if the caller gave up waiting
        and journaled the record instead, the replay does not apply it twice).
        Raises like any store call; the caller falls back."""
        names = sorted({k for m in matches for k in rule_keys(m)})
        rows = self.candidates(sha256=sha256, url=url, rule_names=names, now=now)
        decision = decide(
            PolicyIndex(rows),
            sha256=sha256,
            url=url,
            matches=matches,
            now=now,
            mime_type=mime_type,
            **decide_kwargs,
        )
        if not record:
            return DecideResult(decision=decision)
        threat = threat_from(
            decision,
            sha256=sha256,
            url=url,
            matches=matches,
            now=now,
            filename=filename,
            mime_type=mime_type,
            size=size,
        )
        if decision.policy_id is None and threat is None:
            return DecideResult(decision=decision)
        hit = self.record(decision.policy_id, threat, now=now, key=record_key)
        return DecideResult(decision=decision, hit_policy=hit, recorded=True)

    # --- writes ---------------------------------------------------------------

    def record(
        self,
        hit_policy_id: int | None,
        threat: ThreatDraft | None,
        *,
        now: float,
        key: str | None = None,
    ) -> PolicyRecord | None:
        """Count a hit and/or write a threat row, at most once per ``key``.
        Returns the hit policy after the bump."""

        def run(conn: sqlite3.Connection) -> PolicyRecord | None:
            if key is not None and _lookup_key(conn, key)[0]:
                return None
            hit = self._record_tx(conn, hit_policy_id, threat, now)
            if key is not None:
                _mark_applied(conn, key, hit_policy_id, now)
            return hit

        return self._write("record decision", run, durable=False)

    def _record_tx(
        self,
        conn: sqlite3.Connection,
        hit_policy_id: int | None,
        threat: ThreatDraft | None,
        at: float,
    ) -> PolicyRecord | None:
        hit = None
        if hit_policy_id is not None and hit_policy_id > 0:
            row = conn.execute(
                "UPDATE policies SET hit_count = hit_count + 1, "
                "last_hit = max(coalesce(last_hit, 0), ?) WHERE id = ? RETURNING *",
                (at, hit_policy_id),
            ).fetchone()
            hit = None if row is None else _row_policy(row)
        if threat is not None:
            cursor = conn.execute(
                "INSERT INTO threat_history (detected_at, url, filename, file_hash, mime_type, "
                "file_size, rule_names, severity, action_taken, policy_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    threat.detected_at,
                    threat.url,
                    threat.filename,
                    threat.file_hash,
                    threat.mime_type,
                    threat.file_size,
                    json.dumps(threat.rule_names),
                    threat.severity,
                    threat.action_taken,
                    threat.policy_id,
                ),
            )
            if cursor.lastrowid is not None:
                self._prune_threats(conn, cursor.lastrowid)
        return hit

    def _prune_threats(self, conn: sqlite3.Connection, newest: int) -> None:
        """Delete the rows more than ``threat_history_max_rows`` ids below
        ``newest`` (the row just inserted), at most ``_PRUNE_BATCH`` of them:
        see "Retention" in the module docstring."""
        cutoff = newest - self.threat_history_max_rows
        if cutoff <= 0:
            return
        # One statement: ids up to the cutoff, but at most a batch above the oldest.
        conn.execute(
            "DELETE FROM threat_history WHERE id <= ? "
            "AND id < (SELECT min(id) FROM threat_history) + ?",
            (cutoff, _PRUNE_BATCH),
        )

    def add(self, draft: PolicyDraft, *, key: str | None, now: float) -> tuple[PolicyRecord, bool]:
        """Insert a policy. Returns (policy, already_applied): a key seen before returns
        the policy it created. Raises PolicyConflictError for a duplicate identity."""

        def run(conn: sqlite3.Connection) -> tuple[PolicyRecord, bool]:
            if key is not None:
                seen, done = _lookup_key(conn, key)
                if seen:
                    if done is None:
                        raise PolicyConflictError(
                            f"the write with idempotency key {key!r} was refused as a conflict"
                        )
                    row = conn.execute("SELECT * FROM policies WHERE id = ?", (done,)).fetchone()
                    if row is not None:
                        return _row_policy(row), True
                    raise _gone(done, key)
            policy = self._insert(conn, draft, now)
            if key is not None:
                _mark_applied(conn, key, policy.id, now)
            return policy, False

        return self._write("add policy", run, durable=True)

    def add_many(
        self, items: Sequence[tuple[str, PolicyDraft]], *, now: float
    ) -> list[ImportOutcome]:
        """Insert a batch of policies in ONE durable transaction (a blocklist
        import): all of them or, on any failure, none.

        Each item is ``(key, draft)`` with its own idempotency key (the service
        derives ``"<batch key>/<index>"``). A policy with the same identity
        that already exists is skipped, not an error (``added`` False; its key
        is marked applied with no policy id). An item whose key was applied
        before reports what it reported then (added, with the id it created;
        or existing), so a re-sent batch is a no-op with the same counts."""

        def run(conn: sqlite3.Connection) -> list[ImportOutcome]:
            out: list[ImportOutcome] = []
            for key, draft in items:
                seen, done = _lookup_key(conn, key)
                if seen:
                    out.append(ImportOutcome(policy_id=done, added=done is not None))
                    continue
                row = conn.execute(
                    "SELECT id FROM policies WHERE ifnull(rule_name, '') = ? "
                    "AND ifnull(url_pattern, '') = ? AND ifnull(file_hash, '') = ?",
                    draft.identity,
                ).fetchone()
                if row is not None:
                    _mark_applied(conn, key, None, now)
                    out.append(ImportOutcome(policy_id=row["id"], added=False))
                    continue
                policy = self._insert(conn, draft, now)
                _mark_applied(conn, key, policy.id, now)
                out.append(ImportOutcome(policy_id=policy.id, added=True, policy=policy))
            return out

        return self._write("import policies", run, durable=True)

    def _insert(self, conn: sqlite3.Connection, d: PolicyDraft, at: float) -> PolicyRecord:
        token = None
        if d.url_pattern is not None and d.file_hash is None:
            token = _choose_db_token(conn, d.url_pattern)
        try:
            row = conn.execute(
                f"INSERT INTO policies ({_POLICY_COLUMNS}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, ?) RETURNING *",
                (
                    d.rule_name,
                    d.url_pattern,
                    None if d.url_pattern is None else sqlite_glob(d.url_pattern),
                    token,
                    d.file_hash,
                    d.mime_type,
                    d.action,
                    at,
                    d.created_by,
                    d.expires_at,
                    d.reason,
                ),
            ).fetchone()
        except sqlite3.IntegrityError as exc:
            existing = conn.execute(
                "SELECT id FROM policies WHERE ifnull(rule_name, '') = ? "
                "AND ifnull(url_pattern, '') = ? AND ifnull(file_hash, '') = ?",
                d.identity,
            ).fetchone()
            which = f" (#{existing['id']})" if existing else ""
            raise PolicyConflictError(
                "a policy for this rule_name/url_pattern/sha256 already exists"
                f"{which}; remove it first or choose another combination"
            ) from exc
        return _row_policy(row)

    def remove(self, policy_id: int, *, key: str | None, now: float) -> bool:
        """Delete a policy. Returns already_applied. Raises NotFoundError for an unknown id."""

        def run(conn: sqlite3.Connection) -> bool:
            if key is not None and _lookup_key(conn, key)[0]:
                return True
            deleted = conn.execute("DELETE FROM policies WHERE id = ?", (policy_id,)).rowcount
            if not deleted:
                raise NotFoundError(f"no policy with id {policy_id}")
            if key is not None:
                _mark_applied(conn, key, policy_id, now)
            return False

        return self._write("remove policy", run, durable=True)

    def replay(self, ops: Sequence[JournalOp], *, batch: int = 256) -> list[ReplayOutcome]:
        """Apply journal entries in order, each at most once (by key). One
        transaction per ``batch`` entries; a failure leaves the applied batches
        applied and raises (the rest is replayed next time)."""
        outcomes: list[ReplayOutcome] = []
        for start in range(0, len(ops), batch):
            chunk = ops[start : start + batch]
            outcomes.extend(
                self._write(
                    "replay journal",
                    lambda conn, chunk=chunk: [self._replay_one(conn, op) for op in chunk],  # type: ignore[misc]
                    durable=True,
                )
            )
        return outcomes

    def _replay_one(self, conn: sqlite3.Connection, op: JournalOp) -> ReplayOutcome:
        kind = type(op).__name__
        seen, done = _lookup_key(conn, op.key)
        if seen:
            return ReplayOutcome(
                seq=op.seq, key=op.key, op=kind, status="duplicate", policy_id=done
            )
        status: Literal["applied", "duplicate", "conflict", "not_found"] = "applied"
        policy_id: int | None = None
        detail = ""
        if isinstance(op, AddPolicy):
            conn.execute("SAVEPOINT replay_add")
            try:
                policy_id = self._insert(conn, op.policy, op.at).id
                conn.execute("RELEASE replay_add")
            except PolicyConflictError as exc:
                conn.execute("ROLLBACK TO replay_add")
                conn.execute("RELEASE replay_add")
                status, detail = "conflict", exc.message
        elif isinstance(op, RemovePolicy):
            policy_id = op.policy_id
            if not conn.execute("DELETE FROM policies WHERE id = ?", (op.policy_id,)).rowcount:
                status, detail = "not_found", f"no policy with id {op.policy_id}"
        elif isinstance(op, RecordDecision):
            hit_id, threat = op.hit_policy_id, op.threat
            if hit_id is None and op.hit_policy_key is not None:
                # Decided by a policy queued in the same outage: replayed before
                # this entry (journal order), so its key names its new id.
                hit_id = _lookup_key(conn, op.hit_policy_key)[1]
                if threat is not None and threat.policy_id is None and hit_id is not None:
                    threat = msgspec.structs.replace(threat, policy_id=hit_id)
            self._record_tx(conn, hit_id, threat, op.at)
            policy_id = hit_id
        _mark_applied(conn, op.key, policy_id, self._wall())
        return ReplayOutcome(
            seq=op.seq, key=op.key, op=kind, status=status, policy_id=policy_id, detail=detail
        )

    def lookup_key(self, key: str) -> tuple[bool, int | None]:
        """(applied?, policy id) for an idempotency key."""
        self._require()
        return self._call("look up idempotency key", lambda c: _lookup_key(c, key))


class _EventList(list[StoreEvent]):
    """A list of events that also lands every *new* event in the store's queue
    (extending with another _EventList's items does not count them twice)."""

    def __init__(self, store: PolicyStore) -> None:
        super().__init__()
        self._store = store

    def append(self, event: StoreEvent) -> None:
        super().append(event)
        with self._store._events_lock:
            self._store._events.append(event)

    def extend(self, events: Iterable[StoreEvent]) -> None:
        items = list(events)
        super().extend(items)
        if not isinstance(events, _EventList):
            with self._store._events_lock:
                self._store._events.extend(items)


def _choose_db_token(conn: sqlite3.Connection, pattern: str) -> str:
    """The rarest of the pattern's whole tokens among the stored URL policies."""
    tokens = pattern_tokens(pattern)
    if not tokens:
        return ""
    counts = dict(
        conn.execute(
            "SELECT url_token, count(*) FROM policies WHERE url_glob IS NOT NULL "
            "AND url_token IN (SELECT value FROM json_each(?)) GROUP BY url_token",
            (json.dumps(tokens),),
        ).fetchall()
    )
    return choose_token(tokens, lambda t: counts.get(t, 0))


def _lookup_key(conn: sqlite3.Connection, key: str) -> tuple[bool, int | None]:
    row = conn.execute(
        "SELECT policy_id FROM applied_writes WHERE idempotency_key = ?", (key,)
    ).fetchone()
    return (False, None) if row is None else (True, row["policy_id"])


def _mark_applied(conn: sqlite3.Connection, key: str, policy_id: int | None, at: float) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO applied_writes (idempotency_key, policy_id, applied_at) "
        "VALUES (?, ?, ?)",
        (key, policy_id, at),
    )


def _gone(policy_id: int, key: str) -> NotFoundError:
    return NotFoundError(
        f"the write with idempotency key {key!r} created policy {policy_id}, "
        "which has since been removed"
    )


def _split_sql(script: str) -> list[str]:
    """Statements of a migration (ours contain no semicolons inside literals)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def _unlink_db_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        _unlink_quietly(Path(f"{path}{suffix}"))



# ---------------------------------------------------------------------------
# The dedicated thread
# ---------------------------------------------------------------------------


class StoreJob(Generic[T]):
    """A call queued on the :class:`StoreThread` (trio side)."""

    __slots__ = ("_box", "_done", "started_at")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._box: list[tuple[bool, Any]] = []
        #: ``time.monotonic()`` when the store thread began the call (one writer,
        #: read under the GIL), so a caller that timed out can tell a long queue
        #: from a slow call (see PolicyService._thread_call).
        self.started_at: float | None = None

    def _settle(self, result: tuple[bool, Any]) -> None:
        self._box.append(result)
        self._done.set()

    async def result(self) -> T:
        """Wait for the call; its value, or its exception raised here."""
        await self._done.wait()
        ok, value = self._box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value


class StoreThread:
    """One OS thread that runs blocking calls in submission order for trio callers.

    ``run`` never blocks the event loop. If the caller is cancelled the call
    still runs to completion on the thread (a SQLite call cannot be abandoned
    halfway safely); its result is dropped. The queue is bounded: past
    ``max_pending`` waiting calls ``run`` raises StoreOverloadedError (a
    ``busy``) at once, so a stuck
    database cannot pile up unbounded work behind it.
    """

    def __init__(self, name: str = "sentinel-policy-db", *, max_pending: int = 1024) -> None:
        self.name = name
        self.max_pending = max_pending
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], Any], Callable[[Any], None], StoreJob[Any] | None] | None
        ]
        self._queue = queue.SimpleQueue()
        self._pending = 0
        #: ``time.monotonic()`` when the call now running began (None: idle), for
        #: telling a thread stuck on one call from a queue that is merely long.
        self.current_started_at: float | None = None
        #: Recent seconds per call, as the thread sees them (GIL waits included):
        #: an exponential average, for admission (``pending * mean_call_seconds``).
        self.mean_call_seconds = 0.005
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fn, deliver, handle = job
            began = time.monotonic()
            self.current_started_at = began
            if handle is not None:
                handle.started_at = began
            try:
                result: Any = (True, fn())
            except BaseException as exc:  # delivered to the caller, not lost
                result = (False, exc)
            elapsed = time.monotonic() - began
            self.mean_call_seconds += (elapsed - self.mean_call_seconds) / 8
            self.current_started_at = None
            with self._lock:
                self._pending -= 1
            deliver(result)

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.submit(fn).result()

    def submit(self, fn: Callable[[], T]) -> StoreJob[T]:
        """Queue ``fn`` and return at once; ``await job.result()`` for its outcome
        (it may be awaited again after a cancelled wait). Raises
        ShuttingDownError / StoreOverloadedError like :meth:`run`."""
        if self._closed:
            raise ShuttingDownError("the policy store is closing")
        with self._lock:
            if self._pending >= self.max_pending:
                raise StoreOverloadedError(
                    f"{self._pending} policy database calls already waiting", retry_after=0.1
                )
            self._pending += 1
        job: StoreJob[T] = StoreJob()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: tuple[bool, Any]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(job._settle, result)

        self._queue.put((fn, deliver, job))
        return job

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Run on the thread and wait, from a non-trio context (startup, tools)."""
        done = threading.Event()
        box: list[tuple[bool, Any]] = []

        def deliver(result: tuple[bool, Any]) -> None:
            box.append(result)
            done.set()

        with self._lock:
            self._pending += 1
        self._queue.put((fn, deliver, None))
        done.wait()
        ok, value = box[0]
        if ok:
            return value  # type: ignore[no-any-return]
        raise value

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Stop after the queued calls; False if the thread did not finish in time
        (it is a daemon thread and will not keep the process alive)."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        await trio.to_thread.run_sync(self._thread.join, timeout, abandon_on_cancel=True)
        return not self._thread.is_alive()
