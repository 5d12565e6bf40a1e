"""The HTTP edge shared by the integrations: client set-up and one request helper.

:func:`send` is the only place that touches httpx. It maps every httpx
exception and every unwelcome status code to :class:`ExternalServiceError`
(``raise ... from exc``, as httpcore does at its backend boundary), with the
``retryable`` flag the retry classifier and the breaker read:

===========================================  =========  =====================
what happened                                retryable  metric outcome
===========================================  =========  =====================
connect refused / reset / DNS / TLS failure  yes        ``connect_error``
connect, read, write, pool or total timeout  yes        ``timeout``
closed mid-response, malformed HTTP          yes        ``protocol_error``
5xx, 408, 429 (``Retry-After`` honoured)     yes        ``http_5xx`` / ``http_4xx``
other 4xx (bad request, auth, not found)     no         ``http_4xx``
answer larger than the caller's bound        no         ``invalid_response``
===========================================  =========  =====================

so the stock ``transient`` classifier and ``BREAKER_PRESETS["external"]``
(failure iff retryable) work unchanged: a 401 is our fault and never opens the
breaker; a 503 is the service's and does.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import math
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import httpx
import trio

from sentinel_ipc.errors import ExternalServiceError
from sentinel_ipc.logs import log_event
from sentinel_ipc.resilience import (
    BREAKER_PRESETS,
    RETRY_PRESETS,
    BreakerConfig,
    CircuitBreaker,
    RetryPolicy,
)
from sentinel_ipc.resilience.instruments import BreakerTransition

from .config import HttpTimeouts
from .metrics import ExternalMetrics

__all__ = [
    "HttpAnswer",
    "external_breaker",
    "external_retry_policy",
    "log_breaker_transition",
    "make_client",
    "open_service_nursery",
    "send",
]

_RETRYABLE_4XX = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    body: bytes
    headers: Mapping[str, str]


def external_breaker(name: str, config: BreakerConfig | None = None) -> CircuitBreaker:
    """A breaker on trio's clock, so ``guarded_call`` and ``statistics()`` agree.

    ``config``: the daemon's ``[resilience.breakers.external]``
    (``ResilienceConfig.breaker_config("external")``); without it, SPEC's
    external preset (3 failures, 60 s open, 2 successes)."""
    return CircuitBreaker(name, config or BREAKER_PRESETS["external"], clock=trio.current_time)


def external_retry_policy() -> RetryPolicy:
    """The retry policy of every external call: ``RETRY_PRESETS["external"]``
    (the network classifier: connection errors, timeouts, 5xx, 429, never
    other 4xx; 0.2 s, 0.4 s (x 1..1.25), at most 3 attempts or 30 s in all).
    The daemon passes ``ResilienceConfig.retry_policy("external")`` instead,
    which is this preset with ``[resilience.retries.external]``'s numbers."""
    return RETRY_PRESETS["external"]


def api_key_value(api_key: str, api_key_env: str) -> str:
    """The key from the environment variable if named and set, else the literal one."""
    if api_key_env:
        return os.environ.get(api_key_env, "") or api_key
    return api_key


