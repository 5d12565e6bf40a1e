"""Validation of policy writes and queries, before anything touches storage.

Every check raises :class:`~sentinel_ipc.errors.PolicyValidationError` whose
message names the field and says what would be accepted, so a person reading
the ``policy_invalid`` error reply can fix the request without the source.

Validation is pure (no I/O, no clock: ``now`` is passed in), so the same
checks run whether the write goes to the database or to the outage journal:
a write that would be refused by the database is refused at once, not
discovered at replay time.
"""

from __future__ import annotations

import math
import re
from typing import Final

import msgspec

from sentinel_ipc.errors import PolicyValidationError
from sentinel_ipc.messages import ACTIONS, Action

MAX_URL_PATTERN: Final = 2048
MAX_URL: Final = 8192
MAX_RULE_NAME: Final = 128
MAX_NAMESPACE: Final = 128
MAX_MIME: Final = 255
MAX_REASON: Final = 1024
MAX_CREATED_BY: Final = 256
MAX_RULE_NAMES_QUERY: Final = 1024

_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# A YARA identifier, optionally qualified by the rule's namespace: "ns:Rule".
_RULE = re.compile(r"(?:[A-Za-z0-9_.\-/]{1,128}:)?[A-Za-z_][A-Za-z0-9_]*")
_MIME_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+\-]{0,126}"
_MIME = re.compile(rf"(?:\*/\*|{_MIME_TOKEN}/(?:\*|{_MIME_TOKEN}))")
# Control characters and whitespace never occur in a URL.
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")


class PolicyDraft(msgspec.Struct, frozen=True, kw_only=True):
    """A validated, normalised policy write (no id yet)."""

    action: Action
    rule_name: str | None = None
    url_pattern: str | None = None
    file_hash: str | None = None
    mime_type: str | None = None
    reason: str | None = None
    expires_at: float | None = None
    created_by: str = ""

    @property
    def identity(self) -> tuple[str, str, str]:
        """The uniqueness key: no two policies share (rule_name, url_pattern, file_hash)."""
        return (self.rule_name or "", self.url_pattern or "", self.file_hash or "")


class ThreatDraft(msgspec.Struct, frozen=True, kw_only=True):
    """A threat_history row to write (no id yet)."""

    detected_at: float
    file_hash: str
    action_taken: Action
    url: str | None = None
    filename: str | None = None
    mime_type: str | None = None
    file_size: int = 0
    rule_names: list[str] = []
    severity: str | None = None
    policy_id: int | None = None


def validate_sha256(value: str, field: str = "sha256") -> str:
    """Return ``value`` lower-cased if it is 64 hex characters."""
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise PolicyValidationError(
            f"{field}: expected 64 hexadecimal characters (a SHA-256 digest), got {_show(value)}"
        )
    return value.lower()


def validate_url_pattern(value: str) -> str:
    """A glob over the whole URL: ``*`` any run of characters, ``?`` one; all else literal."""
    if not isinstance(value, str) or not value:
        raise PolicyValidationError(
            "url_pattern: expected a non-empty glob such as https://example.com/*"
        )
    if len(value) > MAX_URL_PATTERN:
        raise PolicyValidationError(
            f"url_pattern: at most {MAX_URL_PATTERN} characters, got {len(value)}"
        )
    if _BAD_URL_CHARS.search(value):
        raise PolicyValidationError(
            "url_pattern: must not contain whitespace or control characters"
        )
    return value


def validate_rule_name(value: str, field: str = "rule_name") -> str:
    """A YARA rule identifier, optionally ``namespace:Rule``."""
    if not isinstance(value, str) or len(value) > MAX_RULE_NAME + MAX_NAMESPACE + 1:
        raise PolicyValidationError(f"{field}: at most {MAX_RULE_NAME} characters")
    rule = value.rpartition(":")[2]
    if len(rule) > MAX_RULE_NAME or not _RULE.fullmatch(value):
        raise PolicyValidationError(
            f"{field}: expected a YARA rule identifier ([A-Za-z_][A-Za-z0-9_]*, at most "
            f"{MAX_RULE_NAME} characters), optionally prefixed by 'namespace:', got {_show(value)}"
        )
    return value


def validate_mime_type(value: str) -> str:
    """``type/subtype``, ``type/*`` or ``*/*``, compared case-insensitively."""
    norm = value.strip().lower() if isinstance(value, str) else ""
    if len(norm) > MAX_MIME or not _MIME.fullmatch(norm):
        raise PolicyValidationError(
            f"mime_type: expected 'type/subtype', 'type/*' or '*/*', got {_show(value)}"
        )
    return norm


def validate_policy(
    *,
    action: str,
    now: float,
    sha256: str | None = None,
    url_pattern: str | None = None,
    rule_name: str | None = None,
    mime_type: str | None = None,
    reason: str | None = None,
    expires_at: float | None = None,
    created_by: str = "",
) -> PolicyDraft:
    """Check and normalise a policy write; raise PolicyValidationError naming the field."""
    if action not in ACTIONS:
        raise PolicyValidationError(
            f"action: expected one of {', '.join(ACTIONS)}, got {_show(action)}"
        )
    if sha256 is None and url_pattern is None and rule_name is None:
        raise PolicyValidationError(
            "a policy needs at least one of sha256, url_pattern or rule_name"
        )
    if reason is not None and (len(reason) > MAX_REASON or "\x00" in reason):
        raise PolicyValidationError(f"reason: at most {MAX_REASON} characters, no NUL")
    if not isinstance(created_by, str) or len(created_by) > MAX_CREATED_BY:
        raise PolicyValidationError(f"created_by: at most {MAX_CREATED_BY} characters")
    if expires_at is not None:
        if not isinstance(expires_at, int | float) or not math.isfinite(expires_at):
            raise PolicyValidationError("expires_at: expected a finite Unix time in seconds")
        if expires_at <= now:
            raise PolicyValidationError(
                f"expires_at: {expires_at:.0f} is not in the future (now {now:.0f})"
            )
    return PolicyDraft(
        action=action,  # checked against ACTIONS above
        file_hash=None if sha256 is None else validate_sha256(sha256),
        url_pattern=None if url_pattern is None else validate_url_pattern(url_pattern),
        rule_name=None if rule_name is None else validate_rule_name(rule_name),
        mime_type=None if mime_type is None else validate_mime_type(mime_type),
        reason=reason,
        expires_at=None if expires_at is None else float(expires_at),
        created_by=created_by,
    )


def validate_query(
    *, sha256: str | None, url: str | None, rule_names: list[str] | tuple[str, ...]
) -> tuple[str | None, str | None, tuple[str, ...]]:
    """Check a dry-run query from a client (the scanner's own inputs are trusted)."""
    if url is not None and (not isinstance(url, str) or len(url) > MAX_URL):
        raise PolicyValidationError(f"url: at most {MAX_URL} characters")
    if len(rule_names) > MAX_RULE_NAMES_QUERY:
        raise PolicyValidationError(f"rule_names: at most {MAX_RULE_NAMES_QUERY} names")
    names = tuple(validate_rule_name(n, "rule_names[]") for n in rule_names)
    return (None if sha256 is None else validate_sha256(sha256), url, names)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
