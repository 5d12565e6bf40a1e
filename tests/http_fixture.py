"""A real HTTP server on 127.0.0.1 for the external-integration tests.

Runs the standard library's ``ThreadingHTTPServer`` in a thread, speaking
HTTP/1.1 with keep-alive (like a real endpoint, so the client's connection pool
is exercised). Tests steer it:

* ``set_mode("ok" | "fail" | "close" | "hang", times=None, status=500)``:
  answer normally; answer ``status`` (500 unless told); send the headers and part
  of the body, then close the connection mid-response; or hold the request
  without answering (until ``release_hangs()``, ``stop()`` or ``max_hang``
  seconds). ``times=n`` applies the mode to the next n requests only.
* ``go_away()`` closes the listening socket and every open connection (clients
  then get "connection refused"); ``come_back()`` listens on the same port again.

Endpoints: ``/reputation`` answers from ``reputation`` (sha256 -> verdict string
or a whole JSON object; unknown hashes get ``{"verdict": "unknown"}``) in the
JSON, GET ``?sha256=`` and MalwareBazaar form formats; ``/events`` receives
forwarded batches ``{"events": [...]}`` and records every event id
(``received_ids``, duplicates kept) and every batch, refusing with 400 a batch
that holds an event whose kind is in ``reject_kinds``.

Bounded: request bodies over ``max_body`` get 413; at most ``max_records``
batches are kept; a hang lasts at most ``max_hang`` seconds; the whole server
stops itself after ``lifetime`` seconds even if a test forgets to.
"""

from __future__ import annotations

