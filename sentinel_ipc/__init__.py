"""Sentinel: a resilient local download-scanning daemon and its client library."""

__version__ = "0.1.0"

# The client library is the public API; everything else is private to its module.
from .client import (  # after __version__: handlers import it
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
