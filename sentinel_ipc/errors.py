"""One error tree for all of Sentinel.

Every error Sentinel raises derives from :class:`SentinelError`. Each carries a
wire ``code`` (the ``code`` field of an ``error`` reply), whether a retry can
help, and an optional retry hint, so the server can turn any of them into a
typed reply without a lookup table, and the client can turn a reply back into
the same class (see :func:`error_class_for_code`).

Local vs. remote (as in h11): ``ProtocolError`` means *the peer* sent something
illegal; ``LocalProtocolError`` means *we* were asked to send something illegal.
"""

from __future__ import annotations

from typing import ClassVar


class ErrorCode:
    """Wire error codes. Strings, so new codes never break old peers."""

    BAD_FRAME = "bad_frame"  # body undecodable: reply id 0, then close
    FRAME_TOO_LARGE = "frame_too_large"  # length header over the limit: reply, close
    INVALID_MESSAGE = "invalid_message"  # decodable but wrong shape / field type
    UNKNOWN_TYPE = "unknown_type"
    UNSUPPORTED_VERSION = "unsupported_version"
    BUSY = "busy"  # over a bound; retryable
    RATE_LIMITED = "rate_limited"  # per-peer rate limit; retryable
    TIMEOUT = "timeout"
    FORBIDDEN = "forbidden"  # admin operation from a non-admin peer
    NOT_FOUND = "not_found"
    TOO_LARGE = "too_large"  # scan stream over its maximum size
    BAD_FD = "bad_fd"  # scan_fd without a usable descriptor
    CIRCUIT_OPEN = "circuit_open"
    RETRY_EXHAUSTED = "retry_exhausted"
    UNAVAILABLE = "unavailable"  # a dependency is down and has no fallback
    POLICY_INVALID = "policy_invalid"
    POLICY_CONFLICT = "policy_conflict"
    SCAN_FAILED = "scan_failed"
    QUARANTINE_FAILED = "quarantine_failed"  # store/restore/delete refused
    RULES_INVALID = "rules_invalid"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    REPLY_TOO_LARGE = "reply_too_large"  # the answer would pass max_frame_bytes: page it


class SentinelError(Exception):
    """Root of every Sentinel error.

    ``retryable`` says whether the same request may succeed later;
    ``retry_after`` (seconds) is a hint for when.
    """

    code: ClassVar[str] = ErrorCode.INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after = retry_after

    @property
    def retry_after_ms(self) -> int | None:
        return None if self.retry_after is None else max(0, round(self.retry_after * 1000))


# --- protocol -------------------------------------------------------------


class ProtocolError(SentinelError):
    """The peer broke the protocol (remote error)."""

    code = ErrorCode.INVALID_MESSAGE


class FrameTooLargeError(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class BadFrameError(ProtocolError):
    code = ErrorCode.BAD_FRAME


class UnknownMessageTypeError(ProtocolError):
    code = ErrorCode.UNKNOWN_TYPE


class InvalidMessageError(ProtocolError):
    code = ErrorCode.INVALID_MESSAGE


class UnsupportedVersionError(ProtocolError):
    code = ErrorCode.UNSUPPORTED_VERSION


class LocalProtocolError(SentinelError):
    """We were asked to send something the protocol forbids (local error)."""

    code = ErrorCode.INTERNAL


# --- transport / limits ----------------------------------------------------


class TransportError(SentinelError):
    """The connection failed: refused, reset, closed mid-frame."""

    code = ErrorCode.UNAVAILABLE
    default_retryable = True


class BusyError(SentinelError):
    code = ErrorCode.BUSY
    default_retryable = True


class RateLimitedError(SentinelError):
    code = ErrorCode.RATE_LIMITED
    default_retryable = True


class RequestTimeoutError(SentinelError):
    code = ErrorCode.TIMEOUT
    default_retryable = True


class ForbiddenError(SentinelError):
    code = ErrorCode.FORBIDDEN


class NotFoundError(SentinelError):
    code = ErrorCode.NOT_FOUND


class ShuttingDownError(SentinelError):
    code = ErrorCode.SHUTTING_DOWN
    default_retryable = True


# --- resilience -----------------------------------------------------------


class CircuitOpenError(SentinelError):
    """A breaker refused the call. ``retry_after`` says when it may admit one."""

    code = ErrorCode.CIRCUIT_OPEN
    default_retryable = True

    def __init__(self, breaker: str, retry_after: float | None, message: str | None = None):
        super().__init__(
            message or f"circuit breaker {breaker!r} is open",
            retryable=True,
            retry_after=retry_after,
        )
        self.breaker = breaker


class RetryExhaustedError(SentinelError):
    """Every permitted attempt failed; chained (``__cause__``) from the last error."""

    code = ErrorCode.RETRY_EXHAUSTED
    default_retryable = True


class UnavailableError(SentinelError):
    code = ErrorCode.UNAVAILABLE
    default_retryable = True


# --- domain ---------------------------------------------------------------


class PolicyStoreError(SentinelError):
    code = ErrorCode.UNAVAILABLE
    default_retryable = True


class PolicyValidationError(SentinelError):
    code = ErrorCode.POLICY_INVALID


class PolicyConflictError(SentinelError):
    code = ErrorCode.POLICY_CONFLICT


class ScanError(SentinelError):
    code = ErrorCode.SCAN_FAILED
    default_retryable = True


class ScanTooLargeError(ScanError):
    code = ErrorCode.TOO_LARGE
    default_retryable = False


class BadFileDescriptorError(ScanError):
    code = ErrorCode.BAD_FD
    default_retryable = False


class RulesError(SentinelError):
    """Rules failed to load or compile; the message names file, line and cause."""

    code = ErrorCode.RULES_INVALID


class ConfigError(SentinelError):
    """A config file is unreadable or invalid; the message names the key."""

    code = ErrorCode.INVALID_MESSAGE


_BY_CODE: dict[str, type[SentinelError]] = {}
for _cls in (
    ProtocolError,
    FrameTooLargeError,
    BadFrameError,
    UnknownMessageTypeError,
    InvalidMessageError,
    UnsupportedVersionError,
    BusyError,
    RateLimitedError,
    RequestTimeoutError,
    ForbiddenError,
    NotFoundError,
    ShuttingDownError,
    RetryExhaustedError,
    UnavailableError,
    PolicyValidationError,
    PolicyConflictError,
    ScanError,
    ScanTooLargeError,
    BadFileDescriptorError,
    RulesError,
):
    _BY_CODE.setdefault(_cls.code, _cls)


def error_class_for_code(code: str) -> type[SentinelError]:
    """The exception class a client raises for a wire error ``code``."""
    return _BY_CODE.get(code, SentinelError)


# --- resilience drivers (appended by the resilience core) -------------------


class RetryGaveUpError(RetryExhaustedError):
    """What the retry drivers raise when they stop retrying a retryable error.

    Chained (``__cause__``) from the last error. ``reason`` says why they
    stopped: "attempts" (all used), "timeout" (the policy's total-time cap),
    "deadline" (the next wait would outlast the caller's cancel scope),
    "budget" (the dependency's retry budget is spent) or "retry_after" (the
    error's hint is longer than the policy's max delay; ``retry_after`` holds
    it). ``history`` holds one ``RetryAttempt`` per failed attempt, oldest first.
    """

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        reason: str,
        attempts: int,
        history: tuple[object, ...],
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retryable=True, retry_after=retry_after)
        self.operation = operation
        self.reason = reason
        self.attempts = attempts
        self.history = history


