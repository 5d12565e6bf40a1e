"""The bytes every connection together may hold in partially received large frames.

Why: a frame header is four bytes, and its length is only a claim. Without a
shared bound, a thousand connections that each announce a 64 MiB frame and
send it slowly would make the daemon hold 64 GB before the slowloris timer cut
one of them. Each large frame reserves its length here *before* its body
buffer is allocated (``FrameDecoder(hold_large=True)``), and gives it back
when the frame is complete or its connection ends.

A frame that does not fit waits, first come first served, so a big frame is
never starved by a stream of smaller ones. The wait is not a queue that can
grow: at most one frame per connection waits, the connection's reads stop
while it does (its sender is held back by the socket buffer), and the frame's
own read deadline still runs, so a frame that cannot get memory in time is
answered like any frame not completed in time. Small frames (under the
server's direct threshold) never come here: they cost at most that threshold
per connection.
"""

from __future__ import annotations

from collections import deque

import trio


class ReceiveBudget:
    """A weighted, first-come-first-served semaphore over bytes."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, trio.Event]] = deque()

    @property
    def waiting(self) -> int:
        """Frames waiting for memory now."""
        return len(self._waiters)

    async def take(self, amount: int) -> None:
        """Reserve ``amount`` bytes, waiting behind earlier requests if needed.

        Cancellation (the frame's read deadline) leaves nothing reserved.
        """
        if amount > self.capacity:
            raise ValueError(f"{amount} bytes can never fit a budget of {self.capacity}")
        if not self._waiters and self.used + amount <= self.capacity:
            self.used += amount
            await trio.lowlevel.cancel_shielded_checkpoint()  # keeps what it took
            return
        entry = (amount, trio.Event())
        self._waiters.append(entry)
        try:
            await entry[1].wait()
        except BaseException:
            if entry[1].is_set():
                self.give(amount)  # granted just as we were cancelled
            else:
                self._waiters.remove(entry)
                self._grant()  # the next in line may fit now
            raise

    def give(self, amount: int) -> None:
        """Return bytes taken with :meth:`take`."""
        self.used -= amount
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            amount, event = self._waiters.popleft()
            self.used += amount
            event.set()


__all__ = ["ReceiveBudget"]
