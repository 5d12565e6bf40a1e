"""The health registry: async checks, each under its own timeout, run
periodically and on demand, answered from a cache.

Theory of operation
-------------------
A *check* is an async function returning a :class:`CheckOutcome` (ok or not,
a message, a figure). The registry runs it inside a cancel scope of its own
timeout; a check that overruns is marked failed with "timed out after N ms",
one that raises is marked failed with the error. Either way the failure maps
to the status the check was registered with (SPEC section 4: database, yara,
ipc, memory -> degraded; disk -> unhealthy).

Checks come in two speeds:

* **periodic** checks (database, yara, disk, network) may be slow or may
  hang. They run concurrently every ``interval`` seconds and on demand
  (:meth:`HealthRegistry.run_now`, the ``service_retry`` request); a
  ``health`` request is answered from their last result and never waits for
  them, so a health request stays fast while the scanner is at full load.
* **live** checks (ipc connections, memory RSS) are cheap figures read again
  for every full report, still under their timeouts.

Concurrent runs of one check coalesce: a second caller waits for the run in
progress instead of starting another, so an on-demand burst cannot pile up
probes of a dependency that is already struggling.

Readiness is false while a check registered ``required_for_ready`` is failing
or a readiness condition (no rules loaded, no worker, the database down: see
``Observability._ready_database``) names a reason. Liveness
depends on nothing: if the daemon can answer, it is alive.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import trio

from ..logs import log_event
from ..messages import ComponentHealth, HealthReport, HealthStatus

__all__ = [
    "STATUS_ORDER",
    "CheckOutcome",
    "CheckResult",
    "HealthRegistry",
    "worst_status",
]

Probe = Literal["full", "live", "ready"]

STATUS_ORDER: dict[str, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}


def worst_status(*statuses: HealthStatus) -> HealthStatus:
    """The most severe of ``statuses`` (``healthy`` for none)."""
    worst: HealthStatus = "healthy"
    for status in statuses:
        if STATUS_ORDER[status] > STATUS_ORDER[worst]:
            worst = status
    return worst


@dataclass(frozen=True, slots=True)
class CheckOutcome:
    """What a check function returns. ``status`` overrides the registry's mapping
    (ok -> healthy, not ok -> the check's failure status)."""

    ok: bool
    message: str = ""
    value: float | None = None
    status: HealthStatus | None = None


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One finished run of one check."""

    name: str
    ok: bool
    status: HealthStatus
    message: str
    value: float | None
    response_ms: float
    checked_at: float  # trio.current_time() when it finished
    timed_out: bool = False

    def component(self) -> ComponentHealth:
        return ComponentHealth(
            status=self.status,
            message=self.message,
            response_ms=round(self.response_ms, 3),
            value=self.value,
        )


CheckFn = Callable[[], Awaitable[CheckOutcome]]
ResultListener = Callable[[CheckResult], None]
ReadyCondition = Callable[[], str | None]
StatusContributor = Callable[[], tuple[HealthStatus, str | None]]


@dataclass(slots=True)
class _Check:
    name: str
    fn: CheckFn
    timeout: float
    failure_status: HealthStatus
    live: bool
    required_for_ready: bool
    result: CheckResult | None = None
    running: trio.Event | None = None
    runs: int = 0
    timeouts: int = 0
    history: list[bool] = field(default_factory=list)


class HealthRegistry:
    """Named checks, their cached results and the report built from them.

    ``wall_clock`` stamps reports (``timestamp``); ``monotonic`` measures uptime.
    Both are injectable for tests; check timing uses ``trio.current_time()`` so
    trio's ``MockClock`` drives timeouts.
    """

    def __init__(
        self,
        *,
        interval: float = 30.0,
        started_monotonic: float | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rules_version: Callable[[], str] | None = None,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"health check interval must be > 0, got {interval!r}")
        self.interval = interval
        self._wall = wall_clock
        self._mono = monotonic
        self._started = monotonic() if started_monotonic is None else started_monotonic
        self._checks: dict[str, _Check] = {}
        self._listeners: list[ResultListener] = []
        self._ready_conditions: list[ReadyCondition] = []
        self._contributors: list[StatusContributor] = []
        self._rules_version = rules_version
        self._wake = trio.Event()
        self.periodic_runs = 0

    # -- registration -----------------------------------------------------

    def add(
        self,
        name: str,
        fn: CheckFn,
        *,
        timeout: float,
        failure_status: HealthStatus = "degraded",
        live: bool = False,
        required_for_ready: bool = False,
    ) -> None:
        """Register check ``name``. Raises ``ValueError`` for a duplicate or a bad timeout."""
        if name in self._checks:
            raise ValueError(f"health check {name!r} is already registered")
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"health check {name!r}: timeout must be > 0, got {timeout!r}")
        self._checks[name] = _Check(name, fn, timeout, failure_status, live, required_for_ready)

    def remove(self, name: str) -> None:
        self._checks.pop(name, None)

    def names(self) -> list[str]:
        return list(self._checks)

    def add_listener(self, listener: ResultListener) -> None:
        """``listener(CheckResult)`` after every run of every check (synchronously)."""
        self._listeners.append(listener)

    def add_ready_condition(self, condition: ReadyCondition) -> None:
        """``condition()`` returns why the daemon is not ready, or ``None``."""
        self._ready_conditions.append(condition)

    def add_status_contributor(self, contributor: StatusContributor) -> None:
        """``contributor()`` returns (status, reason) folded into the overall status
        (the FallbackManager's system state)."""
        self._contributors.append(contributor)

    def set_rules_version(self, source: Callable[[], str]) -> None:
        self._rules_version = source

    # -- running ---------------------------------------------------------------

    def result(self, name: str) -> CheckResult | None:
        check = self._checks.get(name)
        return None if check is None else check.result

    def results(self) -> dict[str, CheckResult]:
        return {n: c.result for n, c in self._checks.items() if c.result is not None}

    async def run_check(self, name: str) -> CheckResult:
        """Run ``name`` now (or join the run in progress). Raises ``KeyError``."""
        check = self._checks[name]
        if check.running is not None:
            await check.running.wait()
            if check.result is not None:
                return check.result
            # The run we joined was cancelled before it finished: run our own.
            return await self.run_check(name)
        done = check.running = trio.Event()
        try:
            result = await self._execute(check)
        finally:
            check.running = None
            done.set()
        return result

    async def run_all(self, *, include_live: bool = True) -> dict[str, CheckResult]:
        """Run every check concurrently; returns the fresh results."""
        names = [n for n, c in self._checks.items() if include_live or not c.live]
        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(self.run_check, name)
        return {n: r for n in names if (r := self.result(n)) is not None}

    def run_now(self) -> None:
        """Ask the periodic loop for an immediate round (no waiting)."""
        self._wake.set()

    async def wait_wake(self) -> None:
        """Wait for :meth:`run_now` (for custom periodic loops)."""
        await self._wake.wait()
        self._wake = trio.Event()

    async def run_periodically(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run every check each ``interval`` seconds (and when :meth:`run_now` is
        called) until cancelled. ``started`` after the first round."""
        await self.run_all()
        self.periodic_runs += 1
        task_status.started()
        while True:
            with trio.move_on_after(self.interval):
                await self.wait_wake()
            await self.run_all()
            self.periodic_runs += 1

    async def _execute(self, check: _Check) -> CheckResult:
        start = trio.current_time()
        timed_out = False
        outcome: CheckOutcome | None = None
        message = ""
        with trio.move_on_after(check.timeout) as scope:
            try:
                outcome = await check.fn()
            except Exception as exc:  # a check must never take the registry down
                message = f"check failed: {type(exc).__name__}: {exc}"
        if scope.cancelled_caught:
            timed_out = True
            outcome = None
            message = f"timed out after {check.timeout * 1000:.0f} ms"
        elapsed_ms = (trio.current_time() - start) * 1000.0
        if outcome is None:
            ok, status, value = False, check.failure_status, None
        else:
            ok = outcome.ok
            status = outcome.status or ("healthy" if ok else check.failure_status)
            message, value = outcome.message, outcome.value
        result = CheckResult(
            name=check.name,
            ok=ok,
            status=status,
            message=message,
            value=value,
            response_ms=elapsed_ms,
            checked_at=trio.current_time(),
            timed_out=timed_out,
        )
        previous = check.result
        check.result = result
        check.runs += 1
        check.timeouts += timed_out
        if previous is None or previous.status != result.status:
            log_event(
                "health_check_changed",
                logging.INFO if result.ok else logging.WARNING,
                check=check.name,
                status=result.status,
                message=result.message,
            )
        for listener in list(self._listeners):
            try:
                listener(result)
            except Exception as exc:
                log_event("health_listener_failed", logging.ERROR, check=check.name,
                          error=repr(exc))
        return result

    # -- reporting -------------------------------------------------------------

    def uptime(self) -> float:
        return max(0.0, self._mono() - self._started)

    def readiness(self) -> tuple[bool, str | None]:
        """(ready, reason) from the cached results and the conditions; cheap."""
        reasons: list[str] = []
        for check in self._checks.values():
            if not check.required_for_ready:
                continue
            if check.result is None:
                reasons.append(f"{check.name}: not checked yet")
            elif not check.result.ok:
                reasons.append(f"{check.name} is down: {check.result.message}")
        for condition in self._ready_conditions:
            try:
                why = condition()
            except Exception as exc:
                why = f"readiness condition failed: {exc}"
            if why:
                reasons.append(why)
        return (not reasons, "; ".join(reasons) or None)

    def _overall(self, results: dict[str, CheckResult]) -> tuple[HealthStatus, list[str]]:
        status = worst_status(*(r.status for r in results.values()))
        reasons = [f"{n}: {r.message}" for n, r in results.items() if r.status != "healthy"]
        for contributor in self._contributors:
            try:
                extra, why = contributor()
            except Exception as exc:
                extra, why = "degraded", f"status contributor failed: {exc}"
            status = worst_status(status, extra)
            if why and extra != "healthy":
                reasons.append(why)
        return status, reasons

    async def report(self, request_id: int = 0, probe: Probe = "full") -> HealthReport:
        """A ``health_report``. Never waits for a periodic check: full reports
        refresh only the live checks (bounded by their timeouts)."""
        if probe == "full":
            live = [n for n, c in self._checks.items() if c.live]
            if live:
                async with trio.open_nursery() as nursery:
                    for name in live:
                        nursery.start_soon(self.run_check, name)
        results = self.results()
        status, reasons = self._overall(results)
        ready, ready_reason = self.readiness()
        if probe == "live":
            components: dict[str, ComponentHealth] = {}
            reason = None
        elif probe == "ready":
            components = {
                n: r.component()
                for n, r in results.items()
                if self._checks[n].required_for_ready
            }
            reason = ready_reason
        else:
            components = {n: r.component() for n, r in results.items()}
            reason = ready_reason if not ready else ("; ".join(reasons) or None)
        return HealthReport(
            id=request_id,
            status=status,
            alive=True,
            ready=ready,
            reason=reason,
            uptime_seconds=round(self.uptime(), 3),
            timestamp=self._wall(),
            rules_version=self._rules_version() if self._rules_version else "",
            components=components,
        )
