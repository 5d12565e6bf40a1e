"""The verdict function (issue 5.2) and write validation: pure, table-driven,
plus a property test that the database path and the snapshot path agree."""

from __future__ import annotations

import ast
import random
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentinel_ipc.errors import PolicyValidationError
from sentinel_ipc.messages import ACTION_SEVERITY, PolicyRecord, RuleMatch
from sentinel_ipc.policy.decision import (
    PolicyIndex,
    compile_glob,
    decide,
    literal_prefix,
    max_severity,
    mime_matches,
    pattern_tokens,
)
from sentinel_ipc.policy.store import PolicyStore
from sentinel_ipc.policy.validation import validate_policy, validate_query

NOW = 1_700_000_000.0
H1, H2 = "1" * 64, "2" * 64
ROOT = Path(__file__).resolve().parent.parent


def P(pid: int, action: str, **kw: object) -> PolicyRecord:
    return PolicyRecord(id=pid, action=action, **kw)  # type: ignore[arg-type]


def M(rule: str, severity: str | None = None, namespace: str = "default") -> RuleMatch:
    return RuleMatch(
        rule=rule, namespace=namespace, meta={} if severity is None else {"severity": severity}
    )


POLICIES = [
    P(1, "allow", file_hash=H1, reason="user said so"),
    P(2, "block", file_hash=H2),
    P(3, "block", url_pattern="https://evil.example/*"),
    P(4, "allow", url_pattern="https://evil.example/docs/*"),
    P(5, "warn", rule_name="Adware"),
    P(6, "allow", rule_name="TestRule"),
    P(7, "quarantine", rule_name="ns1:Dropper"),
    P(8, "block", file_hash="3" * 64, expires_at=NOW - 1),  # expired
    P(9, "warn", url_pattern="https://*.cdn.example/?.bin"),
    P(10, "block", rule_name="Adware", mime_type="application/x-msdownload"),
    P(11, "allow", file_hash="4" * 64, url_pattern="https://intranet.example/*"),
]
INDEX = PolicyIndex(POLICIES)

# (sha256, url, matches, mime) -> (action, policy_id)
CASES = [
    # 1. sha256: an allow overrides matches; a block needs no match
    ((H1, None, [M("Evil")], None), ("allow", 1)),
    ((H2, None, [], None), ("block", 2)),
    ((H2, "https://evil.example/docs/x", [], None), ("block", 2)),
    # expired policies never apply
    (("3" * 64, None, [], None), ("allow", None)),
    # a hash policy qualified by a URL applies only there
    (("4" * 64, "https://intranet.example/a", [M("Evil")], None), ("allow", 11)),
    (("4" * 64, "https://elsewhere.example/a", [M("Evil")], None), ("block", None)),
    # 2. URL: the most specific pattern decides, before rule matches
    (("0" * 64, "https://evil.example/x.exe", [], None), ("block", 3)),
    (("0" * 64, "https://evil.example/docs/manual.pdf", [M("Evil")], None), ("allow", 4)),
    (("0" * 64, "https://a.cdn.example/x.bin", [], None), ("warn", 9)),
    (("0" * 64, "https://a.cdn.example/xy.bin", [], None), ("allow", None)),  # ? is one char
    (("0" * 64, "https://evil.exampleX/", [], None), ("allow", None)),
    # 3. rule policies; per rule, the strictest over all matched rules wins
    (("0" * 64, None, [M("Adware")], None), ("warn", 5)),
    (("0" * 64, None, [M("TestRule")], None), ("allow", 6)),
    (("0" * 64, None, [M("TestRule"), M("Adware")], None), ("warn", 5)),
    (("0" * 64, None, [M("TestRule"), M("Unknown")], None), ("block", None)),  # no whitewash
    (("0" * 64, None, [M("Dropper", namespace="ns1")], None), ("quarantine", 7)),
    (("0" * 64, None, [M("Dropper", namespace="ns2")], None), ("block", None)),
    # MIME-qualified rule policy is more specific; it applies only to that type
    (("0" * 64, None, [M("Adware")], "application/x-msdownload; x=1"), ("block", 10)),
    # 4. default for a match, severity meta may map to warn
    (("0" * 64, None, [M("Unknown", "low")], None), ("warn", None)),
    (("0" * 64, None, [M("Unknown", "LOW")], None), ("warn", None)),
    (("0" * 64, None, [M("Unknown", "high")], None), ("block", None)),
    (("0" * 64, None, [M("Unknown", "low"), M("Other", "critical")], None), ("block", None)),
    # 5. no match, no policy
    (("0" * 64, "https://fine.example/", [], None), ("allow", None)),
]


