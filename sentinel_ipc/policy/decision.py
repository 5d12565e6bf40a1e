"""The verdict: a pure function of a set of policies, a scan's matches and ``now``.

No I/O and no clock here. The database path and the snapshot path both build a
:class:`PolicyIndex` (the database path from the few candidate rows its indexed
queries return, the snapshot path once for all active policies) and call the
same :func:`decide`, so the two paths cannot disagree.

Decision order (issue 5.2)
--------------------------
1. **sha256 policies.** An ``allow`` overrides any rule match (the user's
   "always allow this file"); a ``block`` needs no match (a known-bad file).
2. **URL-pattern policies** (globs: ``*`` any run, ``?`` one character, all
   else literal, case-sensitive, over the whole URL).
3. **Rule-name policies** for the matched rules. Each matched rule gets the
   action of its policy, or the default for a match when it has none; the
   strictest over all matched rules wins, so an ``allow`` for one rule never
   whitewashes another rule that matched too.
4. **Default for a match**: ``default_match_action`` (``block``), unless the
   rule's ``severity`` meta maps to another action in ``severity_actions``
   (``{"low": "warn"}``).
5. Otherwise ``allow``.

Within tiers 1 and 2 the *most specific* applicable policy decides (more
criteria, then for URLs more literal characters), so "block evil.example/*"
can carry the exception "allow evil.example/docs/*"; ties go to the strictest
action, then to the oldest policy. A policy applies only when every criterion
it has (hash, URL, rule, MIME type) matches, and never once it has expired.

When the scanner could not run (``scanned=False``) tiers 1 and 2 still apply;
otherwise the verdict is ``allow`` with a warning (fail-open) or ``block`` with
``fail_closed=True``, and is marked degraded either way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from sentinel_ipc.messages import ACTION_SEVERITY, Action, PolicyRecord, RuleMatch

NO_MATCH_REASON: Final = "no rule matched and no policy applies"


class Decision(msgspec.Struct, kw_only=True):
    """A verdict and why. ``policy_id`` is the policy that decided, if any."""

    action: Action
    policy_id: int | None = None
    reason: str = ""
    degraded: bool = False
    warnings: list[str] = []
    #: Why the verdict is degraded (e.g. "database locked; decided from cached policies").
    degraded_reason: str | None = None
    #: The most severe ``severity`` meta among the matches (for threat_history).
    severity: str | None = None


# ---------------------------------------------------------------------------
# Globs
# ---------------------------------------------------------------------------


def _literal(segment: str) -> str:
    return "".join("." if c == "?" else re.escape(c) for c in segment)


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile a ``*``/``?`` glob to a regex for ``fullmatch``.

    Star-separated middle segments become atomic lazy groups, ``(?>.*?seg)``:
    the first occurrence of each middle segment is always a correct choice for
    a glob, and refusing to backtrack into it keeps matching linear-ish, so a
    pattern with many stars cannot make a decision take seconds.
    """
    parts = pattern.split("*")
    if len(parts) == 1:
        return re.compile(_literal(pattern), re.DOTALL)
    head, *middles, tail = parts
    body = [_literal(head)]
    body.extend(f"(?>.*?{_literal(m)})" for m in middles if m)
    body.append(".*" + _literal(tail))
    return re.compile("".join(body), re.DOTALL)


def literal_prefix(pattern: str) -> str:
    """The part of a glob before its first wildcard: every matching URL starts with it."""
    cut = len(pattern)
    for wildcard in "*?":
        i = pattern.find(wildcard)
        if i != -1:
            cut = min(cut, i)
    return pattern[:cut]


_TOKEN = re.compile(r"[A-Za-z0-9]+")


def url_tokens(url: str) -> set[str]:
    """The maximal alphanumeric runs of a URL."""
    return set(_TOKEN.findall(url))


def pattern_tokens(pattern: str) -> list[str]:
    """The alphanumeric runs of a glob that every matching URL has as *whole* tokens.

    A run qualifies when neither neighbour is a wildcard: its neighbours are
    then literal non-alphanumeric characters (or the ends of the pattern, which
    is anchored at both ends), so in any matching URL the same run is bounded
    the same way. ``*://dl.evil.example/*`` yields dl, evil, example; in
    ``*evil*`` nothing qualifies (``evil`` may be part of ``devils``).
    """
    out = []
    n = len(pattern)
    for m in _TOKEN.finditer(pattern):
        start, end = m.span()
        if (start == 0 or pattern[start - 1] not in "*?") and (
            end == n or pattern[end] not in "*?"
        ):
            out.append(m.group())
    return out


