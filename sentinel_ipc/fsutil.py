"""Durable file primitives shared by every store in the data dir.

The snapshot, the journals, the outboxes, the quarantine, the resilience state
and the rules cache all need the same few things done right: write every byte
(``os.write`` may write fewer), read a whole descriptor, replace a file
atomically and durably (temp file + fsync + rename + fsync of the directory),
and fsync a directory so a rename or a new file survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

_READ_CHUNK = 1 << 20


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` at the descriptor's position."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` (the position is not moved)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def read_all(fd: int) -> bytes:
    """Everything from offset 0 to the end (``pread``: the position is not moved)."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, _READ_CHUNK, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def fsync_dir(path: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Make the directory's entries (a rename, a new file) durable.

    With ``strict=False`` failures are ignored: for callers where the data is
    already safe and the fsync only narrows a crash window.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    A reader sees the old file or the new one, never a mix; after a crash the
    same holds. Raises ``OSError``; the old file is then untouched.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(target.parent)
