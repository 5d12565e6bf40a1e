"""``sentinelctl``: talk to a running sentineld.

Exit codes: 0 success, 1 a negative answer, 2 the daemon is unreachable or
answered with an error. Errors print one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

from ..config import default_socket_path
from ..errors import SentinelError
from ..messages import Error, Ping, Pong
from ..transport import open_framed_connection


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sentinelctl", description="Control a Sentinel daemon")
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket path")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ping", help="check that the daemon answers")
    return parser


async def _ping(socket_path: Path, timeout: float) -> float:
    with trio.fail_after(timeout):
        async with open_framed_connection(socket_path) as conn:
            start = time.perf_counter()
            await conn.send(Ping(id=1))
            reply = await conn.receive()
    if isinstance(reply, Error):
        raise SentinelError(f"{reply.code}: {reply.message}")
    if not isinstance(reply, Pong):
        raise SentinelError(f"unexpected reply {type(reply).__name__}")
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    socket_path = args.socket or default_socket_path()
    try:
        if args.command == "ping":
            ms = trio.run(_ping, socket_path, args.timeout)
            if args.json:
                print(json.dumps({"ok": True, "rtt_ms": round(ms, 3)}))
            else:
                print(f"pong from {socket_path} in {ms:.2f} ms")
            return 0
    except SentinelError as exc:
        print(f"sentinelctl: {exc.message}", file=sys.stderr)
        return 2
    except trio.TooSlowError:
        print(
            f"sentinelctl: no answer from {socket_path} within {args.timeout:g} s", file=sys.stderr
        )
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
