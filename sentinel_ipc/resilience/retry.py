"""A retry policy as an immutable value (after urllib3's ``Retry``, with stamina's manners).

A :class:`RetryPolicy` says *what* to retry (``on=``, required: there is no
"retry everything" default), *how often* (``attempts``, counting the first),
*for how long* (``timeout``, a cap on the whole operation's elapsed time) and
*how long to wait*. After a failed attempt, :meth:`RetryPolicy.increment`
returns a new policy with one more :class:`RetryAttempt` in its ``history``
(its ``delay`` is the wait before the next attempt), or raises:

* the error itself, when the classifier says it is not retryable;
* :class:`~sentinel_ipc.errors.RetryGaveUpError` chained from it, when it is
  retryable but the attempts, the total time, the caller's deadline or the
  retry budget are used up.

Because the value never changes, one preset can be shared by any number of
concurrent calls: each call threads its own copy through its own loop.

Wait before retry ``n`` (``n`` = 1 for the first retry), by ``backoff``:

* ``exponential`` (default)::

      delay(n) = min(initial * multiplier ** (n - 1), max_delay) * (1 + U(0, jitter))

* ``full_jitter``: ``U(0, min(initial * multiplier ** (n - 1), max_delay))``
* ``decorrelated_jitter``: Polly's decorrelated-jitter-v2: with
  ``t = (n - 1) + U(0, 1)`` and ``f(t) = 2^t * tanh(sqrt(4t))``, the wait is
  ``(f(t) - f(t_previous)) / 1.4 * initial`` capped at ``max_delay`` (median
  waits about 0.9, 1.1, 2, 4, 8 x initial); ``multiplier`` and ``jitter`` do
  not apply.

An error may carry its own hint (a server's ``retry_after_ms``): a classifier
returning ``retry_after(seconds)`` replaces the backoff for that wait. A hint
longer than ``max_delay`` ends the retries with reason "retry_after" and the
hint in the error, so the caller can pass it on instead of sleeping on it.

Pure: ``now`` and the ``random.Random`` are passed in; nothing sleeps here
(the drivers in ``guard.py`` do).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from sentinel_ipc.errors import RetryGaveUpError

if TYPE_CHECKING:
    from sentinel_ipc.resilience.budget import RetryBudget

__all__ = [
    "NO_RETRY",
    "RETRY",
    "Backoff",
    "Classifier",
    "RetryAttempt",
    "RetryDecision",
    "RetryPolicy",
    "retry_after",
    "retry_on",
]


class RandomSource(Protocol):
    """The part of ``random.Random`` the policy uses (inject a seeded one in tests)."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryDecision:
    """What a classifier says about one error: retry or not, and after how long."""

    retry: bool
    after: float | None = None  # seconds, from the error's hint; None = use the backoff


RETRY = RetryDecision(True)
NO_RETRY = RetryDecision(False)


def retry_after(seconds: float | None) -> RetryDecision:
    """Retry, waiting the error's hint instead of the backoff (None: the backoff)."""
    if seconds is None:
        return RETRY
    if not (seconds >= 0 and math.isfinite(seconds)):
        return RETRY
    return RetryDecision(True, seconds)


#: A classifier may answer with a bool for the simple cases.
Classifier: TypeAlias = Callable[[BaseException], RetryDecision | bool]
ClassifierLike: TypeAlias = Classifier | type[BaseException] | tuple[type[BaseException], ...]


class retry_on:
    """A classifier that retries instances of the given exception types."""

    __slots__ = ("types",)

    def __init__(self, *types: type[BaseException]) -> None:
        if not types:
            raise ValueError("retry_on() needs at least one exception type")
        self.types = types

    def __call__(self, error: BaseException) -> RetryDecision:
        return RETRY if isinstance(error, self.types) else NO_RETRY

    def __repr__(self) -> str:
        return f"retry_on({', '.join(t.__qualname__ for t in self.types)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, retry_on) and other.types == self.types

    def __hash__(self) -> int:
        return hash(self.types)


