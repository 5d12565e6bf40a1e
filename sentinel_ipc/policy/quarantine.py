"""Quarantine: the bytes of a file whose verdict is ``quarantine``, kept aside.

Layout: ``<data dir>/quarantine/`` (mode 0700) holds, per item, the bytes as
``<id>.bin`` (mode 0400) and a JSON sidecar ``<id>.json`` (url, filename,
sha256, size, rules, time). The id is 32 hex digits and is the only thing a
client names, so no request can reach a path outside the directory.

Both files are written to a temporary name, fsync'd and renamed, the sidecar
last: an item is listed only once both are complete, and leftovers of a crash
(temporary files, bytes without a sidecar) are cleared at the next start.
The bytes are hashed while they are copied, in and out: a file that changed
after it was scanned is refused, and a quarantined file that was altered on
disk is never restored silently. The same sha256 is kept once.

The directory is bounded (``max_bytes``, ``max_items``): which files are
quarantined depends on policies keyed on things a client chooses (a URL
pattern, a MIME type), so without a bound any peer could fill the disk
through it. A store that would pass a bound is refused
(:class:`QuarantineFullError`): the verdict stands, and the scan result says
the copy was not kept. The totals and a sha256 index live in memory, built
from the sidecars at the first store, so a store no longer reads every
sidecar.

Every method is async and does its file I/O on a worker thread; the index is
shared by those threads under a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec
import trio

from sentinel_ipc.audit import AuditLog
from sentinel_ipc.errors import ErrorCode, NotFoundError, ScanError, SentinelError
from sentinel_ipc.fsutil import fsync_dir, write_all
from sentinel_ipc.messages import QuarantineItem

log = logging.getLogger("sentinel.quarantine")

_ID = re.compile(r"[0-9a-f]{32}")
_CHUNK: Final = 1 << 20
#: Bounds of the quarantine directory (``[policy] quarantine_max_bytes`` / ``_items``).
DEFAULT_MAX_BYTES: Final = 2 << 30
DEFAULT_MAX_ITEMS: Final = 10_000
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(QuarantineItem)


class QuarantineError(SentinelError):
    """The quarantine directory refused a store, restore or delete (for a restore:
    the destination exists, is a symlink, or cannot be created)."""

    code = ErrorCode.QUARANTINE_FAILED


class QuarantineFullError(QuarantineError):
    """A store would pass the quarantine's size or item bound."""


_List = list  # Quarantine has a method named ``list``


