"""Reputation lookup against a real HTTP server on 127.0.0.1: verdicts, the
on-disk cache across restarts, the deadline when the service hangs or is gone
(SPEC "network timeout"), the breaker opening and closing, single flight."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from http_fixture import HttpFixture, serve_http

from sentinel_ipc.errors import ExternalServiceError
from sentinel_ipc.external import ReputationConfig, open_reputation_client
from sentinel_ipc.external.config import LookupTimeouts
from sentinel_ipc.external.reputation import (
    CACHE_FILE,
    ReputationCache,
    parse_reputation_answer,
)
from sentinel_ipc.messages import BreakerInfo
from sentinel_ipc.resilience import BreakerState


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def server() -> Iterator[HttpFixture]:
    with serve_http(max_hang=5.0) as fixture:
        yield fixture


def config(server: HttpFixture, **kw: object) -> ReputationConfig:
    base: dict[str, object] = {"url": server.url + "/reputation"}
    base.update(kw)
    return ReputationConfig(**base)  # type: ignore[arg-type]


async def test_known_bad_is_reported_with_its_name_then_served_from_cache(
    server: HttpFixture, tmp_path: Path
) -> None:
    bad = sha("eicar")
    server.reputation[bad] = {"verdict": "malicious", "name": "EICAR-Test-File"}
    async with open_reputation_client(config(server), tmp_path) as client:
        first = await client.lookup(bad.upper())  # case does not matter
        assert (first.verdict, first.name, first.cached) == ("known_bad", "EICAR-Test-File", False)
        assert first.blocks and not first.degraded and first.source == "127.0.0.1"
        second = await client.lookup(bad)
        assert second.verdict == "known_bad" and second.cached
        assert server.lookups == [bad]  # the second answer cost no request
        good = await client.lookup(sha("good"))
        assert good.verdict == "unknown"
        stats = client.metrics.statistics()
        assert stats.requests_for("reputation", "ok") == 2
        assert stats.lookups["cache_hit"] == 1 and stats.lookups["known_bad"] == 1


async def test_cache_survives_a_restart_and_expires_by_ttl(
    server: HttpFixture, tmp_path: Path
) -> None:
    wall = [1_000_000.0]
    bad, unknown = sha("bad"), sha("never-seen")
    server.reputation[bad] = "known_bad"
    cfg = config(server, cache_ttl=3600.0, unknown_ttl=60.0)
    async with open_reputation_client(cfg, tmp_path, wall_clock=lambda: wall[0]) as client:
        assert (await client.lookup(bad)).verdict == "known_bad"
        assert (await client.lookup(unknown)).verdict == "unknown"
    assert (tmp_path / CACHE_FILE).stat().st_size > 0
    server.go_away()  # answers must now come from the file alone
    async with open_reputation_client(cfg, tmp_path, wall_clock=lambda: wall[0]) as client:
        again = await client.lookup(bad)
        assert (again.verdict, again.cached, again.name) == ("known_bad", True, "name-of-known_bad")
        assert (await client.lookup(unknown)).cached
        wall[0] += 120.0  # past unknown_ttl, within cache_ttl
        assert (await client.lookup(bad)).cached
        expired = await client.lookup(unknown)
        assert expired.verdict == "unavailable" and not expired.cached


async def test_hanging_service_gives_up_within_the_deadline(
    server: HttpFixture, tmp_path: Path
) -> None:
    """SPEC "network timeout": the service accepts and never answers. The lookup
    comes back `unavailable` with a reason within its deadline (real time)."""
    server.set_mode("hang")
    cfg = config(server, lookup_deadline=0.3, timeouts=LookupTimeouts(connect=1, read=1, total=1))
    async with open_reputation_client(cfg, tmp_path) as client:
        started = time.monotonic()
        result = await client.lookup(sha("slow"))
        elapsed = time.monotonic() - started
        assert result.verdict == "unavailable" and result.degraded and not result.blocks
        assert "within" in (result.reason or ""), result.reason
        assert result.warning and result.warning.startswith("reputation lookup unavailable")
        assert elapsed < 0.3 + 0.25, elapsed
        assert server.requests >= 1
        server.release_hangs()


async def test_service_down_gives_unavailable_fast_and_is_not_cached(
    server: HttpFixture, tmp_path: Path
) -> None:
    server.go_away()
    async with open_reputation_client(config(server), tmp_path) as client:
        started = time.monotonic()
        result = await client.lookup(sha("x"))
        assert time.monotonic() - started < 0.5 + 0.25
        assert result.verdict == "unavailable" and "connect" in (result.reason or "")
        server.come_back()
        server.reputation[sha("x")] = "known_good"
        assert (await client.lookup(sha("x"))).verdict == "known_good"


def test_breaker_opens_after_failures_and_closes_after_recovery(
    server: HttpFixture, tmp_path: Path
) -> None:
    """500s open the external breaker (3 failures); while open no request is
    made; after the 60 s open timeout two successful trials close it. The
    clock advances at real speed except for one jump over the open timeout."""
    clock = trio.testing.MockClock(rate=1.0)
    transitions: list[tuple[str, str]] = []

    async def main() -> None:
        server.set_mode("fail", status=503)
        async with open_reputation_client(config(server), tmp_path) as client:
            client.breaker.add_listener(
                lambda t: transitions.append((str(t.from_state), str(t.to_state)))
            )
            for i in range(3):
                result = await client.lookup(sha(f"a{i}"))
                assert result.verdict == "unavailable"
            assert client.breaker.state is BreakerState.OPEN
            made = server.requests
            refused = await client.lookup(sha("while-open"))
            assert refused.verdict == "unavailable" and "breaker open" in (refused.reason or "")
            assert server.requests == made  # the open breaker spared the service
            server.set_mode("ok")
            clock.jump(61.0)
            for i in range(2):
                assert (await client.lookup(sha(f"b{i}"))).verdict == "unknown"
            assert client.breaker.statistics().state is BreakerState.CLOSED
            stats = client.metrics.statistics()
            assert stats.requests_for("reputation", "http_5xx") >= 3
            assert stats.requests_for("reputation", "circuit_open") >= 1

    trio.run(main, clock=clock)
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_connection_closed_mid_answer_is_retried_within_the_deadline(
    server: HttpFixture, tmp_path: Path
) -> None:
    server.reputation[sha("r")] = "known_bad"
    server.set_mode("close", times=1)
    async with open_reputation_client(config(server, lookup_deadline=2.0), tmp_path) as client:
        result = await client.lookup(sha("r"))
    assert result.verdict == "known_bad"
    assert server.requests_by_mode["close"] == 1 and server.requests_by_mode["ok"] == 1
    assert client.metrics.statistics().requests_for("reputation", "protocol_error") == 1


async def test_concurrent_lookups_of_one_hash_share_one_request(
    server: HttpFixture, tmp_path: Path
) -> None:
    results = []
    async with open_reputation_client(config(server), tmp_path) as client:

        async def one() -> None:
            results.append(await client.lookup(sha("same")))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
    assert len(results) == 8 and {r.verdict for r in results} == {"unknown"}
    assert server.lookups == [sha("same")]


async def test_malwarebazaar_format_and_api_key_header(
    server: HttpFixture, tmp_path: Path
) -> None:
    server.reputation[sha("mb")] = "Emotet"
    cfg = config(server, format="malwarebazaar", api_key="s3cret", api_key_header="Auth-Key")
    async with open_reputation_client(cfg, tmp_path) as client:
        hit = await client.lookup(sha("mb"))
        miss = await client.lookup(sha("other"))
    assert (hit.verdict, hit.name) == ("known_bad", "Emotet")
    assert miss.verdict == "unknown"
    assert all(h.get("Auth-Key") == "s3cret" for h in server.headers_seen)


async def test_get_method_and_invalid_answers_do_not_open_the_breaker(
    server: HttpFixture, tmp_path: Path
) -> None:
    server.reputation[sha("g")] = "known_good"
    server.reputation[sha("junk")] = {"something": "else"}
    async with open_reputation_client(config(server, method="GET"), tmp_path) as client:
        assert (await client.lookup(sha("g"))).verdict == "known_good"
        for _ in range(4):
            junk = await client.lookup(sha("junk"))
            assert junk.verdict == "unavailable" and "no verdict" in (junk.reason or "")
        # Our side misreads the answer: not the service's outage, so no trip.
        assert client.breaker.state is BreakerState.CLOSED
        stats = client.metrics.statistics()
        assert stats.requests_for("reputation", "invalid_response") == 4
        assert stats.requests_for("reputation", "ok") == 1
    after = await client.lookup(sha("late"))  # after close: an answer, not a crash
    assert after.verdict == "unavailable" and "shut down" in (after.reason or "")
    with pytest.raises(ValueError, match="sha256"):
        async with open_reputation_client(config(server), tmp_path) as client:
            await client.lookup("not-a-hash")


def test_cache_is_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    wall = [100.0]
    cache = ReputationCache(tmp_path / CACHE_FILE, max_entries=10, clock=lambda: wall[0])
    cache.load()
    for i in range(55):
        cache.put(sha(str(i)), "known_bad", f"n{i}", "src", ttl=60.0)
        if i % 5 == 4:
            cache.write(*cache.take_pending())
    assert len(cache) == 10
    lines = (tmp_path / CACHE_FILE).read_bytes().count(b"\n")
    assert lines <= 2 * 10 + 5  # rewritten whenever it passed twice the bound
    assert cache.get(sha("54")) is not None and cache.get(sha("0")) is None
    with (tmp_path / CACHE_FILE).open("ab") as fh:
        fh.write(b"garbage line\n")
    wall[0] += 30.0
    again = ReputationCache(tmp_path / CACHE_FILE, max_entries=10, clock=lambda: wall[0])
    again.load()  # skips garbage, keeps the newest 10, rewrites the file
    assert len(again) == 10 and again.get(sha("54")) is not None
    assert b"garbage" not in (tmp_path / CACHE_FILE).read_bytes()
    wall[0] += 31.0  # past the TTL
    assert again.get(sha("54")) is None


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, b'{"verdict": "known_bad", "name": "X"}', ("known_bad", "X")),
        (200, b'{"verdict": "Malicious", "signature": "Y"}', ("known_bad", "Y")),
        (200, b'{"verdict": "clean"}', ("known_good", None)),
        (200, b'{"status": "unknown"}', ("unknown", None)),
        (404, b"", ("unknown", None)),
        (200, b'{"query_status": "ok", "data": [{"signature": "Z"}]}', ("known_bad", "Z")),
        (200, b'{"query_status": "ok", "data": []}', ("known_bad", None)),
        (200, b'{"query_status": "hash_not_found"}', ("unknown", None)),
    ],
)
def test_answer_formats(status: int, body: bytes, expected: tuple[str, str | None]) -> None:
    assert parse_reputation_answer(status, body) == expected


@pytest.mark.parametrize(
    "body",
    [b"<html>", b"[]", b'{"verdict": 3}', b'{"verdict": "maybe"}',
     b'{"query_status": "unknown_auth_key"}'],
)
def test_unreadable_answers_are_errors_not_unknown(body: bytes) -> None:
    with pytest.raises(ExternalServiceError) as info:
        parse_reputation_answer(200, body)
    assert not info.value.retryable


# --- the daemon builds its external breaker and retry from [resilience] ------------------


def _dead_reputation_daemon(
    daemon_factory: Any, server: HttpFixture, resilience: dict[str, Any]
) -> Any:
    """A real sentineld whose reputation service refuses every connection (the
    fixture stopped listening: ECONNREFUSED at once, a retryable failure)."""
    server.go_away()
    return daemon_factory(
        config={"reputation": {"url": server.url + "/reputation"}, "resilience": resilience}
    )


async def _scan_and_read_breaker(daemon: Any, scans: int) -> BreakerInfo:
    """``scans`` scans of distinct bytes (each one reputation lookup, never cached
    since it fails), then the daemon's own ``breakers`` entry for the lookup."""
    from sentinel_ipc.client import open_client

    async with open_client(daemon.socket_path) as client:
        for n in range(scans):
            result = await client.scan(f"harmless file {n}".encode(), timeout=30)
            assert result.reputation == "unavailable", result
        report = await client.breakers(timeout=5)
    return {b.name: b for b in report.breakers}["external.reputation"]


