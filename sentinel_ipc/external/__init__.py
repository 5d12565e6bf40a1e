"""External integrations over the network: reputation lookup and event forwarding.

Both are off by default (no ``url``) and both survive network outages:

* :class:`ReputationClient` (``[reputation]``): ``await client.lookup(sha256)``
  answers within ``lookup_deadline`` from an HTTP service or the on-disk cache,
  or says ``unavailable`` with a reason; never hangs a verdict.
* :class:`EventForwarder` (``[forward]``): ``forwarder.emit(kind, priority,
  payload)`` queues an event in a durable on-disk :class:`Outbox`; a background
  sender POSTs batches in order, at least once, under the external breaker and
  retry policy.

Metrics and the ``external`` health component: :mod:`.metrics`.
"""

from .config import ForwardConfig, HttpTimeouts, ReputationConfig
from .forwarder import EventForwarder, ForwarderStatistics, open_event_forwarder
from .metrics import ExternalHealth, ExternalMetrics, collect, external_health
from .outbox import Outbox, OutboxEvent, OutboxLockedError, OutboxStatistics, Priority
from .reputation import ReputationClient, ReputationResult, open_reputation_client

__all__ = [
    "EventForwarder",
    "ExternalHealth",
    "ExternalMetrics",
    "ForwardConfig",
    "ForwarderStatistics",
    "HttpTimeouts",
    "Outbox",
    "OutboxEvent",
    "OutboxLockedError",
    "OutboxStatistics",
    "Priority",
    "ReputationClient",
    "ReputationConfig",
    "ReputationResult",
    "collect",
    "external_health",
    "open_event_forwarder",
    "open_reputation_client",
]
