"""``sentinelctl``: operate a running sentineld, over the client library.

    sentinelctl [--socket PATH] [--json] [--timeout S] COMMAND ...

Exit codes (stable; scripts and probes rely on them):

* ``live`` / ``ready`` / ``health``: 0 yes (alive / ready / healthy), 1 no,
  2 the daemon is unreachable or answered with an error. So
  ``sentinelctl ready`` works as a Kubernetes or systemd probe.
* ``scan``: 0 every file allowed, 1 something warned, quarantined or blocked,
  2 an error (a file could not be read or scanned, or the daemon is away).
* every other command (``policy import`` included): 0 done, 2 an error.

Errors print one line on stderr (``sentinelctl: ...``), never a traceback;
a request this daemon does not serve says so. Human output uses ``rich``;
``--json`` prints JSON on stdout (one document, or one line per event for
``watch``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..client import Client, ClientConfig, open_client
from ..config import default_socket_path
from ..errors import (
    CircuitOpenError,
    RetryExhaustedError,
    SentinelError,
    UnknownMessageTypeError,
)
from ..messages import (
    ACTION_SEVERITY,
    MAX_POLICY_IMPORT,
    BreakersReport,
    Event,
    HealthReport,
    PolicyImportItem,
    PolicyListResult,
    QuarantineListResult,
    ScanResult,
    ThreatsResult,
)

EXIT_OK, EXIT_NO, EXIT_ERROR = 0, 1, 2
#: Files at least this large are streamed, so the bar can show their bytes.
STREAM_WITH_PROGRESS = 8 * 1024 * 1024

_STATE_STYLES = {
    "closed": "green",
    "healthy": "green",
    "half_open": "yellow",
    "degraded": "yellow",
    "open": "bold red",
    "forced_open": "bold magenta",
    "failed": "red",
    "critical": "bold red",
    "unhealthy": "bold red",
    "disabled": "dim",
}
_ACTION_STYLES = {"allow": "green", "warn": "yellow", "quarantine": "magenta", "block": "bold red"}


class CommandError(Exception):
    """A one-line failure of the command itself (bad file, bad argument)."""


# --- argument parsing ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentinelctl",
        description="Control a running Sentinel daemon.",
        epilog="Exit codes: 0 yes/done, 1 no (not live/ready/healthy; a scan found "
        "something), 2 error or daemon unreachable.",
    )
    parser.add_argument("--socket", type=Path, default=None, help="daemon socket path")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per request")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("ping", help="check that the daemon answers")
    sub.add_parser("health", help="overall health and components (exit 1 unless healthy)")
    sub.add_parser("live", help="liveness probe (exit 0 alive, 1 not, 2 unreachable)")
    sub.add_parser("ready", help="readiness probe (exit 0 ready, 1 not, 2 unreachable)")
    metrics = sub.add_parser("metrics", help="Prometheus metrics text")
    metrics.add_argument("--format", choices=["prometheus", "openmetrics"], default="prometheus")
    sub.add_parser("breakers", help="the circuit breaker table")
    breaker = sub.add_parser("breaker", help="trip or reset a breaker (admin)")
    breaker.add_argument("action", choices=["trip", "reset"])
    breaker.add_argument("name")

    scan = sub.add_parser("scan", help="scan files (exit 0 all allowed, 1 not, 2 error)")
    scan.add_argument("files", nargs="+", type=Path, metavar="FILE")
    scan.add_argument("--url", help="the URL the file came from")
    scan.add_argument("--stream", action="store_true", help="stream bytes instead of the fd")

    policy = sub.add_parser("policy", help="list, add, remove or query policies")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    psub.add_parser("list", help="all policies (fetched page by page)")
    padd = psub.add_parser("add", help="add a policy (admin)")
    padd.add_argument("action", choices=sorted(ACTION_SEVERITY, key=ACTION_SEVERITY.__getitem__))
    padd.add_argument("--sha256")
    padd.add_argument("--url-pattern")
    padd.add_argument("--rule", dest="rule_name")
    padd.add_argument("--mime", dest="mime_type")
    padd.add_argument("--reason")
    padd.add_argument("--expires-in", type=float, help="seconds until the policy expires")
    pimport = psub.add_parser(
        "import",
        help="add a sha256 blocklist file, one hash a line (admin; re-runnable)",
        description="FILE: one sha256 per line; blank lines and # comments are skipped. "
        f"Sent in batches of {MAX_POLICY_IMPORT}; hashes that already have a policy are "
        "counted as existing, not refused.",
    )
    pimport.add_argument("file", type=Path, metavar="FILE")
    pimport.add_argument(
        "--action", default="block",
        choices=sorted(ACTION_SEVERITY, key=ACTION_SEVERITY.__getitem__),
    )
    pimport.add_argument("--reason")
    prm = psub.add_parser("rm", help="remove a policy by id (admin)")
    prm.add_argument("policy_id", type=int)
    pquery = psub.add_parser("query", help="what the policies say about a file")
    pquery.add_argument("--sha256")
    pquery.add_argument("--url")
    pquery.add_argument("--rule", action="append", default=[], dest="rules")

    threats = sub.add_parser("threats", help="recent detections")
    threats.add_argument("--limit", type=int, default=20)

    quarantine = sub.add_parser("quarantine", help="list, restore or delete quarantined files")
    qsub = quarantine.add_subparsers(dest="quarantine_command", required=True)
    qsub.add_parser("list")
    qrestore = qsub.add_parser("restore", help="restore into a new file (admin)")
    qrestore.add_argument("quarantine_id")
    qrestore.add_argument("--to", type=Path, required=True, dest="dest", help="new file path")
    qdelete = qsub.add_parser("delete", help="delete for good (admin)")
    qdelete.add_argument("quarantine_id")

    service = sub.add_parser(
        "service", help="the degraded-mode notice's buttons: retry (admin) or ack"
    )
    service.add_argument("action", choices=["retry", "ack"])
    service.add_argument("name", help="service name, e.g. database")

    sub.add_parser("reload", help="reload the YARA rules (admin)")
    watch = sub.add_parser("watch", help="live dashboard of services, breakers and notices")
    watch.add_argument("--interval", type=float, default=2.0, help="refresh period, seconds")
    watch.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: never)")
    return parser


# --- rendering (pure: reply in, rich renderable out) ------------------------------------


def _styled(value: str, styles: dict[str, str] | None = None) -> Text:
    return Text(value, style=(styles or _STATE_STYLES).get(value, ""))


def render_breakers(report: BreakersReport, *, now: float) -> Table:
    """The breaker table: service, state, time in that state (SPEC's "uptime"),
    failures (consecutive / total), rejected calls, availability, retry in.
    ``now`` is Unix time (the daemon's ``state_since`` is too); "-" for a
    daemon that does not send it. A default daemon's table fits 80 columns."""
    table = Table(title="Circuit breakers", title_justify="left")
    # A narrow terminal squeezes the figures, never the names and states.
    table.add_column("Service", no_wrap=True, min_width=max(
        (len(info.name) for info in report.breakers), default=7))
    table.add_column("State", no_wrap=True, min_width=max(
        (len(info.state) for info in report.breakers), default=5))
    table.add_column("In state", justify="right")
    table.add_column("Failures\nnow/total", justify="right")
    table.add_column("Rejected", justify="right")
    table.add_column("Avail.", justify="right")
    table.add_column("Retry in", justify="right")
    for info in report.breakers:
        failures = f"{info.consecutive_failures} / {info.failures_total}"
        if info.state == "forced_open":
            retry = "on reset"
        else:
            retry = "-" if info.retry_after_s is None else f"{info.retry_after_s:.1f} s"
        since = "-" if info.state_since is None else _duration(max(0.0, now - info.state_since))
        table.add_row(
            info.name,
            _styled(info.state),
            since,
            failures,
            str(info.rejected_total),
            f"{info.availability * 100:.1f}%",
            retry,
        )
    if not report.breakers:
        table.add_row("(none)", "", "", "", "", "", "")
    return table


def render_health(report: HealthReport) -> Group:
    head = Text.assemble(
        ("Sentinel ", "bold"),
        _styled(report.status),
        f"  alive={'yes' if report.alive else 'no'}"
        f"  ready={'yes' if report.ready else 'no'}"
        f"  uptime={_duration(report.uptime_seconds)}",
        f"  rules={report.rules_version}" if report.rules_version else "",
    )
    table = Table(title="Components", title_justify="left")
    for column in ("Component", "Status", "Message"):
        table.add_column(column)
    table.add_column("Time", justify="right")
    table.add_column("Figure", justify="right")
    for name, comp in sorted(report.components.items()):
        table.add_row(
            name,
            _styled(comp.status),
            comp.message,
            f"{comp.response_ms:.1f} ms",
            "-" if comp.value is None else _figure(comp.value),
        )
    parts: list[Any] = [head]
    if report.reason:
        parts.append(Text(f"reason: {report.reason}", style="yellow"))
    parts.append(table)
    return Group(*parts)


def render_policies(result: PolicyListResult) -> Table:
    table = Table(title="Policies" + (" (from cache: degraded)" if result.degraded else ""))
    for column in ("Id", "Action", "Match", "Hits", "Reason", "Expires"):
        table.add_column(column)
    for p in result.policies:
        match = " ".join(
            f"{k}={v}"
            for k, v in (
                ("sha256", p.file_hash),
                ("url", p.url_pattern),
                ("rule", p.rule_name),
                ("mime", p.mime_type),
            )
            if v
        )
        table.add_row(
            str(p.id), _styled(p.action, _ACTION_STYLES), match, str(p.hit_count),
            p.reason or "", _timestamp(p.expires_at),
        )
    return table


def render_threats(result: ThreatsResult) -> Table:
    table = Table(title="Threats")
    for column in ("When", "Action", "File", "Rules", "SHA-256"):
        table.add_column(column)
    for t in result.threats:
        table.add_row(
            _timestamp(t.detected_at), _styled(t.action_taken, _ACTION_STYLES),
            t.filename or t.url or "", ", ".join(t.rule_names), t.file_hash[:16],
        )
    return table


def render_quarantine(result: QuarantineListResult) -> Table:
    table = Table(title="Quarantine")
    for column in ("Id", "File", "Size", "Rules", "Since"):
        table.add_column(column)
    for q in result.items:
        table.add_row(
            q.quarantine_id, q.filename or q.url or q.sha256[:16], _figure(q.size),
            ", ".join(q.rules), _timestamp(q.quarantined_at),
        )
    return table


def scan_line(name: str, result: ScanResult) -> Text:
    """One line per file: the action and the matched rules."""
    line = Text.assemble(
        (f"{name}: ", "bold"), _styled(result.action.upper(), {
            k.upper(): v for k, v in _ACTION_STYLES.items()
        }),
    )
    if result.matches:
        rules = ", ".join(f"{m.namespace}:{m.rule}" for m in result.matches)
        line.append(f"  rules: {rules}")
    if result.policy_id is not None:
        line.append(f"  policy #{result.policy_id}")
    if result.degraded:
        reasons = ", ".join(result.degraded_reasons) or "yes"
        line.append(f"  degraded: {reasons}", style="yellow")
    for warning in result.warnings:
        line.append(f"  warning: {warning}", style="yellow")
    return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _figure(value: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)  # pragma: no cover


def _timestamp(at: float | None) -> str:
    if not at:
        return "-"
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


# --- commands -------------------------------------------------------------------------------


class Ctl:
    """One invocation: the parsed args, the consoles, the client."""

    def __init__(self, args: argparse.Namespace, client: Client) -> None:
        self.args = args
        self.client = client
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False)

    def emit_json(self, value: Any) -> None:
        sys.stdout.write(msgspec.json.encode(_jsonable(value)).decode() + "\n")
        sys.stdout.flush()

    def show(self, reply: msgspec.Struct, renderable: Any) -> None:
        if self.args.json:
            self.emit_json(reply)
        else:
            self.out.print(renderable)

    async def run(self) -> int:
        handler: Callable[[], Any] = getattr(self, "cmd_" + self.args.command)
        result: int = await handler()
        return result

    async def cmd_ping(self) -> int:
        rtt = await self.client.ping(timeout=self.args.timeout)
        if self.args.json:
            self.emit_json({"ok": True, "rtt_ms": round(rtt * 1000, 3)})
        else:
            self.out.print(f"pong from {self.client.socket_path} in {rtt * 1000:.2f} ms")
        return EXIT_OK

    async def cmd_health(self) -> int:
        report = await self.client.health(timeout=self.args.timeout)
        self.show(report, render_health(report))
        return EXIT_OK if report.status == "healthy" else EXIT_NO

    async def cmd_live(self) -> int:
        report = await self.client.live(timeout=self.args.timeout)
        return self._probe(report, report.alive, "alive")

    async def cmd_ready(self) -> int:
        report = await self.client.ready(timeout=self.args.timeout)
        return self._probe(report, report.ready, "ready")

    def _probe(self, report: HealthReport, yes: bool, what: str) -> int:
        if self.args.json:
            self.emit_json(report)
        elif yes:
            self.out.print(what)
        else:
            self.out.print(f"not {what}" + (f": {report.reason}" if report.reason else ""))
        return EXIT_OK if yes else EXIT_NO

    async def cmd_metrics(self) -> int:
        report = await self.client.metrics(self.args.format, timeout=self.args.timeout)
        if self.args.json:
            self.emit_json(report)
        else:
            sys.stdout.write(report.text)
        return EXIT_OK

    async def cmd_breakers(self) -> int:
        report = await self.client.breakers(timeout=self.args.timeout)
        self.show(report, render_breakers(report, now=time.time()))
        return EXIT_OK

    async def cmd_breaker(self) -> int:
        name = self.args.name
        if self.args.action == "trip":
            ack = await self.client.breaker_trip(name, timeout=self.args.timeout)
        else:
            ack = await self.client.breaker_reset(name, timeout=self.args.timeout)
        self.show(ack, ack.detail or f"breaker {name}: {self.args.action} done")
        return EXIT_OK

    async def cmd_scan(self) -> int:
        files: list[Path] = self.args.files
        sizes: dict[Path, int] = {}
        failures: list[str] = []
        for path in files:
            try:
                sizes[path] = path.stat().st_size
            except OSError as exc:
                failures.append(f"{path}: {exc.strerror or exc}")
        results: list[tuple[Path, ScanResult | str]] = []
        total = sum(sizes.values())
        show_bar = (
            not self.args.json
            and self.err.is_terminal
            and (len(sizes) > 1 or total >= STREAM_WITH_PROGRESS)
        )
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
            TimeRemainingColumn(), console=self.err, transient=True, disable=not show_bar,
        )
        with progress:
            task = progress.add_task("scanning", total=total or None)
            for path, size in sizes.items():
                progress.update(task, description=path.name)
                done_before = progress.tasks[0].completed

                def advance(sent: int, _total: int | None, base: float = done_before) -> None:
                    progress.update(task, completed=base + sent)

                stream = self.args.stream or (show_bar and size >= STREAM_WITH_PROGRESS)
                try:
                    result: ScanResult | str = await self.client.scan_file(
                        path,
                        method="stream" if stream else "auto",
                        url=self.args.url,
                        progress=advance if stream else None,
                    )
                except OSError as exc:
                    result = f"cannot read: {exc.strerror or exc}"
                except UnknownMessageTypeError:
                    raise
                except CircuitOpenError:
                    raise
                except SentinelError as exc:
                    result = f"error: {describe(exc)}"
                progress.update(task, completed=done_before + size)
                results.append((path, result))
                if not self.args.json:
                    if isinstance(result, ScanResult):
                        self.out.print(scan_line(str(path), result))
                    else:
                        self.err.print(f"sentinelctl: {path}: {result}", style="red")
        if self.args.json:
            self.emit_json(
                [
                    {"file": str(p), "result": r} if isinstance(r, ScanResult)
                    else {"file": str(p), "error": r}
                    for p, r in results
                ] + [{"file": f.split(":")[0], "error": f} for f in failures]
            )
        else:
            for failure in failures:
                self.err.print(f"sentinelctl: {failure}", style="red")
        if failures or any(not isinstance(r, ScanResult) for _, r in results):
            return EXIT_ERROR
        flagged = any(isinstance(r, ScanResult) and r.action != "allow" for _, r in results)
        return EXIT_NO if flagged else EXIT_OK

    async def cmd_policy(self) -> int:
        args = self.args
        command = args.policy_command
        if command == "list":
            listing = await self.client.policy_list(timeout=args.timeout)
            self.show(listing, render_policies(listing))
        elif command == "add":
            if not any((args.sha256, args.url_pattern, args.rule_name, args.mime_type)):
                raise CommandError("policy add needs --sha256, --url-pattern, --rule or --mime")
            expires = None
            if args.expires_in is not None:
                expires = datetime.datetime.now().timestamp() + args.expires_in
            added = await self.client.policy_add(
                args.action, sha256=args.sha256, url_pattern=args.url_pattern,
                rule_name=args.rule_name, mime_type=args.mime_type, reason=args.reason,
                expires_at=expires, timeout=args.timeout,
            )
            note = " (queued: the database is down; applied on recovery)" if added.queued else ""
            self.show(added, f"added policy #{added.policy_id}{note}")
        elif command == "import":
            return await self.policy_import()
        elif command == "rm":
            removed = await self.client.policy_remove(args.policy_id, timeout=args.timeout)
            note = " (queued: applied on recovery)" if removed.queued else ""
            self.show(removed, f"removed policy #{args.policy_id}{note}")
        else:
            if not (args.sha256 or args.url or args.rules):
                raise CommandError("policy query needs --sha256, --url or --rule")
            decision = await self.client.policy_query(
                sha256=args.sha256, url=args.url, rule_names=args.rules, timeout=args.timeout
            )
            text = Text.assemble(_styled(decision.action, _ACTION_STYLES))
            if decision.policy_id is not None:
                text.append(f"  policy #{decision.policy_id}")
            if decision.reason:
                text.append(f"  {decision.reason}")
            if decision.degraded:
                text.append("  (degraded: from cache)", style="yellow")
            self.show(decision, text)
        return EXIT_OK

    async def policy_import(self) -> int:
        """``policy import FILE``: every line checked before anything is sent."""
        args = self.args
        hashes = read_hash_file(args.file)
        added = existing = 0
        queued = False
        for start in range(0, len(hashes), MAX_POLICY_IMPORT):
            items = [
                PolicyImportItem(action=args.action, sha256=h, reason=args.reason)
                for h in hashes[start : start + MAX_POLICY_IMPORT]
            ]
            result = await self.client.policy_import(items, timeout=args.timeout)
            added += result.added
            existing += result.existing
            queued = queued or result.queued
        if args.json:
            self.emit_json(
                {"added": added, "existing": existing, "queued": queued, "hashes": len(hashes)}
            )
        else:
            note = " (queued: the database is down; applied on recovery)" if queued else ""
            self.out.print(f"added {added}, existing {existing}{note}")
        return EXIT_OK

    async def cmd_threats(self) -> int:
        result = await self.client.threats(limit=self.args.limit, timeout=self.args.timeout)
        self.show(result, render_threats(result))
        return EXIT_OK

    async def cmd_quarantine(self) -> int:
        args = self.args
        if args.quarantine_command == "list":
            listing = await self.client.quarantine_list(timeout=args.timeout)
            self.show(listing, render_quarantine(listing))
            return EXIT_OK
        if args.quarantine_command == "delete":
            deleted = await self.client.quarantine_delete(args.quarantine_id, timeout=args.timeout)
            self.show(deleted, f"deleted {deleted.quarantine_id}")
            return EXIT_OK
        dest: Path = args.dest
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise CommandError(f"cannot create {dest}: {exc.strerror or exc}") from exc
        ok = False
        try:
            restored = await self.client.quarantine_restore(
                args.quarantine_id, dest_fd=fd, timeout=args.timeout
            )
            ok = True
        finally:
            os.close(fd)
            if not ok:
                dest.unlink(missing_ok=True)
        self.show(restored, f"restored {restored.quarantine_id} to {dest}")
        return EXIT_OK

    async def cmd_service(self) -> int:
        name = self.args.name
        if self.args.action == "retry":
            ack = await self.client.retry_service(name, timeout=self.args.timeout)
        else:
            ack = await self.client.acknowledge_degraded(name, timeout=self.args.timeout)
        self.show(ack, ack.detail or f"{name}: {self.args.action} done")
        return EXIT_OK

    async def cmd_reload(self) -> int:
        result = await self.client.reload(timeout=max(self.args.timeout, 30.0))
        self.show(
            result,
            f"rules {result.rules_version}: {result.rule_count} rules "
            f"in {result.namespaces} namespaces",
        )
        return EXIT_OK

    async def cmd_watch(self) -> int:
        return await Watch(self).run()


