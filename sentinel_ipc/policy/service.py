"""PolicyService: the async façade over the PolicyGraph, and its degraded mode.

Theory of operation
-------------------
The service is *healthy* or *degraded* (``degraded_reason`` says why).

Healthy: every call goes to the database on the store's dedicated thread
(:class:`~sentinel_ipc.policy.store.StoreThread`), each attempt bounded by
``op_timeout``, under the database retry policy and the ``"database"``
circuit breaker (:func:`~sentinel_ipc.resilience.guarded_call`). The
in-memory snapshot follows every successful read and write. One exception:
a clean file (scanned, no match, no reputation hit) that no policy decides
records nothing, so with the journal empty it is decided from the snapshot,
which mirrors the database then. Most downloads are such files: they cost no
thread hop and never wait behind a database write stuck on a lock.

The first call that fails for a reason of the database (not of the caller:
conflicts, unknown ids and invalid input pass straight through) turns the
service degraded. Then, without touching the database at all:

* decisions and queries come from the snapshot, marked ``degraded`` with the
  reason; a hash the snapshot has never seen falls through to the rule tiers;
* policy writes are validated, appended to the fsync'd journal and answered
  ``queued=True``; they are laid over the snapshot at once;
* a decision's hit count and threat row are journaled too;
* ``list`` answers from the snapshot with ``degraded=True``.

A background task recovers. It attempts :meth:`PolicyStore.ensure_open`
(which repairs a deleted, replaced or corrupt file) and a write-lock probe as
breaker trial calls (after any failure that reported corruption, also a
``quick_check`` of every page: see :meth:`PolicyStore.recover`), as soon as
the breaker admits one: at once after a
failure that recovery itself can fix (file deleted/replaced/corrupt), after
``open_timeout`` when the breaker opened, or immediately on
:meth:`PolicyService.retry_now` (which half-opens the breaker). On success it
replays the journal in order (exactly once: see ``journal``), reloads the
snapshot from the database and becomes healthy; no restart is ever needed.

Writes hold ``_write_lock`` while choosing between database and journal, and
the switch back to healthy happens under it after the last policy write was
replayed, so a new write can never overtake a queued one. (Decision records
commute with everything, so a record journaled during the switch is simply
replayed a moment later.)

While healthy, the same task verifies the file every ``verify_interval``
(opening the path afresh; see :meth:`PolicyStore.verify`): an open connection
does not notice its file being overwritten or made unreadable. It also reloads
the snapshot every ``refresh_interval`` (writes by other programs, expiries).

Large tables
------------
All store calls share one thread, and ``op_timeout`` bounds a call *including*
its wait in that thread's queue. So no call may run long, whatever the size of
the table (an imported hash blocklist holds hundreds of thousands of
policies): a whole-table read (the snapshot at start, after recovery and at
each refresh; the unpaged ``list``) goes in keyset pages of ``load_chunk``
rows, each page its own call (:meth:`PolicyService._load_active`), and a
decision or a write issued meanwhile runs between two pages. The pages are
not one consistent view: a refresh (which does not hold the write lock while
it loads) replaces the snapshot only if no write changed it meanwhile (the
write generation; see :meth:`PolicyService.refresh_snapshot`), else it keeps
the snapshot the writes maintained and tries again soon. Recovery loads under
the write lock. The one call that cannot be paged, the store's recovery
(which may rebuild the database from the snapshot in one transaction), is
bounded per step of progress instead (:meth:`PolicyService._thread_call`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import trio

from sentinel_ipc.audit import AuditLog
from sentinel_ipc.errors import (
    BusyError,
    CircuitOpenError,
    DatabaseCorruptError,
    DatabaseIOError,
    DatabaseLockedError,
    DatabaseMovedError,
    JournalFullError,
    NotFoundError,
    PolicyConflictError,
    PolicyStoreError,
    PolicyValidationError,
    RetryExhaustedError,
    SentinelError,
    StoreOverloadedError,
    UnavailableError,
)
from sentinel_ipc.messages import (
    MAX_POLICY_IMPORT,
    Action,
    PolicyImportItem,
    PolicyRecord,
    RuleMatch,
    ThreatRecord,
)
from sentinel_ipc.policy.decision import Decision, PolicyIndex, decide
from sentinel_ipc.policy.journal import (
    DEFAULT_MAX_BYTES as JOURNAL_MAX_BYTES,
)
from sentinel_ipc.policy.journal import (
    JOURNAL_FILENAME,
    AddPolicy,
    Journal,
    JournalOp,
    RecordDecision,
    RemovePolicy,
    new_key,
)
from sentinel_ipc.policy.quarantine import DEFAULT_MAX_BYTES as QUARANTINE_MAX_BYTES
from sentinel_ipc.policy.quarantine import DEFAULT_MAX_ITEMS as QUARANTINE_MAX_ITEMS
from sentinel_ipc.policy.snapshot import (
    SNAPSHOT_FILENAME,
    PolicySnapshot,
    SnapshotError,
    SnapshotWriter,
    load_snapshot,
)
from sentinel_ipc.policy.store import (
    DB_FILENAME,
    DEFAULT_THREAT_HISTORY_MAX_ROWS,
    ImportOutcome,
    PolicyStore,
    ReplayOutcome,
    StoreEvent,
    StoreJob,
    StoreThread,
    threat_from,
)
from sentinel_ipc.policy.validation import PolicyDraft, validate_policy, validate_query
from sentinel_ipc.resilience import (
    BREAKER_PRESETS,
    RETRY_PRESETS,
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    Excluding,
    RetryPolicy,
    guarded_call,
)
from sentinel_ipc.resilience.classifiers import database_failure

log = logging.getLogger("sentinel.policy")

T = TypeVar("T")

QUARANTINE_DIRNAME: Final = "quarantine"
_RECENT_KEYS: Final = 10_000
#: Results of keyed imports remembered in memory (each up to 1,000 ids).
_RECENT_IMPORTS: Final = 256
_REPLAY_CHUNK: Final = 1_000
#: Default ``max_queued_reads``: store calls queued before a client's read is ``busy``.
MAX_QUEUED_READS: Final = 16
#: Default ``load_chunk``: rows per store call of a whole-table load.
LOAD_CHUNK: Final = 10_000


def policy_database_failure(error: BaseException) -> bool:
    """Breaker classifier: the preset's, plus the faults recovery repairs (a
    corrupt or moved file is not worth a *retry*, but it is a failure)."""
    return database_failure(error) or isinstance(
        error, (DatabaseCorruptError, DatabaseMovedError, DatabaseIOError)
    )


DEFAULT_BREAKER: Final = dataclasses.replace(
    BREAKER_PRESETS["database"], is_failure=policy_database_failure
)


@dataclasses.dataclass(frozen=True, slots=True)
class ImportResult:
    """What :meth:`PolicyService.import_policies` did."""

    added: int
    existing: int
    #: Ids of the added policies in item order (empty when ``queued``).
    policy_ids: list[int]
    queued: bool


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyPage:
    """One page of :meth:`PolicyService.list_page`."""

    policies: list[PolicyRecord]
    #: Policies with higher ids follow this page.
    more: bool
    #: Served from the snapshot (the database is down).
    degraded: bool


class PolicyConfig(msgspec.Struct, kw_only=True):
    """Settings of the PolicyGraph. Paths default to files in the data dir."""

    db_path: str | None = None  # <data_dir>/policy_graph.db
    snapshot_path: str | None = None  # <data_dir>/policy_snapshot.json
    journal_path: str | None = None  # <data_dir>/policy_journal.jsonl
    quarantine_dir: str | None = None  # <data_dir>/quarantine
    #: Bounds of the quarantine directory; a copy past them is not kept (the
    #: verdict stands, with a warning).
    quarantine_max_bytes: int = QUARANTINE_MAX_BYTES
    quarantine_max_items: int = QUARANTINE_MAX_ITEMS
    default_match_action: Action = "block"
    #: A matched rule's ``severity`` meta -> action, instead of the default.
    severity_actions: dict[str, Action] = msgspec.field(default_factory=lambda: {"low": "warn"})
    admin_uids: list[int] = []
    #: Scanner unavailable: block instead of allowing with a warning.
    fail_closed: bool = False
    breaker: BreakerConfig = DEFAULT_BREAKER
    retry: RetryPolicy = RETRY_PRESETS["database"]
    busy_timeout_ms: int = 100
    #: Bound on one database attempt (a stuck file system must not hang callers).
    op_timeout: float = 2.0
    #: While healthy: how often to verify the file afresh (deleted, overwritten, unreadable).
    verify_interval: float = 5.0
    #: While degraded and the breaker admits calls: pause between recovery attempts.
    probe_interval: float = 1.0
    #: While healthy: how often to reload the snapshot from the database.
    refresh_interval: float = 300.0
    #: Rows per store call of a whole-table load (the snapshot at start, after
    #: recovery and at every refresh; the unpaged ``list``): each page its own
    #: call under ``op_timeout`` (10,000 rows: about 0.1 s), other calls in between.
    load_chunk: int = LOAD_CHUNK
    #: A client's read (a policy_list page, threats) is refused ``busy`` while this
    #: many calls wait for the store thread, or while the calls waiting would take
    #: more than a quarter of ``op_timeout`` (see :meth:`PolicyService._admit_read`).
    max_queued_reads: int = MAX_QUEUED_READS
    max_journal_bytes: int = JOURNAL_MAX_BYTES
    #: The threat history keeps this many of its newest rows (see store.py, "Retention").
    threat_history_max_rows: int = DEFAULT_THREAT_HISTORY_MAX_ROWS

    def resolve(self, data_dir: Path) -> tuple[Path, Path, Path, Path]:
        """(db, snapshot, journal, quarantine dir)."""
        return (
            Path(self.db_path) if self.db_path else data_dir / DB_FILENAME,
            Path(self.snapshot_path) if self.snapshot_path else data_dir / SNAPSHOT_FILENAME,
            Path(self.journal_path) if self.journal_path else data_dir / JOURNAL_FILENAME,
            Path(self.quarantine_dir) if self.quarantine_dir else data_dir / QUARANTINE_DIRNAME,
        )


StateListener = Callable[[bool, str | None], object]
#: ``observer(operation, seconds)``: one call on the store thread finished (see
#: :meth:`PolicyService.add_query_observer`).
QueryObserver = Callable[[str, float], object]

#: Errors that say something about the caller's request, not the database.
_CALLER_ERRORS = (PolicyConflictError, NotFoundError, PolicyValidationError)


def reports_corruption(error: BaseException) -> bool:
    """Whether SQLite reported corruption anywhere in ``error``'s chain of causes
    (a retry that gave up, a breaker opened by this very call)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, DatabaseCorruptError):
            return True
        cause = cause.__cause__
    return False


