"""The scan worker process: loads compiled YARA rules and scans file descriptors.

Run by the pool as ``python .../worker.py --sock N --rules FILE ...`` (by path,
so that starting a worker imports only the standard library, msgspec and yara,
never the daemon's packages). Also runnable as ``python -m
sentinel_ipc.scanning.worker``.

Theory of operation
-------------------
The daemon and the worker share one ``SOCK_SEQPACKET`` socketpair: every
message is one datagram, so there is no framing to get wrong, and the file to
scan travels *with* its job as an ``SCM_RIGHTS`` descriptor (a sealed memfd
holding the bytes, or the client's own file descriptor). The worker maps the
descriptor read-only and hands the mapping to ``Rules.match(data=...)``: no
copy of the file is made on either side, and it never opens a path. It also
computes the sha256 of the mapping, so hashing is spread over the workers
instead of loading the daemon's event loop.

One job at a time: ``Job`` in, ``Result`` out, until the daemon closes its end
(EOF) and the worker exits. A worker that the daemon no longer wants is simply
killed; it holds no state worth saving. A watchdog thread blocks in ``poll()``
for the hang-up of the daemon's end of the socket and exits at once, even in
the middle of a scan, so a crashed daemon cannot leak workers. (Not
``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child exits,
and trio forks from its worker-thread cache, whose idle threads exit after
10 s -- every worker would be SIGKILLed soon after it started.)

A worker started by a root daemon drops to an unprivileged user (``--user
UID:GID``, ``nobody`` by default) right after it has loaded its rules and
before it reads a single byte of anyone's file: YARA and its modules parse
hostile input, and a bug in them must not hand a root process to whoever
crafted a download. Everything it needs later is already open (its socket,
the descriptors that come with each job); ``PR_SET_NO_NEW_PRIVS`` keeps it
from regaining anything through an exec.

Failures are reported, not hidden: YARA's timeout -> ``kind="timeout"``;
memory exhaustion (``MemoryError``, ``ENOMEM`` from ``mmap`` under
``RLIMIT_AS``, YARA's "insufficient memory") -> ``kind="memory"`` and the
worker exits after replying, so the pool replaces it; an unreadable
descriptor -> ``kind="io"``. A crash (segfault, kill -9) is seen by the pool
as EOF on the socket.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import signal
import socket
import sys
import time
from typing import Any

import msgspec

# ---------------------------------------------------------------------------
# The worker protocol (also imported by the pool). msgpack, one datagram each.
# ---------------------------------------------------------------------------

#: Largest control datagram either side sends (externals are bounded well below).
MAX_DATAGRAM = 256 * 1024
#: Workers run at this niceness so the daemon's event loop wins the CPU when both want it.
WORKER_NICENESS = 10


class MatchRecord(msgspec.Struct, kw_only=True):
    """Same field names as :class:`sentinel_ipc.messages.RuleMatch`."""

    rule: str
    namespace: str
    tags: list[str]
    meta: dict[str, Any]


class Job(msgspec.Struct, tag="job", tag_field="t", kw_only=True):
    """Scan the descriptor that came with this datagram."""

    job: int
    externals: dict[str, str]
    #: YARA's own timeout, whole seconds (0 disables it).
    timeout: int
    #: Refuse files larger than this (a descriptor may grow after the daemon checked).
    max_bytes: int
    want_sha256: bool = True
    #: Scan only the first ``length`` bytes (the daemon reuses its memfds, which
    #: may be larger than the file they hold); -1: the descriptor's whole size.
    length: int = -1


class Ready(msgspec.Struct, tag="ready", tag_field="t", kw_only=True):
    pid: int
    rule_count: int
    rss: int


class StartFailed(msgspec.Struct, tag="start_failed", tag_field="t", kw_only=True):
    error: str


class Result(msgspec.Struct, tag="result", tag_field="t", kw_only=True):
    job: int
    matches: list[MatchRecord] = []
    sha256: str = ""
    size: int = 0
    filetype: str = ""
    rss: int = 0
    elapsed: float = 0.0
    #: "" on success; else "timeout", "memory", "io", "too_large" or "yara".
    kind: str = ""
    error: str = ""


ToWorker = Job
FromWorker = Ready | StartFailed | Result

# ---------------------------------------------------------------------------
# Magic: the THOR/LOKI-style ``filetype`` external, from the first bytes.
# ---------------------------------------------------------------------------

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"MZ", "EXE"),
    (b"\x7fELF", "ELF"),
    (b"\xcf\xfa\xed\xfe", "MACH-O"),
    (b"\xce\xfa\xed\xfe", "MACH-O"),
    (b"\xfe\xed\xfa\xcf", "MACH-O"),
    (b"\xfe\xed\xfa\xce", "MACH-O"),
    (b"PK\x03\x04", "ZIP"),
    (b"Rar!\x1a\x07", "RAR"),
    (b"7z\xbc\xaf\x27\x1c", "7Z"),
    (b"\x1f\x8b", "GZIP"),
    (b"%PDF", "PDF"),
    (b"{\\rt", "RTF"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE"),
    (b"MDMP", "MDMP"),
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"<?php", "PHP"),
    (b"\xca\xfe\xba\xbe", "JAVA"),
)


def guess_filetype(head: bytes) -> str:
    """A short upper-case type name from the first bytes, or "" when unknown."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return ""


# ---------------------------------------------------------------------------
# The worker main loop
# ---------------------------------------------------------------------------


def _rss() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return 0


