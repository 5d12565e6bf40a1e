"""Config sections for the external (network) integrations: ``[reputation]`` and ``[forward]``.

Both integrations are off until a ``url`` is set: a daemon with no config file
never opens a network connection. TLS certificates are verified unless the
operator turns ``verify_tls`` off (or points ``ca_file`` at a private CA, which
is the better fix for a self-signed receiver).

Timeouts come in three kinds because they fail differently: ``connect_timeout``
bounds the TCP + TLS handshake (a dead host), ``read_timeout`` the wait for each
chunk of the answer (a stuck server), ``total_timeout`` one whole request
including retries' individual attempts (a server that trickles bytes forever).
``None`` disables one (Python-side only; TOML has no null), which tests use
under trio's MockClock, where a pending timeout would be jumped to at once.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["ForwardConfig", "HttpTimeouts", "LookupTimeouts", "ReputationConfig"]


class HttpTimeouts(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Per-request timeouts, in seconds (see the module docstring)."""

    connect: float | None = 2.0
    read: float | None = 5.0
    total: float | None = 10.0

    def __post_init__(self) -> None:
        for name in ("connect", "read", "total"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")


class LookupTimeouts(HttpTimeouts, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The reputation lookup's timeouts: short, since a verdict waits on them."""

    connect: float | None = 0.5
    read: float | None = 0.5
    total: float | None = 0.5


class ReputationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[reputation]``: ask an HTTP service what it knows about a file's sha256.

    ``format = "json"`` (the default) speaks a small JSON API: ``POST url`` with
    ``{"sha256": "<hex>"}`` (or ``GET url?sha256=<hex>`` with ``method = "GET"``),
    answered by ``{"verdict": "known_bad" | "known_good" | "unknown", "name": ...}``;
    a 404 means unknown. ``format = "malwarebazaar"`` speaks abuse.ch's API
    (form POST ``query=get_info&hash=<hex>``; ``query_status`` ``ok`` means known
    bad, named by the sample's ``signature``; ``hash_not_found`` means unknown).
    """

    #: Off while empty. ``https://`` in production; ``http://`` is accepted (tests, localhost).
    url: str = ""
    format: Literal["json", "malwarebazaar"] = "json"
    method: Literal["GET", "POST"] = "POST"
    #: Header that carries the API key, e.g. ``Auth-Key`` (MalwareBazaar) or ``Authorization``.
    api_key_header: str = "Auth-Key"
    #: The key itself; empty sends no header. Prefer ``api_key_env`` to keep it out of the file.
    api_key: str = ""
    #: Name of an environment variable holding the key (read at start-up; wins over ``api_key``).
    api_key_env: str = ""
    verify_tls: bool = True
    ca_file: str | None = None
    timeouts: LookupTimeouts = msgspec.field(default_factory=LookupTimeouts)
    #: A lookup never delays a verdict longer than this (seconds), whatever the network does.
    lookup_deadline: float = 0.5
    #: How long a known_bad / known_good answer is trusted (seconds).
    cache_ttl: float = 24 * 3600.0
    #: How long an "unknown" answer is trusted; shorter, since new samples get listed.
    unknown_ttl: float = 3600.0
    #: Bound on cached hashes (memory and the cache file); the oldest go first.
    cache_max_entries: int = 50_000
    #: Largest answer body read (bytes); a bigger one is an invalid response.
    max_response_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("https://", "http://")):
            raise ValueError(
                f"url must start with https:// or http://, got {self.url!r}"
            )
        if not self.lookup_deadline > 0:
            raise ValueError("lookup_deadline must be > 0 seconds")
        if self.cache_ttl < 0 or self.unknown_ttl < 0:
            raise ValueError("cache_ttl and unknown_ttl must be >= 0 seconds")
        if self.cache_max_entries < 1 or self.max_response_bytes < 1024:
            raise ValueError("cache_max_entries must be >= 1 and max_response_bytes >= 1024")

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class ForwardConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """``[forward]``: POST detections, quarantines, policy and degraded-mode changes
    as JSON batches to a SIEM or webhook, through a durable on-disk outbox.

    The outbox is bounded by ``outbox_max_events`` and ``outbox_max_bytes``; when
    full, the oldest event of the lowest priority present (never one of a higher
    priority than the newcomer) is dropped, counted and logged.
    """

    url: str = ""
    api_key_header: str = "Authorization"
    api_key: str = ""
    api_key_env: str = ""
    verify_tls: bool = True
    ca_file: str | None = None
    timeouts: HttpTimeouts = msgspec.field(default_factory=HttpTimeouts)
    #: Events per POST (the receiver gets ``{"events": [...]}``).
    batch_size: int = 100
    #: Upper bound on one batch's encoded size (bytes); a batch stops before it.
    batch_max_bytes: int = 1024 * 1024
    outbox_max_events: int = 100_000
    outbox_max_bytes: int = 64 * 1024 * 1024
    #: Largest single event payload (bytes, JSON-encoded); bigger ones are refused and counted.
    max_event_bytes: int = 256 * 1024
    #: Wait between delivery rounds after a round fails: exponential, jittered, capped.
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    #: Outbox subdirectory name inside the data dir.
    outbox_dir: str = "outbox"

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("https://", "http://")):
            raise ValueError(f"url must start with https:// or http://, got {self.url!r}")
        if self.batch_size < 1 or self.batch_max_bytes < 1024:
            raise ValueError("batch_size must be >= 1 and batch_max_bytes >= 1024")
        if self.outbox_max_events < 1 or self.outbox_max_bytes < 4096:
            raise ValueError("outbox_max_events must be >= 1 and outbox_max_bytes >= 4096")
        if not 0 < self.max_event_bytes <= self.outbox_max_bytes:
            raise ValueError("max_event_bytes must be in (0, outbox_max_bytes]")
        if not 0 < self.backoff_initial <= self.backoff_max:
            raise ValueError("backoff_initial must be in (0, backoff_max]")

    @property
    def enabled(self) -> bool:
        return bool(self.url)
