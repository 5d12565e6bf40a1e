"""The wire schema: every message Sentinel sends or receives, as msgspec Structs.

The types *are* the schema. ``protocol/schema.json`` is generated from them
(``python -m sentinel_ipc.schema``) and a test fails when it is stale.

Every message is a MessagePack map with a string ``type`` tag and an integer
``id``. Requests (client -> server) form the :data:`Request` union, replies and
pushed events (server -> client) the :data:`Reply` union. New fields always get
defaults so that older peers keep working (msgspec's schema-evolution rules);
unknown fields are ignored.

Shared record types (``RuleMatch``, ``PolicyRecord``, ``ThreatRecord`` ...) live
here too, so the scanner, the policy store and the wire agree on one shape.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024

Action = Literal["allow", "warn", "quarantine", "block"]
ACTIONS: tuple[Action, ...] = ("allow", "warn", "quarantine", "block")
#: Strictness order used when several policies apply: the strictest wins.
ACTION_SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "quarantine": 2, "block": 3}

HealthStatus = Literal["healthy", "degraded", "unhealthy"]
ServiceState = Literal["healthy", "degraded", "failed", "critical"]


class _Msg(msgspec.Struct, tag_field="type", omit_defaults=False, kw_only=True):
    """Base of every wire message: a ``type`` tag and the request ``id``."""

    id: int


# ---------------------------------------------------------------------------
# Shared records
# ---------------------------------------------------------------------------


class RuleMatch(msgspec.Struct, kw_only=True):
    """One YARA rule that matched: the rule, its namespace (rule file), tags, meta."""

    rule: str
    namespace: str = "default"
    tags: list[str] = []
    meta: dict[str, Any] = {}


class PolicyRecord(msgspec.Struct, kw_only=True):
    """A row of the ``policies`` table."""

    id: int
    action: Action
    rule_name: str | None = None
    url_pattern: str | None = None
    file_hash: str | None = None
    mime_type: str | None = None
    created_at: float = 0.0
    created_by: str = ""
    expires_at: float | None = None
    hit_count: int = 0
    last_hit: float | None = None
    reason: str | None = None


class ThreatRecord(msgspec.Struct, kw_only=True):
    """A row of ``threat_history``: one detection or non-allow verdict."""

    id: int
    detected_at: float
    url: str | None = None
    filename: str | None = None
    file_hash: str = ""
    mime_type: str | None = None
    file_size: int = 0
    rule_names: list[str] = []
    severity: str | None = None
    action_taken: Action = "allow"
    policy_id: int | None = None


class QuarantineItem(msgspec.Struct, kw_only=True):
    quarantine_id: str
    sha256: str
    size: int
    url: str | None = None
    filename: str | None = None
    rules: list[str] = []
    quarantined_at: float = 0.0


class ComponentHealth(msgspec.Struct, kw_only=True):
    status: HealthStatus
    message: str = ""
    response_ms: float = 0.0
    value: float | None = None


class BreakerInfo(msgspec.Struct, kw_only=True):
    name: str
    state: str
    consecutive_failures: int = 0
    failures_total: int = 0
    successes_total: int = 0
    rejected_total: int = 0
    opened_at: float | None = None
    retry_after_s: float | None = None
    availability: float = 1.0
    #: Unix time (seconds) the breaker entered its current state (a breaker that
    #: has not changed state since the daemon started: the start). Daemons before
    #: this field omit it: None.
    state_since: float | None = None


class Limits(msgspec.Struct, kw_only=True):
    """Server bounds announced in ``welcome`` so clients can stay under them."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_in_flight_per_connection: int = 64
    max_stream_bytes: int = 512 * 1024 * 1024


# ---------------------------------------------------------------------------
# Requests (client -> server)
# ---------------------------------------------------------------------------


class Hello(_Msg, tag="hello"):
    client: str
    protocol_version: int
    capabilities: list[str] = []


class Ping(_Msg, tag="ping"):
    pass


