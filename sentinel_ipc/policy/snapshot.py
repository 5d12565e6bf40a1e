"""The in-memory snapshot of the active policies, and its files.

Why it exists: when the database fails, verdicts still need the user's
policies. The snapshot is a :class:`~sentinel_ipc.policy.decision.PolicyIndex`
of every active policy, kept current after each successful database read and
write, and persisted in the data dir so a daemon restarted during an outage,
or a database rebuilt after corruption or deletion, still has every
acknowledged policy.

Writes queued in the outage journal are laid over it too (an *overlay*), so a
policy the user added during the outage takes effect at once. Such a policy
has no database id yet; it gets a provisional negative id (``-seq`` of its
journal entry) that is never shown to clients and never persisted: after
recovery the snapshot is reloaded from the database with the real ids.

Files: a base and a delta log
-----------------------------
Rewriting every policy on every write made each write cost the whole table
(300,000 policies: 126 MB and about 0.8 s under the write lock), so the
snapshot is two files:

* the *base*, ``policy_snapshot.json`` (:class:`SnapshotFile`): every real
  policy, with a ``generation`` bumped on each rewrite. It is replaced
  atomically (``tmp + fsync + rename + fsync(dir)``): a reader sees the old
  file or the new one, never half of one.
* the *delta log*, ``policy_snapshot.log`` beside it: the changes since the
  base was written, one per line in the outage journal's style -- the CRC-32
  of the JSON as 8 hex digits, a space, the JSON (:class:`LogPut` carries the
  whole :class:`PolicyRecord` and ``max_policy_id``, :class:`LogRemove` the
  id), each stamped with the generation of the base it applies to. A persist
  appends its records with ONE ``write()`` and an ``fsync`` before the write
  that made them is acknowledged, exactly where the whole file used to be
  rewritten.

:class:`PolicySnapshot` records the changes since the last persist (real ids
only: provisional ones are never persisted, hit counts alone never cause a
persist); :meth:`PolicySnapshot.replace_all` (a reload from the database)
asks for a base rewrite instead. :class:`SnapshotWriter` appends while the
base on disk is the one it wrote or loaded and the log stays under
``max(1 MiB, base size / 4)``; otherwise it rewrites the base (generation
+ 1) and then empties the log. Reading the log back costs little more than
reading the base, and the log never outgrows a quarter of it.

Crash points (why each is safe)
-------------------------------
* *After an append* (record fsync'd, write not yet acknowledged): the record
  is loaded and applied; the database committed the write before, so the two
  agree.
* *Mid-append*: only the last line can be torn (one ``write()``, appended).
  At load a damaged tail -- after the last good line -- is cut off: that
  write was never acknowledged. A damaged line *before* good lines (a bit
  flip) is skipped and counted, never guessed at; the lines after it still
  apply. Either way the next persist rewrites the base, so nothing is ever
  appended after damage.
* *Between the base rename and the log truncation*: the log still holds the
  records of the old generation, which the new base already includes. A
  record whose generation is not the base's is ignored at load, so they
  cannot replay on top of the new base (a policy removed after them cannot
  come back).
* *Mid-rewrite*: the rename has not happened; the old base and its log (of
  its generation) load as before.
* *Base deleted, replaced or undecodable*: the log cannot be applied to a
  base nobody trusts, so the loader ignores it (a missing base: no snapshot;
  an undecodable one: :class:`SnapshotError`, as before), and the writer,
  which no longer knows the base on disk, removes the log *before* writing a
  new base, so none of its records can ever match the new generation.

A log that cannot be read at all (permissions, I/O error) while the base
decodes: the loader starts from the base and logs an error rather than
refusing both. The base holds everything up to its rewrite; throwing it away
would drop every cached policy for the sake of the last few, and the
database, when reachable, reloads them all at start anyway. A base that does
not decode is still reported (SnapshotError), never half-trusted.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from sentinel_ipc.fsutil import atomic_write, fsync_dir, read_all, write_all
from sentinel_ipc.messages import PolicyRecord
from sentinel_ipc.policy.decision import PolicyIndex
from sentinel_ipc.policy.journal import (
    AddPolicy,
    JournalOp,
    RemovePolicy,
    checked_line,
    decode_checked,
)

log = logging.getLogger("sentinel.policy.snapshot")

SNAPSHOT_FILENAME: Final = "policy_snapshot.json"
#: The delta log beside the base (see :func:`log_path_for` for other names).
SNAPSHOT_LOG_FILENAME: Final = "policy_snapshot.log"
FORMAT: Final = 1
#: The log is appended to while it stays under ``max(LOG_MIN_BOUND, base / 4)``.
LOG_MIN_BOUND: Final = 1 << 20
#: Changes waiting for a persist past this many are forgotten in favour of a
#: base rewrite (which holds them all): memory stays bounded if the disk refuses.
MAX_PENDING_CHANGES: Final = 100_000


class SnapshotFile(msgspec.Struct, kw_only=True):
    """What is on disk (the base)."""

    format: int = FORMAT
    saved_at: float
    #: The highest policy id ever handed out, so a database rebuilt from this
    #: file never reuses the id of a removed policy.
    max_policy_id: int = 0
    policies: list[PolicyRecord] = []
    #: Bumped on every rewrite; a delta-log record applies only to the base of
    #: its generation. A file written before the log existed loads as 0.
    generation: int = 0


class LogPut(msgspec.Struct, tag_field="op", tag="put", frozen=True, kw_only=True):
    """A policy added or replaced (by id)."""

    generation: int
    policy: PolicyRecord
    max_policy_id: int


class LogRemove(msgspec.Struct, tag_field="op", tag="remove", frozen=True, kw_only=True):
    generation: int
    policy_id: int


LogRecord = LogPut | LogRemove
#: A change waiting in memory: the policy put, or the id removed.
Change = PolicyRecord | int

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SnapshotFile)
_log_decoder: msgspec.json.Decoder[LogRecord] = msgspec.json.Decoder(LogRecord)


class SnapshotError(Exception):
    pass


def log_path_for(path: Path) -> Path:
    """The delta log of the base at ``path``: ``policy_snapshot.json`` ->
    ``policy_snapshot.log`` (a configured name ending otherwise gets ``.log``
    in place of its suffix, never the base's own name)."""
    candidate = path.with_suffix(".log")
    return candidate if candidate != path else path.with_name(path.name + ".delta")


# --- the log's lines (pure) ---------------------------------------------------------


def encode_log_record(record: LogRecord) -> bytes:
    return checked_line(_encoder.encode(record))


def decode_log_record(line: bytes) -> LogRecord:
    """One line (without its newline) back to a record; ValueError if damaged."""
    return decode_checked(line, _log_decoder)


def encode_changes(changes: Sequence[Change], generation: int, max_policy_id: int) -> bytes:
    """The log lines of ``changes`` (in order) for the base of ``generation``."""
    return b"".join(
        encode_log_record(
            LogRemove(generation=generation, policy_id=c)
            if isinstance(c, int)
            else LogPut(generation=generation, policy=c, max_policy_id=max_policy_id)
        )
        for c in changes
    )


@dataclass(frozen=True, slots=True)
class LogReplay:
    """What :func:`apply_log` found."""

    applied: int
    #: Well-formed records of another generation (ignored).
    stale: int
    #: Damaged lines before the last good one (skipped).
    corrupt: int
    #: Bytes after the last good line (a torn or damaged tail, cut off).
    torn_bytes: int
    #: The highest generation any good record names (a new base must exceed it).
    max_generation: int

    @property
    def clean(self) -> bool:
        """Nothing skipped: the log may be appended to as it is."""
        return not (self.stale or self.corrupt or self.torn_bytes)


def apply_log(base: SnapshotFile, data: bytes) -> tuple[SnapshotFile, LogReplay]:
    """``base`` with the records of its generation in ``data`` applied, in order.

    A damaged line is never guessed at: after the last good line it is a torn
    append (cut off), before it a damaged line (skipped, counted; the lines
    after it still apply). Records of another generation are ignored (see
    the module docstring, "Crash points")."""
    by_id = {p.id: p for p in base.policies}
    max_id = base.max_policy_id
    applied = stale = damaged = damaged_since_good = 0
    max_generation = 0
    good_end = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl == -1 else nl
        try:
            if nl == -1:
                raise ValueError("torn line at the end")
            record = decode_log_record(data[pos:end])
        except ValueError as exc:
            damaged += 1
            damaged_since_good += 1
            log.warning("policy snapshot log: skipping damaged line at byte %d: %s", pos, exc)
        else:
            good_end = end + 1
            damaged_since_good = 0
            max_generation = max(max_generation, record.generation)
            if record.generation != base.generation:
                stale += 1
            elif isinstance(record, LogPut):
                by_id[record.policy.id] = record.policy
                max_id = max(max_id, record.max_policy_id, record.policy.id)
                applied += 1
            else:
                by_id.pop(record.policy_id, None)
                applied += 1
        pos = end + 1
    merged = msgspec.structs.replace(base, policies=list(by_id.values()), max_policy_id=max_id)
    replay = LogReplay(
        applied=applied,
        stale=stale,
        corrupt=damaged - damaged_since_good,
        torn_bytes=len(data) - good_end,
        max_generation=max_generation,
    )
    return merged, replay


# --- loading --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedSnapshot:
    """The base with its log applied, and what the writer needs to go on appending."""

    file: SnapshotFile
    base_bytes: int
    #: ``(st_dev, st_ino, st_size)`` of the base read: the writer appends only
    #: while the base on disk is still this one.
    base_id: tuple[int, int, int]
    #: Bytes in the log as found (0: none).
    log_bytes: int
    replay: LogReplay | None
    #: Why the log could not be read, if it could not.
    log_error: str | None = None

    @property
    def clean(self) -> bool:
        """Appending may go on: nothing in the log skipped or unreadable."""
        return self.log_error is None and (self.replay is None or self.replay.clean)


def load_snapshot(path: Path) -> LoadedSnapshot | None:
    """The base at ``path`` with its delta log applied; ``None`` if there is no base.

    Raises SnapshotError (naming the file and the problem) if the base exists
    but is unreadable or does not decode. Reads only: damage is cut off in
    memory, and the writer rewrites the base before appending again."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read policy snapshot {path}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        data = read_all(fd)
    except OSError as exc:
        raise SnapshotError(f"cannot read policy snapshot {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        base = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"policy snapshot {path} is damaged: {exc}") from exc
    if base.format != FORMAT:
        raise SnapshotError(f"policy snapshot {path}: unsupported format {base.format}")
    base_id = (st.st_dev, st.st_ino, st.st_size)
    log_path = log_path_for(path)
    try:
        log_data = log_path.read_bytes()
    except FileNotFoundError:
        return LoadedSnapshot(base, len(data), base_id, 0, None)
    except OSError as exc:
        message = f"cannot read policy snapshot log {log_path}: {exc.strerror or exc}"
        log.error("%s; starting from the base alone (generation %d)", message, base.generation)
        return LoadedSnapshot(base, len(data), base_id, 0, None, message)
    merged, replay = apply_log(base, log_data)
    if not replay.clean:
        log.warning(
            "policy snapshot log %s: %d records applied, %d of another generation ignored, "
            "%d damaged lines skipped, %d bytes of torn tail cut off",
            log_path,
            replay.applied,
            replay.stale,
            replay.corrupt,
            replay.torn_bytes,
        )
    return LoadedSnapshot(merged, len(data), base_id, len(log_data), replay)


def load_snapshot_file(path: Path) -> SnapshotFile | None:
    """The snapshot on disk (base + log); ``None`` if there is none.

    Raises SnapshotError (naming the file and the problem) if it exists but is
    unreadable or does not decode.
    """
    loaded = load_snapshot(path)
    return None if loaded is None else loaded.file


def save_snapshot_file(path: Path, snap: SnapshotFile) -> int:
    """Write a base atomically (tmp + fsync + rename + fsync dir); return the bytes
    written. Leaves the log alone: :class:`SnapshotWriter` owns the pair.

    Raises OSError when the directory or the disk refuses.
    """
    data = _encoder.encode(snap)
    atomic_write(path, data, mode=0o600)
    return len(data)


# --- writing --------------------------------------------------------------------------


class SnapshotWriter:
    """The base and its log as this process last left them; appends or rewrites.

    Blocking (fsync): call from a worker thread, one call at a time (the
    service holds its snapshot lock around each)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log_path = log_path_for(path)
        #: Generation of the base on disk, when it is known to be the one this
        #: writer wrote or loaded; ``None``: unknown, the next persist rewrites.
        self.generation: int | None = None
        self.base_bytes = 0
        self.log_bytes = 0
        #: False after damage or a failed append: rewrite before appending again.
        self.appendable = False
        self.rewrites = 0
        self.appends = 0
        self._base_id: tuple[int, int, int] | None = None
        #: The highest generation seen in either file, so a new base never reuses one.
        self._last_generation = 0

    @property
    def log_bound(self) -> int:
        return max(LOG_MIN_BOUND, self.base_bytes // 4)

    def adopt(self, loaded: LoadedSnapshot) -> None:
        """Go on from the files :func:`load_snapshot` read."""
        self.generation = loaded.file.generation
        self.base_bytes = loaded.base_bytes
        self._base_id = loaded.base_id
        self.log_bytes = loaded.log_bytes
        self.appendable = loaded.clean
        seen = 0 if loaded.replay is None else loaded.replay.max_generation
        self._last_generation = max(self._last_generation, loaded.file.generation, seen)

    def append(self, changes: Sequence[Change], max_policy_id: int) -> bool:
        """Append ``changes`` with one write and an fsync; False (nothing written)
        when a rewrite is due instead: the log would pass its bound, or the files
        are not as this writer left them. Raises OSError (then a rewrite is due)."""
        if self.generation is None or not self.appendable or not self._files_as_left():
            return False
        data = encode_changes(changes, self.generation, max_policy_id)
        if self.log_bytes + len(data) > self.log_bound:
            return False
        try:
            fd = os.open(
                self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.log_bytes == 0:
                fsync_dir(self.path.parent)  # the log may be new: its name must survive too
        except OSError:
            self.appendable = False  # perhaps a torn line: never append after it
            raise
        self.log_bytes += len(data)
        self.appends += 1
        return True

    def rewrite(self, snap: SnapshotFile) -> int:
        """Write a new base (next generation), then empty the log; the base's bytes.

        When the base on disk is not known to be this writer's, the log is
        removed first: its records belong to a base nobody trusts, and must not
        be able to match the new generation. Raises OSError (the base on disk,
        and the log if the base is known, then stay as they were)."""
        if self.generation is None:
            self._remove_log()
        generation = self._last_generation + 1
        size = save_snapshot_file(self.path, msgspec.structs.replace(snap, generation=generation))
        st = os.stat(self.path)
        self.generation = self._last_generation = generation
        self._base_id = (st.st_dev, st.st_ino, st.st_size)
        self.base_bytes = size
        self.rewrites += 1
        # The new base holds everything; the log's records are of the old
        # generation now (ignored at load), so emptying it is only tidying.
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.log_bytes, self.appendable = 0, True
            return size
        except OSError as exc:
            self._log_not_emptied(exc)
            return size
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        except OSError as exc:
            self._log_not_emptied(exc)
        else:
            self.log_bytes, self.appendable = 0, True
        finally:
            os.close(fd)
        return size

    def _log_not_emptied(self, exc: OSError) -> None:
        log.error(
            "policy snapshot log %s: cannot empty it after a base rewrite (%s); "
            "its records are of an older generation and ignored",
            self.log_path,
            exc.strerror or exc,
        )
        self.appendable = False  # its size is unknown: rewrite again next time

    def _remove_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except FileNotFoundError:
            return
        fsync_dir(self.path.parent)

    def _files_as_left(self) -> bool:
        """The base is the one written or loaded, and the log has the bytes it
        should (a base deleted or replaced, a log truncated or grown by someone
        else: rewrite rather than append to something nobody will read)."""
        try:
            st = os.stat(self.path)
        except OSError:
            self.generation = None
            return False
        if (st.st_dev, st.st_ino, st.st_size) != self._base_id:
            self.generation = None
            return False
        try:
            size = os.stat(self.log_path).st_size
        except FileNotFoundError:
            size = 0
        except OSError:
            self.appendable = False
            return False
        if size != self.log_bytes:
            self.appendable = False
            return False
        return True


# --- the in-memory snapshot ------------------------------------------------------------


class PolicySnapshot:
    """The active policies in memory. Event-loop thread only (not thread-safe)."""

    def __init__(self, policies: Sequence[PolicyRecord] = (), max_policy_id: int = 0) -> None:
        self.index = PolicyIndex(policies)
        self.max_policy_id = max(max_policy_id, max((p.id for p in policies), default=0))
        #: Bumped on every change (``page`` rebuilds its sorted ids from it).
        self.version = 0
        #: The real-id changes since the last persist, in order (the delta log's
        #: next records); ``needs_base``: a whole-file rewrite is due instead.
        self._changes: list[Change] = []
        self.needs_base = bool(policies)
        #: The real (positive) ids in order, for :meth:`page`; rebuilt when
        #: ``version`` moved on since (a hit count changes no id).
        self._sorted_ids: list[int] = []
        self._sorted_version = -1

    @classmethod
    def from_file(cls, snap: SnapshotFile, now: float) -> PolicySnapshot:
        active = [p for p in snap.policies if p.expires_at is None or p.expires_at > now]
        return cls(active, snap.max_policy_id)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dirty(self) -> bool:
        return self.needs_base or bool(self._changes)

    @property
    def pending_changes(self) -> int:
        return len(self._changes)

    def take_changes(self) -> tuple[list[Change], bool]:
        """The changes to persist and whether a base rewrite is due; both are
        forgotten here (:meth:`persist_failed` asks for a rewrite if the write fails)."""
        changes, self._changes = self._changes, []
        full, self.needs_base = self.needs_base, False
        return changes, full

    def persist_failed(self) -> None:
        """A persist did not complete: the next one rewrites the base (which holds
        every change, those taken included)."""
        self._changes.clear()
        self.needs_base = True

    def mark_saved(self) -> None:
        """The files on disk hold this state (a snapshot just loaded from them)."""
        self._changes.clear()
        self.needs_base = False

    def _record(self, change: Change) -> None:
        if self.needs_base:
            return  # the rewrite will hold it
        self._changes.append(change)
        if len(self._changes) > MAX_PENDING_CHANGES:
            self.persist_failed()

    def real_policies(self) -> list[PolicyRecord]:
        """Policies that exist in the database (no provisional overlay)."""
        return [p for p in self.index.policies() if p.id > 0]

    def page(self, after_id: int, limit: int) -> tuple[list[PolicyRecord], bool]:
        """The real policies with ``id > after_id``, at most ``limit`` of them in id
        order, and whether more follow: ``policy_list`` paging during an outage,
        the same keyset rule as the database's. The sorted ids are kept between
        pages, so listing n policies costs one sort, not one per page."""
        if self._sorted_version != self.version:
            self._sorted_ids = sorted(p.id for p in self.index.policies() if p.id > 0)
            self._sorted_version = self.version
        ids = self._sorted_ids
        start = bisect.bisect_right(ids, after_id)
        records: list[PolicyRecord] = []
        at = start
        while at < len(ids) and len(records) < limit:
            policy = self.index.get(ids[at])
            if policy is not None:
                records.append(policy)
            at += 1
        return records, at < len(ids)

    def to_file(self, now: float) -> SnapshotFile:
        return SnapshotFile(
            saved_at=now, max_policy_id=self.max_policy_id, policies=self.real_policies()
        )

    def replace_all(
        self, policies: list[PolicyRecord] | PolicyIndex, max_policy_id: int
    ) -> None:
        """Reload from the database (drops the overlay: the journal is replayed by now).
        The next persist rewrites the base (a reload is not a list of changes).

        ``policies`` may be an index already built (the service builds it page
        by page as the load goes, so that no single step of the event loop
        indexes the whole table: 300,000 policies take about 0.4 s)."""
        self.index = policies if isinstance(policies, PolicyIndex) else PolicyIndex(policies)
        self.max_policy_id = max(self.max_policy_id, max_policy_id)
        self.version += 1
        self._changes.clear()
        self.needs_base = True

    def put(self, policy: PolicyRecord) -> None:
        self.index.add(policy)
        if policy.id > 0:
            self.max_policy_id = max(self.max_policy_id, policy.id)
            self._record(policy)
        self.version += 1

    def touch(self, policy: PolicyRecord) -> None:
        """A new hit count; not worth a persist by itself (nor a log record)."""
        self.index.replace(policy)

    def remove(self, policy_id: int) -> PolicyRecord | None:
        removed = self.index.remove(policy_id)
        if removed is not None:
            if policy_id > 0:
                self._record(policy_id)
            self.version += 1
        return removed

    def overlay(self, op: JournalOp) -> None:
        """Lay a journaled (not yet applied) write over the snapshot."""
        if isinstance(op, AddPolicy):
            d = op.policy
            if self.index.find_identity(d.identity) is not None:
                return  # already applied before the journal was discarded: no duplicate
            self.put(
                PolicyRecord(
                    id=-op.seq,
                    action=d.action,
                    rule_name=d.rule_name,
                    url_pattern=d.url_pattern,
                    file_hash=d.file_hash,
                    mime_type=d.mime_type,
                    created_at=op.at,
                    created_by=d.created_by,
                    expires_at=d.expires_at,
                    reason=d.reason,
                )
            )
        elif isinstance(op, RemovePolicy):
            self.remove(op.policy_id)
