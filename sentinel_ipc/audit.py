"""The audit log: one JSON line per security-relevant event, never blocking the loop.

What goes in: policy changes, detections, quarantines, rule reloads, breaker
transitions, degraded-mode changes, refused requests, database repairs. Each
line is a JSON object ``{"ts": <unix time>, "kind": "...", ...fields}``.

Theory of operation
-------------------
:meth:`AuditLog.record` only puts the event on a bounded queue and returns; a
writer thread formats, writes and rotates. When the queue is full (the disk
is slow or failing) the event is *counted* as dropped instead of blocking the
caller, and the writer reports the count in an ``audit_dropped`` line as soon
as it can write again: losing an audit line is bad, freezing the daemon that
protects downloads is worse, and the gap is never silent.

Rotation is by size, like ``logging.handlers.RotatingFileHandler``: when the
next line would take the file past ``max_bytes``, ``audit.jsonl`` becomes
``audit.jsonl.1`` (``.1`` becomes ``.2`` ... up to ``backups``; the oldest is
deleted) and a new file is started. Lines are flushed per batch and fsync'd
at rotation and close; the writer survives write errors (counted, retried
with the next batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

log = logging.getLogger("sentinel.audit")

DEFAULT_MAX_BYTES: Final = 100 * 1024 * 1024
DEFAULT_BACKUPS: Final = 10
DEFAULT_QUEUE_SIZE: Final = 10_000
AUDIT_FILENAME: Final = "audit.jsonl"

_STOP: Final = object()


def _default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    return str(obj)


_encoder = msgspec.json.Encoder(enc_hook=_default)


class AuditStatistics(msgspec.Struct, frozen=True, kw_only=True):
    written: int
    dropped: int
    errors: int
    rotations: int
    queued: int
    path: str


class AuditLog:
    """Create with :func:`open_audit_log`."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError("audit max_bytes must be at least 1024")
        if backups < 0:
            raise ValueError("audit backups must be >= 0")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._clock = clock
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._dropped = 0  # since the last audit_dropped line
        self._dropped_total = 0
        self._written = 0
        self._errors = 0
        self._rotations = 0
        self._file: Any = None
        self._size = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sentinel-audit", daemon=True)

    # --- the caller's side (any thread, never blocks) ----------------------------

    def record(self, kind: str, **fields: Any) -> bool:
        """Queue one event; False (and counted) if it had to be dropped."""
        event = {"ts": round(self._clock(), 6), "kind": kind, **fields}
        if self._closed:
            self._count_drop()
            return False
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count_drop()
            return False
        return True

    def statistics(self) -> AuditStatistics:
        with self._lock:
            return AuditStatistics(
                written=self._written,
                dropped=self._dropped_total,
                errors=self._errors,
                rotations=self._rotations,
                queued=self._queue.qsize(),
                path=str(self.path),
            )

    def _count_drop(self) -> None:
        with self._lock:
            self._dropped += 1
            self._dropped_total += 1

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Blocking: stop accepting, write what is queued, fsync, close."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                self._queue.put(_STOP, timeout=timeout)
                break
            except queue.Full:  # writer wedged: give up on the backlog
                log.error("audit log: writer is not draining; closing anyway")
                return
        self._thread.join(timeout)

    # --- the writer thread -------------------------------------------------

    def _open(self) -> None:
        # Created 0600 at once (not chmod'ed after): a reader who opened it in
        # between would keep reading every later line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "ab", buffering=0)
        os.fchmod(fd, 0o600)  # an existing file left wider
        self._size = self._file.tell()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < 512:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [e for e in batch if e is not _STOP]
            try:
                self._write_batch(batch)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("audit log: unexpected error; %d events lost", len(batch))
                with self._lock:
                    self._errors += 1
                    self._dropped += len(batch)
                    self._dropped_total += len(batch)
        self._sync_and_close()

    def _write_batch(self, batch: list[object]) -> None:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        lines = []
        if dropped:
            lines.append(
                _encoder.encode(
                    {"ts": round(self._clock(), 6), "kind": "audit_dropped", "count": dropped}
                )
            )
        lines.extend(self._encode(e) for e in batch)
        written = 0
        try:
            if self._file is None:
                self._open()
            for line in lines:
                data = line + b"\n"
                if self._size and self._size + len(data) > self.max_bytes:
                    self._rotate()
                self._file.write(data)
                self._size += len(data)
                written += 1
        except (OSError, ValueError) as exc:  # ValueError: the file object was closed
            with self._lock:
                self._errors += 1
                lost = len(lines) - written
                self._dropped += lost
                self._dropped_total += lost
            log.error("audit log %s: write failed: %s", self.path, exc)
            self._close_file()
        with self._lock:
            self._written += written

    def _encode(self, event: object) -> bytes:
        try:
            return _encoder.encode(event)
        except (TypeError, ValueError, OverflowError) as exc:
            kind = event.get("kind") if isinstance(event, dict) else None
            return _encoder.encode(
                {"kind": "audit_unencodable", "of": str(kind), "error": str(exc)}
            )

    def _rotate(self) -> None:
        self._sync_and_close()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._open()
        with self._lock:
            self._rotations += 1

    def _sync_and_close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._file.fileno())
            self._close_file()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            with contextlib.suppress(OSError):
                f.close()


@contextlib.asynccontextmanager
async def open_audit_log(
    path: str | os.PathLike[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    *,
    queue_size: int = DEFAULT_QUEUE_SIZE,
) -> AsyncIterator[AuditLog]:
    """Open (creating the directory and file) and close with everything written."""
    audit = AuditLog(Path(path), max_bytes=max_bytes, backups=backups, queue_size=queue_size)
    await trio.to_thread.run_sync(audit.start)
    try:
        yield audit
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(audit.close)