# --- policy store faults (appended by the PolicyGraph) ----------------------


class DatabaseLockedError(PolicyStoreError):
    """The policy database is locked or busy (another writer); a retry may help."""


class DatabaseIOError(PolicyStoreError):
    """The policy database cannot be opened, read or written (I/O error, permission,
    read-only file system); a retry may help once the cause is fixed."""


class DatabaseCorruptError(PolicyStoreError):
    """The policy database failed ``quick_check`` or is not a database at all; it is
    moved aside and rebuilt from the snapshot and the journal. Retrying the same
    file cannot help."""

    default_retryable = False


class DatabaseMovedError(PolicyStoreError):
    """The path no longer names the open database file (deleted or replaced under
    it): writes would go to a file nobody will ever open again."""

    default_retryable = False


class JournalFullError(PolicyStoreError):
    """The outage journal reached its size bound; the write was not accepted."""

    code = ErrorCode.BUSY


# --- scanning faults (appended by the scanning engine) -----------------------


class WorkerCrashedError(ScanError):
    """A scan worker process died (kill -9, segfault) or ran out of memory during a
    scan. The worker is replaced; the same scan may succeed on another worker, so
    the yara retry policy retries it and the yara breaker counts it."""

    default_retryable = True


class ScanTimeoutError(ScanError):
    """A scan ran past its timeout (YARA's own, or the hard deadline after which the
    worker is killed). Retrying the same bytes would time out again."""

    code = ErrorCode.TIMEOUT
    default_retryable = False


# --- external integrations (appended by sentinel_ipc.external) ---------------


class ExternalServiceError(UnavailableError):
    """An external HTTP integration (reputation lookup, event forwarding) failed.

    Raised at the boundary from httpx's exceptions and from HTTP status codes, so
    the retry classifiers and the "external" breaker see Sentinel's own flags:
    connection errors, timeouts, 5xx, 408 and 429 are ``retryable`` (429/503
    carry the server's ``Retry-After`` in ``retry_after``); other 4xx are not
    (the request itself is wrong, or the credentials). ``target`` names the
    integration ("reputation", "forward"), ``status`` the HTTP status if any, and
    ``outcome`` the bounded metric label (``timeout``, ``connect_error``,
    ``protocol_error``, ``http_5xx``, ``http_4xx``, ``invalid_response``).
    """

    def __init__(
        self,
        message: str,
        *,
        target: str,
        outcome: str,
        status: int | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, retryable=retryable, retry_after=retry_after)
        self.target = target
        self.outcome = outcome
        self.status = status


# --- reply bounds (appended with policy_list paging) -------------------------


class ReplyTooLargeError(SentinelError):
    """The answer to a request would be a frame over ``max_frame_bytes``, which
    the client must refuse (and with it the connection). The daemon sends this
    instead, and the connection stays usable.

    Not retryable: the same request gets the same answer. The message names the
    reply's size, the limit and the way out: page the request (``policy_list``
    with ``limit`` and ``after_id``) or raise ``[server] max_frame_bytes``.
    Why not ``too_large``: that code means a scan over its size bound, and
    clients map it to a scan error.
    """

    code = ErrorCode.REPLY_TOO_LARGE


_BY_CODE.setdefault(ReplyTooLargeError.code, ReplyTooLargeError)


# --- overload is not failure (appended with the store's overload classification) --


class StoreOverloadedError(BusyError):
    """The policy database's calls are queued longer than a call may wait, while
    the database answers the calls ahead: the database is busy, not broken.

    Not a database failure (the breaker does not count it and the service does
    not go degraded for it), and not retried in place (more calls would only
    lengthen the queue): the one call falls back as in an outage (a decision
    from the cached policies, a write to the journal), or a client gets
    ``busy``, retryable.
    """
