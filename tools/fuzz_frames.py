#!/usr/bin/env python3
"""Fuzz the frame decoder and message validation, in-process and against a live daemon.

    python tools/fuzz_frames.py --atheris [-max_total_time=60 ...]   # coverage-guided
    python tools/fuzz_frames.py --plain 200000 [--seed N]              # no atheris needed
    python tools/fuzz_frames.py --frames 100000 [--socket PATH]        # a live daemon

``--atheris`` runs a libFuzzer-driven, coverage-guided harness (atheris, from
PyPI: ``pip install atheris``; the arguments after it go to libFuzzer) over
:func:`check_one`: the input is cut into pieces fed to a
:class:`~sentinel_ipc.framing.FrameDecoder` (1 MiB limit), every frame it
yields goes through :func:`~sentinel_ipc.codec.decode_request`, and a message
that decodes must survive an encode/decode round trip. Anything raised other
than the protocol's own errors is a finding (it would reach the server loop).

``--plain N`` is the fallback where atheris does not build: the same check on N
inputs made by mutating seed frames (bit flips, truncation, splicing, length
rewrites, deep nesting) with a seeded ``random.Random``.

``--frames N`` drives N generated frames against a running daemon (one it
starts in a temp dir, or ``--socket``): batches of decodable frames (valid
requests and well-formed maps with wrong fields or unknown tags), most batches
ending in one hostile frame (random bytes, a truncated, bit-flipped or
oversized frame, nesting 100,000 deep), over many connections at once. It
reports the daemon's RSS and descriptors before and after, and whether it
crashed or hung. The bar (issue 8): no crash, no hang, no unbounded memory.
Last line: ``fuzz_frames: frames=N connections=N replies=N crashed=0 hung=0
rss_start_mb=F rss_end_mb=F fds_start=N fds_end=N``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

try:  # instrument our modules for coverage when atheris is there
    import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

    with atheris.instrument_imports(include=["sentinel_ipc"]):
        from sentinel_ipc.codec import DecodeFailure, decode_request, encode
        from sentinel_ipc.errors import BadFrameError, FrameTooLargeError
        from sentinel_ipc.framing import NEED_DATA, FrameDecoder
    HAVE_ATHERIS = True
except ImportError:
    from sentinel_ipc.codec import DecodeFailure, decode_request, encode
    from sentinel_ipc.errors import BadFrameError, FrameTooLargeError
    from sentinel_ipc.framing import NEED_DATA, FrameDecoder

    HAVE_ATHERIS = False

import msgspec  # noqa: E402

from sentinel_ipc.messages import (  # noqa: E402
    REQUEST_TAGS,
    REQUEST_TYPES,
    BreakerControl,
    Health,
    Metrics,
    Ping,
    PolicyAdd,
    PolicyList,
    PolicyQuery,
    Reload,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ServiceRetry,
    Shutdown,
    Threats,
)

MAX_FRAME = 1024 * 1024
UNSAFE = (Shutdown, BreakerControl, Reload, ServiceRetry)
SAFE_TAGS = sorted(REQUEST_TAGS - {"shutdown", "breaker_control", "reload", "service_retry"})
FIELDS = sorted({f.name for t in REQUEST_TYPES for f in msgspec.structs.fields(t)} - {"id"})
EICAR = bytes.fromhex(
    "58354f2150254041505b345c505a58353428505e2937434329377d2445494341522d5354414e44415244"
    "2d414e544956495255532d544553542d46494c452124482b482a"
)


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# --- the in-process check -------------------------------------------------------------


def check_one(data: bytes, cuts: list[int]) -> int:
    """Feed ``data`` to a decoder in pieces cut at ``cuts``; decode every frame.
    Returns how many frames came out. Raises AssertionError / anything unexpected."""
    decoder = FrameDecoder(MAX_FRAME)
    frames = 0
    last = 0
    for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
        if cut <= last:
            continue
        decoder.receive_data(data[last:cut])
        last = cut
        try:
            while (payload := decoder.next_frame()) is not NEED_DATA:
                assert isinstance(payload, bytes) and len(payload) <= MAX_FRAME
                frames += 1
                check_payload(payload)
        except FrameTooLargeError:
            return frames  # sticky: the stream is over
        assert decoder.buffered <= len(data)
    decoder.receive_data(b"")
    with contextlib.suppress(BadFrameError):  # the input may end inside a frame
        while decoder.next_frame() is not NEED_DATA:
            frames += 1
    return frames


def check_payload(payload: bytes) -> None:
    try:
        request = decode_request(payload)
    except DecodeFailure as failure:
        assert 0 <= failure.request_id < 2**63
        assert failure.error.code in ("bad_frame", "invalid_message", "unknown_type")
        return
    again = decode_request(encode(request))
    assert again == request, (request, again)


def atheris_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cuts = [fdp.ConsumeIntInRange(0, 1 << 16) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    check_one(fdp.ConsumeBytes(fdp.remaining_bytes()), cuts)


# --- generating frames ----------------------------------------------------------------


class FrameMaker:
    """Seeded generator of frames: decodable ones (valid requests, maps with wrong
    fields or unknown tags) and hostile ones (that end a connection)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        kind = r.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return r.random() < 0.5
        if kind == 2:
            return r.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1,
                             r.randrange(-999, 999)])
        if kind == 3:
            return r.choice([0.0, -1.5, float("inf"), float("nan"), r.random()])
        if kind == 4:
            return "".join(r.choice("ab\u00e9\u4e2d\x00/.*?") for _ in range(r.randrange(40)))
        if kind == 5:
            return r.randbytes(r.randrange(64))
        if kind == 6:
            return [self.value(depth + 1) for _ in range(r.randrange(5))]
        return {self.key(): self.value(depth + 1) for _ in range(r.randrange(5))}

    def key(self) -> Any:
        r = self.rng.random()
        if r < 0.7:
            return self.rng.choice([*FIELDS, "type", "id"])
        return self.value(3) if r < 0.8 else "x" * self.rng.randrange(20)

    def valid(self) -> msgspec.Struct:
        r = self.rng
        i = r.randrange(1, 2**62)
        hexes = "".join(r.choice("0123456789abcdef") for _ in range(64))
        makers: list[Callable[[], msgspec.Struct]] = [
            lambda: Ping(id=i),
            lambda: Health(id=i, probe=r.choice(["full", "live", "ready"])),
            lambda: Metrics(id=i),
            lambda: PolicyList(id=i),
            lambda: Threats(id=i, limit=r.randrange(-2, 2000)),
            lambda: PolicyQuery(id=i, sha256=r.choice([None, hexes, "zz"]),
                                url=r.choice([None, "https://x/y", "*" * 300])),
            lambda: PolicyAdd(id=i, action=r.choice(["allow", "warn", "quarantine", "block"]),
                              sha256=r.choice([None, hexes, "nothex"]),
                              url_pattern=r.choice([None, "https://e/*", "?" * 3000])),
            lambda: Scan(id=i, data=r.choice([EICAR, r.randbytes(r.randrange(4096))]),
                         filename=r.choice([None, "a.exe", "../../x"])),
            lambda: ScanBegin(id=i, size=r.choice([None, 10, 2**50])),
            lambda: ScanChunk(id=i, data=r.randbytes(r.randrange(512))),
            lambda: ScanEnd(id=i),
        ]
        return r.choice(makers)()

    def decodable(self) -> bytes:
        """A frame the daemon answers without closing the connection."""
        if self.rng.random() < 0.5:
            return frame(encode(self.valid()))
        msg: dict[Any, Any] = {"type": self.rng.choice([*SAFE_TAGS, "nope", ""]),
                               "id": self.rng.randrange(0, 2**40)}
        for _ in range(self.rng.randrange(4)):
            msg[self.rng.choice(FIELDS)] = self.value()
        return frame(msgspec.msgpack.encode(msg))

    def hostile(self) -> bytes:
        """A frame after which the daemon may (rightly) close the connection."""
        r = self.rng
        base = self.decodable()
        kind = r.randrange(7)
        if kind == 0:
            return r.randbytes(r.randrange(1, 200))
        if kind == 1:
            return base[: r.randrange(len(base))]
        if kind == 2:
            at = r.randrange(len(base))
            return base[:at] + bytes([base[at] ^ r.randrange(1, 256)]) + base[at + 1:]
        if kind == 3:
            return struct.pack(">I", r.randrange(MAX_FRAME + 1, 2**32)) + base[4:]
        if kind == 4:
            opener = r.choice([b"\x91", b"\x81\xa1k", b"\xdc\x00\x01"])
            return frame(opener * r.randrange(1000, 100_000) + b"\xc0")
        if kind == 5:
            return frame(msgspec.msgpack.encode(self.value()))
        return frame(b"\x82\xa4type\xa4\xf0ing\xa2id\x01")  # not UTF-8

    def batch(self) -> tuple[list[bytes], int]:
        frames = [self.decodable() for _ in range(self.rng.randrange(1, 20))]
        if self.rng.random() < 0.7:
            frames.append(self.hostile())
        safe_frames = [safe(f) for f in frames]
        return safe_frames, len(safe_frames)