class Scan(_Msg, tag="scan"):
    """Scan the bytes carried in this frame."""

    data: bytes
    url: str | None = None
    filename: str | None = None
    mime_type: str | None = None


class ScanBegin(_Msg, tag="scan_begin"):
    """Open a chunked scan stream; chunks and the end reuse this ``id``."""

    url: str | None = None
    filename: str | None = None
    mime_type: str | None = None
    size: int | None = None


class ScanChunk(_Msg, tag="scan_chunk"):
    data: bytes


class ScanEnd(_Msg, tag="scan_end"):
    pass


class ScanFd(_Msg, tag="scan_fd"):
    """Scan through a descriptor passed in the same sendmsg() as SCM_RIGHTS."""

    url: str | None = None
    filename: str | None = None
    mime_type: str | None = None
    size: int | None = None


class PolicyAdd(_Msg, tag="policy_add"):
    action: Action
    sha256: str | None = None
    url_pattern: str | None = None
    rule_name: str | None = None
    mime_type: str | None = None
    reason: str | None = None
    expires_at: float | None = None
    #: Makes the write idempotent across client retries and outbox replays.
    idempotency_key: str | None = None


#: Most items one ``policy_import`` may carry (more: ``invalid_message``).
MAX_POLICY_IMPORT = 1000


class PolicyImportItem(msgspec.Struct, kw_only=True):
    """One policy of a ``policy_import``: the fields of ``policy_add``, same checks."""

    action: Action
    sha256: str | None = None
    url_pattern: str | None = None
    rule_name: str | None = None
    mime_type: str | None = None
    reason: str | None = None
    expires_at: float | None = None


class PolicyImport(_Msg, tag="policy_import"):
    """Add up to :data:`MAX_POLICY_IMPORT` policies in one write (a blocklist
    import): one transaction, one snapshot save. A policy that already exists
    is counted in ``existing`` and skipped, so an import is re-runnable."""

    policies: list[PolicyImportItem]
    #: Makes the whole batch idempotent across client retries and outbox replays.
    idempotency_key: str | None = None


class PolicyRemove(_Msg, tag="policy_remove"):
    policy_id: int
    idempotency_key: str | None = None


class PolicyList(_Msg, tag="policy_list"):
    """List the policies: one page with ``limit`` (see Paging), or all at once.

    With ``limit``: the policies with ``id > after_id`` in id order, at most
    ``limit`` and no more than fit in one frame; continue from the reply's
    ``next_after_id``. Without: every policy in one reply, or
    ``reply_too_large`` when that would pass ``max_frame_bytes``."""

    after_id: int = 0
    limit: int | None = None


class PolicyQuery(_Msg, tag="policy_query"):
    sha256: str | None = None
    url: str | None = None
    rule_names: list[str] = []


class Threats(_Msg, tag="threats"):
    limit: int = 100


class QuarantineList(_Msg, tag="quarantine_list"):
    """List the quarantined files: one page with ``limit`` (see Paging), or all at once.

    With ``limit``: the items whose ``quarantine_id`` sorts after ``after`` (nil:
    from the start), in ascending ``quarantine_id`` order, at most ``limit`` and
    no more than fit in one frame; continue from the reply's ``next_after``.
    The id is the keyset because it is unique, never changes and never comes
    back (a random 32-hex-digit uuid4), so the order is total and stable: an
    item added or deleted between two pages does not shift any other item, as
    an offset would, nor does a wall clock stepping back, as ``quarantined_at``
    would. Without ``limit``: every item in one reply, oldest first, or
    ``reply_too_large`` when that would pass ``max_frame_bytes``."""

    after: str | None = None
    limit: int | None = None


class QuarantineRestore(_Msg, tag="quarantine_restore"):
    """Restore into ``dest_fd`` (passed with SCM_RIGHTS) or, for the daemon's own
    user only, into ``path``."""

    quarantine_id: str
    path: str | None = None


