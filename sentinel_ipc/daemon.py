"""The composition root: builds every subsystem, wires handlers, runs the server.

Order of start-up matters: the data dir and the subsystems come up first, the
socket last, so a client that can connect finds a daemon that can answer. On
SIGTERM / SIGINT (or an admin ``shutdown`` request) the server drains, the
subsystems close (workers reaped), the socket and its lock file are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .config import Config
from .errors import SentinelError
from .handlers import core
from .logs import log_event
from .messages import Limits
from .observability.hub import Observability
from .observability.metrics import SentinelMetrics
from .server.dispatch import Dispatcher
from .server.listener import acquire_lock, open_unix_listener, prepare_socket_dir, release_lock
from .server.peer import PeerCredentials
from .server.server import Server

if TYPE_CHECKING:  # external integrations: imported (with httpx) only when configured
    from .audit import AuditLog
    from .external import EventForwarder, ExternalMetrics, ReputationClient
    from .messages import Event
    from .policy import PolicyService, Quarantine
    from .scanning import Scanner, ScannerConfig
    from .verdict import VerdictMaker


#: Descriptors beyond one per connection: state files, worker pipes and pidfds,
#: memfds of scans in flight, descriptors passed with scan_fd.
FD_RESERVE = 512


def raise_fd_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE to fit ``max_connections`` plus a reserve (up to
    the hard limit). At a stock soft limit of 1024, a daemon near 1000 connections
    runs out: accept() fails with EMFILE and peers wait in the backlog, unanswered,
    where they should have been served or told ``busy``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_RESERVE:
        log_event("fd_limit_low", logging.WARNING, limit=soft, max_connections=max_connections,
                  advice="raise the hard RLIMIT_NOFILE (LimitNOFILE= in systemd)")


class Daemon:
    """One running sentineld."""

    def __init__(self, config: Config, socket_path: Path, data_dir: Path) -> None:
        self.config = config
        self.socket_path = socket_path
        self.data_dir = data_dir
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()
        self.dispatcher = Dispatcher()
        self.server = Server(config.server, self.dispatcher)
        self._shutdown = trio.Event()
        self._exit_stack: AsyncExitStack | None = None
        #: External integrations (section "external integrations"); None when not configured.
        self.reputation: ReputationClient | None = None
        self.forwarder: EventForwarder | None = None
        self.external_metrics: ExternalMetrics | None = None
        self.observability: Observability | None = None
        #: The metrics registry (``self.observability.metrics``), for other sections.
        self.metrics: SentinelMetrics | None = None
        self.audit: AuditLog | None = None
        self.scanner: Scanner | None = None
        self.policy: PolicyService | None = None
        self.quarantine: Quarantine | None = None
        self.verdicts: VerdictMaker | None = None

    def request_shutdown(self) -> None:
        self._shutdown.set()

    @property
    def limits(self) -> Limits:
        server = self.config.server
        return Limits(
            max_frame_bytes=server.max_frame_bytes,
            max_in_flight_per_connection=server.max_in_flight_per_connection,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise_fd_limit(self.config.server.max_connections)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        server_cfg = self.config.server
        dir_mode = 0o750 if server_cfg.socket_group else 0o700
        prepare_socket_dir(self.socket_path, dir_mode=dir_mode, group=server_cfg.socket_group)
        lock_fd = acquire_lock(self.socket_path)
        try:
            async with AsyncExitStack() as stack:
                try:
                    await stack.enter_async_context(self._subsystems())
                except BaseExceptionGroup as group:
                    # A subsystem that cannot start (rules that do not compile, a
                    # database that cannot open) reaches us wrapped by the nurseries
                    # of the sections before it: the CLI reports the error, not a
                    # traceback of the group.
                    error = _sole_sentinel_error(group)
                    if error is None:
                        raise
                    raise error from None
                core.register(
                    self.dispatcher, limits=self.limits, request_shutdown=self.request_shutdown
                )
                listener = await open_unix_listener(
                    self.socket_path, mode=server_cfg.socket_mode, group=server_cfg.socket_group
                )
                stack.callback(self._remove_socket, listener)
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.server.serve, listener)
                    nursery.start_soon(self._watch_signals, nursery)
                    log_event(
                        "listening",
                        logging.INFO,
                        socket=str(self.socket_path),
                        data_dir=str(self.data_dir),
                        pid=os.getpid(),
                    )
                    task_status.started()
                    await self._shutdown.wait()
                    await self.server.drain(server_cfg.shutdown_grace)
                    nursery.cancel_scope.cancel()
        finally:
            release_lock(self.socket_path, lock_fd)
        log_event("stopped", logging.INFO)

    @contextlib.asynccontextmanager
    async def _subsystems(self) -> AsyncIterator[None]:
        """Start the subsystems (scanner, policy store, health...) and register handlers.

        Each subsystem owns one marked section below. Order: what others depend
        on comes first (audit, metrics, events), then the dependencies
        (scanner, policy store), then what observes them (health).
        """
        async with AsyncExitStack() as stack:
            # --- section: audit -------------------------------------------------
            from .audit import open_audit_log

            audit_cfg = self.config.audit
            audit = self.audit = await stack.enter_async_context(
                open_audit_log(
                    Path(audit_cfg.path) if audit_cfg.path else self.data_dir / "audit.jsonl",
                    max_bytes=audit_cfg.max_bytes,
                    backups=audit_cfg.backups,
                )
            )

            def audit_refusal(peer: PeerCredentials, what: str) -> None:
                audit.record(
                    "request_refused", uid=peer.uid, gid=peer.gid, pid=peer.pid, request=what
                )

            self.server.on_refusal = audit_refusal
            # --- end: audit
            # --- section: observability (metrics, events, fallback manager) -----
            from .observability.hub import open_observability

            self.observability = await stack.enter_async_context(
                open_observability(
                    self.config,
                    self.data_dir,
                    self.server,
                    started_monotonic=self.started_monotonic,
                )
            )
            self.metrics = self.observability.metrics
            # Every breaker transition and service state change reaches the audit log
            # (the policy service audits the database's own, with journal details).
            audit_sub = self.observability.bus.subscribe(
                0, ["breakers", "services"], self._audit_bus_event
            )
            stack.callback(audit_sub.close)
            # --- end: observability
            # --- section: scanning -----------------------------------------------
            from .scanning import open_scanner

            self.scanner = await stack.enter_async_context(
                open_scanner(self.scanner_config(), self.data_dir)
            )
            # --- end: scanning
            # --- section: policy -------------------------------------------------
            from .policy import Quarantine, open_policy_service

            policy_cfg = self.config.policy.to_config(
                self.config.resilience, self.config.server.admin_uids
            )
            self.policy = await stack.enter_async_context(
                open_policy_service(policy_cfg, self.data_dir, audit=self.audit)
            )
            self.quarantine = Quarantine(
                policy_cfg.resolve(self.data_dir)[3], audit=self.audit,
                max_bytes=policy_cfg.quarantine_max_bytes,
                max_items=policy_cfg.quarantine_max_items,
            )
            # --- end: policy
            # --- section: external integrations ----------------------------------
            if self.config.reputation.enabled or self.config.forward.enabled:
                await self._open_external(stack)
            # --- end: external integrations
            # --- section: handlers -----------------------------------------------
            from .handlers import observability as observability_handlers
            from .handlers import policy as policy_handlers
            from .handlers import rules as rules_handlers
            from .handlers import scan as scan_handlers
            from .verdict import VerdictMaker

            observability_handlers.register(self.dispatcher, self.observability)
            self.verdicts = VerdictMaker(
                policy=self.policy,
                quarantine=self.quarantine,
                reputation=self.reputation,
                fail_closed=not self.config.resilience.scanner_fail_open,
                forwarder=self.forwarder,
                audit=self.audit,
            )
            scan_handlers.register(
                self.dispatcher,
                scanner=self.scanner,
                verdicts=self.verdicts,
                rate_limit=self.config.rate_limit,
                shared_socket=self.config.server.socket_shared,
            )
            policy_handlers.register(
                self.dispatcher, policy=self.policy, quarantine=self.quarantine,
                reads_per_uid=self.config.server.uid_share(self.config.policy.max_queued_reads),
            )
            rules_handlers.register(self.dispatcher, scanner=self.scanner, audit=self.audit)
            # --- end: handlers
            # --- section: health -------------------------------------------------
            # Attach whatever the sections above built (absent ones are skipped),
            # run the first round of checks, then check periodically.
            await self.observability.start(
                scanner=getattr(self, "scanner", None),
                policy=getattr(self, "policy", None),
                verdicts=getattr(self, "verdicts", None),
            )
            # Stop checking (and save the state) before the subsystems close.
            stack.push_async_callback(self.observability.stop)
            # --- end: health
            self._exit_stack = stack
            yield

    async def _open_external(self, stack: AsyncExitStack) -> None:
        """Section "external integrations": the reputation client and the event
        forwarder (both off unless their ``url`` is set). Their breakers join the
        observability hub as service "external" (metrics, breaker table, state
        persistence, degraded notices), with an ``external`` health check and
        their own metrics collector."""
        from . import __version__
        from .external import (
            ExternalMetrics,
            open_event_forwarder,
            open_reputation_client,
        )
        from .external.metrics import ExternalCollector, external_check

        self.external_metrics = metrics = ExternalMetrics()
        # [resilience.breakers.external] and [resilience.retries.external]; each
        # integration gets a breaker of its own with these numbers. (Disabled,
        # with breakers_enabled = false, when the hub registers it below.)
        resilience = self.config.resilience
        breaker_config = resilience.breaker_config("external")
        retry = resilience.retry_policy("external")
        if self.config.reputation.enabled:
            self.reputation = await stack.enter_async_context(
                open_reputation_client(
                    self.config.reputation, self.data_dir, metrics=metrics,
                    breaker_config=breaker_config, retry=retry,
                )
            )
        if self.config.forward.enabled:
            self.forwarder = await stack.enter_async_context(
                open_event_forwarder(
                    self.config.forward, self.data_dir, metrics=metrics,
                    breaker_config=breaker_config, retry=retry,
                )
            )
            self.forwarder.emit(
                "daemon_started", "low", {"pid": os.getpid(), "version": __version__}
            )
        obs = self.observability
        if obs is not None:
            obs.metrics.registry.register(ExternalCollector(metrics, lambda: self.forwarder))
            for client in (self.reputation, self.forwarder):
                if client is not None:
                    obs.add_breaker(client.breaker, service="external")
            obs.health.add("external", external_check(self.reputation, self.forwarder), timeout=1.0)
            if self.forwarder is not None:
                # Degraded-mode notices, service states and breaker transitions go to
                # the receiver too; unsubscribed before the forwarder closes (LIFO).
                sub = obs.bus.subscribe(
                    0, ["services", "degraded", "breakers"], self._forward_bus_event
                )
                stack.callback(sub.close)

    async def _audit_bus_event(self, event: Event) -> None:
        if self.audit is None or event.service == "database":
            return
        if event.kind == "breaker_transition":
            self.audit.record("breaker_transition", breaker=event.service,
                              from_state=event.previous, to_state=event.state,
                              reason=event.reason)
        elif event.kind == "service_state":
            self.audit.record("service_state", service=event.service, state=event.state,
                              previous=event.previous, reason=event.reason)

    async def _forward_bus_event(self, event: Event) -> None:
        if self.forwarder is not None:
            self.forwarder.emit(
                event.kind,
                "low" if event.topic == "breakers" else "normal",
                {
                    "topic": event.topic,
                    "service": event.service,
                    "state": event.state,
                    "previous": event.previous,
                    "reason": event.reason,
                    "message": event.message,
                    "at": event.at,
                },
            )

    async def _watch_signals(self, nursery: trio.Nursery) -> None:
        # A SIGHUP reload runs beside this loop: compiling a large rule set takes
        # minutes, and SIGTERM must still stop the daemon meanwhile (cancelling the
        # compile). SIGHUPs during a reload ask for one more, not one each.
        reload_send, reload_receive = trio.open_memory_channel[None](1)
        nursery.start_soon(self._reload_on_sighup, reload_receive)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    with contextlib.suppress(trio.WouldBlock):
                        reload_send.send_nowait(None)
                    continue
                log_event("signal", logging.INFO, signal=signal.Signals(signum).name)
                self.request_shutdown()

    async def _reload_on_sighup(self, requests: trio.MemoryReceiveChannel[None]) -> None:
        async for _ in requests:
            await self.on_sighup()

    async def on_sighup(self) -> None:
        """SIGHUP: reload the rules; a failed compile keeps the old set serving.

        Never raises: an operator's signal must not take the daemon down.
        """
        if self.scanner is None:
            return
        from .handlers.rules import reload_rules

        try:
            await reload_rules(self.scanner, self.audit, trigger="sighup")
        except SentinelError:
            pass  # logged and audited by reload_rules
        except Exception as exc:
            log_event("rules_reload_failed", logging.ERROR, trigger="sighup", error=repr(exc))

    def scanner_config(self) -> ScannerConfig:
        """``[scanner]`` with the yara breaker, retry and fail mode from ``[resilience]``."""
        resilience = self.config.resilience
        return self.config.scanner.to_config(
            breaker=resilience.breaker_config("yara"),
            retry=resilience.retry_policy("yara"),
            fail_closed=not resilience.scanner_fail_open,
        )

    def _remove_socket(self, listener: trio.socket.SocketType) -> None:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


def _sole_sentinel_error(group: BaseExceptionGroup[BaseException]) -> SentinelError | None:
    """The one SentinelError ``group`` (however nested) holds, if it holds nothing else."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], SentinelError):
        return leaves[0]
    return None
