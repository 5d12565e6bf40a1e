"""The ``[policy]`` and ``[audit]`` sections of the TOML config.

Plain values only: the breaker and retry objects come from ``[resilience]``
(one source for every threshold) and admin uids from ``[server]``;
:meth:`PolicySettings.to_config` joins them into a :class:`PolicyConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import msgspec

from ..config_checks import at_least, positive
from ..messages import Action
from .journal import DEFAULT_MAX_BYTES as JOURNAL_MAX_BYTES
from .quarantine import DEFAULT_MAX_BYTES as QUARANTINE_MAX_BYTES
from .quarantine import DEFAULT_MAX_ITEMS as QUARANTINE_MAX_ITEMS
from .service import LOAD_CHUNK, MAX_QUEUED_READS, PolicyConfig
from .store import DEFAULT_THREAT_HISTORY_MAX_ROWS

if TYPE_CHECKING:
    from ..observability.config import ResilienceConfig


#: Smallest ``[audit] max_bytes``. One audit line (a detection with its URL,
#: filename and matches) runs to several hundred bytes: below a few KiB the log
#: would rotate every line or two and ``backups`` would keep only a handful of
#: lines, so the trail would be lost to its own rotation.
AUDIT_MIN_BYTES: Final = 4096
#: Largest ``[audit] backups``: every rotation renames each kept file in turn,
#: so a huge count would stall the audit writer on every rotation.
AUDIT_MAX_BACKUPS: Final = 1000
#: The ``[policy]`` durations, in seconds. Each bounds or paces a loop of the
#: policy service: zero or less would spin it (intervals) or fail every
#: database call at once (``op_timeout``), and nan or inf would remove the bound.
_POLICY_SECONDS: Final = ("op_timeout", "verify_interval", "probe_interval", "refresh_interval")


def _severity_defaults() -> dict[str, Action]:
    return {"low": "warn"}


class PolicySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    db_path: str | None = None
    snapshot_path: str | None = None
    journal_path: str | None = None
    quarantine_dir: str | None = None
    #: The action for a rule match no policy covers.
    default_match_action: Action = "block"
    #: A matched rule's ``severity`` meta -> action, instead of the default.
    severity_actions: dict[str, Action] = msgspec.field(default_factory=_severity_defaults)
    busy_timeout_ms: int = 100
    op_timeout: float = 2.0
    verify_interval: float = 5.0
    probe_interval: float = 1.0
    refresh_interval: float = 300.0
    #: Rows per database call when the whole table is read (the cached policies
    #: at start, after recovery and at each refresh; an unpaged policy list).
    load_chunk: int = LOAD_CHUNK
    #: A client's read (a policy_list page, threats) gets ``busy`` while this many
    #: database calls are queued: overload is not a database failure.
    max_queued_reads: int = MAX_QUEUED_READS
    max_journal_bytes: int = JOURNAL_MAX_BYTES
    #: Bounds of the quarantine directory (0 keeps no copies).
    quarantine_max_bytes: int = QUARANTINE_MAX_BYTES
    quarantine_max_items: int = QUARANTINE_MAX_ITEMS
    #: The threat history keeps this many of its newest rows; older ones are deleted.
    threat_history_max_rows: int = DEFAULT_THREAT_HISTORY_MAX_ROWS

    def __post_init__(self) -> None:
        """Refuse values the daemon cannot run with, naming the key (the config
        loader prefixes the section: ``policy: op_timeout must be ...``), so
        that a bad file stops start-up with exit 2, not a traceback or a
        spinning loop later."""
        at_least(self, 0, "quarantine_max_bytes", "quarantine_max_items", "busy_timeout_ms")
        # The journal takes the writes of a database outage: with no room it
        # would refuse every one. A threat history of 0 rows would delete each
        # row as it is written; a load of 0 rows per call would never end.
        at_least(
            self, 1, "max_journal_bytes", "threat_history_max_rows", "load_chunk",
            "max_queued_reads",
        )
        positive(self, *_POLICY_SECONDS, finite=True)

    def to_config(self, resilience: ResilienceConfig, admin_uids: list[int]) -> PolicyConfig:
        retry = resilience.retry_policy("database")
        kwargs = {name: getattr(self, name) for name in self.__struct_fields__}
        config = PolicyConfig(
            **kwargs,
            admin_uids=list(admin_uids),
            fail_closed=not resilience.scanner_fail_open,
            breaker=resilience.breaker_config("database"),
        )
        if retry is not None:
            config.retry = retry
        return config


class AuditSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Defaults to ``<data dir>/audit.jsonl``.
    path: str | None = None
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 10

    def __post_init__(self) -> None:
        """Range checks at load time, naming the key (``audit: max_bytes must
        be ...``): the audit log would otherwise refuse them at start-up with a
        traceback, or stall its writer (see the two constants)."""
        at_least(self, AUDIT_MIN_BYTES, "max_bytes")
        if not 0 <= self.backups <= AUDIT_MAX_BACKUPS:
            raise ValueError(f"backups must be in 0..{AUDIT_MAX_BACKUPS} (got {self.backups})")
