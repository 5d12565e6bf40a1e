"""Graceful degradation as a pure state machine: one state per service.

Theory of operation
-------------------

Each service Sentinel depends on (database, yara, ipc, disk, memory, and any
registered later) is in one of four states:

* ``healthy``  -- the primary works;
* ``degraded`` -- the primary works, but poorly (slow, short of memory or disk);
* ``failed``   -- the primary is down and its fallback is serving
  (cached policies, fail-open scans, a queued outbox);
* ``critical`` -- the primary is down and the fallback failed too.

Breakers and health checks feed it *events*, never states, so that the rules
live in one table (:data:`TRANSITIONS`) instead of at every call site:

==================  =========  =========  =========  =========
event \\ from        healthy    degraded   failed     critical
==================  =========  =========  =========  =========
primary_ok          healthy    healthy    healthy    healthy
primary_degraded    degraded   degraded   degraded   degraded
primary_failed      failed     failed     failed     critical
fallback_failed     healthy    degraded   critical   critical
fallback_ok         healthy    degraded   failed     failed
==================  =========  =========  =========  =========

A fallback failing while the primary works changes nothing (the fallback is
not serving); the primary failing again does not mend a broken fallback.

The system state is the worst service state (healthy < degraded < failed <
critical): the daemon is "in degraded mode" whenever it is not healthy. Each
service change emits exactly one :class:`ServiceTransition` to the listeners,
carrying the system state before and after, so a subscriber can tell when
degraded mode begins and ends. An event that leaves the state as it was emits
nothing (it may refresh the reason). One service's events never touch another
service: a failing database cannot make the scanner look failed.

``acknowledge(service)`` ("Continue with Cache") marks the current episode as
seen; it is cleared by the service's next state change, so a new failure is
announced again. States, reasons, ages and acknowledgements round-trip through
:meth:`FallbackManager.snapshot` / :meth:`FallbackManager.restore` as a plain
JSON-safe dict, so a restarted daemon remembers what was failing.

Pure: time comes in as ``now`` (monotonic seconds) or from the injected clock;
no I/O; not thread-safe.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from sentinel_ipc.resilience.instruments import BreakerTransition

__all__ = [
    "DEFAULT_SERVICES",
    "TRANSITIONS",
    "FallbackEvent",
    "FallbackManager",
    "FallbackStatistics",
    "ServiceState",
    "ServiceStatus",
    "ServiceTransition",
]

SNAPSHOT_VERSION: Final = 1
DEFAULT_SERVICES: Final = ("database", "yara", "ipc", "disk", "memory")


class ServiceState(enum.StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    FAILED = "failed"  # the fallback is serving
    CRITICAL = "critical"  # the fallback failed too

    @property
    def severity(self) -> int:
        return _SEVERITY[self]


_SEVERITY = {s: i for i, s in enumerate(ServiceState)}


class FallbackEvent(enum.StrEnum):
    PRIMARY_OK = "primary_ok"
    PRIMARY_DEGRADED = "primary_degraded"
    PRIMARY_FAILED = "primary_failed"
    FALLBACK_FAILED = "fallback_failed"
    FALLBACK_OK = "fallback_ok"


_H, _D, _F, _C = (
    ServiceState.HEALTHY,
    ServiceState.DEGRADED,
    ServiceState.FAILED,
    ServiceState.CRITICAL,
)
_E = FallbackEvent

#: Every (state, event) -> next state; see the table in the module docstring.
TRANSITIONS: Mapping[tuple[ServiceState, FallbackEvent], ServiceState] = MappingProxyType(
    {
        **{(s, _E.PRIMARY_OK): _H for s in ServiceState},
        **{(s, _E.PRIMARY_DEGRADED): _D for s in ServiceState},
        (_H, _E.PRIMARY_FAILED): _F,
        (_D, _E.PRIMARY_FAILED): _F,
        (_F, _E.PRIMARY_FAILED): _F,
        (_C, _E.PRIMARY_FAILED): _C,
        (_H, _E.FALLBACK_FAILED): _H,
        (_D, _E.FALLBACK_FAILED): _D,
        (_F, _E.FALLBACK_FAILED): _C,
        (_C, _E.FALLBACK_FAILED): _C,
        (_H, _E.FALLBACK_OK): _H,
        (_D, _E.FALLBACK_OK): _D,
        (_F, _E.FALLBACK_OK): _F,
        (_C, _E.FALLBACK_OK): _F,
    }
)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    """One service now. ``changed_at`` is when it entered ``state`` (None: never changed)."""

    service: str
    state: ServiceState
    reason: str
    changed_at: float | None
    acknowledged: bool


@dataclass(frozen=True, slots=True)
class ServiceTransition:
    """One service changed state; ``system_*`` is the derived state around it."""

    service: str
    from_state: ServiceState
    to_state: ServiceState
    reason: str
    at: float
    system_from: ServiceState
    system_to: ServiceState


@dataclass(frozen=True, slots=True)
class FallbackStatistics:
    system: ServiceState
    system_changed_at: float | None
    services: Mapping[str, ServiceStatus]
    transitions: int
    listener_errors: int

    @property
    def degraded_mode(self) -> bool:
        return self.system is not ServiceState.HEALTHY


TransitionListener = Callable[[ServiceTransition], object]


class _Service:
    __slots__ = ("acknowledged", "changed_at", "reason", "state")

    def __init__(self) -> None:
        self.state = ServiceState.HEALTHY
        self.reason = ""
        self.changed_at: float | None = None
        self.acknowledged = False


class FallbackManager:
    """Per-service degradation states and the system state derived from them."""

    def __init__(
        self,
        services: Iterable[str] = DEFAULT_SERVICES,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._clock = clock
        self._services: dict[str, _Service] = {}
        self._listeners: list[TransitionListener] = []
        self._listener_errors = 0
        self._transitions = 0
        self._system = ServiceState.HEALTHY
        self._system_changed_at: float | None = None
        for name in services:
            self.register(name)

    # --- services and listeners --------------------------------------------------

    def register(self, service: str) -> None:
        """Track ``service`` (healthy until told otherwise); registering twice is fine."""
        if not service or not isinstance(service, str):
            raise ValueError(f"a service name must be a non-empty str, got {service!r}")
        self._services.setdefault(service, _Service())

    @property
    def services(self) -> tuple[str, ...]:
        return tuple(self._services)

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(ServiceTransition)`` on every service state change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        self._listeners.remove(listener)

    # --- reading -------------------------------------------------------------------

    @property
    def system_state(self) -> ServiceState:
        return self._system

    def status(self, service: str) -> ServiceStatus:
        entry = self._get(service)
        return ServiceStatus(
            service, entry.state, entry.reason, entry.changed_at, entry.acknowledged
        )

    def statistics(self) -> FallbackStatistics:
        return FallbackStatistics(
            system=self._system,
            system_changed_at=self._system_changed_at,
            services=MappingProxyType({name: self.status(name) for name in self._services}),
            transitions=self._transitions,
            listener_errors=self._listener_errors,
        )

    # --- events --------------------------------------------------------------------

    def handle(
        self, service: str, event: FallbackEvent, reason: str = "", now: float | None = None
    ) -> ServiceTransition | None:
        """Apply ``event`` to ``service``; returns the transition, or None if the
        state stayed (then a non-empty ``reason`` replaces the stored one)."""
        entry = self._get(service)
        now = self._now(now)
        new = TRANSITIONS[(entry.state, FallbackEvent(event))]
        return self._move(service, entry, new, reason, now)

    def primary_ok(self, service: str, reason: str = "", now: float | None = None) -> None:
        self.handle(service, FallbackEvent.PRIMARY_OK, reason, now)

    def primary_degraded(self, service: str, reason: str, now: float | None = None) -> None:
        self.handle(service, FallbackEvent.PRIMARY_DEGRADED, reason, now)

    def primary_failed(self, service: str, reason: str, now: float | None = None) -> None:
        self.handle(service, FallbackEvent.PRIMARY_FAILED, reason, now)

    def fallback_failed(self, service: str, reason: str, now: float | None = None) -> None:
        self.handle(service, FallbackEvent.FALLBACK_FAILED, reason, now)

    def fallback_ok(self, service: str, reason: str = "", now: float | None = None) -> None:
        self.handle(service, FallbackEvent.FALLBACK_OK, reason, now)

    def acknowledge(self, service: str) -> bool:
        """Mark the current episode of ``service`` as seen ("Continue with Cache").

        Returns False (and records nothing) when the service is healthy: there
        is nothing to acknowledge.
        """
        entry = self._get(service)
        if entry.state is ServiceState.HEALTHY:
            return False
        entry.acknowledged = True
        return True

    def breaker_listener(self, service: str) -> Callable[[BreakerTransition], None]:
        """A breaker listener that feeds ``service``: open or forced open ->
        primary_failed; closed -> primary_ok; half-open and disabled -> nothing
        (a trial is not a recovery yet; a disabled breaker knows nothing)."""
        self._get(service)

        def on_transition(record: BreakerTransition) -> None:
            to = str(record.to_state)
            if to in ("open", "forced_open"):
                self.handle(
                    service,
                    FallbackEvent.PRIMARY_FAILED,
                    f"breaker {record.breaker} {to}: {record.reason}",
                    record.at,
                )
            elif to == "closed":
                self.handle(
                    service, FallbackEvent.PRIMARY_OK, f"breaker {record.breaker} closed", record.at
                )

        return on_transition

    # --- persistence -------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-safe dict; times are stored as ages, so it survives a restart."""
        now = self._now(now)
        return {
            "version": SNAPSHOT_VERSION,
            "services": {
                name: {
                    "state": str(entry.state),
                    "reason": entry.reason,
                    "changed_ago": (
                        None if entry.changed_at is None else max(0.0, now - entry.changed_at)
                    ),
                    "acknowledged": entry.acknowledged,
                }
                for name, entry in self._services.items()
            },
        }

    def restore(
        self, snapshot: Mapping[str, Any], now: float | None = None, *, elapsed: float = 0.0
    ) -> None:
        """Load a :meth:`snapshot` taken ``elapsed`` seconds ago (e.g. across a restart).

        Services in the snapshot are registered; each state change is emitted to
        the listeners like any other. The whole snapshot is validated before
        anything changes: ``ValueError`` names the first bad key.
        """
        now = self._now(now)
        if not isinstance(snapshot, Mapping) or snapshot.get("version") != SNAPSHOT_VERSION:
            version = snapshot.get("version") if isinstance(snapshot, Mapping) else None
            raise ValueError(f"fallback snapshot: unsupported version {version!r}")
        services = snapshot.get("services")
        if not isinstance(services, Mapping):
            raise ValueError("fallback snapshot: expected an object at $.services")
        parsed = [_parse_service(name, data) for name, data in services.items()]
        for name, state, reason, ago, acknowledged in parsed:
            self.register(name)
            entry = self._services[name]
            changed_at = None if ago is None else now - ago - max(0.0, elapsed)
            self._move(name, entry, state, reason, now, at=changed_at)
            entry.reason = reason
            entry.changed_at = changed_at
            entry.acknowledged = acknowledged and state is not ServiceState.HEALTHY

    # --- internals -------------------------------------------------------------------

    def _get(self, service: str) -> _Service:
        try:
            return self._services[service]
        except KeyError:
            known = ", ".join(self._services)
            raise ValueError(
                f"unknown service {service!r} (known: {known}); register() it first"
            ) from None

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self._clock is None:
            raise TypeError("FallbackManager has no clock: pass now= or construct it with clock=")
        return self._clock()

    def _move(
        self,
        service: str,
        entry: _Service,
        new: ServiceState,
        reason: str,
        now: float,
        *,
        at: float | None = None,
    ) -> ServiceTransition | None:
        old = entry.state
        if new is old:
            if reason:
                entry.reason = reason
            return None
        entry.state = new
        entry.reason = reason
        entry.changed_at = now
        entry.acknowledged = False
        self._transitions += 1
        system_from = self._system
        system_to = max((e.state for e in self._services.values()), key=_SEVERITY.__getitem__)
        if system_to is not system_from:
            self._system = system_to
            self._system_changed_at = now
        record = ServiceTransition(
            service, old, new, reason, now if at is None else at, system_from, system_to
        )
        for listener in tuple(self._listeners):
            try:
                listener(record)
            except Exception:
                # A broken subscriber must never break the service that reported.
                self._listener_errors += 1
        return record


def _parse_service(name: object, data: object) -> tuple[str, ServiceState, str, float | None, bool]:
    where = f"$.services.{name}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"fallback snapshot: bad service name {name!r}")
    if not isinstance(data, Mapping):
        raise ValueError(f"fallback snapshot: expected an object at {where}")
    try:
        state = ServiceState(str(data.get("state")))
    except ValueError:
        raise ValueError(
            f"fallback snapshot: unknown state {data.get('state')!r} at {where}.state"
        ) from None
    reason = data.get("reason", "")
    if not isinstance(reason, str):
        raise ValueError(f"fallback snapshot: expected str at {where}.reason")
    ago = data.get("changed_ago")
    if ago is not None and (
        isinstance(ago, bool) or not isinstance(ago, (int, float)) or not math.isfinite(ago)
    ):
        raise ValueError(f"fallback snapshot: expected a number at {where}.changed_ago")
    acknowledged = data.get("acknowledged", False)
    if not isinstance(acknowledged, bool):
        raise ValueError(f"fallback snapshot: expected bool at {where}.acknowledged")
    return name, state, reason, None if ago is None else max(0.0, float(ago)), acknowledged