import collections
import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["HttpFixture", "serve_http"]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fixture: HttpFixture

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Resets and broken pipes are what the tests inject; count, don't print.
        with self.fixture._lock:
            self.fixture.handler_errors += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fixture._track(self.connection, True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.fixture._track(self.connection, False)

    def do_GET(self) -> None:
        self._handle(b"")

    def do_POST(self) -> None:
        fixture = self.server.fixture
        length = int(self.headers.get("Content-Length") or 0)
        if length > fixture.max_body:
            self._send(413, {"error": "too large"})
            self.close_connection = True
            return
        self._handle(self.rfile.read(length) if length else b"")

    def _handle(self, body: bytes) -> None:
        fixture = self.server.fixture
        mode, status = fixture._next_mode(self.path, dict(self.headers.items()))
        if mode == "hang":
            fixture._hang()
            self.close_connection = True
            return
        if mode == "fail":
            self._send(status, {"error": f"injected {status}"})
            return
        if mode == "close":
            payload = b'{"verdict": "known_bad", "name": "truncated-' + b"x" * 200 + b'"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload[:20])
            self.wfile.flush()
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        path = urllib.parse.urlsplit(self.path)
        if path.path.startswith("/events"):
            self._events(body)
        elif path.path.startswith("/reputation"):
            self._reputation(path.query, body)
        else:
            self._send(404, {"error": "no such endpoint"})

    def _events(self, body: bytes) -> None:
        fixture = self.server.fixture
        try:
            batch = json.loads(body)
            events = batch["events"]
            ids = [str(e["id"]) for e in events]
            kinds = {str(e.get("kind")) for e in events}
        except (ValueError, KeyError, TypeError, AttributeError):
            self._send(400, {"error": "bad batch"})
            return
        if kinds & fixture.reject_kinds:
            with fixture._lock:
                fixture.rejected_batches += 1
            self._send(400, {"error": "event kind refused"})
            return
        fixture._record_batch(ids, batch)
        self._send(200, {"accepted": len(ids)})

    def _reputation(self, query: str, body: bytes) -> None:
        fixture = self.server.fixture
        sha = ""
        malwarebazaar = False
        if query:
            sha = urllib.parse.parse_qs(query).get("sha256", [""])[0]
        elif body.startswith(b"{"):
            with contextlib.suppress(ValueError, AttributeError):
                sha = str(json.loads(body).get("sha256", ""))
        elif body:
            form = urllib.parse.parse_qs(body.decode("latin-1"))
            sha = form.get("hash", [""])[0]
            malwarebazaar = form.get("query", [""])[0] == "get_info"
        with fixture._lock:
            fixture.lookups.append(sha)
            answer = fixture.reputation.get(sha.lower())
        if malwarebazaar:
            if answer is None or answer in ("unknown", "known_good"):
                self._send(200, {"query_status": "hash_not_found"})
            else:
                name = answer if isinstance(answer, str) else str(answer.get("name"))
                self._send(200, {"query_status": "ok", "data": [{"signature": name}]})
            return
        if answer is None:
            self._send(200, {"verdict": "unknown"})
        elif isinstance(answer, str):
            self._send(200, {"verdict": answer, "name": f"name-of-{answer}"})
        else:
            self._send(200, answer)

    def _send(self, status: int, obj: object) -> None:
        payload = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if status in (429, 503):
            self.send_header("Retry-After", "1")
        self.end_headers()
        self.wfile.write(payload)


class HttpFixture:
    """The steerable server (see the module docstring). Thread-safe."""

    host = "127.0.0.1"

    def __init__(
        self,
        *,
        max_body: int = 8 * 1024 * 1024,
        max_records: int = 10_000,
        max_hang: float = 5.0,
        lifetime: float = 120.0,
    ) -> None:
        self.max_body = max_body
        self.max_records = max_records
        self.max_hang = max_hang
        self._lock = threading.Lock()
        self._mode = "ok"
        self._status = 500
        self._times: int | None = None
        self._release = threading.Event()
        self._connections: set[socket.socket] = set()
        self.requests = 0
        self.handler_errors = 0
        self.requests_by_mode: collections.Counter[str] = collections.Counter()
        self.headers_seen: list[dict[str, str]] = []
        self.reputation: dict[str, str | dict[str, Any]] = {}
        self.lookups: list[str] = []
        self.received_ids: list[str] = []
        #: Batches holding an event of one of these kinds are refused with 400.
        self.reject_kinds: set[str] = set()
        self.rejected_batches = 0
        self.batches: list[dict[str, Any]] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self._stopped = False
        self._start()
        self._watchdog = threading.Timer(lifetime, self.stop)
        self._watchdog.daemon = True
        self._watchdog.start()

    # --- steering ---------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set_mode(self, mode: str, *, times: int | None = None, status: int = 500) -> None:
        if mode not in ("ok", "fail", "close", "hang"):
            raise ValueError(f"unknown mode {mode!r}")
        with self._lock:
            self._mode, self._times, self._status = mode, times, status
            if mode != "hang":
                self._release.set()
            else:
                self._release.clear()

    def release_hangs(self) -> None:
        self._release.set()

    def go_away(self) -> None:
        """Stop listening and cut every open connection: clients see ECONNREFUSED."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._release.set()
        with self._lock:
            conns = list(self._connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def come_back(self) -> None:
        if self._server is None and not self._stopped:
            self._start()

    def stop(self) -> None:
        self._stopped = True
        self._watchdog.cancel() if hasattr(self, "_watchdog") else None
        self.go_away()

    # --- what was received ---------------------------------------------------------

    def unique_ids(self) -> set[str]:
        with self._lock:
            return set(self.received_ids)

    def duplicates(self) -> int:
        with self._lock:
            return len(self.received_ids) - len(set(self.received_ids))

    # --- internals -----------------------------------------------------------------

    def _start(self) -> None:
        server = _Server((self.host, self.port), _Handler)
        server.fixture = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _next_mode(self, path: str, headers: dict[str, str]) -> tuple[str, int]:
        with self._lock:
            self.requests += 1
            if len(self.headers_seen) < self.max_records:
                self.headers_seen.append(headers)
            mode, status = self._mode, self._status
            if self._times is not None:
                self._times -= 1
                if self._times <= 0:
                    self._mode, self._times = "ok", None
            self.requests_by_mode[mode] += 1
            return mode, status

    def _hang(self) -> None:
        self._release.wait(self.max_hang)

    def _record_batch(self, ids: list[str], batch: dict[str, Any]) -> None:
        with self._lock:
            self.received_ids.extend(ids)
            if len(self.batches) < self.max_records:
                self.batches.append(batch)


@contextlib.contextmanager
def serve_http(**kwargs: Any) -> Iterator[HttpFixture]:
    """Start a :class:`HttpFixture`; stop it (and release any hang) on exit."""
    fixture = HttpFixture(**kwargs)
    try:
        yield fixture
    finally:
        fixture.stop()