def choose_token(tokens: Sequence[str], bucket_size: Callable[[str], int]) -> str:
    """The token to file a URL pattern under: the rarest so far, then the longest.
    ``""`` (the always-scanned bucket) when the pattern has none."""
    if not tokens:
        return ""
    return min(tokens, key=lambda t: (bucket_size(t), -len(t), t))


def mime_matches(pattern: str, mime_type: str | None) -> bool:
    """``type/subtype``, ``type/*`` or ``*/*`` against a file's MIME type (parameters ignored)."""
    if mime_type is None:
        return False
    actual = mime_type.split(";", 1)[0].strip().lower()
    if pattern in ("*/*", actual):
        return True
    return pattern.endswith("/*") and actual.startswith(pattern[:-1])


# ---------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------


class _UrlEntry:
    __slots__ = ("policy", "regex", "token")

    def __init__(self, policy: PolicyRecord, token: str) -> None:
        assert policy.url_pattern is not None
        self.policy = policy
        self.regex = compile_glob_cached(policy.url_pattern)
        self.token = token


class PolicyIndex:
    """The policies, indexed for the three lookup tiers; updated incrementally.

    URL patterns are filed under one of their whole tokens (see
    :func:`pattern_tokens`), the rarest at the time they are added. A URL can
    only match patterns filed under one of its own tokens, so a lookup splits
    the URL into its tokens (a dozen or two) and tries only the patterns in
    those buckets, plus the few patterns that have no whole token at all --
    instead of every pattern. The database path files them the same way
    (column ``url_token``).
    """

    def __init__(self, policies: Iterable[PolicyRecord] = ()) -> None:
        self._by_id: dict[int, PolicyRecord] = {}
        self._by_hash: dict[str, list[PolicyRecord]] = {}
        self._by_rule: dict[str, list[PolicyRecord]] = {}
        self._url: dict[int, _UrlEntry] = {}
        self._by_token: dict[str, list[_UrlEntry]] = {}
        self._by_pattern: dict[str, list[PolicyRecord]] = {}
        for policy in policies:
            self.add(policy)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, policy_id: object) -> bool:
        return policy_id in self._by_id

    def get(self, policy_id: int) -> PolicyRecord | None:
        return self._by_id.get(policy_id)

    def policies(self) -> list[PolicyRecord]:
        return list(self._by_id.values())

    def find_identity(self, identity: tuple[str, str, str]) -> PolicyRecord | None:
        """The policy with this (rule_name, url_pattern, file_hash), if any."""
        rule, url, sha = identity
        if sha:
            pool: Iterable[PolicyRecord] = self._by_hash.get(sha, ())
        elif url:
            pool = self._by_pattern.get(url, ())
        else:
            pool = self._by_rule.get(rule, ())
        for p in pool:
            if _identity(p) == identity:
                return p
        return None

    def add(self, policy: PolicyRecord) -> None:
        """Insert or replace (by id)."""
        if policy.id in self._by_id:
            self.remove(policy.id)
        self._by_id[policy.id] = policy
        if policy.file_hash is not None:
            self._by_hash.setdefault(policy.file_hash, []).append(policy)
        elif policy.url_pattern is not None:
            token = choose_token(
                pattern_tokens(policy.url_pattern), lambda t: len(self._by_token.get(t, ()))
            )
            entry = _UrlEntry(policy, token)
            self._url[policy.id] = entry
            self._by_token.setdefault(token, []).append(entry)
            self._by_pattern.setdefault(policy.url_pattern, []).append(policy)
        elif policy.rule_name is not None:
            self._by_rule.setdefault(policy.rule_name, []).append(policy)

    def remove(self, policy_id: int) -> PolicyRecord | None:
        policy = self._by_id.pop(policy_id, None)
        if policy is None:
            return None
        if policy.file_hash is not None:
            _drop(self._by_hash, policy.file_hash, lambda p: p.id == policy_id)
        elif policy.url_pattern is not None:
            entry = self._url.pop(policy_id)
            _drop(self._by_token, entry.token, lambda e: e.policy.id == policy_id)
            _drop(self._by_pattern, policy.url_pattern, lambda p: p.id == policy_id)
        elif policy.rule_name is not None:
            _drop(self._by_rule, policy.rule_name, lambda p: p.id == policy_id)
        return policy

    def replace(self, policy: PolicyRecord) -> None:
        """Swap in a new version of a policy (e.g. a bumped hit count) without reindexing."""
        old = self._by_id.get(policy.id)
        if old is None or _identity(old) != _identity(policy):
            self.add(policy)
            return
        self._by_id[policy.id] = policy
        if policy.file_hash is not None:
            _swap(self._by_hash[policy.file_hash], policy)
        elif policy.url_pattern is not None:
            self._url[policy.id].policy = policy
            _swap(self._by_pattern[policy.url_pattern], policy)
        elif policy.rule_name is not None:
            _swap(self._by_rule[policy.rule_name], policy)

    def by_hash(self, sha256: str) -> Sequence[PolicyRecord]:
        return self._by_hash.get(sha256, ())

    def by_rule(self, name: str) -> Sequence[PolicyRecord]:
        return self._by_rule.get(name, ())

    def url_candidates(self, url: str) -> list[_UrlEntry]:
        """URL-tier policies whose pattern matches ``url`` (before other criteria)."""
        by_token = self._by_token
        found = [e for e in by_token.get("", ()) if e.regex.fullmatch(url)]
        for token in url_tokens(url):
            bucket = by_token.get(token)
            if bucket:
                found.extend(e for e in bucket if e.regex.fullmatch(url))
        return found


