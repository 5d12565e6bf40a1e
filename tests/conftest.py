"""Shared fixtures: the real-daemon harness and a seed-printing random source."""

from __future__ import annotations

import os
import random

import pytest
from daemon_harness import DaemonProcess, daemon_factory  # noqa: F401  (fixture)

__all__ = ["DaemonProcess"]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random.Random whose seed is printed, so a failure can be replayed
    with SENTINEL_TEST_SEED=<seed>."""
    seed = int(os.environ.get("SENTINEL_TEST_SEED", random.randrange(2**32)))
    print(f"\n[rng] {request.node.nodeid} seed={seed}")
    return random.Random(seed)
