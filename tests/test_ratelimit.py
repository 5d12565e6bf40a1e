"""RateLimiter: burst, refill, retry hint, per-key isolation, bounded table."""

import pytest

from sentinel_ipc.ratelimit import RateLimiter


def test_burst_then_refused_with_wait_hint() -> None:
    rl = RateLimiter(burst=20, rate=10.0)
    assert all(rl.try_acquire(1, 0.0) is None for _ in range(20))
    wait = rl.try_acquire(1, 0.0)
    assert wait == pytest.approx(0.1)


def test_refills_at_rate_and_caps_at_burst() -> None:
    rl = RateLimiter(burst=5, rate=10.0)
    for _ in range(5):
        rl.try_acquire(1, 0.0)
    assert rl.try_acquire(1, 0.05) is not None  # half a token
    assert rl.try_acquire(1, 0.1) is None  # one token back
    assert rl.tokens(1, 100.0) == 5.0  # never above burst


def test_keys_are_independent() -> None:
    rl = RateLimiter(burst=1, rate=1.0)
    assert rl.try_acquire(1, 0.0) is None
    assert rl.try_acquire(1, 0.0) is not None
    assert rl.try_acquire(2, 0.0) is None


def test_table_is_bounded_and_forgets_full_buckets_first() -> None:
    rl = RateLimiter(burst=2, rate=1.0, max_keys=8)
    rl.try_acquire(999, 0.0)
    rl.try_acquire(999, 0.0)  # drained: must survive eviction while others are full
    for uid in range(100):
        rl.try_acquire(uid, 0.5)
    assert len(rl._buckets) <= 8
    assert rl.try_acquire(999, 0.5) is not None  # still remembered as drained


def test_invalid_parameters_rejected() -> None:
    with pytest.raises(ValueError):
        RateLimiter(burst=0, rate=1.0)
    with pytest.raises(ValueError):
        RateLimiter(burst=1, rate=0.0)