class Backoff(enum.StrEnum):
    EXPONENTIAL = "exponential"
    FULL_JITTER = "full_jitter"
    DECORRELATED_JITTER = "decorrelated_jitter"


@dataclass(frozen=True, slots=True)
class RetryAttempt:
    """One failed attempt: which, how, when, and the wait chosen before the next."""

    attempt: int  # 1-based number of the attempt that failed
    error: BaseException
    at: float
    delay: float
    hinted: bool  # the delay came from the error's retry_after hint
    backoff_state: float = 0.0  # decorrelated jitter's running term (Polly's `prev`)


# Polly's decorrelated-jitter-v2 constants: P smooths the first delay,
# 1/1.4 moves the medians to about initial * 1, 2, 4, ...
_DJ_P = 4.0
_DJ_SCALE = 1 / 1.4


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Immutable retry settings plus the history of the attempts made so far.

    ``on`` is a classifier (error -> RetryDecision | bool), an exception type
    or a tuple of types. See the module docstring for the delay formulas.
    ``name`` says which of SPEC's retry policies this is ("database", "ipc",
    "file", "yara", "external"; the presets carry theirs, and
    ``dataclasses.replace`` keeps it): the drivers count retries under it
    (``sentinel_retries_total{operation}``), whatever call site used it. An
    unnamed policy is counted under the caller's ``operation`` label.
    Raises ``ValueError`` for settings that make no sense.
    """

    on: ClassifierLike
    attempts: int = 3
    initial: float = 0.1
    max_delay: float = 1.0
    multiplier: float = 2.0
    jitter: float = 0.1
    timeout: float | None = None
    backoff: Backoff = Backoff.EXPONENTIAL
    name: str = ""
    history: tuple[RetryAttempt, ...] = ()

    def __post_init__(self) -> None:
        on = self.on
        if isinstance(on, (type, tuple)):
            types = on if isinstance(on, tuple) else (on,)
            object.__setattr__(self, "on", retry_on(*types))
        elif not callable(on):
            raise ValueError(f"RetryPolicy.on must be a classifier or exception types, got {on!r}")
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an integer >= 1, got {self.attempts!r}")
        for name in ("initial", "max_delay", "jitter"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"RetryPolicy.{name} must be a finite number >= 0, got {value!r}")
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError(f"RetryPolicy.multiplier must be >= 1, got {self.multiplier!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"RetryPolicy.timeout must be > 0 or None, got {self.timeout!r}")
        object.__setattr__(self, "backoff", Backoff(self.backoff))

    # --- reading ----------------------------------------------------------

    @property
    def attempt(self) -> int:
        """Number of the attempt about to be made (1 before any failure)."""
        return len(self.history) + 1

    @property
    def next_delay(self) -> float:
        """The wait chosen by the last :meth:`increment` (0 before any)."""
        return self.history[-1].delay if self.history else 0.0

    def classify(self, error: BaseException) -> RetryDecision:
        """The classifier's verdict. Only ``Exception``s are ever retried:
        cancellation and KeyboardInterrupt are not failures to retry."""
        if not isinstance(error, Exception):
            return NO_RETRY
        on = self.on
        assert callable(on) and not isinstance(on, type)
        decision = on(error)
        if decision is True:
            return RETRY
        if decision is False or decision is None:
            return NO_RETRY
        return decision

    def ceiling(self, retry: int) -> float:
        """The un-jittered backoff before retry ``retry``: min(initial * m^(n-1), max)."""
        try:
            raw = self.initial * self.multiplier ** (retry - 1)
        except OverflowError:
            raw = math.inf
        return min(raw, self.max_delay)

    def delay(self, retry: int, rng: RandomSource, state: float = 0.0) -> float:
        """A wait before retry ``retry`` (1-based), drawn from ``rng``."""
        return self._draw(retry, rng, state)[0]

    def _draw(self, retry: int, rng: RandomSource, state: float) -> tuple[float, float]:
        backoff = self.backoff
        if backoff is Backoff.EXPONENTIAL:
            ceiling = self.ceiling(retry)
            if self.jitter:
                ceiling *= 1.0 + rng.random() * self.jitter
            return ceiling, state
        if backoff is Backoff.FULL_JITTER:
            return rng.random() * self.ceiling(retry), state
        # Decorrelated jitter v2 (Polly): t grows by one per retry plus a random
        # fraction; each delay is the increase of a smooth curve, so the sum of
        # the delays tracks 2^t while consecutive delays stay decorrelated.
        t = (retry - 1) + rng.random()
        try:
            nxt = 2.0**t * math.tanh(math.sqrt(_DJ_P * t))
        except OverflowError:
            nxt = math.inf
        if math.isinf(nxt) or math.isinf(state):
            return self.max_delay, math.inf
        delay = (nxt - state) * _DJ_SCALE * self.initial
        return min(max(0.0, delay), self.max_delay), nxt

    # --- the one state change ----------------------------------------------

    def increment(
        self,
        error: BaseException,
        *,
        now: float,
        rng: RandomSource,
        started_at: float | None = None,
        deadline: float | None = None,
        budget: RetryBudget | None = None,
        operation: str = "",
    ) -> RetryPolicy:
        """Record that the current attempt failed with ``error``; return the next policy.

        ``started_at``: when the operation began (for ``timeout``; default: the
        first failure). ``deadline``: when the caller's cancel scope expires; a
        wait that would reach it gives up now instead. ``budget``: spent only
        when everything else allows the retry.

        Raises ``error`` itself when it is not retryable, and
        :class:`RetryGaveUpError` (chained from ``error``) when it is but no
        retry may follow.
        """
        decision = self.classify(error)
        if not decision.retry:
            raise error
        failed = len(self.history) + 1
        label = operation or "operation"

        def give_up(reason: str, why: str, hint: float | None = None) -> RetryGaveUpError:
            history = (*self.history, RetryAttempt(failed, error, now, 0.0, False))
            return RetryGaveUpError(
                f"{label} gave up after {failed} attempt{'s' if failed > 1 else ''} ({why}); "
                f"last error: {type(error).__name__}: {error}",
                operation=operation,
                reason=reason,
                attempts=failed,
                history=history,
                retry_after=hint,
            )

        if failed >= self.attempts:
            raise give_up("attempts", f"at most {self.attempts} allowed") from error
        state = self.history[-1].backoff_state if self.history else 0.0
        if decision.after is not None:
            delay, hinted = decision.after, True
            if delay > self.max_delay:
                raise give_up(
                    "retry_after",
                    f"the error asks for {delay:.3g} s, over max_delay {self.max_delay:g} s",
                    delay,
                ) from error
        else:
            delay, state = self._draw(failed, rng, state)
            hinted = False
        if self.timeout is not None:
            start = started_at
            if start is None:
                start = self.history[0].at if self.history else now
            if now + delay - start > self.timeout:
                raise give_up("timeout", f"total time cap {self.timeout:g} s") from error
        if deadline is not None and now + delay >= deadline:
            raise give_up(
                "deadline",
                f"waiting {delay:.3g} s would pass the caller's deadline in {deadline - now:.3g} s",
            ) from error
        if budget is not None and not budget.try_withdraw(now):
            raise give_up("budget", f"retry budget {budget.name!r} is spent") from error
        attempt = RetryAttempt(failed, error, now, delay, hinted, state)
        return dataclasses.replace(self, history=(*self.history, attempt))

    def reset(self) -> RetryPolicy:
        """The same settings with an empty history, ready for a new operation."""
        if not self.history:
            return self
        return dataclasses.replace(self, history=())
