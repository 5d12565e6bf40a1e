"""The scan requests: ``scan``, ``scan_begin``/``scan_chunk``/``scan_end``, ``scan_fd``.

The path of a scan, and where each resilience decision is taken:

1. admission (here): the peer's token bucket (``rate_limited``), the
   connection's concurrent-scan cap (``rate_limited``), open streams per
   connection and the bytes they buffer (``busy``); on a shared socket the
   same per user (peer uid) over all its connections: running scans, open
   streams, buffered bytes;
2. the scanner (``Scanner``): bounded queue, buffer budget and open streams
   (``busy``), idle streams dropped (``timeout``, pushed to the client with
   the stream's id), yara breaker, yara retry on worker crash; if it cannot
   scan it says so (``scanned=False``) instead of failing;
3. the verdict (:class:`~sentinel_ipc.verdict.VerdictMaker`): reputation,
   policy decision with its own database fallback, fail-open / fail-closed,
   quarantine, threat history, metrics.

Each step degrades on its own; a failing database never makes a scan fail and
a failing scanner never stops hash policies from applying.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import trio

from ..config import RateLimitConfig
from ..errors import (
    BadFileDescriptorError,
    BusyError,
    NotFoundError,
    ProtocolError,
    RateLimitedError,
)
from ..messages import Scan, ScanBegin, ScanChunk, ScanEnd, ScanFd, ScanResult
from ..ratelimit import RateLimiter
from ..server.dispatch import Dispatcher, RequestContext

if TYPE_CHECKING:
    from ..scanning import Scanner, ScanStream
    from ..verdict import VerdictMaker

_SCANS_KEY = "scan.active"
_STREAMS_KEY = "scan.streams"
MAX_STREAMS_PER_CONNECTION = 8
#: Open streams of one peer uid over all its connections, on a shared socket: a
#: quarter of the scanner's default ``max_open_streams`` (64), so that one user
#: cannot take them all.
MAX_STREAMS_PER_UID = 16


def buffer_share(max_pending_bytes: int, max_stream_bytes: int) -> int:
    """Bytes the open streams of one connection (of one user, on a shared socket)
    may buffer at once: half the scanner's ``max_pending_bytes``, or one largest
    file if that is more (within the budget).

    Without a share, one client's streams could take the whole budget and every
    other client's scans would get ``busy`` until that client finished.
    """
    return max(max_pending_bytes // 2, min(max_stream_bytes, max_pending_bytes))


class ScanAdmission:
    """Per-peer token bucket, and concurrency caps per connection and (with
    ``scans_per_uid``) per peer uid."""

    def __init__(self, config: RateLimitConfig, scans_per_uid: int | None = None) -> None:
        self.config = config
        self.limiter = RateLimiter(config.burst, config.scans_per_second)
        self.scans_per_uid = scans_per_uid

    def take_token(self, ctx: RequestContext) -> None:
        wait = self.limiter.try_acquire(ctx.peer.uid, trio.current_time())
        if wait is not None:
            raise RateLimitedError(
                f"uid {ctx.peer.uid} is over its scan rate "
                f"({self.config.scans_per_second:g}/s, burst {self.config.burst})",
                retry_after=wait,
            )

    @contextlib.contextmanager
    def running(self, ctx: RequestContext) -> Iterator[None]:
        """Count a scan against the connection's concurrency cap while it runs."""
        conn = ctx.connection
        active = conn.state.get(_SCANS_KEY, 0)
        if active >= self.config.max_concurrent_scans_per_connection:
            raise RateLimitedError(
                f"{active} scans already running on this connection "
                f"(limit {self.config.max_concurrent_scans_per_connection})",
                retry_after=0.1,
            )
        usage = conn.usage  # the peer uid's, summed over its connections
        limit = self.scans_per_uid
        if limit is not None and usage.scans >= limit:
            raise RateLimitedError(
                f"uid {ctx.peer.uid} has {usage.scans} scans running (limit per user {limit})",
                retry_after=0.1,
            )
        conn.state[_SCANS_KEY] = active + 1
        usage.scans += 1
        try:
            yield
        finally:
            conn.state[_SCANS_KEY] -= 1
            usage.scans -= 1

    @contextlib.contextmanager
    def admit(self, ctx: RequestContext) -> Iterator[None]:
        with self.running(ctx):
            self.take_token(ctx)
            yield


