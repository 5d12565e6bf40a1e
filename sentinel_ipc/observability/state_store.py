"""Atomic JSON persistence of the resilience state in the data dir.

What survives a restart (``<data dir>/resilience_state.json``):

* the FallbackManager's snapshot (each service's state, reason, when it
  changed, and whether its degraded-mode notice was acknowledged);
* each breaker's snapshot (its state and the time it still had to stay open).

Why it matters: a daemon restarted during a database outage must come back
*knowing* the database was failing, keep its breaker open for what was left of
the open timeout instead of hammering the dependency at start-up, and not
nag the user again about a notice they already acknowledged.

Writes are atomic (temporary file in the same directory, ``fsync``, ``rename``,
``fsync`` of the directory): a crash leaves the old file or the new one, never a
torn one. A file that cannot be decoded is moved aside (``.corrupt-<time>``) and
the daemon starts from defaults rather than refusing to start.

The wall-clock time of the save (``saved_at``) is kept so the loader can tell
how long the daemon was down: breaker snapshots hold *relative* times, and the
gap is counted against the time they had left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec

from ..fsutil import atomic_write
from ..logs import log_event

__all__ = ["STATE_FILE", "STATE_VERSION", "PersistedState", "StateStore", "atomic_write"]

STATE_FILE = "resilience_state.json"
STATE_VERSION = 1


class PersistedState(msgspec.Struct, kw_only=True):
    """The file's content. Unknown fields are ignored, so a newer daemon's file loads."""

    version: int = STATE_VERSION
    #: Wall-clock time (``time.time()``) of the save.
    saved_at: float = 0.0
    #: ``FallbackManager.snapshot()`` (opaque here).
    fallback: dict[str, Any] | None = None
    #: breaker name -> ``CircuitBreaker.snapshot()``.
    breakers: dict[str, dict[str, Any]] = {}

    def elapsed(self, now_wall: float) -> float:
        """Seconds since the save, never negative (a clock stepped back counts as 0)."""
        return max(0.0, now_wall - self.saved_at) if self.saved_at else 0.0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PersistedState)



class StateStore:
    """Loads and saves :class:`PersistedState` in one file of the data dir.

    Blocking (file I/O): call from a worker thread when on the event loop.
    """

    def __init__(self, data_dir: Path, filename: str = STATE_FILE) -> None:
        self.path = data_dir / filename
        self.saves = 0
        self.save_errors = 0
        self.last_error: str | None = None

    def load(self) -> PersistedState | None:
        """The saved state, or ``None`` when there is none or it is unusable
        (a corrupt file is moved aside and logged, never fatal)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log_event("resilience_state_unreadable", logging.WARNING, path=str(self.path),
                      error=str(exc))
            return None
        try:
            state = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._move_aside(f"undecodable: {exc}")
            return None
        if state.version != STATE_VERSION:
            self._move_aside(f"unsupported version {state.version}")
            return None
        return state

    def save(self, state: PersistedState) -> bool:
        """Write ``state`` atomically; False (logged) if the disk refused it."""
        state.saved_at = time.time()
        try:
            atomic_write(self.path, _encoder.encode(state))
        except OSError as exc:
            self.save_errors += 1
            self.last_error = str(exc)
            log_event("resilience_state_save_failed", logging.WARNING, path=str(self.path),
                      error=str(exc))
            return False
        self.saves += 1
        self.last_error = None
        return True

    def _move_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            os.replace(self.path, aside)
        log_event("resilience_state_discarded", logging.WARNING, path=str(self.path),
                  moved_to=str(aside), reason=why)
