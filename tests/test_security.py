"""Security properties of a real daemon (issue 8, part 4).

* the socket is 0600 in a 0700 directory, the state files are private;
* a peer of another uid (a client run as ``nobody``) is refused every admin
  operation, and with ``server.allow_other_users = false`` refused at connect;
  each refusal is in the audit log;
* ``scan_fd`` only scans regular files: a directory, a pipe, a socket, a
  device, a descriptor not open for reading, or none at all get ``bad_fd``;
* no request makes the daemon open a path for a peer: ``quarantine_restore``
  to a path is the daemon's own user's privilege; ``filename`` and ``url`` are
  metadata, never opened; ``quarantine_id`` cannot climb out of the quarantine;
  a restore never follows a symlink nor overwrites;
* quarantined files are 0400 in a 0700 directory.

The other-uid tests need root (to become ``nobody`` with setpriv); they make
the socket reachable with ``server.socket_mode = 0o666`` and a traversable
directory, so that the daemon's own checks are what refuses.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProcess, traversable_dir
from samples import EICAR

from sentinel_ipc import messages
from sentinel_ipc.codec import decode_reply, encode_framed
from sentinel_ipc.messages import (
    BreakerControl,
    DegradedAck,
    Error,
    Health,
    HealthReport,
    Ping,
    PolicyAdd,
    PolicyImport,
    PolicyImportItem,
    PolicyRemove,
    PolicyResult,
    Pong,
    QuarantineDelete,
    QuarantineList,
    QuarantineListResult,
    QuarantineRestore,
    QuarantineResult,
    Reload,
    Reply,
    Scan,
    ScanFd,
    ScanResult,
    ServiceRetry,
    Shutdown,
    Threats,
    type_tag,
)
from sentinel_ipc.server.listener import SocketSetupError, prepare_socket_dir

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534
can_be_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a client as nobody",
)

# A client that needs nothing but the standard library: it sends the frames it
# is given (hex), one connection each, and prints each reply frame (hex) or
# what happened instead. Run as nobody through setpriv.
NOBODY_CLIENT = r"""
import json, socket, sys
job = json.load(sys.stdin)
out = []
for frame in job["frames"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(job["socket"])
    except OSError as exc:
        out.append({"connect_error": exc.errno})
        continue
    try:
        try:
            s.sendall(bytes.fromhex(frame))
        except OSError:
            pass  # refused at connect: the daemon may have answered and closed already
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        out.append({"reply": buf[4:].hex() if len(buf) >= 4 else None})
    except OSError as exc:
        out.append({"io_error": exc.errno})
    finally:
        s.close()
for path in job.get("open", []):
    try:
        open(path, "rb").close()
        out.append({"opened": path})
    except OSError as exc:
        out.append({"open_error": exc.errno, "path": path})
print(json.dumps(out))
"""


def as_nobody(
    socket_path: Path, requests: list[Any], open_paths: Sequence[str] = ()
) -> list[Any]:
    """Send each request from a process running as nobody, one connection each;
    the decoded first reply on each (or {"connect_error": errno}, ...), then the
    results of opening ``open_paths``. A ``bytes`` request is sent as it is
    (several frames at once, for a request that takes more than one)."""
    job = {
        "socket": str(socket_path),
        "frames": [(r if isinstance(r, bytes) else encode_framed(r)).hex() for r in requests],
        "open": list(open_paths),
    }
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", NOBODY_CLIENT],
        input=json.dumps(job), capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: list[Any] = []
    for item in json.loads(proc.stdout):
        if item.get("reply"):
            results.append(decode_reply(bytes.fromhex(item["reply"])))
        else:
            results.append(item)
    return results


def call(path: Path, request: Any, fds: list[int] | None = None) -> Reply:
    """One request on a fresh connection (blocking), optionally with descriptors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        payload = encode_framed(request)
        if fds:
            s.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())])
        else:
            s.sendall(payload)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            chunk = s.recv(65536)
            assert chunk, f"the daemon closed the connection instead of answering {request!r}"
            buf += chunk
        return decode_reply(buf[4:])


