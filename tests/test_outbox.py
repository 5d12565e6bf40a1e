"""The outbox: journal file (append + fsync, torn tails, atomic compaction,
lock), ordered delivery with idempotency keys, bounds, persistence across a
client that dies, and policy writes end to end once the daemon serves them."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
from client_peer import PeerConn, start_peer

from sentinel_ipc.client import (
    IPC_BREAKER,
    ClientConfig,
    DeliveryPendingError,
    OutboxError,
    OutboxFullError,
    open_client,
)
from sentinel_ipc.client.outbox import COMPACT_AFTER, OutboxJournal, _Record
from sentinel_ipc.codec import decode_request, encode
from sentinel_ipc.errors import ErrorCode, PolicyValidationError, UnknownMessageTypeError
from sentinel_ipc.messages import Error, Ping, PolicyAdd, PolicyResult, Pong
from sentinel_ipc.resilience import RETRY_PRESETS

#: The ipc retry preset's shape with millisecond waits (no test sleeps through a backoff).
FAST_RETRY = dataclasses.replace(RETRY_PRESETS["ipc"], initial=0.001, max_delay=0.005)


# --- the journal file ----------------------------------------------------------------


def _put(key: str) -> _Record:
    return _Record("put", key, encode(PolicyAdd(id=0, action="block", sha256=key * 64)), 1.5)


def test_journal_replays_puts_minus_dones_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    j = OutboxJournal(path)
    assert j.load() == []
    for key in "abc":
        j.append(_put(key))
    j.append(_Record("done", "b"))
    j.close()
    j = OutboxJournal(path)
    loaded = j.load()
    j.close()
    assert [k for k, _, _ in loaded] == ["a", "c"]
    request = decode_request(loaded[1][1])
    assert isinstance(request, PolicyAdd) and request.sha256 == "c" * 64
    assert loaded[0][2] == 1.5


@pytest.mark.parametrize("damage", ["torn", "crc"])
def test_journal_cuts_a_damaged_tail_and_keeps_a_copy(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "outbox.log"
    j = OutboxJournal(path)
    j.load()
    j.append(_put("a"))
    good = path.stat().st_size
    j.append(_put("b"))
    j.close()
    data = path.read_bytes()
    if damage == "torn":  # the process died in the middle of the append
        path.write_bytes(data[: good + 7])
    else:  # a flipped bit in the last record's body
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    j = OutboxJournal(path)
    assert [k for k, _, _ in j.load()] == ["a"]
    assert path.stat().st_size == good  # cut back to the last whole record
    assert len(list(tmp_path.glob("outbox.log.damaged-*"))) == 1
    j.append(_put("c"))  # and appends continue cleanly after it
    j.close()
    j = OutboxJournal(path)
    assert [k for k, _, _ in j.load()] == ["a", "c"]
    j.close()


def test_journal_compaction_is_atomic_and_keeps_pending(tmp_path: Path) -> None:
    path = tmp_path / "outbox.log"
    j = OutboxJournal(path)
    j.load()
    j.append(_put("keep1"))
    for i in range(COMPACT_AFTER):
        j.append(_put(f"k{i}"))
        j.append(_Record("done", f"k{i}"))
    j.append(_put("keep2"))
    assert j.needs_compaction()
    before = path.stat().st_size
    j.compact([_put("keep1"), _put("keep2")])
    assert not j.needs_compaction()
    assert path.stat().st_size < before / 10
    assert not list(tmp_path.glob("*.tmp"))
    j.append(_put("after"))
    j.close()
    j = OutboxJournal(path)
    assert [k for k, _, _ in j.load()] == ["keep1", "keep2", "after"]
    j.close()


class ManualTime:
    """A clock and a sleep that only advances it, recording each delay; an
    optional action runs at a given sleep (the fault ends in the backoff)."""

    def __init__(self, on_sleep: dict[int, Any] | None = None) -> None:
        self.now = 0.0
        self.delays: list[float] = []
        self.on_sleep = on_sleep or {}

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds
        action = self.on_sleep.get(len(self.delays))
        if action is not None:
            action()


def test_journal_is_locked_against_a_second_client(tmp_path: Path) -> None:
    """A lock held for good: the file retry policy's 3 attempts (0.2 s, then
    0.4 s, with jitter up to 10 %), then a clear error."""
    path = tmp_path / "outbox.log"
    first = OutboxJournal(path)
    time_ = ManualTime()
    with pytest.raises(OutboxError, match="in use by another client"):
        OutboxJournal(path, sleep=time_.sleep, clock=time_.clock)
    assert len(time_.delays) == 2, time_.delays
    assert 0.2 <= time_.delays[0] <= 0.22 and 0.4 <= time_.delays[1] <= 0.44, time_.delays
    first.close()
    OutboxJournal(path).close()


def test_a_lock_released_during_the_backoff_is_taken(tmp_path: Path) -> None:
    """The old process of a restarted program still holds the lock (here a
    real one, from another process) and lets go while we wait: the journal
    opens, with its records, instead of failing."""
    path = tmp_path / "outbox.log"
    first = OutboxJournal(path)
    assert first.load() == []
    first.append(_put("survives the restart"))
    first.close()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, sys
            fd = os.open({str(path) + ".lock"!r}, os.O_RDWR)
            fcntl.flock(fd, fcntl.LOCK_EX)
            print("held", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline().strip() == "held"

        def release() -> None:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)

        time_ = ManualTime(on_sleep={1: release})
        journal = OutboxJournal(path, sleep=time_.sleep, clock=time_.clock)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert len(time_.delays) == 1
    assert [k for k, _, _ in journal.load()] == ["survives the restart"]
    journal.close()


# --- delivery (scripted peer: it records what arrives, and can drop a connection) ------


async def test_in_order_with_keys_resent_after_a_lost_connection(tmp_path: Path) -> None:
    path = tmp_path / "peer.sock"
    arrivals: list[tuple[int, str]] = []  # (connection number, idempotency key)
    applied: dict[str, int] = {}  # what a daemon deduplicating by key would store

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        while True:
            request, _ = await conn.recv()
            if request is None:
                return
            assert isinstance(request, PolicyAdd) and request.idempotency_key
            arrivals.append((conn.number, request.idempotency_key))
            policy_id = applied.setdefault(request.idempotency_key, len(applied) + 1)
            if conn.number == 1 and len(arrivals) == 2:
                return  # applied, but the connection dies before the reply
            await conn.send(PolicyResult(id=request.id, policy_id=policy_id))

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            tickets = [
                await client.queue_policy_add("block", sha256=f"{i:064x}") for i in range(5)
            ]
            keys = [t.key for t in tickets]
            assert len(set(keys)) == 5
            results = [await t.wait() for t in tickets]
            await client.flush_outbox()
        # Each key applied once, in submission order; the one in flight when the
        # connection died was re-sent with the same key on the new connection.
        assert list(applied) == keys
        assert all(isinstance(r, PolicyResult) for r in results)
        assert [r.policy_id for r in results if isinstance(r, PolicyResult)] == [1, 2, 3, 4, 5]
        assert arrivals[:2] == [(1, keys[0]), (1, keys[1])]
        assert arrivals[2] == (2, keys[1])
        assert [k for _, k in arrivals[2:]] == keys[1:]
        nursery.cancel_scope.cancel()


async def test_a_refused_write_settles_with_its_error_and_the_queue_moves_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peer.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        first = True
        while True:
            request, _ = await conn.recv()
            if request is None:
                return
            rid = request.id  # type: ignore[attr-defined]
            if first:
                first = False
                await conn.send(
                    Error(id=rid, code=ErrorCode.POLICY_INVALID, message="sha256 is not hex")
                )
            else:
                await conn.send(PolicyResult(id=rid, policy_id=9))

    async with trio.open_nursery() as nursery:
        await start_peer(nursery, path, script)
        async with open_client(path) as client:
            bad = await client.queue_policy_add("block", sha256="zz")
            good = await client.queue_policy_add("block", sha256="a" * 64)
            with pytest.raises(PolicyValidationError, match="not hex"):
                await bad.wait()
            reply = await good.wait()
            assert isinstance(reply, PolicyResult) and reply.policy_id == 9
            assert client.outbox.rejected == 1 and client.outbox.delivered == 1
        nursery.cancel_scope.cancel()


async def test_await_delivery_times_out_but_the_write_still_arrives(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"

    async def script(conn: PeerConn) -> None:
        await conn.greet()
        request, _ = await conn.recv()
        assert isinstance(request, PolicyAdd)
        await conn.send(PolicyResult(id=request.id, policy_id=42))
        await conn.recv()

    config = ClientConfig(
        retry=FAST_RETRY, breaker=dataclasses.replace(IPC_BREAKER, open_timeout=0.2)
    )
    async with open_client(path, config=config) as client, trio.open_nursery() as nursery:
        with pytest.raises(DeliveryPendingError, match="stays queued") as info:
            await client.policy_add("quarantine", url_pattern="*.exe", timeout=0.2)
        ticket = info.value.ticket
        assert not ticket.done and ticket.attempts >= 1
        assert client.outbox.pending() == [ticket]
        await start_peer(nursery, path, script)
        with trio.fail_after(15):
            reply = await ticket.wait()
        assert isinstance(reply, PolicyResult) and reply.policy_id == 42
        nursery.cancel_scope.cancel()


async def test_the_outbox_is_bounded(tmp_path: Path) -> None:
    config = ClientConfig(outbox_max_items=3)
    async with open_client(tmp_path / "absent.sock", config=config) as client:
        for _ in range(3):
            await client.queue_policy_remove(1)
        with pytest.raises(OutboxFullError, match="limit 3") as info:
            await client.queue_policy_remove(1)
        assert info.value.retryable
        assert len(client.outbox) == 3


# --- persistence across a client that dies (real daemon) ----------------------------------

_DYING_CLIENT = textwrap.dedent(
    """
    import os, sys, trio
    from sentinel_ipc.client import ClientConfig, open_client
    from sentinel_ipc.messages import Ping

    async def main():
        config = ClientConfig(outbox_path=sys.argv[2])
        async with open_client(sys.argv[1], config=config) as client:
            for _ in range(3):
                ticket = await client.submit(Ping(id=0))
                print(ticket.key, flush=True)
            os.kill(os.getpid(), 9)  # dies with the daemon unreachable

    trio.run(main)
    """
)


async def test_a_killed_client_leaves_its_writes_for_the_next_one(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(start=False)
    outbox_path = tmp_path / "client" / "outbox.log"
    proc = await trio.run_process(
        [sys.executable, "-c", _DYING_CLIENT, str(d.socket_path), str(outbox_path)],
        capture_stdout=True,
        check=False,
    )
    assert proc.returncode == -9
    keys = proc.stdout.decode().split()
    assert len(keys) == 3

    # A short open timeout: the breaker opened while the daemon was away.
    config = ClientConfig(
        outbox_path=outbox_path,
        breaker=dataclasses.replace(IPC_BREAKER, open_timeout=0.5),
        retry=FAST_RETRY,
    )
    async with open_client(d.socket_path, config=config) as client:
        pending = client.outbox.pending()
        assert [t.key for t in pending] == keys
        assert all(isinstance(t.request, Ping) for t in pending)
        await trio.to_thread.run_sync(d.start)
        await client.flush_outbox(timeout=15)
        for ticket in pending:
            assert isinstance(await ticket.wait(), Pong)
    async with open_client(d.socket_path, config=config) as client:
        assert len(client.outbox) == 0  # delivered ones are not replayed


# --- policy writes end to end (turns on when the daemon serves policy_add) -----------------


async def test_policy_writes_arrive_exactly_once_through_a_daemon_kill(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory()
    config = ClientConfig(
        outbox_path=tmp_path / "outbox.log",
        breaker=dataclasses.replace(IPC_BREAKER, open_timeout=0.5),
        retry=FAST_RETRY,
    )
    shas = [hashlib.sha256(os.urandom(16)).hexdigest() for _ in range(6)]
    async with open_client(d.socket_path, config=config) as client:
        try:
            await client.policy_add("block", sha256=shas[0], reason="probe")
        except UnknownMessageTypeError:
            pytest.skip("policy_add not served yet")
        d.kill()
        tickets = [
            await client.queue_policy_add("block", sha256=sha, reason="outbox")
            for sha in shas[1:]
        ]
        await trio.to_thread.run_sync(d.start)
        await client.flush_outbox(timeout=30)
        for ticket in tickets:
            assert isinstance(await ticket.wait(), PolicyResult)
        listed = (await client.policy_list()).policies
    hashes = [p.file_hash for p in listed]
    for sha in shas:
        assert hashes.count(sha) == 1, sha
