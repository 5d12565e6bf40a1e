"""The Sentinel client library: async (:func:`open_client`) and blocking
(:class:`SyncClient`), with reconnect, retry, breaker and outbox built in."""

from .config import IPC_BREAKER, ClientConfig, link_failure
from .core import Client, open_client
from .errors import (
    ConnectionLostError,
    DeliveryPendingError,
    OutboxError,
    OutboxFullError,
    error_from_reply,
)
from .events import CLIENT_TOPIC, DEGRADED_TOPIC, Subscription
from .outbox import Outbox, OutboxTicket
from .sync import SyncClient, SyncSubscription

__all__ = [
    "CLIENT_TOPIC",
    "DEGRADED_TOPIC",
    "IPC_BREAKER",
    "Client",
    "ClientConfig",
    "ConnectionLostError",
    "DeliveryPendingError",
    "Outbox",
    "OutboxError",
    "OutboxFullError",
    "OutboxTicket",
    "Subscription",
    "SyncClient",
    "SyncSubscription",
    "error_from_reply",
    "link_failure",
    "open_client",
]