def audit_entries(data_dir: Path, kind: str, pred: Callable[[dict[str, Any]], bool],
                  want: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Audit records of ``kind`` matching ``pred``, once there are ``want`` of them
    (the log is written by a background thread)."""
    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            found = [e for e in map(json.loads, (data_dir / "audit.jsonl").read_text()
                                    .splitlines()) if e["kind"] == kind and pred(e)]
        if len(found) >= want:
            return found
        time.sleep(0.05)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A base dir others can traverse (pytest's tmp_path is 0700 under root's)."""
    with traversable_dir("sentinel-sec-") as base:
        yield base


def open_daemon(
    base: Path, config: dict[str, Any], name: str = "d", extra_args: Sequence[str] = ()
) -> DaemonProcess:
    """A daemon whose socket other users can reach (mode 0666, directory 0711)."""
    d = DaemonProcess(base, {"server": {"socket_mode": 0o666, **config.pop("server", {})},
                             **config}, extra_args=list(extra_args), name=name)
    d.start()
    os.chmod(d.socket_path.parent, 0o711)
    return d


@contextlib.contextmanager
def running(d: DaemonProcess) -> Iterator[DaemonProcess]:
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop(check=False)


# --- modes -------------------------------------------------------------------------


def test_socket_directory_and_state_files_are_private(daemon_factory: Any) -> None:
    d = daemon_factory()
    # Something to store: a policy (database, snapshot, audit) and a quarantined file.
    sample = b"quarantine me " * 50
    digest = hashlib.sha256(sample).hexdigest()
    assert isinstance(call(d.socket_path, PolicyAdd(id=1, action="quarantine", sha256=digest)),
                      PolicyResult)
    result = call(d.socket_path, Scan(id=2, data=sample, filename="sample.bin"))
    assert isinstance(result, ScanResult) and result.action == "quarantine"
    assert mode(d.socket_path) == 0o600
    assert mode(d.socket_path.parent) == 0o700
    assert mode(d.socket_path.with_name(d.socket_path.name + ".lock")) == 0o600
    assert mode(d.data_dir) == 0o700
    for name in ("policy_graph.db", "policy_snapshot.json", "audit.jsonl",
                 "policy_journal.jsonl"):
        assert mode(d.data_dir / name) & 0o077 == 0, (name, oct(mode(d.data_dir / name)))
    quarantine = d.data_dir / "quarantine"
    assert mode(quarantine) == 0o700
    files = sorted(quarantine.iterdir())
    assert [p.suffix for p in files] == [".bin", ".json"]
    for path in files:
        assert mode(path) == 0o400, (path.name, oct(mode(path)))
    # Created private, not chmod'ed after: the daemon runs under umask 077, so
    # no file it creates (and no rotated audit log) is ever wider, even briefly.
    assert d.proc is not None
    status = Path(f"/proc/{d.proc.pid}/status").read_text()
    assert "Umask:\t0077" in status, [line for line in status.splitlines() if "Umask" in line]
    cache = d.data_dir / "rules-cache"
    assert mode(cache) == 0o700
    assert all(mode(p) & 0o077 == 0 for p in cache.iterdir())
    d.stop()


def test_a_shared_group_gets_a_0750_directory_and_a_0660_socket(daemon_factory: Any) -> None:
    """The umask the daemon runs under must not take the group's bits."""
    d = daemon_factory({"server": {"socket_group": "nogroup", "socket_mode": 0o660}})
    directory = d.socket_path.parent
    assert mode(directory) == 0o750
    assert directory.stat().st_gid == NOBODY
    assert mode(d.socket_path) == 0o660
    assert d.socket_path.stat().st_gid == NOBODY
    d.stop()


@can_be_nobody
def test_another_user_cannot_reach_the_default_socket(daemon_factory: Any) -> None:
    d = daemon_factory()
    os.chmod(d.base, 0o711)  # even with every directory above open to others
    os.chmod(d.base.parent, 0o711)
    (reply,) = as_nobody(d.socket_path, [Ping(id=1)])
    assert reply == {"connect_error": 13}  # EACCES: the 0700 directory and 0600 socket
    d.stop()


def test_a_directory_of_the_sockets_own_is_created_private_or_narrowed(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "s.sock"
    prepare_socket_dir(fresh)
    assert mode(fresh.parent) == 0o700
    # Left wide by hand, holding nothing but a stale socket and its lock: narrowed.
    own = tmp_path / "own"
    own.mkdir(mode=0o755)
    os.chmod(own, 0o755)
    (own / "s.sock.lock").touch()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(own / "s.sock"))
    prepare_socket_dir(own / "s.sock")
    assert mode(own) == 0o700


@pytest.mark.parametrize("shared", ["sticky", "holds_other_files"])
def test_a_shared_socket_directory_is_never_narrowed(tmp_path: Path, shared: str) -> None:
    """``--socket /tmp/s.sock`` or ``/run/s.sock`` must not chmod /tmp or /run."""
    directory = tmp_path / "shared"
    directory.mkdir()
    if shared == "sticky":
        os.chmod(directory, 0o1777)
    else:
        os.chmod(directory, 0o755)
        (directory / "someone-elses.pid").touch()
    before = directory.lstat().st_mode
    with pytest.raises(SocketSetupError, match=r"sentineld would have to narrow it") as info:
        prepare_socket_dir(directory / "s.sock")
    assert str(directory / "sentinel" / "s.sock") in str(info.value)
    assert directory.lstat().st_mode == before
    # Nothing to narrow (already 0700 or narrower): a directory holding other files is fine.
    if shared == "holds_other_files":
        os.chmod(directory, 0o700)
        prepare_socket_dir(directory / "s.sock")
        assert mode(directory) == 0o700


def test_sentineld_refuses_to_start_in_a_sticky_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    proc = subprocess.run(
        [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket", str(shared / "s.sock"),
         "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "is a shared (sticky) directory" in proc.stderr
    assert mode(shared) == 0o1777 and not (shared / "s.sock").exists()


# --- another uid ---------------------------------------------------------------------

ADMIN_REQUESTS: list[Any] = [
    PolicyAdd(id=11, action="allow", sha256="a" * 64),
    PolicyRemove(id=12, policy_id=1),
    BreakerControl(id=13, name="yara", action="trip"),
    ServiceRetry(id=14, service="database"),
    Reload(id=15),
    Shutdown(id=16),
    QuarantineList(id=17),
    QuarantineRestore(id=18, quarantine_id="0" * 32, path="/tmp/x"),
    QuarantineDelete(id=19, quarantine_id="0" * 32),
    # They read or change what is every user's: the threat history holds the
    # filenames and URLs others scanned; an ack silences a notice for everyone.
    Threats(id=20, limit=10),
    DegradedAck(id=21, service="database"),
    PolicyImport(id=22, policies=[PolicyImportItem(action="block", sha256="b" * 64)]),
]


def test_the_refusal_test_covers_every_admin_request() -> None:
    assert {type(r) for r in ADMIN_REQUESTS} == set(messages.ADMIN_REQUESTS)


@can_be_nobody
def test_another_user_is_refused_every_admin_operation_and_audited(shared_base: Path) -> None:
    with running(open_daemon(shared_base, {})) as d:
        replies = as_nobody(d.socket_path, [*ADMIN_REQUESTS, Ping(id=1), Health(id=2),
                                            Scan(id=3, data=EICAR, filename="e.com")])
        for request, reply in zip(ADMIN_REQUESTS, replies, strict=False):
            assert isinstance(reply, Error), (request, reply)
            assert (reply.id, reply.code) == (request.id, "forbidden"), reply
        ping, health, scan = replies[len(ADMIN_REQUESTS):]
        assert isinstance(ping, Pong) and isinstance(health, HealthReport)
        assert isinstance(scan, ScanResult) and scan.action == "block"
        # Nothing happened: the daemon is up, no policy was added, the breaker closed.
        assert isinstance(call(d.socket_path, Ping(id=4)), Pong)
        refused = audit_entries(d.data_dir, "request_refused", lambda e: e["uid"] == NOBODY,
                                want=len(ADMIN_REQUESTS))
        assert sorted(e["request"] for e in refused) == sorted(
            type_tag(type(r)) for r in ADMIN_REQUESTS)
        assert all(e["pid"] > 0 for e in refused)


@can_be_nobody
def test_other_users_refused_entirely_when_configured(shared_base: Path) -> None:
    with running(open_daemon(shared_base, {"server": {"allow_other_users": False}})) as d:
        (reply,) = as_nobody(d.socket_path, [Ping(id=5)])
        assert isinstance(reply, Error) and reply.code == "forbidden" and reply.id == 0
        assert isinstance(call(d.socket_path, Ping(id=6)), Pong)  # its own user still served
        (entry,) = audit_entries(d.data_dir, "request_refused",
                                 lambda e: e["uid"] == NOBODY and e["request"] == "connect", 1)
        assert entry["gid"] == NOBODY


@can_be_nobody
def test_restore_to_a_path_is_the_daemons_own_users_privilege(shared_base: Path) -> None:
    """An admin of another uid may restore into a descriptor it opened itself, never
    into a path the daemon would open for it."""
    with running(open_daemon(shared_base, {"server": {"admin_uids": [NOBODY]}})) as d:
        qid = quarantine_sample(d.socket_path)
        target = shared_base / "restored-by-nobody"
        (reply,) = as_nobody(d.socket_path, [
            QuarantineRestore(id=7, quarantine_id=qid, path=str(target))])
        assert isinstance(reply, Error) and reply.code == "forbidden", reply
        assert not target.exists()
        (listing,) = as_nobody(d.socket_path, [QuarantineList(id=8)])  # admin: allowed
        assert isinstance(listing, QuarantineListResult)
        assert [i.quarantine_id for i in listing.items] == [qid]


# --- descriptors ---------------------------------------------------------------------


def _not_regular(kind: str, tmp: Path, stack: contextlib.ExitStack) -> list[int]:
    def keep(fd: int) -> int:
        stack.callback(os.close, fd)
        return fd

    sample = tmp / "sample.txt"
    sample.write_bytes(b"hello")
    if kind == "directory":
        return [keep(os.open(tmp, os.O_RDONLY | os.O_DIRECTORY))]
    if kind == "pipe":
        r, w = os.pipe()
        keep(w)
        os.write(w, EICAR)
        return [keep(r)]
    if kind == "socket":
        a, b = socket.socketpair()
        stack.callback(a.close)
        stack.callback(b.close)
        return [a.fileno()]
    if kind == "device":
        return [keep(os.open("/dev/null", os.O_RDONLY))]
    if kind == "write-only":
        return [keep(os.open(sample, os.O_WRONLY))]
    if kind == "o_path":
        return [keep(os.open(sample, os.O_PATH))]
    assert kind == "none"
    return []


NOT_REGULAR = ["directory", "pipe", "socket", "device", "write-only", "o_path", "none"]


def test_scan_fd_refuses_what_is_not_a_readable_regular_file(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory()
    for n, kind in enumerate(NOT_REGULAR):
        with contextlib.ExitStack() as stack:
            fds = _not_regular(kind, tmp_path, stack)
            reply = call(d.socket_path, ScanFd(id=100 + n, filename="x"), fds)
        assert isinstance(reply, Error), (kind, reply)
        assert (reply.id, reply.code) == (100 + n, "bad_fd"), (kind, reply)
    # ... and a regular file (or a memfd) is scanned through its descriptor.
    memfd = os.memfd_create("sample")
    try:
        os.write(memfd, EICAR)
        reply = call(d.socket_path, ScanFd(id=99, filename="eicar.com"), [memfd])
    finally:
        os.close(memfd)
    assert isinstance(reply, ScanResult) and reply.action == "block", reply
    d.stop()


def test_scan_fd_of_a_closed_descriptor_cannot_even_be_sent(tmp_path: Path) -> None:
    """A closed fd never reaches the daemon: the kernel refuses the sendmsg (EBADF),
    so the only "absent descriptor" the daemon sees is none (covered above)."""
    a, b = socket.socketpair()
    fd = os.open(tmp_path, os.O_RDONLY)
    os.close(fd)
    with a, b, pytest.raises(OSError) as info:
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    assert info.value.errno == 9


# --- paths -------------------------------------------------------------------------


def quarantine_sample(path: Path, data: bytes = b"keep me aside " * 40,
                      filename: str = "sample.bin", url: str | None = None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    add = call(path, PolicyAdd(id=20, action="quarantine", sha256=digest))
    assert isinstance(add, (PolicyResult, Error)), add
    result = call(path, Scan(id=21, data=data, filename=filename, url=url))
    assert isinstance(result, ScanResult) and result.action == "quarantine", result
    listing = call(path, QuarantineList(id=22))
    assert isinstance(listing, QuarantineListResult)
    return next(i.quarantine_id for i in listing.items if i.sha256 == digest)


def test_path_like_fields_are_never_opened_or_followed(daemon_factory: Any,
                                                       tmp_path: Path) -> None:
    d = daemon_factory()
    secret = tmp_path / "secret.txt"
    secret.write_bytes(EICAR)  # would be blocked if the daemon ever read it
    link = tmp_path / "link"
    link.symlink_to(secret)
    tricks = [str(secret), str(link), "../../../../" + str(secret), "/etc/shadow",
              "..", "../quarantine/../policy_graph.db", "a/../../b\x00c"]
    data = b"plain harmless bytes"
    for trick in tricks:
        for url in (None, f"file://{trick}"):
            result = call(d.socket_path, Scan(id=30, data=data, filename=trick, url=url))
            assert isinstance(result, ScanResult), (trick, result)
            # The verdict is about the bytes sent, never about a file the name points to.
            assert result.action == "allow" and result.size == len(data), (trick, result)
            assert result.sha256 == hashlib.sha256(data).hexdigest()
    # Quarantined under a tricky name: stored by id only, inside the quarantine.
    qid = quarantine_sample(d.socket_path, filename="../../../../tmp/evil.exe",
                            url="file:///../../etc/passwd")
    names = sorted(p.name for p in (d.data_dir / "quarantine").iterdir())
    assert names == [f"{qid}.bin", f"{qid}.json"]
    assert not Path("/tmp/evil.exe").exists()
    # quarantine_id is 32 hex digits or nothing: no way out of the directory.
    db_before = (d.data_dir / "policy_graph.db").stat().st_size
    bad_ids = ["../policy_graph.db", "..", "/etc/passwd", "../quarantine/" + qid,
               qid + "/../..", qid.upper(), qid + ".bin", "", "%2e%2e%2fpolicy_graph.db"]
    for bad in bad_ids:
        for request in (QuarantineDelete(id=31, quarantine_id=bad),
                        QuarantineRestore(id=32, quarantine_id=bad,
                                          path=str(tmp_path / "out"))):
            reply = call(d.socket_path, request)
            assert isinstance(reply, Error) and reply.code == "not_found", (bad, reply)
    assert (d.data_dir / "policy_graph.db").stat().st_size >= db_before
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (d.data_dir / "quarantine").iterdir()) == names
    # The owner's own restore: never through a symlink, never over an existing file.
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"untouched")
    trap = tmp_path / "trap"
    trap.symlink_to(victim)
    for dest in (trap, victim):
        reply = call(d.socket_path, QuarantineRestore(id=33, quarantine_id=qid, path=str(dest)))
        assert isinstance(reply, Error) and reply.code == "quarantine_failed", (dest, reply)
        assert not reply.retryable and "cannot create" in reply.message
    assert victim.read_bytes() == b"untouched"
    fresh = tmp_path / "restored.bin"
    reply = call(d.socket_path, QuarantineRestore(id=34, quarantine_id=qid, path=str(fresh)))
    assert isinstance(reply, QuarantineResult), reply
    assert fresh.read_bytes() == b"keep me aside " * 40 and mode(fresh) == 0o600
    d.stop()


@can_be_nobody
def test_quarantined_files_are_unreadable_to_others(shared_base: Path) -> None:
    with running(open_daemon(shared_base, {})) as d:
        qid = quarantine_sample(d.socket_path)
        quarantine = d.data_dir / "quarantine"
        blob, meta = quarantine / f"{qid}.bin", quarantine / f"{qid}.json"
        assert mode(blob) == 0o400 and mode(meta) == 0o400 and mode(quarantine) == 0o700
        # Even with every directory on the way opened up, the files' own modes refuse.
        for path in (d.data_dir, quarantine):
            os.chmod(path, 0o711)
        try:
            results = as_nobody(d.socket_path, [], open_paths=[str(blob), str(meta)])
        finally:
            os.chmod(quarantine, 0o700)
            os.chmod(d.data_dir, 0o700)
        assert [r.get("open_error") for r in results] == [13, 13], results


def test_reply_ids_of_refusals_are_the_requests(daemon_factory: Any) -> None:
    """A refusal is a typed error reply to that request, not a dropped connection:
    every malformed path-like field is answered on the same socket."""
    d = daemon_factory()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.socket_path))
        requests = [QuarantineDelete(id=40 + i, quarantine_id=bad)
                    for i, bad in enumerate(["..", "/", "x" * 10_000])]
        s.sendall(b"".join(encode_framed(r) for r in requests))
        buf = b""
        replies: list[Any] = []
        while len(replies) < len(requests):
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                size = int.from_bytes(buf[:4], "big")
                replies.append(decode_reply(buf[4:4 + size]))
                buf = buf[4 + size:]
    assert sorted((r.id, r.code) for r in replies) == [(40, "not_found"), (41, "not_found"),
                                                      (42, "not_found")]
    d.stop()

