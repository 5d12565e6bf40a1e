"""The outage journal: writes made while the database is down, durable and in order.

Theory of operation
-------------------
While the policy database is unavailable, every write (policy add/remove, and
the hit counts and threat records of decisions) is appended here and fsync'd
before the caller is told ``queued: true``. When the database is back the
service replays the entries in sequence order, then discards them.

*Exactly once.* Every entry carries an idempotency key (the client's, or one
generated here). The database stores the key of every applied entry in the
same transaction as the write itself (table ``applied_writes``), and replay
skips keys it finds there. So a crash at any point -- mid-replay, or after the
replay but before the journal was discarded -- re-applies nothing, and a
client re-sending a queued write with the same key does not queue it twice.

*Format.* JSON Lines, one entry per line, each prefixed by the CRC-32 of its
JSON as 8 hex digits: ``0a1b2c3d {"type":"add","seq":7,...}``. An append is a
single ``write()`` followed by ``fsync()``, so a crash can tear only the last
line; a torn or corrupt tail is cut off at load, a corrupt line in the middle
(a bit flip) is skipped and counted, never guessed at.

*Bounded.* The journal refuses appends past ``max_bytes``
(:class:`~sentinel_ipc.errors.JournalFullError`); decision records may only use
90 % of it, so a long outage with many detections cannot lock out the user's
own policy writes.

The class is thread-safe. Appends and rewrites block (fsync) and are called
from a worker thread; they hold an I/O lock. The in-memory view
(:meth:`Journal.pending`, :attr:`Journal.depth`) takes only a short state lock
that is never held across I/O, so the event loop may read it directly.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TypeVar

import msgspec

from sentinel_ipc.errors import JournalFullError, PolicyStoreError
from sentinel_ipc.fsutil import fsync_dir, read_all, write_all
from sentinel_ipc.policy.validation import PolicyDraft, ThreatDraft

log = logging.getLogger("sentinel.policy.journal")
T = TypeVar("T")

JOURNAL_FILENAME: Final = "policy_journal.jsonl"
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024
#: Share of ``max_bytes`` decision records may fill; the rest is kept for policy writes.
RECORD_SHARE: Final = 0.9


class _Op(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    seq: int = 0  # assigned by Journal.append
    key: str
    at: float  # wall-clock time of the original write


class AddPolicy(_Op, tag="add", frozen=True):
    policy: PolicyDraft


class RemovePolicy(_Op, tag="remove", frozen=True):
    policy_id: int


class RecordDecision(_Op, tag="record", frozen=True):
    """A decision's side effects: the hit on its policy and/or its threat row."""

    hit_policy_id: int | None = None
    threat: ThreatDraft | None = None
    #: The key of the queued ``AddPolicy`` that decided, when that policy had no
    #: database id yet; replay counts the hit on (and links the threat row to)
    #: the id the add was given.
    hit_policy_key: str | None = None


JournalOp = AddPolicy | RemovePolicy | RecordDecision

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[JournalOp] = msgspec.json.Decoder(JournalOp)


def new_key(prefix: str = "j") -> str:
    """A fresh idempotency key for a write that came without one."""
    return f"{prefix}:{uuid.uuid4().hex}"


def checked_line(body: bytes) -> bytes:
    """``body`` as one line that proves itself whole: the CRC-32 of the body in 8
    hex digits, a space, the body, a newline. (This journal's format, and the
    policy cache's delta log's.)"""
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def checked_body(line: bytes) -> bytes:
    """The body of a :func:`checked_line` (given without its newline); ValueError
    if the line is torn or damaged."""
    crc_hex, sep, body = line.partition(b" ")
    if not sep or len(crc_hex) != 8:
        raise ValueError("no checksum prefix")
    try:
        crc = int(crc_hex, 16)
    except ValueError:
        raise ValueError("no checksum prefix") from None
    if crc != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    return body


def encode_line(op: JournalOp) -> bytes:
    return checked_line(_encoder.encode(op))