def _identity(p: PolicyRecord) -> tuple[str, str, str]:
    return (p.rule_name or "", p.url_pattern or "", p.file_hash or "")


def _drop(table: dict[str, list[Any]], key: str, pred: Any) -> None:
    bucket = [x for x in table.get(key, ()) if not pred(x)]
    if bucket:
        table[key] = bucket
    else:
        table.pop(key, None)


def _swap(bucket: list[PolicyRecord], policy: PolicyRecord) -> None:
    for i, p in enumerate(bucket):
        if p.id == policy.id:
            bucket[i] = policy


# ---------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------

_SEVERITY_ORDER: Final = {"info": 0, "low": 1, "medium": 2, "moderate": 2, "high": 3, "critical": 4}


def severity_of(match: RuleMatch) -> str | None:
    sev = match.meta.get("severity")
    return None if sev is None else str(sev).strip().lower()


def max_severity(matches: Sequence[RuleMatch]) -> str | None:
    """The most severe ``severity`` meta among the matches (unknown words rank lowest)."""
    best: str | None = None
    for m in matches:
        sev = severity_of(m)
        if sev is not None and (
            best is None or _SEVERITY_ORDER.get(sev, -1) > _SEVERITY_ORDER.get(best, -1)
        ):
            best = sev
    return best


def _stricter(a: Action, b: Action) -> bool:
    return ACTION_SEVERITY[a] > ACTION_SEVERITY[b]


def _applies(
    p: PolicyRecord, now: float, url: str | None, rules: frozenset[str], mime: str | None
) -> bool:
    """Every criterion the policy has must hold (the caller checked its tier's own)."""
    if p.expires_at is not None and p.expires_at <= now:
        return False
    if p.rule_name is not None and p.rule_name not in rules:
        return False
    if p.url_pattern is not None and (
        url is None or not compile_glob_cached(p.url_pattern).fullmatch(url)
    ):
        return False
    return p.mime_type is None or mime_matches(p.mime_type, mime)


_GLOB_CACHE: dict[str, re.Pattern[str]] = {}


def compile_glob_cached(pattern: str) -> re.Pattern[str]:
    rx = _GLOB_CACHE.get(pattern)
    if rx is None:
        if len(_GLOB_CACHE) > 4096:
            _GLOB_CACHE.clear()
        rx = _GLOB_CACHE[pattern] = compile_glob(pattern)
    return rx


def _specificity(p: PolicyRecord) -> tuple[int, int]:
    criteria = sum(x is not None for x in (p.file_hash, p.url_pattern, p.rule_name, p.mime_type))
    literal = 0 if p.url_pattern is None else sum(c not in "*?" for c in p.url_pattern)
    return (criteria, literal)


def _best(candidates: Iterable[PolicyRecord]) -> PolicyRecord | None:
    """Most specific, then strictest, then oldest."""
    best: PolicyRecord | None = None
    best_key: tuple[int, int, int, int] | None = None
    for p in candidates:
        key = (*_specificity(p), ACTION_SEVERITY[p.action], -p.id)
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def rule_keys(match: RuleMatch) -> tuple[str, str]:
    """The names a rule policy may use for this match: ``Rule`` or ``namespace:Rule``."""
    return (match.rule, f"{match.namespace}:{match.rule}")


