"""A circuit breaker as a pure state machine.

Theory of operation
-------------------

A breaker stands in front of one dependency (the policy database, the scanner
pool, one IPC target) and answers one question per call: may this call go
ahead? Each call takes a :class:`Permit` with :meth:`CircuitBreaker.acquire`, and
settles it exactly once with :meth:`~CircuitBreaker.record_success`,
:meth:`~CircuitBreaker.record_error` (the failure classifier decides failure or
ignored), :meth:`~CircuitBreaker.record_failure` or
:meth:`~CircuitBreaker.release` (the call never reported: cancelled, or an error
that says nothing about the dependency).

States::

    closed ──N consecutive failures / failure rate / slow-call rate──▶ open
    open ──open timeout elapsed (seen by the next acquire or statistics)──▶ half_open
    half_open ──M trial successes──▶ closed
    half_open ──a trial failed, or one ran past half_open_max_wait──▶ open (timeout grows)
    any ──trip()──▶ forced_open        any ──reset()──▶ closed
    any ──disable()──▶ disabled        open/forced_open ──half_open()──▶ half_open
    any ──trip(timeout=t)──▶ open for t seconds

Half-open admits at most ``half_open_max_calls`` trial calls *in flight*; every
other caller is rejected at once with :class:`CircuitOpenError`. A trial that is
released (cancelled) frees its slot for the next caller; a trial that never
reports at all is declared failed once it has run ``half_open_max_wait``
seconds, so half-open cannot get stuck.

Every permit carries the *epoch* (a counter bumped on each transition) in
which it was granted. Outcomes of permits from an earlier epoch are counted in
the totals but change no state: a slow call admitted while closed that fails
after the breaker already opened must not count against the trial calls.

The machine is pure: time comes in as ``now`` (monotonic seconds; the trio
driver passes ``trio.current_time()``) or from the ``clock`` given at
construction, and no method does I/O or blocks. It is not thread-safe: drive it
from one thread (in Sentinel, the trio thread), which is also why no call ever
waits on a lock.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from sentinel_ipc.errors import CircuitOpenError, LocalProtocolError
from sentinel_ipc.resilience.instruments import BreakerTransition, CallOutcome, SlidingWindow

__all__ = [
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "CircuitBreaker",
    "Permit",
    "count_every_exception",
]

SNAPSHOT_VERSION: Final = 1


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"  # manual trip(): stays open until reset()
    DISABLED = "disabled"  # manual disable(): every call passes, nothing trips


def count_every_exception(error: BaseException) -> bool:
    """Default failure classifier: every ``Exception`` is a failure.

    ``BaseException``s that are not ``Exception``s (cancellation,
    KeyboardInterrupt) say nothing about the dependency and are ignored.
    """
    return isinstance(error, Exception)


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it recovers. SPEC section 3 has the presets.

    failure_threshold: consecutive failures (while closed) that open it.
    open_timeout: seconds open before the next call may be a trial.
    success_threshold: consecutive successful trials (half-open) that close it.
    half_open_max_calls: trial calls allowed in flight at once.
    half_open_max_wait: a trial running longer than this counts as failed.
    open_timeout_multiplier / max_open_timeout: each re-open straight from
        half-open multiplies the open timeout (1.0 = fixed), capped.
    failure_rate_threshold, slow_call_rate_threshold (0..1], slow_call_duration:
        optional rate trips over the last ``window`` seconds, evaluated once at
        least ``minimum_calls`` calls finished in it.
    is_failure: which errors count as failures; the rest are ignored (neither
        success nor failure).
    """

    failure_threshold: int = 5
    open_timeout: float = 30.0
    success_threshold: int = 2
    half_open_max_calls: int = 1
    half_open_max_wait: float = 30.0
    open_timeout_multiplier: float = 1.0
    max_open_timeout: float = 600.0
    failure_rate_threshold: float | None = None
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float | None = None
    window: float = 60.0
    minimum_calls: int = 10
    is_failure: Callable[[BaseException], bool] = field(default=count_every_exception)

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"BreakerConfig.{name} must be a positive number, got {value!r}")

        for name in ("failure_threshold", "success_threshold", "half_open_max_calls"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BreakerConfig.{name} must be an integer >= 1, got {value!r}")
        positive("open_timeout", self.open_timeout)
        positive("half_open_max_wait", self.half_open_max_wait)
        positive("window", self.window)
        if self.open_timeout_multiplier < 1.0:
            raise ValueError("BreakerConfig.open_timeout_multiplier must be >= 1.0")
        if self.max_open_timeout < self.open_timeout:
            raise ValueError("BreakerConfig.max_open_timeout must be >= open_timeout")
        for name in ("failure_rate_threshold", "slow_call_rate_threshold"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 < rate <= 1.0:
                raise ValueError(f"BreakerConfig.{name} must be in (0, 1], got {rate!r}")
        if self.slow_call_rate_threshold is not None and self.slow_call_duration is None:
            raise ValueError("BreakerConfig.slow_call_rate_threshold needs slow_call_duration")
        if self.slow_call_duration is not None:
            positive("slow_call_duration", self.slow_call_duration)
        if self.minimum_calls < 1:
            raise ValueError("BreakerConfig.minimum_calls must be >= 1")

    def open_timeout_after(self, reopens: int) -> float:
        """Open timeout after ``reopens`` consecutive re-opens from half-open."""
        if self.open_timeout_multiplier == 1.0 or reopens <= 0:
            return self.open_timeout
        grown = self.open_timeout * self.open_timeout_multiplier ** min(reopens, 64)
        return min(grown, self.max_open_timeout)

    @property
    def uses_window(self) -> bool:
        return self.failure_rate_threshold is not None or self.slow_call_rate_threshold is not None


class Permit:
    """Leave to make one call; settle it exactly once. Opaque to callers.

    While closed (or disabled) with no slow-call or rate window to feed, every
    caller gets the same shared permit (``started`` is None): the breaker then
    needs neither an allocation nor the time per call, which is most of its
    cost. Settling twice is detected for the other permits only.
    """

    __slots__ = ("epoch", "settled", "started", "trial")

    def __init__(self, epoch: int, started: float | None, trial: bool) -> None:
        self.epoch = epoch
        self.started = started
        self.trial = trial
        self.settled = False


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A frozen view of a breaker at one instant (``at``).

    successes / failures / ignored / rejected are monotonic totals (the calls
    by outcome); retry_after is the time left open (None when not open, or
    forced open: unknown).
    """

    name: str
    state: BreakerState
    at: float
    consecutive_failures: int
    consecutive_successes: int  # trial successes so far in half-open
    successes: int
    failures: int
    ignored: int
    rejected: int
    slow_calls: int
    last_failure_at: float | None
    state_changed_at: float | None
    opened_at: float | None
    retry_after: float | None
    open_timeout: float  # the current one, after growth
    reopens: int
    trials_in_flight: int
    window_calls: int
    window_failure_rate: float | None
    listener_errors: int

    def total(self, outcome: CallOutcome) -> int:
        return {
            CallOutcome.SUCCESS: self.successes,
            CallOutcome.FAILURE: self.failures,
            CallOutcome.IGNORED: self.ignored,
            CallOutcome.REJECTED: self.rejected,
        }[outcome]


class _Event(enum.Enum):
    """What can move a breaker. The value is the default transition reason."""

    FAILURES = "consecutive failures reached the threshold"
    FAILURE_RATE = "failure rate over the window reached the threshold"
    SLOW_RATE = "slow-call rate over the window reached the threshold"
    TIMEOUT_ELAPSED = "open timeout elapsed"
    TRIALS_SUCCEEDED = "trial calls succeeded"
    TRIAL_FAILED = "a trial call failed"
    TRIAL_TIMED_OUT = "a trial call ran past half_open_max_wait"
    TRIP = "manual trip"
    TRIP_FOR = "manual trip with a timeout"
    RESET = "manual reset"
    DISABLE = "manual disable"
    HALF_OPEN = "manual half-open"


_S = BreakerState
_E = _Event
# Every legal transition. Manual events are legal from every state; the
# transition is silent (no event) when it leaves the state unchanged.
_TRANSITIONS: dict[tuple[BreakerState, _Event], BreakerState] = {
    (_S.CLOSED, _E.FAILURES): _S.OPEN,
    (_S.CLOSED, _E.FAILURE_RATE): _S.OPEN,
    (_S.CLOSED, _E.SLOW_RATE): _S.OPEN,
    (_S.OPEN, _E.TIMEOUT_ELAPSED): _S.HALF_OPEN,
    (_S.HALF_OPEN, _E.TRIALS_SUCCEEDED): _S.CLOSED,
    (_S.HALF_OPEN, _E.TRIAL_FAILED): _S.OPEN,
    (_S.HALF_OPEN, _E.TRIAL_TIMED_OUT): _S.OPEN,
    (_S.OPEN, _E.HALF_OPEN): _S.HALF_OPEN,
    (_S.FORCED_OPEN, _E.HALF_OPEN): _S.HALF_OPEN,
}
for _state in BreakerState:
    _TRANSITIONS[(_state, _E.TRIP)] = _S.FORCED_OPEN
    _TRANSITIONS[(_state, _E.TRIP_FOR)] = _S.OPEN
    _TRANSITIONS[(_state, _E.RESET)] = _S.CLOSED
    _TRANSITIONS[(_state, _E.DISABLE)] = _S.DISABLED
del _state

TransitionListener = Callable[[BreakerTransition], object]

# Window fields.
_CALLS, _FAILED, _SLOW = 0, 1, 2
# Module constants: an enum attribute lookup costs more than the hot path.
_CLOSED, _DISABLED = BreakerState.CLOSED, BreakerState.DISABLED


class CircuitBreaker:
    """One breaker for one dependency. See the module docstring for the states.

    Every method that depends on time takes ``now`` (monotonic seconds); when
    it is omitted the ``clock`` given at construction is read. Use one time
    base per breaker: inside trio, ``trio.current_time`` (which the drivers use).
    """

    __slots__ = (
        "_changed_at",
        "_clock",
        "_consecutive_failures",
        "_epoch",
        "_failures",
        "_half_open_successes",
        "_ignored",
        "_last_failure_at",
        "_listener_errors",
        "_listeners",
        "_open_timeout",
        "_open_until",
        "_opened_at",
        "_rejected",
        "_reopens",
        "_shared",
        "_slow",
        "_slow_after",
        "_state",
        "_successes",
        "_trials",
        "_window",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.config = config = config if config is not None else BreakerConfig()
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._epoch = 0
        self._changed_at: float | None = None
        self._opened_at: float | None = None
        self._open_until: float | None = None
        self._open_timeout = config.open_timeout
        self._reopens = 0
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._trials: dict[Permit, float] = {}
        self._successes = self._failures = self._ignored = self._rejected = self._slow = 0
        self._last_failure_at: float | None = None
        self._listeners: list[TransitionListener] = []
        self._listener_errors = 0
        self._slow_after = config.slow_call_duration
        self._window = (
            SlidingWindow(config.window, buckets=10, fields=3) if config.uses_window else None
        )
        self._shared: Permit | None = None
        self._share_permits()

    # --- observation ------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state as of the last call; time-based moves happen on the next one."""
        return self._state

    def add_listener(self, listener: TransitionListener) -> None:
        """Call ``listener(BreakerTransition)`` on every state transition."""
        self._listeners.append(listener)

    def remove_listener(self, listener: TransitionListener) -> None:
        self._listeners.remove(listener)

    def statistics(self, now: float | None = None) -> BreakerStatistics:
        now = self._now(now)
        self._tick(now)
        retry_after = None
        if self._state is BreakerState.OPEN and self._open_until is not None:
            retry_after = max(0.0, self._open_until - now)
        window_calls, rate = 0, None
        if self._window is not None:
            calls, failed, _slow = self._window.totals(now)
            window_calls = calls
            rate = failed / calls if calls else None
        return BreakerStatistics(
            name=self.name,
            state=self._state,
            at=now,
            consecutive_failures=self._consecutive_failures,
            consecutive_successes=self._half_open_successes,
            successes=self._successes,
            failures=self._failures,
            ignored=self._ignored,
            rejected=self._rejected,
            slow_calls=self._slow,
            last_failure_at=self._last_failure_at,
            state_changed_at=self._changed_at,
            opened_at=self._opened_at,
            retry_after=retry_after,
            open_timeout=self._open_timeout,
            reopens=self._reopens,
            trials_in_flight=len(self._trials),
            window_calls=window_calls,
            window_failure_rate=rate,
            listener_errors=self._listener_errors,
        )

    # --- the call protocol ----------------------------------------------------

    def acquire(self, now: float | None = None) -> Permit:
        """Leave to make one call, or :class:`CircuitOpenError` (with ``retry_after``).

        Never blocks: a caller that cannot be admitted is told so at once.
        """
        shared = self._shared
        if shared is not None:  # the hot path: closed, nothing to measure
            return shared
        if now is None:
            now = self._now(now)
        state = self._state
        if state is _CLOSED or state is _DISABLED:
            return Permit(self._epoch, now, False)
        self._tick(now)
        state = self._state
        if state is BreakerState.HALF_OPEN:
            if len(self._trials) < self.config.half_open_max_calls:
                permit = Permit(self._epoch, now, True)
                self._trials[permit] = now
                return permit
            # Worst case: the oldest trial is declared failed at its max wait.
            retry_after: float | None = max(
                0.0, min(self._trials.values()) + self.config.half_open_max_wait - now
            )
            detail = "half-open, trial calls in flight"
        elif state is BreakerState.OPEN:
            assert self._open_until is not None
            retry_after = max(0.0, self._open_until - now)
            detail = f"open, retry in {retry_after:.3g} s"
        elif state is BreakerState.FORCED_OPEN:
            retry_after = None
            detail = "forced open until reset"
        else:  # closed after _tick cannot happen, but be total
            return Permit(self._epoch, now, False)
        self._rejected += 1
        raise CircuitOpenError(self.name, retry_after, f"circuit breaker {self.name!r} is {detail}")

    def record_success(self, permit: Permit, now: float | None = None) -> None:
        """Settle a call that succeeded. ``now`` is not read for a shared permit."""
        self._successes += 1
        if permit is self._shared:
            self._consecutive_failures = 0
            return
        self._settle(permit)
        if permit.epoch != self._epoch:  # admitted before the last transition
            if now is not None:
                self._is_slow(permit, now)
            return
        now = self._now(now)
        slow = self._is_slow(permit, now)
        state = self._state
        if state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            if self._window is not None:
                self._window_add(now, failed=False, slow=slow)
        elif state is BreakerState.HALF_OPEN:
            if slow and self.config.slow_call_rate_threshold is not None:
                # A trial that only just made it does not prove recovery.
                self._reopen(now, _Event.TRIAL_FAILED, "a trial call was slow")
                return
            self._half_open_successes += 1
            if self._half_open_successes >= self.config.success_threshold:
                self._transition(_Event.TRIALS_SUCCEEDED, now)

    def record_failure(
        self, permit: Permit, now: float | None = None, error: BaseException | None = None
    ) -> None:
        """Count a failure of the dependency (``error``, if given, names it in reasons)."""
        now = self._now(now)
        self._settle(permit)
        self._failures += 1
        self._last_failure_at = now
        slow = self._is_slow(permit, now)
        if permit.epoch != self._epoch:
            return
        state = self._state
        cause = "" if error is None else f" (last: {type(error).__name__}: {error})"
        if state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            if self._consecutive_failures >= self.config.failure_threshold:
                self._transition(
                    _Event.FAILURES,
                    now,
                    f"{self._consecutive_failures} consecutive failures{cause}",
                )
            elif self._window is not None:
                self._window_add(now, failed=True, slow=slow)
        elif state is BreakerState.HALF_OPEN:
            self._reopen(now, _Event.TRIAL_FAILED, f"a trial call failed{cause}")

    def record_error(
        self, permit: Permit, error: BaseException, now: float | None = None
    ) -> CallOutcome:
        """Settle with an error; the config's ``is_failure`` decides failure or ignored."""
        if self.config.is_failure(error):
            self.record_failure(permit, now, error)
            return CallOutcome.FAILURE
        self.release(permit)
        return CallOutcome.IGNORED

    def release(self, permit: Permit) -> None:
        """Settle a call that says nothing about the dependency (cancelled, ignored).

        Frees its half-open trial slot at once, so the next caller can try.
        """
        self._settle(permit)
        self._ignored += 1

    # --- manual control ---------------------------------------------------

    def trip(
        self, now: float | None = None, *, timeout: float | None = None, reason: str | None = None
    ) -> None:
        """Open by hand: forced open until :meth:`reset`, or open for ``timeout`` seconds."""
        now = self._now(now)
        if timeout is None:
            self._transition(_Event.TRIP, now, reason)
            return
        if not (timeout >= 0 and math.isfinite(timeout)):
            raise ValueError(f"trip timeout must be a finite number >= 0, got {timeout!r}")
        self._transition(_Event.TRIP_FOR, now, reason, open_for=timeout)

    def reset(self, now: float | None = None, *, reason: str | None = None) -> None:
        """Close by hand and forget the failure streak and the grown open timeout."""
        self._reopens = 0
        self._transition(_Event.RESET, self._now(now), reason)

    def disable(self, now: float | None = None, *, reason: str | None = None) -> None:
        """Let every call through and never trip (until :meth:`reset`)."""
        self._transition(_Event.DISABLE, self._now(now), reason)

    def half_open(self, now: float | None = None, *, reason: str | None = None) -> bool:
        """Admit trial calls now ("Retry Connection"). False if not open at all."""
        now = self._now(now)
        self._tick(now)
        if self._state not in (BreakerState.OPEN, BreakerState.FORCED_OPEN):
            return False
        self._transition(_Event.HALF_OPEN, now, reason)
        return True

    # --- persistence ------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """A JSON-safe dict; times are relative, so it survives a restart."""
        now = self._now(now)
        self._tick(now)
        open_remaining = None
        if self._state is BreakerState.OPEN and self._open_until is not None:
            open_remaining = max(0.0, self._open_until - now)
        elif self._state is BreakerState.HALF_OPEN:
            open_remaining = 0.0
        return {
            "version": SNAPSHOT_VERSION,
            "name": self.name,
            "state": str(self._state),
            "open_remaining": open_remaining,
            "open_timeout": self._open_timeout,
            "reopens": self._reopens,
            "consecutive_failures": self._consecutive_failures,
            "totals": {
                "success": self._successes,
                "failure": self._failures,
                "ignored": self._ignored,
                "rejected": self._rejected,
                "slow": self._slow,
            },
            "last_failure_ago": (
                None if self._last_failure_at is None else max(0.0, now - self._last_failure_at)
            ),
        }

    def restore(
        self, snapshot: dict[str, Any], now: float | None = None, *, elapsed: float = 0.0
    ) -> None:
        """Load a :meth:`snapshot`. ``elapsed``: seconds since it was taken (the
        wall-clock gap across a restart), counted against the time left open.

        A breaker snapshotted in half-open comes back *open* with what was left
        of its open time (none): its trials died with the old process, so the
        next call is a fresh trial, not a stuck permit. Raises ``ValueError``
        naming the key for a malformed snapshot.
        """
        now = self._now(now)
        data = _SnapshotReader(snapshot)
        if data.integer("version") != SNAPSHOT_VERSION:
            raise ValueError(f"breaker snapshot: unsupported version {snapshot.get('version')!r}")
        if data.text("name") != self.name:
            raise ValueError(
                f"breaker snapshot: is for {snapshot.get('name')!r}, not {self.name!r}"
            )
        try:
            state = BreakerState(data.text("state"))
        except ValueError:
            raise ValueError(f"breaker snapshot: unknown state {snapshot.get('state')!r}") from None
        remaining = data.optional_number("open_remaining")
        open_timeout = data.number("open_timeout")
        reopens = data.integer("reopens")
        consecutive = data.integer("consecutive_failures")
        totals = data.child("totals")
        ago = data.optional_number("last_failure_ago")

        self._successes = totals.integer("success")
        self._failures = totals.integer("failure")
        self._ignored = totals.integer("ignored")
        self._rejected = totals.integer("rejected")
        self._slow = totals.integer("slow")
        self._last_failure_at = None if ago is None else now - ago - max(0.0, elapsed)
        event_reason = "restored from a snapshot"
        if state in (BreakerState.OPEN, BreakerState.HALF_OPEN):
            left = max(0.0, (remaining or 0.0) - max(0.0, elapsed))
            self._reopens = max(0, reopens)
            self._transition(_Event.TRIP_FOR, now, event_reason, open_for=left)
            self._open_timeout = max(open_timeout, left)
        elif state is BreakerState.FORCED_OPEN:
            self._transition(_Event.TRIP, now, event_reason)
        elif state is BreakerState.DISABLED:
            self._transition(_Event.DISABLE, now, event_reason)
        else:
            self._reopens = 0
            self._transition(_Event.RESET, now, event_reason)
            self._consecutive_failures = min(max(0, consecutive), self.config.failure_threshold - 1)

    # --- internals --------------------------------------------------------

    def _now(self, now: float | None) -> float:
        if now is not None:
            return now
        if self._clock is None:
            raise TypeError(
                f"breaker {self.name!r} has no clock: pass now= or construct it with clock="
            )
        return self._clock()

    def _is_slow(self, permit: Permit, now: float) -> bool:
        slow_after, started = self._slow_after, permit.started
        if slow_after is None or started is None or now - started < slow_after:
            return False
        self._slow += 1
        return True

    def _share_permits(self) -> None:
        """Hand out one shared permit while no call needs watching (see Permit)."""
        state = self._state
        if (
            (state is _CLOSED or state is _DISABLED)
            and self._slow_after is None
            and (self._window is None or state is _DISABLED)
        ):
            self._shared = Permit(self._epoch, None, False)
        else:
            self._shared = None

    def _settle(self, permit: Permit) -> None:
        if permit.started is None:  # a shared permit: nothing to track
            return
        if permit.settled:
            raise LocalProtocolError(f"breaker {self.name!r}: permit settled twice")
        permit.settled = True
        if permit.trial:
            self._trials.pop(permit, None)

    def _tick(self, now: float) -> None:
        """Apply the transitions that time alone causes."""
        state = self._state
        if state is BreakerState.OPEN:
            if self._open_until is not None and now >= self._open_until:
                self._transition(_Event.TIMEOUT_ELAPSED, now)
        elif (
            state is BreakerState.HALF_OPEN
            and self._trials
            and min(self._trials.values()) + self.config.half_open_max_wait <= now
        ):
            self._reopen(now, _Event.TRIAL_TIMED_OUT)

    def _window_add(self, now: float, *, failed: bool, slow: bool) -> None:
        window = self._window
        assert window is not None
        window.add(now, _CALLS)
        if failed:
            window.add(now, _FAILED)
        if slow:
            window.add(now, _SLOW)
        calls, failures, slows = window.totals(now)
        config = self.config
        if calls < config.minimum_calls:
            return
        if config.failure_rate_threshold is not None and failures / calls >= (
            config.failure_rate_threshold
        ):
            self._transition(
                _Event.FAILURE_RATE,
                now,
                f"{failures}/{calls} calls failed in the last {config.window:g} s",
            )
        elif config.slow_call_rate_threshold is not None and slows / calls >= (
            config.slow_call_rate_threshold
        ):
            self._transition(
                _Event.SLOW_RATE,
                now,
                f"{slows}/{calls} calls slower than {config.slow_call_duration:g} s "
                f"in the last {config.window:g} s",
            )

    def _reopen(self, now: float, event: _Event, reason: str | None = None) -> None:
        self._reopens += 1
        self._transition(event, now, reason)

    def _transition(
        self,
        event: _Event,
        now: float,
        reason: str | None = None,
        *,
        open_for: float | None = None,
    ) -> None:
        old = self._state
        new = _TRANSITIONS.get((old, event))
        if new is None:
            raise LocalProtocolError(
                f"breaker {self.name!r}: no transition on {event.name} in state {old}"
            )
        # Enter the new state (also when it equals the old one: a manual
        # reset in closed still clears the failure streak).
        self._consecutive_failures = 0
        self._half_open_successes = 0
        self._trials.clear()
        if new is BreakerState.OPEN:
            if open_for is None:
                open_for = self.config.open_timeout_after(self._reopens)
            self._open_timeout = open_for
            self._opened_at = now
            self._open_until = now + open_for
        elif new is BreakerState.FORCED_OPEN:
            if old is not BreakerState.FORCED_OPEN:
                self._opened_at = now
            self._open_until = None
        elif new is BreakerState.CLOSED:
            self._reopens = 0
            self._open_timeout = self.config.open_timeout
            self._opened_at = self._open_until = None
            if self._window is not None:
                self._window.clear()
        elif new is BreakerState.DISABLED:
            self._opened_at = self._open_until = None
        if new is old and event is not _Event.TRIP_FOR:
            return
        self._epoch += 1
        self._state = new
        self._changed_at = now
        self._share_permits()
        if new is old:
            return
        record = BreakerTransition(self.name, old, new, now, reason or event.value)
        for listener in tuple(self._listeners):
            try:
                listener(record)
            except Exception:
                # A broken metrics hook must never break the call it observes.
                self._listener_errors += 1


class _SnapshotReader:
    """Typed access to a snapshot dict; errors name the key."""

    __slots__ = ("_data", "_path")

    def __init__(self, data: object, path: str = "$") -> None:
        if not isinstance(data, dict):
            raise ValueError(f"breaker snapshot: expected an object at {path}")
        self._data: dict[str, Any] = data
        self._path = path

    def _get(self, key: str) -> object:
        if key not in self._data:
            raise ValueError(f"breaker snapshot: missing {self._path}.{key}")
        return self._data[key]

    def _bad(self, key: str, want: str) -> ValueError:
        return ValueError(
            f"breaker snapshot: expected {want} at {self._path}.{key}, "
            f"got {type(self._data[key]).__name__}"
        )

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "int")
        return value

    def number(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._bad(key, "number")
        if not math.isfinite(value):
            raise self._bad(key, "finite number")
        return float(value)

    def optional_number(self, key: str) -> float | None:
        if self._get(key) is None:
            return None
        return self.number(key)

    def text(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            raise self._bad(key, "str")
        return value

    def child(self, key: str) -> _SnapshotReader:
        return _SnapshotReader(self._get(key), f"{self._path}.{key}")