class Watch:
    """``sentinelctl watch``: services and breakers, refreshed; events as they come."""

    def __init__(self, ctl: Ctl) -> None:
        self.ctl = ctl
        self.events: deque[Event] = deque(maxlen=8)
        self.notice: Event | None = None
        self.health: HealthReport | None = None
        self.breakers: BreakersReport | None = None
        self.error: str | None = None

    def on_event(self, event: Event) -> None:
        if self.ctl.args.json:
            self.ctl.emit_json({"event": event})
            return
        self.events.append(event)
        if event.topic == "degraded" and event.kind in ("notice", "degraded_notice"):
            self.notice = event
        elif event.topic == "degraded" and event.kind in ("cleared", "degraded_cleared"):
            self.notice = None

    def render(self) -> Group:
        parts: list[Any] = []
        if self.notice is not None:
            actions = " / ".join(self.notice.actions) or "Retry Connection / Continue with Cache"
            parts.append(
                Panel(
                    Text(self.notice.message or "Sentinel operating in degraded mode")
                    + Text(
                        f"\n[{actions}]  sentinelctl service retry|ack {self.notice.service}",
                        style="dim",
                    ),
                    title="degraded mode",
                    border_style="yellow",
                )
            )
        if self.error:
            parts.append(Text(f"daemon: {self.error}", style="bold red"))
        if self.health is not None:
            parts.append(render_health(self.health))
        if self.breakers is not None:
            parts.append(render_breakers(self.breakers, now=time.time()))
        table = Table(title="Recent events", title_justify="left")
        for column in ("At", "Topic", "Kind", "Service", "State", "Message"):
            table.add_column(column)
        for e in self.events:
            table.add_row(
                _timestamp(e.at) if e.at > 1e9 else "-", e.topic, e.kind, e.service or "",
                e.state or "", e.message or e.reason or "",
            )
        parts.append(table)
        return Group(*parts)

    async def refresh(self) -> None:
        client, timeout = self.ctl.client, self.ctl.args.timeout
        try:
            self.health = await client.health(timeout=timeout)
            self.breakers = await client.breakers(timeout=timeout)
            self.error = None
        except SentinelError as exc:
            self.error = describe(exc)
        if self.ctl.args.json:
            self.ctl.emit_json(
                {"health": self.health, "breakers": self.breakers, "error": self.error}
            )

    async def run(self) -> int:
        args = self.ctl.args
        sub = await self.ctl.client.subscribe(
            ["services", "degraded", "breakers"], callback=self.on_event, timeout=args.timeout
        )
        try:
            count = 0
            if args.json:
                while True:
                    await self.refresh()
                    count += 1
                    if args.count and count >= args.count:
                        return EXIT_OK
                    await trio.sleep(args.interval)
            with Live(self.render(), console=self.ctl.out, auto_refresh=False) as live:
                while True:
                    await self.refresh()
                    live.update(self.render(), refresh=True)
                    count += 1
                    if args.count and count >= args.count:
                        return EXIT_OK
                    with trio.move_on_after(args.interval):
                        while True:  # redraw as events arrive
                            await sub.receive()
                            live.update(self.render(), refresh=True)
        finally:
            await sub.aclose()