def make_client(
    *,
    timeouts: HttpTimeouts,
    verify_tls: bool,
    ca_file: str | None,
    headers: Mapping[str, str],
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` (runs on trio). TLS verified unless told otherwise;
    a ``ca_file`` adds a private CA. Proxies and certificates are not read from
    the environment (``trust_env=False``): a daemon's behaviour should not depend
    on whoever started it."""
    verify: ssl.SSLContext | bool
    if not verify_tls:
        verify = False
    elif ca_file:
        verify = ssl.create_default_context(cafile=ca_file)
    else:
        verify = True
    timeout = httpx.Timeout(
        connect=timeouts.connect,
        read=timeouts.read,
        write=timeouts.read,
        pool=timeouts.connect,
    )
    return httpx.AsyncClient(
        verify=verify,
        timeout=timeout,
        headers=dict(headers),
        limits=httpx.Limits(max_connections=16, max_keepalive_connections=4, keepalive_expiry=30),
        follow_redirects=False,
        trust_env=False,
    )


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    target: str,
    metrics: ExternalMetrics,
    total_timeout: float | None,
    max_response_bytes: int,
    content: bytes | None = None,
    data: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    accept: frozenset[int] = frozenset(),
    check: Callable[[HttpAnswer], object] | None = None,
) -> HttpAnswer:
    """One HTTP request: 2xx (or a status in ``accept``) returns the answer; anything
    else raises :class:`ExternalServiceError` (see the module table). ``check``
    may reject a well-formed answer whose content is unusable by raising
    ``ExternalServiceError`` itself. Every call is counted in ``metrics`` with
    its outcome and duration (real seconds)."""
    started = time.perf_counter()
    outcome = "ok"
    try:
        answer = await _send(
            client,
            method,
            url,
            target=target,
            total_timeout=total_timeout,
            max_response_bytes=max_response_bytes,
            content=content,
            data=data,
            params=params,
            headers=headers,
        )
        if not (200 <= answer.status < 300 or answer.status in accept):
            raise _status_error(target, answer)
        if check is not None:
            check(answer)
        return answer
    except ExternalServiceError as exc:
        outcome = exc.outcome
        raise
    except BaseException:
        outcome = "cancelled"
        raise
    finally:
        if outcome != "cancelled":
            metrics.observe(target, outcome, time.perf_counter() - started)


async def _send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    target: str,
    total_timeout: float | None,
    max_response_bytes: int,
    content: bytes | None,
    data: Mapping[str, str] | None,
    params: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
) -> HttpAnswer:
    limit = math.inf if total_timeout is None else total_timeout
    try:
        with trio.fail_after(limit):
            async with client.stream(
                method,
                url,
                content=content,
                data=data,
                params=params,
                headers=headers,
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > max_response_bytes:
                        raise ExternalServiceError(
                            f"{target}: answer larger than {max_response_bytes} bytes",
                            target=target,
                            outcome="invalid_response",
                            status=response.status_code,
                            retryable=False,
                        )
                    chunks.append(chunk)
                return HttpAnswer(response.status_code, b"".join(chunks), response.headers)
    except trio.TooSlowError as exc:
        raise ExternalServiceError(
            f"{target}: no complete answer within {total_timeout:g} s",
            target=target,
            outcome="timeout",
            retryable=True,
        ) from exc
    except httpx.TimeoutException as exc:
        raise ExternalServiceError(
            f"{target}: {_timeout_kind(exc)} timed out",
            target=target,
            outcome="timeout",
            retryable=True,
        ) from exc
    except (httpx.ConnectError, httpx.ProxyError) as exc:
        raise ExternalServiceError(
            f"{target}: cannot connect: {exc or type(exc).__name__}",
            target=target,
            outcome="connect_error",
            retryable=True,
        ) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError) as exc:
        raise ExternalServiceError(
            f"{target}: connection broke mid-exchange: {exc or type(exc).__name__}",
            target=target,
            outcome="protocol_error",
            retryable=True,
        ) from exc
    except httpx.HTTPError as exc:
        # Bad URL, unsupported protocol, decoding errors: retrying cannot help.
        raise ExternalServiceError(
            f"{target}: request failed: {type(exc).__name__}: {exc}",
            target=target,
            outcome="protocol_error",
            retryable=False,
        ) from exc


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    return {
        httpx.ConnectTimeout: "connect",
        httpx.ReadTimeout: "read",
        httpx.WriteTimeout: "write",
        httpx.PoolTimeout: "waiting for a pooled connection",
    }.get(type(exc), "request")


def _status_error(target: str, answer: HttpAnswer) -> ExternalServiceError:
    status = answer.status
    retry_after = parse_retry_after(answer.headers.get("retry-after"))
    if status >= 500:
        return ExternalServiceError(
            f"{target}: server error {status}",
            target=target,
            outcome="http_5xx",
            status=status,
            retryable=True,
            retry_after=retry_after,
        )
    retryable = status in _RETRYABLE_4XX
    return ExternalServiceError(
        f"{target}: refused with {status}" + ("" if retryable else " (not retried)"),
        target=target,
        outcome="http_4xx",
        status=status,
        retryable=retryable,
        retry_after=retry_after if retryable else None,
    )


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """``Retry-After``: delta-seconds or an HTTP date; None when absent or unparsable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def log_breaker_transition(record: BreakerTransition) -> None:
    """Breaker listener: one log line per transition of an external breaker."""
    log_event(
        "breaker_transition",
        logging.INFO if record.to_state == "closed" else logging.WARNING,
        breaker=record.breaker,
        old=str(record.from_state),
        new=str(record.to_state),
        reason=record.reason,
    )


@contextlib.asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for a service's background tasks, cancelled when the body ends.

    An exception raised by the body comes out as itself rather than wrapped in
    an ``ExceptionGroup`` (trio's strict nurseries wrap it), so a caller's
    ``except ValueError`` still works around ``async with open_...():``.
    """
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_error is not None and list(group.exceptions) == [body_error]:
            raise body_error from body_error.__cause__
        raise
