"""The ``[resilience]`` section of the config file.

One place for every knob of the resilience layer: feature flags, the breaker
and retry thresholds (SPEC section 3 defaults), the health-check timeouts and
limits (SPEC section 4), the fail mode of the scanner and the event buffers.

The breaker and retry tables are *overrides* of the resilience core's presets
(``BREAKER_PRESETS`` / ``RETRY_PRESETS``), which keep the failure classifiers;
:meth:`ResilienceConfig.breaker_config` and :meth:`ResilienceConfig.retry_policy`
merge the two, so every subsystem builds its breaker from the same numbers::

    [resilience]
    check_interval = 10.0
    scanner_fail_mode = "closed"

    [resilience.breakers.database]
    failure_threshold = 3
    open_timeout = 15.0
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING, Literal

import msgspec

if TYPE_CHECKING:
    from sentinel_ipc.resilience.breaker import BreakerConfig
    from sentinel_ipc.resilience.retry import RetryPolicy

__all__ = [
    "BreakerSettings",
    "HealthSettings",
    "HttpCheckSettings",
    "ResilienceConfig",
    "RetrySettings",
    "parse_listen_address",
]

GIB = 1024**3


class BreakerSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One breaker: open after ``failure_threshold`` consecutive failures, stay open
    ``open_timeout`` seconds, close after ``success_threshold`` trial successes."""

    failure_threshold: int
    open_timeout: float
    success_threshold: int


class RetrySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """One retry schedule:
    delay = min(initial * multiplier^(n-1), max_delay) * (1 + U(0, jitter))."""

    attempts: int
    initial: float
    max_delay: float
    multiplier: float
    jitter: float = 0.1


def _default_breakers() -> dict[str, BreakerSettings]:
    return {
        "database": BreakerSettings(failure_threshold=5, open_timeout=30.0, success_threshold=2),
        "yara": BreakerSettings(failure_threshold=3, open_timeout=60.0, success_threshold=3),
        "ipc": BreakerSettings(failure_threshold=10, open_timeout=10.0, success_threshold=1),
        "external": BreakerSettings(failure_threshold=3, open_timeout=60.0, success_threshold=2),
    }


def _default_retries() -> dict[str, RetrySettings]:
    return {
        "database": RetrySettings(attempts=3, initial=0.1, max_delay=1.0, multiplier=2.0),
        "ipc": RetrySettings(attempts=5, initial=0.05, max_delay=2.0, multiplier=1.5),
        "file": RetrySettings(attempts=3, initial=0.2, max_delay=5.0, multiplier=2.0),
        "yara": RetrySettings(attempts=2, initial=1.0, max_delay=5.0, multiplier=3.0),
    }


class HttpCheckSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """An optional health check of a network dependency: ``GET url`` must answer 2xx/3xx
    within ``timeout`` seconds. The component is named ``name`` (default ``http:<host>``)."""

    url: str
    name: str | None = None
    timeout: float = 2.0


class HealthSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Health-check timeouts (seconds) and limits (SPEC section 4)."""

    database_timeout: float = 1.0
    yara_timeout: float = 2.0
    ipc_timeout: float = 0.5
    disk_timeout: float = 1.0
    memory_timeout: float = 1.0
    #: ipc is degraded at or above this many active connections.
    max_connections: int = 1000
    #: disk is unhealthy when the data dir or the temp dir has less free space.
    min_free_bytes: int = GIB
    #: memory is degraded when the daemon process itself uses more (RSS, bytes; its
    #: workers are held to [scanner] max_worker_rss_bytes each).
    max_rss_bytes: int = 2 * GIB
    #: Extra directories whose free space counts (the temp dir and data dir always do).
    extra_disk_paths: list[str] = []
    #: Network dependencies to check (``[[resilience.health.http]]`` tables) ...
    http: list[HttpCheckSettings] = []
    #: ... or, in short, plain URLs checked with ``http_timeout``.
    http_urls: list[str] = []
    http_timeout: float = 2.0

    def http_checks(self) -> list[HttpCheckSettings]:
        return [*self.http, *(HttpCheckSettings(url=u, timeout=self.http_timeout)
                              for u in self.http_urls)]


class ResilienceConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Everything the resilience layer does, and the switches to turn parts of it off."""

    #: False: every breaker is disabled (calls always pass, nothing trips).
    breakers_enabled: bool = True
    #: False: every operation makes one attempt (subsystems read :meth:`retry_policy`).
    retries_enabled: bool = True
    #: False: no periodic or on-demand checks; health reports live figures only.
    health_checks_enabled: bool = True
    #: False: no fallbacks and no degraded-mode notices; failures surface as errors.
    degradation_enabled: bool = True
    #: What a scan gets when the scanner cannot run: "open" = allow with a warning,
    #: "closed" = block.
    scanner_fail_mode: Literal["open", "closed"] = "open"
    #: Seconds between two periodic runs of the health checks.
    check_interval: float = 30.0
    #: While a check fails, it is re-run this often (capped by check_interval), so a
    #: recovered dependency is noticed within one probe.
    failing_check_interval: float = 5.0
    #: Seconds between reminders of an unacknowledged degraded-mode notice (0: never).
    notice_repeat_interval: float = 300.0
    #: Events buffered per subscriber before it gets one ``events_dropped`` event.
    subscriber_buffer: int = 256
    #: Subscribers allowed at once (each holds a bounded buffer).
    max_subscribers: int = 256
    breakers: dict[str, BreakerSettings] = msgspec.field(default_factory=_default_breakers)
    retries: dict[str, RetrySettings] = msgspec.field(default_factory=_default_retries)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)

    def __post_init__(self) -> None:
        # A partial [resilience.breakers] table overrides only what it names.
        merged_b = _default_breakers()
        merged_b.update(self.breakers)
        self.breakers = merged_b
        merged_r = _default_retries()
        merged_r.update(self.retries)
        self.retries = merged_r
        if not self.check_interval > 0:
            raise ValueError(f"check_interval must be > 0, got {self.check_interval!r}")
        if not self.failing_check_interval > 0:
            raise ValueError(
                f"failing_check_interval must be > 0, got {self.failing_check_interval!r}"
            )
        if self.subscriber_buffer < 1:
            raise ValueError(f"subscriber_buffer must be >= 1, got {self.subscriber_buffer!r}")
        for name, b in self.breakers.items():
            if b.failure_threshold < 1 or b.success_threshold < 1 or not b.open_timeout > 0:
                raise ValueError(
                    f"breakers.{name}: thresholds must be >= 1 and open_timeout > 0"
                )
        for name, r in self.retries.items():
            if r.attempts < 1 or r.initial < 0 or r.max_delay < 0 or r.multiplier < 1:
                raise ValueError(
                    f"retries.{name}: attempts >= 1, initial/max_delay >= 0, multiplier >= 1"
                )

    def breaker_config(self, name: str) -> BreakerConfig:
        """The core's preset for ``name`` (its classifier) with this file's numbers.

        Unknown names start from the ``external`` preset. Raises nothing else.
        """
        from sentinel_ipc.resilience.breaker import BreakerConfig
        from sentinel_ipc.resilience.classifiers import BREAKER_PRESETS

        base = BREAKER_PRESETS.get(name) or BREAKER_PRESETS.get("external") or BreakerConfig()
        settings = self.breakers.get(name)
        if settings is None:
            return base
        return dataclasses.replace(
            base,
            failure_threshold=settings.failure_threshold,
            open_timeout=settings.open_timeout,
            success_threshold=settings.success_threshold,
            max_open_timeout=max(base.max_open_timeout, settings.open_timeout),
        )

    def retry_policy(self, name: str) -> RetryPolicy | None:
        """The core's retry preset for ``name`` with this file's numbers; with retries
        disabled, the same policy limited to one attempt. ``None`` for an unknown name."""
        from sentinel_ipc.resilience.classifiers import RETRY_PRESETS

        base = RETRY_PRESETS.get(name)
        if base is None:
            return None
        settings = self.retries.get(name)
        policy = base
        if settings is not None:
            policy = dataclasses.replace(
                base,
                attempts=settings.attempts,
                initial=settings.initial,
                max_delay=settings.max_delay,
                multiplier=settings.multiplier,
                jitter=settings.jitter,
            )
        if not self.retries_enabled:
            policy = dataclasses.replace(policy, attempts=1)
        return policy

    @property
    def scanner_fail_open(self) -> bool:
        return self.scanner_fail_mode == "open"


def parse_listen_address(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port). Raises ``ValueError``
    naming the problem (port 0 asks the kernel for a free port)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"http_listen must be HOST:PORT, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"http_listen: {host!r} is not an IP address") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"http_listen: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"http_listen: port {port} is out of range")
    return host, port
