"""The accept loop and the server-wide bounds.

:class:`Server` owns the listening socket and the set of live connections.
Each accepted socket gets its peer credentials (SO_PEERCRED) and one task in
the server's nursery. Over ``max_connections`` a new peer receives a
retryable ``busy`` error and is closed at once; a peer of another user is
refused when ``allow_other_users`` is off.

Per user, on a shared socket: one uid may hold at most a quarter (or
``max_connections_per_uid``) of the connections and of the in-flight requests
(``max_in_flight_per_uid``) (:class:`UidUsage`, checked by the accept loop and
by each connection's admission). Without these, one user's runaway program
could take every daemon-wide slot and lock the other users out.

Out of descriptors (EMFILE), ``accept`` fails and the peer would wait in the
backlog, unanswered, for as long as the shortage lasts. The server keeps one
spare descriptor for that moment: it closes it, accepts the waiting peer,
answers ``busy`` (retryable) and closes, then takes the spare back. The
failure is logged once per ``_ACCEPT_LOG_INTERVAL`` with a count, not once per
retry.

Shutdown (:meth:`Server.drain`): stop accepting, refuse new requests with
``shutting_down``, let in-flight requests finish within the grace period, then
cancel whatever is left. The caller removes the socket file.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
from collections import Counter
from collections.abc import Callable

import trio

from ..codec import encode_framed
from ..config import ServerConfig
from ..errors import BusyError, ErrorCode, ForbiddenError
from ..logs import log_event
from .connection import Connection, error_reply
from .dispatch import Dispatcher
from .peer import PeerCredentials, peer_credentials
from .receive_budget import ReceiveBudget
from .usage import UidUsage

#: At most one ``accept_failed`` log line per this many seconds (with a count).
_ACCEPT_LOG_INTERVAL = 10.0


class Server:
    def __init__(self, config: ServerConfig, dispatcher: Dispatcher) -> None:
        self.config = config
        self.dispatcher = dispatcher
        self.connections: dict[int, Connection] = {}
        self.in_flight = 0
        #: Per peer uid, while it has a connection (see :class:`UidUsage`).
        self.usage: dict[int, UidUsage] = {}
        #: One uid's share of connections and in-flight requests (None: no bound).
        self.connections_per_uid = config.uid_share(
            config.max_connections, config.max_connections_per_uid)
        self.in_flight_per_uid = config.uid_share(
            config.max_in_flight_total, config.max_in_flight_per_uid)
        #: Memory for large frames being received, shared by all connections.
        self.receive_budget = ReceiveBudget(config.max_receive_buffer_bytes)
        self.draining = False
        self.errors_by_code: Counter[str] = Counter()
        self.connections_total = 0
        self.refused_total: Counter[str] = Counter()
        #: Hooks the daemon sets: audit of refused admin requests, error metrics.
        self.on_refusal: Callable[[PeerCredentials, str], None] | None = None
        self.on_error: Callable[[str], None] | None = None
        self._ids = itertools.count(1)
        self._idle = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._spare_fd = -1  # see the module docstring (EMFILE)
        self._accept_failures = 0  # since the last accept_failed line
        self._accept_logged_at = -_ACCEPT_LOG_INTERVAL

    # -- hooks used by connections ---------------------------------------------

    def note_error(self, code: str) -> None:
        self.errors_by_code[code] += 1
        if self.on_error is not None:
            self.on_error(code)

    def audit_refusal(self, peer: PeerCredentials, what: str) -> None:
        log_event("request_refused", logging.WARNING, uid=peer.uid, pid=peer.pid, request=what)
        if self.on_refusal is not None:
            self.on_refusal(peer, what)

    def request_finished(self) -> None:
        if self.draining and self.in_flight == 0:
            self._idle.set()

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    # -- serving -----------------------------------------------------------------

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept until :meth:`drain` finishes or the surrounding scope is cancelled."""
        with trio.CancelScope() as scope:
            self._cancel_scope = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept_loop, listener, nursery)
                task_status.started()

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        self._take_spare_fd()
        try:
            with trio.CancelScope() as scope:
                self._accept_scope = scope
                while not self.draining:
                    try:
                        sock, _ = await listener.accept()
                    except trio.ClosedResourceError:
                        return
                    except OSError as exc:
                        self._note_accept_failure(exc)
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            await self._refuse_with_spare_fd(listener)
                        # Back off briefly instead of spinning.
                        await trio.sleep(0.05)
                        continue
                    nursery.start_soon(self._serve_connection, sock)
        finally:
            if self._spare_fd >= 0:
                os.close(self._spare_fd)
                self._spare_fd = -1

    def _take_spare_fd(self) -> None:
        if self._spare_fd < 0:
            with contextlib.suppress(OSError):
                self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    async def _refuse_with_spare_fd(self, listener: trio.socket.SocketType) -> None:
        """Out of descriptors: answer one waiting peer ``busy`` instead of leaving
        it in the backlog (module docstring)."""
        if self._spare_fd < 0:
            return
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            with trio.move_on_after(0.5):
                sock, _ = await listener.accept()
                await self._refuse(
                    sock, BusyError("the daemon is out of file descriptors", retry_after=1.0),
                    timeout=0.5,
                )
        except OSError:
            pass  # someone else took the descriptor first: the peer stays queued
        finally:
            self._take_spare_fd()

    def _note_accept_failure(self, exc: OSError) -> None:
        self._accept_failures += 1
        now = trio.current_time()
        if now - self._accept_logged_at >= _ACCEPT_LOG_INTERVAL:
            log_event("accept_failed", logging.WARNING, error=str(exc),
                      failures=self._accept_failures)
            self._accept_failures = 0
            self._accept_logged_at = now

    async def _refuse(
        self, sock: trio.socket.SocketType, refusal: BusyError | ForbiddenError, *, timeout: float
    ) -> None:
        """Count the refusal, send it (id 0) within ``timeout``, close the socket."""
        self.refused_total[refusal.code] += 1
        self.note_error(refusal.code)
        with sock, contextlib.suppress(
            OSError, trio.BrokenResourceError, trio.ClosedResourceError
        ), trio.move_on_after(timeout):
            await trio.SocketStream(sock).send_all(encode_framed(error_reply(0, refusal)))

    async def _serve_connection(self, sock: trio.socket.SocketType) -> None:
        try:
            peer = peer_credentials(sock)
        except OSError:
            sock.close()
            return
        refusal: BusyError | ForbiddenError | None = None
        if self.draining:
            refusal = BusyError("the daemon is shutting down", retry_after=1.0)
        elif len(self.connections) >= self.config.max_connections:
            refusal = BusyError(
                f"too many connections (limit {self.config.max_connections})", retry_after=0.5
            )
        elif not self._peer_allowed(peer):
            refusal = ForbiddenError(f"uid {peer.uid} may not use this daemon")
            self.audit_refusal(peer, "connect")
        elif self.connections_per_uid is not None:
            held = self.usage.get(peer.uid)
            if held is not None and held.connections >= self.connections_per_uid:
                refusal = BusyError(
                    f"uid {peer.uid} has {held.connections} connections open "
                    f"(limit per user {self.connections_per_uid})",
                    retry_after=0.5,
                )
        if refusal is not None:
            await self._refuse(sock, refusal, timeout=1.0)
            return
        usage = self.usage.get(peer.uid)
        if usage is None:
            usage = self.usage[peer.uid] = UidUsage(peer.uid)
        usage.connections += 1
        conn_id = next(self._ids)
        conn = Connection(self, sock, peer, conn_id, usage)
        self.connections[conn_id] = conn
        self.connections_total += 1
        log_event("connection_opened", logging.DEBUG, conn=conn_id, uid=peer.uid, pid=peer.pid)
        try:
            await conn.serve()
        finally:
            del self.connections[conn_id]
            usage.connections -= 1
            if usage.connections == 0 and usage.in_flight == 0:
                del self.usage[peer.uid]
            log_event("connection_closed", logging.DEBUG, conn=conn_id)

    def _peer_allowed(self, peer: PeerCredentials) -> bool:
        if self.config.allow_other_users:
            return True
        return (
            peer.uid == os.getuid()
            or peer.uid in self.config.admin_uids
            or peer.uid in self.config.allowed_uids
        )

    async def drain(self, grace: float) -> None:
        """Stop accepting, wait up to ``grace`` s for in-flight requests, then cancel."""
        self.draining = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        log_event("draining", logging.INFO, in_flight=self.in_flight, grace=grace)
        for conn in list(self.connections.values()):
            conn.wake_for_drain()
        if self.in_flight:
            with trio.move_on_after(grace):
                await self._idle.wait()
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()


__all__ = ["ErrorCode", "Server"]
