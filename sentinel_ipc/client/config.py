"""Client settings: timeouts, the retry policy and breaker (SPEC section 3
presets), the outbox. One frozen value, so a config can be shared."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RequestTimeoutError, TransportError
from ..resilience import BREAKER_PRESETS, RETRY_PRESETS, BreakerConfig, RetryPolicy


def link_failure(error: BaseException) -> bool:
    """Breaker classifier: only a broken or silent *link* counts against the ipc
    breaker (refused, reset, EOF, no reply in time).

    The preset would also count the daemon's own retryable errors (``busy``,
    ``unavailable`` while its database is down); those prove the link works, and
    opening the client's breaker on them would turn a database outage into a
    scanning outage, the cascade the SPEC forbids.
    """
    return isinstance(error, (TransportError, RequestTimeoutError))


#: The SPEC's ipc breaker (10 failures, 10 s open, 1 success) counting link failures.
IPC_BREAKER: BreakerConfig = dataclasses.replace(BREAKER_PRESETS["ipc"], is_failure=link_failure)


def _default_capabilities() -> tuple[str, ...]:
    return ("pipelining", "scan_stream", "scan_fd", "subscribe", "idempotency_keys")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """How a :class:`~sentinel_ipc.client.Client` behaves.

    timeout: default seconds per call (retries included); every method also
        takes ``timeout=``.
    scan_timeout: default for scans, which wait for YARA.
    connect_timeout: seconds for connect + hello on one attempt.
    retry: the policy for connection loss (SPEC: ipc, 5 attempts, 50 ms, 2 s, x1.5).
    breaker: the breaker per target (SPEC: ipc); tests shorten ``open_timeout``.
    outbox_path: persist undelivered writes there (append + fsync), so a
        restarted client still delivers them; None keeps them in memory.
    outbox_max_items: bound of the outbox; a full outbox refuses new writes.
    chunk_size: bytes per ``scan_chunk`` (capped by the daemon's frame limit).
    memfd_min_bytes: ``scan()`` hands data of at least this size to the daemon
        in a memfd (``scan_fd``) instead of in frames; None: never. Up to
        32 KiB both ways cost the same; the memfd saves 3-9 % of the CPU per
        call at 48-64 KiB, about 10 % at 128 KiB and 20 % at 256 KiB
        (``tools/bench_client.py --scan-sizes``: client, daemon and workers;
        2-core machine).
    memfd_pool_bytes: idle memfds ``scan()`` keeps for reuse, in bytes (at
        most 4 of them, of at most 8 MiB each); they hold the last bytes
        scanned until reused or the client closes. 0: keep none, a new memfd
        per scan (slower: page allocation and zeroing each time).
    event_buffer: events buffered per subscription before the oldest are dropped.
    """

    client_name: str = "sentinel-python"
    timeout: float = 10.0
    scan_timeout: float = 120.0
    connect_timeout: float = 2.0
    retry: RetryPolicy = RETRY_PRESETS["ipc"]
    breaker: BreakerConfig = IPC_BREAKER
    outbox_path: Path | None = None
    outbox_max_items: int = 1000
    chunk_size: int = 1024 * 1024
    memfd_min_bytes: int | None = 64 * 1024
    memfd_pool_bytes: int = 32 * 1024 * 1024
    event_buffer: int = 256
    capabilities: tuple[str, ...] = field(default_factory=_default_capabilities)

    def __post_init__(self) -> None:
        if self.outbox_path is not None and not isinstance(self.outbox_path, Path):
            object.__setattr__(self, "outbox_path", Path(self.outbox_path))
        for name in ("timeout", "scan_timeout", "connect_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"ClientConfig.{name} must be > 0, got {value!r}")
        if self.outbox_max_items < 1:
            raise ValueError("ClientConfig.outbox_max_items must be >= 1")
        if self.chunk_size < 1024:
            raise ValueError("ClientConfig.chunk_size must be >= 1024")
        if self.memfd_min_bytes is not None and self.memfd_min_bytes < 0:
            raise ValueError("ClientConfig.memfd_min_bytes must be >= 0 or None")
        if self.memfd_pool_bytes < 0:
            raise ValueError("ClientConfig.memfd_pool_bytes must be >= 0")
        if self.event_buffer < 1:
            raise ValueError("ClientConfig.event_buffer must be >= 1")


__all__ = ["IPC_BREAKER", "ClientConfig", "link_failure"]
