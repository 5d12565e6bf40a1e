"""Health registry and checks (SPEC section 4), with real SQLite files, real
processes and real sockets; time-outs run on trio's MockClock.

The SPEC's seven health cases against a real daemon live in
``test_degradation.py`` (they need the daemon); here the registry and each
check are exercised directly.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from functools import partial
from pathlib import Path

import psutil
import pytest
import trio
import trio.lowlevel
import trio.testing

from sentinel_ipc.observability.checks import (
    DiskCheck,
    MemoryCheck,
    database_check,
    http_check,
    ipc_check,
    mount_point,
    yara_check,
)
from sentinel_ipc.observability.health import CheckOutcome, HealthRegistry, worst_status


def ok_check(message: str = "fine", value: float | None = None):  # type: ignore[no-untyped-def]
    async def check() -> CheckOutcome:
        return CheckOutcome(ok=True, message=message, value=value)

    return check


def failing_check(message: str = "broken"):  # type: ignore[no-untyped-def]
    async def check() -> CheckOutcome:
        return CheckOutcome(ok=False, message=message)

    return check


def hanging_check():  # type: ignore[no-untyped-def]
    async def check() -> CheckOutcome:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    return check


def make_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE policies (id INTEGER PRIMARY KEY, action TEXT);"
        "CREATE TABLE threat_history (id INTEGER PRIMARY KEY);"
        "PRAGMA user_version = 3;"
    )
    con.commit()
    con.close()


# -- the registry -----------------------------------------------------------------


def test_worst_status_orders_severity() -> None:
    assert worst_status() == "healthy"
    assert worst_status("healthy", "degraded") == "degraded"
    assert worst_status("degraded", "unhealthy", "healthy") == "unhealthy"


async def test_check_timeout_marks_component_with_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SPEC health case "check timeout": a check that never returns is cut off at
    its own timeout and its component says so."""
    registry = HealthRegistry()
    registry.add("database", hanging_check(), timeout=1.0)
    registry.add("ipc", ok_check(), timeout=0.5)
    start = trio.current_time()
    results = await registry.run_all()
    assert trio.current_time() - start == pytest.approx(1.0)
    db = results["database"]
    assert not db.ok and db.timed_out
    assert db.status == "degraded"
    assert db.message == "timed out after 1000 ms"
    assert results["ipc"].ok
    report = await registry.report(1, "full")
    assert report.components["database"].message == "timed out after 1000 ms"
    assert report.components["database"].response_ms == pytest.approx(1000.0)
    assert report.status == "degraded"


async def test_checks_run_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    registry = HealthRegistry()
    for name in ("a", "b", "c"):
        registry.add(name, hanging_check(), timeout=2.0)
    start = trio.current_time()
    await registry.run_all()
    assert trio.current_time() - start == pytest.approx(2.0)  # not 6.0


async def test_a_raising_check_is_a_failure_with_its_error() -> None:
    async def boom() -> CheckOutcome:
        raise OSError(5, "Input/output error")

    registry = HealthRegistry()
    registry.add("disk", boom, timeout=1.0, failure_status="unhealthy")
    result = await registry.run_check("disk")
    assert result.status == "unhealthy"
    assert "OSError" in result.message and "Input/output error" in result.message