def _die_with_parent(parent_pid: int, sock_fd: int) -> None:
    """Exit when the daemon's end of the socket hangs up (it died), even mid-scan."""
    if parent_pid and os.getppid() != parent_pid:
        os._exit(0)
    import select
    import threading

    hangup = select.POLLRDHUP | select.POLLHUP | select.POLLERR

    def watch() -> None:
        poller = select.poll()
        poller.register(sock_fd, select.POLLRDHUP)  # HUP and ERR are always reported
        while True:
            for _fd, events in poller.poll():
                if events & hangup:
                    os._exit(0)

    threading.Thread(target=watch, name="daemon-watchdog", daemon=True).start()
    # Under memory pressure the kernel should kill a worker, never the daemon.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:  # pragma: no cover - not Linux, or a locked-down /proc
        pass
    # Scanning yields the CPU to the daemon: its event loop answers health,
    # metrics and pings, and must stay responsive while every worker is busy.
    # An idle daemon costs the workers nothing; a busy one gets most of a core.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, WORKER_NICENESS)
    # A Ctrl-C in the daemon's terminal reaches the whole process group; the
    # daemon drains and then ends its workers itself, so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def drop_privileges(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` for good (real, effective and saved ids), with no
    supplementary groups and no way back through exec. Raises OSError.

    Imports first: afterwards the interpreter's own files may be out of reach
    (a Python installed under root's home directory)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise OSError(f"still uid {os.getresuid()} gid {os.getresgid()}")
    pr_set_no_new_privs = 38
    if libc.prctl(pr_set_no_new_privs, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _scan(rules: Any, job: Job, fd: int, yara: Any) -> Result:
    started = time.perf_counter()
    result = Result(job=job.job)
    try:
        actual = os.fstat(fd).st_size
    except OSError as exc:
        result.kind, result.error = "io", f"fstat failed: {exc.strerror}"
        return result
    size = actual if job.length < 0 else job.length
    if size > actual:
        result.kind, result.error = "io", f"descriptor holds {actual} bytes, not {size}"
        return result
    if size > job.max_bytes:
        result.kind = "too_large"
        result.error = f"{size} bytes, over the {job.max_bytes}-byte limit"
        return result
    view: Any = b""
    mapping: mmap.mmap | None = None
    try:
        if size:
            try:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
                view = mapping
            except OSError as exc:
                if exc.errno == errno.ENOMEM:  # the address-space limit (RLIMIT_AS)
                    raise MemoryError(str(exc)) from exc
                # Not mappable (some special filesystems): read it instead, bounded.
                view = os.pread(fd, size, 0)
        externals = dict(job.externals)
        externals["filetype"] = guess_filetype(bytes(view[:16]))
        result.filetype = externals["filetype"]
        matches = rules.match(data=view, externals=externals, timeout=job.timeout)
        result.matches = [
            MatchRecord(rule=m.rule, namespace=m.namespace, tags=list(m.tags), meta=dict(m.meta))
            for m in matches
        ]
        if job.want_sha256:
            result.sha256 = hashlib.sha256(view).hexdigest()
        result.size = len(view)
    except yara.TimeoutError:
        result.kind, result.error = "timeout", f"YARA timeout after {job.timeout} s"
    except MemoryError as exc:
        result.kind, result.error = "memory", f"out of memory: {exc}"
    except yara.Error as exc:
        text = str(exc)
        memory = "memory" in text or "could not map" in text
        result.kind, result.error = ("memory" if memory else "yara"), text
    except OSError as exc:
        result.kind, result.error = "io", f"read failed: {exc.strerror or exc}"
    finally:
        view = b""
        if mapping is not None:
            mapping.close()
    result.elapsed = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="sentinel-scan-worker")
    parser.add_argument("--sock", type=int, required=True)
    parser.add_argument("--rules", required=True)
    parser.add_argument("--memory-limit", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--user", default="", help="UID:GID to drop to once the rules are loaded")
    args = parser.parse_args(argv)

    # The daemon handles Ctrl-C / SIGTERM and then kills us; don't die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(args.parent_pid, args.sock)
    sock = socket.socket(fileno=args.sock)
    encoder = msgspec.msgpack.Encoder()
    decoder = msgspec.msgpack.Decoder(ToWorker)

    def send(msg: FromWorker) -> None:
        sock.send(encoder.encode(msg))

    try:
        if args.memory_limit > 0:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
        import yara

        rules = yara.load(args.rules)
        rule_count = sum(1 for _ in rules)
        if args.user:
            uid, gid = (int(part) for part in args.user.split(":"))
            drop_privileges(uid, gid)
    except Exception as exc:
        send(StartFailed(error=f"{type(exc).__name__}: {exc}"))
        return 1
    send(Ready(pid=os.getpid(), rule_count=rule_count, rss=_rss()))

    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                sock, MAX_DATAGRAM, 4, socket.MSG_CMSG_CLOEXEC
            )
        except ConnectionResetError:
            return 0
        if not data:
            for fd in fds:
                os.close(fd)
            return 0  # the daemon closed its end: retire
        try:
            job = decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            for fd in fds:
                os.close(fd)
            sys.stderr.write(f"sentinel worker: bad job: {exc}\n")
            return 3
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            reply = Result(job=job.job, kind="io", error="job without exactly one descriptor")
        else:
            try:
                reply = _scan(rules, job, fds[0], yara)
            finally:
                os.close(fds[0])
        reply.rss = _rss()
        send(reply)
        if reply.kind == "memory":
            return 4  # our heap may be fragmented or exhausted: let the pool replace us


if __name__ == "__main__":
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        # Run by path: don't let sibling modules shadow anything.
        del sys.path[0]
    sys.exit(main())
