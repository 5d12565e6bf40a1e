"""The C client (``clients/c``): built with the machine's ``cc``, run for real.

* against a real ``sentineld`` (``daemon_factory``): verdicts and their sha256
  and size checked with hashlib, pipelining 60 files, descriptors the daemon
  refuses, the ``--stats`` line, valgrind over one run;
* against scripted peers (a plain Unix-socket server in a thread) that send
  what a daemon never should: a huge length header, a frame cut short,
  garbage, nesting past the limit, another protocol version; and that answer
  out of order with a ``busy`` first, to pin down matching by id and the retry;
* against ``protocol/vectors.json`` through ``sentinel-decode``, the library's
  sans-I/O layer: every reply vector decodes to the fields it lists, the
  encoder writes the ``hello`` and ``scan_fd`` vectors byte for byte, and
  mutated frames never crash it.

Every subprocess runs under a timeout, and a negative return code (killed by a
signal, i.e. a crash) fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from samples import EICAR, EICAR_SHA256

from sentinel_ipc.codec import encode_framed
from sentinel_ipc.config import default_socket_path
from sentinel_ipc.messages import Error, RuleMatch, ScanResult, Welcome

ROOT = Path(__file__).resolve().parent.parent
C_DIR = ROOT / "clients" / "c"
VECTORS: list[dict[str, Any]] = json.loads((ROOT / "protocol" / "vectors.json").read_text())
RUN_TIMEOUT = 20.0
VERDICT = re.compile(r"^(allow|warn|quarantine|block) ([0-9a-f]{64}) (\d+) (\S+)(?: (\S+))?$")
STATS = re.compile(
    r"^sentinel-scan: files=(\d+) bytes=(\d+) seconds=(\d+\.\d+) errors=(\d+) "
    r"matched=(\d+) degraded=(\d+)$"
)
# Scans as fast as the client sends them: no per-uid rate limit in the way.
FAST = {
    "rate_limit": {
        "burst": 100_000,
        "scans_per_second": 100_000.0,
        "max_concurrent_scans_per_connection": 64,
    },
    "scanner": {"workers": 2},
}


# ---------------------------------------------------------------------------
# Building and running
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cbin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The library and programs, built out of tree with the Makefile."""
    for tool in ("cc", "make"):
        if shutil.which(tool) is None:
            pytest.fail(f"the C client tests need `{tool}` on PATH (install gcc and make)")
    out = tmp_path_factory.mktemp("cbuild")
    proc = subprocess.run(
        ["make", "-C", str(C_DIR), f"O={out}", "CC=cc", "CFLAGS=-O2 -g"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"the C client does not build:\n{proc.stdout}\n{proc.stderr}"
    for name in ("libsentinel_client.a", "sentinel-scan", "sentinel-decode"):
        assert (out / name).is_file(), name
    return out


def run(
    cmd: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd,
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=RUN_TIMEOUT,
        env=env,
    )
    assert proc.returncode >= 0, f"{cmd[0]} was killed by signal {-proc.returncode}: {proc.stderr}"
    return proc


def scan(cbin: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run([str(cbin / "sentinel-scan"), *map(str, args)])


def verdicts(stdout: str) -> dict[str, tuple[str, str, int, list[str]]]:
    """filename -> (action, sha256, size, rules); every verdict line once."""
    seen: dict[str, tuple[str, str, int, list[str]]] = {}
    for line in stdout.splitlines():
        m = VERDICT.match(line)
        if m is None:
            continue
        action, sha, size, name, rules = m.groups()
        assert name not in seen, f"two lines for {name}:\n{stdout}"
        seen[name] = (action, sha, int(size), rules.split(",") if rules else [])
    return seen


def stats_of(stdout: str) -> dict[str, float]:
    lines = [line for line in stdout.splitlines() if line.startswith("sentinel-scan:")]
    assert len(lines) == 1, stdout
    m = STATS.match(lines[0])
    assert m is not None, lines[0]
    keys = ("files", "bytes", "seconds", "errors", "matched", "degraded")
    return {k: float(v) for k, v in zip(keys, m.groups(), strict=True)}


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# Against a real daemon
# ---------------------------------------------------------------------------


def test_eicar_is_blocked_and_a_clean_file_allowed(
    cbin: Path, daemon_factory: Any, tmp_path: Path, rng: random.Random
) -> None:
    d = daemon_factory(config=FAST)
    clean_data = rng.randbytes(5000)
    clean = write(tmp_path / "clean.bin", clean_data)
    eicar = write(tmp_path / "eicar.com", EICAR)

    ok = scan(cbin, "-s", d.socket_path, clean)
    assert ok.returncode == 0, ok.stderr
    assert verdicts(ok.stdout) == {str(clean): ("allow", sha(clean_data), 5000, [])}

    bad = scan(cbin, "-s", d.socket_path, eicar, clean)
    assert bad.returncode == 1, bad.stderr
    found = verdicts(bad.stdout)
    assert found[str(eicar)] == ("block", EICAR_SHA256, len(EICAR), ["EICAR_Test_File"])
    assert found[str(clean)][0] == "allow"
    assert len(bad.stdout.splitlines()) == 2

    # The library's blocking sentinel_scan_fd(), on the default path ($SENTINEL_SOCKET).
    env = {**os.environ, "SENTINEL_SOCKET": str(d.socket_path)}
    one = run([str(cbin / "sentinel-decode"), "--scan", str(eicar)], env=env)
    assert one.returncode == 0, one.stderr
    got = fields_of(one.stdout)
    assert (got["action"], got["sha256"], got["rule"]) == (
        ["block"], [EICAR_SHA256], ["EICAR_Test_File"])
    d.stop()


def test_sixty_files_pipelined_each_get_one_right_line(
    cbin: Path, daemon_factory: Any, tmp_path: Path, rng: random.Random
) -> None:
    d = daemon_factory(config=FAST)
    sizes = [0, 0, 1, 2, 3, 5, 8, 13, 1_000_000, 1_048_576, 999_999]
    sizes += [rng.randrange(20, 200_000) for _ in range(60 - len(sizes) - 2)]
    files: dict[str, bytes] = {}
    for n, size in enumerate(sizes):
        data = rng.randbytes(size)
        files[str(write(tmp_path / f"f{n:02d}.bin", data))] = data
    for n in range(2):  # two that match, so `matched` counts something
        data = EICAR if n == 0 else b"prefix " + EICAR
        files[str(write(tmp_path / f"e{n}.com", data))] = data
    assert len(files) == 60
    names = sorted(files)
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(names[30:]) + "\n")

    proc = scan(cbin, "-s", d.socket_path, "-j", "8", "--stats", "--files-from", listed,
                *names[:30])
    assert proc.returncode == 1, proc.stderr  # the EICAR files are not allowed
    found = verdicts(proc.stdout)
    assert sorted(found) == names, proc.stdout
    for name, (_action, digest, size, _rules) in found.items():
        assert (digest, size) == (sha(files[name]), len(files[name])), name
    assert sum(1 for v in found.values() if v[3]) == 2
    stats = stats_of(proc.stdout)
    assert stats["files"] == 60 and stats["errors"] == 0 and stats["degraded"] == 0
    assert stats["bytes"] == sum(len(v) for v in files.values())
    assert stats["matched"] == 2
    assert 0 < stats["seconds"] < RUN_TIMEOUT
    assert len(proc.stdout.splitlines()) == 61

    latencies = tmp_path / "latencies.txt"
    quiet = scan(cbin, "-s", d.socket_path, "-q", "-j", "3", "--stats",
                 "--latencies", latencies, *names)
    assert quiet.returncode == 1, quiet.stderr
    assert quiet.stdout.count("\n") == 1
    quiet_stats = stats_of(quiet.stdout)
    assert quiet_stats["files"] == 60
    # One latency per verdict, each inside the run's wall time.
    ms = [float(line) for line in latencies.read_text().split()]
    assert len(ms) == 60
    assert all(0 < x <= quiet_stats["seconds"] * 1000 + 1 for x in ms), ms
    d.stop()


def test_a_directory_and_a_fifo_get_bad_fd_and_the_rest_still_scans(
    cbin: Path, daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(config=FAST)
    first = write(tmp_path / "first.txt", b"first")
    folder = tmp_path / "folder"
    folder.mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    last = write(tmp_path / "last.com", EICAR)
    missing = tmp_path / "missing"

    proc = scan(cbin, "-s", d.socket_path, "--stats", first, folder, fifo, missing, last)
    assert proc.returncode == 2, proc.stderr
    errors = {line.rsplit(" ", 1)[1]: line.split(" ") for line in proc.stdout.splitlines()
              if line.startswith("error ")}
    assert errors[str(folder)][1] == "bad_fd" and "directory" in " ".join(errors[str(folder)])
    assert errors[str(fifo)][1] == "bad_fd" and "pipe" in " ".join(errors[str(fifo)])
    assert errors[str(missing)][1] == "open_failed"
    found = verdicts(proc.stdout)
    assert found[str(first)][:3] == ("allow", sha(b"first"), 5)
    assert found[str(last)][0] == "block"
    stats = stats_of(proc.stdout)
    assert (stats["files"], stats["errors"], stats["matched"]) == (5, 3, 1)
    d.stop()


def test_valgrind_finds_no_error_or_leak(cbin: Path, daemon_factory: Any, tmp_path: Path) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        pytest.fail("valgrind is not installed: this test needs it")
    d = daemon_factory(config=FAST)
    files = [write(tmp_path / f"v{n}", bytes([n]) * (n * 1000)) for n in range(4)]
    files.append(write(tmp_path / "v.com", EICAR))
    folder = tmp_path / "folder"
    folder.mkdir()
    memcheck = [valgrind, "-q", "--error-exitcode=99", "--leak-check=full"]
    proc = run([*memcheck, str(cbin / "sentinel-scan"), "-s", str(d.socket_path), "-j", "3",
                "--stats", *map(str, files), str(folder)])
    assert proc.returncode == 2, proc.stderr  # the folder's bad_fd; 99 would be valgrind's
    assert "==" not in proc.stderr, proc.stderr
    assert len(verdicts(proc.stdout)) == 5
    # The decoder on hostile input, and a failed connect, under valgrind too.
    proc = run([*memcheck, str(cbin / "sentinel-decode")], stdin=DEEP)
    assert proc.returncode == 2 and "nested too deeply" in proc.stderr, proc.stderr
    proc = run([*memcheck, str(cbin / "sentinel-scan"), "-s", str(tmp_path / "none.sock"),
                str(files[0])])
    assert proc.returncode == 2 and "==" not in proc.stderr, proc.stderr
    d.stop()


def test_no_daemon_is_a_clear_error(cbin: Path, tmp_path: Path) -> None:
    target = write(tmp_path / "x.bin", b"x")
    missing = tmp_path / "nobody-here.sock"
    proc = scan(cbin, "-s", missing, "--stats", target)
    assert proc.returncode == 2
    assert f"cannot connect to {missing}" in proc.stderr
    assert "No such file or directory" in proc.stderr
    assert stats_of(proc.stdout)["errors"] == 1

    # A socket file nobody listens on (a crashed daemon's).
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))
        proc = scan(cbin, "-s", stale, target)
    assert proc.returncode == 2
    assert "Connection refused" in proc.stderr, proc.stderr

    assert scan(cbin, "-j", "0", target).returncode == 64
    assert scan(cbin, "--bogus", target).returncode == 64
    assert scan(cbin).returncode == 64


# ---------------------------------------------------------------------------
# Scripted peers
# ---------------------------------------------------------------------------


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def welcome(**fields: Any) -> bytes:
    base: dict[str, Any] = {"server": "scripted/1", "protocol_version": 1,
                            "max_frame_bytes": 1 << 20, "id": 1}
    base.update(fields)
    return encode_framed(Welcome(**base))


class Peer:
    """What a scripted server saw of one client connection."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""
        self.fds: list[int] = []

    def read_frame(self) -> dict[str, Any] | None:
        """The next request (decoded as a plain map) or None at EOF; passed
        descriptors are collected in ``fds``."""
        while True:
            if len(self.buffer) >= 4:
                length = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= 4 + length:
                    body = self.buffer[4 : 4 + length]
                    self.buffer = self.buffer[4 + length :]
                    decoded: dict[str, Any] = msgspec.msgpack.decode(body)
                    return decoded
            data, fds, _flags, _addr = socket.recv_fds(self.conn, 65536, 16)
            self.fds.extend(fds)
            if not data:
                return None
            self.buffer += data

    def wait_closed(self) -> None:
        """Until the client hangs up (so it cannot be waiting on us)."""
        while self.conn.recv(65536):
            pass


Scripted = Callable[..., Path]


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[Scripted]:
    """Serve ONE connection with a script in a thread; returns the socket path.
    The script's assertion errors are raised in the test at teardown."""
    threads: list[tuple[threading.Thread, list[BaseException], socket.socket]] = []

    def start(script: Callable[[Peer], None], at: Path | None = None) -> Path:
        path = at or tmp_path / f"peer{len(threads)}.sock"
        path.parent.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(RUN_TIMEOUT)
        failures: list[BaseException] = []

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(RUN_TIMEOUT)
                    peer = Peer(conn)
                    try:
                        script(peer)
                    finally:
                        for fd in peer.fds:
                            os.close(fd)
            except BaseException as exc:
                failures.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append((thread, failures, listener))
        return path

    yield start
    for thread, failures, listener in threads:
        thread.join(RUN_TIMEOUT)
        listener.close()
        assert not thread.is_alive(), "a scripted peer did not finish"
        if failures:
            raise failures[0]


def after_hello(then: bytes, close: bool = False) -> Callable[[Peer], None]:
    def script(peer: Peer) -> None:
        hello = peer.read_frame()
        assert hello is not None and hello["type"] == "hello", hello
        assert hello["protocol_version"] == 1 and hello["capabilities"] == []
        peer.conn.sendall(then)
        if not close:
            peer.wait_closed()

    return script


# A welcome whose extra field is 3,000 arrays deep (the limit is 32).
DEEP = frame(
    b"\x84\xa4type\xa7welcome\xa2id\x01\xa6server\xa1s\xa5extra" + b"\x91" * 3000 + b"\xc0"
)

BAD_PEERS = {
    # name: (what the peer sends after hello, close at once?, what stderr must say)
    "length_header_0xfffffff0": (b"\xff\xff\xff\xf0" + b"\0" * 64, False,
                                 "frame of 4294967280 bytes exceeds the limit of 1048576"),
    "closed_mid_frame": (b"\x00\x00\x00\x64" + b"\x85" + b"\0" * 9, True,
                         "connection closed inside a frame"),
    "closed_in_header": (b"\x00\x00", True, "connection closed inside a frame"),
    "closed_before_welcome": (b"", True, "closed the connection"),
    "garbage_body": (frame(b"\xc1" * 32), False, "invalid MessagePack type byte"),
    "truncated_msgpack": (frame(b"\x83\xa4type\xa7welcome\xa2id\xcf\x00"), False,
                          "truncated value"),
    "array_count_past_the_end": (frame(b"\x82\xa4type\xa7welcome\xa2id\xdd\xff\xff\xff\xff"),
                                 False, "a count runs past the end"),
    "deep_nesting": (DEEP, False, "values nested too deeply"),
    "not_a_map": (frame(b"\x93\x01\x02\x03"), False, "not a map"),
    "protocol_version_99": (welcome(protocol_version=99), False,
                            "sentineld speaks protocol version 99; this client speaks 1"),
    "error_instead_of_welcome": (
        encode_framed(Error(id=1, code="unsupported_version", message="speaks [1]")), False,
        "error unsupported_version: speaks [1]"),
    "welcome_missing_a_field": (frame(msgspec.msgpack.encode({"type": "welcome", "id": 1})),
                                False, "required field is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PEERS))
def test_a_bad_peer_is_a_clean_error(
    cbin: Path, scripted: Scripted, tmp_path: Path, case: str
) -> None:
    sends, close, message = BAD_PEERS[case]
    path = scripted(after_hello(sends, close))
    proc = scan(cbin, "-s", path, write(tmp_path / "f", b"data"))
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert proc.stdout == ""


def scan_result(request_id: int, content: bytes, rule: str | None = None) -> bytes:
    matches = [RuleMatch(rule=rule, meta={"nested": [{"deep": [1, 2.5, None]}]})] if rule else []
    return encode_framed(ScanResult(id=request_id, action="block" if rule else "allow",
                                    sha256=sha(content), size=len(content), matches=matches))


def test_replies_out_of_order_and_a_busy_retry(
    cbin: Path, scripted: Scripted, tmp_path: Path
) -> None:
    """Four scans in flight at once; the daemon answers the first `busy`, the
    rest in reverse order, then the resent first: every file gets its own
    verdict, and each request brought the file itself as a descriptor."""
    contents = [b"zero", b"one!", EICAR, b"three"]
    paths = [write(tmp_path / f"p{n}", data) for n, data in enumerate(contents)]
    seen: list[dict[str, Any]] = []

    def script(peer: Peer) -> None:
        assert peer.read_frame() is not None
        peer.conn.sendall(welcome(limits={"max_in_flight_per_connection": 4}))
        requests = [peer.read_frame() for _ in range(4)]  # all four before any reply
        assert all(r is not None and r["type"] == "scan_fd" for r in requests), requests
        seen.extend(r for r in requests if r is not None)
        by_id = {r["id"]: n for n, r in enumerate(seen)}
        assert len(peer.fds) == 4
        for n, fd in enumerate(peer.fds):
            assert os.pread(fd, 100, 0) == contents[n]
        first = seen[0]["id"]
        peer.conn.sendall(encode_framed(Error(id=first, code="busy", message="full",
                                              retryable=True, retry_after_ms=20)))
        for r in reversed(seen[1:]):
            n = by_id[r["id"]]
            peer.conn.sendall(scan_result(r["id"], contents[n], "EICAR" if n == 2 else None))
        again = peer.read_frame()
        assert again is not None and again["id"] == first and len(peer.fds) == 5
        assert os.pread(peer.fds[4], 100, 0) == contents[0]
        peer.conn.sendall(scan_result(first, contents[0]))
        peer.wait_closed()

    path = scripted(script)
    proc = scan(cbin, "-s", path, "-j", "8", "--stats", *paths)
    assert proc.returncode == 1, proc.stderr
    found = verdicts(proc.stdout)
    assert {name: v[:3] for name, v in found.items()} == {
        str(p): ("block" if n == 2 else "allow", sha(c), len(c))
        for n, (p, c) in enumerate(zip(paths, contents, strict=True))
    }
    assert found[str(paths[2])][3] == ["EICAR"]
    assert [r["filename"] for r in seen] == ["p0", "p1", "p2", "p3"]  # base names only
    assert all(r["url"] is None and r["size"] is None for r in seen)
    stats = stats_of(proc.stdout)
    assert (stats["files"], stats["errors"], stats["matched"]) == (4, 0, 1)


def test_busy_until_the_attempts_run_out_is_an_error(
    cbin: Path, scripted: Scripted, tmp_path: Path
) -> None:
    attempts: list[int] = []

    def script(peer: Peer) -> None:
        assert peer.read_frame() is not None
        peer.conn.sendall(welcome())
        while (request := peer.read_frame()) is not None:
            attempts.append(request["id"])
            peer.conn.sendall(encode_framed(Error(id=request["id"], code="rate_limited",
                                                  message="slow down", retryable=True)))

    path = scripted(script)
    proc = scan(cbin, "-s", path, write(tmp_path / "f", b"x"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.startswith("error rate_limited slow down "), proc.stdout
    assert len(attempts) == 5 and len(set(attempts)) == 1


def test_the_daemon_vanishing_mid_scan(
    cbin: Path, scripted: Scripted, tmp_path: Path
) -> None:
    def script(peer: Peer) -> None:
        assert peer.read_frame() is not None
        peer.conn.sendall(welcome())
        assert peer.read_frame() is not None  # the scan_fd, then gone

    path = scripted(script)
    files = [write(tmp_path / f"g{n}", b"g") for n in range(3)]
    proc = scan(cbin, "-s", path, "-j", "1", "--stats", *files)
    assert proc.returncode == 2
    assert "closed the connection" in proc.stderr, proc.stderr
    lost = "error connection_lost no reply before the connection failed"
    assert proc.stdout.splitlines()[0] == f"{lost} {files[0]}"
    assert "2 files not scanned" in proc.stderr
    assert stats_of(proc.stdout)["errors"] == 3


# ---------------------------------------------------------------------------
# The sans-I/O layer against the golden vectors
# ---------------------------------------------------------------------------


def decode(cbin: Path, data: bytes) -> subprocess.CompletedProcess[str]:
    return run([str(cbin / "sentinel-decode")], stdin=data)


def fields_of(stdout: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


REPLY_VECTORS = [v for v in VECTORS if v["valid"] and v["direction"] == "reply"]


@pytest.mark.parametrize("vector", REPLY_VECTORS, ids=[v["name"] for v in REPLY_VECTORS])
def test_every_reply_vector_decodes_to_its_fields(cbin: Path, vector: dict[str, Any]) -> None:
    proc = decode(cbin, bytes.fromhex(vector["frame_hex"]))
    assert proc.returncode == 0, proc.stderr
    got = fields_of(proc.stdout)
    msg = vector["message"]
    assert got["type"] == [msg["type"]] and got["id"] == [str(msg["id"])]
    if msg["type"] == "scan_result":
        rules = [m["rule"] for m in msg["matches"]]
        assert got["kind"] == ["scan_result"]
        assert got["action"] == [msg["action"]]
        assert got["sha256"] == [msg["sha256"]] and got["size"] == [str(msg["size"])]
        assert got["degraded"] == [str(int(msg["degraded"]))]
        assert float(got["scan_ms"][0]) == msg["scan_ms"]
        assert got["rules_version"] == [msg["rules_version"]]
        assert got["match_count"] == [str(len(rules))] and got.get("rule", []) == rules[:8]
        policy = msg["policy_id"]
        assert got["policy_id"] == ["nil" if policy is None else str(policy)]
    elif msg["type"] == "error":
        assert got["kind"] == ["error"]
        assert got["code"] == [msg["code"]] and got["message"] == [msg["message"]]
        assert got["retryable"] == [str(int(msg["retryable"]))]
        retry = msg["retry_after_ms"]
        assert got["retry_after_ms"] == ["nil" if retry is None else str(retry)]
    elif msg["type"] == "welcome":
        assert got["kind"] == ["welcome"]
        assert got["server"] == [msg["server"]]
        assert got["protocol_version"] == [str(msg["protocol_version"])]
        assert got["max_frame_bytes"] == [str(msg["max_frame_bytes"])]
        for key in ("max_in_flight_per_connection", "max_stream_bytes"):
            assert got[key] == [str(msg["limits"][key])]
    else:
        assert got["kind"] == ["other"]


def vector(name: str) -> dict[str, Any]:
    return next(v for v in VECTORS if v["name"] == name)


def test_the_encoder_writes_the_hello_and_scan_fd_vectors_byte_for_byte(cbin: Path) -> None:
    hello = vector("hello")
    msg = hello["message"]
    proc = run([str(cbin / "sentinel-decode"), "--encode-hello", str(msg["id"]), msg["client"],
                *msg["capabilities"]])
    assert proc.returncode == 0 and proc.stdout.strip() == hello["frame_hex"], proc
    scan_fd = vector("scan_fd")
    msg = scan_fd["message"]
    args = [msg[k] if msg[k] is not None else ":nil" for k in ("url", "filename", "mime_type")]
    proc = run([str(cbin / "sentinel-decode"), "--encode-scan-fd", str(msg["id"]), *args])
    assert proc.returncode == 0 and proc.stdout.strip() == scan_fd["frame_hex"], proc
    # Not UTF-8: refused locally (the daemon would drop the connection).
    proc = run([str(cbin / "sentinel-decode"), "--encode-scan-fd", "1", ":nil", "\udcff", ":nil"])
    assert proc.returncode == 2 and "invalid argument" in proc.stderr


def test_more_matches_than_copied_and_long_strings_are_bounded(cbin: Path) -> None:
    matches = [RuleMatch(rule=f"Rule_{n}_" + "x" * 200, meta={"n": n}) for n in range(12)]
    body = encode_framed(ScanResult(id=9, action="warn", sha256="ab" * 32, size=1,
                                    matches=matches, rules_version="v" * 500, warnings=["w"]))
    proc = decode(cbin, body)
    assert proc.returncode == 0, proc.stderr
    got = fields_of(proc.stdout)
    assert got["match_count"] == ["12"] and len(got["rule"]) == 8
    assert all(r.startswith(f"Rule_{n}_") and len(r) == 127 for n, r in enumerate(got["rule"]))
    assert got["rules_version"] == ["v" * 63]
    # Keys in any order, unknown ones (of any shape) skipped.
    raw = msgspec.msgpack.encode({"id": 4, "future": {"a": [1, {"b": b"\0"}]}, "size": 2,
                                  "sha256": "cd" * 32, "action": "allow", "type": "scan_result"})
    got = fields_of(decode(cbin, frame(raw)).stdout)
    assert got["action"] == ["allow"] and got["size"] == ["2"] and got["match_count"] == ["0"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty frame"),
        (msgspec.msgpack.encode({"type": "scan_result", "id": 1, "action": "nuke",
                                 "sha256": "a", "size": 1}), "an unknown action - at `$.action`"),
        (msgspec.msgpack.encode({"type": "scan_result", "id": 1, "action": "allow",
                                 "sha256": "a", "size": "1"}), "at `$.size`"),
        (msgspec.msgpack.encode({"type": "error", "id": -1, "code": "c", "message": "m"}),
         "at `$.id`"),
        (msgspec.msgpack.encode({"type": "pong"}), "no `id` field"),
        (msgspec.msgpack.encode({"id": 1}), "no `type` field"),
        (msgspec.msgpack.encode({1: 2, "type": "pong", "id": 1}), "a map key is not a string"),
        (msgspec.msgpack.encode({"type": "pong", "id": 1}) + b"\xc0", "trailing bytes"),
        (b"\x82\xa4type\xa4pong\xa2id\xdb\xff\xff\xff\xff", "a length runs past the end"),
    ],
)
def test_malformed_replies_are_refused_with_a_reason(cbin: Path, body: bytes, message: str) -> None:
    proc = decode(cbin, frame(body))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_mutated_frames_never_crash_the_decoder(cbin: Path, rng: random.Random) -> None:
    """A few hundred random corruptions of the reply vectors: each is decoded
    or refused (exit 0 or 2), never a signal."""
    seeds = [bytes.fromhex(v["frame_hex"])[4:] for v in REPLY_VECTORS]
    for _ in range(300):
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(body) + 1)
            if rng.random() < 0.6 and body:
                body[min(at, len(body) - 1)] = rng.randrange(256)
            elif rng.random() < 0.5:
                del body[at : at + rng.randint(1, 8)]
            else:
                body[at:at] = rng.choice([b"\xdd\xff\xff\xff\xff", b"\xdf\x00\x01\x00\x00",
                                          b"\xdb\x7f\xff\xff\xff", b"\xc7\xff\x01", b"\x91" * 40])
        proc = decode(cbin, frame(bytes(body)))
        assert proc.returncode in (0, 2), (proc.returncode, base64.b64encode(body))


def test_the_default_socket_path_is_the_python_librarys(
    cbin: Path, scripted: Scripted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """socket_path NULL: $SENTINEL_SOCKET, else $XDG_RUNTIME_DIR/sentinel/sentinel.sock
    (only when that is a directory), else <temp dir>/sentinel-<uid>/sentinel.sock:
    each case is where sentinel_ipc.config.default_socket_path() points too."""
    target = write(tmp_path / "t.bin", b"t")
    base = {k: v for k, v in os.environ.items()
            if k not in ("SENTINEL_SOCKET", "XDG_RUNTIME_DIR", "TMPDIR", "TEMP", "TMP")}
    (tmp_path / "xdg").mkdir()
    (tmp_path / "tmp").mkdir()
    cases = [
        {"SENTINEL_SOCKET": str(tmp_path / "env.sock"), "XDG_RUNTIME_DIR": str(tmp_path / "xdg")},
        {"XDG_RUNTIME_DIR": str(tmp_path / "xdg"), "TMPDIR": str(tmp_path / "tmp")},
        {"XDG_RUNTIME_DIR": str(tmp_path / "no-such-dir"), "TMPDIR": str(tmp_path / "tmp")},
    ]
    for extra in cases:
        for key in ("SENTINEL_SOCKET", "XDG_RUNTIME_DIR", "TMPDIR", "TEMP", "TMP"):
            monkeypatch.delenv(key, raising=False)
        for key, value in extra.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
        expected = default_socket_path()
        assert str(expected).startswith(str(tmp_path)), expected

        def script(peer: Peer) -> None:
            assert peer.read_frame() is not None
            peer.conn.sendall(welcome())
            request = peer.read_frame()
            assert request is not None and request["filename"] == "t.bin"
            assert os.pread(peer.fds[0], 10, 0) == b"t"
            peer.conn.sendall(scan_result(request["id"], b"t"))
            peer.wait_closed()

        scripted(script, at=expected)
        proc = run([str(cbin / "sentinel-decode"), "--scan", str(target)], env={**base, **extra})
        assert proc.returncode == 0, (extra, proc.stderr)
        assert fields_of(proc.stdout)["action"] == ["allow"]