def decode_checked(line: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """A :func:`checked_line` (without its newline) back to its record; ValueError
    if damaged (checksum or body). Shared by the journal and the snapshot's log."""
    try:
        return decoder.decode(checked_body(line))
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from exc


def decode_line(line: bytes) -> JournalOp:
    """One line (without its newline) back to an entry; ValueError if damaged."""
    return decode_checked(line, _decoder)


class JournalStatistics(msgspec.Struct, frozen=True, kw_only=True):
    depth: int
    size_bytes: int
    max_bytes: int
    next_seq: int
    corrupt_lines: int
    appended_total: int
    rejected_total: int


class Journal:
    """An append-only, fsync'd file of pending writes. Open with :meth:`open`."""

    def __init__(self, path: Path, fd: int, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fd = fd
        self._io_lock = threading.Lock()  # held across write + fsync
        self._lock = threading.Lock()  # the in-memory view; never held across I/O
        self._entries: list[JournalOp] = []
        self._size = 0
        self._next_seq = 1
        self._corrupt = 0
        self._appended = 0
        self._rejected = 0

    @classmethod
    def open(cls, path: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Journal:
        """Open (creating if needed) and load the pending entries.

        Raises OSError if the file cannot be opened or created (e.g. a read-only
        data directory with no journal yet).
        """
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if created:
                fsync_dir(path.parent, strict=False)
            journal = cls(path, fd, max_bytes)
            journal._load()
        except BaseException:
            os.close(fd)
            raise
        return journal

    def close(self) -> None:
        with self._io_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # --- reading ------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._entries)

    def pending(self, after_seq: int = 0) -> list[JournalOp]:
        """Entries with ``seq > after_seq``, oldest first."""
        with self._lock:
            if after_seq <= 0:
                return list(self._entries)
            return [e for e in self._entries if e.seq > after_seq]

    def pending_keys(self) -> set[str]:
        with self._lock:
            return {e.key for e in self._entries}

    def statistics(self) -> JournalStatistics:
        with self._lock:
            return JournalStatistics(
                depth=len(self._entries),
                size_bytes=self._size,
                max_bytes=self.max_bytes,
                next_seq=self._next_seq,
                corrupt_lines=self._corrupt,
                appended_total=self._appended,
                rejected_total=self._rejected,
            )

    # --- writing ------------------------------------------------------------

    def append(self, ops: Sequence[JournalOp]) -> list[JournalOp]:
        """Assign sequence numbers, write and fsync; return the entries as stored.

        All or nothing: on any failure the file is cut back to where it was and
        the error raised (:class:`JournalFullError` when over the bound,
        :class:`PolicyStoreError` when the disk refused).
        """
        with self._io_lock:
            if self._fd < 0:
                raise PolicyStoreError("the policy journal is closed", retryable=False)
            stored = [
                msgspec.structs.replace(op, seq=self._next_seq + i) for i, op in enumerate(ops)
            ]
            data = b"".join(encode_line(op) for op in stored)
            self._ensure_linked()
            only_records = all(isinstance(op, RecordDecision) for op in stored)
            limit = int(self.max_bytes * RECORD_SHARE) if only_records else self.max_bytes
            if self._size + len(data) > limit:
                self._rejected += len(stored)
                raise JournalFullError(
                    f"the policy journal is full ({self._size} of {limit} bytes); "
                    "the write was not accepted"
                )
            try:
                write_all(self._fd, data)
                os.fsync(self._fd)
            except OSError as exc:
                self._cut_back(self._size)
                raise PolicyStoreError(
                    f"cannot write the policy journal {self.path}: {exc.strerror or exc}",
                    retryable=True,
                ) from exc
            with self._lock:
                self._size += len(data)
                self._entries.extend(stored)
                self._next_seq += len(stored)
                self._appended += len(stored)
            return stored

    def discard_through(self, seq: int) -> None:
        """Drop the entries with ``seq <= seq`` (they are in the database now)."""
        with self._io_lock:
            keep = [e for e in self.pending() if e.seq > seq]
            if len(keep) == self.depth and self._corrupt == 0:
                return
            if not keep:
                os.ftruncate(self._fd, 0)
                os.fsync(self._fd)
                size = 0
            else:
                size = self._rewrite(keep)
            with self._lock:
                self._entries = keep
                self._size = size
                self._corrupt = 0

    # --- internals ----------------------------------------------------------

    def _load(self) -> None:
        data = read_all(self._fd)
        entries: list[JournalOp] = []
        good_end = 0
        pos = 0
        last_seq = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl == -1 else nl
            line = data[pos:end]
            try:
                if nl == -1:
                    raise ValueError("torn line at the end")
                op = decode_line(line)
                if op.seq <= last_seq:
                    raise ValueError(f"sequence {op.seq} after {last_seq}")
            except ValueError as exc:
                self._corrupt += 1
                log.warning(
                    "policy journal %s: skipping damaged entry at byte %d: %s", self.path, pos, exc
                )
            else:
                entries.append(op)
                last_seq = op.seq
                good_end = end + 1
            pos = end + 1
        if good_end < len(data):
            # Only damage after the last good line: a torn append. Cut it off so
            # the next append starts on a clean line (damage before it stays
            # until the next rewrite; the loader skips it).
            self._cut_back(good_end)
            data = data[:good_end]
        self._entries = entries
        self._size = len(data)
        self._next_seq = last_seq + 1

    def _ensure_linked(self) -> None:
        """Appending to a journal file that was deleted (or replaced) would write to a
        file nobody will read at the next start: recreate it at its path first,
        with the entries still pending, or refuse."""
        try:
            here = os.stat(self.path)
            mine = os.fstat(self._fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                return
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise PolicyStoreError(
                f"cannot check the policy journal {self.path}: {exc.strerror or exc}"
            ) from exc
        log.error("policy journal %s was deleted or replaced; recreating it", self.path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            size = self._rewrite(self.pending())
        except OSError as exc:
            raise PolicyStoreError(
                f"the policy journal {self.path} is gone and cannot be recreated: "
                f"{exc.strerror or exc}; the write was not accepted"
            ) from exc
        with self._lock:
            self._size = size

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError as exc:  # nothing better to do; the loader skips damage
            log.error("policy journal %s: cannot truncate to %d: %s", self.path, size, exc)

    def _rewrite(self, keep: list[JournalOp]) -> int:
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = b"".join(encode_line(op) for op in keep)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent, strict=False)
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = new_fd
        return len(data)


