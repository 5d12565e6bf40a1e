"""A durable, bounded, ordered on-disk outbox of events waiting to be forwarded.

Theory of operation
-------------------

The outbox is an append-only log file (``outbox.log``) of records, each framed
as ``[u32 length][u32 crc32][msgpack body]``:

* ``h`` header: the outbox's random ``origin``, the next sequence number and the
  running totals (delivered, dropped, rejected). Always the first record.
* ``e`` event: sequence number, id, kind, priority, wall-clock time and the
  event's JSON, exactly as it will be sent.
* ``a`` acknowledged (delivered) and ``d`` dropped / rejected: sequence numbers
  that leave the outbox; ``c``: events turned away on arrival (counted only).

Replaying the log from the top rebuilds the pending events in sequence order.
A record cut short by a crash (or failing its checksum) ends the replay: the
file is truncated there, so later appends never hide behind garbage.

Writes are *group commits*: :meth:`Outbox.append` and friends only change the
in-memory state and stage encoded records (no I/O, safe on the trio thread);
:meth:`Outbox.write` (blocking; run it in a worker thread, one at a time) writes
everything staged with one ``write`` + ``fsync``. A failed write is undone
(truncated back) and the records stay staged for the next try, so the log never
holds a torn record in the middle. Only events whose append is durable are
handed out for delivery (:meth:`Outbox.batch`), so an id a receiver has seen
is never reused after a crash.

Compaction rewrites the log as one header plus the live events (temp file,
fsync, rename, fsync of the directory) once the dead records outweigh the live
ones. It is planned only when nothing is staged, so the plan is exactly the
state on disk plus memory, and everything staged later is a delta on top of it.
Replay is idempotent for the overlaps that remain (an ack of an unknown
sequence number is ignored).

Bounds: at most ``max_events`` events and ``max_bytes`` bytes of event JSON.
A newcomer that does not fit evicts the oldest event of the lowest priority
present, but never one of a higher priority than itself; if there is no such
victim the newcomer is the one dropped. Every drop is counted in the header's
totals (so the count survives restarts) and returned to the caller to report.

Event ids are ``<origin>-<seq>``: the origin is random per outbox and the
sequence never goes back (the header carries it across compactions), so a
receiver can deduplicate redeliveries (at-least-once) by id.

Not thread-safe beyond the one rule above: in-memory methods on one thread,
``write``/``compact`` on one worker thread at a time, never concurrently with
``close``.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import msgspec

from sentinel_ipc.errors import SentinelError
from sentinel_ipc.fsutil import fsync_dir, pwrite_all, read_all

__all__ = [
    "Outbox",
    "OutboxEvent",
    "OutboxLockedError",
    "OutboxStatistics",
    "Priority",
    "StagedWrite",
]

LOG_NAME: Final = "outbox.log"
_FRAME = struct.Struct(">II")
#: A record longer than this is corrupt, whatever its header says (bounds replay memory).
_MAX_RECORD: Final = 64 * 1024 * 1024
#: Per-event bookkeeping counted against ``max_bytes`` besides its JSON.
EVENT_OVERHEAD: Final = 64


class OutboxLockedError(SentinelError):
    """Another process (or another open Outbox) holds this outbox directory."""


class Priority(enum.IntEnum):
    """Which events a full outbox gives up first (LOW) and last (HIGH)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @classmethod
    def parse(cls, value: Priority | int | str) -> Priority:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown priority {value!r} (low, normal, high)") from None
        return cls(value)


# --- on-disk records -------------------------------------------------------------


class _Header(msgspec.Struct, tag="h", array_like=True):
    version: int
    origin: str
    next_seq: int
    delivered: int
    dropped: int
    rejected: int
    refused: int = 0


class _Append(msgspec.Struct, tag="e", array_like=True):
    seq: int
    id: str
    kind: str
    priority: int
    ts: float
    body: bytes


class _Remove(msgspec.Struct, tag="a", array_like=True):
    """Delivered (acknowledged by the receiver)."""

    seqs: list[int]


