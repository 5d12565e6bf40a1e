"""Reputation lookup: what does an external service know about this sha256?

:meth:`ReputationClient.lookup` never raises for a network problem and never
takes longer than ``lookup_deadline`` (default 500 ms): it answers
``known_bad`` / ``known_good`` / ``unknown`` from the service or the cache, or
``unavailable`` with a ``reason`` when the service is down, slow, refusing, or
its breaker is open. The scan path treats ``known_bad`` like a blocking hash
policy and ``unavailable`` as "carry on, degraded, with a warning".

Inside the deadline each attempt is capped below it (``min(timeouts.total,
0.9 x deadline)``) so a hanging service ends in a *timeout* the breaker counts,
not only in a cancellation it cannot see. Between attempts, the external retry
policy (jittered backoff) and breaker apply; a retry whose wait would pass the
deadline is not started.

Answers are cached by sha256 in memory and in a JSON-lines file in the data
dir, so they survive restarts: definitive verdicts for ``cache_ttl``,
``unknown`` for the shorter ``unknown_ttl``, ``unavailable`` never. The cache
holds at most ``cache_max_entries`` (least recently used go first); the file is
rewritten once it holds twice that many lines. Concurrent lookups of one hash
share one request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import msgspec
import trio

from sentinel_ipc.errors import CircuitOpenError, ExternalServiceError, RetryGaveUpError
from sentinel_ipc.logs import log_event
from sentinel_ipc.resilience import BreakerConfig, CircuitBreaker, RetryPolicy, guarded_call

from ._http import (
    HttpAnswer,
    api_key_value,
    external_breaker,
    external_retry_policy,
    log_breaker_transition,
    make_client,
    open_service_nursery,
    send,
)
from .config import ReputationConfig
from .metrics import ExternalMetrics

__all__ = [
    "ReputationCache",
    "ReputationClient",
    "ReputationResult",
    "Verdict",
    "open_reputation_client",
    "parse_reputation_answer",
]

Verdict = Literal["known_bad", "known_good", "unknown", "unavailable"]
TARGET = "reputation"
CACHE_FILE = "reputation-cache.jsonl"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_IN_FLIGHT = 64


@dataclass(frozen=True, slots=True)
class ReputationResult:
    """One lookup's answer.

    ``verdict``: ``known_bad`` (block like a hash policy), ``known_good``,
    ``unknown``, or ``unavailable`` (no answer in time: carry on degraded;
    ``reason`` says why). ``name``: the service's name for the sample (e.g. a
    malware family). ``source``: which service answered. ``cached``: answered
    from the cache, no request made.
    """

    sha256: str
    verdict: Verdict
    name: str | None = None
    source: str = ""
    cached: bool = False
    reason: str | None = None

    @property
    def degraded(self) -> bool:
        return self.verdict == "unavailable"

    @property
    def blocks(self) -> bool:
        return self.verdict == "known_bad"

    @property
    def warning(self) -> str | None:
        """The verdict warning the scan path adds when the lookup was unavailable."""
        if self.verdict != "unavailable":
            return None
        return f"reputation lookup unavailable: {self.reason}"


# --- the on-disk cache ---------------------------------------------------------------


class _Entry(msgspec.Struct, array_like=True):
    sha256: str
    verdict: str
    name: str | None
    source: str
    expires: float  # wall-clock seconds


class ReputationCache:
    """sha256 -> answer with an expiry, bounded, persisted as JSON lines.

    Reads and ``put`` are in-memory (trio thread). :meth:`take_pending` (trio
    thread) hands the new lines, or a snapshot of every entry once the file has
    grown past twice the bound, to :meth:`write` (blocking: one worker thread at
    a time), so the worker never reads the dict the trio thread mutates. A lost
    tail (crash before the write) costs only repeat lookups.
    """

    def __init__(self, path: Path, *, max_entries: int, clock: Callable[[], float]) -> None:
        self.path = path
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: list[bytes] = []
        self._file_lines = 0
        self.hits = self.misses = 0

    def load(self) -> None:
        """Read the file (blocking); expired and malformed lines are skipped, and the
        file is rewritten when it holds much more than it should."""
        now = self._clock()
        lines = 0
        garbage = False
        try:
            with open(self.path, "rb") as fh:
                for raw in fh:
                    lines += 1
                    try:
                        entry = msgspec.json.decode(raw, type=_Entry)
                    except (msgspec.DecodeError, msgspec.ValidationError):
                        garbage = True
                        continue
                    if entry.expires <= now or not _SHA256.fullmatch(entry.sha256):
                        continue
                    self._entries[entry.sha256] = entry
                    self._entries.move_to_end(entry.sha256)
        except FileNotFoundError:
            pass
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        self._file_lines = lines
        if garbage or lines > 2 * max(len(self._entries), 1):
            self.rewrite()

    def get(self, sha256: str) -> _Entry | None:
        entry = self._entries.get(sha256)
        if entry is None:
            self.misses += 1
            return None
        if entry.expires <= self._clock():
            del self._entries[sha256]
            self.misses += 1
            return None
        self._entries.move_to_end(sha256)
        self.hits += 1
        return entry

    def put(self, sha256: str, verdict: str, name: str | None, source: str, ttl: float) -> None:
        if ttl <= 0:
            return
        entry = _Entry(sha256, verdict, name, source, self._clock() + ttl)
        self._entries[sha256] = entry
        self._entries.move_to_end(sha256)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if len(self._pending) < self.max_entries:
            self._pending.append(msgspec.json.encode(entry) + b"\n")

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def take_pending(self) -> tuple[bytes, list[_Entry] | None]:
        """(new lines, None), or (b"", every live entry) when the file should be rewritten."""
        lines = len(self._pending)
        data, self._pending = b"".join(self._pending), []
        if self._file_lines + lines > 2 * self.max_entries:
            return b"", list(self._entries.values())
        return data, None

    def write(self, data: bytes, snapshot: list[_Entry] | None) -> None:
        """Append ``data``, or rewrite the file from ``snapshot`` (blocking)."""
        if snapshot is not None:
            self.rewrite(snapshot)
        elif data:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            self._file_lines += data.count(b"\n")

    def rewrite(self, snapshot: list[_Entry] | None = None) -> None:
        """Replace the file with ``snapshot`` (default: the live entries; only from
        the thread that owns them) via temp file + rename (blocking)."""
        if snapshot is None:
            snapshot = list(self._entries.values())
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as fh:
            for entry in snapshot:
                fh.write(msgspec.json.encode(entry) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._file_lines = len(snapshot)


# --- parsing the service's answer ------------------------------------------------------

_BAD = frozenset({"known_bad", "malicious", "bad", "malware", "blacklisted", "blocklisted"})
_GOOD = frozenset({"known_good", "clean", "good", "benign", "whitelisted", "allowlisted"})
_UNKNOWN = frozenset({"unknown", "not_found", "hash_not_found", "no_results", "unrated"})


def parse_reputation_answer(status: int, body: bytes) -> tuple[Verdict, str | None]:
    """The verdict and name from an answer in the JSON or MalwareBazaar format.

    Raises :class:`ExternalServiceError` (not retryable) for an answer that says
    neither, so a misconfigured endpoint is reported, not read as "unknown".
    """
    if status == 404:
        return "unknown", None
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise _invalid(f"answer is not JSON: {body[:80]!r}") from exc
    if not isinstance(doc, dict):
        raise _invalid("answer is not a JSON object")
    if "query_status" in doc:  # MalwareBazaar
        query_status = str(doc.get("query_status"))
        if query_status == "ok":
            data = doc.get("data")
            first = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
            name = first.get("signature") or first.get("file_name")
            return "known_bad", str(name) if name else None
        if query_status in _UNKNOWN:
            return "unknown", None
        raise _invalid(f"MalwareBazaar query_status {query_status!r}")
    raw = doc.get("verdict", doc.get("status"))
    if not isinstance(raw, str):
        raise _invalid("answer has no verdict")
    verdict = raw.strip().lower()
    name = doc.get("name") or doc.get("signature") or doc.get("threat")
    name_text = str(name)[:200] if name else None
    if verdict in _BAD:
        return "known_bad", name_text
    if verdict in _GOOD:
        return "known_good", name_text
    if verdict in _UNKNOWN:
        return "unknown", None
    raise _invalid(f"unknown verdict {raw[:40]!r}")


def _check_answer(answer: HttpAnswer) -> None:
    parse_reputation_answer(answer.status, answer.body)


def _invalid(message: str) -> ExternalServiceError:
    return ExternalServiceError(
        f"reputation: {message}", target=TARGET, outcome="invalid_response", retryable=False
    )


# --- the client ------------------------------------------------------------------------


class _Flight:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: ReputationResult | None = None


class ReputationClient:
    """Asks the configured service about sha256s. Open with :func:`open_reputation_client`."""

    def __init__(
        self,
        config: ReputationConfig,
        client: httpx.AsyncClient,
        cache: ReputationCache,
        *,
        breaker: CircuitBreaker | None = None,
        breaker_config: BreakerConfig | None = None,
        retry: RetryPolicy | None = None,
        metrics: ExternalMetrics | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.cache = cache
        self.breaker = breaker or external_breaker("external.reputation", breaker_config)
        self.retry = retry or external_retry_policy()
        self.metrics = metrics or ExternalMetrics()
        self.source = urllib.parse.urlsplit(config.url).hostname or "reputation"
        self._inflight: dict[str, _Flight] = {}
        self._limiter = trio.CapacityLimiter(_MAX_IN_FLIGHT)
        self._cache_dirty = trio.Event()
        self.closed = False
        deadline = config.lookup_deadline
        total = config.timeouts.total
        self._attempt_timeout = 0.9 * deadline if total is None else min(total, 0.9 * deadline)

    async def lookup(self, sha256: str) -> ReputationResult:
        """The service's (or the cache's) verdict on ``sha256``, within the deadline.

        Never raises for network trouble (the verdict is ``unavailable`` with a
        reason); raises ``ValueError`` for a string that is not a sha256 in hex.
        """
        sha = sha256.strip().lower()
        if not _SHA256.fullmatch(sha):
            raise ValueError(f"not a sha256 hex digest: {sha256[:80]!r}")
        entry = self.cache.get(sha)
        if entry is not None:
            self.metrics.count_lookup("cache_hit")
            return ReputationResult(
                sha, _verdict(entry.verdict), entry.name, entry.source, cached=True
            )
        if self.closed:
            return self._unavailable(sha, "the reputation client is shut down")
        result: ReputationResult | None = None
        with trio.move_on_after(self.config.lookup_deadline):
            result = await self._lookup_uncached(sha)
        if result is None:
            self.metrics.count(TARGET, "deadline")
            result = self._unavailable(
                sha, f"no answer within {self.config.lookup_deadline * 1000:.0f} ms"
            )
        self.metrics.count_lookup(result.verdict)
        return result

    async def _lookup_uncached(self, sha: str) -> ReputationResult:
        """Single flight: the first caller for a hash asks; the others wait for its
        answer (each under its own deadline). If the asker was cancelled, a waiter
        with time left asks itself."""
        while True:
            flight = self._inflight.get(sha)
            if flight is None:
                break
            await flight.done.wait()
            if flight.result is not None:
                return flight.result
        flight = self._inflight[sha] = _Flight()
        try:
            async with self._limiter:
                flight.result = await self._ask(sha)
            return flight.result
        finally:
            del self._inflight[sha]
            flight.done.set()

    async def _ask(self, sha: str) -> ReputationResult:
        try:
            verdict, name = await guarded_call(
                self._fetch, sha, breaker=self.breaker, retry=self.retry, operation=TARGET
            )
        except CircuitOpenError as exc:
            self.metrics.count(TARGET, "circuit_open")
            wait = "" if exc.retry_after is None else f", next try in {exc.retry_after:.0f} s"
            return self._unavailable(sha, f"service marked down (breaker open{wait})")
        except RetryGaveUpError as exc:
            return self._unavailable(sha, str(exc.__cause__ or exc))
        except ExternalServiceError as exc:
            return self._unavailable(sha, exc.message)
        ttl = self.config.unknown_ttl if verdict == "unknown" else self.config.cache_ttl
        self.cache.put(sha, verdict, name, self.source, ttl)
        self._cache_dirty.set()
        return ReputationResult(sha, verdict, name, self.source)

    async def _fetch(self, sha: str) -> tuple[Verdict, str | None]:
        config = self.config
        common: dict[str, Any] = {
            "target": TARGET,
            "metrics": self.metrics,
            "total_timeout": self._attempt_timeout,
            "max_response_bytes": config.max_response_bytes,
            "accept": frozenset({404}),
            "check": _check_answer,
        }
        if config.format == "malwarebazaar":
            answer = await send(
                self.client, "POST", config.url, data={"query": "get_info", "hash": sha}, **common
            )
        elif config.method == "GET":
            answer = await send(self.client, "GET", config.url, params={"sha256": sha}, **common)
        else:
            answer = await send(
                self.client,
                "POST",
                config.url,
                content=msgspec.json.encode({"sha256": sha}),
                headers={"Content-Type": "application/json"},
                **common,
            )
        return parse_reputation_answer(answer.status, answer.body)

    def _unavailable(self, sha: str, reason: str) -> ReputationResult:
        return ReputationResult(sha, "unavailable", None, self.source, reason=reason)

    async def _persist_cache(self) -> None:
        """Background task: move new cache lines to disk in a worker thread."""
        while True:
            await self._cache_dirty.wait()
            self._cache_dirty = trio.Event()
            await self.flush_cache()
            await trio.sleep(0.5)  # coalesce bursts into one write

    async def flush_cache(self) -> None:
        data, snapshot = self.cache.take_pending()
        if not data and snapshot is None:
            return
        try:
            await trio.to_thread.run_sync(self.cache.write, data, snapshot)
        except OSError as exc:
            log_event("reputation_cache_write_failed", logging.WARNING, error=str(exc))


def _verdict(text: str) -> Verdict:
    if text in ("known_bad", "known_good", "unknown"):
        return text  # type: ignore[return-value]
    return "unknown"


@contextlib.asynccontextmanager
async def open_reputation_client(
    config: ReputationConfig,
    data_dir: str | os.PathLike[str],
    *,
    breaker: CircuitBreaker | None = None,
    breaker_config: BreakerConfig | None = None,
    retry: RetryPolicy | None = None,
    metrics: ExternalMetrics | None = None,
    wall_clock: Callable[[], float] = time.time,
) -> AsyncIterator[ReputationClient]:
    """Open the HTTP client and the on-disk cache; close both (cache flushed) on exit.

    ``breaker`` (a breaker of your own) or ``breaker_config`` (the numbers for
    the one built here), and ``retry``: default SPEC's external preset and
    :func:`~._http.external_retry_policy`."""
    directory = Path(data_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cache = ReputationCache(
        directory / CACHE_FILE, max_entries=config.cache_max_entries, clock=wall_clock
    )
    await trio.to_thread.run_sync(cache.load)
    headers = {"User-Agent": "sentinel-reputation/1", "Accept": "application/json"}
    key = api_key_value(config.api_key, config.api_key_env)
    if key:
        headers[config.api_key_header] = key
    http = make_client(
        timeouts=config.timeouts,
        verify_tls=config.verify_tls,
        ca_file=config.ca_file,
        headers=headers,
    )
    client = ReputationClient(
        config, http, cache, breaker=breaker, breaker_config=breaker_config, retry=retry,
        metrics=metrics,
    )
    client.breaker.add_listener(log_breaker_transition)
    try:
        async with http, open_service_nursery() as nursery:
            nursery.start_soon(client._persist_cache)
            log_event("reputation_enabled", logging.INFO, source=client.source,
                      cached=len(cache), deadline_ms=round(config.lookup_deadline * 1000))
            yield client
    finally:
        client.closed = True
        with trio.move_on_after(5) as scope:
            scope.shield = True
            await client.flush_cache()
