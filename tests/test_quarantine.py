"""Quarantine: bytes kept aside (0700 dir, 0400 file, JSON sidecar), listed,
restored to a descriptor or a new path, deleted; never through a bad id."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from sentinel_ipc.audit import open_audit_log
from sentinel_ipc.errors import NotFoundError, ScanError
from sentinel_ipc.policy.quarantine import Quarantine, QuarantineError, QuarantineFullError

DATA = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*" * 100
SHA = hashlib.sha256(DATA).hexdigest()


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


async def test_store_list_restore_delete(tmp_path: Path) -> None:
    qdir = tmp_path / "quarantine"
    async with open_audit_log(tmp_path / "audit.jsonl") as audit:
        q = Quarantine(qdir, audit=audit)
        item = await q.store(
            DATA, sha256=SHA, url="https://x/e.com", filename="e.com", rules=["EICAR"]
        )
        assert (item.sha256, item.size, item.rules, item.filename) == (
            SHA,
            len(DATA),
            ["EICAR"],
            "e.com",
        )
        assert mode(qdir) == 0o700
        blob = qdir / f"{item.quarantine_id}.bin"
        assert mode(blob) == 0o400 and blob.read_bytes() == DATA
        sidecar = json.loads((qdir / f"{item.quarantine_id}.json").read_text())
        assert sidecar["url"] == "https://x/e.com" and sidecar["sha256"] == SHA
        assert sidecar["quarantined_at"] > 0

        # the same file again is kept once
        again = await q.store(DATA, sha256=SHA, url="https://y/", filename=None, rules=[])
        assert again.quarantine_id == item.quarantine_id
        assert [i.quarantine_id for i in await q.list()] == [item.quarantine_id]

        r, w = os.pipe()  # as a client would pass with SCM_RIGHTS (DATA fits the pipe buffer)
        try:
            assert await q.restore(item.quarantine_id, w) == len(DATA)
            os.close(w)
            with os.fdopen(r, "rb") as reader:
                assert reader.read() == DATA
        except BaseException:
            os.close(w)
            raise
        out = tmp_path / "restored.bin"
        fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            assert await q.restore(item.quarantine_id, fd) == len(DATA)
        finally:
            os.close(fd)
        assert out.read_bytes() == DATA
        dest = tmp_path / "again.bin"
        assert await q.restore_to_path(item.quarantine_id, dest) == len(DATA)
        assert mode(dest) == 0o600 and dest.read_bytes() == DATA
        with pytest.raises(QuarantineError):  # never overwrites
            await q.restore_to_path(item.quarantine_id, dest)

        await q.delete(item.quarantine_id)
        assert await q.list() == []
        assert list(qdir.iterdir()) == []
        with pytest.raises(NotFoundError):
            await q.delete(item.quarantine_id)
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert (
        kinds.count("quarantine") == 2
        and "quarantine_restore" in kinds
        and "quarantine_delete" in kinds
    )


async def test_store_from_a_descriptor_leaves_its_position_alone(tmp_path: Path) -> None:
    src = tmp_path / "download.bin"
    src.write_bytes(DATA)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.lseek(fd, 17, os.SEEK_SET)
        item = await Quarantine(tmp_path / "q").store(fd, sha256=SHA)
        assert os.lseek(fd, 0, os.SEEK_CUR) == 17
    finally:
        os.close(fd)
    assert item.size == len(DATA)


async def test_store_from_a_descriptor_keeps_only_the_scanned_size(tmp_path: Path) -> None:
    """A client's reused memfd holds stale bytes past the scanned size: only the
    scanned bytes are kept (and must hash right); without the size, the whole
    file does not hash to the scanned sha256 and nothing is kept."""
    fd = os.memfd_create("reused-buffer")
    try:
        os.pwrite(fd, DATA + b"stale bytes of an earlier download", 0)
        q = Quarantine(tmp_path / "q")
        with pytest.raises(ScanError, match="changed after it was scanned"):
            await q.store(fd, sha256=SHA)
        item = await q.store(fd, sha256=SHA, size=len(DATA))
    finally:
        os.close(fd)
    assert item.size == len(DATA)
    assert (tmp_path / "q" / f"{item.quarantine_id}.bin").read_bytes() == DATA


async def test_changed_file_is_refused(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    with pytest.raises(ScanError, match="changed after it was scanned"):
        await q.store(DATA + b"!", sha256=SHA)
    assert list((tmp_path / "q").iterdir()) == []


async def test_tampered_quarantine_file_is_not_restored(tmp_path: Path) -> None:
    q = Quarantine(tmp_path / "q")
    item = await q.store(DATA, sha256=SHA)
    blob = tmp_path / "q" / f"{item.quarantine_id}.bin"
    os.chmod(blob, 0o600)
    blob.write_bytes(b"evil" + DATA[4:])
    with pytest.raises(QuarantineError, match="altered"):
        await q.restore_to_path(item.quarantine_id, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qid", ["../../etc/passwd", "", "ABCDEF" * 6, "0" * 31, "0" * 32 + "/x"])
async def test_bad_ids_never_reach_the_file_system(tmp_path: Path, qid: str) -> None:
    q = Quarantine(tmp_path / "q")
    with pytest.raises(NotFoundError):
        await q.delete(qid)
    with pytest.raises(NotFoundError):
        await q.restore(qid, 1)


async def test_leftovers_of_an_interrupted_store_are_cleared(tmp_path: Path) -> None:
    qdir = tmp_path / "q"
    q = Quarantine(qdir)
    item = await q.store(DATA, sha256=SHA)
    (qdir / f".{'1' * 32}.bin.tmp").write_bytes(b"partial")
    (qdir / f"{'2' * 32}.bin").write_bytes(b"no sidecar")
    os.chmod(qdir, 0o755)
    Quarantine(qdir)
    assert sorted(p.name for p in qdir.iterdir()) == sorted(
        [f"{item.quarantine_id}.bin", f"{item.quarantine_id}.json"]
    )
    assert mode(qdir) == 0o700


def _sample(n: int, size: int) -> tuple[bytes, str]:
    data = n.to_bytes(4, "big") * (size // 4)
    return data, hashlib.sha256(data).hexdigest()


async def test_a_store_past_the_byte_bound_is_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    """Which files are quarantined depends on what clients send: the directory
    must not grow without a bound."""
    qdir = tmp_path / "quarantine"
    q = Quarantine(qdir, max_bytes=10_000)
    first, first_sha = _sample(1, 6_000)
    kept = await q.store(first, sha256=first_sha)
    second, second_sha = _sample(2, 6_000)
    with pytest.raises(QuarantineFullError, match=r"quarantine is full .* 6000 bytes") as info:
        await q.store(second, sha256=second_sha)
    assert not info.value.retryable
    assert sorted(p.name for p in qdir.iterdir()) == sorted(
        [f"{kept.quarantine_id}.bin", f"{kept.quarantine_id}.json"]
    )
    # The same file again needs no room; after a delete the other one fits.
    assert (await q.store(first, sha256=first_sha)).quarantine_id == kept.quarantine_id
    await q.delete(kept.quarantine_id)
    assert (await q.store(second, sha256=second_sha)).size == 6_000
    # A descriptor counts the bytes that will be read (the scanned size), not the file's.
    path = tmp_path / "big.bin"
    third, third_sha = _sample(3, 4_000)
    path.write_bytes(third + b"\0" * 50_000)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert (await q.store(fd, sha256=third_sha, size=4_000)).size == 4_000
    finally:
        os.close(fd)


async def test_the_item_bound_and_the_totals_of_an_existing_directory(tmp_path: Path) -> None:
    qdir = tmp_path / "quarantine"
    q = Quarantine(qdir, max_items=2)
    for n in (1, 2):
        data, sha = _sample(n, 100)
        await q.store(data, sha256=sha)
    data, sha = _sample(3, 100)
    with pytest.raises(QuarantineFullError, match="2 items"):
        await q.store(data, sha256=sha)
    # A restarted daemon counts what is already there.
    again = Quarantine(qdir, max_items=3, max_bytes=250)
    with pytest.raises(QuarantineFullError, match="200 bytes"):
        await again.store(data, sha256=sha)  # 200 + 100 > 250
    assert len(await again.list()) == 2
    with pytest.raises(ValueError, match="negative"):
        Quarantine(qdir, max_bytes=-1)


async def test_concurrent_stores_never_pass_the_bound_together(tmp_path: Path) -> None:
    """Stores run on worker threads at once: room is reserved before writing."""
    import trio

    q = Quarantine(tmp_path / "quarantine", max_bytes=5 * 40_000)
    outcomes: list[str] = []

    async def one(n: int) -> None:
        data, sha = _sample(n, 40_000)
        try:
            await q.store(data, sha256=sha)
            outcomes.append("kept")
        except QuarantineFullError:
            outcomes.append("full")

    async with trio.open_nursery() as nursery:
        for n in range(12):
            nursery.start_soon(one, n)
    assert sorted(outcomes) == ["full"] * 7 + ["kept"] * 5
    assert sum(i.size for i in await q.list()) == 5 * 40_000
