"""Errors only the client raises, and the mapping of wire ``error`` replies to
the exception tree of :mod:`sentinel_ipc.errors`.

They live here rather than in ``sentinel_ipc.errors`` because the daemon never
raises them; each still derives from the shared tree, so ``except
SentinelError`` catches everything a client call can raise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import (
    BusyError,
    CircuitOpenError,
    ErrorCode,
    RequestTimeoutError,
    SentinelError,
    TransportError,
    error_class_for_code,
)
from ..messages import Error

if TYPE_CHECKING:
    from .outbox import OutboxTicket


class ConnectionLostError(TransportError):
    """The connection dropped after a non-idempotent request was sent.

    The daemon may or may not have applied it, so the client does not re-send
    it (``retryable`` is false). Policy writes never end here: they go through
    the outbox, whose idempotency key makes a re-send safe.
    """

    default_retryable = False


class OutboxFullError(BusyError):
    """The outbox holds its maximum number of undelivered operations."""


class DeliveryPendingError(RequestTimeoutError):
    """The caller stopped waiting, but the operation stays queued in the outbox
    and will still be delivered; ``ticket`` tracks it."""

    def __init__(self, message: str, ticket: OutboxTicket) -> None:
        super().__init__(message, retryable=False)
        self.ticket = ticket


class OutboxError(SentinelError):
    """The outbox file cannot be used (locked by another client, unwritable)."""

    code = ErrorCode.UNAVAILABLE


def error_from_reply(reply: Error) -> SentinelError:
    """The typed exception for a server ``error`` reply.

    The class comes from :func:`~sentinel_ipc.errors.error_class_for_code`;
    codes without a class of their own keep the wire code on the instance, so
    ``exc.code`` always equals what the daemon sent.
    """
    retry_after = None if reply.retry_after_ms is None else reply.retry_after_ms / 1000.0
    if reply.code == ErrorCode.CIRCUIT_OPEN:
        return CircuitOpenError("daemon", retry_after, reply.message)
    cls = error_class_for_code(reply.code)
    exc = cls(reply.message, retryable=reply.retryable, retry_after=retry_after)
    if cls.code != reply.code:
        # An unknown (newer) code: keep it, so callers can still branch on it.
        exc.code = reply.code  # type: ignore[misc]
    return exc


__all__ = [
    "ConnectionLostError",
    "DeliveryPendingError",
    "OutboxError",
    "OutboxFullError",
    "error_from_reply",
]
