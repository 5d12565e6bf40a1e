"""policy_list paging and the server's reply-size guard.

A reply is one frame, and a frame over ``max_frame_bytes`` is one the client
must refuse (losing the connection with it). So the server never writes one:
the request gets ``reply_too_large`` and the connection stays usable (an
oversized pushed event becomes an ``events_dropped`` notice). ``policy_list``
pages by id (``after_id``, ``limit``, ``next_after_id``), each page cut to
what fits in a frame; the clients fetch every page.

Real parts throughout: a real daemon on a real SQLite file (seeded through
the store's own replay, in one transaction, so 2,500 policies take a moment,
not 2,500 fsyncs), the real sentinelctl, a real Server on a real socket for
the guard's corner cases, a real ``BEGIN EXCLUSIVE`` for the outage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from daemon_harness import DaemonProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from test_server import serving

from sentinel_ipc.client import SyncClient, open_client
from sentinel_ipc.codec import encode
from sentinel_ipc.config import ServerConfig
from sentinel_ipc.errors import (
    ErrorCode,
    ProtocolError,
    ReplyTooLargeError,
    error_class_for_code,
)
from sentinel_ipc.handlers import core
from sentinel_ipc.handlers.policy import fit_policy_page
from sentinel_ipc.messages import (
    BreakerInfo,
    Breakers,
    BreakersReport,
    Error,
    Event,
    Limits,
    Metrics,
    MetricsReport,
    Ping,
    PolicyAdd,
    PolicyList,
    PolicyListResult,
    PolicyRecord,
    PolicyResult,
    Pong,
    Reply,
)
from sentinel_ipc.paging import MAX_POLICY_PAGE, MAX_SLACK, fit_count
from sentinel_ipc.policy.journal import AddPolicy, RemovePolicy
from sentinel_ipc.policy.snapshot import PolicySnapshot
from sentinel_ipc.policy.store import PolicyStore
from sentinel_ipc.policy.validation import PolicyDraft
from sentinel_ipc.server.dispatch import Dispatcher, RequestContext
from sentinel_ipc.server.server import Server
from sentinel_ipc.transport import open_framed_connection

ROOT = Path(__file__).resolve().parent.parent
SMALL_FRAME = 64 * 1024
SEEDED = 2500


def sha(n: int) -> str:
    return hashlib.sha256(f"blocklist entry {n}".encode()).hexdigest()


def seed_policies(db_path: Path, count: int) -> None:
    """``count`` hash policies (reasons of 0..299 characters, so records differ in
    size), written through the store's journal replay: one transaction."""
    store = PolicyStore(db_path)
    store.ensure_open()
    try:
        ops = [
            AddPolicy(
                seq=n + 1,
                key=f"seed-{n}",
                at=1_767_139_200.0 + n,
                policy=PolicyDraft(
                    action="block", file_hash=sha(n), reason="r" * (n % 300),
                    created_by="uid:0",
                ),
            )
            for n in range(count)
        ]
        outcomes = store.replay(ops, batch=count)
        assert all(o.status == "applied" for o in outcomes)
    finally:
        store.close()


def start_seeded(base: Path, count: int, config: dict[str, Any]) -> DaemonProcess:
    d = DaemonProcess(base, config)
    d.data_dir.mkdir(parents=True)
    seed_policies(d.data_dir / "policy_graph.db", count)
    return d.start()


