"""Issue 5 end to end, over the wire, against a real ``sentineld``.

Every point that a client can see: the policy messages (add / remove / list /
query / threats), the decision order through real scans of real files by the
real yara workers, ``policy_id`` and ``reason`` on the ``scan_result``, the
``threat_history`` rows, admin-only writes refused to another uid (a client
run as ``nobody``) and audited, and the quarantine round trip (store, list,
restore into a descriptor passed with SCM_RIGHTS, delete).

The database faults of point 7 are in ``test_policy_faults_daemon.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from samples import EICAR

from sentinel_ipc.messages import (
    Error,
    PolicyAdd,
    PolicyDecision,
    PolicyList,
    PolicyListResult,
    PolicyQuery,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
    QuarantineDelete,
    QuarantineList,
    QuarantineListResult,
    QuarantineRestore,
    QuarantineResult,
    Reply,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ScanFd,
    ScanResult,
    ThreatRecord,
    Threats,
    ThreatsResult,
)
from sentinel_ipc.scanning import engine as scanning_engine
from sentinel_ipc.transport import FramedConnection, open_framed_connection

BUILTIN_RULES = Path(scanning_engine.__file__).parent / "builtin_rules"

#: EICAR inside a larger file: rule ``EICAR_Embedded`` (severity medium), not ``EICAR_Test_File``.
EMBEDDED = b"MZ-not-really " * 20 + EICAR + b" trailer"
#: Matches only the custom low-severity rule.
LOW = b"some text SENTINEL-TEST-LOW-MARKER more text"
#: Matches the custom low rule and EICAR_Embedded.
TWO_RULES = b"SENTINEL-TEST-LOW-MARKER " + EMBEDDED

CUSTOM_RULES = """
rule Sentinel_Test_Low
{
    meta:
        severity = "low"
        description = "test rule with low severity"
    strings:
        $a = "SENTINEL-TEST-LOW-MARKER"
    condition:
        $a
}
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rules_dir(base: Path) -> Path:
    """The built-in rules plus one low-severity rule."""
    d = base / "rules"
    d.mkdir()
    for f in BUILTIN_RULES.glob("*.yar"):
        shutil.copy(f, d / f.name)
    (d / "sentinel_test.yar").write_text(CUSTOM_RULES)
    return d


def daemon_config(base: Path, **policy: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "server": {"socket_mode": 0o666},
        "scanner": {"workers": 1, "rules_dir": str(rules_dir(base))},
        "rate_limit": {"burst": 1000, "scans_per_second": 1000.0},
    }
    if policy:
        config["policy"] = policy
    return config


class Wire:
    """Sequential requests over one framed connection, with fresh ids."""

    def __init__(self, conn: FramedConnection) -> None:
        self.conn = conn
        self.next_id = 100

    async def call(
        self, cls: type[msgspec.Struct], fds: tuple[int, ...] = (), **fields: Any
    ) -> Reply:
        self.next_id += 1
        msg = cls(id=self.next_id, **fields)
        await self.conn.send(msg, fds=fds)
        with trio.fail_after(20):
            reply = await self.conn.receive()
        assert reply.id == self.next_id, reply
        return reply

    async def ok(
        self, cls: type[msgspec.Struct], expect: type[Any], fds: tuple[int, ...] = (), **fields: Any
    ) -> Any:
        reply = await self.call(cls, fds, **fields)
        assert isinstance(reply, expect), reply
        return reply

    async def error(self, cls: type[msgspec.Struct], code: str, **fields: Any) -> Error:
        reply = await self.call(cls, **fields)
        assert isinstance(reply, Error), reply
        assert reply.code == code, reply
        return reply

    async def scan(self, data: bytes, **meta: Any) -> ScanResult:
        result: ScanResult = await self.ok(Scan, ScanResult, data=data, **meta)
        assert result.sha256 == sha(data)
        return result

    async def add(self, action: str, **fields: Any) -> int:
        r: PolicyResult = await self.ok(PolicyAdd, PolicyResult, action=action, **fields)
        assert not r.queued and r.policy_id is not None
        return r.policy_id

    async def policies(self) -> dict[int, PolicyRecord]:
        r: PolicyListResult = await self.ok(PolicyList, PolicyListResult)
        assert not r.degraded
        return {p.id: p for p in r.policies}

    async def threats(self, limit: int = 100) -> list[ThreatRecord]:
        r: ThreatsResult = await self.ok(Threats, ThreatsResult, limit=limit)
        return r.threats