@pytest.mark.parametrize(("query", "expected"), CASES)
def test_decision_table(query: tuple, expected: tuple) -> None:
    sha, url, matches, mime = query
    d = decide(
        INDEX,
        sha256=sha,
        url=url,
        matches=matches,
        now=NOW,
        mime_type=mime,
        severity_actions={"low": "warn"},
    )
    assert (d.action, d.policy_id) == expected, d.reason
    assert d.reason
    assert not d.degraded


def test_default_match_action_is_configurable() -> None:
    d = decide(
        INDEX,
        sha256="0" * 64,
        url=None,
        matches=[M("X")],
        now=NOW,
        default_match_action="quarantine",
    )
    assert d.action == "quarantine"


def test_scanner_unavailable_hash_and_url_still_apply() -> None:
    for fail_closed in (False, True):
        d = decide(
            INDEX, sha256=H2, url=None, matches=[], now=NOW, scanned=False, fail_closed=fail_closed
        )
        assert (d.action, d.policy_id) == ("block", 2)
        d = decide(
            INDEX,
            sha256="0" * 64,
            url="https://evil.example/docs/a",
            matches=[],
            now=NOW,
            scanned=False,
            fail_closed=fail_closed,
        )
        assert (d.action, d.policy_id) == ("allow", 4)
    d = decide(INDEX, sha256="0" * 64, url=None, matches=[], now=NOW, scanned=False)
    assert d.action == "allow" and d.degraded and d.warnings and "fail-open" in d.warnings[0]
    d = decide(
        INDEX, sha256="0" * 64, url=None, matches=[], now=NOW, scanned=False, fail_closed=True
    )
    assert d.action == "block" and d.degraded and "fail-closed" in d.reason


def test_severity_recorded() -> None:
    assert max_severity([M("a", "low"), M("b", "High"), M("c")]) == "high"
    assert max_severity([M("a")]) is None


@pytest.mark.parametrize(
    ("pattern", "url", "hit"),
    [
        ("https://a/*", "https://a/", True),
        ("https://a/*", "https://a", False),
        ("*", "", True),
        ("?", "", False),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXcYb", False),
        ("*.exe", "https://x/y.exe", True),
        ("*.exe", "https://x/y.exe?z", False),
        ("https://[::1]/*", "https://[::1]/f", True),  # brackets are literal
        ("https://[::1]/*", "https://:/f", False),
        ("a.c", "abc", False),  # dots are literal
        ("a*a*a*a*a*a*a*a*a*a*b", "a" * 5000, False),  # no catastrophic backtracking
    ],
)
def test_glob(pattern: str, url: str, hit: bool) -> None:
    start = time.perf_counter()
    assert bool(compile_glob(pattern).fullmatch(url)) is hit
    assert time.perf_counter() - start < 0.5


def test_literal_prefix_and_mime() -> None:
    assert literal_prefix("https://a/*x?") == "https://a/"
    assert literal_prefix("abc") == "abc"
    assert mime_matches("application/*", "Application/PDF") is True
    assert mime_matches("*/*", "text/plain") is True
    assert mime_matches("text/plain", "text/html") is False
    assert mime_matches("text/plain", None) is False


