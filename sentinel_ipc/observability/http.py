"""An optional, read-only HTTP endpoint for scrapers, on trio with h11.

Prometheus and container orchestrators cannot talk to a Unix socket, so when
``http_listen = "127.0.0.1:PORT"`` is set the daemon also serves::

    GET /health         the full health report (JSON); 503 when unhealthy
    GET /health/live    liveness (JSON); always 200 while the daemon answers
    GET /health/ready   readiness (JSON); 503 with the reason when not ready
    GET /metrics        Prometheus text, or OpenMetrics if the Accept header asks

It is off by default, serves only GET/HEAD of these paths, and is bounded like
the Unix socket: at most ``max_connections`` clients (more are closed at
once), a request head of at most 16 KiB, a request must arrive within
``request_timeout`` seconds of the connection going idle, and request bodies
are read and discarded up to 64 KiB. h11 does the protocol; this module only
maps its events to routes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import h11
import trio

from ..logs import log_event

__all__ = ["HttpRequest", "HttpResponse", "Route", "serve_http"]

_MAX_HEAD = 16 * 1024
_MAX_BODY = 64 * 1024
_RECV = 16 * 1024


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Route = Callable[[HttpRequest], Awaitable[HttpResponse]]


class _Closed(Exception):
    pass


class _HttpConnection:
    def __init__(
        self, stream: trio.SocketStream, routes: Mapping[str, Route], request_timeout: float
    ) -> None:
        self.stream = stream
        self.routes = routes
        self.request_timeout = request_timeout
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)

    async def _next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_after(self.request_timeout) as scope:
                data = await self.stream.receive_some(_RECV)
            if scope.cancelled_caught:
                raise _Closed("request timeout")
            self.conn.receive_data(data)

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)

    async def serve(self) -> None:
        try:
            while True:
                try:
                    event = await self._next_event()
                except h11.RemoteProtocolError as exc:
                    await self._send_error(exc.error_status_hint, str(exc))
                    return
                if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Request):
                    return
                request = HttpRequest(
                    method=event.method.decode("ascii", "replace"),
                    path=event.target.decode("ascii", "replace"),
                    headers={k.decode("latin-1").lower(): v.decode("latin-1")
                             for k, v in event.headers},
                )
                body = 0
                while True:
                    part = await self._next_event()
                    if isinstance(part, h11.Data):
                        body += len(part.data)
                        if body > _MAX_BODY:
                            await self._send_error(413, "request body too large")
                            return
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return
                response = await self._dispatch(request)
                await self._respond(request, response)
                if self.conn.our_state is h11.MUST_CLOSE:
                    return
                try:
                    self.conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return
        except h11.LocalProtocolError:
            return

    async def _dispatch(self, request: HttpRequest) -> HttpResponse:
        path = request.path.split("?", 1)[0]
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            return _json(404, f'{{"error": "no such path: {_esc(path)}"}}')
        if request.method not in ("GET", "HEAD"):
            response = _json(405, '{"error": "only GET and HEAD are served"}')
            response.headers.append(("Allow", "GET, HEAD"))
            return response
        try:
            return await route(request)
        except Exception as exc:
            log_event("http_route_failed", logging.ERROR, path=path, error=repr(exc))
            return _json(500, '{"error": "internal error"}')

    async def _respond(self, request: HttpRequest, response: HttpResponse) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            *response.headers,
        ]
        await self._send(h11.Response(status_code=response.status, headers=headers))
        if request.method != "HEAD":
            await self._send(h11.Data(data=response.body))
        await self._send(h11.EndOfMessage())

    async def _send_error(self, status: int, message: str) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f'{{"error": "{_esc(message)}"}}'.encode()
        with contextlib.suppress(h11.LocalProtocolError, trio.BrokenResourceError,
                                 trio.ClosedResourceError, OSError):
            await self._send(h11.Response(status_code=status, headers=[
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ]))
            await self._send(h11.Data(data=body))
            await self._send(h11.EndOfMessage())


def _esc(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')[:200]


def _json(status: int, body: str) -> HttpResponse:
    return HttpResponse(status=status, body=body.encode())


async def serve_http(
    host: str,
    port: int,
    routes: Mapping[str, Route],
    *,
    max_connections: int = 64,
    request_timeout: float = 10.0,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` on ``host:port`` until cancelled; ``started`` with the
    bound (host, port) (``port`` 0 picks a free one). Raises ``OSError`` when
    the address cannot be bound."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    sockname = listeners[0].socket.getsockname()
    bound = (str(sockname[0]), int(sockname[1]))
    limiter = trio.CapacityLimiter(max_connections)
    log_event("http_listening", logging.INFO, host=bound[0], port=bound[1])

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await stream.aclose()
            return
        try:
            await _HttpConnection(stream, routes, request_timeout).serve()
        finally:
            limiter.release()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(trio.serve_listeners, handle, [listener])
            task_status.started(bound)
    finally:
        for listener in listeners:
            listener.socket.close()
