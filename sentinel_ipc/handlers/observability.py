"""Observability requests: ``health``, ``metrics``, ``breakers``, ``breaker_control``
(admin), ``subscribe``, ``unsubscribe``, ``service_retry`` (admin) and
``degraded_ack`` (admin).

The handlers only translate between the wire and
:class:`~sentinel_ipc.observability.hub.Observability`; every decision lives
there, except the ones that need the connection: ``subscribe`` keeps that
connection's subscriptions in its ``state`` and refuses one past
:data:`~sentinel_ipc.observability.events.MAX_SUBSCRIPTIONS_PER_CONNECTION`
(:func:`~sentinel_ipc.observability.events.check_connection_room` says why
the error is a non-retryable ``busy``); ``unsubscribe`` looks only there, so
a connection can end its own subscriptions and nobody else's.

``health`` and ``metrics`` never wait on a dependency (cached check results,
figures read at scrape time), so they stay fast under full scan load.
"""

from __future__ import annotations

from ..messages import (
    Ack,
    BreakerControl,
    Breakers,
    BreakersReport,
    DegradedAck,
    Health,
    HealthReport,
    Metrics,
    MetricsReport,
    ServiceRetry,
    Subscribe,
    Subscribed,
    Unsubscribe,
)
from ..observability.events import Subscription, check_connection_room, take_subscriptions
from ..observability.hub import Observability
from ..server.dispatch import Dispatcher, RequestContext

#: ``Connection.state`` key: the subscriptions made on that connection.
_SUBSCRIPTIONS_KEY = "subscriptions"


def register(dispatcher: Dispatcher, hub: Observability) -> None:
    async def health(request: Health, ctx: RequestContext) -> HealthReport:
        return await hub.health_report(request.id, request.probe)

    async def metrics(request: Metrics, ctx: RequestContext) -> MetricsReport:
        content_type, text = hub.metrics.render(request.format)
        return MetricsReport(id=request.id, content_type=content_type, text=text)

    async def breakers(request: Breakers, ctx: RequestContext) -> BreakersReport:
        return BreakersReport(id=request.id, breakers=hub.breaker_infos())

    async def breaker_control(request: BreakerControl, ctx: RequestContext) -> Ack:
        detail = hub.control_breaker(request.name, request.action, uid=ctx.peer.uid)
        return Ack(id=request.id, detail=detail)

    def held_by(ctx: RequestContext) -> list[Subscription]:
        """The connection's subscriptions; created with one closer for all of them
        (one per subscription would pile up on a connection that subscribes and
        unsubscribes for hours)."""
        conn = ctx.connection
        held: list[Subscription] | None = conn.state.get(_SUBSCRIPTIONS_KEY)
        if held is None:
            held = conn.state[_SUBSCRIPTIONS_KEY] = []
            subs = held

            def close_all() -> None:
                for sub in subs:
                    sub.close()

            conn.on_close(close_all)
        return held

    async def subscribe(request: Subscribe, ctx: RequestContext) -> None:
        conn = ctx.connection
        held = held_by(ctx)
        check_connection_room(held)  # the per-connection bound, before the daemon's
        sub = hub.subscribe(request.id, request.topics, conn.send,  # validates first
                            owner=ctx.peer.uid)
        held.append(sub)  # no checkpoint since the check: pipelined subscribes count
        try:
            await conn.send(Subscribed(id=request.id, topics=sorted(sub.topics)))
        except BaseException:
            sub.close()
            raise
        sub.resume()  # events only after the reply, so the client sees them in order
        return None

    async def unsubscribe(request: Unsubscribe, ctx: RequestContext) -> Ack:
        ended = take_subscriptions(held_by(ctx), request.subscription)  # or not_found
        for sub in ended:
            hub.bus.unsubscribe(sub)
        return Ack(id=request.id, detail=f"subscription {request.subscription} ended")

    async def service_retry(request: ServiceRetry, ctx: RequestContext) -> Ack:
        detail = await hub.retry_service(request.service)
        return Ack(id=request.id, detail=detail)

    async def degraded_ack(request: DegradedAck, ctx: RequestContext) -> Ack:
        return Ack(id=request.id, detail=hub.acknowledge(request.service))

    dispatcher.register(Health, health)
    dispatcher.register(Metrics, metrics)
    dispatcher.register(Breakers, breakers)
    dispatcher.register(BreakerControl, breaker_control, admin=True)
    dispatcher.register(Subscribe, subscribe)
    dispatcher.register(Unsubscribe, unsubscribe)
    dispatcher.register(ServiceRetry, service_retry, admin=True)
    dispatcher.register(DegradedAck, degraded_ack, admin=True)