@pytest.mark.parametrize(
    ("pattern", "tokens"),
    [
        ("https://dl.evil.example/*", ["https", "dl", "evil", "example"]),
        ("*://dl.evil.example/*", ["dl", "evil", "example"]),
        ("*evil*", []),
        ("*.exe", ["exe"]),
        ("https://?.example/a?", ["https", "example"]),
        ("https://host-1.example/", ["https", "host", "1", "example"]),
    ],
)
def test_pattern_tokens_are_whole_tokens_of_every_match(pattern: str, tokens: list[str]) -> None:
    assert pattern_tokens(pattern) == tokens


def test_url_lookup_finds_patterns_by_their_rarest_token() -> None:
    idx = PolicyIndex(
        [P(i, "block", url_pattern=f"https://h{i}.example/*") for i in range(1, 200)]
        + [P(500, "warn", url_pattern="*evil*"), P(501, "warn", url_pattern="*://h7.example/x")]
    )
    hits = {e.policy.id for e in idx.url_candidates("https://h7.example/x")}
    assert hits == {7, 501}
    assert {e.policy.id for e in idx.url_candidates("http://devils.example/")} == {500}
    # each pattern was filed under a rare token, not under the shared "example"
    assert len(idx._by_token.get("example", ())) <= 1


def test_index_incremental_updates() -> None:
    idx = PolicyIndex()
    idx.add(P(1, "block", url_pattern="https://a/*"))
    idx.add(P(2, "block", url_pattern="https://a/b*"))
    assert {e.policy.id for e in idx.url_candidates("https://a/bc")} == {1, 2}
    idx.remove(2)
    assert {e.policy.id for e in idx.url_candidates("https://a/bc")} == {1}
    idx.remove(1)
    assert idx.url_candidates("https://a/bc") == [] and len(idx) == 0
    idx.add(P(3, "warn", file_hash=H1))
    idx.replace(P(3, "warn", file_hash=H1, hit_count=7))
    assert idx.by_hash(H1)[0].hit_count == 7 and idx.get(3).hit_count == 7  # type: ignore[union-attr]
    assert idx.find_identity(("", "", H1)) is not None


# --- validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"action": "explode", "sha256": H1}, "action"),
        ({"action": "block"}, "at least one"),
        ({"action": "block", "sha256": "xyz"}, "sha256"),
        ({"action": "block", "sha256": "g" * 64}, "sha256"),
        ({"action": "block", "url_pattern": ""}, "url_pattern"),
        ({"action": "block", "url_pattern": "https://a b/"}, "url_pattern"),
        ({"action": "block", "url_pattern": "x" * 2049}, "url_pattern"),
        ({"action": "block", "rule_name": "1bad"}, "rule_name"),
        ({"action": "block", "rule_name": "a" * 129}, "rule_name"),
        ({"action": "block", "rule_name": "ok", "mime_type": "nonsense"}, "mime_type"),
        ({"action": "block", "rule_name": "ok", "expires_at": NOW - 5}, "expires_at"),
        ({"action": "block", "rule_name": "ok", "expires_at": float("inf")}, "expires_at"),
        ({"action": "block", "rule_name": "ok", "reason": "x" * 2000}, "reason"),
    ],
)
def test_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(PolicyValidationError) as err:
        validate_policy(now=NOW, created_by="t", **kwargs)
    assert field in str(err.value)
    assert err.value.code == "policy_invalid"


def test_validation_normalises() -> None:
    d = validate_policy(action="warn", sha256="AB" * 32, mime_type="Text/Plain", now=NOW)
    assert d.file_hash == "ab" * 32 and d.mime_type == "text/plain"
    assert validate_policy(action="block", rule_name="ns/x.yar:Rule_1", now=NOW).rule_name
    assert validate_query(sha256=None, url=None, rule_names=["A", "ns:B"])[2] == ("A", "ns:B")


