"""Event forwarding: detections, quarantines, policy and degraded-mode changes,
POSTed as JSON batches to a SIEM or webhook, surviving network outages.

Theory of operation
-------------------

:meth:`EventForwarder.emit` is synchronous and never blocks or raises: it
stages the event in the :class:`~.outbox.Outbox` (memory only) and wakes two
background tasks.

* The **writer** does group commits: everything staged since its last turn is
  written and fsynced in one worker-thread call, then waiters of
  :meth:`~EventForwarder.flush` are released. A failed write (disk full) keeps
  the records staged and is retried with a capped backoff; the outbox's health
  shows the error meanwhile. It also compacts the log when it is mostly dead.
* The **sender** takes the oldest pending events (``batch_size`` /
  ``batch_max_bytes``), POSTs ``{"events": [...], "dropped_total": n}`` through
  ``guarded_call`` (external breaker + retry policy), and acknowledges them in
  the outbox only after a 2xx. Batches go strictly one after another, so the
  receiver sees events in order; a crash between the POST and the
  acknowledgement's fsync re-sends them (at least once; deduplicate by ``id``).
  When a round fails (retries spent, breaker open) the sender waits with an
  exponential, jittered backoff (``backoff_initial`` .. ``backoff_max``; at
  least the breaker's ``retry_after``) and tries again, forever: events wait in
  the outbox meanwhile, bounded by its limits.

A receiver that refuses a batch with 400/413/422 is asked again with smaller
batches until the one refused event is isolated; that event is *rejected*
(removed, counted, logged with its id). Other 4xx (401, 403, 404) mean the
configuration is wrong: nothing is removed, the sender backs off as for an
outage, and health shows the status.

Events dropped because the outbox was full are logged, counted in the outbox's
totals (``sentinel_outbox_events_removed_total{outcome="dropped"}``) and announced to
the receiver in every batch's ``dropped_total``; never silent.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio

from sentinel_ipc.errors import CircuitOpenError, ExternalServiceError, RetryGaveUpError
from sentinel_ipc.logs import log_event
from sentinel_ipc.resilience import (
    BreakerConfig,
    BreakerState,
    BreakerTransition,
    CircuitBreaker,
    RetryPolicy,
    guarded_call,
)
from sentinel_ipc.resilience.classifiers import transient
from sentinel_ipc.resilience.retry import RandomSource

from ._http import (
    api_key_value,
    external_breaker,
    external_retry_policy,
    log_breaker_transition,
    make_client,
    open_service_nursery,
    send,
)
from .config import ForwardConfig
from .metrics import ExternalMetrics
from .outbox import Outbox, OutboxEvent, OutboxStatistics, Priority

__all__ = ["EventForwarder", "ForwarderStatistics", "open_event_forwarder"]

TARGET = "forward"
_SPLIT_STATUSES = frozenset({400, 413, 422})
_HOST = socket.gethostname()


@dataclass(frozen=True, slots=True)
class ForwarderStatistics:
    outbox: OutboxStatistics
    breaker_state: str
    batches_sent: int
    consecutive_failures: int
    last_error: str | None
    next_attempt_in: float | None  # seconds until the sender tries again, if backing off


def _enc_hook(obj: Any) -> Any:
    """Anything a caller puts in a payload becomes JSON: unknown types as their str()."""
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


_JSON = msgspec.json.Encoder(enc_hook=_enc_hook)


class EventForwarder:
    """Durable, ordered, at-least-once event delivery. Open with :func:`open_event_forwarder`."""

    def __init__(
        self,
        config: ForwardConfig,
        outbox: Outbox,
        client: httpx.AsyncClient,
        *,
        breaker: CircuitBreaker | None = None,
        breaker_config: BreakerConfig | None = None,
        retry: RetryPolicy | None = None,
        metrics: ExternalMetrics | None = None,
        rng: RandomSource | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.client = client
        self.breaker = breaker or external_breaker("external.forward", breaker_config)
        self.retry = retry or external_retry_policy()
        self.metrics = metrics or ExternalMetrics()
        self._rng: RandomSource = rng or random.Random()
        self._wall = wall_clock
        # The wait between failed rounds: the retry policy's formula, as a value.
        self._round_backoff = RetryPolicy(
            on=transient,
            attempts=1_000_000,
            initial=config.backoff_initial,
            max_delay=config.backoff_max,
            multiplier=2.0,
            jitter=0.5,
        )
        self._stage_wake = trio.Event()
        self._send_wake = trio.Event()
        self._retry_wake = trio.Event()
        self._synced = trio.Event()
        self._staged_gen = 0
        self._synced_gen = 0
        self._batch_limit = config.batch_size
        self._batches_sent = 0
        self._failures = 0
        self._last_error: str | None = None
        self._backoff_until: float | None = None
        self._idle = trio.Event()
        self.breaker.add_listener(self._on_breaker_transition)

    # --- the producer side --------------------------------------------------------------

    def emit(
        self,
        kind: str,
        priority: Priority | str | int = Priority.NORMAL,
        payload: Mapping[str, Any] | None = None,
    ) -> str | None:
        """Queue an event; returns its id, or None if it was refused or dropped
        (too large; or the outbox is full of higher-priority events). Never
        blocks, never raises for the payload: unknown types are sent as strings.

        ``kind``: e.g. ``detection``, ``quarantine``, ``policy_change``,
        ``degraded_mode``. ``priority``: ``low`` events are dropped first when
        the outbox is full, ``high`` ones last.
        """
        if self.outbox.closed:
            log_event("forward_emit_after_close", logging.WARNING, kind=kind)
            return None
        try:
            prio = Priority.parse(priority)
        except ValueError:
            prio = Priority.NORMAL
        now = self._wall()
        body = _JSON.encode(
            {
                "kind": str(kind),
                "priority": prio.name.lower(),
                "time": _rfc3339(now),
                "host": _HOST,
                "source": "sentinel",
                "payload": dict(payload or {}),
            }
        )
        event, dropped = self.outbox.append(str(kind), prio, body, now)
        if event is None and not dropped:
            log_event("outbox_event_refused", logging.WARNING, kind=kind, bytes=len(body),
                      max_bytes=self.config.max_event_bytes)
        if dropped:
            stats = self.outbox.statistics(now)
            log_event(
                "outbox_full_dropped",
                logging.WARNING,
                dropped=len(dropped),
                dropped_ids=",".join(e.id for e in dropped[:5]),
                kinds=",".join(sorted({e.kind for e in dropped})),
                dropped_total=stats.dropped_total,
                pending=stats.pending,
            )
        self._staged_gen += 1
        self._stage_wake.set()
        if event is not None:
            if self._idle.is_set():
                self._idle = trio.Event()
            return event.id
        return None

    async def flush(self) -> None:
        """Wait until every event emitted so far is written and fsynced."""
        target = self._staged_gen
        while self._synced_gen < target and not self.outbox.closed:
            self._stage_wake.set()
            await self._synced.wait()

    async def wait_delivered(self) -> None:
        """Wait until the outbox is empty (everything delivered, dropped or rejected)."""
        while len(self.outbox):
            await self._idle.wait()

    def retry_now(self) -> None:
        """Cut the current backoff short ("Retry Connection"); the breaker still decides."""
        self._retry_wake.set()

    def _on_breaker_transition(self, record: BreakerTransition) -> None:
        # Half-open (timeout elapsed, or "Retry Connection" pressed) or reset by
        # hand: the next trial may go now rather than at the end of the backoff.
        if record.to_state in (BreakerState.HALF_OPEN, BreakerState.CLOSED):
            self._retry_wake.set()

    def statistics(self, *, now: float | None = None) -> ForwarderStatistics:
        wall = self._wall() if now is None else now
        next_in = None
        if self._backoff_until is not None:
            next_in = max(0.0, self._backoff_until - trio.current_time())
        return ForwarderStatistics(
            outbox=self.outbox.statistics(wall),
            breaker_state=str(self.breaker.statistics().state),
            batches_sent=self._batches_sent,
            consecutive_failures=self._failures,
            last_error=self._last_error,
            next_attempt_in=next_in,
        )

    # --- background tasks -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the writer and the sender until cancelled."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer)
            nursery.start_soon(self._sender)
            task_status.started()

    async def _writer(self) -> None:
        failures = 0
        while True:
            await self._stage_wake.wait()
            self._stage_wake = trio.Event()
            gen = self._staged_gen
            staged = self.outbox.take_staged()
            if staged is not None:
                try:
                    await trio.to_thread.run_sync(self.outbox.write, staged)
                except BaseException as exc:
                    if not isinstance(exc, OSError):
                        # Cancelled before the thread started: keep the records for
                        # the final flush at close.
                        self.outbox.unstage(staged)
                        raise
                    self.outbox.unstage(staged)
                    failures += 1
                    delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                    log_event("outbox_write_failed", logging.ERROR, error=str(exc),
                              retry_in=round(delay, 1), unsynced=self.outbox.statistics(0).unsynced)
                    self._stage_wake.set()
                    await trio.sleep(delay)
                    continue
                failures = 0
                self._send_wake.set()  # newly durable events may be delivered
            self._synced_gen = max(self._synced_gen, gen)
            self._synced.set()
            self._synced = trio.Event()
            if self.outbox.needs_compaction():
                plan = self.outbox.plan_compaction()
                if plan is not None:
                    try:
                        await trio.to_thread.run_sync(self.outbox.compact, plan)
                    except OSError as exc:
                        log_event("outbox_compaction_failed", logging.WARNING, error=str(exc))

    async def _sender(self) -> None:
        while True:
            batch = self.outbox.batch(self._batch_limit, self.config.batch_max_bytes)
            if not batch:
                if not len(self.outbox):
                    self._idle.set()
                await self._send_wake.wait()
                self._send_wake = trio.Event()
                continue
            delay = await self._deliver(batch)
            if delay is not None:
                await self._back_off(delay)

    async def _deliver(self, batch: list[OutboxEvent]) -> float | None:
        """One round: deliver ``batch``; returns how long to back off, or None."""
        try:
            await guarded_call(
                self._post, batch, breaker=self.breaker, retry=self.retry, operation=TARGET
            )
        except CircuitOpenError as exc:
            self.metrics.count(TARGET, "circuit_open")
            return self._failed(str(exc), minimum=exc.retry_after or 0.0)
        except RetryGaveUpError as exc:
            return self._failed(str(exc.__cause__ or exc), minimum=exc.retry_after or 0.0)
        except ExternalServiceError as exc:
            if exc.status in _SPLIT_STATUSES:
                self._refused(batch, exc)
                return None
            return self._failed(exc.message)
        self.outbox.mark_delivered(e.seq for e in batch)
        self._stage_wake.set()
        self._retry_wake = trio.Event()  # a wake-up meant for a backoff that is over
        self._batches_sent += 1
        if self._failures:
            log_event("forward_recovered", logging.INFO, after_failures=self._failures,
                      pending=len(self.outbox))
        self._failures = 0
        self._last_error = None
        self._batch_limit = min(self.config.batch_size, self._batch_limit * 2)
        return None

    def _failed(self, error: str, *, minimum: float = 0.0) -> float:
        self._failures += 1
        self._last_error = error
        # The policy's jitter multiplies its capped ceiling; clamp again so
        # ``backoff_max`` stays the longest wait the operator configured.
        delay = min(self._round_backoff.delay(self._failures, self._rng), self.config.backoff_max)
        if minimum > delay:
            delay = minimum * (1.0 + 0.1 * self._rng.random())
        if self._failures == 1 or self._failures % 10 == 0:
            log_event("forward_failed", logging.WARNING, error=error,
                      failures=self._failures, retry_in=round(delay, 2),
                      pending=len(self.outbox))
        return delay

    def _refused(self, batch: list[OutboxEvent], exc: ExternalServiceError) -> None:
        if len(batch) > 1:
            self._batch_limit = max(1, len(batch) // 2)
            return
        event = batch[0]
        self.outbox.mark_rejected([event.seq])
        self._stage_wake.set()
        log_event("forward_event_rejected", logging.ERROR, id=event.id, kind=event.kind,
                  status=exc.status, error=exc.message)

    async def _back_off(self, delay: float) -> None:
        self._backoff_until = trio.current_time() + delay
        try:
            with trio.move_on_after(delay):
                await self._retry_wake.wait()
        finally:
            self._backoff_until = None
            self._retry_wake = trio.Event()

    async def _post(self, batch: list[OutboxEvent]) -> None:
        dropped = self.outbox.statistics(0).dropped_total
        content = b"".join(
            (
                b'{"events":[',
                b",".join(e.body for e in batch),
                b'],"sent_at":',
                _JSON.encode(_rfc3339(self._wall())),
                b',"dropped_total":',
                str(dropped).encode(),
                b"}",
            )
        )
        await send(
            self.client,
            "POST",
            self.config.url,
            target=TARGET,
            metrics=self.metrics,
            total_timeout=self.config.timeouts.total,
            # The answer is not read for meaning; the bound only keeps memory finite.
            max_response_bytes=1024 * 1024,
            content=content,
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": f"{batch[0].id}..{batch[-1].seq}",
            },
        )


def _rfc3339(ts: float) -> str:
    return (
        datetime.datetime.fromtimestamp(ts, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@contextlib.asynccontextmanager
async def open_event_forwarder(
    config: ForwardConfig,
    data_dir: str | os.PathLike[str],
    *,
    breaker: CircuitBreaker | None = None,
    breaker_config: BreakerConfig | None = None,
    retry: RetryPolicy | None = None,
    metrics: ExternalMetrics | None = None,
    rng: RandomSource | None = None,
    wall_clock: Callable[[], float] = time.time,
    compact_min_bytes: int = 4 * 1024 * 1024,
) -> AsyncIterator[EventForwarder]:
    """Open the outbox (``<data_dir>/<config.outbox_dir>``) and the HTTP client, run
    the writer and sender; on exit stop them, write what is staged, close.

    Events still pending at exit stay in the outbox for the next start.
    ``breaker`` (a breaker of your own) or ``breaker_config`` (the numbers for the
    one built here), and ``retry``: default SPEC's external preset and
    :func:`~._http.external_retry_policy`.
    Raises :class:`~.outbox.OutboxLockedError` if another process holds the outbox.
    """
    directory = Path(data_dir) / config.outbox_dir
    outbox = await trio.to_thread.run_sync(
        lambda: Outbox.open(
            directory,
            max_events=config.outbox_max_events,
            max_bytes=config.outbox_max_bytes,
            max_event_bytes=config.max_event_bytes,
            compact_min_bytes=compact_min_bytes,
        )
    )
    try:
        headers = {"User-Agent": "sentinel-forwarder/1"}
        key = api_key_value(config.api_key, config.api_key_env)
        if key:
            headers[config.api_key_header] = key
        http = make_client(
            timeouts=config.timeouts,
            verify_tls=config.verify_tls,
            ca_file=config.ca_file,
            headers=headers,
        )
        forwarder = EventForwarder(
            config,
            outbox,
            http,
            breaker=breaker,
            breaker_config=breaker_config,
            retry=retry,
            metrics=metrics,
            rng=rng,
            wall_clock=wall_clock,
        )
        forwarder.breaker.add_listener(log_breaker_transition)
        stats = outbox.statistics(wall_clock())
        log_event(
            "forwarder_started",
            logging.INFO,
            pending=stats.pending,
            dropped_total=stats.dropped_total,
            truncated_bytes=stats.replay_truncated_bytes,
        )
        async with http, open_service_nursery() as nursery:
            await nursery.start(forwarder.run)
            yield forwarder
    finally:
        with trio.move_on_after(10) as scope:
            scope.shield = True
            try:
                await trio.to_thread.run_sync(outbox.flush)
            except OSError as exc:
                log_event("outbox_flush_failed", logging.ERROR, error=str(exc),
                          unsynced=outbox.statistics(0).unsynced)
        outbox.close()