async def test_daemon_opens_the_external_breaker_at_the_configured_threshold(
    daemon_factory: Any, server: HttpFixture
) -> None:
    """``[resilience.breakers.external] failure_threshold = 1`` reaches the
    reputation client the daemon builds: one refused connection opens its
    breaker, where SPEC's default (3) would keep it closed. With one attempt
    per lookup (``[resilience.retries.external]``) one scan is one failure."""
    daemon = _dead_reputation_daemon(daemon_factory, server, {
        "breakers": {"external": {
            "failure_threshold": 1, "open_timeout": 60.0, "success_threshold": 2,
        }},
        "retries": {"external": {
            "attempts": 1, "initial": 0.01, "max_delay": 0.01, "multiplier": 1.0,
        }},
    })
    info = await _scan_and_read_breaker(daemon, 1)
    assert info.failures_total == 1, info
    assert info.state == "open", info
    assert info.retry_after_s is not None and 50 < info.retry_after_s <= 60, info
    daemon.stop()


async def test_daemon_retries_external_calls_as_configured(
    daemon_factory: Any, server: HttpFixture
) -> None:
    """``[resilience.retries.external] attempts = 4`` (short delays, well inside
    the 500 ms lookup deadline) makes one lookup four attempts, each a breaker
    failure: the built-in policy would make two (its second backoff passes the
    deadline). The breaker threshold is raised so it does not cut them short."""
    daemon = _dead_reputation_daemon(daemon_factory, server, {
        "breakers": {"external": {
            "failure_threshold": 50, "open_timeout": 60.0, "success_threshold": 2,
        }},
        "retries": {"external": {
            "attempts": 4, "initial": 0.01, "max_delay": 0.01, "multiplier": 1.0,
            "jitter": 0.0,
        }},
    })
    info = await _scan_and_read_breaker(daemon, 1)
    assert info.failures_total == 4 and info.state == "closed", info
    daemon.stop()


async def test_daemon_without_retries_makes_one_external_attempt(
    daemon_factory: Any, server: HttpFixture
) -> None:
    """``retries_enabled = false`` holds for the external calls too: one attempt."""
    daemon = _dead_reputation_daemon(daemon_factory, server, {"retries_enabled": False})
    info = await _scan_and_read_breaker(daemon, 2)
    assert info.failures_total == 2 and info.state == "closed", info
    daemon.stop()


async def test_daemon_with_breakers_disabled_disables_the_external_ones(
    daemon_factory: Any, server: HttpFixture
) -> None:
    """``breakers_enabled = false`` with ``failure_threshold = 1``: the external
    breaker is disabled like the others, and failures never open it."""
    daemon = _dead_reputation_daemon(daemon_factory, server, {
        "breakers_enabled": False,
        "breakers": {"external": {
            "failure_threshold": 1, "open_timeout": 60.0, "success_threshold": 2,
        }},
    })
    info = await _scan_and_read_breaker(daemon, 2)
    assert info.state == "disabled", info
    daemon.stop()
