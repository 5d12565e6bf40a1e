"""The outbox: writes that must not be lost while the daemon is unreachable.

Theory of operation
-------------------
Non-idempotent operations (policy writes, user decisions) are *submitted* to a
bounded FIFO and delivered one at a time, in submission order, by a single
task of the client. Each carries an idempotency key (a random UUID unless the
caller set one), so re-sending it after a connection loss is safe: the daemon
applies each key at most once. A delivery attempt that fails with a retryable
error (connection lost, breaker open, ``busy``) keeps the operation at the
head of the queue and tries again after a backoff from the ipc retry policy
(or the breaker's ``retry_after``); a non-retryable error (the daemon refused
the write: ``policy_invalid``, ``forbidden``...) settles its ticket with that
error and moves on. Nothing retryable is ever dropped.

A :class:`OutboxTicket` is what the caller holds: ``await ticket.wait()`` for
the daemon's reply, or drop it (fire and forget).

Persistence (optional, :class:`OutboxJournal`): an append-only file of
records, each ``length (4 bytes) | crc32 (4 bytes) | msgpack``, written and
fsync'ed before ``submit`` returns: a ``put`` per submitted operation and a
``done`` once it is settled. Loading replays the file; a torn or corrupt tail
(a crash mid-append) is cut off, and the damaged file is kept beside it for
inspection. When settled records outnumber pending ones the file is compacted:
the pending ``put``s go to a temporary file, which is fsync'ed and renamed over
the journal (then the directory is fsync'ed), so a crash leaves either the old
or the new file, never a mix. A lock file (``flock``) keeps two clients from
sharing one journal. Taking it runs under the SPEC's ``file`` retry policy
(EAGAIN: 3 attempts, 0.2 s then 0.4 s): a program restarted while its old
process is still exiting finds the lock held for a moment, and should wait
for it rather than start without its journal.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import random
import struct
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal

import msgspec
import trio

from ..codec import DecodeFailure, decode_request, encode
from ..errors import CircuitOpenError, RetryExhaustedError, SentinelError
from ..logs import log_event
from ..messages import Reply, type_tag
from ..resilience import RETRY_PRESETS, RetryPolicy, guarded_call_sync
from .errors import OutboxError, OutboxFullError

_RECORD_HEADER = struct.Struct(">II")
#: Compact once this many settled records sit in the file (and outnumber pending ones).
COMPACT_AFTER = 64


class _Record(msgspec.Struct, array_like=True):
    kind: Literal["put", "done"]
    key: str
    payload: bytes = b""
    at: float = 0.0


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(_Record)


def _frame(record: _Record) -> bytes:
    body = _record_encoder.encode(record)
    return _RECORD_HEADER.pack(len(body), zlib.crc32(body)) + body


class OutboxJournal:
    """The outbox file: blocking I/O, meant to run in a worker thread.

    Raises :class:`OutboxError` when the file is locked by another client or
    cannot be opened.
    """

    def __init__(
        self,
        path: Path,
        *,
        sleep: Callable[[float], object] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``sleep`` and ``clock`` drive the lock's retry backoff (tests inject them)."""
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutboxError(
                f"cannot open the outbox lock {self.lock_path}: {exc.strerror}"
            ) from exc
        try:
            guarded_call_sync(
                fcntl.flock, self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB,
                retry=RETRY_PRESETS["file"], operation="outbox_lock", sleep=sleep, clock=clock,
            )
        except (OSError, RetryExhaustedError) as exc:
            os.close(self._lock_fd)
            raise OutboxError(
                f"the outbox {path} is in use by another client (lock {self.lock_path})"
            ) from exc
        self._fd = -1
        self.records = 0  # records in the file
        self.settled = 0  # of which `done`s and the `put`s they settle

    def load(self) -> list[tuple[str, bytes, float]]:
        """The pending operations, oldest first: (key, encoded request, enqueued at)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise OutboxError(f"cannot read the outbox {self.path}: {exc.strerror}") from exc
        pending: dict[str, tuple[bytes, float]] = {}
        offset = records = 0
        while offset < len(data):
            if len(data) - offset < _RECORD_HEADER.size:
                break
            length, crc = _RECORD_HEADER.unpack_from(data, offset)
            body = data[offset + _RECORD_HEADER.size : offset + _RECORD_HEADER.size + length]
            if len(body) < length or zlib.crc32(body) != crc:
                break
            try:
                record = _record_decoder.decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                break
            if record.kind == "put":
                pending[record.key] = (record.payload, record.at)
            else:
                pending.pop(record.key, None)
            records += 1
            offset += _RECORD_HEADER.size + length
        if offset < len(data):
            self._keep_damaged(data, offset)
        self._open_for_append(truncate_at=offset)
        self.records = records
        self.settled = records - len(pending)
        return [(key, payload, at) for key, (payload, at) in pending.items()]

    def _keep_damaged(self, data: bytes, offset: int) -> None:
        backup = self.path.with_name(f"{self.path.name}.damaged-{int(time.time())}")
        with contextlib.suppress(OSError):
            backup.write_bytes(data)
        log_event(
            "outbox_tail_discarded",
            logging.WARNING,
            path=str(self.path),
            kept_bytes=offset,
            discarded_bytes=len(data) - offset,
            backup=str(backup),
        )

    def _open_for_append(self, truncate_at: int | None = None) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if truncate_at is not None and os.fstat(fd).st_size != truncate_at:
                os.ftruncate(fd, truncate_at)
                os.fsync(fd)
        except OSError as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc.strerror}") from exc
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd

    def append(self, record: _Record) -> None:
        """Write one record and fsync it; raises :class:`OutboxError`."""
        data = _frame(record)
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except OSError as exc:
            raise OutboxError(f"cannot write the outbox {self.path}: {exc.strerror}") from exc
        self.records += 1
        if record.kind == "done":
            self.settled += 2

    def needs_compaction(self) -> bool:
        return self.settled >= COMPACT_AFTER and self.settled > self.records - self.settled

    def compact(self, pending: list[_Record]) -> None:
        """Rewrite the file with only ``pending`` (atomic: temp + fsync + rename)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for record in pending:
                    f.write(_frame(record))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise OutboxError(f"cannot compact the outbox {self.path}: {exc.strerror}") from exc
        self._open_for_append()
        self.records = len(pending)
        self.settled = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1


