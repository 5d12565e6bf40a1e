"""Request dispatch: message type -> handler, with authorization in one place.

Each subsystem registers its handlers (``sentinel_ipc.handlers.*``); the
connection code knows nothing about scanning or policies. A handler is an
async function ``(request, ctx) -> reply | None`` that raises a
:class:`~sentinel_ipc.errors.SentinelError` for a typed failure. ``None``
means "no reply" (a ``scan_chunk``: the stream answers at ``scan_end``).

``ordered`` handlers run inside the connection's read loop, one at a time in
arrival order: stream chunks must be applied in order, and tiny handlers
(ping) are cheaper to run inline than to spawn. All others run as their own
task, so a slow scan never delays a ping on the same connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec

from ..errors import ForbiddenError
from ..messages import ADMIN_REQUESTS, Reply

if TYPE_CHECKING:
    from .connection import Connection
    from .peer import PeerCredentials

Req = TypeVar("Req", bound=msgspec.Struct)


@dataclass(slots=True)
class RequestContext:
    """What a handler may know about the request beyond its message."""

    peer: PeerCredentials
    is_admin: bool
    connection: Connection
    #: Descriptors that arrived with this frame (SCM_RIGHTS). A handler that
    #: uses one takes it out of the list; the connection closes what is left.
    fds: list[int]


Handler = Callable[[Any, RequestContext], Awaitable[Reply | None]]


@dataclass(frozen=True, slots=True)
class Route(Generic[Req]):
    handler: Handler
    admin: bool
    ordered: bool


class Dispatcher:
    """Maps message classes to routes."""

    def __init__(self) -> None:
        self._routes: dict[type[Any], Route[Any]] = {}

    def register(
        self,
        message_type: type[Req],
        handler: Callable[[Req, RequestContext], Awaitable[Reply | None]],
        *,
        admin: bool | None = None,
        ordered: bool = False,
    ) -> None:
        """Route ``message_type`` to ``handler``.

        Whether it is an admin operation is decided by
        :data:`~sentinel_ipc.messages.ADMIN_REQUESTS`, the one documented list;
        an ``admin`` argument that disagrees with it is a bug and raises.
        """
        if message_type in self._routes:
            raise ValueError(f"a handler for {message_type.__name__} is already registered")
        documented = message_type in ADMIN_REQUESTS
        if admin is not None and admin != documented:
            raise ValueError(
                f"{message_type.__name__}: admin={admin} disagrees with messages.ADMIN_REQUESTS"
            )
        self._routes[message_type] = Route(handler, documented, ordered)

    def route(self, message_type: type[Any]) -> Route[Any] | None:
        return self._routes.get(message_type)

    def registered(self) -> frozenset[type[Any]]:
        return frozenset(self._routes)


def check_admin(route: Route[Any], ctx: RequestContext, what: str) -> None:
    if route.admin and not ctx.is_admin:
        raise ForbiddenError(
            f"{what} is an admin operation; uid {ctx.peer.uid} is not allowed to use it"
        )