def test_pure_modules_import_no_io() -> None:
    banned = {"trio", "time", "random", "socket", "sqlite3", "os", "asyncio"}
    for name in ("decision", "validation"):
        tree = ast.parse((ROOT / "sentinel_ipc" / "policy" / f"{name}.py").read_text())
        imported = {
            (n.module or "").split(".")[0]
            if isinstance(n, ast.ImportFrom)
            else a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        assert not imported & banned, (name, imported & banned)


# --- the database path and the snapshot path agree -----------------------------

RULES = ["Alpha", "Beta", "Gamma", "ns1:Alpha"]
HASHES = ["a" * 64, "b" * 64, "c" * 64]
PATTERNS = [
    "https://x.example/*",
    "https://x.example/d*/?.exe",
    "*.exe",
    "https://[y]/*",
    "*",
    "*://x.example/*",
    "*evil*",
    "https://?.example/*",
    "https://x.exam?le/*",
]
URLS = [
    "https://x.example/a.exe",
    "https://x.example/dl/z.exe",
    "https://[y]/q",
    "ftp://o/p",
    "ftp://x.example/devils.exe",
    "https://a.example/x",
    None,
]


@st.composite
def policy_sets(draw: st.DrawFn) -> list[dict]:
    out = []
    for _ in range(draw(st.integers(0, 12))):
        kw: dict = {"action": draw(st.sampled_from(list(ACTION_SEVERITY)))}
        kind = draw(st.sampled_from(["hash", "url", "rule", "hash+url", "url+rule"]))
        if "hash" in kind:
            kw["sha256"] = draw(st.sampled_from(HASHES))
        if "url" in kind:
            kw["url_pattern"] = draw(st.sampled_from(PATTERNS))
        if "rule" in kind:
            kw["rule_name"] = draw(st.sampled_from(RULES))
        if draw(st.booleans()) and draw(st.booleans()):
            kw["mime_type"] = draw(st.sampled_from(["application/*", "text/plain"]))
        if draw(st.booleans()) and draw(st.booleans()):
            kw["expires_at"] = NOW + draw(st.sampled_from([-10.0, 10.0]))  # some already expired
        out.append(kw)
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(specs=policy_sets(), seed=st.integers(0, 2**32 - 1))
def test_database_and_snapshot_paths_agree(tmp_path: Path, specs: list[dict], seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / f"agree-{seed}.db"
    store = PolicyStore(db)
    store.ensure_open()
    try:
        for kw in specs:
            expires = kw.pop("expires_at", None)
            draft = validate_policy(now=NOW - 100, created_by="t", expires_at=expires, **kw)
            try:
                store.add(draft, key=None, now=NOW - 100)
            except Exception as exc:  # duplicates of the random identity are fine
                assert exc.__class__.__name__ == "PolicyConflictError"
        snapshot = PolicyIndex(store.load_active(NOW)[0])
        for _ in range(15):
            sha = rng.choice([*HASHES, "d" * 64])
            url = rng.choice(URLS)
            matches = [
                M(r.rpartition(":")[2], namespace=r.partition(":")[0] if ":" in r else "default")
                for r in rng.sample(RULES, rng.randint(0, 2))
            ]
            mime = rng.choice([None, "application/pdf", "text/plain"])
            kwargs = {"default_match_action": "block", "severity_actions": {"low": "warn"}}
            from_db = store.decide(
                sha256=sha,
                url=url,
                matches=matches,
                now=NOW,
                record=False,
                decide_kwargs=kwargs,
                mime_type=mime,
            ).decision
            from_snapshot = decide(
                snapshot, sha256=sha, url=url, matches=matches, now=NOW, mime_type=mime, **kwargs
            )
            assert (from_db.action, from_db.policy_id) == (
                from_snapshot.action,
                from_snapshot.policy_id,
            ), (
                sha,
                url,
                matches,
                mime,
                from_db.reason,
                from_snapshot.reason,
            )
    finally:
        store.close()