def register(
    dispatcher: Dispatcher,
    *,
    scanner: Scanner,
    verdicts: VerdictMaker,
    rate_limit: RateLimitConfig,
    shared_socket: bool = False,
) -> ScanAdmission:
    """``shared_socket``: the socket is open to other users, so each user's running
    scans (a quarter of the scanner's queue unless ``[rate_limit]
    max_concurrent_scans_per_uid`` says), open streams and buffered bytes are
    bounded over all its connections, not only per connection."""
    from ..scanning import ScanMeta

    scans_per_uid = rate_limit.max_concurrent_scans_per_uid
    if scans_per_uid is None and shared_socket:
        scans_per_uid = max(1, scanner.config.max_queue // 4)
    admission = ScanAdmission(rate_limit, scans_per_uid)
    share = buffer_share(scanner.config.max_pending_bytes, scanner.config.max_stream_bytes)
    #: Every connection's stream table, with its peer uid, for the per-uid bounds.
    tables: dict[int, tuple[int, dict[int, ScanStream]]] = {}

    def sharing(ctx: RequestContext, table: dict[int, ScanStream]
                ) -> Iterator[dict[int, ScanStream]]:
        """The stream tables whose streams count against the same share as
        ``table``: the peer uid's on a shared socket, else the connection's."""
        if not shared_socket:
            return iter((table,))
        uid = ctx.peer.uid
        return (held for owner, held in tables.values() if owner == uid)

    def meta_of(req: Scan | ScanBegin | ScanFd) -> ScanMeta:
        return ScanMeta(url=req.url, filename=req.filename, mime_type=req.mime_type)

    async def scan(req: Scan, ctx: RequestContext) -> ScanResult:
        meta = meta_of(req)
        with admission.admit(ctx):
            outcome = await scanner.scan_bytes(req.data, meta)
            return await verdicts.verdict(req.id, outcome, meta, content=req.data)

    def streams(ctx: RequestContext) -> dict[int, ScanStream]:
        table: dict[int, ScanStream] | None = ctx.connection.state.get(_STREAMS_KEY)
        if table is None:
            table = ctx.connection.state[_STREAMS_KEY] = {}
            conn_id = ctx.connection.conn_id
            tables[conn_id] = (ctx.peer.uid, table)

            def abort_all() -> None:
                tables.pop(conn_id, None)
                for stream in table.values():
                    stream.abort()
                table.clear()

            ctx.connection.on_close(abort_all)
        return table

    async def scan_begin(req: ScanBegin, ctx: RequestContext) -> None:
        if req.size is not None and req.size < 0:
            raise ProtocolError(f"scan_begin.size must not be negative, got {req.size}")
        table = streams(ctx)
        if req.id in table:
            raise ProtocolError(f"a scan stream with id {req.id} is already open")
        if len(table) >= MAX_STREAMS_PER_CONNECTION:
            raise BusyError(
                f"{len(table)} scan streams already open on this connection "
                f"(limit {MAX_STREAMS_PER_CONNECTION})",
                retry_after=0.5,
            )
        if shared_socket:
            held = sum(len(t) for t in sharing(ctx, table))
            if held >= MAX_STREAMS_PER_UID:
                raise BusyError(
                    f"uid {ctx.peer.uid} has {held} scan streams open "
                    f"(limit per user {MAX_STREAMS_PER_UID})",
                    retry_after=0.5,
                )
        admission.take_token(ctx)
        conn = ctx.connection
        stream_id = req.id

        async def dropped_idle(stream: ScanStream) -> None:
            """The scanner dropped the stream (no chunk in time): tell the client,
            with the stream's id, as the error its scan_begin or last chunk never got.

            The entry stays in the table until the notice is written, so a client
            that does not read holds at most its stream slots, not a growing pile
            of notices. A chunk or end that arrives meanwhile is answered with the
            same error (``write``/``finish`` raise it) and removes the entry; then
            there is nothing left to notify.
            """
            if table.get(stream_id) is not stream:
                return  # already answered, or the connection is gone
            try:
                await conn.send_error(stream_id, stream.idle_error())
            finally:
                if table.get(stream_id) is stream:
                    del table[stream_id]

        table[req.id] = scanner.open_stream(meta_of(req), req.size, on_idle=dropped_idle)

    def check_share(ctx: RequestContext, table: dict[int, ScanStream], more: int) -> None:
        held = sum(
            stream.size
            for held_table in sharing(ctx, table)
            for stream in held_table.values()
            if not stream.closed
        )
        if held + more > share:
            whose, per = (
                (f"the scan streams of uid {ctx.peer.uid}", "per user") if shared_socket
                else ("this connection's scan streams", "per connection")
            )
            raise BusyError(
                f"{whose} buffer {held >> 10} KiB already (limit {share >> 10} KiB {per})",
                retry_after=1.0,
            )

    async def scan_chunk(req: ScanChunk, ctx: RequestContext) -> None:
        table = streams(ctx)
        stream = table.get(req.id)
        if stream is None:
            raise NotFoundError(f"no open scan stream with id {req.id} (send scan_begin first)")
        try:
            check_share(ctx, table, len(req.data))
            stream.write(req.data)
        except Exception:
            # Over a limit, dropped for idleness, or the buffer failed: the stream
            # is gone at once (later chunks for this id get not_found).
            table.pop(req.id, None)
            stream.abort()
            raise

    async def scan_end(req: ScanEnd, ctx: RequestContext) -> ScanResult:
        table = streams(ctx)
        if req.id not in table:
            raise NotFoundError(f"no open scan stream with id {req.id} (send scan_begin first)")
        # Over the concurrency cap the stream stays open: the rate_limited error
        # is retryable, and a retried scan_end must find it.
        with admission.running(ctx):
            stream = table.pop(req.id)
            try:
                outcome = await stream.finish()
                # The buffer stays readable until abort(): a quarantine copies it.
                return await verdicts.verdict(
                    req.id, outcome, stream.meta, content_fd=stream.fileno()
                )
            finally:
                stream.abort()

    async def scan_fd(req: ScanFd, ctx: RequestContext) -> ScanResult:
        if req.size is not None and req.size < 0:
            raise ProtocolError(f"scan_fd.size must not be negative, got {req.size}")
        if not ctx.fds:
            raise BadFileDescriptorError(
                "scan_fd needs a file descriptor passed with SCM_RIGHTS in the same sendmsg()"
            )
        fd = ctx.fds[0]  # the scanner checks it is a readable regular file (bad_fd)
        meta = meta_of(req)
        with admission.admit(ctx):
            outcome = await scanner.scan_fd(fd, meta, req.size)
            return await verdicts.verdict(req.id, outcome, meta, content_fd=fd)

    dispatcher.register(Scan, scan)
    dispatcher.register(ScanBegin, scan_begin, ordered=True)
    dispatcher.register(ScanChunk, scan_chunk, ordered=True)
    dispatcher.register(ScanEnd, scan_end)
    dispatcher.register(ScanFd, scan_fd)
    return admission


__all__ = [
    "MAX_STREAMS_PER_CONNECTION",
    "MAX_STREAMS_PER_UID",
    "ScanAdmission",
    "buffer_share",
    "register",
]
