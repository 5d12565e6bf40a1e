"""Sentinel: a resilient local download-scanning daemon and its client library."""

__version__ = "0.1.0"

# The client library is the public API; everything else is private to its
# module. The names load on first use (PEP 562), so that importing any
# submodule (the daemon, a scan worker process) does not pay for trio and the
# client.
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import (
        Client,
        ClientConfig,
        ConnectionLostError,
        DeliveryPendingError,
        OutboxError,
        OutboxFullError,
        OutboxTicket,
        Subscription,
        SyncClient,
        SyncSubscription,
        open_client,
    )
    from .errors import (
        CircuitOpenError,
        RequestTimeoutError,
        RetryExhaustedError,
        SentinelError,
        TransportError,
    )

_ERRORS = frozenset(
    {"CircuitOpenError", "RequestTimeoutError", "RetryExhaustedError", "SentinelError",
     "TransportError"}
)


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        from . import errors

        return getattr(errors, name)
    if name in __all__:
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'sentinel_ipc' has no attribute {name!r}")


__all__ = [
    "CircuitOpenError",
    "Client",
    "ClientConfig",
    "ConnectionLostError",
    "DeliveryPendingError",
    "OutboxError",
    "OutboxFullError",
    "OutboxTicket",
    "RequestTimeoutError",
    "RetryExhaustedError",
    "SentinelError",
    "Subscription",
    "SyncClient",
    "SyncSubscription",
    "TransportError",
    "__version__",
    "open_client",
]
