"""Creating the listening socket safely.

* The socket's directory is created private (0700) and must be owned by us:
  a directory someone else controls could let them swap the socket. An
  existing directory is narrowed only when it is the socket's own (nothing in
  it but the socket and its lock): ``--socket /tmp/s.sock`` or
  ``/run/s.sock`` must never chmod ``/tmp`` or ``/run`` -- start-up is
  refused instead, with a message asking for a directory of its own.
* A lock file beside the socket (``flock``) is held for the daemon's life, so
  two daemons can never race for one path.
* An existing socket file on which a live daemon answers means "already
  running": refuse. One nobody answers on is stale (a crashed daemon): replace.
* The socket is bound under a restrictive umask and then chmod'ed, so there is
  no window in which it is wider than configured.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import socket
import stat
from pathlib import Path

import trio

from ..errors import SentinelError


class AlreadyRunningError(SentinelError):
    """Another daemon is serving on the socket path."""


class SocketSetupError(SentinelError):
    """The socket or its directory cannot be created safely."""


def prepare_socket_dir(path: Path, *, dir_mode: int = 0o700, group: str | None = None) -> None:
    """Create the socket's directory with ``dir_mode`` and make sure it is ours.

    An existing directory wider than ``dir_mode`` (or of another group than
    ``group``) is narrowed to it: the directory is what keeps other users away
    from the socket. But only a directory of the socket's own: one that is
    sticky (``/tmp``) or holds anything besides the socket and its lock file
    (``/run``, a home directory) is shared with others, and changing its mode
    would break them; that is refused (:class:`SocketSetupError`).
    """
    directory = path.parent
    existed = directory.exists()
    try:
        directory.mkdir(mode=dir_mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise SocketSetupError(f"cannot create socket directory {directory}: {exc}") from exc
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise SocketSetupError(f"{directory} is not a directory")
    if st.st_uid != os.getuid():
        raise SocketSetupError(
            f"socket directory {directory} is owned by uid {st.st_uid}, not by us ({os.getuid()})"
        )
    try:
        gid = grp.getgrnam(group).gr_gid if group is not None else -1
    except KeyError as exc:
        raise SocketSetupError(f"cannot secure socket directory {directory}: {exc}") from exc
    # A directory we just made gets exactly ``dir_mode``: the umask (sentineld
    # runs under 077) would have taken the group's bits of 0750.
    mode = stat.S_IMODE(st.st_mode)
    remode = bool(mode & ~dir_mode) if existed else mode != dir_mode
    regroup = gid != -1 and st.st_gid != gid
    if not (remode or regroup):
        return
    if existed:
        _refuse_shared_directory(path, st)
    try:
        if regroup:
            os.chown(directory, -1, gid)
        if remode:
            os.chmod(directory, dir_mode)
    except OSError as exc:
        raise SocketSetupError(f"cannot secure socket directory {directory}: {exc}") from exc


def _refuse_shared_directory(path: Path, st: os.stat_result) -> None:
    """Raise :class:`SocketSetupError` when the socket's existing directory is
    not the socket's own (see :func:`prepare_socket_dir`)."""
    directory = path.parent
    ours = {path.name, lock_path_of(path).name}
    try:
        others = sorted(name for name in os.listdir(directory) if name not in ours)
    except OSError as exc:
        raise SocketSetupError(f"cannot list socket directory {directory}: {exc}") from exc
    if st.st_mode & stat.S_ISVTX:
        why = "is a shared (sticky) directory"
    elif others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        why = f"holds other files ({shown})"
    else:
        return
    raise SocketSetupError(
        f"socket directory {directory} (mode {stat.S_IMODE(st.st_mode):04o}) {why}: "
        f"sentineld would have to narrow it to keep other users away from the socket, "
        f"and changes only a directory of its own; put the socket in one, "
        f"e.g. {directory / 'sentinel' / path.name}"
    )


def lock_path_of(path: Path) -> Path:
    """``<socket>.lock``, held beside the socket for the daemon's life."""
    return path.with_name(path.name + ".lock")


def acquire_lock(path: Path) -> int:
    """Hold ``<socket>.lock`` exclusively; raise :class:`AlreadyRunningError` if taken."""
    lock_path = lock_path_of(path)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyRunningError(
                f"another sentineld holds {lock_path}: a daemon is already running on {path}"
            ) from exc
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def release_lock(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(lock_path_of(path))
    with contextlib.suppress(OSError):
        os.close(fd)


def _live_daemon_answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    else:
        return True
    finally:
        probe.close()


async def open_unix_listener(
    path: Path, *, mode: int = 0o600, group: str | None = None, backlog: int = 512
) -> trio.socket.SocketType:
    """Bind and listen on ``path``; the caller must already hold the lock."""
    if path.exists() or path.is_symlink():
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketSetupError(f"{path} exists and is not a socket; refusing to remove it")
        if _live_daemon_answers(path):
            raise AlreadyRunningError(f"a daemon is already answering on {path}")
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise SocketSetupError(f"cannot bind {path}: {exc}") from exc
    finally:
        os.umask(old_umask)
    try:
        if group is not None:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        os.chmod(path, mode)
        sock.listen(backlog)
    except (OSError, KeyError) as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise SocketSetupError(f"cannot set up {path}: {exc}") from exc
    return sock
