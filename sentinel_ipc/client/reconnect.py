"""Reaching the daemon through restarts: lazy connect, retry, breaker, renewal.

Theory of operation
-------------------
Every call runs as *attempts* under
:func:`~sentinel_ipc.resilience.guarded_call`, the ipc breaker and the ipc
retry policy (SPEC section 3; both from
:class:`~sentinel_ipc.client.config.ClientConfig`), within the call's
deadline. One attempt:

1. takes the current :class:`~sentinel_ipc.client.link.Link`, or connects and
   greets (``hello`` -> ``welcome``) when there is none or it died;
2. gives the request a fresh id, registers it with its deadline, sends it,
   and waits for the reply (see ``link`` for who reads).

What a lost connection means depends on the request and on how far it got:

============================  ===========================================
failure                        outcome of the attempt
============================  ===========================================
connect refused / no socket    ``TransportError``: retried (nothing was sent)
link died before our frame     ``TransportError``: retried
link died after, idempotent    ``TransportError``: retried on a new link
link died after, other         ``ConnectionLostError``: not retried, the
                               outcome is unknown (writes use the outbox)
daemon's ``error`` reply       its typed error; retried iff ``retryable``
no reply before the deadline   ``RequestTimeoutError``: not retried (the
                               time is up), counted by the breaker
============================  ===========================================

Only link failures count against the breaker (see
:func:`~sentinel_ipc.client.config.link_failure`). While it is open, calls
fail at once with ``CircuitOpenError`` and its ``retry_after``; after the open
timeout one trial call reconnects and, if it succeeds, closes it.

The fast path costs no cancel scope: the first attempt runs under
``guarded_call`` with the breaker only, its deadline kept by the
:class:`~sentinel_ipc.client.timer.Timer`. Only when it fails with a retryable
error does the call continue under a cancel scope at its deadline, with the
policy's next state (``increment``) handed to ``guarded_call``, so the
attempts, backoff and give-up rules are the policy's own and no backoff
sleep outlives the call.

Subscriptions belong to the connector: every new link re-subscribes them, and
while any exist a keeper task reconnects (under the same policy and breaker)
even when nobody is calling, and an idle reader reads events between calls.
Closing one drops it from the renewals and sends ``unsubscribe`` for the
``subscribe`` id the current link acknowledged: one attempt on that link
only, bounded by :data:`UNSUBSCRIBE_TIMEOUT`, no retry, no reconnect (a lost
link took the daemon's side of it along) and errors logged at debug level,
never raised. One closed while its (re)subscribe is still in flight is
unsubscribed as soon as the ``subscribed`` reply arrives.

Concurrent callers share one connect attempt: callers queued behind a connect
that failed get its error at once instead of each waiting their own timeout.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TypeVar, TypeVarTuple, Unpack

import msgspec
import trio

from ..errors import (
    CircuitOpenError,
    RequestTimeoutError,
    RetryGaveUpError,
    SentinelError,
    TransportError,
    UnsupportedVersionError,
)
from ..logs import log_event
from ..messages import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Reply,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Welcome,
    type_tag,
)
from ..resilience import RETRY_COUNTERS, CircuitBreaker, RetryOutcome, guarded_call
from ..transport import connect_unix
from .config import ClientConfig
from .errors import ConnectionLostError, error_from_reply
from .events import EventCallback, Subscription, local_event
from .link import Link, Pending
from .tasks import BackgroundTasks
from .timer import Timer

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_OPERATION = "ipc"
#: The slow path's cancel scope ends this long after the call's deadline, so
#: that the timer (which counts the timeout against the breaker) fires first.
_SCOPE_GRACE = 0.05
_RNG = random.Random()
#: Longest wait for the daemon's ``ack`` to an ``unsubscribe`` (capped by
#: ``ClientConfig.timeout``): closing a subscription must stay quick even
#: when the daemon is stuck; the daemon's side ends with the link anyway.
UNSUBSCRIBE_TIMEOUT = 1.0


class Connector:
    """Owns the link to one daemon socket; runs calls under retry + breaker."""

    def __init__(self, socket_path: Path, config: ClientConfig, tasks: BackgroundTasks) -> None:
        self.socket_path = socket_path
        self.config = config
        self.breaker = CircuitBreaker(
            f"ipc:{socket_path}", config.breaker, clock=trio.current_time
        )
        self.retry = config.retry
        self._tasks = tasks
        self._timer = Timer()
        self._timer_running = False
        self._ids = itertools.count(1)
        self._link: Link | None = None
        self._generation = 0
        self._connect_lock = trio.Lock()
        self._connect_failures = 0
        self._last_connect_error: SentinelError | None = None
        self._subs: list[Subscription] = []
        self._keeper: trio.CancelScope | None = None
        self._closing = False
        #: Successful (re)connects so far; tests and the CLI read it.
        self.connects = 0

    # --- state ------------------------------------------------------------------

    @property
    def link(self) -> Link | None:
        """The current link, if one is up."""
        link = self._link
        return link if link is not None and not link.closed else None

    @property
    def welcome(self) -> Welcome | None:
        link = self._link
        return None if link is None else link.welcome

    def next_id(self) -> int:
        return next(self._ids)

    # --- single-frame calls (the fast path) -------------------------------------------

    async def call(
        self,
        request: msgspec.Struct,
        *,
        idempotent: bool,
        timeout: float,
        fds: Sequence[int] = (),
    ) -> Reply:
        """Send ``request`` (its ``id`` is assigned per attempt) and return the reply.

        Raises the daemon's typed error when it is not retryable,
        ``CircuitOpenError``, ``RetryExhaustedError`` (chained from the last
        failure), ``RequestTimeoutError`` or ``ConnectionLostError``.
        """
        if self._closing:
            raise TransportError("the client is closed", retryable=False)
        if not self._timer_running:
            self._timer_running = True
            self._tasks.start_soon(self._timer.run)
        started = trio.current_time()
        deadline = started + timeout
        try:
            reply = await guarded_call(
                self.attempt, request, idempotent, fds, deadline, timeout,
                breaker=self.breaker, operation=_OPERATION,
            )
        except CircuitOpenError as exc:
            if exc.breaker == self.breaker.name:
                raise  # our breaker refused: fail fast, no retry
            first: Exception = exc
        except Exception as exc:
            first = exc
        else:
            RETRY_COUNTERS.count_outcome(_OPERATION, RetryOutcome.SUCCESS_NO_RETRY)
            return reply
        return await self._retry_after(
            first, started, deadline, timeout, type_tag(type(request)),
            self.attempt, request, idempotent, fds, deadline, timeout,
        )

    async def _retry_after(
        self,
        first: Exception,
        started: float,
        deadline: float,
        timeout: float,
        what: str,
        attempt: Callable[[Unpack[Ts]], Awaitable[T]],
        *args: *Ts,
    ) -> T:
        """The rest of a call whose first attempt failed: the policy decides."""
        try:
            policy = self.retry.increment(
                first, now=trio.current_time(), rng=_RNG, started_at=started,
                deadline=deadline, operation=_OPERATION,
            )
        except BaseException as final:
            outcome = (
                RetryOutcome.BUDGET_EXHAUSTED
                if isinstance(final, RetryGaveUpError) and final.reason == "budget"
                else RetryOutcome.FAILED_NO_RETRY
            )
            RETRY_COUNTERS.count_outcome(_OPERATION, outcome)
            raise
        # guarded_call counts the retry when it starts (the policy has a history).
        with trio.CancelScope(deadline=deadline + _SCOPE_GRACE):
            await trio.sleep(policy.next_delay)
            return await guarded_call(
                attempt, *args, breaker=self.breaker, retry=policy, operation=_OPERATION
            )
        raise RequestTimeoutError(
            f"{what}: no reply from the daemon within {timeout:g} s", retryable=False
        )

    async def attempt(
        self,
        request: msgspec.Struct,
        idempotent: bool,
        fds: Sequence[int],
        deadline: float,
        timeout: float,
    ) -> Reply:
        """One try of one request on the current (or a new) link.

        (No clock read here: the policy starts no retry that would reach the
        deadline, and the timer expires an attempt that outlives it.)
        """
        link = self._link
        if link is None or link.closed:
            try:
                link = await self.connect(deadline)
            except TransportError as exc:
                if trio.current_time() < deadline:
                    raise
                raise RequestTimeoutError(
                    f"{type_tag(type(request))}: no reply from the daemon within {timeout:g} s "
                    f"({exc.message})",
                    retryable=False,
                ) from exc
        if link.in_flight >= link.max_in_flight:
            with trio.move_on_at(deadline):
                await link.wait_for_slot()
            if link.in_flight >= link.max_in_flight:
                raise RequestTimeoutError(
                    f"{type_tag(type(request))}: {link.max_in_flight} requests in flight "
                    f"for {timeout:g} s",
                    retryable=False,
                )
        request_id = next(self._ids)
        request.id = request_id  # type: ignore[attr-defined]
        link.in_flight += 1
        pending: Pending | None = None
        try:
            pending = link.register(request_id, deadline)
            self._timer.add(pending)
            if not idempotent and link.peer_closed():
                link.fail(TransportError("the daemon closed the connection"))
                raise link.lost()
            await link.send(link.encode(request), fds, pending)
            pending.sent = True
            return await link.wait(pending)
        except RequestTimeoutError as exc:
            if exc.retryable:
                raise  # the daemon's own timeout error
            raise RequestTimeoutError(
                f"{type_tag(type(request))}: no reply from the daemon within {timeout:g} s",
                retryable=False,
            ) from None
        except TransportError as exc:
            outcome = self.outcome_of_loss(exc, request, pending, idempotent)
            if outcome is exc:
                raise
            raise outcome from exc
        finally:
            if pending is not None:
                self._timer.remove(pending)
            link.unregister(request_id)
            link.release_slot()

    def outcome_of_loss(
        self,
        error: TransportError,
        request: msgspec.Struct,
        pending: Pending | None,
        idempotent: bool,
    ) -> SentinelError:
        """The error an attempt raises when its link died (table in the module doc)."""
        if idempotent or pending is None or not pending.sent or pending.reply is not None:
            return error
        lost = ConnectionLostError(
            f"the connection was lost after {type_tag(type(request))} was sent; "
            f"whether the daemon applied it is unknown ({error.message})"
        )
        lost.__cause__ = error
        return lost

    # --- multi-frame attempts (streams, subscribe, connect) ------------------------------

    async def run(
        self,
        attempt: Callable[[Unpack[Ts]], Awaitable[T]],
        *args: *Ts,
        timeout: float,
        what: str,
    ) -> T:
        """``attempt(*args)`` under the retry policy and the breaker, within ``timeout``
        (a cancel scope: for the calls that are not one frame and one reply)."""
        if self._closing:
            raise TransportError("the client is closed", retryable=False)
        with trio.CancelScope(deadline=trio.current_time() + timeout):
            return await guarded_call(
                attempt, *args, breaker=self.breaker, retry=self.retry, operation=_OPERATION
            )
        error = RequestTimeoutError(f"{what}: no reply from the daemon within {timeout:g} s")
        self._count_failure(error)
        raise error

    def _count_failure(self, error: SentinelError) -> None:
        """A scoped call timed out: count it against the breaker. guarded_call
        only saw a cancellation, which says nothing about the dependency."""
        now = trio.current_time()
        try:
            permit = self.breaker.acquire(now)
        except CircuitOpenError:
            return
        self.breaker.record_error(permit, error, now)

    # --- connecting ------------------------------------------------------------------

    async def connect(self, deadline: float = float("inf")) -> Link:
        """The current link, or a new one (connect + hello). Raises ``TransportError``
        (retryable) or the daemon's typed refusal (e.g. ``UnsupportedVersionError``)."""
        failures_seen = self._connect_failures
        async with self._connect_lock:
            link = self._link
            if link is not None and not link.closed:
                return link
            last = self._last_connect_error
            if self._connect_failures != failures_seen and isinstance(last, TransportError):
                # Someone tried while we queued and failed: share the verdict
                # rather than queueing one connect timeout after another.
                raise TransportError(last.message) from last
            if self._closing:
                raise TransportError("the client is closed", retryable=False)
            limit = min(deadline, trio.current_time() + self.config.connect_timeout)
            try:
                with trio.move_on_at(limit) as scope:
                    link = await self._open_link()
                if scope.cancelled_caught or link is None:
                    raise TransportError(f"no welcome from {self.socket_path} in time")
            except SentinelError as exc:
                self._connect_failures += 1
                self._last_connect_error = exc
                raise
            self._last_connect_error = None
            self._link = link
            self.connects += 1
            self._tasks.start_soon(self._watch, link)
            if self._subs:
                self._tasks.start_soon(self._renew, link)
            return link

    async def _open_link(self) -> Link:
        sock = await connect_unix(self.socket_path)
        self._generation += 1
        link = Link(sock, self._generation)
        try:
            hello_id = next(self._ids)
            reply = await link.handshake(
                Hello(
                    id=hello_id,
                    client=self.config.client_name,
                    protocol_version=PROTOCOL_VERSION,
                    capabilities=list(self.config.capabilities),
                )
            )
            if type(reply) is Error:
                raise error_from_reply(reply)
            if type(reply) is not Welcome or reply.id != hello_id:
                raise TransportError(
                    f"expected a welcome for hello, got {type_tag(type(reply))} "
                    f"(id {reply.id})"
                )
            if reply.protocol_version != PROTOCOL_VERSION:
                raise UnsupportedVersionError(
                    f"the daemon speaks protocol {reply.protocol_version}, "
                    f"this client {PROTOCOL_VERSION}"
                )
        except BaseException:
            link.fail(TransportError("handshake failed"))
            raise
        link.adopt(reply)
        return link

    async def _watch(self, link: Link) -> None:
        """Log the link's end and tell the subscriptions."""
        await link.closed_event.wait()
        cause = link.cause
        log_event(
            "client_link_lost",
            logging.INFO,
            socket=str(self.socket_path),
            generation=link.generation,
            cause=None if cause is None else cause.message,
        )
        if self._closing:
            return
        event = local_event(
            "connection_lost",
            f"lost the connection to sentineld ({cause.message if cause else 'closed'}); "
            "reconnecting",
            trio.current_time(),
        )
        for sub in list(self._subs):
            if sub.generation == link.generation:
                sub.generation = -1
                sub.deliver(event)

    # --- subscriptions -----------------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str],
        *,
        callback: EventCallback | None,
        timeout: float,
    ) -> Subscription:
        """Subscribe (renewed on every reconnect until closed)."""
        sub = Subscription(
            tuple(topics),
            buffer=self.config.event_buffer,
            callback=callback,
            on_close=self._forget,
            on_aclose=self._release,
        )
        try:
            await self.run(self._subscribe_attempt, sub, timeout=timeout, what="subscribe")
        except BaseException:
            sub.closed = True
            raise
        # Only now does it join the renewals (and no checkpoint since its
        # subscribe succeeded, so no reconnect can have been missed).
        self._subs.append(sub)
        if self._keeper is None:
            self._keeper = trio.CancelScope()
            self._tasks.start_soon(self._keep_connected, self._keeper)
        return sub

    async def _subscribe_attempt(self, sub: Subscription) -> None:
        link = self._link
        if link is None or link.closed:
            link = await self.connect()  # renews the existing subscriptions
        await self._subscribe_on(link, sub)

    async def _subscribe_on(self, link: Link, sub: Subscription, renewal: bool = False) -> None:
        if sub.closed or sub.generation == link.generation:
            return
        sub.generation = link.generation
        sub.remote_id = None  # an id of an older link means nothing on this one
        request_id = next(self._ids)
        link.event_routes[request_id] = sub.deliver
        try:
            await self._exchange(
                link, request_id, Subscribe(id=request_id, topics=list(sub.topics)),
                on_reply=partial(self._announce_renewal, sub) if renewal else None,
            )
        except BaseException:
            link.event_routes.pop(request_id, None)
            if sub.generation == link.generation:
                sub.generation = -1
            raise
        if sub.closed:
            # Closed while this subscribe was in flight: its close found no
            # acknowledged id to unsubscribe, so the daemon's side ends here.
            link.event_routes.pop(request_id, None)
            await self._unsubscribe_on(link, request_id)
        elif sub.generation == link.generation:
            sub.remote_id = request_id

    @staticmethod
    def _announce_renewal(sub: Subscription, reply: Reply) -> None:
        if type(reply) is Subscribed:
            sub.deliver(
                local_event("resubscribed", "reconnected to sentineld", trio.current_time())
            )

    async def _renew(self, link: Link) -> None:
        """Re-subscribe everything on a new link; failures wait for the next link."""
        renewed = 0
        for sub in list(self._subs):
            try:
                with trio.fail_after(self.config.timeout):
                    await self._subscribe_on(link, sub, renewal=True)
            except (SentinelError, trio.TooSlowError) as exc:
                log_event("client_resubscribe_failed", logging.WARNING, error=str(exc))
                if link.closed:
                    return
                continue
            renewed += 1
        if renewed:
            log_event("client_resubscribed", logging.INFO, subscriptions=renewed)

    async def _keep_connected(self, scope: trio.CancelScope) -> None:
        """While subscriptions exist: read events between calls, and reconnect
        after a loss even if nobody calls."""
        with scope:
            while self._subs and not self._closing:
                link = self._link
                if link is not None and not link.closed:
                    await link.read_while_idle()
                    continue
                try:
                    await self.run(self.connect, timeout=self.config.timeout, what="reconnect")
                except CircuitOpenError as exc:
                    await trio.sleep(
                        exc.retry_after if exc.retry_after else self.config.breaker.open_timeout
                    )
                except SentinelError:
                    await trio.sleep(self.retry.max_delay)

    def _forget(self, sub: Subscription) -> None:
        """``Subscription.close()``: forget it now, unsubscribe in the background."""
        target = self._detach(sub)
        if target is not None:
            self._tasks.start_soon(self._unsubscribe_on, *target)

    async def _release(self, sub: Subscription) -> None:
        """``Subscription.aclose()``: forget it now, and wait for the unsubscribe."""
        target = self._detach(sub)
        if target is None:
            await trio.lowlevel.checkpoint()
        else:
            await self._unsubscribe_on(*target)

    def _detach(self, sub: Subscription) -> tuple[Link, int] | None:
        """Drop a closed ``sub`` from the renewals and the event routes; return
        the live link and the id to unsubscribe there, if its daemon side is up."""
        if sub in self._subs:
            self._subs.remove(sub)
        link = self._link
        if link is not None:
            for rid, sink in list(link.event_routes.items()):
                if sink == sub.deliver:
                    del link.event_routes[rid]
        if not self._subs and self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        remote, sub.remote_id = sub.remote_id, None
        if (
            remote is None
            or self._closing  # the link is about to close, which ends them all
            or link is None
            or link.closed
            or link.generation != sub.generation
        ):
            return None
        return link, remote

    @staticmethod
    async def _exchange(
        link: Link, request_id: int, message: msgspec.Struct,
        on_reply: Callable[[Reply], None] | None = None,
    ) -> None:
        """Send ``message`` on ``link`` itself (not through :meth:`run`: no retry,
        no reconnect) in one of its in-flight slots, and wait for the reply."""
        await link.wait_for_slot()
        link.in_flight += 1
        try:
            pending = link.register(request_id)
            if on_reply is not None:
                pending.on_reply = on_reply
            await link.send(link.encode(message), (), pending)
            pending.sent = True
            await link.wait(pending)
        finally:
            link.unregister(request_id)
            link.release_slot()

    async def _unsubscribe_on(self, link: Link, subscription: int) -> None:
        """Send ``unsubscribe {subscription}`` on ``link`` and wait for the ack.

        Best effort, never raises (but for cancellation): one attempt,
        bounded by :data:`UNSUBSCRIBE_TIMEOUT`; ``not_found`` (already gone),
        ``unknown_type`` (a daemon from before ``unsubscribe``), a lost link
        or no answer in time are logged at debug level and dropped.
        """
        request_id = next(self._ids)
        limit = min(UNSUBSCRIBE_TIMEOUT, self.config.timeout)
        error: str | None = None
        with trio.move_on_after(limit) as scope:
            try:
                await self._exchange(
                    link, request_id, Unsubscribe(id=request_id, subscription=subscription)
                )
            except SentinelError as exc:
                error = f"{exc.code}: {exc.message}"
        if scope.cancelled_caught:
            error = f"no ack within {limit:g} s"
        if error is not None:
            log_event(
                "client_unsubscribe_failed", logging.DEBUG, subscription=subscription,
                generation=link.generation, error=error,
            )

    # --- closing -----------------------------------------------------------------

    def close(self) -> None:
        """Fail every call in flight and stop reconnecting."""
        self._closing = True
        for sub in list(self._subs):
            sub.close()
        link = self._link
        if link is not None:
            link.fail(TransportError("the client is closed", retryable=False))


__all__ = ["Connector"]