@pytest.fixture(scope="module")
def paged_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon, 2,500 policies, a 64 KiB frame limit (the whole list is ~0.6 MB)."""
    d = start_seeded(
        tmp_path_factory.mktemp("paging"), SEEDED,
        {"server": {"max_frame_bytes": SMALL_FRAME},
         "resilience": {"check_interval": 3600.0}},
    )
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def all_policies(paged_daemon: DaemonProcess) -> list[PolicyRecord]:
    """Every policy, paged by the blocking client (its own check below)."""
    with SyncClient(paged_daemon.socket_path) as client:
        return client.policy_list(timeout=10).policies


# --- the real daemon: clients ----------------------------------------------------------


async def test_client_policy_list_returns_every_policy_once_in_id_order(
    paged_daemon: DaemonProcess,
) -> None:
    async with open_client(paged_daemon.socket_path) as client:
        result = await client.policy_list(timeout=10)
        assert client.connects == 1
    ids = [p.id for p in result.policies]
    assert len(ids) == SEEDED and len(set(ids)) == SEEDED
    assert ids == sorted(ids)
    assert {p.file_hash for p in result.policies} == {sha(n) for n in range(SEEDED)}
    assert result.degraded is False and result.next_after_id is None


def test_sync_client_lists_every_policy_and_one_page(
    paged_daemon: DaemonProcess, all_policies: list[PolicyRecord]
) -> None:
    assert [p.id for p in all_policies] == sorted({p.id for p in all_policies})
    assert len(all_policies) == SEEDED
    with SyncClient(paged_daemon.socket_path) as client:
        page = client.policy_list_page(after_id=all_policies[9].id, limit=10)
    assert page.policies == all_policies[10:20]
    assert page.next_after_id == all_policies[19].id


async def test_pages_of_100_chain_by_next_after_id(
    paged_daemon: DaemonProcess, all_policies: list[PolicyRecord]
) -> None:
    async with open_client(paged_daemon.socket_path) as client:
        first = await client.policy_list_page(limit=100)
        second = await client.policy_list_page(after_id=first.next_after_id or 0, limit=100)
        last = await client.policy_list_page(after_id=all_policies[-31].id, limit=100)
    assert first.policies == all_policies[:100]
    assert first.next_after_id == all_policies[99].id
    assert second.policies == all_policies[100:200]
    assert second.next_after_id == all_policies[199].id
    assert last.policies == all_policies[-30:] and last.next_after_id is None


async def test_a_page_of_1000_is_cut_to_what_fits_in_the_frame(
    paged_daemon: DaemonProcess, all_policies: list[PolicyRecord]
) -> None:
    async with open_client(paged_daemon.socket_path) as client:
        page = await client.policy_list_page(limit=MAX_POLICY_PAGE)
    count = len(page.policies)
    assert 0 < count < MAX_POLICY_PAGE
    assert page.policies == all_policies[:count]
    assert page.next_after_id == page.policies[-1].id
    assert len(encode(page)) <= SMALL_FRAME
    # As many as fit (within the budget's few bytes of slack): one more would not.
    longer = msgspec.structs.replace(page, policies=all_policies[: count + 1])
    assert len(encode(longer)) > SMALL_FRAME - MAX_SLACK


@pytest.mark.parametrize(
    ("after_id", "limit", "field"),
    [(0, 0, "limit"), (0, MAX_POLICY_PAGE + 1, "limit"), (0, -3, "limit"),
     (-1, 10, "after_id")],
)
async def test_a_limit_or_after_id_out_of_range_is_invalid_message(
    paged_daemon: DaemonProcess, after_id: int, limit: int, field: str
) -> None:
    async with open_client(paged_daemon.socket_path) as client:
        with pytest.raises(ProtocolError) as info:
            await client.policy_list_page(after_id=after_id, limit=limit)
        assert info.value.code == ErrorCode.INVALID_MESSAGE
        assert info.value.retryable is False
        assert f"policy_list.{field}" in info.value.message
        await client.ping()
        assert client.connects == 1


async def test_the_unpaged_request_gets_reply_too_large_and_the_connection_lives(
    paged_daemon: DaemonProcess,
) -> None:
    """What a client from before paging sees: a typed error naming the size, the
    limit and the way out, where it used to get a frame it had to refuse."""
    before = paged_daemon.log().count("event=reply_too_large")
    # A strict peer: it refuses any frame over the limit the daemon announced.
    async with open_framed_connection(paged_daemon.socket_path, SMALL_FRAME) as conn:
        await conn.send(PolicyList(id=7))
        refused = await conn.receive()
        await conn.send(Ping(id=8))
        assert await conn.receive() == Pong(id=8)
    assert isinstance(refused, Error) and refused.id == 7, refused
    assert refused.code == ErrorCode.REPLY_TOO_LARGE and refused.retryable is False
    # Refused once the rows counted pass the frame: not necessarily all of them.
    size = int(refused.message.split(" would be more than ")[1].split(" bytes")[0])
    assert size > SMALL_FRAME
    for words in (str(SMALL_FRAME), "limit", "after_id", "max_frame_bytes"):
        assert words in refused.message, refused.message

    async with open_client(paged_daemon.socket_path) as client:
        with pytest.raises(ReplyTooLargeError) as info:
            await client.request(PolicyList(id=0))  # idempotent, yet not retried
        assert info.value.retryable is False
        await client.ping()
        assert client.connects == 1
    lines = [
        line for line in paged_daemon.log().splitlines() if "event=reply_too_large" in line
    ][before:]
    assert len(lines) == 2, lines  # one per request: logged once, never re-sent
    assert "type=policy_list_result" in lines[0] and f"limit={SMALL_FRAME}" in lines[0]
    assert str(size) in lines[0]


def test_sentinelctl_policy_list_prints_every_policy(
    paged_daemon: DaemonProcess, all_policies: list[PolicyRecord]
) -> None:
    base = [sys.executable, "-m", "sentinel_ipc.cli.sentinelctl",
            "--socket", str(paged_daemon.socket_path), "--timeout", "10"]
    listed = subprocess.run(
        [*base, "--json", "policy", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert listed.returncode == 0, listed.stderr
    policies = json.loads(listed.stdout)["policies"]
    assert [p["id"] for p in policies] == [p.id for p in all_policies]

    table = subprocess.run(
        [*base, "policy", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert table.returncode == 0, table.stderr
    shown = re.findall(r"sha256=([0-9a-f]{64})", table.stdout)
    assert shown == [p.file_hash for p in all_policies]


# --- the real daemon: paging during a database outage ------------------------------------


async def test_pages_during_an_outage_come_from_the_cache_marked_degraded(
    tmp_path: Path,
) -> None:
    """Another connection holds ``BEGIN EXCLUSIVE``: a write fails its attempts and
    is queued, the service is degraded, and policy_list pages over the cached
    policies by the same keyset rule, each page ``degraded``."""
    count = 1200
    d = start_seeded(tmp_path, count, {
        "server": {"max_frame_bytes": 16 * 1024},
        "resilience": {"check_interval": 3600.0},
        "policy": {"verify_interval": 3600.0},
    })
    holder = sqlite3.connect(d.data_dir / "policy_graph.db", isolation_level=None)
    try:
        async with open_client(d.socket_path) as client:
            healthy = await client.policy_list_page(limit=5)
            assert not healthy.degraded
            holder.execute("BEGIN EXCLUSIVE")
            queued = await client.request(PolicyAdd(id=0, action="block", sha256=sha(-1)))
            assert isinstance(queued, PolicyResult) and queued.queued, queued
            pages: list[PolicyListResult] = []
            after = 0
            while True:
                page = await client.policy_list_page(after_id=after, limit=100)
                pages.append(page)
                if page.next_after_id is None:
                    break
                after = page.next_after_id
            whole = await client.policy_list()
    finally:
        holder.close()
    assert all(p.degraded for p in pages) and whole.degraded
    assert all(0 < len(p.policies) <= 100 for p in pages)
    assert sum(len(p.policies) for p in pages[:-1]) >= count - 100  # pages of 100 or cut
    ids = [r.id for p in pages for r in p.policies]
    assert ids == sorted(set(ids)) and len(ids) == count  # the queued add is not listed
    assert [r.id for r in whole.policies] == ids
    assert sha(-1) not in {r.file_hash for r in whole.policies}
    d.stop()


# --- the guard on a real Server: events and inline replies ---------------------------------


@contextlib.asynccontextmanager
async def guarded_server(tmp_path: Path) -> AsyncIterator[tuple[Server, Path]]:
    """A real Server (4 KiB frames) whose ``metrics`` pushes an oversized event
    then answers with an oversized reply, and whose inline ``breakers`` (an
    ordered route: its reply goes out corked) answers oversized too."""

    async def metrics(req: Metrics, ctx: RequestContext) -> MetricsReport:
        await ctx.connection.send(
            Event(id=req.id, topic="services", kind="service_state", reason="e" * 5000)
        )
        return MetricsReport(id=req.id, content_type="text/plain", text="m" * 5000)

    async def breakers(req: Breakers, ctx: RequestContext) -> BreakersReport:
        return BreakersReport(id=req.id, breakers=[BreakerInfo(name="b" * 5000, state="closed")])

    dispatcher = Dispatcher()
    core.register(dispatcher, limits=Limits(), request_shutdown=lambda: None)
    dispatcher.register(Metrics, metrics)
    dispatcher.register(Breakers, breakers, ordered=True)
    async with serving(tmp_path, dispatcher, ServerConfig(max_frame_bytes=4096)) as served:
        yield served


async def test_oversized_event_becomes_a_drop_notice_and_replies_a_typed_error(
    tmp_path: Path,
) -> None:
    async with guarded_server(tmp_path) as (srv, path), open_framed_connection(
        path, 4096
    ) as conn:
        await conn.send(Metrics(id=3))
        notice = await conn.receive()
        refused = await conn.receive()
        await conn.send(Breakers(id=4))  # inline: the corked path
        inline = await conn.receive()
        await conn.send(Ping(id=5))
        assert await conn.receive() == Pong(id=5)
    assert isinstance(notice, Event) and notice.id == 3, notice
    assert (notice.kind, notice.topic, notice.dropped) == ("events_dropped", "events", 1)
    assert notice.reason is not None and "'service_state'" in notice.reason
    for reply, request_id, tag in ((refused, 3, "metrics_report"), (inline, 4, "breakers_report")):
        assert isinstance(reply, Error) and reply.id == request_id, reply
        assert reply.code == ErrorCode.REPLY_TOO_LARGE and not reply.retryable
        assert f"the {tag} reply would be" in reply.message and "4096" in reply.message
        assert "after_id" not in reply.message  # no paging advice where there is none
    assert srv.errors_by_code[ErrorCode.REPLY_TOO_LARGE] == 2


# --- pure parts -------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 500), max_size=40), st.integers(-10, 5000))
def test_fit_count_is_the_longest_prefix_within_the_budget(sizes: list[int], budget: int) -> None:
    k = fit_count(sizes, budget)
    assert 0 <= k <= len(sizes)
    assert k == 0 or sum(sizes[:k]) <= budget
    assert k == len(sizes) or sum(sizes[: k + 1]) > budget


def _record(n: int, reason_len: int) -> PolicyRecord:
    return PolicyRecord(
        id=n, action="block", file_hash=sha(n), created_at=1.5, created_by="uid:1000",
        reason="x" * reason_len, hit_count=n * 1000,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 1500), min_size=1, max_size=60),
    st.integers(4096, 40_000),
    st.booleans(),
    st.integers(0, 2**63 - 1),
)
def test_fit_policy_page_takes_as_many_as_fit_and_never_passes_the_limit(
    reasons: list[int], limit: int, more: bool, request_id: int
) -> None:
    records = [_record(1 + 7 * i, n) for i, n in enumerate(reasons)]
    page = fit_policy_page(request_id, records, more=more, degraded=True, max_frame_bytes=limit)
    count = len(page.policies)
    assert count >= 1 and page.policies == records[:count]
    assert len(encode(page)) <= limit
    if count < len(records):
        assert page.next_after_id == records[count - 1].id
        bigger = PolicyListResult(id=request_id, policies=records[: count + 1], degraded=True,
                                  next_after_id=records[count].id)
        assert len(encode(bigger)) > limit - MAX_SLACK
    else:
        assert page.next_after_id == (records[-1].id if more else None)


def test_fit_policy_page_refuses_a_record_that_cannot_fit_alone() -> None:
    with pytest.raises(ReplyTooLargeError, match="policy #9 alone") as info:
        fit_policy_page(1, [_record(9, 5000)], more=False, degraded=False, max_frame_bytes=4096)
    assert info.value.retryable is False
    assert error_class_for_code(ErrorCode.REPLY_TOO_LARGE) is ReplyTooLargeError
    empty = fit_policy_page(1, [], more=False, degraded=False, max_frame_bytes=4096)
    assert empty.policies == [] and empty.next_after_id is None


def test_snapshot_pages_by_id_without_the_provisional_overlay() -> None:
    snap = PolicySnapshot([_record(i, 0) for i in (40, 3, 17, 8, 25)])
    snap.overlay(AddPolicy(seq=2, key="k", at=1.0, policy=PolicyDraft(action="warn",
                                                                     file_hash=sha(99))))
    first, more = snap.page(0, 2)
    assert [p.id for p in first] == [3, 8] and more
    snap.overlay(RemovePolicy(seq=3, key="r", at=1.0, policy_id=17))  # between two pages
    second, more = snap.page(8, 2)
    assert [p.id for p in second] == [25, 40] and not more
    assert snap.page(40, 2) == ([], False)
    assert -2 in snap.index  # the queued add is in the cache, never in a page


def test_store_pages_with_a_keyset_query_on_the_primary_key(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    seed_policies(db, 30)
    store = PolicyStore(db)
    store.ensure_open()
    statements: list[str] = []
    try:
        store._require().set_trace_callback(statements.append)
        page = store.list_policies_page(10, 5)
        assert [p.id for p in page] == [11, 12, 13, 14, 15]
        assert [p.id for p in store.list_policies_page(28, 5)] == [29, 30]
        assert store.list_policies_page(30, 5) == []
    finally:
        store.close()
    select = next(s for s in statements if s.startswith("SELECT * FROM policies"))
    assert "OFFSET" not in select.upper()
    with sqlite3.connect(db) as conn:
        plan = " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {select}"))
    assert "INTEGER PRIMARY KEY" in plan, plan


# --- the unpaged list: bounded work, one at a time -------------------------------------------


async def test_an_unpaged_list_over_the_budget_stops_loading_early(tmp_path: Path) -> None:
    """The whole list is loaded page by page and refused as soon as the rows
    counted pass the budget: 3 store calls, not the 25 of the whole table."""
    from sentinel_ipc.policy import PolicyConfig, open_policy_service
    from sentinel_ipc.policy.service import PolicyListTooLarge

    seed_policies(tmp_path / "policy_graph.db", SEEDED)
    calls: list[str] = []
    config = PolicyConfig(load_chunk=100, verify_interval=3600.0, refresh_interval=3600.0)
    async with open_policy_service(config, tmp_path) as svc:
        svc.add_query_observer(lambda operation, _seconds: calls.append(operation))
        page_bytes = len(msgspec.msgpack.encode((await svc.list_page(0, 100)).policies))
        calls.clear()
        with pytest.raises(PolicyListTooLarge) as info:
            await svc.list(max_bytes=SMALL_FRAME)
        assert SMALL_FRAME < info.value.counted <= SMALL_FRAME + 2 * page_bytes
        refused_after = calls.count("list")
        calls.clear()
        everything, degraded = await svc.list()
        assert not degraded and len(everything) == SEEDED
        assert calls.count("list") == SEEDED // 100 + 1
        # Within budget, the same list as unbounded.
        assert (await svc.list(max_bytes=2**40))[0] == everything
    assert refused_after <= SMALL_FRAME // page_bytes + 2 < SEEDED // 100


@pytest.fixture(scope="module")
def big_frame_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """2,500 policies and an 8 MiB frame: the whole list (~0.9 MB) fits one reply,
    and is larger than a Unix socket's buffer, so a peer that does not read
    holds its reply (and the daemon's writer) mid-frame."""
    d = start_seeded(
        tmp_path_factory.mktemp("whole"), SEEDED,
        {"server": {"max_frame_bytes": 8 * 1024 * 1024},
         "resilience": {"check_interval": 3600.0}},
    )
    try:
        yield d
    finally:
        d.stop()


async def test_one_unpaged_list_at_a_time_others_get_busy(
    big_frame_daemon: DaemonProcess,
) -> None:
    """A whole list is served one at a time, until its reply is written: while a
    peer that does not read holds one, another peer's unpaged request gets
    ``busy`` (retryable, naming paging) at once, its paged requests are served,
    and once the first reply is read the retry gets the whole list."""
    path = big_frame_daemon.socket_path
    frame = 8 * 1024 * 1024
    async with open_framed_connection(path, frame) as holder, \
            open_framed_connection(path, frame) as other:
        await holder.send(PolicyList(id=1))
        refused: Reply | None = None
        with trio.fail_after(10):
            while True:  # until the daemon is busy writing the holder's reply
                await other.send(PolicyList(id=2))
                refused = await other.receive()
                if isinstance(refused, Error):
                    break
                await trio.sleep(0.05)  # the holder's request had not started yet
        assert isinstance(refused, Error) and refused.id == 2, refused
        assert refused.code == ErrorCode.BUSY and refused.retryable, refused
        assert refused.retry_after_ms, refused
        assert "limit" in refused.message and "after_id" in refused.message
        await other.send(PolicyList(id=3, limit=10))
        page = await other.receive()
        assert isinstance(page, PolicyListResult) and page.id == 3
        assert [p.id for p in page.policies] == list(range(1, 11))
        whole = await holder.receive()
        assert isinstance(whole, PolicyListResult) and len(whole.policies) == SEEDED
        await other.send(PolicyList(id=4))
        again = await other.receive()
        assert isinstance(again, PolicyListResult) and len(again.policies) == SEEDED
