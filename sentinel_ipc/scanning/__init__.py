"""Scanning: YARA rule sets, the worker-process pool and the Scanner engine.

The public names are imported lazily (PEP 562) so that a worker process, which
runs ``worker.py`` and needs only yara and msgspec, never pays for trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import (
        ScanMeta,
        Scanner,
        ScannerConfig,
        ScannerSettings,
        ScannerStatistics,
        ScanOutcome,
        ScanStream,
        open_scanner,
    )
    from .pool import PoolStatistics
    from .rules import BUILTIN_RULES_DIR, EXTERNALS, RulesInfo

__all__ = [
    "BUILTIN_RULES_DIR",
    "EXTERNALS",
    "PoolStatistics",
    "RulesInfo",
    "ScanMeta",
    "ScanOutcome",
    "ScanStream",
    "Scanner",
    "ScannerConfig",
    "ScannerSettings",
    "ScannerStatistics",
    "open_scanner",
]

_WHERE = {
    "Scanner": "engine",
    "ScannerConfig": "engine",
    "ScannerSettings": "engine",
    "ScannerStatistics": "engine",
    "ScanMeta": "engine",
    "ScanOutcome": "engine",
    "ScanStream": "engine",
    "open_scanner": "engine",
    "PoolStatistics": "pool",
    "BUILTIN_RULES_DIR": "rules",
    "EXTERNALS": "rules",
    "RulesInfo": "rules",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