def safe(data: bytes) -> bytes:
    """``data``, unless it is a frame that would stop the daemon or trip a breaker."""
    if len(data) >= 4 and int.from_bytes(data[:4], "big") == len(data) - 4:
        try:
            request = decode_request(data[4:])
        except DecodeFailure:
            return data
        if isinstance(request, UNSAFE):
            return frame(encode(Ping(id=1)))
    return data


def mutate(seed: bytes, rng: random.Random, maker: FrameMaker) -> bytes:
    """One input for the plain loop: a seed with a few mutations stacked."""
    data = bytearray(seed)
    for _ in range(rng.randrange(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:
            del data[rng.randrange(len(data)):]
        elif kind == 2:
            data[rng.randrange(len(data) + 1):0] = maker.hostile()
        elif kind == 3 and len(data) >= 4:
            data[0:4] = struct.pack(">I", rng.choice([0, 1, len(data), MAX_FRAME + 1,
                                                      rng.randrange(2**32)]))
        elif kind == 4:
            data += maker.decodable()
        elif data:
            at = rng.randrange(len(data))
            data[at:at] = data[: rng.randrange(len(data))]
    return bytes(data)


def run_plain(count: int, seed: int) -> int:
    rng = random.Random(seed)
    maker = FrameMaker(rng)
    seeds = [maker.decodable() for _ in range(64)]
    frames = 0
    start = time.monotonic()
    for n in range(count):
        data = mutate(rng.choice(seeds), rng, maker)
        cuts = [rng.randrange(len(data) + 1) for _ in range(rng.randrange(4))]
        try:
            frames += check_one(data, cuts)
        except Exception:
            print(f"finding at input {n} (seed {seed}): {data[:200]!r}", file=sys.stderr)
            raise
    elapsed = time.monotonic() - start
    print(f"fuzz_frames: plain inputs={count} frames={frames} findings=0 "
          f"seconds={elapsed:.1f} seed={seed}")
    return 0


# --- against a live daemon ------------------------------------------------------------


@contextlib.contextmanager
def own_daemon() -> Iterator[Path]:
    """A daemon in a temp dir, with limits that let the fuzzer through."""
    base = Path(tempfile.mkdtemp(prefix="sentinel-fuzz-"))
    sock = base / "run" / "sentinel.sock"
    config = base / "sentineld.toml"
    config.write_text(
        f"[server]\nmax_frame_bytes = {MAX_FRAME}\nframe_read_timeout = 2.0\n"
        "[rate_limit]\nburst = 1000000\nscans_per_second = 1000000.0\n"
    )
    log = open(base / "sentineld.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentinel_ipc.cli.sentineld", "--socket", str(sock),
         "--data-dir", str(base / "data"), "--config", str(config)],
        stdout=log, stderr=log, cwd=str(ROOT), env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while not ping(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                log_text = (base / "sentineld.log").read_text()
                raise RuntimeError(f"sentineld did not start:\n{log_text}")
            time.sleep(0.05)
        yield sock
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        print(f"sentineld exit code after the run: {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def ping(path: Path, timeout: float = 2.0) -> bool:
    try:
        return b"pong" in exchange(path, [frame(encode(Ping(id=1)))], timeout)[0]
    except OSError:
        return False


def exchange(path: Path, frames: list[bytes], timeout: float) -> tuple[bytes, bool]:
    """Send, hang up our side, read until the daemon closes: (received, hung?)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(b"".join(frames))
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        received = bytearray()
        try:
            while chunk := s.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return bytes(received), True
        return bytes(received), False


def daemon_pid(path: Path) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        pid, _uid, _gid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET,
                                                           socket.SO_PEERCRED, 12))
        return int(pid)


def rss_and_fds(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/status") as fh:
        rss_kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    fds = sum(1 for name in os.listdir(f"/proc/{pid}/fd")
              if not _link(pid, name).startswith(("socket:", "/memfd:")))
    return rss_kb / 1024, fds


def _link(pid: int, name: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{name}")
    except OSError:
        return ""


def count_replies(data: bytes, codes: Counter[str]) -> int:
    n = 0
    while len(data) >= 4:
        size = int.from_bytes(data[:4], "big")
        if len(data) < 4 + size:
            break
        try:
            reply = msgspec.msgpack.decode(data[4:4 + size])
            codes[str(reply.get("code") or reply.get("type"))] += 1
        except (msgspec.DecodeError, AttributeError):
            codes["UNDECODABLE REPLY"] += 1
        data = data[4 + size:]
        n += 1
    return n


def run_frames(path: Path, total: int, seed: int, concurrency: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    pid = daemon_pid(path)
    rss0, fds0 = rss_and_fds(pid)
    print(f"daemon pid {pid}: rss {rss0:.1f} MiB, {fds0} descriptors (not counting sockets "
          f"and pooled memfds); driving {total} frames, {concurrency} connections at a time")
    makers = [FrameMaker(random.Random(seed * 1000 + i)) for i in range(concurrency)]
    codes: Counter[str] = Counter()
    stats = Counter[str]()
    peak = rss0
    sent = 0
    start = time.monotonic()

    def worker(maker: FrameMaker) -> None:
        frames, n = maker.batch()
        received, hung = exchange(path, frames, 15.0)
        stats["connections"] += 1
        stats["frames"] += n
        stats["hung"] += hung
        stats["replies"] += count_replies(received, codes)

    with ThreadPoolExecutor(concurrency) as pool:
        while sent < total:
            futures = [pool.submit(worker, m) for m in makers]
            for f in futures:
                f.result()
            sent = stats["frames"]
            if stats["connections"] % (concurrency * 50) == 0:
                try:
                    peak = max(peak, rss_and_fds(pid)[0])
                except FileNotFoundError:
                    break
                if not ping(path):
                    break
    elapsed = time.monotonic() - start
    crashed = 0
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        crashed = 1
    alive = not crashed and ping(path, 5.0)
    if not alive:
        crashed = 1
    time.sleep(1.0)
    rss1, fds1 = rss_and_fds(pid) if not crashed else (0.0, 0)
    print(f"{stats['frames']} frames on {stats['connections']} connections in {elapsed:.1f} s "
          f"({stats['frames'] / elapsed:.0f} frames/s); replies: "
          + ", ".join(f"{k} {v}" for k, v in codes.most_common(12)))
    print(f"daemon rss {rss0:.1f} -> {rss1:.1f} MiB (peak sampled {peak:.1f}); descriptors "
          f"{fds0} -> {fds1}; answers ping afterwards: {alive}")
    print(f"fuzz_frames: frames={stats['frames']} connections={stats['connections']} "
          f"replies={stats['replies']} crashed={crashed} hung={stats['hung']} "
          f"rss_start_mb={rss0:.1f} rss_end_mb={rss1:.1f} fds_start={fds0} fds_end={fds1}")
    grown = rss1 - rss0 > 100 or fds1 > fds0
    return 1 if crashed or stats["hung"] or grown or codes["UNDECODABLE REPLY"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--atheris", action="store_true",
                      help="coverage-guided (libFuzzer arguments follow)")
    mode.add_argument("--plain", type=int, metavar="N", help="N mutated inputs, no atheris")
    mode.add_argument("--frames", type=int, metavar="N", help="N frames against a live daemon")
    parser.add_argument("--socket", type=Path, help="with --frames: a daemon already running")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8)
    args, rest = parser.parse_known_args(argv)
    if args.frames:
        if args.socket:
            return run_frames(args.socket, args.frames, args.seed, args.concurrency)
        with own_daemon() as sock:
            return run_frames(sock, args.frames, args.seed, args.concurrency)
    if args.plain or not HAVE_ATHERIS:
        if not args.plain:
            print("atheris is not installed (pip install atheris); running the plain loop")
        return run_plain(args.plain or 100_000, args.seed)
    if not any(not arg.startswith("-") for arg in rest):
        # No corpus directory given: seed one with decodable and hostile frames, so
        # libFuzzer starts from message maps instead of rediscovering MessagePack.
        corpus = Path(tempfile.mkdtemp(prefix="sentinel-fuzz-corpus-"))
        maker = FrameMaker(random.Random(args.seed))
        for n in range(200):
            seed = maker.decodable() if n % 2 else maker.hostile()[:4096]
            (corpus / f"seed-{n:03d}").write_bytes(b"\x00" + seed)
        rest = [*rest, str(corpus)]
        print(f"seed corpus: {corpus}")
    atheris.Setup([sys.argv[0], *rest], atheris_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
