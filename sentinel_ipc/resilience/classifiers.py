"""Which errors to retry and which count against a breaker, per SPEC section 3,
and the ready-made presets built from them (``RETRY_PRESETS``, ``BREAKER_PRESETS``).

This module is allowed to import ``sqlite3`` and ``trio``: it needs their
exception classes for ``isinstance`` checks. The state machines it configures
(breaker, retry, budget) stay pure and never import it.

Every classifier first honours Sentinel's own errors: a ``SentinelError`` is
retried iff its ``retryable`` flag says so, after its ``retry_after`` hint if it
has one (that is how a server's ``retry_after_ms`` reaches the client's retry
loop). Anything not listed is *not* retried: retrying an unknown error hides
bugs and multiplies load.

Breaker failure classifiers answer a different question: does this error say
the dependency is unwell? A constraint violation proves the database works
(ignored); a corrupt database file is not worth retrying but is certainly a
failure.
"""

from __future__ import annotations

import dataclasses
import errno
import sqlite3
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import Any

import trio

from sentinel_ipc.errors import PolicyStoreError, ProtocolError, SentinelError
from sentinel_ipc.resilience.breaker import BreakerConfig
from sentinel_ipc.resilience.retry import (
    NO_RETRY,
    RETRY,
    RetryDecision,
    RetryPolicy,
    retry_after,
)

__all__ = [
    "BREAKER_PRESETS",
    "RETRY_PRESETS",
    "Excluding",
    "database",
    "database_failure",
    "failure_if_retryable",
    "file",
    "ipc",
    "sentinel_error",
    "transient",
    "yara",
]


@dataclasses.dataclass(frozen=True)
class Excluding:
    """A classifier (a retry policy's ``classify`` or a breaker's ``is_failure``)
    with some error types taken out: those answer ``False``, the rest whatever
    ``base`` says.

    Why: overload (``busy``, a full queue) is the system working as designed.
    Counting it against a breaker fails a dependency over because it is busy,
    and retrying it in place lengthens the queue it came from."""

    base: Callable[[BaseException], Any]
    excluded: tuple[type[BaseException], ...]

    def __call__(self, error: BaseException) -> Any:
        if isinstance(error, self.excluded):
            return False
        return self.base(error)


def sentinel_error(error: BaseException) -> RetryDecision | None:
    """The decision a SentinelError carries, or None for any other error."""
    if isinstance(error, SentinelError):
        return retry_after(error.retry_after) if error.retryable else NO_RETRY
    return None


# --- database (sqlite3) ---------------------------------------------------------

# Primary result codes (the low byte of extended codes): sqlite.org/rescode.html
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CANTOPEN, _SQLITE_PROTOCOL = 5, 6, 10, 14, 15
_SQLITE_CORRUPT, _SQLITE_READONLY, _SQLITE_FULL, _SQLITE_NOTADB = 11, 8, 13, 26
_SQLITE_RETRY_CODES = frozenset(
    {_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CANTOPEN, _SQLITE_PROTOCOL}
)
_SQLITE_BROKEN_CODES = _SQLITE_RETRY_CODES | {
    _SQLITE_CORRUPT,
    _SQLITE_READONLY,
    _SQLITE_FULL,
    _SQLITE_NOTADB,
}
# For errors built without a result code (by hand, or by older Pythons).
_SQLITE_RETRY_TEXT = (
    "database is locked",
    "database table is locked",
    "busy",
    "disk i/o error",
    "unable to open",
)
_SQLITE_CALLER_FAULT_TEXT = ("no such table", "no such column", "syntax error")
_SQLITE_CALLER_FAULT = (
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    sqlite3.NotSupportedError,
)


def _sqlite_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def database(error: BaseException) -> RetryDecision:
    """Retry locked / busy / I/O / can't-open; never constraint violations or SQL errors."""
    decision = sentinel_error(error)
    if decision is not None:
        return decision
    if isinstance(error, sqlite3.Error):
        if isinstance(error, _SQLITE_CALLER_FAULT):
            return NO_RETRY
        code = _sqlite_code(error)
        if code is not None:
            return RETRY if code in _SQLITE_RETRY_CODES else NO_RETRY
        text = str(error).lower()
        if any(s in text for s in _SQLITE_CALLER_FAULT_TEXT):
            return NO_RETRY
        return RETRY if any(s in text for s in _SQLITE_RETRY_TEXT) else NO_RETRY
    if isinstance(error, (TimeoutError, trio.TooSlowError)):
        return RETRY
    return NO_RETRY


def database_failure(error: BaseException) -> bool:
    """Breaker: the database is unwell (locked out, unreadable, corrupt, full,
    read-only, gone), not merely asked something wrong."""
    if isinstance(error, PolicyStoreError) or database(error).retry:
        return True  # the store's own errors, retryable or not (corrupt, moved)
    if isinstance(error, sqlite3.Error) and not isinstance(error, _SQLITE_CALLER_FAULT):
        code = _sqlite_code(error)
        if code is not None:
            return code in _SQLITE_BROKEN_CODES
        text = str(error).lower()
        return not any(s in text for s in _SQLITE_CALLER_FAULT_TEXT)
    return False


# --- ipc ----------------------------------------------------------------------

