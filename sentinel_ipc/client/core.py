"""The async client: ``async with open_client(path) as client: await client.scan(data)``.

One :class:`Client` keeps one connection (opened lazily, on the first call)
and runs every call through the :class:`~sentinel_ipc.client.reconnect.Connector`:
pipelined on one socket with replies matched by id, retried across daemon
restarts under the SPEC's ipc retry policy, fenced by the ipc breaker, and
bounded by a per-call timeout. Policy writes go through the
:class:`~sentinel_ipc.client.outbox.Outbox`, so none is lost while the daemon
is away.

Every method raises a :class:`~sentinel_ipc.errors.SentinelError`:

* the daemon's ``error`` reply as its typed class (``exc.code``,
  ``exc.message``, ``exc.retryable``, ``exc.retry_after``);
* ``CircuitOpenError`` at once while the breaker is open (``retry_after``);
* ``RetryExhaustedError`` when every attempt failed (``__cause__`` is the last);
* ``RequestTimeoutError`` when the call's ``timeout`` ran out;
* ``ConnectionLostError`` when a non-idempotent request was sent and the
  connection dropped before its reply (its outcome is unknown);
* ``UnknownMessageTypeError`` when this daemon does not serve the request.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Literal, TypeVar

import msgspec
import trio

from ..config import default_socket_path
from ..errors import (
    BadFileDescriptorError,
    LocalProtocolError,
    ProtocolError,
    SentinelError,
    UnknownMessageTypeError,
)
from ..memfd import MemfdPool
from ..messages import (
    IDEMPOTENT_REQUESTS,
    Ack,
    Action,
    BreakerControl,
    Breakers,
    BreakersReport,
    DegradedAck,
    Health,
    HealthReport,
    Metrics,
    MetricsReport,
    Ping,
    PolicyAdd,
    PolicyDecision,
    PolicyImport,
    PolicyImportItem,
    PolicyImportResult,
    PolicyList,
    PolicyListResult,
    PolicyQuery,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
    Pong,
    QuarantineDelete,
    QuarantineItem,
    QuarantineList,
    QuarantineListResult,
    QuarantineRestore,
    QuarantineResult,
    Reload,
    ReloadResult,
    Reply,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ScanFd,
    ScanResult,
    ServiceRetry,
    Shutdown,
    Threats,
    ThreatsResult,
    Welcome,
    type_tag,
)
from ..paging import MAX_POLICY_PAGE, MAX_QUARANTINE_PAGE
from ..resilience import BreakerStatistics, CircuitBreaker
from .config import ClientConfig
from .errors import ConnectionLostError, DeliveryPendingError
from .events import EventCallback, Subscription
from .link import Pending
from .outbox import Outbox, OutboxTicket
from .reconnect import Connector
from .tasks import BackgroundTasks

R = TypeVar("R", bound=msgspec.Struct)

#: Headroom for the scan_chunk envelope (type, id, bin header) inside one frame.
_CHUNK_OVERHEAD = 256
#: The memfds ``scan()`` reuses: at most 4, of at most 8 MiB each, and at most
#: ``ClientConfig.memfd_pool_bytes`` in all.
_MEMFD_COUNT = 4
_MEMFD_MAX_BYTES = 8 * 1024 * 1024
#: What a stream scan reads from: a path, a binary file, or chunks.
ScanSource = (
    bytes | str | os.PathLike[str] | IO[bytes] | Iterable[bytes] | AsyncIterable[bytes]
)
Progress = Callable[[int, int | None], object]


def _expect(reply: Reply, cls: type[R]) -> R:
    if type(reply) is not cls:
        raise ProtocolError(
            f"expected a {type_tag(cls)} reply, got {type_tag(type(reply))} (id {reply.id})"
        )
    return reply


class Client:
    """A connection to sentineld that survives its restarts. Create it with
    :func:`open_client`; methods are safe to call from many tasks at once."""

    def __init__(
        self,
        socket_path: Path,
        config: ClientConfig,
        tasks: BackgroundTasks,
        outbox: Outbox,
    ) -> None:
        self.socket_path = socket_path
        self.config = config
        self._tasks = tasks
        self._connector = Connector(socket_path, config, tasks)
        self.outbox = outbox
        self._rng = random.Random()
        self._outbox_task = False
        self._closed = False
        self._memfds = MemfdPool(config.memfd_pool_bytes,
                                 min(_MEMFD_MAX_BYTES, config.memfd_pool_bytes),
                                 max_count=_MEMFD_COUNT, name="sentinel-client-scan")

    # --- lifecycle ----------------------------------------------------------------

    def _start_outbox(self) -> None:
        if not self._outbox_task:
            self._outbox_task = True
            self._tasks.start_soon(self._run_outbox)

    async def _run_outbox(self) -> None:
        await self.outbox.run(self._deliver, backoff=self.config.retry, rng=self._rng)

    async def _deliver(self, request: msgspec.Struct) -> Reply:
        # The idempotency key makes a re-send safe, so the write is retried
        # like an idempotent request.
        return await self._connector.call(request, idempotent=True, timeout=self.config.timeout)

    async def aclose(self) -> None:
        """Close the connection; queued writes stay in the outbox file (if any)."""
        if self._closed:
            return
        self.close_nowait()
        await trio.lowlevel.checkpoint()

    def close_nowait(self) -> None:
        """:meth:`aclose` without a checkpoint (for ``finally`` blocks)."""
        self._closed = True
        self._connector.close()
        self.outbox.close()
        self._memfds.close()
        self._tasks.cancel_all()

    # --- introspection ---------------------------------------------------------------

    @property
    def breaker(self) -> CircuitBreaker:
        """The ipc breaker guarding this client's target."""
        return self._connector.breaker

    def breaker_statistics(self) -> BreakerStatistics:
        return self._connector.breaker.statistics(trio.current_time())

    @property
    def welcome(self) -> Welcome | None:
        """The daemon's last ``welcome`` (None before the first connect)."""
        return self._connector.welcome

    @property
    def connected(self) -> bool:
        return self._connector.link is not None

    @property
    def connects(self) -> int:
        """How many times a connection was established (1 + reconnects)."""
        return self._connector.connects

    # --- the generic call --------------------------------------------------------------

    async def request(
        self, request: msgspec.Struct, *, timeout: float | None = None, fds: Sequence[int] = ()
    ) -> Reply:
        """Send any request (its ``id`` is assigned here) and return the raw reply.

        Re-sent after a reconnect only if it is in ``IDEMPOTENT_REQUESTS``.
        """
        return await self._connector.call(
            request,
            idempotent=type(request) in IDEMPOTENT_REQUESTS,
            timeout=self.config.timeout if timeout is None else timeout,
            fds=fds,
        )

    async def _call(
        self, request: msgspec.Struct, cls: type[R], timeout: float | None, fds: Sequence[int] = ()
    ) -> R:
        return _expect(await self.request(request, timeout=timeout, fds=fds), cls)

    # --- connection ---------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None) -> float:
        """Round trip of a ``ping``, in seconds."""
        start = trio.current_time()
        await self._call(Ping(id=0), Pong, timeout)
        return trio.current_time() - start

    async def connect(self, *, timeout: float | None = None) -> Welcome:
        """Connect now (calls connect lazily anyway) and return the ``welcome``."""
        link = await self._connector.run(
            self._connector.connect,
            timeout=self.config.timeout if timeout is None else timeout,
            what="connect",
        )
        assert link.welcome is not None
        return link.welcome

    # --- scanning ---------------------------------------------------------------------------

    async def scan(
        self,
        data: bytes,
        *,
        url: str | None = None,
        filename: str | None = None,
        mime_type: str | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        """Scan ``data``.

        From ``config.memfd_min_bytes`` on, the bytes go to the daemon in a
        memfd (``scan_fd`` with ``size``): one copy into the memfd, which the
        scan worker maps, instead of a copy into the socket, out of it, into
        the daemon's buffer and on into the daemon's own memfd; and the
        daemon's event loop never carries the bytes. The memfds are reused
        (:mod:`sentinel_ipc.memfd`), one only after a ``scan_result``: the
        daemon has read all it reads of a descriptor before it answers. A
        daemon that does not serve ``scan_fd``, refuses the descriptor or
        ignores ``size`` gets the bytes themselves.
        Otherwise one ``scan`` frame carries them; bytes over the daemon's
        frame limit are streamed.
        """
        timeout = self.config.scan_timeout if timeout is None else timeout
        threshold = self.config.memfd_min_bytes
        held = None
        if threshold is not None and len(data) >= threshold:
            held = await self._memfd_holding(data)
        if held is not None:
            fd, capacity = held
            answered = False
            try:
                result = await self.scan_fd(fd, url=url, filename=filename,
                                            mime_type=mime_type, size=len(data),
                                            timeout=timeout)
                # A daemon that ignored ``size`` scanned stale bytes past the end.
                answered = result.size == len(data)
                if answered:
                    return result
            except (UnknownMessageTypeError, BadFileDescriptorError):
                pass  # send the bytes themselves, below
            finally:
                if answered:
                    self._memfds.give(fd, capacity)
                else:
                    os.close(fd)
        link = self._connector.link
        limit = link.max_frame_bytes if link is not None else self.config.chunk_size
        if len(data) + _CHUNK_OVERHEAD > limit:
            return await self.scan_stream(
                io.BytesIO(data), url=url, filename=filename, mime_type=mime_type,
                size=len(data), timeout=timeout,
            )
        request = Scan(id=0, data=data, url=url, filename=filename, mime_type=mime_type)
        return await self._call(request, ScanResult, timeout)

    async def _memfd_holding(self, data: bytes) -> tuple[int, int] | None:
        """A pooled memfd holding ``data``, and its capacity; None where there is
        none to be had (not Linux, or out of memory): the caller sends the bytes."""
        if not hasattr(os, "memfd_create"):
            return None
        try:
            return await self._memfds.holding(data)
        except OSError:
            return None

    async def scan_fd(
        self,
        fd: int,
        *,
        url: str | None = None,
        filename: str | None = None,
        mime_type: str | None = None,
        size: int | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        """Scan the open regular file ``fd``; the descriptor travels with
        SCM_RIGHTS in the same ``sendmsg`` as the frame (the daemon reads it,
        so it needs no access to the path). ``fd`` stays open and owned by the
        caller. ``size``: only the file's first ``size`` bytes are this file's
        (a reused buffer, as :meth:`scan` passes)."""
        request = ScanFd(id=0, url=url, filename=filename, mime_type=mime_type, size=size)
        timeout = self.config.scan_timeout if timeout is None else timeout
        return await self._call(request, ScanResult, timeout, fds=(fd,))

    async def scan_file(
        self,
        path: str | os.PathLike[str],
        *,
        method: Literal["auto", "fd", "stream"] = "auto",
        url: str | None = None,
        mime_type: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        """Scan the file at ``path``: by passing its descriptor (``fd``), by
        streaming its bytes (``stream``, with ``progress(sent, total)``), or
        ``auto``: the descriptor, falling back to streaming when the daemon
        does not serve ``scan_fd``. Raises ``OSError`` if it cannot be opened."""
        filename = os.path.basename(os.fspath(path))
        if method == "stream" or (method == "auto" and progress is not None):
            return await self.scan_stream(
                path, url=url, filename=filename, mime_type=mime_type, progress=progress,
                timeout=timeout,
            )
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.scan_fd(
                fd, url=url, filename=filename, mime_type=mime_type, timeout=timeout
            )
        except UnknownMessageTypeError:
            if method == "fd":
                raise
        finally:
            os.close(fd)
        return await self.scan_stream(
            path, url=url, filename=filename, mime_type=mime_type, timeout=timeout
        )

    async def scan_stream(
        self,
        source: ScanSource,
        *,
        size: int | None = None,
        url: str | None = None,
        filename: str | None = None,
        mime_type: str | None = None,
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> ScanResult:
        """Scan a stream: ``scan_begin``, ``scan_chunk``..., ``scan_end`` on one id.

        If the connection drops mid-stream, a seekable source (a path, a file)
        is re-sent from its start on the new connection; any other source
        cannot be replayed and the scan fails with ``ConnectionLostError``.
        """
        timeout = self.config.scan_timeout if timeout is None else timeout
        async with _open_source(source) as (reader, seekable, known_size):
            stream = _Stream(reader, seekable, size if size is not None else known_size)
            return await self._connector.run(
                self._stream_attempt, stream, url, filename, mime_type, progress,
                timeout=timeout, what="scan stream",
            )

    async def _stream_attempt(
        self,
        stream: _Stream,
        url: str | None,
        filename: str | None,
        mime_type: str | None,
        progress: Progress | None,
    ) -> ScanResult:
        connector = self._connector
        await stream.rewind()
        link = connector.link or await connector.connect()
        chunk_size = max(1024, min(self.config.chunk_size, link.max_frame_bytes - _CHUNK_OVERHEAD))
        request_id = connector.next_id()
        await link.wait_for_slot()
        link.in_flight += 1
        pending: Pending | None = None
        try:
            pending = link.register(request_id)
            begin = ScanBegin(
                id=request_id, url=url, filename=filename, mime_type=mime_type, size=stream.size
            )
            await link.send(link.encode(begin))
            sent = 0
            while True:
                link.read_nowait()  # an early error reply ends the stream
                if pending.done:
                    break
                chunk = await stream.read(chunk_size)
                if not chunk:
                    break
                await link.send(link.encode(ScanChunk(id=request_id, data=chunk)))
                sent += len(chunk)
                if progress is not None:
                    progress(sent, stream.size)
            if not pending.done:
                await link.send(link.encode(ScanEnd(id=request_id)))
            pending.sent = True
            return _expect(await link.wait(pending), ScanResult)
        except SentinelError as exc:
            if pending is not None and pending.reply is None and stream.consumed and not (
                stream.seekable
            ):
                stream.dead = True
                raise ConnectionLostError(
                    f"the connection was lost during a streamed scan of a source that "
                    f"cannot be replayed ({exc.message})"
                ) from exc
            raise
        finally:
            link.unregister(request_id)
            link.release_slot()

    # --- policies ---------------------------------------------------------------------------

    async def policy_add(
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
        """Add a policy through the outbox and wait for the daemon's answer.

        If ``timeout`` runs out first, raises :class:`DeliveryPendingError`: the
        write stays queued and is still delivered (``exc.ticket``).
        """
        ticket = await self.queue_policy_add(
            action, sha256=sha256, url_pattern=url_pattern, rule_name=rule_name,
            mime_type=mime_type, reason=reason, expires_at=expires_at,
            idempotency_key=idempotency_key,
        )
        return _expect(await self.wait_delivered(ticket, timeout=timeout), PolicyResult)

    async def queue_policy_add(
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
        """Fire and forget: queue a ``policy_add``; returns once it is queued (and
        persisted, with an outbox file). Raises ``OutboxFullError``."""
        request = PolicyAdd(
            id=0, action=action, sha256=sha256, url_pattern=url_pattern, rule_name=rule_name,
            mime_type=mime_type, reason=reason, expires_at=expires_at,
            idempotency_key=idempotency_key,
        )
        return await self.submit(request)

    async def policy_import(
        self,
        items: Sequence[PolicyImportItem],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> PolicyImportResult:
        """Add up to 1000 policies as one write (a blocklist import) through the
        outbox, like :meth:`policy_add`: one key for the batch (the outbox picks
        one if none is given), so it is applied once even across reconnects.

        If ``timeout`` runs out first, raises :class:`DeliveryPendingError`: the
        batch stays queued and is still delivered (``exc.ticket``).
        """
        ticket = await self.queue_policy_import(items, idempotency_key=idempotency_key)
        return _expect(await self.wait_delivered(ticket, timeout=timeout), PolicyImportResult)

    async def queue_policy_import(
        self, items: Sequence[PolicyImportItem], *, idempotency_key: str | None = None
    ) -> OutboxTicket:
        """Fire and forget: queue a ``policy_import`` (see :meth:`queue_policy_add`)."""
        return await self.submit(
            PolicyImport(id=0, policies=list(items), idempotency_key=idempotency_key)
        )

    async def policy_remove(
        self,
        policy_id: int,
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> PolicyResult:
        """Remove a policy through the outbox and wait (see :meth:`policy_add`)."""
        ticket = await self.queue_policy_remove(policy_id, idempotency_key=idempotency_key)
        return _expect(await self.wait_delivered(ticket, timeout=timeout), PolicyResult)

    async def queue_policy_remove(
        self, policy_id: int, *, idempotency_key: str | None = None
    ) -> OutboxTicket:
        return await self.submit(
            PolicyRemove(id=0, policy_id=policy_id, idempotency_key=idempotency_key)
        )

    async def submit(self, request: msgspec.Struct) -> OutboxTicket:
        """Queue any request in the outbox (delivered in order, re-sent until
        the daemon answers). Meant for writes with an idempotency key."""
        ticket = await self.outbox.submit(request)
        self._start_outbox()
        return ticket

    async def wait_delivered(self, ticket: OutboxTicket, *, timeout: float | None = None) -> Reply:
        """The reply of a queued operation; :class:`DeliveryPendingError` on timeout."""
        timeout = self.config.timeout if timeout is None else timeout
        with trio.move_on_after(timeout):
            return await ticket.wait()
        raise DeliveryPendingError(
            f"{ticket.kind} not delivered within {timeout:g} s (the daemon is unreachable: "
            f"{ticket.last_error.message if ticket.last_error else 'no answer yet'}); "
            "it stays queued and will be delivered",
            ticket,
        )

    async def flush_outbox(self, *, timeout: float | None = None) -> None:
        """Wait until everything queued so far is delivered (or refused)."""
        if len(self.outbox):
            self._start_outbox()
        with trio.fail_after(self.config.timeout if timeout is None else timeout):
            await self.outbox.join()

    async def policy_list(self, *, timeout: float | None = None) -> PolicyListResult:
        """Every policy, in id order, fetched page by page (``timeout`` is per page).

        One result as before paging: ``degraded`` is true if any page came from
        the daemon's cache. A daemon from before paging ignores ``limit`` and
        answers everything in one reply (no ``next_after_id``).
        """
        policies: list[PolicyRecord] = []
        degraded = False
        after_id = 0
        while True:
            page = await self.policy_list_page(
                after_id=after_id, limit=MAX_POLICY_PAGE, timeout=timeout
            )
            policies.extend(page.policies)
            degraded = degraded or page.degraded
            if page.next_after_id is None:
                return PolicyListResult(id=page.id, policies=policies, degraded=degraded)
            if page.next_after_id <= after_id:
                raise ProtocolError(
                    f"policy_list: the daemon's next_after_id {page.next_after_id} does not "
                    f"move past {after_id}"
                )
            after_id = page.next_after_id

    async def policy_list_page(
        self, *, after_id: int = 0, limit: int = MAX_POLICY_PAGE, timeout: float | None = None
    ) -> PolicyListResult:
        """One page: at most ``limit`` (1..1000) policies with ``id > after_id`` in id
        order, fewer when they would not fit in one frame. ``next_after_id`` is
        the ``after_id`` of the next page, None after the last."""
        request = PolicyList(id=0, after_id=after_id, limit=limit)
        return await self._call(request, PolicyListResult, timeout)

    async def policy_query(
        self,
        *,
        sha256: str | None = None,
        url: str | None = None,
        rule_names: Sequence[str] = (),
        timeout: float | None = None,
    ) -> PolicyDecision:
        """The action the daemon's policies give this hash / URL / rule matches."""
        request = PolicyQuery(id=0, sha256=sha256, url=url, rule_names=list(rule_names))
        return await self._call(request, PolicyDecision, timeout)

    # --- history and quarantine -----------------------------------------------------------

    async def threats(self, *, limit: int = 100, timeout: float | None = None) -> ThreatsResult:
        return await self._call(Threats(id=0, limit=limit), ThreatsResult, timeout)

    async def quarantine_list(self, *, timeout: float | None = None) -> QuarantineListResult:
        """Every quarantined item, oldest first as before paging, fetched page by
        page (``timeout`` is per page). Pages come in quarantine id order, so the
        items are sorted by (``quarantined_at``, ``quarantine_id``) at the end. A
        daemon from before paging ignores ``limit`` and answers everything in one
        reply (no ``next_after``)."""
        items: list[QuarantineItem] = []
        after: str | None = None
        while True:
            page = await self.quarantine_list_page(
                after=after, limit=MAX_QUARANTINE_PAGE, timeout=timeout
            )
            items.extend(page.items)
            if page.next_after is None:
                items.sort(key=lambda i: (i.quarantined_at, i.quarantine_id))
                return QuarantineListResult(id=page.id, items=items)
            if after is not None and page.next_after <= after:
                raise ProtocolError(
                    f"quarantine_list: the daemon's next_after {page.next_after!r} does not "
                    f"move past {after!r}"
                )
            after = page.next_after

    async def quarantine_list_page(
        self,
        *,
        after: str | None = None,
        limit: int = MAX_QUARANTINE_PAGE,
        timeout: float | None = None,
    ) -> QuarantineListResult:
        """One page: at most ``limit`` (1..1000) items whose quarantine id sorts after
        ``after`` (None: from the start), in id order, fewer when they would not
        fit in one frame. ``next_after`` is the ``after`` of the next page, None
        after the last."""
        request = QuarantineList(id=0, after=after, limit=limit)
        return await self._call(request, QuarantineListResult, timeout)

    async def quarantine_restore(
        self,
        quarantine_id: str,
        *,
        dest_fd: int | None = None,
        path: str | None = None,
        timeout: float | None = None,
    ) -> QuarantineResult:
        """Restore into ``dest_fd`` (an open, writable file; passed with SCM_RIGHTS)
        or, for the daemon's own user, into ``path``. Not re-sent after a loss."""
        request = QuarantineRestore(id=0, quarantine_id=quarantine_id, path=path)
        fds = () if dest_fd is None else (dest_fd,)
        return await self._call(request, QuarantineResult, timeout, fds=fds)

    async def quarantine_delete(
        self, quarantine_id: str, *, timeout: float | None = None
    ) -> QuarantineResult:
        return await self._call(
            QuarantineDelete(id=0, quarantine_id=quarantine_id), QuarantineResult, timeout
        )

    # --- health, metrics, breakers -----------------------------------------------------------

    async def health(
        self, probe: Literal["full", "live", "ready"] = "full", *, timeout: float | None = None
    ) -> HealthReport:
        return await self._call(Health(id=0, probe=probe), HealthReport, timeout)

    async def live(self, *, timeout: float | None = None) -> HealthReport:
        return await self.health("live", timeout=timeout)

    async def ready(self, *, timeout: float | None = None) -> HealthReport:
        return await self.health("ready", timeout=timeout)

    async def metrics(
        self,
        format: Literal["prometheus", "openmetrics"] = "prometheus",
        *,
        timeout: float | None = None,
    ) -> MetricsReport:
        return await self._call(Metrics(id=0, format=format), MetricsReport, timeout)

    async def breakers(self, *, timeout: float | None = None) -> BreakersReport:
        """The daemon's breakers (not this client's own: see :attr:`breaker`)."""
        return await self._call(Breakers(id=0), BreakersReport, timeout)

    async def breaker_trip(self, name: str, *, timeout: float | None = None) -> Ack:
        return await self._call(BreakerControl(id=0, name=name, action="trip"), Ack, timeout)

    async def breaker_reset(self, name: str, *, timeout: float | None = None) -> Ack:
        return await self._call(BreakerControl(id=0, name=name, action="reset"), Ack, timeout)

    # --- events and the degraded-mode notice ----------------------------------------------------

    async def subscribe(
        self,
        topics: Sequence[str] = ("services", "degraded"),
        *,
        callback: EventCallback | None = None,
        timeout: float | None = None,
    ) -> Subscription:
        """Receive pushed events (``async for event in sub``, and/or ``callback``).

        Renewed on every reconnect; local ``client`` events announce the gaps.
        Close it (``await sub.aclose()`` or ``async with``) when done: that
        also ends it on the daemon, which holds at most 8 per connection (a
        9th raises ``BusyError`` with ``retryable`` false).
        """
        return await self._connector.subscribe(
            topics, callback=callback,
            timeout=self.config.timeout if timeout is None else timeout,
        )

    async def retry_service(self, service: str, *, timeout: float | None = None) -> Ack:
        """The notice's *Retry Connection* button: the daemon probes ``service`` now."""
        return await self._call(ServiceRetry(id=0, service=service), Ack, timeout)

    async def acknowledge_degraded(self, service: str, *, timeout: float | None = None) -> Ack:
        """The notice's *Continue with Cache* button: no repeat until the state changes."""
        return await self._call(DegradedAck(id=0, service=service), Ack, timeout)

    # --- administration ---------------------------------------------------------------------------

    async def reload(self, *, timeout: float | None = None) -> ReloadResult:
        """Reload the YARA rules (admin)."""
        timeout = self.config.scan_timeout if timeout is None else timeout
        return await self._call(Reload(id=0), ReloadResult, timeout)

    async def shutdown(self, *, timeout: float | None = None) -> Ack:
        """Ask the daemon to drain and exit (admin)."""
        return await self._call(Shutdown(id=0), Ack, timeout)


class _Stream:
    """A scan source being streamed; rewinds to its start for a re-send."""

    def __init__(self, reader: _Reader, seekable: bool, size: int | None) -> None:
        self._reader = reader
        self.seekable = seekable
        self.size = size
        #: Bytes were read (and possibly sent): a re-send must start over.
        self.consumed = False
        self.dead = False

    async def rewind(self) -> None:
        if self.dead:
            raise ConnectionLostError("the stream source was consumed by an earlier attempt")
        if self.consumed:
            if not self.seekable:
                self.dead = True
                raise ConnectionLostError(
                    "the stream source cannot be replayed after a lost connection"
                )
            await self._reader.seek0()
            self.consumed = False

    async def read(self, n: int) -> bytes:
        data = await self._reader.read(n)
        if data:
            self.consumed = True
        return data


class _Reader:
    async def read(self, n: int) -> bytes:
        raise NotImplementedError

    async def seek0(self) -> None:
        raise LocalProtocolError("this source cannot be rewound")


class _FileReader(_Reader):
    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._start = file.tell() if file.seekable() else 0

    async def read(self, n: int) -> bytes:
        if isinstance(self._file, io.BytesIO):
            return self._file.read(n)
        return await trio.to_thread.run_sync(self._file.read, n)

    async def seek0(self) -> None:
        self._file.seek(self._start)


class _IterReader(_Reader):
    def __init__(self, chunks: Iterable[bytes] | AsyncIterable[bytes]) -> None:
        self._sync = iter(chunks) if isinstance(chunks, Iterable) else None
        self._async = chunks.__aiter__() if isinstance(chunks, AsyncIterable) else None
        self._buffer = b""

    async def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                if self._sync is not None:
                    chunk = next(self._sync)
                else:
                    assert self._async is not None
                    chunk = await self._async.__anext__()
            except (StopIteration, StopAsyncIteration):
                break
            self._buffer += chunk
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


@contextlib.asynccontextmanager
async def _open_source(
    source: ScanSource,
) -> AsyncIterator[tuple[_Reader, bool, int | None]]:
    if isinstance(source, (str, os.PathLike)):
        file = await trio.to_thread.run_sync(open, os.fspath(source), "rb")
        try:
            size = os.fstat(file.fileno()).st_size
            yield _FileReader(file), True, size
        finally:
            file.close()
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        yield _FileReader(io.BytesIO(data)), True, len(data)
        return
    if hasattr(source, "read"):
        file_obj: IO[bytes] = source  # type: ignore[assignment]
        seekable = bool(getattr(file_obj, "seekable", lambda: False)())
        stream_size: int | None = None
        if seekable:
            here = file_obj.tell()
            stream_size = file_obj.seek(0, os.SEEK_END) - here
            file_obj.seek(here)
        yield _FileReader(file_obj), seekable, stream_size
        return
    yield _IterReader(source), False, None


@contextlib.asynccontextmanager
async def open_client(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    config: ClientConfig | None = None,
) -> AsyncIterator[Client]:
    """Open a :class:`Client` for ``socket_path`` (default: ``$SENTINEL_SOCKET``, then
    the SPEC's per-user path). Connects lazily; never fails because the daemon
    is down. Raises ``OutboxError`` if ``config.outbox_path`` is unusable.

    On exit the connection closes; undelivered writes stay in the outbox file.
    """
    config = config or ClientConfig()
    path = Path(socket_path) if socket_path is not None else default_socket_path()
    outbox = await Outbox.open(max_items=config.outbox_max_items, path=config.outbox_path)
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            client = Client(path, config, BackgroundTasks(nursery), outbox)
            if len(outbox):
                client._start_outbox()
            try:
                yield client
            except BaseException as exc:
                # Re-raised below, outside the nursery, so that it reaches the
                # caller as itself rather than inside an ExceptionGroup.
                error = exc
            finally:
                client.close_nowait()
    finally:
        outbox.close()
    if error is not None:
        raise error


__all__ = ["Client", "Progress", "ScanSource", "open_client"]
