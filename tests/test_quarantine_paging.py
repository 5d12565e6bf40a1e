"""quarantine_list paging: the list of quarantined files, one frame at a time.

The quarantine holds up to 10,000 items, each with a URL and a filename a
client chose, so with a small ``max_frame_bytes`` the whole list is a reply
the server must refuse (``reply_too_large``). ``quarantine_list`` pages by
quarantine id (``after``, ``limit``, ``next_after``), each page cut to what
fits in a frame, and the clients fetch every page and return the list oldest
first, as they did before paging.

Real parts throughout: the quarantine directory is filled through the real
:class:`Quarantine` (real files, fsync'd), then served by a real daemon on a
real socket, listed by the real clients, the real sentinelctl and a client
running as ``nobody``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import trio
from daemon_harness import DaemonProcess, traversable_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from test_security import as_nobody, can_be_nobody

from sentinel_ipc.client import SyncClient, open_client
from sentinel_ipc.codec import encode
from sentinel_ipc.errors import ErrorCode, ProtocolError, ReplyTooLargeError
from sentinel_ipc.handlers.policy import fit_quarantine_page
from sentinel_ipc.messages import (
    Error,
    Ping,
    Pong,
    QuarantineItem,
    QuarantineList,
    QuarantineListResult,
)
from sentinel_ipc.paging import MAX_QUARANTINE_PAGE, MAX_SLACK, PAGING_ADVICE
from sentinel_ipc.policy import Quarantine
from sentinel_ipc.policy.service import QUARANTINE_DIRNAME
from sentinel_ipc.transport import open_framed_connection

ROOT = Path(__file__).resolve().parent.parent
SMALL_FRAME = 64 * 1024
SEEDED = 400


def sample(n: int) -> bytes:
    return f"quarantined sample {n}\n".encode() * (1 + n % 5)


async def seed_quarantine(directory: Path, count: int) -> list[QuarantineItem]:
    """``count`` items stored through the real Quarantine (URLs and filenames of
    varying length, so items differ in size; times in no relation to ids, so
    id order and oldest-first order differ). Returns them oldest first."""
    times = random.Random(20260101)
    quarantine = Quarantine(directory, wall_clock=lambda: 1_767_139_200.0 + times.randrange(10**6))
    limiter = trio.CapacityLimiter(8)

    async def store(n: int) -> None:
        async with limiter:
            data = sample(n)
            await quarantine.store(
                data,
                sha256=hashlib.sha256(data).hexdigest(),
                url=f"https://downloads.example/{n}/" + "p" * (n % 300) + ".exe",
                filename=f"file-{n}-" + "x" * (n % 50) + ".exe",
                rules=["Suspicious_PE"] if n % 2 else [],
            )

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(store, n)
    return await quarantine.list()


@pytest.fixture(scope="module")
def shared_base() -> Iterator[Path]:
    """A base dir ``nobody`` can traverse (pytest's tmp dirs are 0700)."""
    with traversable_dir("sentinel-qpage-") as base:
        yield base


@pytest.fixture(scope="module")
def seeded(shared_base: Path) -> Iterator[tuple[DaemonProcess, list[QuarantineItem]]]:
    """One daemon (64 KiB frames, socket open to other users) over 400 quarantined
    files, and those items oldest first as the Quarantine itself lists them."""
    d = DaemonProcess(
        shared_base,
        {"server": {"max_frame_bytes": SMALL_FRAME, "socket_mode": 0o666},
         "resilience": {"check_interval": 3600.0}},
    )
    d.data_dir.mkdir(parents=True, mode=0o700)
    items = trio.run(seed_quarantine, d.data_dir / QUARANTINE_DIRNAME, SEEDED)
    assert len(items) == SEEDED
    assert len(encode(QuarantineListResult(id=1, items=items))) > 2 * SMALL_FRAME
    d.start()
    os.chmod(d.socket_path.parent, 0o711)
    try:
        yield d, items
    finally:
        d.stop()


# --- the wire ---------------------------------------------------------------------------


async def test_the_unpaged_request_gets_reply_too_large_and_the_connection_lives(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    """A client from before paging: a typed error with the way out, never a frame
    it has to refuse, nor a silently shortened list."""
    d, _ = seeded
    async with open_framed_connection(d.socket_path, SMALL_FRAME) as conn:
        await conn.send(QuarantineList(id=7))
        refused = await conn.receive()
        await conn.send(QuarantineList(id=8, after="f" * 32))  # after without limit: all
        refused_too = await conn.receive()
        await conn.send(Ping(id=9))
        assert await conn.receive() == Pong(id=9)
    for reply, request_id in ((refused, 7), (refused_too, 8)):
        assert isinstance(reply, Error) and reply.id == request_id, reply
        assert reply.code == ErrorCode.REPLY_TOO_LARGE and reply.retryable is False
        size = int(reply.message.split(" would be ")[1].split(" bytes")[0])
        assert size > SMALL_FRAME
        assert "the quarantine_list_result reply" in reply.message
        assert PAGING_ADVICE[QuarantineListResult] in reply.message, reply.message
        assert "next_after" in reply.message and str(SMALL_FRAME) in reply.message


async def test_pages_hold_every_item_once_in_id_order_each_within_the_frame(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, items = seeded
    by_id = {i.quarantine_id: i for i in items}
    pages: list[QuarantineListResult] = []
    after: str | None = None
    async with open_framed_connection(d.socket_path, SMALL_FRAME) as conn:
        for request_id in range(1, 50):
            await conn.send(QuarantineList(id=request_id, after=after, limit=MAX_QUARANTINE_PAGE))
            page = await conn.receive()
            assert isinstance(page, QuarantineListResult) and page.id == request_id, page
            pages.append(page)
            if page.next_after is None:
                break
            assert page.next_after == page.items[-1].quarantine_id
            after = page.next_after
    assert len(pages) >= 3  # cut by the frame, not by the limit of 1000
    for page in pages:
        assert 0 < len(page.items) < MAX_QUARANTINE_PAGE
        assert len(encode(page)) <= SMALL_FRAME
    for page in pages[:-1]:  # as many as fit: one more would pass the frame
        nxt = pages[pages.index(page) + 1].items[0]
        longer = msgspec.structs.replace(page, items=[*page.items, nxt])
        assert len(encode(longer)) > SMALL_FRAME - MAX_SLACK
    ids = [i.quarantine_id for p in pages for i in p.items]
    assert ids == sorted(by_id) and len(ids) == SEEDED  # each once, in id order
    assert [i for p in pages for i in p.items] == [by_id[q] for q in ids]


async def test_a_limit_is_honoured_and_after_starts_past_the_given_id(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, items = seeded
    ids = sorted(i.quarantine_id for i in items)
    async with open_client(d.socket_path) as client:
        first = await client.quarantine_list_page(limit=7)
        middle = await client.quarantine_list_page(after=ids[9], limit=10)
        last = await client.quarantine_list_page(after=ids[-4], limit=10)
        past = await client.quarantine_list_page(after="f" * 32, limit=10)
    assert [i.quarantine_id for i in first.items] == ids[:7] and first.next_after == ids[6]
    assert [i.quarantine_id for i in middle.items] == ids[10:20]
    assert middle.next_after == ids[19]
    assert [i.quarantine_id for i in last.items] == ids[-3:] and last.next_after is None
    assert past.items == [] and past.next_after is None


@pytest.mark.parametrize(
    ("after", "limit", "field"),
    [(None, 0, "limit"), (None, MAX_QUARANTINE_PAGE + 1, "limit"), (None, -1, "limit"),
     ("not-an-id", 10, "after"), ("A" * 32, 10, "after"), ("0" * 33, 10, "after")],
)
async def test_a_limit_or_after_out_of_range_is_invalid_message(
    seeded: tuple[DaemonProcess, list[QuarantineItem]], after: str | None, limit: int,
    field: str,
) -> None:
    d, _ = seeded
    async with open_client(d.socket_path) as client:
        with pytest.raises(ProtocolError) as info:
            await client.quarantine_list_page(after=after, limit=limit)
        assert info.value.code == ErrorCode.INVALID_MESSAGE
        assert info.value.retryable is False
        assert f"quarantine_list.{field}" in info.value.message
        await client.ping()
        assert client.connects == 1


# --- the clients --------------------------------------------------------------------------


async def test_client_quarantine_list_returns_every_item_oldest_first(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, items = seeded
    async with open_client(d.socket_path) as client:
        result = await client.quarantine_list(timeout=10)
        assert client.connects == 1
    assert isinstance(result, QuarantineListResult) and result.next_after is None
    assert result.items == items  # what the unpaged reply held: oldest first
    assert [i.quarantine_id for i in items] != sorted(i.quarantine_id for i in items)


def test_sync_client_lists_every_item_and_one_page(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, items = seeded
    ids = sorted(i.quarantine_id for i in items)
    with SyncClient(d.socket_path) as client:
        whole = client.quarantine_list(timeout=10)
        page = client.quarantine_list_page(after=ids[99], limit=5)
    assert whole.items == items and whole.next_after is None
    assert [i.quarantine_id for i in page.items] == ids[100:105]
    assert page.next_after == ids[104]


def test_sentinelctl_quarantine_list_prints_every_item(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, items = seeded
    base = [sys.executable, "-m", "sentinel_ipc.cli.sentinelctl",
            "--socket", str(d.socket_path), "--timeout", "10"]
    listed = subprocess.run(
        [*base, "--json", "quarantine", "list"], capture_output=True, text=True, timeout=60,
        cwd=ROOT,
    )
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)["items"]
    assert [i["quarantine_id"] for i in shown] == [i.quarantine_id for i in items]

    table = subprocess.run(
        [*base, "quarantine", "list"], capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "COLUMNS": "250"},
    )
    assert table.returncode == 0, table.stderr
    assert re.findall(r"\b[0-9a-f]{32}\b", table.stdout) == [i.quarantine_id for i in items]


@can_be_nobody
def test_a_non_admin_peer_is_refused_paged_or_not(
    seeded: tuple[DaemonProcess, list[QuarantineItem]],
) -> None:
    d, _ = seeded
    answers = as_nobody(d.socket_path, [
        QuarantineList(id=3, limit=10),
        QuarantineList(id=4, after="0" * 32, limit=1),
        QuarantineList(id=5),
        Ping(id=6),
    ])
    for answer, request_id in zip(answers[:3], (3, 4, 5), strict=True):
        assert isinstance(answer, Error) and answer.id == request_id, answer
        assert answer.code == ErrorCode.FORBIDDEN
    assert answers[3] == Pong(id=6)  # the socket itself was reachable: refused by role


# --- the Quarantine's keyset listing, on real files ---------------------------------------


async def test_a_delete_and_a_store_between_pages_shift_no_other_item(tmp_path: Path) -> None:
    """Keyed by id, not by position: an item deleted or added between two pages
    does not make another one listed twice or skipped."""
    quarantine = Quarantine(tmp_path / "q")
    for n in range(30):
        data = sample(n)
        await quarantine.store(data, sha256=hashlib.sha256(data).hexdigest())
    ids = sorted(i.quarantine_id for i in await quarantine.list())
    first, more = await quarantine.list_page(None, 10)
    assert [i.quarantine_id for i in first] == ids[:10] and more
    await quarantine.delete(ids[3])  # already listed
    await quarantine.delete(ids[15])  # not yet listed
    extra = b"stored between two pages"
    added = await quarantine.store(extra, sha256=hashlib.sha256(extra).hexdigest())
    rest: list[str] = []
    after = first[-1].quarantine_id
    while True:
        page, more = await quarantine.list_page(after, 10)
        rest += [i.quarantine_id for i in page]
        if not more:
            break
        after = page[-1].quarantine_id
    expected = [q for q in ids[10:] if q != ids[15]]
    if added.quarantine_id > ids[9]:
        expected = sorted([*expected, added.quarantine_id])
    assert rest == expected
    assert await quarantine.list_page(ids[-1] if ids[-1] > added.quarantine_id
                                      else added.quarantine_id, 10) == ([], False)


# --- pure parts -----------------------------------------------------------------------------


def _item(n: int, url_len: int) -> QuarantineItem:
    return QuarantineItem(
        quarantine_id=f"{n:032x}", sha256=f"{n:064x}", size=n, url="u" * url_len,
        filename="setup.exe", rules=["R"], quarantined_at=1_767_139_200.5,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(0, 1500), min_size=1, max_size=60),
    st.integers(4096, 40_000),
    st.booleans(),
    st.integers(0, 2**63 - 1),
)
def test_fit_quarantine_page_takes_as_many_as_fit_and_never_passes_the_limit(
    urls: list[int], limit: int, more: bool, request_id: int
) -> None:
    items = [_item(i + 1, n) for i, n in enumerate(urls)]
    page = fit_quarantine_page(request_id, items, more=more, max_frame_bytes=limit)
    count = len(page.items)
    assert count >= 1 and page.items == items[:count]
    assert len(encode(page)) <= limit
    if count < len(items):
        assert page.next_after == items[count - 1].quarantine_id
        bigger = QuarantineListResult(id=request_id, items=items[: count + 1],
                                      next_after=items[count].quarantine_id)
        assert len(encode(bigger)) > limit - MAX_SLACK
    else:
        assert page.next_after == (items[-1].quarantine_id if more else None)


def test_fit_quarantine_page_refuses_an_item_that_cannot_fit_alone() -> None:
    big = _item(9, 5000)
    with pytest.raises(ReplyTooLargeError, match=f"item {big.quarantine_id} alone") as info:
        fit_quarantine_page(1, [big], more=False, max_frame_bytes=4096)
    assert info.value.retryable is False
    assert f"after={big.quarantine_id}" in info.value.message  # how to page on past it
    empty = fit_quarantine_page(1, [], more=False, max_frame_bytes=4096)
    assert empty.items == [] and empty.next_after is None
