"""The I/O side of graceful degradation: one object that wires breakers, health
checks, the FallbackManager, metrics, events and persistence together.

Theory of operation
-------------------
The pure :class:`~sentinel_ipc.resilience.fallback.FallbackManager` holds one
state per service (healthy / degraded / failed / critical). This hub feeds it
*events* and acts on its *transitions*:

Feeds (service by service, never across services, so a failing database can
never make the scanner look failed):

* every breaker registered with :meth:`Observability.add_breaker`: open or
  forced open -> ``primary_failed``, closed -> ``primary_ok``;
* the PolicyService's own state (degraded = serving from its cache) ->
  ``primary_failed`` / ``primary_ok``, and a cache that cannot be persisted
  while degraded -> ``fallback_failed``;
* every health result: a database, yara or network check that fails ->
  ``primary_failed`` (its fallback serves); a disk, memory or ipc check that
  fails -> ``primary_degraded`` (the primary works, short of something); a
  passing check -> ``primary_ok`` only when the service's breaker is closed
  and its owner does not say it is degraded (a check passing does not
  overrule a breaker that is still open).

Transitions go out as ``service_state`` events, degraded-mode notices (with
*Retry Connection* / *Continue with Cache*) or ``degraded_cleared`` events,
and a debounced, atomic save of the state file.

Persistence and restarts: the FallbackManager's snapshot (states and
acknowledgements) and every breaker's snapshot are written to
``resilience_state.json`` on each change and at shutdown. At start the
FallbackManager is restored at once. Breakers are restored when they attach
if they were open (or forced open) and have had no success since the
daemon started: the time they still had to stay open, minus the downtime,
is honoured, so a restarted daemon does not hammer a dependency that was
failing. (The scanner and the policy store build their breakers and make
their first calls before this hub sees them; a success in those first calls
means the dependency is back, and then the old snapshot is ignored.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import msgspec
import trio

from ..errors import CircuitOpenError, InvalidMessageError, NotFoundError, SentinelError
from ..logs import log_event
from ..messages import BreakerInfo, Event, HealthReport, ScanResult
from ..resilience.breaker import BreakerState, CircuitBreaker
from ..resilience.fallback import FallbackManager, ServiceState, ServiceTransition
from ..resilience.instruments import BreakerTransition
from .checks import DiskCheck, MemoryCheck, http_check, ipc_check, yara_check
from .events import NOTICE_ACTIONS, EventBus, NoticeBoard, Subscription, notice_text, open_event_bus
from .health import CheckOutcome, CheckResult, HealthRegistry
from .http import HttpRequest, HttpResponse, serve_http
from .metrics import SentinelMetrics
from .state_store import PersistedState, StateStore

if TYPE_CHECKING:
    from ..config import Config
    from ..server.server import Server

__all__ = ["Observability", "PolicyLike", "ScannerLike", "open_observability"]

#: Services whose failing check means "down, the fallback serves".
_FAIL_SERVICES = frozenset({"database", "yara"})
_OPEN_STATES = frozenset({BreakerState.OPEN, BreakerState.FORCED_OPEN})
_SAVE_SPACING = 0.2  # seconds between two saves of the state file


class ScannerLike(Protocol):
    """What the hub needs of the scanner (``sentinel_ipc.scanning.Scanner``)."""

    breaker: CircuitBreaker

    @property
    def rules_version(self) -> str: ...

    @property
    def rule_count(self) -> int: ...

    async def self_test(self, timeout: float = 2.0) -> float: ...

    def worker_pids(self) -> list[int]: ...

    def statistics(self) -> Any: ...


class PolicyLike(Protocol):
    """What the hub needs of the policy store (``sentinel_ipc.policy.PolicyService``)."""

    breaker: CircuitBreaker
    db_path: Path

    @property
    def degraded(self) -> bool: ...

    @property
    def degraded_reason(self) -> str | None: ...

    async def check_health(self) -> float: ...

    async def retry_now(self) -> bool: ...

    def add_state_listener(self, cb: Callable[[bool, str | None], object]) -> None: ...

    def add_query_observer(self, cb: Callable[[str, float], object]) -> None: ...

    def statistics(self) -> dict[str, Any]: ...


class Observability:
    """Health, metrics, events and degraded-mode state of one daemon.

    Built by :func:`open_observability` in the daemon's ``observability``
    section; other sections reach it as ``daemon.observability`` to register
    breakers (:meth:`add_breaker`), checks (``.health.add``), collectors
    (``.metrics.registry.register``). :meth:`start` (the ``health`` section)
    attaches the scanner and the policy store and starts the periodic checks.
    """

    def __init__(
        self,
        config: Config,
        data_dir: Path,
        server: Server,
        *,
        bus: EventBus,
        nursery: trio.Nursery,
        store: StateStore,
        persisted: PersistedState | None,
        started_monotonic: float | None = None,
    ) -> None:
        self.config = config
        self.settings = settings = config.resilience
        self.data_dir = data_dir
        self.server = server
        self.bus = bus
        self.store = store
        self.persisted = persisted
        self._nursery = nursery
        self.metrics = SentinelMetrics()
        self.health = HealthRegistry(
            interval=settings.check_interval, started_monotonic=started_monotonic
        )
        self.fallback = FallbackManager(clock=trio.current_time)
        self.fallback.add_listener(self._on_service_transition)
        self.notices = NoticeBoard()
        self.breakers: dict[str, CircuitBreaker] = {}
        self._breaker_service: dict[str, str] = {}
        self.scanner: ScannerLike | None = None
        self.policy: PolicyLike | None = None
        self.http_address: tuple[str, int] | None = None
        self._dirty = trio.Event()
        self._started = False
        self._stopped = False
        self._bg_scope = trio.CancelScope()
        self._restored_breakers: set[str] = set()
        self.disk = DiskCheck.default(
            data_dir, settings.health.min_free_bytes, settings.health.extra_disk_paths
        )
        self.memory = MemoryCheck(self._worker_pids, settings.health.max_rss_bytes)
        self._wire_metrics()
        self._register_base_checks()
        self.health.add_listener(self._on_check)
        self.health.add_status_contributor(self._system_status)

    # -- set-up ------------------------------------------------------------------

    def _wire_metrics(self) -> None:
        m = self.metrics
        m.connections = lambda: self.server.active_connections
        m.receive_buffer = lambda: (
            self.server.receive_budget.used, self.server.receive_budget.waiting
        )
        m.errors = lambda: dict(self.server.errors_by_code)
        m.disk_free = lambda: dict(self.disk.free_by_mount)
        m.rss = lambda: self.memory.last_rss or None
        m.workers_rss = lambda: self.memory.last_workers_rss if self.memory.last_rss else None
        m.scanner_events = self._scanner_events
        m.breakers = lambda: list(self.breakers.values())
        m.service_states = lambda: {
            name: str(status.state)
            for name, status in self.fallback.statistics().services.items()
        }

    def _register_base_checks(self) -> None:
        h = self.settings.health
        self.health.add(
            "ipc",
            ipc_check(lambda: self.server.active_connections, h.max_connections),
            timeout=h.ipc_timeout,
            live=True,
        )
        self.health.add("memory", self.memory, timeout=h.memory_timeout, live=True)
        self.health.add("disk", self.disk, timeout=h.disk_timeout, failure_status="unhealthy")
        for n, item in enumerate(h.http_checks()):
            name = item.name or f"http:{_host_of(item.url)}"
            if name in self.health.names():
                name = f"{name}#{n}"
            self.fallback.register(name)
            self.health.add(name, http_check(item.url), timeout=item.timeout)

    def _restore_fallback(self) -> None:
        persisted = self.persisted
        if persisted is None or persisted.fallback is None:
            return
        try:
            self.fallback.restore(persisted.fallback, elapsed=persisted.elapsed(time.time()))
        except ValueError as exc:
            log_event("resilience_state_ignored", logging.WARNING, part="fallback", error=str(exc))
            return
        failing = {
            name: str(s.state)
            for name, s in self.fallback.statistics().services.items()
            if s.state is not ServiceState.HEALTHY
        }
        if failing:
            log_event("resilience_state_restored", logging.WARNING, services=failing,
                      down_for=round(persisted.elapsed(time.time()), 1))

    def add_breaker(self, breaker: CircuitBreaker, service: str | None = None) -> None:
        """Observe ``breaker`` (metrics, ``breakers`` reports, events, persistence) and,
        with ``service``, feed its transitions into the FallbackManager.

        Restores its persisted snapshot when it was open and has not succeeded
        since start (see the module docstring); disables it when
        ``resilience.breakers_enabled`` is false. Raises ``ValueError`` for a
        second breaker of the same name.
        """
        if breaker.name in self.breakers:
            if self.breakers[breaker.name] is breaker:
                return
            raise ValueError(f"a breaker named {breaker.name!r} is already registered")
        self.breakers[breaker.name] = breaker
        breaker.add_listener(self.metrics.on_breaker_transition)
        breaker.add_listener(self._on_breaker_transition)
        if service is not None:
            self.fallback.register(service)
            self._breaker_service[breaker.name] = service
            breaker.add_listener(self.fallback.breaker_listener(service))
        self._maybe_restore_breaker(breaker)
        if not self.settings.breakers_enabled:
            breaker.disable(trio.current_time(), reason="resilience.breakers_enabled is false")
        self._mark_dirty()

    def _maybe_restore_breaker(self, breaker: CircuitBreaker) -> None:
        persisted = self.persisted
        if persisted is None:
            return
        snap = persisted.breakers.get(breaker.name)
        if not snap or snap.get("state") not in ("open", "forced_open", "half_open"):
            return
        now = trio.current_time()
        if breaker.statistics(now).successes > 0:
            return  # it has worked since the start: the dependency is back
        try:
            breaker.restore(snap, now, elapsed=persisted.elapsed(time.time()))
        except ValueError as exc:
            log_event("resilience_state_ignored", logging.WARNING, part=breaker.name,
                      error=str(exc))
            return
        self._restored_breakers.add(breaker.name)
        stats = breaker.statistics(now)
        log_event("breaker_restored", logging.WARNING, breaker=breaker.name,
                  state=str(stats.state), retry_after=stats.retry_after)

    def _scanner_events(self) -> dict[str, int]:
        """The scanner's counters for ``sentinel_scan_*`` (none before it is attached)."""
        if self.scanner is None:
            return {}
        stats = self.scanner.statistics()
        pool = stats.pool
        return {
            "worker_crashes_total": pool.crashes_total,
            "hard_timeouts_total": pool.hard_timeouts_total,
            "workers_recycled_total": pool.recycled_total,
            "streams_expired_total": stats.streams_expired,
        }

    def attach_scanner(self, scanner: ScannerLike) -> None:
        """The yara service: its breaker, its self-test check, rules/worker readiness."""
        self.scanner = scanner
        self.add_breaker(scanner.breaker, "yara")
        timeout = self.settings.health.yara_timeout

        def scanned() -> int:
            stats = scanner.statistics()
            return int(getattr(stats, "scans_total", 0)) - int(getattr(stats, "scans_unscanned", 0))

        self.health.add(
            "yara",
            yara_check(lambda: scanner.self_test(timeout), timeout=timeout, progress=scanned),
            timeout=timeout + 0.5,  # the check's own timeout answers first, with figures
        )
        self.health.set_rules_version(lambda: scanner.rules_version)

    def attach_policy(self, policy: PolicyLike) -> None:
        """The database service: its breaker, its state, a check that opens the
        database file afresh and reads its schema (``PolicyService.check_health``)."""
        self.policy = policy
        self.add_breaker(policy.breaker, "database")
        policy.add_state_listener(self._on_policy_state)
        # Every call on the store thread (requests, recovery, the check below).
        policy.add_query_observer(
            lambda _operation, seconds: self.metrics.observe_database_query(seconds)
        )
        name = Path(policy.db_path).name

        async def verify() -> CheckOutcome:
            try:
                seconds = await policy.check_health()
            except (SentinelError, trio.TooSlowError) as exc:
                text = getattr(exc, "message", "") or "the database did not answer in time"
                return CheckOutcome(ok=False, message=text)
            return CheckOutcome(
                ok=True, message=f"{name} verified afresh in {seconds * 1000:.1f} ms"
            )

        self.health.add(
            "database",
            verify,
            timeout=self.settings.health.database_timeout,
            # With the checks off it never runs ("not checked yet" forever);
            # _ready_database answers for the database then.
            required_for_ready=self.settings.health_checks_enabled,
        )
        # The store opened (and read) the database at start, or failed to: either
        # way that is news for a state restored from the last run, which may say
        # "failed" for an outage that is over (and keep the daemon unready).
        self._on_policy_state(policy.degraded, policy.degraded_reason)

    def _ready_database(self) -> str | None:
        """SPEC section 4, "readiness fails when the database is down": down while
        the policy store says so (a call failed), while the database service is
        failed or critical (its fallback serves: breaker open or on trial, a
        failed check), or while its breaker is open or forced open (no call
        would reach the database; a manual trip fails no request). Cheap and
        exact even with the checks disabled, and true again the moment the
        service recovers."""
        policy = self.policy
        if policy is None:
            return None
        if policy.degraded:
            return f"database is down: {policy.degraded_reason}"
        status = self.fallback.status("database")
        if status.state in (ServiceState.FAILED, ServiceState.CRITICAL):
            return f"database is down: service {status.state}" + (
                f" ({status.reason})" if status.reason else ""
            )
        for name, service in self._breaker_service.items():
            if service != "database":
                continue
            state = self.breakers[name].statistics().state
            if state in _OPEN_STATES:
                return f"database is down: breaker {name} is {state}"
        return None

    def _worker_pids(self) -> list[int]:
        return self.scanner.worker_pids() if self.scanner is not None else []

    def _ready_scanner(self) -> str | None:
        scanner = self.scanner
        if scanner is None:
            return "no rules loaded: the scanner is not running"
        try:
            if not scanner.rules_version or scanner.rule_count <= 0:
                return "no rules loaded"
            pool = getattr(scanner.statistics(), "pool", None)
            if pool is not None and getattr(pool, "alive", 1) <= 0:
                return "no scan worker is available"
        except Exception as exc:
            return f"scanner state unknown: {exc}"
        return None

    async def start(
        self,
        *,
        scanner: ScannerLike | None = None,
        policy: PolicyLike | None = None,
        verdicts: Any | None = None,
    ) -> None:
        """Attach the subsystems, run the first round of checks (bounded by the
        slowest check's timeout), then check periodically and serve HTTP."""
        if scanner is not None:
            self.attach_scanner(scanner)
        if policy is not None:
            self.attach_policy(policy)
        observers = getattr(verdicts, "observers", None)
        if isinstance(observers, list):
            observers.append(self.observe_verdict)
        self.health.add_ready_condition(self._ready_scanner)
        if policy is not None:
            self.health.add_ready_condition(self._ready_database)
        self._started = True
        await self._nursery.start(self._background)
        self._mark_dirty()

    async def _background(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Checks, the saver and HTTP in one scope, so :meth:`stop` ends them all
        while the subsystems they look at are still open."""
        with self._bg_scope:
            async with trio.open_nursery() as nursery:
                if self.settings.health_checks_enabled:
                    await nursery.start(self._check_loop)
                nursery.start_soon(self._saver)
                if self.config.http_listen:
                    await self._start_http(nursery, self.config.http_listen)
                task_status.started()

    async def stop(self) -> None:
        """Stop checking and saving, and save the state one last time. The daemon
        calls it *before* the scanner and the policy store close, so that their
        shutdown is never mistaken for (and persisted as) a failure."""
        if self._stopped:
            return
        self._stopped = True
        self._bg_scope.cancel()
        await self._save_final()

    # -- feeds into the FallbackManager ------------------------------------------------

    def _service_blocked(self, service: str) -> str | None:
        """Why a passing check must not declare ``service`` healthy, if it must not."""
        for name, owner in self._breaker_service.items():
            if owner != service:
                continue
            state = self.breakers[name].statistics().state
            if state not in (BreakerState.CLOSED, BreakerState.DISABLED):
                return f"breaker {name} is {state}"
        if service == "database" and self.policy is not None and self.policy.degraded:
            return self.policy.degraded_reason or "the policy store is degraded"
        return None

    def _on_check(self, result: CheckResult) -> None:
        service = result.name
        if service not in self.fallback.services:
            self.fallback.register(service)
        now = trio.current_time()
        self._probe_as_trial(service, result.ok, now)
        if result.ok:
            if self._service_blocked(service) is None:
                self.fallback.primary_ok(service, result.message, now)
        elif service in _FAIL_SERVICES or service.startswith("http"):
            self.fallback.primary_failed(service, result.message, now)
        else:
            self.fallback.primary_degraded(service, result.message, now)
        if service == "database" and self.policy is not None:
            self._check_policy_cache()

    def _probe_as_trial(self, service: str, ok: bool, now: float) -> None:
        """A passing check while the service's breaker is half-open (its open
        timeout is over) counts as a successful trial call: without traffic a
        breaker would otherwise stay half-open forever. This is the "one probe"
        of the recovery bar. A failing check is not counted: it may be load."""
        if not ok:
            return
        for bname, owner in self._breaker_service.items():
            breaker = self.breakers[bname]
            if owner != service or breaker.statistics(now).state is not BreakerState.HALF_OPEN:
                continue
            try:
                permit = breaker.acquire(now)
            except CircuitOpenError:
                continue  # a real trial is in flight; let it decide
            breaker.record_success(permit, now)

    def _on_policy_state(self, degraded: bool, reason: str | None) -> None:
        now = trio.current_time()
        if degraded:
            self.fallback.primary_failed("database", reason or "policy store degraded", now)
        elif self._service_blocked("database") is None:
            self.fallback.primary_ok("database", "policy store recovered", now)

    def _check_policy_cache(self) -> None:
        policy = self.policy
        if policy is None or not policy.degraded:
            return
        try:
            error = policy.statistics().get("snapshot_error")
        except Exception as exc:
            error = f"policy cache state unknown: {exc}"
        now = trio.current_time()
        if error:
            self.fallback.fallback_failed("database", f"policy cache unavailable: {error}", now)
        else:
            self.fallback.fallback_ok("database", "", now)

    def _on_breaker_transition(self, t: BreakerTransition) -> None:
        self.bus.publish(
            "breakers",
            "breaker_transition",
            service=self._breaker_service.get(t.breaker, t.breaker),
            state=str(t.to_state),
            previous=str(t.from_state),
            reason=t.reason,
            at=time.time(),
        )
        self._mark_dirty()

    # -- transitions out -------------------------------------------------------------

    def _on_service_transition(self, t: ServiceTransition) -> None:
        at = time.time()
        level = logging.INFO if t.to_state is ServiceState.HEALTHY else logging.WARNING
        log_event("service_state", level, service=t.service, state=str(t.to_state),
                  previous=str(t.from_state), reason=t.reason, system=str(t.system_to))
        self.bus.publish("services", "service_state", service=t.service, state=str(t.to_state),
                         previous=str(t.from_state), reason=t.reason, at=at)
        if t.system_to is not t.system_from:
            self.bus.publish("services", "system_state", state=str(t.system_to),
                             previous=str(t.system_from), reason=t.reason, at=at)
        self.notices.state_changed(t.service)
        if t.to_state is ServiceState.HEALTHY:
            self.bus.publish("degraded", "degraded_cleared", service=t.service, state="healthy",
                             previous=str(t.from_state), reason=t.reason, at=at,
                             message=f"{t.service} recovered; normal operation resumed.")
        elif self.settings.degradation_enabled:
            self._send_notice(t.service, str(t.to_state), t.reason, str(t.from_state))
        self._mark_dirty()

    def _notice_event(self, service: str, state: str, reason: str,
                      previous: str | None = None) -> Event:
        return Event(
            id=0,
            topic="degraded",
            kind="degraded_notice",
            service=service,
            state=state,
            previous=previous,
            reason=reason,
            at=time.time(),
            message=notice_text(service, state, fail_open=self.settings.scanner_fail_open),
            actions=list(NOTICE_ACTIONS),
        )

    def _send_notice(self, service: str, state: str, reason: str,
                     previous: str | None = None) -> None:
        e = self._notice_event(service, state, reason, previous)
        self.bus.publish(e.topic, e.kind, service=service, state=state, previous=previous,
                         reason=reason, message=e.message, actions=e.actions, at=e.at)
        self.notices.sent(service, trio.current_time())

    def _remind(self) -> None:
        if not self.settings.degradation_enabled:
            return
        now = trio.current_time()
        for name, status in self.fallback.statistics().services.items():
            if self.notices.reminder_due(
                name, str(status.state), acknowledged=status.acknowledged, now=now,
                interval=self.settings.notice_repeat_interval,
            ):
                self._send_notice(name, str(status.state), status.reason)

    def _current_events(self) -> list[Event]:
        """What a new subscriber needs to know: every non-healthy service, and the
        notices not acknowledged."""
        events: list[Event] = []
        for name, status in self.fallback.statistics().services.items():
            if status.state is ServiceState.HEALTHY:
                continue
            events.append(Event(id=0, topic="services", kind="service_state", service=name,
                                state=str(status.state), reason=status.reason, at=time.time()))
            if self.settings.degradation_enabled and not status.acknowledged:
                events.append(self._notice_event(name, str(status.state), status.reason))
        return events

    def _system_status(self) -> tuple[Literal["healthy", "degraded", "unhealthy"], str | None]:
        stats = self.fallback.statistics()
        if stats.system is ServiceState.HEALTHY:
            return "healthy", None
        bad = [f"{n} {s.state}" + (f" ({s.reason})" if s.reason else "")
               for n, s in stats.services.items() if s.state is not ServiceState.HEALTHY]
        status: Literal["degraded", "unhealthy"] = (
            "unhealthy" if stats.system is ServiceState.CRITICAL else "degraded"
        )
        return status, "; ".join(bad)

    # -- requests ----------------------------------------------------------------------

    async def health_report(
        self, request_id: int, probe: Literal["full", "live", "ready"] = "full"
    ) -> HealthReport:
        return await self.health.report(request_id, probe)

    def breaker_infos(self) -> list[BreakerInfo]:
        infos = []
        for name in sorted(self.breakers):
            s = self.breakers[name].statistics()
            calls = s.successes + s.failures + s.rejected
            infos.append(
                BreakerInfo(
                    name=name,
                    state=str(s.state),
                    consecutive_failures=s.consecutive_failures,
                    failures_total=s.failures,
                    successes_total=s.successes,
                    rejected_total=s.rejected,
                    opened_at=_wall_time(s.opened_at),
                    retry_after_s=s.retry_after,
                    availability=round(s.successes / calls, 6) if calls else 1.0,
                    state_since=_wall_time(s.state_changed_at)
                    if s.state_changed_at is not None
                    else time.time() - self.health.uptime(),  # unchanged since the start
                )
            )
        return infos

    def _breaker(self, name: str) -> CircuitBreaker:
        breaker = self.breakers.get(name)
        if breaker is None:
            # Accept the service name too ("database" is both, "yara" too).
            for bname, service in self._breaker_service.items():
                if service == name:
                    return self.breakers[bname]
            raise NotFoundError(
                f"no circuit breaker named {name!r}; known: {', '.join(sorted(self.breakers))}"
            )
        return breaker

    def control_breaker(self, name: str, action: str, *, uid: int | None = None) -> str:
        """``trip`` (forced open until reset) or ``reset`` (closed). Raises
        :class:`NotFoundError` / :class:`InvalidMessageError`."""
        breaker = self._breaker(name)
        now = trio.current_time()
        who = f"manual {action} by uid {uid}" if uid is not None else f"manual {action}"
        if action == "trip":
            breaker.trip(now, reason=who)
        elif action == "reset":
            breaker.reset(now, reason=who)
        else:
            raise InvalidMessageError(f"breaker action must be 'trip' or 'reset', not {action!r}")
        log_event("breaker_control", logging.WARNING, breaker=breaker.name, action=action, uid=uid)
        return f"breaker {breaker.name} is {breaker.statistics(now).state}"

    def _known_service(self, service: str) -> None:
        if service not in self.fallback.services:
            raise NotFoundError(
                f"unknown service {service!r}; known: {', '.join(self.fallback.services)}"
            )

    async def retry_service(self, service: str) -> str:
        """*Retry Connection*: half-open the service's breakers, ask its owner to
        recover now, re-run its check. Returns what happened, for the ``ack``."""
        self._known_service(service)
        parts: list[str] = []
        now = trio.current_time()
        for bname, owner in self._breaker_service.items():
            if owner == service and self.breakers[bname].half_open(now, reason="service_retry"):
                parts.append(f"breaker {bname} half-open")
        if service == "database" and self.policy is not None:
            with trio.move_on_after(max(self.settings.health.database_timeout, 5.0)):
                recovered = await self.policy.retry_now()
                parts.append("policy store recovered" if recovered else
                             f"policy store still down: {self.policy.degraded_reason}")
        if service in self.health.names():
            result = await self.health.run_check(service)
            parts.append(f"check {result.status}: {result.message}")
        status = self.fallback.status(service)
        parts.append(f"{service} is {status.state}")
        return "; ".join(parts)

    def acknowledge(self, service: str) -> str:
        """*Continue with Cache*: no repeat of this notice until the state changes."""
        self._known_service(service)
        if not self.fallback.acknowledge(service):
            return f"{service} is healthy: nothing to acknowledge"
        self._mark_dirty()
        status = self.fallback.status(service)
        return f"acknowledged: {service} {status.state}; no reminder until its state changes"

    def subscribe(
        self, request_id: int, topics: Iterable[str],
        send: Callable[[Event], Awaitable[None]], *, owner: int | None = None,
    ) -> Subscription:
        """A paused subscription primed with the current state; ``resume()`` it
        after the ``subscribed`` reply went out. ``owner``: the peer uid, held
        to its share of the subscriber slots."""
        return self.bus.subscribe(request_id, topics, send, initial=self._current_events(),
                                  paused=True, owner=owner)

    def observe_verdict(self, result: ScanResult, outcome: Any) -> None:
        """A VerdictMaker observer: scans by action, durations, bytes."""
        yara_ms = getattr(outcome, "scan_ms", None) if getattr(outcome, "scanned", False) else None
        self.metrics.observe_scan(
            result.action, result.scan_ms / 1000.0, result.size,
            None if yara_ms is None else float(yara_ms) / 1000.0,
        )

    # -- background ------------------------------------------------------------------

    async def _check_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                          ) -> None:
        """Like ``HealthRegistry.run_periodically``, but re-checks failing
        components sooner (every ``failing_check_interval``) so recovery is seen
        within one probe, and sends the notice reminders."""
        registry = self.health
        await registry.run_all()
        task_status.started()
        while True:
            failing = any(not r.ok for r in registry.results().values())
            interval = registry.interval
            if failing:
                interval = min(interval, self.settings.failing_check_interval)
            with trio.move_on_after(interval):
                await registry.wait_wake()
            await registry.run_all()
            registry.periodic_runs += 1
            self._remind()

    def _mark_dirty(self) -> None:
        self._dirty.set()

    def build_state(self) -> PersistedState:
        now = trio.current_time()
        breakers: dict[str, dict[str, Any]] = {}
        for name, breaker in self.breakers.items():
            try:
                breakers[name] = breaker.snapshot(now)
            except Exception as exc:  # a breaker on another clock: skip, say so
                log_event("breaker_snapshot_failed", logging.WARNING, breaker=name, error=repr(exc))
        # Breakers not attached this run keep their old snapshot, so a subsystem
        # that failed to start does not erase what we knew about it.
        if self.persisted is not None:
            for name, snap in self.persisted.breakers.items():
                breakers.setdefault(name, snap)
        return PersistedState(fallback=self.fallback.snapshot(now), breakers=breakers)

    async def _saver(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = trio.Event()
            state = self.build_state()
            await trio.to_thread.run_sync(self.store.save, state)
            await trio.sleep(_SAVE_SPACING)

    async def close(self) -> None:
        """Final save, unless :meth:`stop` already made it."""
        if not self._stopped:
            self._stopped = True
            self._bg_scope.cancel()
            await self._save_final()

    async def _save_final(self) -> None:
        # Shielded: this runs while the daemon's shutdown cancels everything.
        with trio.CancelScope(shield=True), trio.move_on_after(5.0):
            state = self.build_state()
            await trio.to_thread.run_sync(self.store.save, state)

    # -- HTTP --------------------------------------------------------------------------

    async def _start_http(self, nursery: trio.Nursery, listen: str) -> None:
        from .config import parse_listen_address

        try:
            host, port = parse_listen_address(listen)
            self.http_address = await nursery.start(
                serve_http, host, port, self._http_routes()
            )
        except (OSError, ValueError) as exc:
            # The Unix socket is the product; a scraper port must not take it down.
            log_event("http_listen_failed", logging.ERROR, listen=listen, error=str(exc))

    def _http_routes(self) -> dict[str, Callable[[HttpRequest], Awaitable[HttpResponse]]]:
        async def health(request: HttpRequest) -> HttpResponse:
            report = await self.health_report(0, "full")
            return _json_report(report, ok=report.status != "unhealthy")

        async def live(request: HttpRequest) -> HttpResponse:
            return _json_report(await self.health_report(0, "live"), ok=True)

        async def ready(request: HttpRequest) -> HttpResponse:
            report = await self.health_report(0, "ready")
            return _json_report(report, ok=report.ready)

        async def metrics(request: HttpRequest) -> HttpResponse:
            accept = request.headers.get("accept", "")
            fmt: Literal["prometheus", "openmetrics"] = (
                "openmetrics" if "application/openmetrics-text" in accept else "prometheus"
            )
            content_type, text = self.metrics.render(fmt)
            return HttpResponse(200, text.encode(), content_type=content_type)

        return {"/health": health, "/health/live": live, "/health/ready": ready,
                "/metrics": metrics}


def _json_report(report: HealthReport, *, ok: bool) -> HttpResponse:
    body = msgspec.json.encode(msgspec.structs.asdict(report))
    return HttpResponse(200 if ok else 503, body)


def _wall_time(monotonic_at: float | None) -> float | None:
    """A trio-clock instant as wall-clock seconds (for humans and other processes)."""
    if monotonic_at is None or not math.isfinite(monotonic_at):
        return None
    return time.time() - (trio.current_time() - monotonic_at)


def _host_of(url: str) -> str:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0] or url


@contextlib.asynccontextmanager
async def open_observability(
    config: Config,
    data_dir: Path,
    server: Server,
    *,
    started_monotonic: float | None = None,
) -> AsyncIterator[Observability]:
    """The daemon's :class:`Observability`, with the persisted state loaded;
    saves it once more and stops every background task on exit."""
    store = StateStore(data_dir)
    persisted = await trio.to_thread.run_sync(store.load)
    settings = config.resilience
    async with (
        open_event_bus(
            buffer_size=settings.subscriber_buffer,
            max_subscribers=settings.max_subscribers,
            # Another user on a shared socket must not be able to take them all.
            max_per_owner=config.server.uid_share(settings.max_subscribers),
            clock=time.time,
        ) as bus,
        trio.open_nursery() as nursery,
    ):
        hub = Observability(
            config, data_dir, server, bus=bus, nursery=nursery, store=store,
            persisted=persisted, started_monotonic=started_monotonic,
        )
        hub._restore_fallback()
        try:
            yield hub
        finally:
            nursery.cancel_scope.cancel()
            await hub.close()
            log_event("observability_closed", logging.DEBUG, pid=os.getpid())