class _Drop(msgspec.Struct, tag="d", array_like=True):
    """Dropped (outbox full) or rejected (the receiver refused it for good)."""

    seqs: list[int]
    rejected: bool


class _Tally(msgspec.Struct, tag="c", array_like=True):
    """Events turned away without ever being appended: dropped on arrival (only
    higher-priority events to evict) or refused (too large). Only counted."""

    dropped: int
    refused: int


_Record = _Header | _Append | _Remove | _Drop | _Tally
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Record)
_VERSION: Final = 1


def _frame(record: _Record) -> bytes:
    body = _ENCODER.encode(record)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


# --- in-memory view ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One event waiting for delivery. ``body`` is its JSON object, as sent."""

    seq: int
    id: str
    kind: str
    priority: Priority
    ts: float  # wall-clock seconds when it was emitted
    body: bytes

    @property
    def cost(self) -> int:
        """What it counts against ``max_bytes``."""
        return len(self.body) + EVENT_OVERHEAD


@dataclass(frozen=True, slots=True)
class OutboxStatistics:
    """A frozen view. Totals survive restarts; ``oldest_age`` is in seconds (wall clock)."""

    pending: int  # events in the outbox, delivered to nobody yet
    pending_bytes: int
    by_priority: dict[str, int]
    unsynced: int  # records staged but not yet written + fsynced
    oldest_ts: float | None
    oldest_age: float | None
    delivered_total: int
    dropped_total: int
    rejected_total: int
    refused_total: int  # emitted events too large to accept at all
    file_bytes: int
    write_errors: int
    last_write_error: str | None
    compactions: int
    replay_truncated_bytes: int  # torn/corrupt tail cut off when opened


@dataclass(frozen=True, slots=True)
class StagedWrite:
    """Records to write with one fsync (from :meth:`Outbox.take_staged`)."""

    data: bytes
    records: int
    max_seq: int  # the highest sequence number appended so far (durable once written)


@dataclass(frozen=True, slots=True)
class _CompactionPlan:
    header: _Header
    events: tuple[OutboxEvent, ...]


