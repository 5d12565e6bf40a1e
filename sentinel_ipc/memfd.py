"""memfds: the in-memory files that carry scan bytes to another process.

Both sides of a scan hand bytes over as a descriptor rather than through a
socket: the daemon writes a ``scan`` frame's bytes or a stream's chunks into a
memfd for its worker, and the client writes ``Client.scan(bytes)`` into one
that it passes with ``scan_fd``. The worker maps it; no further copy is made.

Writing into a *fresh* memfd costs page allocation, zeroing and, later,
freeing on top of the copy: about 0.45 ms per 750 KB, against 0.08 ms for a
copy into a memfd whose pages already exist (measured on the 2-core bench
machine). So both keep a bounded :class:`MemfdPool`. A pooled memfd keeps its
pages and may be longer than the next file; the length to scan travels with
the job (``Job.length``, ``scan_fd.size``).

When a memfd may go back to the pool is the owner's rule, and always the same:
only after the scan that used it ended with an answer, because the reader (a
worker, a quarantine copy) is done with it by then. After a cancellation, a
timeout or a crash a worker may still map it, and shrinking or rewriting a
mapped file would change or crash that scan: it is closed (``discard``) and
the kernel frees it when the last holder lets go.

A one-off memfd that goes to a process which may keep it is *sealed*
(:func:`sealed_memfd`): its size and content can no longer change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import trio

from .fsutil import pwrite_all

#: Bytes written on the event loop; larger copies go to a thread, so that the
#: loop keeps answering pings and health checks meanwhile.
INLINE_WRITE_BYTES = 1024 * 1024

#: A sealed memfd can no longer change size or content, nor lose its seals: a
#: process it is passed to may map it without fearing SIGBUS or a moving target.
MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def new_memfd(name: str = "sentinel-scan") -> int:
    """An empty, sealable, close-on-exec memfd (Linux)."""
    return os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def sealed_memfd(data: bytes | bytearray | memoryview, name: str = "sentinel-scan") -> int:
    """A new memfd holding ``data``, sealed; the caller closes it. Raises ``OSError``."""
    fd = new_memfd(name)
    try:
        pwrite_all(fd, data, 0)
        with contextlib.suppress(OSError):  # unsealable: still usable as it is
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MEMFD_SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class MemfdPool:
    """memfds kept for reuse: at most ``max_total`` bytes in all, ``max_each``
    bytes each and, if given, ``max_count`` of them."""

    def __init__(self, max_total: int, max_each: int, max_count: int | None = None,
                 name: str = "sentinel-scan") -> None:
        self.max_total = max_total
        self.max_each = max_each
        self.max_count = max_count
        self.name = name
        self._free: list[tuple[int, int]] = []  # (fd, capacity)
        self.retained = 0
        self._closed = False

    def take(self, size: int = 0) -> tuple[int, int]:
        """A memfd for ``size`` bytes and its capacity (its current length): the
        smallest idle one that is large enough, else the largest (it will grow),
        else a new one (capacity 0). Raises ``OSError``."""
        if not self._free:
            return new_memfd(self.name), 0
        fits = [i for i, (_fd, capacity) in enumerate(self._free) if capacity >= size]
        if fits:
            index = min(fits, key=lambda i: self._free[i][1])
        else:
            index = max(range(len(self._free)), key=lambda i: self._free[i][1])
        fd, capacity = self._free.pop(index)
        self.retained -= capacity
        return fd, capacity

    async def holding(self, data: bytes | bytearray | memoryview) -> tuple[int, int]:
        """A memfd from :meth:`take` with ``data`` written at offset 0, and its
        capacity; bytes past ``len(data)`` are left as they were. On failure the
        memfd is closed and the error (``OSError``) raised."""
        size = memoryview(data).nbytes
        fd, capacity = self.take(size)
        try:
            if size > INLINE_WRITE_BYTES:
                await trio.to_thread.run_sync(pwrite_all, fd, data, 0)
            else:
                pwrite_all(fd, data, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd, max(capacity, size)

    def give(self, fd: int, capacity: int) -> None:
        """Back for reuse, only after the scan that used it answered (module doc);
        else use :meth:`discard`."""
        if (
            self._closed
            or capacity > self.max_each
            or self.retained + capacity > self.max_total
            or (self.max_count is not None and len(self._free) >= self.max_count)
        ):
            os.close(fd)
        else:
            self._free.append((fd, capacity))
            self.retained += capacity

    @staticmethod
    def discard(fd: int) -> None:
        os.close(fd)

    def close(self) -> None:
        for fd, _capacity in self._free:
            os.close(fd)
        self._free.clear()
        self.retained = 0
        self._closed = True


__all__ = [
    "INLINE_WRITE_BYTES",
    "MEMFD_SEALS",
    "MemfdPool",
    "new_memfd",
    "sealed_memfd",
]
