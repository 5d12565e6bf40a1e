"""The optional HTTP endpoint for scrapers: the h11 server on its own (bounds,
methods, keep-alive, a slow client) and against a real daemon (off by
default; /health, /health/live, /health/ready, /metrics)."""

from __future__ import annotations

import re
import socket
import time
from functools import partial
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from sentinel_ipc.observability.config import parse_listen_address
from sentinel_ipc.observability.http import HttpRequest, HttpResponse, serve_http


async def _ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse(200, b'{"ok": true}')


async def _boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("route bug")


ROUTES = {"/health": _ok, "/boom": _boom}


async def _client_get(port: int, path: str, method: str = "GET") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.request(method, f"http://127.0.0.1:{port}{path}")


async def test_routes_methods_and_errors() -> None:
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(partial(serve_http, "127.0.0.1", 0, ROUTES))
        assert host == "127.0.0.1" and port > 0
        r = await _client_get(port, "/health")
        assert r.status_code == 200 and r.json() == {"ok": True}
        assert r.headers["content-type"] == "application/json"
        assert (await _client_get(port, "/health/")).status_code == 200  # trailing slash
        assert (await _client_get(port, "/health?verbose=1")).status_code == 200
        head = await _client_get(port, "/health", "HEAD")
        assert head.status_code == 200 and head.content == b""
        assert (await _client_get(port, "/nope")).status_code == 404
        post = await _client_get(port, "/health", "POST")
        assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
        assert (await _client_get(port, "/boom")).status_code == 500
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(serve_http, "127.0.0.1", 0, ROUTES))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        await stream.send_all(request * 3)
        data = b""
        with trio.fail_after(5):
            while data.count(b'{"ok": true}') < 3:
                data += await stream.receive_some(65536)
        assert data.count(b"HTTP/1.1 200") == 3
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_garbage_and_oversized_heads_get_4xx_and_close() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(partial(serve_http, "127.0.0.1", 0, ROUTES))
        big_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
        for payload in (b"NOT HTTP AT ALL\r\n\r\n", big_head):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(payload)
            data = b""
            with trio.fail_after(5):
                try:
                    while chunk := await stream.receive_some(65536):
                        data += chunk
                except trio.BrokenResourceError:
                    pass  # closed with our unread bytes in its buffer: RST after the reply
            assert re.match(rb"HTTP/1.1 4\d\d", data), data[:100]
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_silent_client_is_dropped_after_the_request_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            partial(serve_http, "127.0.0.1", 0, ROUTES, request_timeout=10.0)
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /hea")  # and then nothing
        start = trio.current_time()
        assert await stream.receive_some(1024) == b""  # the server hung up
        assert trio.current_time() - start == pytest.approx(10.0, abs=0.5)
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_over_the_limit_are_closed_at_once() -> None:
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            partial(serve_http, "127.0.0.1", 0, ROUTES, max_connections=2)
        )
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        extra = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            assert await extra.receive_some(1024) == b""
        for s in held:
            await s.aclose()
        await extra.aclose()
        r = await _client_get(port, "/health")  # slots freed
        assert r.status_code == 200
        nursery.cancel_scope.cancel()


def test_listen_address_parsing() -> None:
    assert parse_listen_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen_address("[::1]:0") == ("::1", 0)
    assert parse_listen_address("localhost:80") == ("localhost", 80)
    for bad in ("9464", ":9464", "127.0.0.1:x", "127.0.0.1:70000", "example.com:80"):
        with pytest.raises(ValueError, match="http_listen"):
            parse_listen_address(bad)


# -- against a real daemon ------------------------------------------------------


def _http_port(daemon: Any, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"event=http_listening host=\S+ port=(\d+)", daemon.log())
        if match:
            return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError(f"no http_listening line in the log:\n{daemon.log()}")


def test_daemon_serves_health_and_metrics_over_http(daemon_factory: Any) -> None:
    d = daemon_factory(config={"http_listen": "127.0.0.1:0"})
    port = _http_port(d)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(trust_env=False, timeout=10) as client:
        live = client.get(f"{base}/health/live")
        assert live.status_code == 200
        assert live.json()["alive"] is True
        full = client.get(f"{base}/health")
        body = full.json()
        assert full.status_code == (503 if body["status"] == "unhealthy" else 200)
        assert {"ipc", "memory", "disk"} <= set(body["components"])
        ready = client.get(f"{base}/health/ready")
        assert ready.status_code == (200 if ready.json()["ready"] else 503)
        metrics = client.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        names = {f.name for f in text_string_to_metric_families(metrics.text)}
        assert {"sentinel_uptime_seconds", "sentinel_ipc_connections_active"} <= names
        om = client.get(f"{base}/metrics", headers={"Accept": "application/openmetrics-text"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.rstrip().endswith("# EOF")
    d.stop()


def test_http_endpoint_is_off_by_default(daemon_factory: Any) -> None:
    d = daemon_factory()
    assert "http_listening" not in d.log()
    d.stop()


def test_a_port_in_use_is_reported_and_the_daemon_still_serves(daemon_factory: Any) -> None:
    """An HTTP port someone else holds must not take the Unix socket down."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        d = daemon_factory(config={"http_listen": f"127.0.0.1:{port}"})
        deadline = time.monotonic() + 10
        while "http_listen_failed" not in d.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "http_listen_failed" in d.log()
        from daemon_harness import ping_once

        assert ping_once(d.socket_path)
        d.stop()
