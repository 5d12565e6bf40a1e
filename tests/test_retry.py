"""RetryPolicy (pure) and the classifiers, the latter against real faults:
real SQLite locks and constraint violations, real socket and pipe errors,
real yara syntax errors, a real crashed worker process."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import socket
import sqlite3
import statistics
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pytest
import trio
import yara
from hypothesis import given, settings
from hypothesis import strategies as st

from sentinel_ipc.errors import (
    BadFrameError,
    BusyError,
    PolicyStoreError,
    RetryExhaustedError,
    RetryGaveUpError,
    RulesError,
    ScanError,
)
from sentinel_ipc.resilience import (
    NO_RETRY,
    RETRY,
    RETRY_PRESETS,
    Backoff,
    RetryAttempt,
    RetryBudget,
    RetryPolicy,
    retry_after,
    retry_on,
)
from sentinel_ipc.resilience import classifiers as c


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def policy(**kwargs: Any) -> RetryPolicy:
    kwargs.setdefault("on", Flaky)
    kwargs.setdefault("jitter", 0.0)
    return RetryPolicy(**kwargs)


# --- the SPEC's retry cases, on the pure value -----------------------------------------


def test_first_try_success_needs_no_state() -> None:
    p = policy()
    assert p.attempt == 1 and p.history == () and p.next_delay == 0.0


def test_second_try_success(rng: random.Random) -> None:
    p = policy(attempts=3, initial=0.1)
    after = p.increment(Flaky("once"), now=10.0, rng=rng)
    assert after.attempt == 2 and after.next_delay == pytest.approx(0.1)
    (attempt,) = after.history
    assert (attempt.attempt, attempt.at, attempt.hinted) == (1, 10.0, False)
    assert isinstance(attempt.error, Flaky)


def test_failure_after_max_attempts_chains_the_last_error(rng: random.Random) -> None:
    p = policy(attempts=3)
    p = p.increment(Flaky("1"), now=0.0, rng=rng)
    p = p.increment(Flaky("2"), now=1.0, rng=rng)
    last = Flaky("3")
    with pytest.raises(RetryGaveUpError) as info:
        p.increment(last, now=2.0, rng=rng, operation="database")
    error = info.value
    assert isinstance(error, RetryExhaustedError) and error.retryable
    assert error.__cause__ is last
    assert (error.reason, error.attempts, error.operation) == ("attempts", 3, "database")
    assert [a.error.args[0] for a in error.history if isinstance(a, RetryAttempt)] == [
        "1",
        "2",
        "3",
    ]
    assert "database gave up after 3 attempts" in str(error) and "Flaky: 3" in str(error)


def test_backoff_delays_without_jitter(rng: random.Random) -> None:
    p = policy(attempts=10, initial=0.1, multiplier=2.0, max_delay=1.0)
    delays = []
    for i in range(8):
        p = p.increment(Flaky(), now=float(i), rng=rng)
        delays.append(p.next_delay)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_spec_presets_delays_and_classifiers() -> None:
    table = {
        name: (p.name, p.attempts, p.initial, p.max_delay, p.multiplier, p.on)
        for name, p in RETRY_PRESETS.items()
    }
    # Each carries its name: the label its retries are counted under. "external"
    # has no row in SPEC's table; its numbers are the ones the integrations used.
    assert table == {
        "database": ("database", 3, 0.1, 1.0, 2.0, c.database),
        "ipc": ("ipc", 5, 0.05, 2.0, 1.5, c.ipc),
        "file": ("file", 3, 0.2, 5.0, 2.0, c.file),
        "yara": ("yara", 2, 1.0, 5.0, 3.0, c.yara),
        "external": ("external", 3, 0.2, 2.0, 2.0, c.transient),
    }
    assert dataclasses.replace(RETRY_PRESETS["database"], attempts=1).name == "database"
    ipc = RETRY_PRESETS["ipc"]
    assert [ipc.ceiling(n) for n in range(1, 5)] == pytest.approx([0.05, 0.075, 0.1125, 0.16875])


def test_jitter_spreads_delays_within_bounds(rng: random.Random) -> None:
    p = policy(initial=1.0, jitter=0.5, max_delay=10.0)
    samples = [p.delay(1, rng) for _ in range(2000)]
    assert all(1.0 <= d <= 1.5 for d in samples)
    assert len(set(samples)) > 1900  # actually random
    assert statistics.mean(samples) == pytest.approx(1.25, abs=0.02)
    # Two callers with different random streams do not retry in step.
    a, b = random.Random(1), random.Random(2)
    assert [p.delay(1, a) for _ in range(5)] != [p.delay(1, b) for _ in range(5)]


def test_max_delay_caps_even_huge_attempt_numbers(rng: random.Random) -> None:
    p = policy(initial=0.5, multiplier=10.0, max_delay=3.0, jitter=0.2)
    assert p.ceiling(10_000) == 3.0  # no OverflowError
    assert 3.0 <= p.delay(10_000, rng) <= 3.6


def test_retryable_vs_not(rng: random.Random) -> None:
    p = policy()
    fatal = Fatal("no")
    with pytest.raises(Fatal) as info:
        p.increment(fatal, now=0.0, rng=rng)
    assert info.value is fatal  # the error itself, not wrapped
    assert p.classify(Flaky()) == RETRY and p.classify(Fatal()) == NO_RETRY


def test_cancellation_is_never_retried_even_when_asked(rng: random.Random) -> None:
    p = policy(on=BaseException)
    interrupt = KeyboardInterrupt()
    assert p.classify(interrupt) == NO_RETRY
    with pytest.raises(KeyboardInterrupt):
        p.increment(interrupt, now=0.0, rng=rng)


def test_reset_and_immutability(rng: random.Random) -> None:
    preset = policy()
    used = preset.increment(Flaky(), now=0.0, rng=rng)
    assert preset.history == () and len(used.history) == 1
    fresh = used.reset()
    assert fresh.history == () and fresh == preset
    assert preset.reset() is preset
    with pytest.raises(AttributeError):
        preset.attempts = 9  # type: ignore[misc]


def test_concurrent_retries_are_independent(rng: random.Random) -> None:
    shared = policy(attempts=3)
    a = shared.increment(Flaky("a1"), now=0.0, rng=rng)
    b = shared.increment(Flaky("b1"), now=0.0, rng=rng)
    a = a.increment(Flaky("a2"), now=1.0, rng=rng)
    assert len(a.history) == 2 and len(b.history) == 1 and shared.history == ()
    b.increment(Flaky("b2"), now=1.0, rng=rng)  # b still has a retry left
    with pytest.raises(RetryGaveUpError):
        a.increment(Flaky("a3"), now=2.0, rng=rng)


# --- hints, caps, budget ------------------------------------------------------------------


def test_retry_after_hint_replaces_the_backoff(rng: random.Random) -> None:
    p = RetryPolicy(on=c.ipc, initial=0.05, max_delay=2.0)
    p = p.increment(BusyError("busy", retry_after=1.5), now=0.0, rng=rng)
    assert p.next_delay == 1.5 and p.history[-1].hinted


def test_hint_over_max_delay_gives_up_and_passes_the_hint_on(rng: random.Random) -> None:
    p = RetryPolicy(on=c.ipc, max_delay=2.0)
    busy = BusyError("busy", retry_after=30.0)
    with pytest.raises(RetryGaveUpError) as info:
        p.increment(busy, now=0.0, rng=rng)
    assert info.value.reason == "retry_after" and info.value.retry_after == 30.0
    assert info.value.__cause__ is busy


def test_total_time_cap(rng: random.Random) -> None:
    p = policy(attempts=100, initial=1.0, multiplier=1.0, max_delay=1.0, timeout=5.0)
    p = p.increment(Flaky(), now=3.0, rng=rng, started_at=0.0)  # 3 + 1 <= 5: wait
    with pytest.raises(RetryGaveUpError) as info:
        p.increment(Flaky(), now=4.5, rng=rng, started_at=0.0)  # 4.5 + 1 > 5
    assert info.value.reason == "timeout"


def test_deadline_gives_up_before_sleeping_into_it(rng: random.Random) -> None:
    p = policy(initial=1.0)
    with pytest.raises(RetryGaveUpError) as info:
        p.increment(Flaky(), now=10.0, rng=rng, deadline=10.9)
    assert info.value.reason == "deadline"
    assert p.increment(Flaky(), now=10.0, rng=rng, deadline=11.1).next_delay == 1.0


def test_budget_refusal_fails_fast_and_only_spends_on_real_retries(rng: random.Random) -> None:
    budget = RetryBudget("db", ratio=0.0, min_per_second=0.1, ttl=10.0)  # one retry per 10 s
    p = policy(attempts=5)
    with pytest.raises(Fatal):  # not retryable: the budget is not touched
        p.increment(Fatal(), now=0.0, rng=rng, budget=budget)
    p.increment(Flaky(), now=0.0, rng=rng, budget=budget)
    with pytest.raises(RetryGaveUpError) as info:
        p.increment(Flaky(), now=0.0, rng=rng, budget=budget)
    assert info.value.reason == "budget"
    stats = budget.statistics(0.0)
    assert (stats.granted_total, stats.refused_total) == (1, 1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"initial": -1.0}, "initial"),
        ({"max_delay": float("inf")}, "max_delay"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": float("nan")}, "jitter"),
        ({"timeout": 0}, "timeout"),
        ({"on": 42}, "on"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    kwargs.setdefault("on", Flaky)
    with pytest.raises(ValueError, match=f"RetryPolicy.{field}"):
        RetryPolicy(**kwargs)


def test_on_accepts_types_and_bool_classifiers() -> None:
    assert RetryPolicy(on=(Flaky, OSError)).on == retry_on(Flaky, OSError)
    p = RetryPolicy(on=lambda e: isinstance(e, Flaky))
    assert p.classify(Flaky()) == RETRY and p.classify(Fatal()) == NO_RETRY
    assert retry_after(2.0).after == 2.0 and retry_after(None) == RETRY
    assert retry_after(float("nan")) == RETRY


# --- delay bounds, as properties -----------------------------------------------------------

params = st.fixed_dictionaries(
    {
        "initial": st.floats(0.0, 10.0),
        "max_delay": st.floats(0.0, 60.0),
        "multiplier": st.floats(1.0, 5.0),
        "jitter": st.floats(0.0, 2.0),
    }
)


@settings(max_examples=100, deadline=None)
@given(params=params, n=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_exponential_delay_bounds(params: dict[str, Any], n: int, seed: int) -> None:
    p = RetryPolicy(on=Flaky, **params)
    try:
        raw = params["initial"] * params["multiplier"] ** (n - 1)
    except OverflowError:
        raw = math.inf
    ceiling = min(raw, params["max_delay"])
    d = p.delay(n, random.Random(seed))
    assert ceiling <= d <= ceiling * (1 + params["jitter"]) * (1 + 1e-12)


@settings(max_examples=100, deadline=None)
@given(params=params, n=st.integers(1, 2000), seed=st.integers(0, 2**32 - 1))
def test_full_jitter_delay_bounds(params: dict[str, Any], n: int, seed: int) -> None:
    p = RetryPolicy(on=Flaky, backoff=Backoff.FULL_JITTER, **params)
    assert 0.0 <= p.delay(n, random.Random(seed)) <= p.ceiling(n)


@settings(max_examples=50, deadline=None)
@given(params=params, attempts=st.integers(2, 30), seed=st.integers(0, 2**32 - 1))
def test_decorrelated_jitter_bounds(params: dict[str, Any], attempts: int, seed: int) -> None:
    rng = random.Random(seed)
    p = RetryPolicy(on=Flaky, attempts=attempts, backoff=Backoff.DECORRELATED_JITTER, **params)
    for i in range(attempts - 1):
        p = p.increment(Flaky(), now=float(i), rng=rng)
        assert 0.0 <= p.next_delay <= params["max_delay"]


def test_decorrelated_jitter_medians_track_doubling() -> None:
    rng = random.Random(7)
    base = RetryPolicy(
        on=Flaky, attempts=5, backoff=Backoff.DECORRELATED_JITTER, initial=1.0, max_delay=1e9
    )
    runs = []
    for _ in range(1500):
        p = base
        for i in range(4):
            p = p.increment(Flaky(), now=float(i), rng=rng)
        runs.append([a.delay for a in p.history])
    medians = [statistics.median(r[k] for r in runs) for k in range(4)]
    # Polly's formula, evaluated at the median draw (t = n - 0.5):
    # (2^t tanh(sqrt(4t)) - previous) / 1.4 = 0.90, 1.09, 2.04, 4.04 x initial.
    assert medians == pytest.approx([0.90, 1.09, 2.04, 4.04], rel=0.12)


# --- classifiers against real faults ---------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "policy.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE p (k TEXT PRIMARY KEY)")
    con.execute("INSERT INTO p VALUES ('a')")
    con.commit()
    con.close()
    yield path


def raised(fn: Any, *args: Any) -> Any:
    try:
        fn(*args)
    except BaseException as error:
        return error
    raise AssertionError("expected an error")


def test_database_classifier_on_real_sqlite_errors(db: Path, tmp_path: Path) -> None:
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(db, timeout=0)
    locked = raised(other.execute, "SELECT * FROM p")
    holder.execute("ROLLBACK")
    assert "locked" in str(locked)
    assert c.database(locked) == RETRY and c.database_failure(locked)

    con = sqlite3.connect(db)
    integrity = raised(con.execute, "INSERT INTO p VALUES ('a')")
    syntax = raised(con.execute, "SELEKT 1")
    no_table = raised(con.execute, "SELECT * FROM nope")
    con.close()
    closed = raised(con.execute, "SELECT 1")
    cant_open = raised(sqlite3.connect, str(tmp_path / "no" / "such" / "dir.db"))
    for error in (integrity, syntax, no_table, closed):
        assert c.database(error) == NO_RETRY, error
        assert not c.database_failure(error), error
    assert isinstance(integrity, sqlite3.IntegrityError)
    assert c.database(cant_open) == RETRY, cant_open

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    corrupt = raised(sqlite3.connect(garbage).execute, "SELECT * FROM sqlite_master")
    assert c.database(corrupt) == NO_RETRY  # retrying cannot fix a corrupt file...
    assert c.database_failure(corrupt)  # ...but the database is certainly unwell
    # Errors built by hand (no result code) are classified by their text.
    assert c.database(sqlite3.OperationalError("disk I/O error")) == RETRY
    assert c.database(sqlite3.OperationalError("database is busy")) == RETRY
    assert c.database(sqlite3.OperationalError("near 'x': syntax error")) == NO_RETRY
    assert c.database_failure(PolicyStoreError("store moved", retryable=False))


def test_ipc_classifier_on_real_socket_errors(tmp_path: Path) -> None:
    missing = raised(socket.socket(socket.AF_UNIX).connect, str(tmp_path / "none.sock"))
    dead_path = str(tmp_path / "dead.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(dead_path)  # a socket file with nobody listening
    refused = raised(socket.socket(socket.AF_UNIX).connect, dead_path)
    a, b = socket.socketpair()
    b.close()
    broken = raised(a.send, b"x" * 100_000)
    for error in (missing, refused, broken):
        assert isinstance(error, OSError)
        assert c.ipc(error) == RETRY, error
    assert (missing.errno, refused.errno, broken.errno) == (
        errno.ENOENT,
        errno.ECONNREFUSED,
        errno.EPIPE,
    )
    assert c.ipc(trio.TooSlowError()) == RETRY and c.ipc(TimeoutError()) == RETRY
    assert c.ipc(ConnectionResetError(errno.ECONNRESET, "reset")) == RETRY
    assert c.ipc(BadFrameError("garbage")) == NO_RETRY  # protocol errors never
    assert c.ipc(PermissionError(errno.EACCES, "denied")) == NO_RETRY
    assert c.ipc(BusyError("busy", retry_after=0.25)) == retry_after(0.25)
    assert c.ipc(ValueError("bug")) == NO_RETRY
    for s in (dead, a):
        s.close()


def test_file_classifier_on_real_os_errors(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.set_blocking(r, False)
    eagain = raised(os.read, r, 1)
    os.close(r)
    os.close(w)
    with open("/dev/full", "wb", buffering=0) as full:
        enospc = raised(full.write, b"x")
    enoent = raised(open, tmp_path / "missing")
    assert (eagain.errno, enospc.errno, enoent.errno) == (
        errno.EAGAIN,
        errno.ENOSPC,
        errno.ENOENT,
    )
    assert c.file(eagain) == RETRY
    assert c.file(enospc) == NO_RETRY and c.file(enoent) == NO_RETRY
    # As root, EACCES and EBUSY cannot be provoked cheaply; the errno is what matters.
    assert c.file(PermissionError(errno.EACCES, "denied")) == NO_RETRY
    assert c.file(OSError(errno.EBUSY, "busy")) == RETRY


def _die() -> None:
    os._exit(9)


def test_yara_classifier_on_real_faults() -> None:
    bad_rules = raised(lambda: yara.compile(source="rule x { condition: nope }"))
    assert type(bad_rules).__name__ == "SyntaxError"
    assert c.yara(bad_rules) == NO_RETRY
    with ProcessPoolExecutor(1, mp_context=get_context("fork")) as pool:
        crash = raised(pool.submit(_die).result)
    assert isinstance(crash, BrokenProcessPool)
    assert c.yara(crash) == RETRY
    assert c.yara(MemoryError()) == RETRY
    assert c.yara(ScanError("worker died")) == RETRY
    assert c.yara(RulesError("bad rule at line 3")) == NO_RETRY
    assert c.yara(ValueError("bug")) == NO_RETRY