class QuarantineDelete(_Msg, tag="quarantine_delete"):
    quarantine_id: str


class Health(_Msg, tag="health"):
    probe: Literal["full", "live", "ready"] = "full"


class Metrics(_Msg, tag="metrics"):
    format: Literal["prometheus", "openmetrics"] = "prometheus"


class Breakers(_Msg, tag="breakers"):
    pass


class BreakerControl(_Msg, tag="breaker_control"):
    name: str
    action: Literal["trip", "reset"]


class Subscribe(_Msg, tag="subscribe"):
    topics: list[str] = msgspec.field(default_factory=lambda: ["services", "degraded"])


class Unsubscribe(_Msg, tag="unsubscribe"):
    """End a subscription made on this connection: no `event` with its id follows the `ack`."""

    subscription: int


class ServiceRetry(_Msg, tag="service_retry"):
    """The notice's *Retry Connection* button: probe now, half-open the breaker."""

    service: str


class DegradedAck(_Msg, tag="degraded_ack"):
    """The notice's *Continue with Cache* button: no repeat until the state changes."""

    service: str


class Reload(_Msg, tag="reload"):
    pass


class Shutdown(_Msg, tag="shutdown"):
    pass


Request = (
    Hello
    | Ping
    | Scan
    | ScanBegin
    | ScanChunk
    | ScanEnd
    | ScanFd
    | PolicyAdd
    | PolicyImport
    | PolicyRemove
    | PolicyList
    | PolicyQuery
    | Threats
    | QuarantineList
    | QuarantineRestore
    | QuarantineDelete
    | Health
    | Metrics
    | Breakers
    | BreakerControl
    | Subscribe
    | Unsubscribe
    | ServiceRetry
    | DegradedAck
    | Reload
    | Shutdown
)

#: Requests only the daemon's own uid (or configured admin uids) may send:
#: the ones that change what the daemon does, and the ones that read what other
#: users scanned (the threat history and the quarantine hold their filenames
#: and URLs). ``degraded_ack`` silences a notice for every subscriber.
ADMIN_REQUESTS: frozenset[type[Any]] = frozenset(
    {
        PolicyAdd,
        PolicyImport,
        PolicyRemove,
        Threats,
        QuarantineList,
        QuarantineRestore,
        QuarantineDelete,
        BreakerControl,
        ServiceRetry,
        DegradedAck,
        Reload,
        Shutdown,
    }
)

#: Requests a client may safely re-send after a reconnect.
IDEMPOTENT_REQUESTS: frozenset[type[Any]] = frozenset(
    {
        Hello,
        Ping,
        Scan,
        ScanFd,
        PolicyList,
        PolicyQuery,
        Threats,
        QuarantineList,
        Health,
        Metrics,
        Breakers,
        Subscribe,
        Unsubscribe,
        DegradedAck,
    }
)


# ---------------------------------------------------------------------------
# Replies and events (server -> client)
# ---------------------------------------------------------------------------


class Welcome(_Msg, tag="welcome"):
    server: str
    protocol_version: int
    max_frame_bytes: int
    limits: Limits = msgspec.field(default_factory=Limits)


class Pong(_Msg, tag="pong"):
    pass


class Error(_Msg, tag="error"):
    """A typed failure. ``id`` is the request's, or 0 when the frame was undecodable."""

    code: str
    message: str
    retryable: bool = False
    retry_after_ms: int | None = None


class ScanResult(_Msg, tag="scan_result"):
    action: Action
    sha256: str
    size: int
    matches: list[RuleMatch] = []
    rules_version: str = ""
    degraded: bool = False
    warnings: list[str] = []
    scan_ms: float = 0.0
    policy_id: int | None = None
    reason: str | None = None
    #: Why the verdict was degraded (service names), empty when it was not.
    degraded_reasons: list[str] = []
    #: The reputation service's verdict on the sha256 ("known_bad", "known_good",
    #: "unknown", "unavailable"); None when no reputation service is configured.
    reputation: str | None = None


