"""The ``[policy]`` and ``[audit]`` sections of the TOML config.

Plain values only: the breaker and retry objects come from ``[resilience]``
(one source for every threshold) and admin uids from ``[server]``;
:meth:`PolicySettings.to_config` joins them into a :class:`PolicyConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import msgspec

from ..messages import Action
from .journal import DEFAULT_MAX_BYTES as JOURNAL_MAX_BYTES
from .quarantine import DEFAULT_MAX_BYTES as QUARANTINE_MAX_BYTES
from .quarantine import DEFAULT_MAX_ITEMS as QUARANTINE_MAX_ITEMS
from .service import PolicyConfig

if TYPE_CHECKING:
    from ..observability.config import ResilienceConfig


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
    max_journal_bytes: int = JOURNAL_MAX_BYTES
    #: Bounds of the quarantine directory (0 keeps no copies).
    quarantine_max_bytes: int = QUARANTINE_MAX_BYTES
    quarantine_max_items: int = QUARANTINE_MAX_ITEMS

    def __post_init__(self) -> None:
        for name in ("quarantine_max_bytes", "quarantine_max_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

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
