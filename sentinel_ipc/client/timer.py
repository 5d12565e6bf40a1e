"""Per-call deadlines without a cancel scope per call.

A cancel scope per call costs as much as everything else the client does for
a call, so calls register their deadline here instead: one timer task per
client sleeps until the earliest deadline and expires what is due
(:meth:`~sentinel_ipc.client.link.Pending.expire`).

Deadlines are grouped in buckets of ``resolution`` seconds (a deadline fires
at most that late), so registering and unregistering a call is a set
insertion and removal; the heap holds one entry per bucket, and the timer is
woken only when a deadline earlier than the one it sleeps towards arrives,
which with one uniform timeout is only when it was idle.
"""

from __future__ import annotations

import heapq
import math

import trio

from .link import Pending


class Timer:
    def __init__(self, resolution: float = 0.01) -> None:
        self.resolution = resolution
        self._buckets: dict[int, set[Pending]] = {}
        self._heap: list[int] = []
        self._target = math.inf  # bucket key the task sleeps towards
        self._wake = trio.Event()

    def add(self, pending: Pending) -> None:
        deadline = pending.deadline
        if deadline == math.inf:
            return
        key = math.ceil(deadline / self.resolution)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            heapq.heappush(self._heap, key)
            if key < self._target:
                self._wake.set()
        bucket.add(pending)
        pending.timer_key = key

    def remove(self, pending: Pending) -> None:
        bucket = self._buckets.get(pending.timer_key)
        if bucket is not None:
            bucket.discard(pending)

    async def run(self) -> None:
        while True:
            if not self._heap:
                self._target = math.inf
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            key = self._heap[0]
            at = key * self.resolution
            if trio.current_time() < at:
                self._target = key
                with trio.move_on_at(at):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            heapq.heappop(self._heap)
            for pending in self._buckets.pop(key, ()):
                pending.expire()


__all__ = ["Timer"]