def outage_reason(error: BaseException) -> str:
    """A short human reason for a database failure (shown in verdicts and notices)."""
    cause: BaseException = error
    while isinstance(cause, RetryExhaustedError) and cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, CircuitOpenError):
        # Opened by this very call's failures (``raise rejected from error``):
        # the failure is the reason a person can act on, not the breaker.
        if cause.__cause__ is not None and not isinstance(cause.__cause__, CircuitOpenError):
            return outage_reason(cause.__cause__)
        return "database circuit breaker open"
    if isinstance(cause, DatabaseLockedError):
        return "database locked"
    if isinstance(cause, DatabaseMovedError):
        return "database file deleted or replaced"
    if isinstance(cause, DatabaseCorruptError):
        return "database corrupt"
    if isinstance(cause, DatabaseIOError):
        return "database unavailable: " + cause.message.removeprefix("policy database: ")
    if isinstance(cause, trio.TooSlowError):
        return "database not responding"
    if isinstance(cause, BusyError):
        return "database overloaded"
    if isinstance(cause, SentinelError):
        return cause.message
    return f"{type(cause).__name__}: {cause}"


_List = list  # the class below has a method named ``list``


class PolicyListTooLarge(Exception):
    """The whole policy list passes the bytes :meth:`PolicyService.list` may
    return; ``counted`` is how many it had counted when it gave up."""

    def __init__(self, counted: int, max_bytes: int) -> None:
        super().__init__(f"the policy list is more than {counted} bytes (limit {max_bytes})")
        self.counted = counted


def _count_bytes(rows: Sequence[PolicyRecord], counted: int, max_bytes: int) -> int:
    """``counted`` plus the encoded size of ``rows``; PolicyListTooLarge past
    ``max_bytes``. (A list's encoding is its header plus its items', so the
    pages' sizes add up to the whole list's within a few header bytes.)"""
    counted += len(msgspec.msgpack.encode(rows))
    if counted > max_bytes:
        raise PolicyListTooLarge(counted, max_bytes)
    return counted


def _queued_too_long(
    job: StoreJob[Any], head_started_at: float | None, op_timeout: float, *, read: bool = False
) -> bool:
    """Whether a call that passed ``op_timeout`` is overload, not failure.

    Overload: it has not started, and the call the thread is running began less
    than ``op_timeout`` ago (a queue, however long, that moves); or it started
    less than half the timeout ago; or it is a ``read`` that started at all.
    Failure: the call itself is slow, or the thread has been stuck on another
    for ``op_timeout``: the database is unwell.

    Why: under a flood of requests the event loop leaves the store thread
    little of the interpreter; the sqlite3 module gives the interpreter up and
    takes it back for every row, so a 4 ms page of 1,000 rows then takes
    ~0.4 s, and calls queue for seconds while every one of them succeeds.
    Taking those timeouts for failures put a healthy database in degraded
    mode. A slow read cannot tell that starvation from a slow database, and
    need not: reads are the optional work (a client's page, the periodic
    refresh), and the daemon's own writes and the periodic verification still
    notice a database that is really slow, within ``verify_interval``."""
    now = time.monotonic()
    if job.started_at is None:
        return head_started_at is None or now - head_started_at < op_timeout
    return read or now - job.started_at < op_timeout / 2


