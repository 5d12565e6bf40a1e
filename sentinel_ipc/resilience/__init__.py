"""Resilience core: circuit breaker, retry policy, retry budget, fallback
states, their trio drivers and metrics hooks.

The state machines (``breaker``, ``retry``, ``budget``, ``fallback``, and the
records and counters in ``instruments``) are pure: they take ``now`` and an
injected ``random.Random`` and import neither trio nor time, random, socket
or sqlite3 (``tests/test_pure_imports.py`` keeps that true). ``guard`` drives
them under trio; ``classifiers`` knows which errors of sqlite3, the OS, trio
and yara are worth a retry, and holds the SPEC's presets.
"""

from sentinel_ipc.resilience.breaker import (
    BreakerConfig,
    BreakerState,
    BreakerStatistics,
    CircuitBreaker,
    Permit,
    count_every_exception,
)
from sentinel_ipc.resilience.budget import BudgetStatistics, RetryBudget
from sentinel_ipc.resilience.classifiers import BREAKER_PRESETS, RETRY_PRESETS, Excluding
from sentinel_ipc.resilience.fallback import (
    FallbackEvent,
    FallbackManager,
    FallbackStatistics,
    ServiceState,
    ServiceStatus,
    ServiceTransition,
)
from sentinel_ipc.resilience.guard import guarded_call, guarded_call_sync
from sentinel_ipc.resilience.instruments import (
    RETRY_COUNTERS,
    RETRY_POLICIES,
    BreakerTransition,
    CallOutcome,
    RetryCounters,
    RetryCountersStatistics,
    RetryFinished,
    RetryObserver,
    RetryOutcome,
    RetryScheduled,
)
from sentinel_ipc.resilience.retry import (
    NO_RETRY,
    RETRY,
    Backoff,
    RetryAttempt,
    RetryDecision,
    RetryPolicy,
    retry_after,
    retry_on,
)

__all__ = [
    "BREAKER_PRESETS",
    "NO_RETRY",
    "RETRY",
    "RETRY_COUNTERS",
    "RETRY_POLICIES",
    "RETRY_PRESETS",
    "Backoff",
    "BreakerConfig",
    "BreakerState",
    "BreakerStatistics",
    "BreakerTransition",
    "BudgetStatistics",
    "CallOutcome",
    "CircuitBreaker",
    "Excluding",
    "FallbackEvent",
    "FallbackManager",
    "FallbackStatistics",
    "Permit",
    "RetryAttempt",
    "RetryBudget",
    "RetryCounters",
    "RetryCountersStatistics",
    "RetryDecision",
    "RetryFinished",
    "RetryObserver",
    "RetryOutcome",
    "RetryPolicy",
    "RetryScheduled",
    "ServiceState",
    "ServiceStatus",
    "ServiceTransition",
    "count_every_exception",
    "guarded_call",
    "guarded_call_sync",
    "retry_after",
    "retry_on",
]