async def test_concurrent_runs_of_one_check_coalesce(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def slow() -> CheckOutcome:
        nonlocal calls
        calls += 1
        await trio.sleep(0.5)
        return CheckOutcome(ok=True)

    registry = HealthRegistry()
    registry.add("database", slow, timeout=1.0)
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(registry.run_check, "database")
    assert calls == 1


async def test_liveness_is_true_with_everything_down() -> None:
    registry = HealthRegistry()
    registry.add("database", failing_check("gone"), timeout=1.0, required_for_ready=True)
    registry.add("yara", failing_check("no workers"), timeout=1.0)
    registry.add("disk", failing_check("full"), timeout=1.0, failure_status="unhealthy")
    await registry.run_all()
    live = await registry.report(5, "live")
    assert live.alive is True
    assert live.id == 5
    assert live.components == {}
    full = await registry.report(6, "full")
    assert full.alive is True
    assert full.status == "unhealthy"
    assert not full.ready


async def test_readiness_false_with_the_database_down_says_why() -> None:
    registry = HealthRegistry()
    registry.add("database", failing_check("database file x does not exist"), timeout=1.0,
                 required_for_ready=True)
    registry.add("ipc", ok_check(), timeout=1.0)
    await registry.run_all()
    ready = await registry.report(2, "ready")
    assert ready.ready is False
    assert ready.reason is not None and "database" in ready.reason
    assert "does not exist" in ready.reason
    assert set(ready.components) == {"database"}
    assert ready.status == "degraded"


async def test_readiness_conditions_name_their_reason() -> None:
    registry = HealthRegistry()
    registry.add("ipc", ok_check(), timeout=1.0)
    workers = {"alive": 0}
    registry.add_ready_condition(
        lambda: None if workers["alive"] else "no scan worker is available"
    )
    await registry.run_all()
    assert registry.readiness() == (False, "no scan worker is available")
    workers["alive"] = 2
    assert registry.readiness() == (True, None)


async def test_all_healthy_report_has_every_component_and_figures() -> None:
    registry = HealthRegistry(rules_version=lambda: "abc123")
    registry.add("ipc", ok_check("3 active connections", 3), timeout=1.0, live=True)
    registry.add("database", ok_check(), timeout=1.0, required_for_ready=True)
    await registry.run_all()
    report = await registry.report(9, "full")
    assert report.status == "healthy" and report.ready and report.alive
    assert report.reason is None
    assert report.rules_version == "abc123"
    assert report.components["ipc"].value == 3
    assert report.timestamp > 1.6e9
    assert report.uptime_seconds >= 0


async def test_full_report_never_waits_for_a_periodic_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The bar "health answers fast under load": a full report refreshes only
    the live checks; a slow periodic check is served from its cache."""
    registry = HealthRegistry(interval=30.0)
    slow_started = trio.Event()

    async def slow_db() -> CheckOutcome:
        slow_started.set()
        await trio.sleep(0.9)
        return CheckOutcome(ok=True, message="slow but fine")

    registry.add("database", slow_db, timeout=1.0)
    registry.add("ipc", ok_check(), timeout=1.0, live=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run_periodically)
        assert registry.periodic_runs == 1
        await trio.sleep(30.0)  # the second round is now in flight
        await slow_started.wait()
        before = trio.current_time()
        report = await registry.report(1, "full")
        assert trio.current_time() == before
        assert report.components["database"].message == "slow but fine"
        nursery.cancel_scope.cancel()


async def test_run_now_triggers_a_round_at_once(autojump_clock: trio.testing.MockClock) -> None:
    runs = 0

    async def counting() -> CheckOutcome:
        nonlocal runs
        runs += 1
        return CheckOutcome(ok=True)

    registry = HealthRegistry(interval=3600.0)
    registry.add("x", counting, timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run_periodically)
        assert runs == 1
        registry.run_now()
        await trio.sleep(0.01)
        assert runs == 2
        nursery.cancel_scope.cancel()


async def test_listeners_see_every_result_and_a_bad_listener_is_contained() -> None:
    seen: list[tuple[str, bool]] = []
    registry = HealthRegistry()
    registry.add("a", ok_check(), timeout=1.0)
    registry.add("b", failing_check(), timeout=1.0)
    registry.add_listener(lambda r: seen.append((r.name, r.ok)))
    registry.add_listener(lambda r: 1 / 0)  # type: ignore[func-returns-value]
    await registry.run_all()
    assert sorted(seen) == [("a", True), ("b", False)]


def test_registration_errors() -> None:
    registry = HealthRegistry()
    registry.add("a", ok_check(), timeout=1.0)
    with pytest.raises(ValueError, match="already registered"):
        registry.add("a", ok_check(), timeout=1.0)
    with pytest.raises(ValueError, match="timeout"):
        registry.add("b", ok_check(), timeout=0)
    with pytest.raises(ValueError, match="interval"):
        HealthRegistry(interval=0)


# -- the checks -------------------------------------------------------------------


async def test_database_check_healthy_then_deleted_replaced_missing_table(
    tmp_path: Path,
) -> None:
    db = tmp_path / "policy_graph.db"
    make_db(db)
    check = database_check(db)
    outcome = await check()
    assert outcome.ok, outcome.message
    assert "schema v3" in outcome.message

    # A long-open connection would not notice these; the check opens the path afresh.
    keeper = sqlite3.connect(db)
    keeper.execute("SELECT 1").fetchone()
    db.unlink()
    outcome = await check()
    assert not outcome.ok and "does not exist" in outcome.message
    keeper.execute("SELECT 1").fetchone()  # the old connection is none the wiser
    keeper.close()

    db.write_bytes(os.urandom(8192))
    outcome = await check()
    assert not outcome.ok and "not a database" in outcome.message

    db.unlink()
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE policies (id INTEGER)")
    con.close()
    outcome = await check()
    assert not outcome.ok and "threat_history" in outcome.message


async def test_database_check_fails_while_another_connection_holds_an_exclusive_lock(
    tmp_path: Path,
) -> None:
    db = tmp_path / "policy_graph.db"
    make_db(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        registry = HealthRegistry()
        registry.add("database", database_check(db), timeout=1.0)
        result = await registry.run_check("database")
        assert not result.ok
        assert "locked" in result.message or "timed out" in result.message
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (await database_check(db)()).ok


async def test_database_check_extra_probe_can_fail_it(tmp_path: Path) -> None:
    db = tmp_path / "policy_graph.db"
    make_db(db)

    async def moved() -> CheckOutcome:
        return CheckOutcome(ok=False, message="the path no longer names the open file")

    outcome = await database_check(db, extra=moved)()
    assert not outcome.ok and "no longer names" in outcome.message


async def test_yara_check_maps_self_test_results() -> None:
    async def passes() -> float:
        return 3.5

    async def raises() -> float:
        raise RuntimeError("no worker answered")

    assert (await yara_check(passes)()).ok
    registry = HealthRegistry()
    registry.add("yara", yara_check(raises), timeout=2.0)
    result = await registry.run_check("yara")
    assert not result.ok and "no worker answered" in result.message
    assert result.status == "degraded"


async def test_ipc_check_degrades_at_the_connection_limit() -> None:
    count = {"n": 999}
    check = ipc_check(lambda: count["n"], 1000)
    outcome = await check()
    assert outcome.ok and outcome.value == 999
    count["n"] = 1000
    outcome = await check()
    assert not outcome.ok and "1000" in outcome.message


async def test_disk_check_reports_free_bytes_and_is_unhealthy_below_the_minimum(
    tmp_path: Path,
) -> None:
    check = DiskCheck.default(tmp_path, min_free=1)
    outcome = await check()
    assert outcome.ok, outcome.message
    assert outcome.value is not None and outcome.value > 0
    assert "data dir" in outcome.message and "temp dir" in outcome.message
    assert mount_point(tmp_path) in check.free_by_mount

    greedy = DiskCheck.default(tmp_path, min_free=2**62)
    registry = HealthRegistry()
    registry.add("disk", greedy, timeout=1.0, failure_status="unhealthy")
    result = await registry.run_check("disk")
    assert result.status == "unhealthy"
    assert "below" in result.message


async def test_memory_check_judges_the_daemon_alone_and_reports_its_workers() -> None:
    """SPEC: "process RSS < 2 GB, else degraded" is the daemon's own RSS; its
    workers are only reported (the pool holds each to its own limit). Adding
    them in made the daemon look about twice its size."""
    child = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert (await child.stdout.receive_some()).startswith(b"up")  # interpreter loaded
        child_rss = psutil.Process(child.pid).memory_info().rss
        assert child_rss > 4 * 1024 * 1024
        check = MemoryCheck(lambda: [child.pid], limit=2 * 1024**3)
        own_only = MemoryCheck(lambda: [], limit=2 * 1024**3)
        outcome = await check()
        alone = await own_only()
        assert outcome.ok, outcome.message
        assert "1 worker(s)" in outcome.message
        assert outcome.value is not None and alone.value is not None
        assert abs(outcome.value - alone.value) < child_rss / 2  # the child's RSS not added
        assert check.last_rss == outcome.value and check.last_workers_rss > 0
        # A limit between the daemon's RSS and the daemon's plus the worker's passes.
        between = MemoryCheck(lambda: [child.pid], limit=int(alone.value) + child_rss // 2)
        assert (await between()).ok
        tight = MemoryCheck(lambda: [child.pid], limit=1024)
        over = await tight()
        assert not over.ok and "limit" in over.message
    finally:
        child.kill()
        await child.wait()
    # A worker that exited is skipped, not an error.
    gone = await MemoryCheck(lambda: [child.pid], limit=2 * 1024**3)()
    assert gone.ok and "0 worker(s)" in gone.message


async def test_http_check_against_a_server_that_never_answers_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """SPEC degradation case "network timeout": a local server accepts and never
    answers; the check is cut off at its timeout, the component says so."""
    accepted: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        registry = HealthRegistry()
        registry.add("http:local", http_check(f"http://127.0.0.1:{port}/status"), timeout=1.5)
        result = await registry.run_check("http:local")
        assert result.timed_out
        assert result.message == "timed out after 1500 ms"
        assert result.status == "degraded"
        nursery.cancel_scope.cancel()


async def test_http_check_success_and_http_error() -> None:
    async def answer(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4096)
        code = b"503 Service Unavailable" if b"/down" in request else b"200 OK"
        await stream.send_all(b"HTTP/1.1 " + code + b"\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        up = await http_check(f"http://127.0.0.1:{port}/up")()
        down = await http_check(f"http://127.0.0.1:{port}/down")()
        assert up.ok and up.value == 200
        assert not down.ok and "503" in down.message
        nursery.cancel_scope.cancel()


async def test_yara_check_under_full_load_is_busy_not_dead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Every worker busy: the test scan waits in line past its timeout. If the pool
    completed scans since the last check, that is load, not a dead scanner."""
    completed = {"n": 0}

    async def stuck_in_line() -> float:
        await trio.sleep(10)
        return 1.0

    check = yara_check(stuck_in_line, timeout=2.0, progress=lambda: completed["n"])
    completed["n"] = 40
    busy = await check()
    assert busy.ok and "workers busy: 40 scans completed" in busy.message
    dead = await check()  # no progress since: the pool is stuck
    assert not dead.ok and dead.message == "timed out after 2000 ms"