# --- errors and entry point -------------------------------------------------------------------


def describe(exc: SentinelError) -> str:
    """One line for a person: the root cause, not the retry machinery's wrapping."""
    if isinstance(exc, RetryExhaustedError) and isinstance(exc.__cause__, SentinelError):
        attempts = getattr(exc, "attempts", None)
        suffix = ""
        if attempts:
            suffix = f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
        return describe(exc.__cause__) + suffix
    if isinstance(exc, UnknownMessageTypeError):
        return f"this daemon does not serve that request yet ({exc.code}: {exc.message})"
    if isinstance(exc, CircuitOpenError):
        retry = f"; retry in {exc.retry_after:.1f} s" if exc.retry_after else ""
        return f"{exc.message}{retry}"
    return exc.message


def read_hash_file(path: Path) -> list[str]:
    """The sha256s of a blocklist file, lower-cased: one per line, blank lines
    and ``#`` comments (whole-line or trailing) skipped. Raises CommandError
    naming the first line that is not 64 hex characters."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    hashes: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        value = line.partition("#")[0].strip()
        if not value:
            continue
        if len(value) != 64 or any(c not in _HEX for c in value):
            shown = value if len(value) <= 80 else value[:77] + "..."
            raise CommandError(
                f"{path}:{number}: not a sha256 (64 hexadecimal characters): {shown!r}; "
                "nothing was sent"
            )
        hashes.append(value.lower())
    return hashes


_HEX = frozenset("0123456789abcdefABCDEF")


def _jsonable(value: Any) -> Any:
    return msgspec.to_builtins(value, str_keys=True)


def _fail(message: str) -> NoReturn:
    print(f"sentinelctl: {message}", file=sys.stderr)
    raise SystemExit(EXIT_ERROR)


async def _main(args: argparse.Namespace, socket_path: Path) -> int:
    config = ClientConfig(client_name="sentinelctl", timeout=args.timeout)
    async with open_client(socket_path, config=config) as client:
        return await Ctl(args, client).run()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        _fail("--timeout must be > 0")
    socket_path = args.socket or default_socket_path()
    try:
        return trio.run(_main, args, socket_path)
    except SentinelError as exc:
        print(f"sentinelctl: {describe(exc)}", file=sys.stderr)
    except CommandError as exc:
        print(f"sentinelctl: {exc}", file=sys.stderr)
    except trio.TooSlowError:
        print(
            f"sentinelctl: no answer from {socket_path} within {args.timeout:g} s",
            file=sys.stderr,
        )
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