class OutboxTicket:
    """One queued operation. ``await ticket.wait()`` returns the daemon's reply
    or raises its typed error (or :class:`OutboxError` if the client closed
    before delivery)."""

    def __init__(self, key: str, request: msgspec.Struct, enqueued_at: float) -> None:
        self.key = key
        self.request = request
        self.enqueued_at = enqueued_at
        self.attempts = 0
        self.last_error: SentinelError | None = None
        self.reply: Reply | None = None
        self.error: SentinelError | None = None
        self._settled = trio.Event()

    @property
    def kind(self) -> str:
        return type_tag(type(self.request))

    @property
    def done(self) -> bool:
        return self._settled.is_set()

    async def wait(self) -> Reply:
        await self._settled.wait()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply

    def _settle(self, reply: Reply | None, error: SentinelError | None) -> None:
        if self._settled.is_set():
            return
        self.reply = reply
        self.error = error
        self._settled.set()

    def __repr__(self) -> str:
        state = "done" if self.done else f"pending, {self.attempts} attempts"
        return f"<OutboxTicket {self.kind} key={self.key} {state}>"


Deliver = Callable[[msgspec.Struct], Awaitable[Reply]]


class Outbox:
    """Bounded, ordered, optionally persistent queue of writes; see the module doc."""

    def __init__(self, *, max_items: int, journal: OutboxJournal | None = None) -> None:
        self.max_items = max_items
        self.journal = journal
        self._queue: collections.deque[OutboxTicket] = collections.deque()
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._empty = trio.Event()
        self._empty.set()
        self.delivered = 0
        self.rejected = 0
        self._closed = False

    @classmethod
    async def open(cls, *, max_items: int, path: Path | None = None) -> Outbox:
        """An outbox, reloaded from ``path`` when given. Raises :class:`OutboxError`."""
        if path is None:
            return cls(max_items=max_items)
        journal = await trio.to_thread.run_sync(OutboxJournal, path)
        try:
            loaded = await trio.to_thread.run_sync(journal.load)
        except BaseException:
            journal.close()
            raise
        outbox = cls(max_items=max(max_items, len(loaded)), journal=journal)
        for key, payload, at in loaded:
            try:
                request = decode_request(payload)
            except DecodeFailure as exc:
                log_event("outbox_record_unreadable", logging.WARNING, key=key,
                          error=exc.error.message)
                continue
            outbox._queue.append(OutboxTicket(key, request, at))
        if outbox._queue:
            outbox._empty = trio.Event()
            outbox._wake.set()
            log_event("outbox_reloaded", logging.INFO, path=str(path), pending=len(outbox._queue))
        return outbox

    def __len__(self) -> int:
        return len(self._queue)

    def pending(self) -> list[OutboxTicket]:
        """The undelivered operations, in delivery order."""
        return list(self._queue)

    async def submit(self, request: msgspec.Struct) -> OutboxTicket:
        """Queue ``request`` (persisted before this returns, if there is a file).

        Sets its ``idempotency_key`` when it has that field and none was given.
        Raises :class:`OutboxFullError` (retryable) when the outbox is full and
        :class:`OutboxError` when the file cannot be written.
        """
        key = getattr(request, "idempotency_key", None)
        if key is None:
            key = uuid.uuid4().hex
            if "idempotency_key" in request.__struct_fields__:
                request.idempotency_key = key  # type: ignore[attr-defined]
        async with self._lock:
            if len(self._queue) >= self.max_items:
                raise OutboxFullError(
                    f"the outbox holds {len(self._queue)} undelivered operations "
                    f"(limit {self.max_items}); the daemon has been unreachable too long",
                    retry_after=1.0,
                )
            at = time.time()
            if self.journal is not None:
                record = _Record("put", key, encode(request), at)
                await trio.to_thread.run_sync(self.journal.append, record)
            ticket = OutboxTicket(key, request, at)
            self._queue.append(ticket)
            self._empty = trio.Event() if self._empty.is_set() else self._empty
            self._wake.set()
        return ticket

    async def join(self) -> None:
        """Wait until every operation queued so far is settled."""
        await self._empty.wait()

    async def run(self, deliver: Deliver, *, backoff: RetryPolicy, rng: random.Random) -> None:
        """Deliver forever, in order (the client runs this as one task)."""
        failures = 0
        while True:
            if not self._queue:
                self._empty.set()
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            ticket = self._queue[0]
            ticket.attempts += 1
            try:
                reply = await deliver(ticket.request)
            except CircuitOpenError as exc:
                ticket.last_error = exc
                wait = exc.retry_after if exc.retry_after is not None else backoff.max_delay
            except SentinelError as exc:
                if not exc.retryable:
                    self.rejected += 1
                    await self._settle(ticket, None, exc)
                    failures = 0
                    continue
                ticket.last_error = exc
                failures += 1
                wait = backoff.delay(min(failures, 64), rng)
                if exc.retry_after is not None:
                    wait = max(wait, min(exc.retry_after, 60.0))
            else:
                self.delivered += 1
                await self._settle(ticket, reply, None)
                failures = 0
                continue
            log_event(
                "outbox_delivery_deferred",
                logging.INFO,
                key=ticket.key,
                kind=ticket.kind,
                attempts=ticket.attempts,
                wait=round(wait, 3),
                error=ticket.last_error.message if ticket.last_error else "",
            )
            await trio.sleep(max(wait, 0.001))

    async def _settle(
        self, ticket: OutboxTicket, reply: Reply | None, error: SentinelError | None
    ) -> None:
        async with self._lock:
            journal = self.journal
            if journal is not None:
                await trio.to_thread.run_sync(journal.append, _Record("done", ticket.key))
            popped = self._queue.popleft()
            assert popped is ticket
            if journal is not None and journal.needs_compaction():
                pending = [_Record("put", t.key, encode(t.request), t.enqueued_at)
                           for t in self._queue]
                await trio.to_thread.run_sync(journal.compact, pending)
        ticket._settle(reply, error)

    def close(self) -> None:
        """Fail the waiters of what is still queued (it stays in the file, if any)."""
        if self._closed:
            return
        self._closed = True
        where = (
            f"it stays in {self.journal.path} for the next client"
            if self.journal is not None
            else "it is lost (the outbox has no file)"
        )
        for ticket in self._queue:
            ticket._settle(
                None, OutboxError(f"the client closed before {ticket.kind} was delivered; {where}")
            )
        if self._queue and self.journal is None:
            log_event("outbox_dropped_on_close", logging.WARNING, pending=len(self._queue))
        if self.journal is not None:
            self.journal.close()


__all__ = ["COMPACT_AFTER", "Outbox", "OutboxJournal", "OutboxTicket"]