def audit_events(data_dir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    path = data_dir / "audit.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if kind is None or e.get("kind") == kind]


def wait_audit(
    data_dir: Path, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> list[dict[str, Any]]:
    """Audit records are written off the event loop: poll for them."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in audit_events(data_dir) if pred(e)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --- decisions and messages ---------------------------------------------------


async def test_policy_messages_and_decision_order_through_real_scans(
    daemon_factory: Any, tmp_path: Path
) -> None:
    d = daemon_factory(config=daemon_config(tmp_path))
    clean = os.urandom(4096)
    known_bad = os.urandom(4096)
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)

        # Without policies: the rule tiers. EICAR (severity high) -> default block;
        # the low-severity rule -> warn; no match -> allow.
        r = await w.scan(EICAR, url="https://dl.example/eicar.com", filename="eicar.com")
        assert (r.action, r.policy_id, r.degraded) == ("block", None, False)
        assert [m.rule for m in r.matches] == ["EICAR_Test_File"]
        assert r.reason and "EICAR_Test_File" in r.reason and "default" in r.reason
        r = await w.scan(LOW)
        assert (r.action, r.policy_id) == ("warn", None)
        assert [m.rule for m in r.matches] == ["Sentinel_Test_Low"]
        assert r.reason and "low" in r.reason
        r = await w.scan(clean)
        assert (r.action, r.policy_id, r.matches) == ("allow", None, [])
        assert r.reason

        # 1. a sha256 allow overrides the match ("always allow this file")
        allow_eicar = await w.add("allow", sha256=sha(EICAR), reason="known test file")
        r = await w.scan(EICAR, url="https://dl.example/eicar.com")
        assert (r.action, r.policy_id) == ("allow", allow_eicar)
        assert [m.rule for m in r.matches] == ["EICAR_Test_File"]  # still reported
        assert r.reason and "sha256" in r.reason
        # ... and a sha256 block needs no match (a known-bad file)
        block_bad = await w.add("block", sha256=sha(known_bad))
        r = await w.scan(known_bad)
        assert (r.action, r.policy_id, r.matches) == ("block", block_bad, [])

        # 2. URL patterns: a block for a clean file; an allow beats the rule tiers,
        # but not a sha256 policy.
        block_site = await w.add("block", url_pattern="https://evil.example/*")
        r = await w.scan(clean, url="https://evil.example/files/setup.bin")
        assert (r.action, r.policy_id) == ("block", block_site)
        r = await w.scan(clean, url="https://good.example/evil.example/x")
        assert (r.action, r.policy_id) == ("allow", None)
        allow_site = await w.add("allow", url_pattern="https://intranet.example/*")
        r = await w.scan(EMBEDDED, url="https://intranet.example/tools/x.bin")
        assert (r.action, r.policy_id) == ("allow", allow_site)
        assert [m.rule for m in r.matches] == ["EICAR_Embedded"]
        r = await w.scan(known_bad, url="https://intranet.example/tools/x.bin")
        assert (r.action, r.policy_id) == ("block", block_bad)

        # 3. rule-name policies; the strictest over the matched rules wins.
        r = await w.scan(EMBEDDED)
        assert (r.action, r.policy_id) == ("block", None)  # default for a match
        warn_embedded = await w.add("warn", rule_name="EICAR_Embedded")
        r = await w.scan(EMBEDDED)
        assert (r.action, r.policy_id) == ("warn", warn_embedded)
        r = await w.scan(TWO_RULES)  # Embedded (warn policy) + Low (default warn by severity)
        assert sorted(m.rule for m in r.matches) == ["EICAR_Embedded", "Sentinel_Test_Low"]
        assert (r.action, r.policy_id) == ("warn", warn_embedded)  # a tie goes to the policy
        quarantine_low = await w.add("block", rule_name="Sentinel_Test_Low")
        r = await w.scan(TWO_RULES)
        assert (r.action, r.policy_id) == ("block", quarantine_low)
        r = await w.scan(LOW)
        assert (r.action, r.policy_id) == ("block", quarantine_low)

        # policy_query: a dry run with the same answer, no hit and no threat row.
        before_threats = await w.threats(1000)
        before = await w.policies()
        q = await w.ok(
            PolicyQuery, PolicyDecision, sha256=sha(EICAR), rule_names=["EICAR_Test_File"]
        )
        assert (q.action, q.policy_id, q.degraded) == ("allow", allow_eicar, False)
        q = await w.ok(PolicyQuery, PolicyDecision, url="https://evil.example/a")
        assert (q.action, q.policy_id) == ("block", block_site)
        q = await w.ok(
            PolicyQuery, PolicyDecision, rule_names=["EICAR_Embedded", "Sentinel_Test_Low"]
        )
        assert (q.action, q.policy_id) == ("block", quarantine_low)
        q = await w.ok(PolicyQuery, PolicyDecision, rule_names=["Unknown_Rule"])
        assert (q.action, q.policy_id) == ("block", None)
        q = await w.ok(PolicyQuery, PolicyDecision, sha256=sha(clean))
        assert (q.action, q.policy_id) == ("allow", None)
        assert await w.threats(1000) == before_threats
        after = await w.policies()
        assert {i: p.hit_count for i, p in after.items()} == {
            i: p.hit_count for i, p in before.items()
        }

        # policy_list: every policy with its hit count and last hit.
        hits = {i: p.hit_count for i, p in after.items()}
        assert hits == {
            allow_eicar: 1,
            block_bad: 2,
            block_site: 1,
            allow_site: 1,
            warn_embedded: 2,
            quarantine_low: 2,
        }
        assert all(p.last_hit is not None for p in after.values())
        p = after[allow_eicar]
        assert (p.action, p.file_hash, p.reason, p.created_by) == (
            "allow",
            sha(EICAR),
            "known test file",
            f"uid:{os.getuid()}",
        )
        assert after[block_site].url_pattern == "https://evil.example/*"
        assert after[warn_embedded].rule_name == "EICAR_Embedded"

        # threats: every detection and every non-allow verdict, newest first,
        # with the policy that decided; a clean allowed scan leaves no row.
        rows = before_threats
        assert all(t.file_hash != sha(clean) or t.action_taken != "allow" for t in rows)
        by_policy: dict[int | None, list[ThreatRecord]] = {}
        for t in rows:
            by_policy.setdefault(t.policy_id, []).append(t)
        assert [t.action_taken for t in by_policy[allow_eicar]] == ["allow"]  # a detection, allowed
        assert by_policy[allow_eicar][0].rule_names == ["EICAR_Test_File"]
        assert by_policy[allow_eicar][0].url == "https://dl.example/eicar.com"
        assert [t.action_taken for t in by_policy[block_bad]] == ["block", "block"]
        assert by_policy[block_bad][0].rule_names == []
        assert [t.action_taken for t in by_policy[block_site]] == ["block"]
        assert by_policy[block_site][0].url == "https://evil.example/files/setup.bin"
        first = rows[-1]  # the very first scan
        assert (first.file_hash, first.action_taken, first.policy_id) == (sha(EICAR), "block", None)
        assert (first.filename, first.file_size, first.severity) == (
            "eicar.com",
            len(EICAR),
            "high",
        )
        assert [t.detected_at for t in rows] == sorted((t.detected_at for t in rows), reverse=True)
        assert len(rows) == 12  # 14 scans, two of them clean allows
        assert len(await w.threats(3)) == 3
        await w.error(Threats, "invalid_message", limit=0)

        # policy_remove: the decision goes back to the rules.
        r2 = await w.ok(PolicyRemove, PolicyResult, policy_id=allow_eicar)
        assert (r2.policy_id, r2.queued) == (allow_eicar, False)
        assert allow_eicar not in await w.policies()
        r = await w.scan(EICAR)
        assert (r.action, r.policy_id) == ("block", None)
        await w.error(PolicyRemove, "not_found", policy_id=allow_eicar)
        await w.error(PolicyRemove, "not_found", policy_id=99_999)

        # validation and conflicts, with errors a person can act on.
        e = await w.error(PolicyAdd, "policy_invalid", action="block", sha256="abc")
        assert "sha256" in e.message
        e = await w.error(PolicyAdd, "policy_invalid", action="block")
        e = await w.error(PolicyAdd, "policy_invalid", action="block", url_pattern="x" * 5000)
        e = await w.error(
            PolicyAdd, "policy_conflict", action="warn", url_pattern="https://evil.example/*"
        )
        e = await w.error(PolicyQuery, "policy_invalid", sha256="zz")
        # an idempotency key makes a re-sent add a no-op
        k1 = await w.ok(
            PolicyAdd, PolicyResult, action="warn", rule_name="R1", idempotency_key="k-1"
        )
        k2 = await w.ok(
            PolicyAdd, PolicyResult, action="warn", rule_name="R1", idempotency_key="k-1"
        )
        assert k1.policy_id == k2.policy_id and k1.policy_id is not None
        assert sum(p.rule_name == "R1" for p in (await w.policies()).values()) == 1

        # An expired policy never applies (and one cannot be made already expired).
        expires = time.time() + 0.6
        soon = await w.add("block", url_pattern="https://soon.example/*", expires_at=expires)
        r = await w.scan(clean, url="https://soon.example/a")
        assert (r.action, r.policy_id) == ("block", soon)
        await trio.sleep(max(0.0, expires - time.time()) + 0.05)
        r = await w.scan(clean, url="https://soon.example/a")
        assert (r.action, r.policy_id) == ("allow", None)
        await w.error(PolicyAdd, "policy_invalid", action="block", sha256="ee" * 32, expires_at=1.0)

    # The audit log has every policy change.
    adds = wait_audit(d.data_dir, lambda e: e.get("kind") == "policy_add")
    assert len(adds) == 8
    assert wait_audit(
        d.data_dir, lambda e: e.get("kind") == "policy_remove" and e.get("policy_id") == allow_eicar
    )
    d.stop()
    # ... and each detection exactly once (17 scans, three of them clean allows)
    detections = audit_events(d.data_dir, "detection")
    assert len(detections) == 14, detections
    assert {e["sha256"] for e in detections} >= {
        sha(EICAR),
        sha(LOW),
        sha(known_bad),
        sha(EMBEDDED),
    }
    assert all(e["reason"] for e in detections)


# --- admin operations ---------------------------------------------------------

NOBODY_CLIENT = textwrap.dedent(
    """
    import json, os, sys, trio
    from sentinel_ipc.transport import open_framed_connection
    from sentinel_ipc.messages import (
        PolicyAdd, PolicyRemove, PolicyList, PolicyQuery, Threats,
        QuarantineList, QuarantineDelete, QuarantineRestore, Scan)

    async def main():
        out = {"uid": os.getuid()}
        async with open_framed_connection(sys.argv[1]) as conn:
            requests = {
                "policy_add": PolicyAdd(id=1, action="allow", sha256="ab" * 32),
                "policy_remove": PolicyRemove(id=2, policy_id=int(sys.argv[2])),
                "quarantine_list": QuarantineList(id=3),
                "quarantine_delete": QuarantineDelete(id=4, quarantine_id="0" * 32),
                "quarantine_restore": QuarantineRestore(id=5, quarantine_id="0" * 32),
                "policy_list": PolicyList(id=6),
                "policy_query": PolicyQuery(id=7, url="https://evil.example/x"),
                "threats": Threats(id=8),
                "scan": Scan(id=9, data=b"hello from nobody"),
            }
            for name, req in requests.items():
                await conn.send(req)
                reply = await conn.receive()
                out[name] = getattr(reply, "code", None) or type(reply).__name__
        print(json.dumps(out))

    trio.run(main)
    """
)


@pytest.fixture
def public_socket_dir() -> Iterator[Path]:
    """A socket directory ``nobody`` can reach (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="sentinel-pub-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_as_nobody(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


@pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
async def test_writes_are_refused_to_a_non_admin_uid_and_audited(
    daemon_factory: Any, tmp_path: Path, public_socket_dir: Path
) -> None:
    d = daemon_factory(config=daemon_config(tmp_path), start=False)
    d.socket_path = public_socket_dir / "run" / "sentinel.sock"
    d.start()
    d.socket_path.parent.chmod(0o755)
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        block_site = await w.add("block", url_pattern="https://evil.example/*")

    proc = run_as_nobody([sys.executable, "-c", NOBODY_CLIENT, str(d.socket_path), str(block_site)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {
        "uid": 65534,
        "policy_add": "forbidden",
        "policy_remove": "forbidden",
        "quarantine_list": "forbidden",
        "quarantine_delete": "forbidden",
        "quarantine_restore": "forbidden",
        "policy_list": "PolicyListResult",
        "policy_query": "PolicyDecision",
        "threats": "forbidden",  # the history holds what other users scanned
        "scan": "ScanResult",
    }
    refused = wait_audit(
        d.data_dir,
        lambda e: e.get("kind") == "request_refused" and e.get("uid") == 65534,
    )
    assert sorted(e["request"] for e in refused) == sorted(
        [
            "policy_add",
            "policy_remove",
            "quarantine_list",
            "quarantine_delete",
            "quarantine_restore",
            "threats",
        ]
    )
    # Nothing changed.
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        policies = await w.policies()
        assert list(policies) == [block_site]

    # An admin uid from the config may write.
    d.stop()
    d.config["server"]["admin_uids"] = [65534]
    d.start()
    d.socket_path.parent.chmod(0o755)
    proc = run_as_nobody([sys.executable, "-c", NOBODY_CLIENT, str(d.socket_path), str(block_site)])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["policy_add"] == "PolicyResult"
    assert out["policy_remove"] == "PolicyResult"
    assert out["quarantine_list"] == "QuarantineListResult"
    assert out["quarantine_delete"] == "not_found"
    # restore to a path is for the daemon's own user only
    assert out["quarantine_restore"] == "bad_fd"
    d.stop()


# --- quarantine ---------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_quarantine_store_list_restore_delete(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(config=daemon_config(tmp_path))
    qdir = d.data_dir / "quarantine"
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        pid_rule = await w.add("quarantine", rule_name="EICAR_Test_File")
        pid_emb = await w.add("quarantine", rule_name="EICAR_Embedded")

        # bytes in one frame
        r = await w.scan(EICAR, url="https://dl.example/eicar.com", filename="eicar.com")
        assert (r.action, r.policy_id, r.warnings) == ("quarantine", pid_rule, [])

        # a chunked stream (the bytes live in a memfd)
        big = os.urandom(300_000) + EMBEDDED + os.urandom(1000)
        await w.conn.send(
            ScanBegin(id=500, url="https://dl.example/big.bin", filename="big.bin", size=len(big))
        )
        for i in range(0, len(big), 64 * 1024):
            await w.conn.send(ScanChunk(id=500, data=big[i : i + 64 * 1024]))
        await w.conn.send(ScanEnd(id=500))
        with trio.fail_after(20):
            rs = await w.conn.receive()
        assert isinstance(rs, ScanResult), rs
        assert (rs.action, rs.policy_id, rs.warnings, rs.sha256) == (
            "quarantine",
            pid_emb,
            [],
            sha(big),
        )

        # a passed descriptor
        src = tmp_path / "dl.bin"
        fd_bytes = b"header " * 100 + EICAR + b" footer"
        src.write_bytes(fd_bytes)
        fd = os.open(src, os.O_RDONLY)
        try:
            rf = await w.ok(ScanFd, ScanResult, fds=(fd,), filename="dl.bin")
        finally:
            os.close(fd)
        assert (rf.action, rf.policy_id, rf.warnings) == ("quarantine", pid_emb, [])

        # a client's reused memfd: only its first ``size`` bytes are this file's,
        # and only they are kept (the stale tail would not hash to the verdict).
        mem_bytes = b"memfd " * 50 + EICAR + b" end"
        reused = os.memfd_create("reused-buffer")
        try:
            os.pwrite(reused, mem_bytes + b"stale bytes of an earlier download " * 20, 0)
            rm = await w.ok(ScanFd, ScanResult, fds=(reused,), filename="mem.bin",
                            size=len(mem_bytes))
        finally:
            os.close(reused)
        assert (rm.action, rm.policy_id, rm.warnings) == ("quarantine", pid_emb, [])
        assert (rm.sha256, rm.size) == (sha(mem_bytes), len(mem_bytes))

        # Stored: dir 0700, bytes 0400, sidecar with url, filename, sha256, size, rules, time.
        assert _mode(qdir) == 0o700
        listed: QuarantineListResult = await w.ok(QuarantineList, QuarantineListResult)
        items = {i.sha256: i for i in listed.items}
        assert set(items) == {sha(EICAR), sha(big), sha(fd_bytes), sha(mem_bytes)}
        assert items[sha(mem_bytes)].size == len(mem_bytes)
        item = items[sha(EICAR)]
        assert (item.size, item.url, item.filename, item.rules) == (
            len(EICAR),
            "https://dl.example/eicar.com",
            "eicar.com",
            ["EICAR_Test_File"],
        )
        assert abs(item.quarantined_at - time.time()) < 60
        assert (items[sha(big)].size, items[sha(big)].filename) == (len(big), "big.bin")
        for i in items.values():
            blob = qdir / f"{i.quarantine_id}.bin"
            sidecar = qdir / f"{i.quarantine_id}.json"
            assert _mode(blob) == 0o400
            assert sha(blob.read_bytes()) == i.sha256
            side = json.loads(sidecar.read_text())
            assert side["sha256"] == i.sha256 and side["size"] == i.size
            for key in ("url", "filename", "rules"):
                assert key in side
        assert sorted(p.name for p in qdir.iterdir()) == sorted(
            f"{i.quarantine_id}.{ext}" for i in items.values() for ext in ("bin", "json")
        )

        # Restore into a descriptor the client opened (SCM_RIGHTS).
        dest = tmp_path / "restored.com"
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            rr = await w.ok(
                QuarantineRestore, QuarantineResult, fds=(fd,), quarantine_id=item.quarantine_id
            )
        finally:
            os.close(fd)
        assert (rr.quarantine_id, rr.done) == (item.quarantine_id, True)
        assert dest.read_bytes() == EICAR
        # to a path (the daemon's own uid only); never over an existing file
        out = tmp_path / "restored-by-path.bin"
        await w.ok(
            QuarantineRestore,
            QuarantineResult,
            quarantine_id=items[sha(big)].quarantine_id,
            path=str(out),
        )
        assert out.read_bytes() == big
        await w.error(
            QuarantineRestore, "bad_fd", quarantine_id=item.quarantine_id
        )  # no destination
        reply = await w.call(QuarantineRestore, quarantine_id=item.quarantine_id, path=str(out))
        assert isinstance(reply, Error), reply
        assert out.read_bytes() == big
        await w.error(
            QuarantineRestore, "not_found", quarantine_id="f" * 32, path=str(tmp_path / "y")
        )
        assert not (tmp_path / "y").exists()
        reply = await w.call(
            QuarantineRestore, quarantine_id="../../etc/passwd", path=str(tmp_path / "x")
        )
        assert isinstance(reply, Error) and not (tmp_path / "x").exists()

        # Delete.
        await w.ok(QuarantineDelete, QuarantineResult, quarantine_id=item.quarantine_id)
        await w.error(QuarantineDelete, "not_found", quarantine_id=item.quarantine_id)
        listed = await w.ok(QuarantineList, QuarantineListResult)
        assert {i.sha256 for i in listed.items} == {sha(big), sha(fd_bytes), sha(mem_bytes)}
        assert not (qdir / f"{item.quarantine_id}.bin").exists()
        assert not (qdir / f"{item.quarantine_id}.json").exists()

        # The threat rows say what was done.
        rows = await w.threats()
        assert {(t.file_hash, t.action_taken) for t in rows} == {
            (sha(EICAR), "quarantine"),
            (sha(big), "quarantine"),
            (sha(fd_bytes), "quarantine"),
            (sha(mem_bytes), "quarantine"),
        }

    d.stop()
    kinds = [e["kind"] for e in audit_events(d.data_dir) if e["kind"].startswith("quarantine")]
    assert sorted(kinds) == ["quarantine"] * 4 + ["quarantine_delete"] + ["quarantine_restore"] * 2
    detections = audit_events(d.data_dir, "detection")
    assert len(detections) == 4
    assert {e.get("quarantine_id") for e in detections} == {i.quarantine_id for i in items.values()}


# --- reputation and the threat history --------------------------------------------


async def test_a_full_quarantine_keeps_the_verdict_and_says_the_copy_was_not_kept(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """``[policy] quarantine_max_bytes`` bounds what clients can make the daemon store."""
    d = daemon_factory(config=daemon_config(tmp_path, quarantine_max_bytes=4096))
    qdir = d.data_dir / "quarantine"
    async with open_framed_connection(d.socket_path) as conn:
        w = Wire(conn)
        await w.add("quarantine", url_pattern="https://sketchy.example/*")
        first = os.urandom(3000)
        r1 = await w.scan(first, url="https://sketchy.example/a.bin")
        assert (r1.action, r1.warnings) == ("quarantine", [])
        second = os.urandom(3000)
        r2 = await w.scan(second, url="https://sketchy.example/b.bin")
        assert r2.action == "quarantine" and r2.sha256 == sha(second)
        (warning,) = r2.warnings
        assert "quarantine is full" in warning and "not kept" in warning
        listed: QuarantineListResult = await w.ok(QuarantineList, QuarantineListResult)
        assert [i.sha256 for i in listed.items] == [sha(first)]
        assert len(list(qdir.iterdir())) == 2
        # Room again after a delete.
        await w.ok(QuarantineDelete, QuarantineResult, quarantine_id=listed.items[0].quarantine_id)
        r3 = await w.scan(second, url="https://sketchy.example/b.bin")
        assert (r3.action, r3.warnings) == ("quarantine", [])
    d.stop()


def test_quarantine_bounds_must_not_be_negative(daemon_factory: Any, tmp_path: Path) -> None:
    d = daemon_factory(config=daemon_config(tmp_path, quarantine_max_items=-1), start=False)
    d.start(wait=False)
    assert d.proc is not None and d.proc.wait(60) == 2
    assert "quarantine_max_items must not be negative" in d.log()


async def test_reputation_known_bad_is_part_of_the_decision_and_recorded(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A file the reputation service knows as malware is blocked (no rule needs to
    match) unless the user's sha256 policy allows it, and the threat row says what
    the client was told."""
    from http_fixture import serve_http

    bad = b"nothing any rule knows " + os.urandom(64)
    warned = b"a file with a sha256 warn policy " + os.urandom(64)
    with serve_http(max_hang=5.0) as server:
        for data in (bad, warned, EICAR):
            server.reputation[sha(data)] = {"verdict": "malicious", "name": "Evil-X"}
        config = daemon_config(tmp_path)
        config["reputation"] = {"url": server.url + "/reputation", "lookup_deadline": 2.0}
        d = daemon_factory(config=config)
        async with open_framed_connection(d.socket_path) as conn:
            w = Wire(conn)
            allow_eicar = await w.add("allow", sha256=sha(EICAR))
            warn_id = await w.add("warn", sha256=sha(warned))
            r = await w.scan(bad, filename="bad.bin")
            assert (r.action, r.policy_id, r.matches, r.reputation) == (
                "block",
                None,
                [],
                "known_bad",
            )
            assert r.reason and "Evil-X" in r.reason
            r = await w.scan(warned)
            assert (r.action, r.policy_id) == ("block", None)
            assert r.reason and "Evil-X" in r.reason and f"#{warn_id}" in r.reason
            r = await w.scan(EICAR)  # the user's "always allow" wins
            assert (r.action, r.policy_id, r.reputation) == ("allow", allow_eicar, "known_bad")
            r = await w.scan(b"unknown to everyone " + os.urandom(16))
            assert (r.action, r.reputation) == ("allow", "unknown")
            rows = {t.file_hash: t for t in await w.threats()}
            assert set(rows) == {sha(bad), sha(warned), sha(EICAR)}
            assert (rows[sha(bad)].action_taken, rows[sha(bad)].filename) == ("block", "bad.bin")
            assert rows[sha(warned)].action_taken == "block"
            assert (rows[sha(EICAR)].action_taken, rows[sha(EICAR)].policy_id) == (
                "allow",
                allow_eicar,
            )
            policies = await w.policies()
            assert (policies[allow_eicar].hit_count, policies[warn_id].hit_count) == (1, 0)
        d.stop()
    detections = audit_events(d.data_dir, "detection")
    assert {e["sha256"]: e["action"] for e in detections} == {
        sha(bad): "block",
        sha(warned): "block",
        sha(EICAR): "allow",
    }