_IPC_RETRY_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EPIPE,
        errno.ENOENT,  # the socket path does not exist (yet): daemon starting
        errno.ETIMEDOUT,
        errno.EAGAIN,  # a Unix socket's listen backlog is full
        errno.ENOTCONN,
    }
)


def ipc(error: BaseException) -> RetryDecision:
    """Retry refused / reset / broken pipe / missing socket / timeouts;
    never protocol errors (the peer is broken, not away)."""
    if isinstance(error, ProtocolError):
        return NO_RETRY
    decision = sentinel_error(error)
    if decision is not None:
        return decision
    if isinstance(error, (TimeoutError, trio.TooSlowError, trio.BrokenResourceError)):
        return RETRY
    if isinstance(error, OSError):
        return RETRY if error.errno in _IPC_RETRY_ERRNOS else NO_RETRY
    return NO_RETRY


def transient(error: BaseException) -> RetryDecision:
    """For network dependencies: SentinelError's flag, connection errors, timeouts."""
    return ipc(error)


# --- file ---------------------------------------------------------------------

_FILE_RETRY_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY, errno.ETXTBSY, errno.EINTR}
)


def file(error: BaseException) -> RetryDecision:
    """Retry EAGAIN / EBUSY; never ENOENT, EACCES, ENOSPC (nor any other errno)."""
    decision = sentinel_error(error)
    if decision is not None:
        return decision
    if isinstance(error, OSError) and error.errno in _FILE_RETRY_ERRNOS:
        return RETRY
    return NO_RETRY


# --- yara (the scan worker pool) ----------------------------------------------

# yara-python's exception classes, matched by name so this module does not
# load the C extension: yara.SyntaxError / WarningError (invalid rules) and
# yara.TimeoutError (the same bytes would time out again) are never retried.
_YARA_NEVER = frozenset({"SyntaxError", "WarningError", "TimeoutError"})


def yara(error: BaseException) -> RetryDecision:
    """Retry worker crashes and memory exhaustion; never invalid rules."""
    decision = sentinel_error(error)
    if decision is not None:
        return decision
    if isinstance(error, MemoryError):
        return RETRY
    if isinstance(
        error,
        (BrokenExecutor, EOFError, BrokenPipeError, ConnectionResetError, trio.BrokenResourceError),
    ):
        return RETRY  # the worker died under us
    if type(error).__module__ == "yara":
        if type(error).__name__ in _YARA_NEVER:
            return NO_RETRY
        return RETRY if "memory" in str(error).lower() else NO_RETRY
    return NO_RETRY


class failure_if_retryable:
    """Breaker classifier: an error is a failure iff ``classifier`` would retry it."""

    __slots__ = ("classifier",)

    def __init__(self, classifier: Callable[[BaseException], RetryDecision]) -> None:
        self.classifier = classifier

    def __call__(self, error: BaseException) -> bool:
        return self.classifier(error).retry

    def __repr__(self) -> str:
        return f"failure_if_retryable({getattr(self.classifier, '__name__', self.classifier)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, failure_if_retryable) and other.classifier == self.classifier

    def __hash__(self) -> int:
        return hash(self.classifier)


# --- presets (SPEC section 3) -------------------------------------------------

# Each preset carries its key as ``name``: the label its retries are counted
# under (``sentinel_retries_total{operation}``), kept by dataclasses.replace.
# "external" (SPEC: future HTTP integrations) has no row in SPEC's retry table;
# its numbers are the ones external/_http.py used before this preset existed.
RETRY_PRESETS: dict[str, RetryPolicy] = {
    "database": RetryPolicy(
        name="database",
        on=database, attempts=3, initial=0.1, max_delay=1.0, multiplier=2.0, timeout=5.0,
    ),
    "ipc": RetryPolicy(
        name="ipc",
        on=ipc, attempts=5, initial=0.05, max_delay=2.0, multiplier=1.5, timeout=10.0,
    ),
    "file": RetryPolicy(
        name="file",
        on=file, attempts=3, initial=0.2, max_delay=5.0, multiplier=2.0, timeout=15.0,
    ),
    "yara": RetryPolicy(
        name="yara",
        on=yara, attempts=2, initial=1.0, max_delay=5.0, multiplier=3.0, timeout=30.0,
    ),
    "external": RetryPolicy(
        name="external",
        on=transient, attempts=3, initial=0.2, max_delay=2.0, multiplier=2.0, jitter=0.25,
        timeout=30.0,
    ),
}

BREAKER_PRESETS: dict[str, BreakerConfig] = {
    "database": BreakerConfig(
        failure_threshold=5,
        open_timeout=30.0,
        success_threshold=2,
        half_open_max_wait=10.0,
        is_failure=database_failure,
    ),
    "yara": BreakerConfig(
        failure_threshold=3,
        open_timeout=60.0,
        success_threshold=3,
        half_open_max_wait=60.0,
        is_failure=failure_if_retryable(yara),
    ),
    "ipc": BreakerConfig(
        failure_threshold=10,
        open_timeout=10.0,
        success_threshold=1,
        half_open_max_wait=10.0,
        is_failure=failure_if_retryable(ipc),
    ),
    "external": BreakerConfig(
        failure_threshold=3,
        open_timeout=60.0,
        success_threshold=2,
        half_open_max_wait=30.0,
        is_failure=failure_if_retryable(transient),
    ),
}