class PolicyResult(_Msg, tag="policy_result"):
    policy_id: int | None = None
    #: True when the write was journaled during a database outage (applied later).
    queued: bool = False


class PolicyImportResult(_Msg, tag="policy_import_result"):
    added: int = 0
    #: Policies of the request that already existed (skipped; not an error).
    existing: int = 0
    #: The ids of the added policies, in item order (empty when ``queued``).
    policy_ids: list[int] = []
    #: True when the batch was journaled during a database outage (applied later).
    queued: bool = False


class PolicyListResult(_Msg, tag="policy_list_result"):
    policies: list[PolicyRecord] = []
    degraded: bool = False
    #: A paged request with more policies after this page: the ``after_id`` to
    #: ask for next (the last id here). None: the list is complete.
    next_after_id: int | None = None


class PolicyDecision(_Msg, tag="policy_decision"):
    action: Action
    policy_id: int | None = None
    reason: str | None = None
    degraded: bool = False
    #: Why the decision came from the cached snapshot (the database outage), if it did.
    degraded_reason: str | None = None


class ThreatsResult(_Msg, tag="threats_result"):
    threats: list[ThreatRecord] = []


class QuarantineListResult(_Msg, tag="quarantine_list_result"):
    items: list[QuarantineItem] = []
    next_after: str | None = None


class QuarantineResult(_Msg, tag="quarantine_result"):
    quarantine_id: str
    done: bool = True


class HealthReport(_Msg, tag="health_report"):
    status: HealthStatus
    alive: bool
    ready: bool
    reason: str | None = None
    uptime_seconds: float = 0.0
    timestamp: float = 0.0
    rules_version: str = ""
    components: dict[str, ComponentHealth] = {}


class MetricsReport(_Msg, tag="metrics_report"):
    content_type: str
    text: str


class BreakersReport(_Msg, tag="breakers_report"):
    breakers: list[BreakerInfo] = []


class Subscribed(_Msg, tag="subscribed"):
    topics: list[str] = []


class Ack(_Msg, tag="ack"):
    """Generic success for control requests (breaker_control, service_retry, ...)."""

    detail: str = ""


class ReloadResult(_Msg, tag="reload_result"):
    rules_version: str
    rule_count: int = 0
    namespaces: int = 0


class Event(_Msg, tag="event"):
    """Pushed to subscribers; ``id`` is the subscribe request's id."""

    topic: str
    kind: str
    service: str | None = None
    state: str | None = None
    previous: str | None = None
    reason: str | None = None
    at: float = 0.0
    message: str | None = None
    actions: list[str] = []
    dropped: int = 0


Reply = (
    Welcome
    | Pong
    | Error
    | ScanResult
    | PolicyResult
    | PolicyImportResult
    | PolicyListResult
    | PolicyDecision
    | ThreatsResult
    | QuarantineListResult
    | QuarantineResult
    | HealthReport
    | MetricsReport
    | BreakersReport
    | Subscribed
    | Ack
    | ReloadResult
    | Event
)

REQUEST_TYPES: tuple[type[Any], ...] = Request.__args__
REPLY_TYPES: tuple[type[Any], ...] = Reply.__args__


def type_tag(cls: type[Any]) -> str:
    """The wire ``type`` tag of a message class (cached: msgspec's inspection is slow)."""
    tag = _TAG_CACHE.get(cls)
    if tag is None:
        info = msgspec.inspect.type_info(cls)
        tag = getattr(info, "tag", None)
        if not isinstance(tag, str):
            raise TypeError(f"{cls!r} is not a tagged message type")
        _TAG_CACHE[cls] = tag
    return tag


_TAG_CACHE: dict[type[Any], str] = {}

REQUEST_TAGS: frozenset[str] = frozenset(type_tag(t) for t in REQUEST_TYPES)
REPLY_TAGS: frozenset[str] = frozenset(type_tag(t) for t in REPLY_TYPES)
