"""Per-peer rate limiting: a token bucket per key (the peer's uid). Pure: time is passed in.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per
second. Taking a token from an empty bucket fails and says how long until one
is available, which becomes the ``retry_after_ms`` of a ``rate_limited`` error.

The table of buckets is bounded: the fullest buckets (idle peers) are the
ones forgotten first, so a flood of distinct uids cannot grow memory, and
forgetting a full bucket changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by peer; ``try_acquire`` returns ``None`` or seconds to wait."""

    def __init__(self, burst: int, rate: float, max_keys: int = 4096) -> None:
        if burst < 1 or rate <= 0:
            raise ValueError("burst must be >= 1 and rate > 0")
        self.burst = float(burst)
        self.rate = float(rate)
        self.max_keys = max_keys
        self._buckets: dict[int, _Bucket] = {}

    def try_acquire(self, key: int, now: float, cost: float = 1.0) -> float | None:
        """Take ``cost`` tokens for ``key``; ``None`` on success, else the wait in seconds."""
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        else:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
            bucket.updated = now
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return None
        return (cost - bucket.tokens) / self.rate

    def tokens(self, key: int, now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            return self.burst
        return min(self.burst, bucket.tokens + max(0.0, now - bucket.updated) * self.rate)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        # Forget the fullest buckets: forgetting a full one changes nothing, and
        # a nearly full one costs its peer at most a few extra tokens.
        by_fullness = sorted(self._buckets, key=lambda k: self.tokens(k, now), reverse=True)
        full = [k for k in by_fullness if self.tokens(k, now) >= self.burst]
        for key in full or by_fullness[: max(1, self.max_keys // 8)]:
            del self._buckets[key]