def decide(
    index: PolicyIndex,
    *,
    sha256: str,
    url: str | None,
    matches: Sequence[RuleMatch],
    now: float,
    default_match_action: Action = "block",
    severity_actions: Mapping[str, Action] | None = None,
    mime_type: str | None = None,
    scanned: bool = True,
    fail_closed: bool = False,
    known_bad: str | None = None,
) -> Decision:
    """The verdict for one scanned file (see the module docstring for the order).

    ``known_bad``: a reputation service names this file as malware (the name):
    the verdict is then at least ``block``, unless a sha256 policy allows this
    very file (the user's "always allow" still wins). Deciding it here, and not
    after the fact, makes the threat row record the verdict the client gets.
    """
    d, by_hash = _decide(
        index,
        sha256=sha256,
        url=url,
        matches=matches,
        now=now,
        default_match_action=default_match_action,
        severity_actions=severity_actions,
        mime_type=mime_type,
        scanned=scanned,
        fail_closed=fail_closed,
    )
    if known_bad is None or d.action == "block" or (by_hash and d.action == "allow"):
        return d
    return Decision(
        action="block",
        reason=f"reputation: known malware {known_bad!r} (else: {d.action}, {d.reason})",
        degraded=d.degraded,
        warnings=d.warnings,
        degraded_reason=d.degraded_reason,
        severity=d.severity,
    )


def _decide(
    index: PolicyIndex,
    *,
    sha256: str,
    url: str | None,
    matches: Sequence[RuleMatch],
    now: float,
    default_match_action: Action,
    severity_actions: Mapping[str, Action] | None,
    mime_type: str | None,
    scanned: bool,
    fail_closed: bool,
) -> tuple[Decision, bool]:
    """The decision, and whether a sha256 policy made it."""
    severity = max_severity(matches)
    rules = frozenset(k for m in matches for k in rule_keys(m))

    # 1. sha256
    hit = _best(p for p in index.by_hash(sha256) if _applies(p, now, url, rules, mime_type))
    if hit is not None:
        return Decision(
            action=hit.action,
            policy_id=hit.id,
            reason=f"sha256 policy #{hit.id} ({hit.action})" + _why(hit),
            severity=severity,
        ), True

    # 2. URL pattern
    if url is not None:
        hit = _best(
            e.policy
            for e in index.url_candidates(url)
            if _applies(e.policy, now, url, rules, mime_type)
        )
        if hit is not None:
            return Decision(
                action=hit.action,
                policy_id=hit.id,
                reason=f"url policy #{hit.id} {hit.url_pattern!r} ({hit.action})" + _why(hit),
                severity=severity,
            ), False

    if not scanned:
        action: Action = "block" if fail_closed else "allow"
        warning = "scanner unavailable: file not scanned, " + (
            "blocked (fail-closed)" if fail_closed else "allowed without a scan (fail-open)"
        )
        return Decision(
            action=action,
            reason=warning,
            degraded=True,
            degraded_reason="scanner unavailable",
            warnings=[warning],
            severity=severity,
        ), False

    if not matches:
        return Decision(action="allow", reason=NO_MATCH_REASON), False

    # 3 + 4. per matched rule: its policy, else the (severity-mapped) default; strictest wins.
    sev_map = severity_actions or {}
    verdict: Action | None = None
    decided_by: PolicyRecord | None = None
    reason = ""
    for m in matches:
        pol = _best(
            p
            for key in rule_keys(m)
            for p in index.by_rule(key)
            if _applies(p, now, url, rules, mime_type)
        )
        if pol is not None:
            act: Action = pol.action
            why = f"rule policy #{pol.id} for {m.rule!r} ({act})" + _why(pol)
        else:
            sev = severity_of(m)
            act = default_match_action if sev is None else sev_map.get(sev, default_match_action)
            why = f"rule {m.rule!r} matched: default {act}" + (
                f" (severity {sev})" if sev is not None else ""
            )
        if verdict is None or _stricter(act, verdict):
            verdict, decided_by, reason = act, pol, why
    assert verdict is not None
    return Decision(
        action=verdict,
        policy_id=None if decided_by is None else decided_by.id,
        reason=reason,
        severity=severity,
    ), False


def _why(p: PolicyRecord) -> str:
    return f": {p.reason}" if p.reason else ""
