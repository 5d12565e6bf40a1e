"""Connection-level requests: ``hello``, ``ping``, ``shutdown``."""

from __future__ import annotations

from collections.abc import Callable

from .. import __version__
from ..errors import UnsupportedVersionError
from ..messages import PROTOCOL_VERSION, Ack, Hello, Limits, Ping, Pong, Shutdown, Welcome
from ..server.dispatch import Dispatcher, RequestContext

SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})


def register(
    dispatcher: Dispatcher, *, limits: Limits, request_shutdown: Callable[[], None]
) -> None:
    async def hello(request: Hello, ctx: RequestContext) -> Welcome:
        if request.protocol_version not in SUPPORTED_VERSIONS:
            raise UnsupportedVersionError(
                f"protocol version {request.protocol_version} is not supported; "
                f"this daemon speaks {sorted(SUPPORTED_VERSIONS)}"
            )
        ctx.connection.protocol_version = request.protocol_version
        return Welcome(
            id=request.id,
            server=f"sentineld/{__version__}",
            protocol_version=PROTOCOL_VERSION,
            max_frame_bytes=limits.max_frame_bytes,
            limits=limits,
        )

    async def ping(request: Ping, ctx: RequestContext) -> Pong:
        return Pong(id=request.id)

    async def shutdown(request: Shutdown, ctx: RequestContext) -> Ack:
        request_shutdown()
        return Ack(id=request.id, detail="shutting down")

    dispatcher.register(Hello, hello, ordered=True)
    dispatcher.register(Ping, ping, ordered=True)
    dispatcher.register(Shutdown, shutdown, admin=True)