class Outbox:
    """See the module docstring. Open with :meth:`Outbox.open` (blocking)."""

    def __init__(
        self,
        directory: Path,
        fd: int,
        *,
        max_events: int,
        max_bytes: int,
        max_event_bytes: int,
        compact_min_bytes: int,
    ) -> None:
        self.directory = directory
        self.path = directory / LOG_NAME
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_event_bytes = max_event_bytes
        self.compact_min_bytes = compact_min_bytes
        self._fd: int | None = fd
        self.origin = ""
        self._next_seq = 1
        self._events: dict[int, OutboxEvent] = {}
        self._by_priority: dict[Priority, deque[int]] = {p: deque() for p in Priority}
        self._count_by_priority: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._bytes = 0
        self._staged: list[bytes] = []
        self._durable_seq = 0  # appends up to here are fsynced: only they are delivered
        self._delivered = self._dropped = self._rejected = self._refused = 0
        self._file_bytes = 0
        self._write_errors = 0
        self._last_write_error: str | None = None
        self._compactions = 0
        self._truncated = 0

    # --- opening and closing ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_events: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_event_bytes: int = 256 * 1024,
        compact_min_bytes: int = 4 * 1024 * 1024,
    ) -> Outbox:
        """Open (or create) the outbox in ``directory`` and replay its log. Blocking.

        Raises :class:`OutboxLockedError` if another Outbox holds the directory,
        ``OSError`` if the directory or file cannot be created or read.
        """
        path = Path(directory)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path / LOG_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutboxLockedError(f"outbox {path} is in use by another process") from None
            box = cls(
                path,
                fd,
                max_events=max_events,
                max_bytes=max_bytes,
                max_event_bytes=max_event_bytes,
                compact_min_bytes=compact_min_bytes,
            )
            box._replay()
        except BaseException:
            os.close(fd)
            raise
        return box

    def close(self) -> None:
        """Close the file (staged records not yet written are lost: write first)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _replay(self) -> None:
        fd = self._require_fd()
        data = read_all(fd)
        offset, header_seen = 0, False
        events: dict[int, OutboxEvent] = {}
        while offset < len(data):
            if len(data) - offset < _FRAME.size:
                break
            length, crc = _FRAME.unpack_from(data, offset)
            start, end = offset + _FRAME.size, offset + _FRAME.size + length
            if length > _MAX_RECORD or end > len(data):
                break
            body = data[start:end]
            if zlib.crc32(body) != crc:
                break
            try:
                record = _DECODER.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                break
            offset = end
            match record:
                case _Header():
                    header_seen = True
                    self.origin = record.origin
                    self._next_seq = max(self._next_seq, record.next_seq)
                    self._delivered = record.delivered
                    self._dropped = record.dropped
                    self._rejected = record.rejected
                    self._refused = record.refused
                case _Append():
                    events[record.seq] = OutboxEvent(
                        record.seq,
                        record.id,
                        record.kind,
                        Priority(max(0, min(2, record.priority))),
                        record.ts,
                        record.body,
                    )
                    self._next_seq = max(self._next_seq, record.seq + 1)
                case _Remove():
                    for seq in record.seqs:
                        if events.pop(seq, None) is not None:
                            self._delivered += 1
                case _Tally():
                    self._dropped += record.dropped
                    self._refused += record.refused
                case _Drop():
                    for seq in record.seqs:
                        if events.pop(seq, None) is not None:
                            if record.rejected:
                                self._rejected += 1
                            else:
                                self._dropped += 1
        if offset < len(data):
            # A torn or corrupt tail: keep what came before, cut the rest.
            self._truncated = len(data) - offset
            os.ftruncate(fd, offset)
            os.fsync(fd)
        self._file_bytes = offset
        self._durable_seq = self._next_seq - 1
        if not header_seen:
            if offset:  # records without a header: not ours; refuse to guess
                raise OSError(errno.EINVAL, f"{self.path}: not an outbox log (no header)")
            self.origin = os.urandom(8).hex()
            self._write_now(_frame(self._header()))
            fsync_dir(self.directory)
        for seq in sorted(events):
            self._insert(events[seq])
        # A smaller bound than the file was written with: evict down to it now.
        evicted = self._evict_for(Priority.HIGH, 0, extra_events=0)
        if evicted:
            self._stage_drop([e.seq for e in evicted], rejected=False)

    # --- in-memory operations (no I/O) -------------------------------------------------

    def append(
        self, kind: str, priority: Priority, body: bytes, ts: float
    ) -> tuple[OutboxEvent | None, list[OutboxEvent]]:
        """Add an event; returns ``(event or None if refused, events dropped to fit)``.

        ``body`` is the event's JSON without the outbox fields; the outbox wraps
        it as ``{"id":..., "seq":..., ...body}``. The event is refused (counted,
        None) when it alone exceeds ``max_event_bytes``, and dropped (counted, in
        the returned list) when only higher-priority events are there to evict.
        """
        seq = self._next_seq
        self._next_seq += 1
        event_id = f"{self.origin}-{seq}"
        wrapped = _wrap(event_id, seq, body)
        event = OutboxEvent(seq, event_id, kind, priority, ts, wrapped)
        if len(wrapped) > self.max_event_bytes or event.cost > self.max_bytes:
            self._refused += 1
            self._staged.append(_frame(_Tally(0, 1)))
            return None, []
        victims = self._evict_for(priority, event.cost, extra_events=1)
        if victims is None:
            self._dropped += 1
            self._staged.append(_frame(_Tally(1, 0)))
            return None, [event]
        if victims:
            self._stage_drop([v.seq for v in victims], rejected=False)
        self._insert(event)
        self._staged.append(
            _frame(_Append(seq, event_id, kind, int(priority), ts, wrapped))
        )
        return event, victims

    def batch(self, max_events: int, max_bytes: int) -> list[OutboxEvent]:
        """The oldest pending *durable* events in order: at most ``max_events``, and
        stopping before ``max_bytes`` of JSON (but at least one event).

        Only events whose append is fsynced are handed out: an event delivered
        before that could, after a crash, see its sequence number (and so its id)
        reused by a new event, which the receiver would then discard as a duplicate.
        """
        out: list[OutboxEvent] = []
        size = 0
        durable = self._durable_seq
        for event in self._events.values():
            if event.seq > durable:
                break
            if out and (len(out) >= max_events or size + len(event.body) > max_bytes):
                break
            out.append(event)
            size += len(event.body) + 1
        return out

    def mark_delivered(self, seqs: Iterable[int]) -> int:
        """The receiver acknowledged these; returns how many were still pending."""
        gone = [s for s in seqs if self._remove(s)]
        if gone:
            self._delivered += len(gone)
            self._staged.append(_frame(_Remove(gone)))
        return len(gone)

    def mark_rejected(self, seqs: Iterable[int]) -> int:
        """The receiver refused these for good (e.g. 400 on a single event)."""
        gone = [s for s in seqs if self._remove(s)]
        if gone:
            self._rejected += len(gone)
            self._staged.append(_frame(_Drop(gone, True)))
        return len(gone)

    def pending(self) -> list[OutboxEvent]:
        """Every event in the outbox, durable or not, in order."""
        return list(self._events.values())

    def __len__(self) -> int:
        return len(self._events)

    def __contains__(self, seq: object) -> bool:
        return seq in self._events

    @property
    def has_staged(self) -> bool:
        return bool(self._staged)

    def statistics(self, now: float) -> OutboxStatistics:
        """``now``: wall-clock seconds (for the oldest event's age)."""
        oldest = next(iter(self._events.values()), None)
        oldest_ts = None if oldest is None else oldest.ts
        return OutboxStatistics(
            pending=len(self._events),
            pending_bytes=self._bytes,
            by_priority={p.name.lower(): n for p, n in self._count_by_priority.items()},
            unsynced=len(self._staged),
            oldest_ts=oldest_ts,
            oldest_age=None if oldest_ts is None else max(0.0, now - oldest_ts),
            delivered_total=self._delivered,
            dropped_total=self._dropped,
            rejected_total=self._rejected,
            refused_total=self._refused,
            file_bytes=self._file_bytes,
            write_errors=self._write_errors,
            last_write_error=self._last_write_error,
            compactions=self._compactions,
            replay_truncated_bytes=self._truncated,
        )

    # --- group commit ----------------------------------------------------------------

    def take_staged(self) -> StagedWrite | None:
        """Hand the staged records to a writer (then call :meth:`write` with them)."""
        if not self._staged:
            return None
        staged = StagedWrite(b"".join(self._staged), len(self._staged), self._next_seq - 1)
        self._staged = []
        return staged

    def unstage(self, staged: StagedWrite) -> None:
        """A write failed: put its records back in front of anything staged since
        (the next :meth:`take_staged` covers their sequence numbers again)."""
        self._staged.insert(0, staged.data)

    def write(self, staged: StagedWrite) -> None:
        """Append and fsync (blocking; one worker thread at a time).

        On failure the file is cut back to where it was, the error is counted and
        re-raised; the caller :meth:`unstage`-s the records and tries again later.
        """
        fd = self._require_fd()
        start = self._file_bytes
        try:
            pwrite_all(fd, staged.data, start)
            os.fsync(fd)
        except OSError as exc:
            self._write_errors += 1
            code = errno.errorcode.get(exc.errno or 0, "?")
            self._last_write_error = f"{exc.strerror or exc} ({code})"
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
        self._file_bytes = start + len(staged.data)
        self._durable_seq = max(self._durable_seq, staged.max_seq)
        self._last_write_error = None

    def flush(self) -> None:
        """Write everything staged now (blocking). Used at close and in tests."""
        staged = self.take_staged()
        if staged is None:
            return
        try:
            self.write(staged)
        except OSError:
            self.unstage(staged)
            raise

    # --- compaction --------------------------------------------------------------------

    def needs_compaction(self) -> bool:
        live = self._bytes + 256
        return self._file_bytes > self.compact_min_bytes and self._file_bytes > 2 * live

    def plan_compaction(self) -> _CompactionPlan | None:
        """Snapshot what the compacted log must hold; None while records are staged."""
        if self._staged:
            return None
        return _CompactionPlan(self._header(), tuple(self._events.values()))

    def compact(self, plan: _CompactionPlan) -> None:
        """Rewrite the log from ``plan`` (blocking; the same worker thread rule as
        :meth:`write`). Crash-safe: the old log stays until the new one is durable."""
        fd = self._require_fd()
        tmp = self.directory / (LOG_NAME + ".compact")
        new_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(new_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            parts = [_frame(plan.header)]
            parts.extend(
                _frame(_Append(e.seq, e.id, e.kind, int(e.priority), e.ts, e.body))
                for e in plan.events
            )
            data = b"".join(parts)
            pwrite_all(new_fd, data, 0)
            os.fsync(new_fd)
            os.replace(tmp, self.path)
            fsync_dir(self.directory)
        except BaseException:
            os.close(new_fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self._fd = new_fd
        os.close(fd)
        self._file_bytes = len(data)
        self._compactions += 1

    # --- internals ---------------------------------------------------------------------

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, f"outbox {self.directory} is closed")
        return self._fd

    def _header(self) -> _Header:
        return _Header(
            _VERSION,
            self.origin,
            self._next_seq,
            self._delivered,
            self._dropped,
            self._rejected,
            self._refused,
        )

    def _write_now(self, data: bytes) -> None:
        self.write(StagedWrite(data, 1, self._durable_seq))

    def _insert(self, event: OutboxEvent) -> None:
        self._events[event.seq] = event
        self._by_priority[event.priority].append(event.seq)
        self._count_by_priority[event.priority] += 1
        self._bytes += event.cost

    def _remove(self, seq: int) -> bool:
        event = self._events.pop(seq, None)
        if event is None:
            return False
        self._count_by_priority[event.priority] -= 1
        self._bytes -= event.cost
        # Delivery and eviction both go oldest first, so the removed seq is almost
        # always at the head of its queue; anything left behind is skipped later.
        queue = self._by_priority[event.priority]
        while queue and queue[0] not in self._events:
            queue.popleft()
        return True

    def _evict_for(
        self, priority: Priority, cost: int, *, extra_events: int
    ) -> list[OutboxEvent] | None:
        """Evict until ``extra_events`` more of ``cost`` bytes fit; None if impossible.

        Decides first, evicts after: a newcomer that cannot fit evicts nobody.
        """
        count, size = len(self._events), self._bytes
        over_count = count + extra_events - self.max_events
        over_bytes = size + cost - self.max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return []
        victims: list[OutboxEvent] = []
        freed_count = freed_bytes = 0
        for p in Priority:
            if p > priority:
                break
            for seq in self._by_priority[p]:
                event = self._events.get(seq)
                if event is None:
                    continue
                victims.append(event)
                freed_count += 1
                freed_bytes += event.cost
                if freed_count >= over_count and freed_bytes >= over_bytes:
                    break
            if freed_count >= over_count and freed_bytes >= over_bytes:
                break
        if freed_count < over_count or freed_bytes < over_bytes:
            return None
        for victim in victims:
            self._remove(victim.seq)
        self._dropped += len(victims)
        return victims

    def _stage_drop(self, seqs: list[int], *, rejected: bool) -> None:
        if seqs:
            self._staged.append(_frame(_Drop(seqs, rejected)))


def _wrap(event_id: str, seq: int, body: bytes) -> bytes:
    """``{"id": ..., "seq": ..., <body's fields>}``: the id first, so a receiver's
    log line starts with what it deduplicates by."""
    head = msgspec.json.encode({"id": event_id, "seq": seq})
    inner = body.strip()
    if inner in (b"{}", b""):
        return head
    if not inner.startswith(b"{"):
        raise ValueError("event body must be a JSON object")
    return head[:-1] + b"," + inner[1:]