class PolicyService:
    """Create with :func:`open_policy_service`. All methods run on the trio thread."""

    def __init__(
        self,
        config: PolicyConfig,
        data_dir: Path,
        *,
        audit: AuditLog | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.data_dir = data_dir
        self.db_path, self.snapshot_path, self.journal_path, self.quarantine_dir = config.resolve(
            data_dir
        )
        self._audit = audit
        self._wall = wall_clock
        # A busy store is not a broken one (StoreOverloadedError, _thread_call):
        # neither counted against the breaker nor retried in place.
        self.breaker = CircuitBreaker(
            "database",
            dataclasses.replace(
                config.breaker,
                is_failure=Excluding(config.breaker.is_failure, (StoreOverloadedError,)),
            ),
            clock=trio.current_time,
        )
        self._retry = dataclasses.replace(
            config.retry, on=Excluding(config.retry.classify, (StoreOverloadedError,))
        )
        self.breaker.add_listener(self._on_breaker)
        self._thread = StoreThread()
        #: Calls that fell back because the store was busy, not broken (see
        #: :meth:`_thread_call`), and when that was last logged.
        self.overloaded_calls = 0
        self._overload_logged_at = -math.inf
        self._store = PolicyStore(
            self.db_path,
            busy_timeout_ms=config.busy_timeout_ms,
            threat_history_max_rows=config.threat_history_max_rows,
            wall_clock=wall_clock,
        )
        self._journal: Journal | None = None
        self._snapshot = PolicySnapshot()
        #: The base file and its delta log (see snapshot.py); used only under
        #: ``_snapshot_lock``, in a worker thread.
        self._snapshot_writer = SnapshotWriter(self.snapshot_path)
        self._degraded = False
        self._reason: str | None = None
        self._listeners: _List[StateListener] = []
        self._query_observers: _List[QueryObserver] = []
        self._write_lock = trio.Lock()
        self._recover_lock = trio.Lock()
        self._journal_lock = trio.Lock()
        self._journal_queue: _List[_Pending] = []
        self._snapshot_lock = trio.Lock()
        self._wake = trio.Event()
        self._recent_keys: OrderedDict[str, int | None] = OrderedDict()
        #: A keyed import's result, so a re-send answers the same (see import_policies).
        self._recent_imports: OrderedDict[str, ImportResult] = OrderedDict()
        #: Provisional (negative) snapshot id of a queued add -> the add's key.
        self._provisional_keys: dict[int, str] = {}
        self._replayed_seq = 0
        #: A failure reported corruption: the next recovery reads every page.
        self._check_integrity = False
        self._next_verify = 0.0
        self._next_refresh = 0.0
        #: Bumped by every change a write (or a replay, or a reload) makes to
        #: the snapshot: a refresh whose load overlapped one must not replace it.
        self._write_generation = 0
        #: Refreshes in a row that gave way to a write (their retry backs off).
        self._refresh_conflicts = 0
        self.records_dropped = 0
        self.snapshot_error: str | None = None

    # --- state ----------------------------------------------------------------

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def degraded_reason(self) -> str | None:
        return self._reason if self._degraded else None

    @property
    def journal_depth(self) -> int:
        return 0 if self._journal is None else self._journal.depth

    @property
    def snapshot_size(self) -> int:
        return len(self._snapshot)

    def add_state_listener(self, cb: StateListener) -> None:
        """``cb(degraded, reason)`` on every change of state (or of its reason)."""
        self._listeners.append(cb)

    def add_query_observer(self, cb: QueryObserver) -> None:
        """``cb(operation, seconds)`` after every call that reached the store thread:
        each attempt of a store call under the breaker and retry, the health
        verification, recovery, start-up and close, whether it succeeded or
        failed (one that timed out counts its ``op_timeout``). A call the open
        breaker refused, or one cancelled from outside, made no query and is
        not counted. The observability hub feeds
        ``sentinel_database_query_duration_seconds`` from it (this package does
        not import observability). An observer that raises is logged and skipped."""
        self._query_observers.append(cb)

    def _observe_query(self, operation: str, seconds: float) -> None:
        for cb in list(self._query_observers):
            try:
                cb(operation, seconds)
            except Exception:
                log.exception("policy query observer failed")

    def _set_state(self, degraded: bool, reason: str | None) -> None:
        if degraded == self._degraded and (not degraded or reason == self._reason):
            return
        was = self._degraded
        self._degraded, self._reason = degraded, reason
        if degraded:
            log.warning("policy database degraded: %s (deciding from cached policies)", reason)
        else:
            log.info("policy database recovered")
        if degraded != was:
            self._audit_event(
                "degraded" if degraded else "recovered",
                service="database",
                reason=reason,
                journal_depth=self.journal_depth,
            )
        for cb in list(self._listeners):
            try:
                cb(degraded, reason if degraded else None)
            except Exception:
                log.exception("policy state listener failed")

    def _note_failure(self, error: BaseException) -> None:
        if reports_corruption(error):
            self._check_integrity = True

    def _enter_degraded(self, error: BaseException, reason: str | None = None) -> None:
        if isinstance(error, StoreOverloadedError):
            # Busy, not broken: this one call falls back (the cache, the
            # journal) and the service stays as it was. Logged at most every 10 s.
            self.overloaded_calls += 1
            now = trio.current_time()
            if now >= self._overload_logged_at + 10.0:
                self._overload_logged_at = now
                log.warning(
                    "%s; %d calls fell back so far (the cache, the journal), the service "
                    "stays %s", error.message, self.overloaded_calls,
                    "degraded" if self._degraded else "healthy",
                )
            return
        self._note_failure(error)
        reason = reason or outage_reason(error)
        if not self._degraded or isinstance(error, (DatabaseMovedError, DatabaseCorruptError)):
            self._set_state(True, reason)
        self._wake.set()

    def _on_breaker(self, t: BreakerTransition) -> None:
        if t.to_state in (BreakerState.CLOSED, BreakerState.HALF_OPEN):
            self._wake.set()  # a manual reset / half-open: try to recover now
        self._audit_event(
            "breaker_transition",
            breaker=t.breaker,
            from_state=str(t.from_state),
            to_state=str(t.to_state),
            reason=t.reason,
        )

    def _audit_event(self, kind: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.record(kind, **fields)

    # --- the database path ----------------------------------------------------

    async def _db(
        self, fn: Callable[[], T], operation: str, *, progress: bool = False, read: bool = False
    ) -> T:
        """One store call on the store thread, bounded, retried and behind the breaker
        (``progress``, ``read``: see :meth:`_thread_call`)."""

        async def attempt() -> T:
            return await self._thread_call(fn, operation, progress=progress, read=read)

        return await guarded_call(
            attempt,
            breaker=self.breaker,
            retry=self._retry,
            operation=f"database_{operation}",
        )

    def _admit_read(self, what: str) -> None:
        """Refuse a client's read with ``busy`` (retryable) while the store thread's
        queue is long: ``max_queued_reads`` calls, or calls that would take more
        than a quarter of ``op_timeout`` at the thread's recent pace.

        Why: a store call's ``op_timeout`` counts its wait in the thread's queue
        (:meth:`_thread_call`), and a timeout is a database failure to the
        breaker. Eight connections pipelining 1,000-row policy_list pages on a
        300,000-policy table (4 ms each alone) queued calls for seconds: the
        event loop, busy with the flood, left the store thread little of the
        interpreter, five calls timed out, the breaker opened and the daemon
        went degraded, though the database was fine, only busy. So reads from
        clients wait outside the queue, as any request over a bound does; the
        pace bound follows the thread's real speed under that load. The
        daemon's own calls (decision records, policy writes, refreshes) are not
        refused here: they are few, and each is owed to an answer given."""
        thread = self._thread
        queued = thread.pending
        wait = queued * thread.mean_call_seconds
        if queued >= self.config.max_queued_reads or wait > self.config.op_timeout / 4:
            raise BusyError(
                f"the policy database is busy ({queued} calls queued, about "
                f"{wait:.2f} s of work); {what} again shortly",
                retry_after=max(0.1, min(5.0, wait)),
            )

    def _decide_kwargs(self, fail_closed: bool | None) -> dict[str, Any]:
        return {
            "default_match_action": self.config.default_match_action,
            "severity_actions": self.config.severity_actions,
            "fail_closed": self.config.fail_closed if fail_closed is None else fail_closed,
        }

    # --- decisions ------------------------------------------------------------

    async def decide(
        self,
        *,
        sha256: str,
        url: str | None,
        matches: _List[RuleMatch],
        scanned: bool = True,
        record: bool = True,
        filename: str | None = None,
        mime_type: str | None = None,
        size: int = 0,
        fail_closed: bool | None = None,
        audit: bool = True,
        known_bad: str | None = None,
    ) -> Decision:
        """The verdict for one scanned file (order in ``decision``); never raises
        for a database failure: then it decides from the snapshot, degraded.

        With ``record`` it also counts the deciding policy's hit and writes the
        threat row (every detection, every non-allow verdict): to the database,
        or to the journal during an outage. ``audit=False`` leaves the audit
        line of the detection to the caller (the daemon's VerdictMaker writes
        one with the final verdict, quarantine included). ``known_bad``: the
        reputation service's name for this file, if it knows it as malware
        (see :func:`~sentinel_ipc.policy.decision.decide`).
        """
        now = self._wall()
        kwargs = self._decide_kwargs(fail_closed)
        kwargs["scanned"] = scanned
        kwargs["known_bad"] = known_bad
        if not self._degraded and scanned and not matches and known_bad is None \
                and not self.journal_depth:
            # A clean file. While the database is healthy and nothing waits in
            # the journal, the snapshot mirrors it exactly; a decision that no
            # policy takes part in (then: allow, nothing matched) records
            # nothing (no hit, no threat row, no audit line), so it is answered
            # from memory. What a policy decides still goes to the database.
            clean = self._snapshot_decision(sha256, url, matches, now, mime_type, kwargs)
            if clean.policy_id is None:
                return clean
        # One key for the record, whichever way it goes: a database attempt that
        # timed out may still commit later, and its journaled copy must not land too.
        record_key = new_key("r")
        busy = False
        if not self._degraded:
            try:
                result = await self._db(
                    partial(
                        self._store.decide,
                        sha256=sha256,
                        url=url,
                        matches=matches,
                        now=now,
                        record=record,
                        decide_kwargs=kwargs,
                        filename=filename,
                        mime_type=mime_type,
                        size=size,
                        record_key=record_key,
                    ),
                    "decide",
                )
            except SentinelError as exc:
                busy = isinstance(exc, StoreOverloadedError)
                self._enter_degraded(exc)
            except trio.TooSlowError as exc:
                self._enter_degraded(exc)
            else:
                if result.hit_policy is not None and result.hit_policy.id in self._snapshot.index:
                    self._snapshot.touch(result.hit_policy)
                if record and audit:
                    self._audit_decision(result.decision, sha256, url, matches, filename)
                return result.decision
        cached = self._snapshot_decision(sha256, url, matches, now, mime_type, kwargs)
        if busy and not self._degraded:
            # The store was only busy: the cache mirrors the healthy database
            # (and queued writes as provisional entries), so the decision is
            # the database's own; only its record goes to the journal.
            decision, hit_key = cached, self._provisional_hit(cached)
        else:
            decision, hit_key = self._as_degraded(cached)
        if record:
            await self._journal_record(
                decision, sha256, url, matches, now, filename, mime_type, size, record_key,
                hit_key,
            )
            if audit:
                self._audit_decision(decision, sha256, url, matches, filename)
        return decision

    def _snapshot_decision(
        self,
        sha256: str,
        url: str | None,
        matches: Sequence[RuleMatch],
        now: float,
        mime_type: str | None,
        kwargs: dict[str, Any],
    ) -> Decision:
        """The decision the cached policies give, as it is (no degraded marks)."""
        return decide(self._snapshot.index, sha256=sha256, url=url, matches=matches, now=now,
                      mime_type=mime_type, **kwargs)

    def _provisional_hit(self, d: Decision) -> str | None:
        """For a decision a queued (journaled) policy took: the key of its add, and
        the decision rewritten to say so (it has no database id yet)."""
        if d.policy_id is None or d.policy_id >= 0:
            return None
        hit_key = self._provisional_keys.get(d.policy_id)
        d.reason = d.reason.replace(f"policy #{d.policy_id}", "queued policy", 1)
        d.reason += " (not yet in the database)"
        d.policy_id = None
        return hit_key

    def _as_degraded(self, d: Decision) -> tuple[Decision, str | None]:
        """A snapshot decision marked degraded, and the key of the queued add that
        decided (if one did)."""
        reason = self._reason or "database unavailable"
        hit_key = self._provisional_hit(d)
        d.degraded = True
        d.degraded_reason = (
            f"{d.degraded_reason}; {reason}" if d.degraded_reason else reason
        ) + "; decided from cached policies"
        d.warnings = [
            *d.warnings,
            f"policy database unavailable ({reason}); using cached security policies",
        ]
        return d, hit_key

    def _audit_decision(
        self,
        d: Decision,
        sha256: str,
        url: str | None,
        matches: Sequence[RuleMatch],
        filename: str | None,
    ) -> None:
        if matches or d.action != "allow":
            self._audit_event(
                "detection",
                sha256=sha256,
                url=url,
                filename=filename,
                rules=[m.rule for m in matches],
                action=d.action,
                policy_id=d.policy_id,
                reason=d.reason,
                degraded=d.degraded,
            )

    async def _journal_record(
        self,
        d: Decision,
        sha256: str,
        url: str | None,
        matches: Sequence[RuleMatch],
        now: float,
        filename: str | None,
        mime_type: str | None,
        size: int,
        key: str,
        hit_key: str | None = None,
    ) -> None:
        threat = threat_from(
            d,
            sha256=sha256,
            url=url,
            matches=matches,
            now=now,
            filename=filename,
            mime_type=mime_type,
            size=size,
        )
        hit = d.policy_id if d.policy_id is not None and d.policy_id > 0 else None
        if threat is None and hit is None and hit_key is None:
            return
        op = RecordDecision(
            key=key, at=now, hit_policy_id=hit, threat=threat, hit_policy_key=hit_key
        )
        try:
            await self._journal_append([op])
        except SentinelError as exc:
            self.records_dropped += 1
            d.warnings.append(f"the threat record could not be queued: {exc.message}")
            log.error("policy: decision record dropped: %s", exc)

    async def query(
        self,
        *,
        sha256: str | None = None,
        url: str | None = None,
        rule_names: Sequence[str] = (),
        mime_type: str | None = None,
    ) -> Decision:
        """A dry run of :meth:`decide` for the given rule names: no hit, no threat row.
        Raises PolicyValidationError for malformed input."""
        sha, url, names = validate_query(sha256=sha256, url=url, rule_names=list(rule_names))
        matches = [_match_for(n) for n in names]
        return await self.decide(
            sha256=sha or "", url=url, matches=matches, record=False, mime_type=mime_type
        )

    # --- writes -----------------------------------------------------------------

    async def add(
        self,
        *,
        action: str,
        sha256: str | None = None,
        url_pattern: str | None = None,
        rule_name: str | None = None,
        mime_type: str | None = None,
        reason: str | None = None,
        expires_at: float | None = None,
        created_by: str,
        idempotency_key: str | None = None,
    ) -> tuple[int | None, bool]:
        """Add a policy: ``(policy_id, False)``, or ``(None, True)`` when queued in the
        journal during an outage. A re-sent ``idempotency_key`` returns the first
        result instead of adding twice.

        Raises PolicyValidationError, PolicyConflictError (same rule_name/
        url_pattern/sha256 exists), JournalFullError / UnavailableError (outage
        and the journal cannot take it).
        """
        now = self._wall()
        draft = validate_policy(
            action=action,
            now=now,
            sha256=sha256,
            url_pattern=url_pattern,
            rule_name=rule_name,
            mime_type=mime_type,
            reason=reason,
            expires_at=expires_at,
            created_by=created_by,
        )
        client_key = idempotency_key
        # Every write gets a key before its first attempt: an attempt that timed
        # out may still commit, and the journaled copy must then be a no-op.
        key = client_key or new_key("a")
        async with self._write_lock:
            if client_key is not None and client_key in self._recent_keys:
                return self._recent_keys[client_key], False
            if not self._degraded:
                try:
                    policy, duplicate = await self._db(
                        partial(self._store.add, draft, key=key, now=now), "add"
                    )
                except _CALLER_ERRORS:
                    raise
                except (SentinelError, trio.TooSlowError) as exc:
                    self._enter_degraded(exc)
                else:
                    self._remember_key(client_key, policy.id)
                    self._snapshot.put(policy)
                    self._write_generation += 1
                    if not duplicate:
                        self._audit_event(
                            "policy_add",
                            policy_id=policy.id,
                            queued=False,
                            **_policy_fields(policy),
                        )
                    await self._persist_snapshot()
                    return policy.id, False
            # Degraded: validate against what we know, then journal.
            if (
                client_key is not None
                and self._journal is not None
                and client_key in self._journal.pending_keys()
            ):
                return None, True
            existing = self._snapshot.index.find_identity(draft.identity)
            if existing is not None:
                raise PolicyConflictError(
                    "a policy for this rule_name/url_pattern/sha256 already exists"
                    + (f" (#{existing.id})" if existing.id > 0 else " (queued)")
                )
            op = AddPolicy(key=key, at=now, policy=draft)
            stored = await self._journal_append([op])
            self._overlay(stored[0])
            self._audit_event(
                "policy_add",
                policy_id=None,
                queued=True,
                journal_seq=stored[0].seq,
                action=draft.action,
                rule_name=draft.rule_name,
                url_pattern=draft.url_pattern,
                sha256=draft.file_hash,
                created_by=draft.created_by,
                reason=draft.reason,
            )
            return None, True

    async def remove(
        self, policy_id: int, *, idempotency_key: str | None = None, removed_by: str = ""
    ) -> tuple[int | None, bool]:
        """Remove a policy: ``(policy_id, queued)``. Raises NotFoundError for an
        id that does not exist (during an outage: that the snapshot has never seen)."""
        now = self._wall()
        client_key = idempotency_key
        key = client_key or new_key("d")
        async with self._write_lock:
            if client_key is not None and client_key in self._recent_keys:
                return policy_id, False
            if not self._degraded:
                try:
                    await self._db(
                        partial(self._store.remove, policy_id, key=key, now=now), "remove"
                    )
                except _CALLER_ERRORS:
                    raise
                except (SentinelError, trio.TooSlowError) as exc:
                    self._enter_degraded(exc)
                else:
                    self._remember_key(client_key, policy_id)
                    old = self._snapshot.remove(policy_id)
                    self._write_generation += 1
                    self._audit_event(
                        "policy_remove",
                        policy_id=policy_id,
                        queued=False,
                        removed_by=removed_by,
                        **({} if old is None else _policy_fields(old)),
                    )
                    await self._persist_snapshot()
                    return policy_id, False
            if (
                client_key is not None
                and self._journal is not None
                and client_key in self._journal.pending_keys()
            ):
                return policy_id, True
            if policy_id <= 0 or policy_id > self._snapshot.max_policy_id:
                raise NotFoundError(f"no policy with id {policy_id}")
            op = RemovePolicy(key=key, at=now, policy_id=policy_id)
            stored = await self._journal_append([op])
            self._overlay(stored[0])
            self._audit_event(
                "policy_remove",
                policy_id=policy_id,
                queued=True,
                journal_seq=stored[0].seq,
                removed_by=removed_by,
            )
            return policy_id, True

    async def import_policies(
        self,
        items: Sequence[PolicyImportItem],
        *,
        created_by: str,
        idempotency_key: str | None = None,
    ) -> ImportResult:
        """Add many policies as one write (a blocklist import, ``policy_import``).

        Every item is validated first; one invalid item refuses the whole batch
        (PolicyValidationError naming ``policies[i]``), nothing written. A
        policy whose identity (rule_name/url_pattern/sha256) already exists is
        counted in ``existing`` and skipped, so an import can be re-run; an
        identity repeated within the batch counts once (its first item).

        Healthy: ONE store call and transaction (:meth:`PolicyStore.add_many`),
        one snapshot update and one persist, one write-generation bump, one
        audit event for the batch, where N single adds would commit and
        rewrite the snapshot file N times.

        Degraded: the items the cache does not know are journaled in ONE
        append (one fsync), each with its own key, and laid over the cache;
        ``queued`` and the counts are what the cache knew. Replay applies each
        exactly once (a conflict met then is logged, as for a single add).

        Idempotency: item ``i`` of the batch carries the key ``f"{key}/{i}"``
        (the client's key, or a generated one: a timed-out attempt that still
        commits must make its journaled copy a no-op). The database marks each
        derived key in the same transaction, so a re-sent batch applies nothing
        again and reports the same counts; the last results are also kept in
        memory (the answer during an outage, when the database cannot say)."""
        if len(items) > MAX_POLICY_IMPORT:
            raise PolicyValidationError(
                f"policies: at most {MAX_POLICY_IMPORT} per import, got {len(items)}"
            )
        now = self._wall()
        batch: _List[tuple[int, PolicyDraft]] = []
        seen: set[tuple[str, str, str]] = set()
        for index, item in enumerate(items):
            try:
                draft = validate_policy(
                    action=item.action,
                    now=now,
                    sha256=item.sha256,
                    url_pattern=item.url_pattern,
                    rule_name=item.rule_name,
                    mime_type=item.mime_type,
                    reason=item.reason,
                    expires_at=item.expires_at,
                    created_by=created_by,
                )
            except PolicyValidationError as exc:
                raise PolicyValidationError(f"policies[{index}]: {exc.message}") from exc
            if draft.identity not in seen:  # a repeat within the batch counts once
                seen.add(draft.identity)
                batch.append((index, draft))
        client_key = idempotency_key
        key = client_key or new_key("i")
        keyed = [(f"{key}/{index}", draft) for index, draft in batch]
        async with self._write_lock:
            if client_key is not None and client_key in self._recent_imports:
                return self._recent_imports[client_key]
            if not self._degraded:
                try:
                    outcomes = await self._db(
                        partial(self._store.add_many, keyed, now=now), "import"
                    )
                except _CALLER_ERRORS:
                    raise
                except (SentinelError, trio.TooSlowError) as exc:
                    self._enter_degraded(exc)
                else:
                    return await self._imported(outcomes, key, client_key, created_by)
            return await self._import_queued(keyed, key, client_key, created_by, now)

    async def _imported(
        self,
        outcomes: Sequence[ImportOutcome],
        key: str,
        client_key: str | None,
        created_by: str,
    ) -> ImportResult:
        """The healthy tail of an import (under the write lock)."""
        fresh = [o.policy for o in outcomes if o.policy is not None]
        for policy in fresh:
            self._snapshot.put(policy)
        if fresh:
            self._write_generation += 1
        ids = [o.policy_id for o in outcomes if o.added and o.policy_id is not None]
        result = ImportResult(
            added=sum(o.added for o in outcomes),
            existing=sum(not o.added for o in outcomes),
            policy_ids=ids,
            queued=False,
        )
        self._remember_import(client_key, result)
        if fresh:
            self._audit_event(
                "policy_import",
                count=len(outcomes),
                added=len(fresh),
                existing=result.existing,
                queued=False,
                idempotency_key=key,
                created_by=created_by,
                first_policy_id=fresh[0].id,
                last_policy_id=fresh[-1].id,
            )
            await self._persist_snapshot()
        return result

    async def _import_queued(
        self,
        keyed: Sequence[tuple[str, PolicyDraft]],
        key: str,
        client_key: str | None,
        created_by: str,
        now: float,
    ) -> ImportResult:
        """The degraded tail of an import (under the write lock): journal what
        the cache does not know, in one append."""
        pending = set() if self._journal is None else self._journal.pending_keys()
        ops: _List[JournalOp] = []
        added = existing = 0
        for item_key, draft in keyed:
            if item_key in pending:  # this batch was queued before (a re-send)
                added += 1
            elif self._snapshot.index.find_identity(draft.identity) is not None:
                existing += 1
            else:
                ops.append(AddPolicy(key=item_key, at=now, policy=draft))
                added += 1
        if ops:
            stored = await self._journal_append(ops)
            for op in stored:
                self._snapshot.overlay(op)
                self._provisional_keys[-op.seq] = op.key
            self._write_generation += 1
            self._audit_event(
                "policy_import",
                count=len(keyed),
                added=len(stored),
                existing=existing,
                queued=True,
                idempotency_key=key,
                created_by=created_by,
                first_journal_seq=stored[0].seq,
                last_journal_seq=stored[-1].seq,
            )
        result = ImportResult(added=added, existing=existing, policy_ids=[], queued=True)
        self._remember_import(client_key, result)
        return result

    def _remember_import(self, key: str | None, result: ImportResult) -> None:
        if key is None:
            return
        self._recent_imports[key] = result
        self._recent_imports.move_to_end(key)
        while len(self._recent_imports) > _RECENT_IMPORTS:
            self._recent_imports.popitem(last=False)

    def _replace_snapshot(self, policies: PolicyIndex, max_id: int) -> None:
        """Reload from the database: the overlay (and its provisional ids) is gone."""
        self._snapshot.replace_all(policies, max_id)
        self._provisional_keys.clear()
        self._write_generation += 1

    def _overlay(self, op: JournalOp) -> None:
        """Lay a journaled write over the snapshot (remembering a queued add's key)."""
        self._snapshot.overlay(op)
        self._write_generation += 1
        if isinstance(op, AddPolicy):
            self._provisional_keys[-op.seq] = op.key

    def _remember_key(self, key: str | None, policy_id: int | None) -> None:
        if key is None:
            return
        self._recent_keys[key] = policy_id
        self._recent_keys.move_to_end(key)
        while len(self._recent_keys) > _RECENT_KEYS:
            self._recent_keys.popitem(last=False)

    # --- reads ------------------------------------------------------------------

    async def list(self, *, max_bytes: int | None = None) -> tuple[_List[PolicyRecord], bool]:
        """All policies (with hit counts and expired ones) and whether the list came
        from the snapshot (degraded: active policies only, queued writes not shown).

        ``max_bytes``: raise :class:`PolicyListTooLarge` as soon as the records'
        MessagePack encoding passes it, page by page, instead of loading the
        whole table first: a list no reply could carry is refused after about
        ``max_bytes`` of rows, not after 300 MB of objects and a 100 MB encode."""
        if not self._degraded:
            self._admit_read("ask for the list")
            try:
                policies = await self._list_all(max_bytes)
            except (SentinelError, trio.TooSlowError) as exc:
                self._enter_degraded(exc)
            else:
                return policies, False
        policies = sorted(self._snapshot.real_policies(), key=lambda p: p.id)
        if max_bytes is not None:
            chunk = max(1, self.config.load_chunk)
            counted = 0
            for start in range(0, len(policies), chunk):
                counted = _count_bytes(policies[start:start + chunk], counted, max_bytes)
        return policies, True

    async def _list_all(self, max_bytes: int | None = None) -> _List[PolicyRecord]:
        """Every policy, ``load_chunk`` rows per store call (keyset pages, like
        :meth:`list_page`): one call for the whole table would hold the store
        thread past ``op_timeout`` and time out every call queued behind it."""
        chunk = max(1, self.config.load_chunk)
        policies: _List[PolicyRecord] = []
        after = 0
        counted = 0
        while True:
            rows = await self._db(
                partial(self._store.list_policies_page, after, chunk), "list", read=True
            )
            if max_bytes is not None:
                counted = _count_bytes(rows, counted, max_bytes)
            policies.extend(rows)
            if len(rows) < chunk:
                return policies
            after = rows[-1].id

    async def _load_active(
        self, *, guarded: bool = True, read: bool = False
    ) -> tuple[PolicyIndex, int]:
        """Every active policy, indexed, and the highest id ever handed out.

        Page by page: ``load_chunk`` rows per store call (a keyset query, see
        :meth:`PolicyStore.load_active_page`), each call under ``op_timeout``
        and the other callers' calls running between them on the store
        thread. (In one call, 300,000 policies take about 2 s on a 2-core
        machine: the whole ``op_timeout``, and every call queued behind it
        timed out too.) Each page is indexed as it comes, so the event loop
        never indexes the whole table in one step either.

        The pages are not one consistent view of the table: see
        :meth:`refresh_snapshot`. ``guarded``: each page under the retry and
        the breaker (:meth:`_db`); else one attempt (start-up). ``read``: the
        refresh's optional load, whose slow pages are overload (see
        :func:`_queued_too_long`)."""
        now = self._wall()
        chunk = max(1, self.config.load_chunk)
        index = PolicyIndex()
        after = max_id = 0
        while True:
            fetch = partial(self._store.load_active_page, after, chunk, now)
            if guarded:
                rows, top = await self._db(fetch, "load", read=read)
            else:
                rows, top = await self._thread_call(fetch, "load")
            for policy in rows:
                index.add(policy)
            max_id = max(max_id, top)
            if len(rows) < chunk:
                return index, max_id
            after = rows[-1].id

    async def list_page(self, after_id: int, limit: int) -> PolicyPage:
        """At most ``limit`` policies with ``id > after_id``, in id order (a keyset
        page: see :meth:`PolicyStore.list_policies_page`). During an outage the
        page comes from the snapshot by the same rule, ``degraded`` (active
        policies only, queued writes not shown, as :meth:`list`)."""
        if not self._degraded:
            self._admit_read("ask for the page")
            try:
                rows = await self._db(
                    partial(self._store.list_policies_page, after_id, limit + 1), "list",
                    read=True,
                )
            except (SentinelError, trio.TooSlowError) as exc:
                self._enter_degraded(exc)
            else:
                return PolicyPage(rows[:limit], more=len(rows) > limit, degraded=False)
        records, more = self._snapshot.page(after_id, limit)
        return PolicyPage(records, more=more, degraded=True)

    async def threats(self, limit: int = 100) -> _List[ThreatRecord]:
        """The newest threat_history rows. Raises UnavailableError during an outage
        (the history lives only in the database; records made meanwhile are queued)."""
        limit = max(0, min(int(limit), 10_000))
        if not self._degraded:
            self._admit_read("ask for the threats")
            try:
                return await self._db(
                    partial(self._store.threats, limit), "threats", read=True
                )
            except StoreOverloadedError:
                raise  # busy: the history has no cached copy to fall back to
            except (SentinelError, trio.TooSlowError) as exc:
                self._enter_degraded(exc)
        stats = self.breaker.statistics()
        raise UnavailableError(
            f"threat history is unavailable: {self._reason}; "
            f"{self.journal_depth} writes queued for replay",
            retry_after=stats.retry_after,
        )

    async def check_health(self) -> float:
        """Verify the database afresh (see PolicyStore.verify); return seconds taken.

        Raises the failure (and turns the service degraded) when it is not
        usable, and UnavailableError with the reason while the service is
        degraded anyway (a locked database still reads fine, but verdicts come
        from the snapshot and writes are queued until recovery)."""
        if self._degraded:
            raise UnavailableError(
                f"policy database degraded: {self._reason}; "
                f"{self.journal_depth} writes queued for replay",
                retry_after=self.breaker.statistics().retry_after,
            )
        start = trio.current_time()
        try:
            await self._thread_call(self._store.verify, "verify")
        except (SentinelError, trio.TooSlowError) as exc:
            self._enter_degraded(exc)
            raise
        return trio.current_time() - start

    async def _thread_call(
        self, fn: Callable[[], T], operation: str, *, progress: bool = False, read: bool = False
    ) -> T:
        """``fn`` on the store thread, bounded by ``op_timeout``, timed for the
        query observers (not when cancelled from outside: no duration to tell).

        The bound counts the wait in the thread's queue too: a call behind a
        long one times out although the database is fine. Hence no call may
        run long; whole-table loads go page by page (:meth:`_load_active`).

        ``progress``: for the one call that cannot be cut into several, the
        store's recovery, which may rebuild the database from a snapshot of any
        size in one transaction (all or nothing; 300,000 policies take about
        12 s) or copy a moved file out (130 MB: about 1.5 s). It gets
        ``op_timeout`` again each time the store's ``progress`` counter moved
        during the last one, so it is bounded per step (1,000 rows, 8 MB), and
        a stuck file system is still noticed within two ``op_timeout``.
        Nothing else waits on the store thread meanwhile: the service is
        degraded while it recovers. (Start-up does not wait so: see
        :meth:`_start`.)"""
        start = trio.current_time()
        cancelled = False
        try:
            thread = self._thread
            job = thread.submit(fn)
            if not progress:
                try:
                    with trio.fail_after(self.config.op_timeout):
                        return await job.result()
                except trio.TooSlowError:
                    head = thread.current_started_at
                    if not _queued_too_long(job, head, self.config.op_timeout, read=read):
                        raise  # our call is slow, or the thread is stuck: a failure
                    raise StoreOverloadedError(
                        f"the policy database is busy: a call ({operation}) waited "
                        f"{self.config.op_timeout:g} s behind {thread.pending} others "
                        "while the database kept answering",
                        retry_after=0.5,
                    ) from None
            seen = self._store.progress
            while True:
                with trio.move_on_after(self.config.op_timeout):
                    return await job.result()
                if self._store.progress == seen:
                    raise trio.TooSlowError
                seen = self._store.progress
        except trio.Cancelled:
            cancelled = True
            raise
        finally:
            if not cancelled:
                self._observe_query(operation, trio.current_time() - start)

    # --- recovery ---------------------------------------------------------------

    async def retry_now(self) -> bool:
        """The notice's *Retry Connection*: half-open the breaker and try to recover
        at once. True if the service is healthy afterwards."""
        self.breaker.half_open(reason="service_retry")
        return await self._recover_once()

    async def _recover_once(self) -> bool:
        async with self._recover_lock:
            if not self._degraded and not self.journal_depth:
                return True
            try:
                if self._degraded:
                    try:
                        await self._db(
                            partial(
                                self._store.recover,
                                self._snapshot.real_policies(),
                                self._snapshot.max_policy_id,
                                check_integrity=self._check_integrity,
                            ),
                            "recover",
                            progress=True,
                        )
                        self._check_integrity = False
                    finally:
                        self._report_events(self._store.drain_events())
                changed = await self._replay()
                async with self._write_lock:
                    changed = await self._replay() or changed
                    if self._degraded:
                        # Under the write lock (page by page, as any load): no
                        # write can slip between the pages and the replacement.
                        index, max_id = await self._load_active()
                        self._replace_snapshot(index, max_id)
                        self._set_state(False, None)
                    elif changed:
                        # Policy writes journaled while healthy (the store was
                        # busy): the cache holds them as provisional entries
                        # and the cache file not at all. Reload at once, not
                        # at the next refresh, so both get the database's ids.
                        self._next_refresh = trio.current_time()
            except (SentinelError, trio.TooSlowError) as exc:
                self._note_failure(exc)
                reason = outage_reason(exc)
                log.info("policy database recovery attempt failed: %s", reason)
                if self._degraded and not isinstance(exc, CircuitOpenError):
                    self._set_state(True, reason)
                return False
        await self._persist_snapshot()
        return True

    async def _replay(self) -> bool:
        """Apply the journal's entries and discard them; whether any of them was a
        policy write (the cached policies then hold provisional entries for them,
        with no database id)."""
        journal = self._journal
        if journal is None:
            return False
        policies_changed = False
        while True:
            ops = journal.pending(self._replayed_seq)[:_REPLAY_CHUNK]
            if not ops:
                break
            outcomes = await self._db(partial(self._store.replay, ops), "replay")
            self._replayed_seq = ops[-1].seq
            self._write_generation += 1  # the database moved under any load in progress
            self._report_replay(ops, outcomes)
            policies_changed = policies_changed or any(
                isinstance(op, (AddPolicy, RemovePolicy)) for op in ops
            )
        if journal.depth:
            try:
                await trio.to_thread.run_sync(journal.discard_through, self._replayed_seq)
            except OSError as exc:
                # Harmless for correctness (replay skips applied keys), but the
                # journal keeps growing: say so.
                log.error("policy journal: cannot discard replayed entries: %s", exc)
        return policies_changed

    def _report_replay(self, ops: Sequence[JournalOp], outcomes: Sequence[ReplayOutcome]) -> None:
        applied = sum(o.status == "applied" for o in outcomes)
        log.info("policy journal: replayed %d entries (%d applied)", len(ops), applied)
        for op, o in zip(ops, outcomes, strict=True):
            if isinstance(op, RecordDecision) and o.status in ("applied", "duplicate"):
                continue
            if o.status == "applied":
                self._remember_key(op.key, o.policy_id)
            self._audit_event(
                "journal_replay",
                seq=o.seq,
                op=o.op,
                status=o.status,
                policy_id=o.policy_id,
                detail=o.detail or None,
            )
            if o.status in ("conflict", "not_found"):
                log.warning("policy journal entry %d (%s) not applied: %s", o.seq, o.op, o.detail)

    def _report_events(self, events: Sequence[StoreEvent]) -> None:
        for e in events:
            level = logging.INFO if e.kind == "created" else logging.WARNING
            if e.kind in ("corrupt_moved_aside", "moved_detected"):
                level = logging.ERROR
            log.log(level, "policy database %s: %s", e.kind, e.detail)
            self._audit_event("database_" + e.kind, detail=e.detail, path=e.path)

    async def _maintenance(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Recovers while degraded; verifies and refreshes while healthy. Never dies:
        an unexpected error is logged and the loop goes on after a pause."""
        task_status.started()
        self._next_verify = trio.current_time() + self.config.verify_interval
        self._next_refresh = trio.current_time() + self.config.refresh_interval
        while True:
            # A fresh event *before* the work, so a wake-up during it is not lost.
            self._wake = trio.Event()
            try:
                wait_until = await self._maintenance_step()
            except Exception:
                log.exception("policy maintenance step failed")
                wait_until = trio.current_time() + max(self.config.probe_interval, 1.0)
            with trio.move_on_at(wait_until):
                await self._wake.wait()

    async def _maintenance_step(self) -> float:
        """One round; returns when the next one is due (a wake-up comes sooner)."""
        now = trio.current_time()
        if self._degraded or self.journal_depth:
            if await self._recover_once():
                return now
            stats = self.breaker.statistics()
            wait = self.config.probe_interval
            if stats.state is BreakerState.OPEN and stats.retry_after is not None:
                wait = max(stats.retry_after, 0.001)
            return trio.current_time() + wait
        if now >= self._next_verify:
            self._next_verify = now + self.config.verify_interval
            with contextlib.suppress(SentinelError, trio.TooSlowError):
                await self.check_health()
        if now >= self._next_refresh and not self._degraded:
            await self.refresh_snapshot()  # sets the next one
        if self._snapshot.dirty and not self._degraded:
            await self._persist_snapshot()
        if self._degraded:
            return trio.current_time()
        return min(self._next_verify, self._next_refresh)

    async def refresh_snapshot(self) -> bool:
        """Reload the snapshot from the database (healthy only). True if it was
        replaced; schedules the next refresh either way.

        The load runs page by page without ``_write_lock`` (it may take seconds:
        writes must not wait for it), so a write can land while it runs: in
        the database and in the snapshot, but not in the pages read before it
        (an add after the last page; a remove after its policy's page). Writes
        bump ``_write_generation``; the snapshot is replaced, under the lock,
        only if no write bumped it since the load began. Otherwise the
        snapshot the writes kept current stays, and the refresh is tried again
        soon: after ``probe_interval``, doubling for each refresh in a row
        that gave way, at most ``refresh_interval``. (Likewise while a decision
        record waits in the journal: recovery replays it first.)"""
        self._next_refresh = trio.current_time() + self.config.refresh_interval
        if self._degraded:
            return False
        generation = self._write_generation
        try:
            index, max_id = await self._load_active(read=True)
        except (SentinelError, trio.TooSlowError) as exc:
            self._enter_degraded(exc)
            if isinstance(exc, StoreOverloadedError):
                self._next_refresh = trio.current_time() + self.config.probe_interval
            return False
        async with self._write_lock:
            if self._degraded:
                return False  # recovery reloads
            if self._write_generation != generation or self.journal_depth:
                self._refresh_conflicts += 1
                delay = self.config.probe_interval * 2.0 ** min(self._refresh_conflicts - 1, 30)
                delay = min(delay, self.config.refresh_interval)
                self._next_refresh = trio.current_time() + delay
                self._wake.set()  # the maintenance loop may be sleeping until the old time
                log.info(
                    "policy snapshot refresh gave way to a write during the load; "
                    "again in %.3g s",
                    delay,
                )
                return False
            self._refresh_conflicts = 0
            self._replace_snapshot(index, max_id)
        await self._persist_snapshot()
        return True

    # --- snapshot and journal I/O ---------------------------------------------

    async def _persist_snapshot(self) -> bool:
        """Persist the snapshot's changes, if any, before the caller acknowledges
        its write. Failure is reported, not raised: the database (or the journal)
        holds the writes; the files are a fallback.

        The changes since the last persist are appended to the delta log (one
        write + fsync, whatever the table's size); a reload from the database,
        a log past its bound, damage or a base that changed on disk rewrite the
        base instead (see snapshot.py for the files and every crash point).
        The changes are taken before the I/O: a write landing meanwhile is
        recorded anew and persisted next time (re-applying a put or a remove
        is harmless). A failed persist makes the next one a base rewrite."""
        async with self._snapshot_lock:
            snap = self._snapshot
            if not snap.dirty:
                return True
            writer = self._snapshot_writer
            changes, full = snap.take_changes()
            try:
                if not full:
                    appended = await trio.to_thread.run_sync(
                        writer.append, changes, snap.max_policy_id
                    )
                    full = not appended
                if full:
                    data = snap.to_file(self._wall())
                    await trio.to_thread.run_sync(writer.rewrite, data)
            except OSError as exc:
                snap.persist_failed()
                message = f"cannot save policy snapshot {self.snapshot_path}: {exc.strerror or exc}"
                if self.snapshot_error != message:
                    log.error("%s", message)
                    self._audit_event("snapshot_persist_failed", error=message)
                self.snapshot_error = message
                return False
            if self.snapshot_error is not None:
                self._audit_event("snapshot_persisted", path=str(self.snapshot_path))
            self.snapshot_error = None
            return True

    async def _journal_append(self, ops: _List[JournalOp]) -> _List[JournalOp]:
        """Append with group commit: one write + fsync for everything queued meanwhile."""
        journal = self._journal
        if journal is None:
            raise UnavailableError(
                "the policy database is unavailable and the write journal could not be "
                f"opened ({self.journal_path}); the write was not accepted"
            )
        item = _Pending(ops)
        self._journal_queue.append(item)
        async with self._journal_lock:
            if not item.done:
                batch, self._journal_queue = self._journal_queue, []
                flat = [op for it in batch for op in it.ops]
                try:
                    stored = await trio.to_thread.run_sync(journal.append, flat)
                except Exception as exc:
                    for it in batch:
                        it.error, it.done = exc, True
                else:
                    i = 0
                    for it in batch:
                        it.stored, it.done = stored[i : i + len(it.ops)], True
                        i += len(it.ops)
        if item.error is not None:
            raise item.error
        # Replay is the maintenance task's: while degraded it probes anyway, but
        # a write journaled because the store was busy (healthy service) would
        # otherwise wait for the next verify or refresh.
        self._wake.set()
        return item.stored

    # --- lifecycle ----------------------------------------------------------------

    async def _start(self) -> None:
        """Load snapshot and journal, then try the database once (no retries: a
        daemon must come up, degraded if need be).

        The open is bounded by ``op_timeout`` alone, even when it rebuilds the
        database from the snapshot (300,000 policies: about 12 s): the daemon
        then starts degraded at once, deciding from the snapshot, while the
        rebuild goes on on the store thread; the first recovery attempt waits
        for it by its progress (:meth:`_thread_call`), without a failure."""
        now = self._wall()
        try:
            loaded = await trio.to_thread.run_sync(load_snapshot, self.snapshot_path)
        except SnapshotError as exc:
            log.error("%s; starting without cached policies", exc)
            self._audit_event("snapshot_unusable", error=str(exc))
            loaded = None
        if loaded is not None:
            self._snapshot = PolicySnapshot.from_file(loaded.file, now)
            self._snapshot.mark_saved()
            self._snapshot_writer.adopt(loaded)
            if loaded.log_error is not None:
                self._audit_event("snapshot_log_unusable", error=loaded.log_error)
            if not loaded.clean:
                # Never append after damage: the next persist rewrites the base.
                self._snapshot.needs_base = True
        try:
            self._journal = await trio.to_thread.run_sync(
                partial(Journal.open, self.journal_path, max_bytes=self.config.max_journal_bytes)
            )
        except OSError as exc:
            log.error(
                "policy journal %s cannot be opened (%s): writes during a database outage "
                "will be refused",
                self.journal_path,
                exc.strerror or exc,
            )
            self._audit_event("journal_unavailable", error=str(exc))
        if self._journal is not None:
            for op in self._journal.pending():
                self._overlay(op)
            if self._journal.depth:
                log.warning("policy journal: %d writes pending replay", self._journal.depth)
        steps = self._store.progress
        try:
            await self._thread_call(
                partial(
                    self._store.recover,
                    self._snapshot.real_policies(),
                    self._snapshot.max_policy_id,
                ),
                "open",
            )
        except (SentinelError, trio.TooSlowError) as exc:
            busy = isinstance(exc, trio.TooSlowError) and self._store.progress != steps
            rebuilding = "database being rebuilt from cached policies"
            self._enter_degraded(exc, rebuilding if busy else None)
            return
        finally:
            self._report_events(self._store.drain_events())
        try:
            await self._replay()
            index, max_id = await self._load_active(guarded=False)
        except (SentinelError, trio.TooSlowError) as exc:
            self._enter_degraded(exc)
            return
        self._replace_snapshot(index, max_id)
        self._degraded, self._reason = False, None
        await self._persist_snapshot()

    async def _stop(self) -> None:
        with trio.CancelScope(shield=True):
            if not self._degraded:
                await self._persist_snapshot()
            with contextlib.suppress(SentinelError, trio.TooSlowError):
                await self._thread_call(self._store.close, "close")
            await self._thread.aclose()
            if self._journal is not None:
                await trio.to_thread.run_sync(self._journal.close)

    def statistics(self) -> dict[str, Any]:
        return {
            "degraded": self._degraded,
            "reason": self.degraded_reason,
            "journal_depth": self.journal_depth,
            "snapshot_policies": len(self._snapshot),
            "records_dropped": self.records_dropped,
            "snapshot_error": self.snapshot_error,
            "breaker": self.breaker.statistics().state.value,
        }


class _Pending:
    __slots__ = ("done", "error", "ops", "stored")

    def __init__(self, ops: list[JournalOp]) -> None:
        self.ops = ops
        self.stored: list[JournalOp] = []
        self.error: BaseException | None = None
        self.done = False


def _match_for(name: str) -> RuleMatch:
    ns, sep, rule = name.rpartition(":")
    return RuleMatch(rule=rule, namespace=ns) if sep else RuleMatch(rule=name)


def _policy_fields(p: PolicyRecord) -> dict[str, Any]:
    return {
        "action": p.action,
        "rule_name": p.rule_name,
        "url_pattern": p.url_pattern,
        "sha256": p.file_hash,
        "mime_type": p.mime_type,
        "created_by": p.created_by,
        "reason": p.reason,
        "expires_at": p.expires_at,
    }


@contextlib.asynccontextmanager
async def open_policy_service(
    config: PolicyConfig,
    data_dir: Path,
    audit: AuditLog | None = None,
    *,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[PolicyService]:
    """Open the PolicyGraph in ``data_dir`` (created 0700 if missing) and run its
    recovery/verification task; close everything on exit.

    Never fails because the database is unusable: the service then starts
    degraded, deciding from the persisted snapshot, and recovers by itself.
    """
    data_dir = Path(data_dir)
    with contextlib.suppress(OSError):
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    service = PolicyService(config, data_dir, audit=audit, wall_clock=wall_clock)
    try:
        await service._start()
        async with trio.open_nursery() as nursery:
            await nursery.start(service._maintenance)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await service._stop()


__all__ = [
    "DEFAULT_BREAKER",
    "Decision",
    "ImportResult",
    "JournalFullError",
    "PolicyConfig",
    "PolicyListTooLarge",
    "PolicyService",
    "PolicyStoreError",
    "open_policy_service",
    "outage_reason",
    "policy_database_failure",
]
