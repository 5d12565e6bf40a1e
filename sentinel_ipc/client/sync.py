"""A blocking client for code that is not async: :class:`SyncClient`.

It runs the async :class:`~sentinel_ipc.client.Client` in a trio loop on a
dedicated daemon thread and hands each call over with
``trio.from_thread.run``. So it has exactly the async client's guarantees
(reconnect, retry, breaker, outbox, per-call timeouts) and is safe to share
between threads: calls from several threads are pipelined on one connection.

Do not call it from inside a trio task (use the async client there); trio
refuses that with ``RuntimeError`` rather than deadlocking.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

import trio

from ..errors import TransportError
from ..messages import (
    Ack,
    Action,
    BreakersReport,
    Event,
    HealthReport,
    MetricsReport,
    PolicyDecision,
    PolicyImportItem,
    PolicyImportResult,
    PolicyListResult,
    PolicyResult,
    QuarantineListResult,
    QuarantineResult,
    ReloadResult,
    Reply,
    ScanResult,
    ThreatsResult,
    Welcome,
)
from ..paging import MAX_POLICY_PAGE, MAX_QUARANTINE_PAGE
from ..resilience import BreakerStatistics
from .config import ClientConfig
from .core import Client, Progress, open_client
from .events import Subscription
from .outbox import OutboxTicket

P = ParamSpec("P")
T = TypeVar("T")


class SyncSubscription:
    """Events of a subscription, for a blocking consumer (a bounded queue:
    when it is full the oldest event is dropped and counted)."""

    def __init__(self, owner: SyncClient, maxsize: int) -> None:
        self._owner = owner
        self._queue: queue.Queue[Event] = queue.Queue(maxsize)
        self._sub: Subscription | None = None
        self.dropped = 0

    def _put(self, event: Event) -> None:  # runs in the trio thread
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def get(self, timeout: float | None = None) -> Event:
        """The next event; ``TimeoutError`` if none arrives within ``timeout``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout:g} s") from None

    def __iter__(self) -> Iterator[Event]:
        while self._sub is not None and not self._sub.closed:
            try:
                yield self._queue.get(timeout=0.25)
            except queue.Empty:
                continue

    def close(self) -> None:
        """Stop delivery and end it on the daemon (``Subscription.aclose``: bounded,
        best effort). Never raises, also once the client is closed."""
        sub = self._sub
        if sub is not None and not sub.closed:
            with contextlib.suppress(TransportError, trio.RunFinishedError):
                self._owner._run(sub.aclose)

    def __enter__(self) -> SyncSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SyncClient:
    """Blocking twin of :class:`~sentinel_ipc.client.Client` (same methods, same errors).

    Use as a context manager, or call :meth:`close`. Constructing it never
    fails because the daemon is down (it connects on the first call); it
    raises ``OutboxError`` if the configured outbox file is unusable.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        config: ClientConfig | None = None,
    ) -> None:
        self.config = config or ClientConfig()
        self._path = socket_path
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: Client | None = None
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(
            target=trio.run, args=(self._serve,), name="sentinel-client", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error

    async def _serve(self) -> None:
        try:
            async with open_client(self._path, config=self.config) as client:
                self._client = client
                self._token = trio.lowlevel.current_trio_token()
                self._stop = trio.Event()
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
                return
            raise

    # --- plumbing -------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._client is None or self._closed:
            raise TransportError("the client is closed", retryable=False)
        return self._client

    def _run(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise TransportError("the client is closed", retryable=False)
        return trio.from_thread.run(partial(fn, *args, **kwargs), trio_token=self._token)

    def _run_sync(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self._closed:
            raise TransportError("the client is closed", retryable=False)
        return trio.from_thread.run_sync(partial(fn, *args, **kwargs), trio_token=self._token)

    def close(self, timeout: float = 10.0) -> None:
        """Close the connection and stop the loop thread (idempotent)."""
        if self._closed:
            return
        stop = self._stop
        if stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._run_sync(stop.set)
        self._closed = True
        self._thread.join(timeout)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- introspection ------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.client.socket_path

    @property
    def welcome(self) -> Welcome | None:
        return self.client.welcome

    @property
    def connects(self) -> int:
        return self.client.connects

    def breaker_statistics(self) -> BreakerStatistics:
        return self._run_sync(self.client.breaker_statistics)

    # --- calls (see Client for what each does and raises) --------------------------

    def request(self, request: object, *, timeout: float | None = None) -> Reply:
        return self._run(self.client.request, request, timeout=timeout)  # type: ignore[arg-type]

    def ping(self, *, timeout: float | None = None) -> float:
        return self._run(self.client.ping, timeout=timeout)

    def connect(self, *, timeout: float | None = None) -> Welcome:
        return self._run(self.client.connect, timeout=timeout)

    def scan(
        self,
        data: bytes,
        *,
        url: str | None = None,
        filename: str | None = None,
        mime_type: str | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        return self._run(
            self.client.scan, data, url=url, filename=filename, mime_type=mime_type,
            timeout=timeout,
        )

    def scan_fd(
        self,
        fd: int,
        *,
        url: str | None = None,
        filename: str | None = None,
        mime_type: str | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        return self._run(
            self.client.scan_fd, fd, url=url, filename=filename, mime_type=mime_type,
            timeout=timeout,
        )

    def scan_file(
        self,
        path: str | os.PathLike[str],
        *,
        method: Literal["auto", "fd", "stream"] = "auto",
        url: str | None = None,
        mime_type: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        return self._run(
            self.client.scan_file, path, method=method, url=url, mime_type=mime_type,
            progress=progress, timeout=timeout,
        )

    def policy_add(
        self,
        action: Action,
        *,
        sha256: str | None = None,
        url_pattern: str | None = None,
        rule_name: str | None = None,
        mime_type: str | None = None,
        reason: str | None = None,
        expires_at: float | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> PolicyResult:
        return self._run(
            self.client.policy_add, action, sha256=sha256, url_pattern=url_pattern,
            rule_name=rule_name, mime_type=mime_type, reason=reason, expires_at=expires_at,
            idempotency_key=idempotency_key, timeout=timeout,
        )

    def queue_policy_add(
        self,
        action: Action,
        *,
        sha256: str | None = None,
        url_pattern: str | None = None,
        rule_name: str | None = None,
        mime_type: str | None = None,
        reason: str | None = None,
        expires_at: float | None = None,
        idempotency_key: str | None = None,
    ) -> OutboxTicket:
        return self._run(
            self.client.queue_policy_add, action, sha256=sha256, url_pattern=url_pattern,
            rule_name=rule_name, mime_type=mime_type, reason=reason, expires_at=expires_at,
            idempotency_key=idempotency_key,
        )

    def policy_import(
        self,
        items: Sequence[PolicyImportItem],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> PolicyImportResult:
        """Add up to 1000 policies as one write (see :meth:`Client.policy_import`)."""
        return self._run(
            self.client.policy_import, items, idempotency_key=idempotency_key, timeout=timeout
        )

    def policy_remove(
        self, policy_id: int, *, idempotency_key: str | None = None, timeout: float | None = None
    ) -> PolicyResult:
        return self._run(
            self.client.policy_remove, policy_id, idempotency_key=idempotency_key,
            timeout=timeout,
        )

    def queue_policy_remove(
        self, policy_id: int, *, idempotency_key: str | None = None
    ) -> OutboxTicket:
        return self._run(
            self.client.queue_policy_remove, policy_id, idempotency_key=idempotency_key
        )

    def submit(self, request: object) -> OutboxTicket:
        return self._run(self.client.submit, request)  # type: ignore[arg-type]

    def wait_delivered(self, ticket: OutboxTicket, *, timeout: float | None = None) -> Reply:
        return self._run(self.client.wait_delivered, ticket, timeout=timeout)

    def flush_outbox(self, *, timeout: float | None = None) -> None:
        self._run(self.client.flush_outbox, timeout=timeout)

    def outbox_pending(self) -> list[OutboxTicket]:
        return self._run_sync(self.client.outbox.pending)

    def policy_list(self, *, timeout: float | None = None) -> PolicyListResult:
        """Every policy, fetched page by page (see :meth:`Client.policy_list`)."""
        return self._run(self.client.policy_list, timeout=timeout)

    def policy_list_page(
        self, *, after_id: int = 0, limit: int = MAX_POLICY_PAGE, timeout: float | None = None
    ) -> PolicyListResult:
        """One page (see :meth:`Client.policy_list_page`)."""
        return self._run(
            self.client.policy_list_page, after_id=after_id, limit=limit, timeout=timeout
        )

    def policy_query(
        self,
        *,
        sha256: str | None = None,
        url: str | None = None,
        rule_names: Sequence[str] = (),
        timeout: float | None = None,
    ) -> PolicyDecision:
        return self._run(
            self.client.policy_query, sha256=sha256, url=url, rule_names=rule_names,
            timeout=timeout,
        )

    def threats(self, *, limit: int = 100, timeout: float | None = None) -> ThreatsResult:
        return self._run(self.client.threats, limit=limit, timeout=timeout)

    def quarantine_list(self, *, timeout: float | None = None) -> QuarantineListResult:
        """Every quarantined item, fetched page by page (see :meth:`Client.quarantine_list`)."""
        return self._run(self.client.quarantine_list, timeout=timeout)

    def quarantine_list_page(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_QUARANTINE_PAGE,
        timeout: float | None = None,
    ) -> QuarantineListResult:
        """One page (see :meth:`Client.quarantine_list_page`)."""
        return self._run(
            self.client.quarantine_list_page, after=after, limit=limit, timeout=timeout
        )

    def quarantine_restore(
        self,
        quarantine_id: str,
        *,
        dest_fd: int | None = None,
        path: str | None = None,
        timeout: float | None = None,
    ) -> QuarantineResult:
        return self._run(
            self.client.quarantine_restore, quarantine_id, dest_fd=dest_fd, path=path,
            timeout=timeout,
        )

    def quarantine_delete(
        self, quarantine_id: str, *, timeout: float | None = None
    ) -> QuarantineResult:
        return self._run(self.client.quarantine_delete, quarantine_id, timeout=timeout)

    def health(
        self, probe: Literal["full", "live", "ready"] = "full", *, timeout: float | None = None
    ) -> HealthReport:
        return self._run(self.client.health, probe, timeout=timeout)

    def live(self, *, timeout: float | None = None) -> HealthReport:
        return self._run(self.client.live, timeout=timeout)

    def ready(self, *, timeout: float | None = None) -> HealthReport:
        return self._run(self.client.ready, timeout=timeout)

    def metrics(
        self,
        format: Literal["prometheus", "openmetrics"] = "prometheus",
        *,
        timeout: float | None = None,
    ) -> MetricsReport:
        return self._run(self.client.metrics, format, timeout=timeout)

    def breakers(self, *, timeout: float | None = None) -> BreakersReport:
        return self._run(self.client.breakers, timeout=timeout)

    def breaker_trip(self, name: str, *, timeout: float | None = None) -> Ack:
        return self._run(self.client.breaker_trip, name, timeout=timeout)

    def breaker_reset(self, name: str, *, timeout: float | None = None) -> Ack:
        return self._run(self.client.breaker_reset, name, timeout=timeout)

    def subscribe(
        self,
        topics: Sequence[str] = ("services", "degraded"),
        *,
        timeout: float | None = None,
    ) -> SyncSubscription:
        """Events into a blocking queue: ``for event in sub`` or ``sub.get(timeout)``."""
        holder = SyncSubscription(self, self.config.event_buffer)
        holder._sub = self._run(
            self.client.subscribe, topics, callback=holder._put, timeout=timeout
        )
        return holder

    def retry_service(self, service: str, *, timeout: float | None = None) -> Ack:
        return self._run(self.client.retry_service, service, timeout=timeout)

    def acknowledge_degraded(self, service: str, *, timeout: float | None = None) -> Ack:
        return self._run(self.client.acknowledge_degraded, service, timeout=timeout)

    def reload(self, *, timeout: float | None = None) -> ReloadResult:
        return self._run(self.client.reload, timeout=timeout)

    def shutdown(self, *, timeout: float | None = None) -> Ack:
        return self._run(self.client.shutdown, timeout=timeout)


__all__ = ["SyncClient", "SyncSubscription"]
