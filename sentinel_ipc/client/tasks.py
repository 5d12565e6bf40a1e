"""Background tasks of one client (reader, outbox delivery, reconnect keeper).

They run in the nursery of :func:`~sentinel_ipc.client.open_client`, each in
its own cancel scope, so closing the client cancels *them* without cancelling
the nursery's body: the caller's code inside ``async with open_client()``
never sees a stray ``Cancelled``, and its exceptions come out unwrapped.

A background task must not take the caller down: an unexpected exception is
logged, and the task ends.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVarTuple, Unpack

import trio

from ..logs import log_event

Ts = TypeVarTuple("Ts")


class BackgroundTasks:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: set[trio.CancelScope] = set()
        self.closed = False

    def start_soon(self, fn: Callable[[*Ts], Awaitable[object]], *args: *Ts) -> None:
        if self.closed:
            return
        scope = trio.CancelScope()
        self._scopes.add(scope)
        self._nursery.start_soon(self._run, scope, fn, args, name=getattr(fn, "__qualname__", fn))

    async def _run(
        self,
        scope: trio.CancelScope,
        fn: Callable[[Unpack[Ts]], Awaitable[object]],
        args: tuple[*Ts],
    ) -> None:
        try:
            with scope:
                await fn(*args)
        except Exception as exc:
            log_event(
                "client_task_failed",
                logging.ERROR,
                task=getattr(fn, "__qualname__", repr(fn)),
                error=repr(exc),
            )
        finally:
            self._scopes.discard(scope)

    def cancel_all(self) -> None:
        self.closed = True
        for scope in list(self._scopes):
            scope.cancel()


__all__ = ["BackgroundTasks"]
