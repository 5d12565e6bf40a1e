"""Range checks for the config sections, run from their ``__post_init__``.

A value of the right type can still be one the daemon cannot run with (a
frame limit of 0, a timeout of -1, a token bucket that never fills). Each
section refuses such values at load time, naming the key, so that a bad file
stops start-up with exit 2 and a ``ConfigError`` (the loader prefixes the
section: ``server: write_timeout must be ...``) instead of failing later, at
the first connection or the first scan, with a traceback.
"""

from __future__ import annotations

import math

import msgspec


def at_least(section: msgspec.Struct, floor: int, *names: str) -> None:
    """Raise ValueError naming the first of ``names`` below ``floor``."""
    for name in names:
        value = getattr(section, name)
        if value < floor:
            bound = "must not be negative" if floor == 0 else f"must be at least {floor}"
            raise ValueError(f"{name} {bound} (got {value})")


def positive(section: msgspec.Struct, *names: str, finite: bool = False) -> None:
    """Raise ValueError naming the first of ``names`` not greater than 0 (or, with
    ``finite``, not a finite number: inf or nan would remove the bound it sets)."""
    for name in names:
        value = getattr(section, name)
        if finite and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number greater than 0 (got {value})")
        if not value > 0:
            raise ValueError(f"{name} must be greater than 0 (got {value})")


__all__ = ["at_least", "positive"]
