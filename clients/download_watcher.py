"""Scan every file a download manager saves into a directory.

    python clients/download_watcher.py ~/Downloads [--socket PATH] [--move-to DIR]
    python clients/download_watcher.py ~/Downloads --once      # scan what is there, exit

A file is scanned once it is *complete*: not a temporary name a browser or
download manager writes to (``.part``, ``.crdownload``, ...), and its size and
modification time unchanged over two polls. Each verdict prints one line
(``--json``: one JSON object per line). With ``--move-to`` a file whose
verdict is not ``allow`` is moved out of the downloads directory.

It polls (no inotify dependency; ``--interval`` seconds) and relies on the
client library for everything else: if sentineld restarts or is briefly
away, scans are retried under the ipc retry policy and breaker, and the
degraded-mode notice is printed when it arrives.

Exit code with ``--once``: 0 everything allowed, 1 something flagged, 2 an
error. Without ``--once`` it runs until interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from sentinel_ipc import Client, ClientConfig, SentinelError, open_client
from sentinel_ipc.messages import Event, ScanResult

#: Names download managers write to before renaming the finished file.
PARTIAL_SUFFIXES = (".part", ".crdownload", ".download", ".partial", ".tmp", ".opdownload")


@dataclass
class StabilityTracker:
    """Which files are complete: seen with the same (size, mtime) twice in a row.

    Pure: fed a listing per poll, returns the paths that just became ready.
    A path is reported once per distinct content (a file rewritten later is
    reported again).
    """

    _last: dict[Path, tuple[int, int]] = field(default_factory=dict)
    _reported: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def poll(self, listing: dict[Path, tuple[int, int]]) -> list[Path]:
        ready = []
        for path, signature in sorted(listing.items()):
            if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIXES):
                continue
            stable = self._last.get(path) == signature
            if stable and self._reported.get(path) != signature:
                self._reported[path] = signature
                ready.append(path)
        self._last = dict(listing)
        for gone in set(self._reported) - set(listing):
            del self._reported[gone]
        return ready


def list_directory(directory: Path) -> dict[Path, tuple[int, int]]:
    listing = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    listing[Path(entry.path)] = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue  # removed while we looked
    return listing


class Watcher:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tracker = StabilityTracker()
        self.flagged = 0
        self.errors = 0

    def say(self, path: Path, result: ScanResult | None, error: str | None = None) -> None:
        if self.args.json:
            record: dict[str, object] = {"file": str(path)}
            if result is not None:
                record.update(
                    action=result.action,
                    rules=[m.rule for m in result.matches],
                    sha256=result.sha256,
                    degraded=result.degraded,
                )
            else:
                record["error"] = error
            print(json.dumps(record), flush=True)
        elif result is not None:
            rules = ", ".join(m.rule for m in result.matches)
            extra = f"  rules: {rules}" if rules else ""
            extra += "  (degraded)" if result.degraded else ""
            print(f"{result.action.upper():10} {path.name}{extra}", flush=True)
        else:
            print(f"{'ERROR':10} {path.name}: {error}", file=sys.stderr, flush=True)

    def on_event(self, event: Event) -> None:
        if event.topic == "degraded" and event.kind == "degraded_notice":
            print(f"[sentinel] {event.message}", file=sys.stderr, flush=True)
        elif event.topic == "client" and event.kind == "connection_lost":
            print("[sentinel] connection lost, reconnecting...", file=sys.stderr, flush=True)

    async def scan(self, client: Client, path: Path) -> None:
        try:
            result = await client.scan_file(path)
        except FileNotFoundError:
            return  # gone before we got to it (moved by the user)
        except (OSError, SentinelError) as exc:
            self.errors += 1
            message = exc.message if isinstance(exc, SentinelError) else str(exc)
            self.say(path, None, message)
            return
        self.say(path, result)
        if result.action != "allow":
            self.flagged += 1
            if self.args.move_to is not None:
                self.args.move_to.mkdir(parents=True, exist_ok=True)
                await trio.to_thread.run_sync(shutil.move, path, self.args.move_to / path.name)

    async def run(self) -> int:
        directory: Path = self.args.directory
        config = ClientConfig(client_name="download-watcher")
        async with open_client(self.args.socket, config=config) as client:
            if self.args.once:
                listing = list_directory(directory)
                self.tracker.poll(listing)  # a snapshot is as stable as it gets
                for path in self.tracker.poll(listing):
                    await self.scan(client, path)
                return 2 if self.errors else (1 if self.flagged else 0)
            try:
                await client.subscribe(["degraded"], callback=self.on_event)
            except SentinelError as exc:
                print(f"[sentinel] no notices: {exc.message}", file=sys.stderr)
            while True:
                listing = await trio.to_thread.run_sync(list_directory, directory)
                for path in self.tracker.poll(listing):
                    await self.scan(client, path)
                await trio.sleep(self.args.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scan files as they finish downloading.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--socket", type=Path, default=None)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--move-to", type=Path, default=None,
                        help="move files that are not allowed into this directory")
    parser.add_argument("--once", action="store_true", help="scan what is there and exit")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"download_watcher: {args.directory} is not a directory", file=sys.stderr)
        return 2
    try:
        return trio.run(Watcher(args).run)
    except KeyboardInterrupt:
        return 0
    except SentinelError as exc:
        print(f"download_watcher: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