class Quarantine:
    """The quarantine directory. The constructor creates it (0700) and clears
    leftovers of an interrupted store; that is quick and done once at startup."""

    def __init__(
        self,
        directory: Path,
        *,
        audit: AuditLog | None = None,
        wall_clock: Callable[[], float] = time.time,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        if max_bytes < 0 or max_items < 0:
            raise ValueError("quarantine bounds must not be negative")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_items = max_items
        self._audit = audit
        self._wall = wall_clock
        self._lock = threading.Lock()
        #: sha256 -> (id, size) of the complete items; None until the first store.
        self._index: dict[str, tuple[str, int]] | None = None
        self._used_bytes = 0  # complete items plus stores in progress
        self._used_items = 0
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(self.directory.stat().st_mode) != 0o700:
            os.chmod(self.directory, 0o700)
        self._clean_leftovers()

    # --- public, async --------------------------------------------------------

    async def store(
        self,
        data: bytes | int,
        *,
        sha256: str,
        url: str | None = None,
        filename: str | None = None,
        rules: _List[str] | None = None,
        size: int | None = None,
    ) -> QuarantineItem:
        """Keep ``data`` (bytes, or a readable file descriptor, read from offset 0
        without moving its position) aside. Returns the item (the existing one
        if this sha256 is already quarantined). ``size`` bounds what is read
        from a descriptor: the bytes that were scanned, when the file holds more.

        Raises ScanError if the bytes do not hash to ``sha256`` (changed since
        the scan), QuarantineError if the directory refuses.
        """
        item = await trio.to_thread.run_sync(
            self._store_sync, data, sha256.lower(), url, filename, [*(rules or [])], size
        )
        self._record("quarantine", item)
        return item

    async def list(self) -> _List[QuarantineItem]:
        """Every complete item, oldest first."""
        return await trio.to_thread.run_sync(self._list_sync)

    async def list_page(
        self, after: str | None, limit: int
    ) -> tuple[_List[QuarantineItem], bool]:
        """At most ``limit`` items whose id sorts after ``after`` (None: from the
        start), in ascending id order, and whether more follow. Reads only the
        sidecars of the page, so paging through n items reads each once (the
        directory listing itself is names only)."""
        return await trio.to_thread.run_sync(self._list_page_sync, after, limit)

    async def get(self, quarantine_id: str) -> QuarantineItem:
        return await trio.to_thread.run_sync(self._read_item, quarantine_id)

    async def restore(self, quarantine_id: str, dest_fd: int) -> int:
        """Write the bytes to ``dest_fd`` (at its current position); return the size.
        The item stays quarantined (delete it separately). Raises NotFoundError,
        QuarantineError (the stored bytes no longer match their sha256)."""
        item = await self.get(quarantine_id)
        n = await trio.to_thread.run_sync(self._copy_out, item, dest_fd)
        self._record("quarantine_restore", item, dest="fd")
        return n

    async def restore_to_path(self, quarantine_id: str, path: Path) -> int:
        """Restore into a new file (mode 0600; never overwrites, never follows a symlink)."""
        item = await self.get(quarantine_id)

        def run() -> int:
            try:
                fd = os.open(
                    path,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                )
            except OSError as exc:
                raise QuarantineError(
                    f"cannot create {path}: {exc.strerror or exc}", retryable=False
                ) from exc
            try:
                n = self._copy_out(item, fd)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(fd)
            return n

        n = await trio.to_thread.run_sync(run)
        self._record("quarantine_restore", item, dest=str(path))
        return n

    async def delete(self, quarantine_id: str) -> None:
        """Remove an item for good. Raises NotFoundError."""
        item = await self.get(quarantine_id)
        await trio.to_thread.run_sync(self._delete_sync, item)
        self._record("quarantine_delete", item)

    # --- blocking internals ---------------------------------------------------

    def _paths(self, qid: str) -> tuple[Path, Path]:
        if not isinstance(qid, str) or not _ID.fullmatch(qid):
            raise NotFoundError(f"no quarantined item {qid!r} (ids are 32 hex digits)")
        return self.directory / f"{qid}.bin", self.directory / f"{qid}.json"

    def _read_item(self, qid: str) -> QuarantineItem:
        _, meta = self._paths(qid)
        try:
            return _decoder.decode(meta.read_bytes())
        except FileNotFoundError:
            raise NotFoundError(f"no quarantined item {qid!r}") from None
        except (OSError, msgspec.DecodeError) as exc:
            raise QuarantineError(f"quarantine item {qid}: unreadable sidecar: {exc}") from exc

    def _list_sync(self) -> _List[QuarantineItem]:
        items = []
        for entry in os.scandir(self.directory):
            name = entry.name
            if name.endswith(".json") and _ID.fullmatch(name[:-5]):
                try:
                    items.append(self._read_item(name[:-5]))
                except SentinelError as exc:
                    log.warning("%s", exc)
        items.sort(key=lambda i: (i.quarantined_at, i.quarantine_id))
        return items

    def _list_page_sync(
        self, after: str | None, limit: int
    ) -> tuple[_List[QuarantineItem], bool]:
        ids = sorted(
            name[:-5]
            for name in os.listdir(self.directory)
            if name.endswith(".json") and _ID.fullmatch(name[:-5])
            and (after is None or name[:-5] > after)
        )
        items: _List[QuarantineItem] = []
        for qid in ids:
            if len(items) == limit:
                return items, True
            try:
                items.append(self._read_item(qid))
            except NotFoundError:
                pass  # deleted since the listing: not part of the list any more
            except SentinelError as exc:
                log.warning("%s", exc)
        return items, False

    def _store_sync(
        self,
        data: bytes | int,
        sha256: str,
        url: str | None,
        filename: str | None,
        rules: _List[str],
        size_limit: int | None = None,
    ) -> QuarantineItem:
        want = _size_of(data, size_limit)
        with self._lock:
            index = self._loaded_index()
            hit = index.get(sha256)
            if hit is not None and (self.directory / f"{hit[0]}.bin").exists():
                return self._read_item(hit[0])
            if hit is not None:  # removed behind our back: count afresh
                self._index = None
                self._loaded_index()
            if self._used_items + 1 > self.max_items or self._used_bytes + want > self.max_bytes:
                raise QuarantineFullError(
                    f"the quarantine is full ({self._used_items} items, {self._used_bytes} "
                    f"bytes; bounds {self.max_items} items, {self.max_bytes} bytes): "
                    f"{want} more bytes not kept",
                    retryable=False,
                )
            self._used_bytes += want
            self._used_items += 1
        try:
            item = self._write_item(data, sha256, url, filename, rules, size_limit)
        except BaseException:
            with self._lock:
                self._used_bytes -= want
                self._used_items -= 1
            raise
        with self._lock:
            self._used_bytes += item.size - want
            if self._index is not None:  # (rebuilt meanwhile: the current one)
                self._index[sha256] = (item.quarantine_id, item.size)
        return item

    def _loaded_index(self) -> dict[str, tuple[str, int]]:
        """The sha256 index and totals, read from the sidecars once (under the lock)."""
        if self._index is None:
            index: dict[str, tuple[str, int]] = {}
            used = 0
            items = self._list_sync()
            for item in items:
                index.setdefault(item.sha256, (item.quarantine_id, item.size))
                used += item.size
            self._index, self._used_bytes, self._used_items = index, used, len(items)
        return self._index

    def _write_item(
        self,
        data: bytes | int,
        sha256: str,
        url: str | None,
        filename: str | None,
        rules: _List[str],
        size_limit: int | None,
    ) -> QuarantineItem:
        qid = uuid.uuid4().hex
        blob, meta = self._paths(qid)
        tmp_blob = self.directory / f".{qid}.bin.tmp"
        tmp_meta = self.directory / f".{qid}.json.tmp"
        try:
            fd = os.open(tmp_blob, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                digest = hashlib.sha256()
                size = 0
                for chunk in _chunks(data, size_limit):
                    digest.update(chunk)
                    write_all(fd, chunk)
                    size += len(chunk)
                if digest.hexdigest() != sha256:
                    raise ScanError(
                        f"the file changed after it was scanned (sha256 {digest.hexdigest()} "
                        f"!= {sha256}); not quarantined",
                        retryable=False,
                    )
                os.fchmod(fd, 0o400)
                os.fsync(fd)
            finally:
                os.close(fd)
            item = QuarantineItem(
                quarantine_id=qid,
                sha256=sha256,
                size=size,
                url=url,
                filename=filename,
                rules=rules,
                quarantined_at=self._wall(),
            )
            os.replace(tmp_blob, blob)
            fd = os.open(tmp_meta, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
            try:
                write_all(fd, _encoder.encode(item))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp_meta, meta)
            fsync_dir(self.directory)
        except OSError as exc:
            for p in (tmp_blob, tmp_meta, blob):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise QuarantineError(
                f"cannot quarantine into {self.directory}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            for p in (tmp_blob, tmp_meta, blob):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise
        return item

    def _copy_out(self, item: QuarantineItem, dest_fd: int) -> int:
        blob, _ = self._paths(item.quarantine_id)
        digest = hashlib.sha256()
        n = 0
        try:
            with open(blob, "rb", buffering=0) as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    write_all(dest_fd, chunk)
                    n += len(chunk)
        except FileNotFoundError:
            raise NotFoundError(f"quarantined bytes of {item.quarantine_id} are missing") from None
        except OSError as exc:
            raise QuarantineError(f"restore failed: {exc.strerror or exc}") from exc
        if digest.hexdigest() != item.sha256 or n != item.size:
            raise QuarantineError(
                f"quarantined file {item.quarantine_id} was altered on disk "
                f"(sha256 {digest.hexdigest()}, expected {item.sha256}); restore refused",
                retryable=False,
            )
        return n

    def _delete_sync(self, item: QuarantineItem) -> None:
        blob, meta = self._paths(item.quarantine_id)
        meta.unlink(missing_ok=True)  # first: the item disappears from list() at once
        blob.unlink(missing_ok=True)
        fsync_dir(self.directory)
        with self._lock:
            if self._index is not None:
                if self._index.get(item.sha256, ("",))[0] == item.quarantine_id:
                    del self._index[item.sha256]
                self._used_bytes -= item.size
                self._used_items -= 1

    def _clean_leftovers(self) -> None:
        names = set(os.listdir(self.directory))
        for name in names:
            stale = name.startswith(".") and name.endswith(".tmp")
            orphan = name.endswith(".bin") and f"{name[:-4]}.json" not in names
            if stale or orphan:
                with contextlib.suppress(OSError):
                    os.unlink(self.directory / name)
                log.warning("quarantine: removed leftover %s", name)

    def _record(self, kind: str, item: QuarantineItem, **extra: object) -> None:
        if self._audit is not None:
            self._audit.record(
                kind,
                quarantine_id=item.quarantine_id,
                sha256=item.sha256,
                size=item.size,
                url=item.url,
                filename=item.filename,
                rules=item.rules,
                **extra,
            )


def _size_of(data: bytes | int, limit: int | None) -> int:
    """How many bytes a store of ``data`` (bytes or a descriptor) will write, at most."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        size = memoryview(data).nbytes
    elif limit is not None:
        return limit
    else:
        try:
            size = os.fstat(data).st_size
        except OSError as exc:
            raise QuarantineError(f"cannot quarantine: {exc.strerror or exc}") from exc
    return size if limit is None else min(size, limit)


def _chunks(data: bytes | int, limit: int | None = None) -> Iterator[bytes | memoryview]:
    """Bytes as views (no copies), or a descriptor read from offset 0 with pread
    (the caller's file position is left alone), up to ``limit`` bytes."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)[:limit]
        for i in range(0, len(view), _CHUNK):
            yield view[i : i + _CHUNK]
        return
    offset = 0
    while limit is None or offset < limit:
        want = _CHUNK if limit is None else min(_CHUNK, limit - offset)
        chunk = os.pread(data, want, offset)
        if not chunk:
            return
        offset += len(chunk)
        yield chunk

