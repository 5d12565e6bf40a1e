"""Observability: health checks, metrics, pushed events, the optional HTTP
endpoint, and the I/O side of graceful degradation (persisted state, the
wiring of breakers and checks into the FallbackManager).

``hub.Observability`` is what the daemon builds (``open_observability``) and
what other sections reach as ``daemon.observability``.

The public names are imported lazily (PEP 562): ``sentinel_ipc.config``
imports ``observability.config`` and must not pay for trio, prometheus_client
and h11 to parse a TOML file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .checks import DiskCheck, MemoryCheck, database_check, http_check, ipc_check, yara_check
    from .config import HealthSettings, ResilienceConfig
    from .events import NOTICE_ACTIONS, EventBus, Subscription, notice_text
    from .health import CheckOutcome, CheckResult, HealthRegistry
    from .http import serve_http
    from .hub import Observability, open_observability
    from .metrics import SentinelMetrics
    from .state_store import PersistedState, StateStore

__all__ = [
    "NOTICE_ACTIONS",
    "CheckOutcome",
    "CheckResult",
    "DiskCheck",
    "EventBus",
    "HealthRegistry",
    "HealthSettings",
    "MemoryCheck",
    "Observability",
    "PersistedState",
    "ResilienceConfig",
    "SentinelMetrics",
    "StateStore",
    "Subscription",
    "database_check",
    "http_check",
    "ipc_check",
    "notice_text",
    "open_observability",
    "serve_http",
    "yara_check",
]

_WHERE = {
    "DiskCheck": "checks",
    "MemoryCheck": "checks",
    "database_check": "checks",
    "http_check": "checks",
    "ipc_check": "checks",
    "yara_check": "checks",
    "HealthSettings": "config",
    "ResilienceConfig": "config",
    "NOTICE_ACTIONS": "events",
    "EventBus": "events",
    "Subscription": "events",
    "notice_text": "events",
    "CheckOutcome": "health",
    "CheckResult": "health",
    "HealthRegistry": "health",
    "serve_http": "http",
    "Observability": "hub",
    "open_observability": "hub",
    "SentinelMetrics": "metrics",
    "PersistedState": "state_store",
    "StateStore": "state_store",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
