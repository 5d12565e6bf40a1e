"""The in-memory snapshot of the active policies, and its file.

Why it exists: when the database fails, verdicts still need the user's
policies. The snapshot is a :class:`~sentinel_ipc.policy.decision.PolicyIndex`
of every active policy, kept current after each successful database read and
write, and persisted atomically in the data dir so a daemon restarted during
an outage still decides with the last known policies.

Writes queued in the outage journal are laid over it too (an *overlay*), so a
policy the user added during the outage takes effect at once. Such a policy
has no database id yet; it gets a provisional negative id (``-seq`` of its
journal entry) that is never shown to clients and never persisted: after
recovery the snapshot is reloaded from the database with the real ids.

Persistence is ``write tmp + fsync + rename + fsync(dir)``: a reader sees the
old file or the new one, never half of one. A file that does not decode is
reported and ignored (the daemon then decides from rules alone, degraded),
never half-trusted.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgspec

from sentinel_ipc.fsutil import atomic_write
from sentinel_ipc.messages import PolicyRecord
from sentinel_ipc.policy.decision import PolicyIndex
from sentinel_ipc.policy.journal import AddPolicy, JournalOp, RemovePolicy

log = logging.getLogger("sentinel.policy.snapshot")

SNAPSHOT_FILENAME: Final = "policy_snapshot.json"
FORMAT: Final = 1


class SnapshotFile(msgspec.Struct, kw_only=True):
    """What is on disk."""

    format: int = FORMAT
    saved_at: float
    #: The highest policy id ever handed out, so a database rebuilt from this
    #: file never reuses the id of a removed policy.
    max_policy_id: int = 0
    policies: list[PolicyRecord] = []


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(SnapshotFile)


class SnapshotError(Exception):
    pass


def load_snapshot_file(path: Path) -> SnapshotFile | None:
    """The snapshot on disk; ``None`` if there is none.

    Raises SnapshotError (naming the file and the problem) if it exists but is
    unreadable or does not decode.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SnapshotError(f"cannot read policy snapshot {path}: {exc.strerror or exc}") from exc
    try:
        snap = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SnapshotError(f"policy snapshot {path} is damaged: {exc}") from exc
    if snap.format != FORMAT:
        raise SnapshotError(f"policy snapshot {path}: unsupported format {snap.format}")
    return snap


def save_snapshot_file(path: Path, snap: SnapshotFile) -> int:
    """Write atomically (tmp + fsync + rename + fsync dir); return the bytes written.

    Raises OSError when the directory or the disk refuses.
    """
    data = _encoder.encode(snap)
    atomic_write(path, data, mode=0o600)
    return len(data)


class PolicySnapshot:
    """The active policies in memory. Event-loop thread only (not thread-safe)."""

    def __init__(self, policies: Sequence[PolicyRecord] = (), max_policy_id: int = 0) -> None:
        self.index = PolicyIndex(policies)
        self.max_policy_id = max(max_policy_id, max((p.id for p in policies), default=0))
        #: Bumped on every change, so the persister knows whether it is stale.
        self.version = 0
        self.saved_version = -1 if policies else 0
        #: The real (positive) ids in order, for :meth:`page`; rebuilt when
        #: ``version`` moved on since (a hit count changes no id).
        self._sorted_ids: list[int] = []
        self._sorted_version = -1

    @classmethod
    def from_file(cls, snap: SnapshotFile, now: float) -> PolicySnapshot:
        active = [p for p in snap.policies if p.expires_at is None or p.expires_at > now]
        return cls(active, snap.max_policy_id)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def dirty(self) -> bool:
        return self.version != self.saved_version

    def real_policies(self) -> list[PolicyRecord]:
        """Policies that exist in the database (no provisional overlay)."""
        return [p for p in self.index.policies() if p.id > 0]

    def page(self, after_id: int, limit: int) -> tuple[list[PolicyRecord], bool]:
        """The real policies with ``id > after_id``, at most ``limit`` of them in id
        order, and whether more follow: ``policy_list`` paging during an outage,
        the same keyset rule as the database's. The sorted ids are kept between
        pages, so listing n policies costs one sort, not one per page."""
        if self._sorted_version != self.version:
            self._sorted_ids = sorted(p.id for p in self.index.policies() if p.id > 0)
            self._sorted_version = self.version
        ids = self._sorted_ids
        start = bisect.bisect_right(ids, after_id)
        records: list[PolicyRecord] = []
        at = start
        while at < len(ids) and len(records) < limit:
            policy = self.index.get(ids[at])
            if policy is not None:
                records.append(policy)
            at += 1
        return records, at < len(ids)

    def to_file(self, now: float) -> SnapshotFile:
        return SnapshotFile(
            saved_at=now, max_policy_id=self.max_policy_id, policies=self.real_policies()
        )

    def replace_all(
        self, policies: list[PolicyRecord] | PolicyIndex, max_policy_id: int
    ) -> None:
        """Reload from the database (drops the overlay: the journal is replayed by now).

        ``policies`` may be an index already built (the service builds it page
        by page as the load goes, so that no single step of the event loop
        indexes the whole table: 300,000 policies take about 0.4 s)."""
        self.index = policies if isinstance(policies, PolicyIndex) else PolicyIndex(policies)
        self.max_policy_id = max(self.max_policy_id, max_policy_id)
        self.version += 1

    def put(self, policy: PolicyRecord) -> None:
        self.index.add(policy)
        if policy.id > 0:
            self.max_policy_id = max(self.max_policy_id, policy.id)
        self.version += 1

    def touch(self, policy: PolicyRecord) -> None:
        """A new hit count; not worth a persist by itself."""
        self.index.replace(policy)

    def remove(self, policy_id: int) -> PolicyRecord | None:
        removed = self.index.remove(policy_id)
        if removed is not None:
            self.version += 1
        return removed

    def overlay(self, op: JournalOp) -> None:
        """Lay a journaled (not yet applied) write over the snapshot."""
        if isinstance(op, AddPolicy):
            d = op.policy
            if self.index.find_identity(d.identity) is not None:
                return  # already applied before the journal was discarded: no duplicate
            self.put(
                PolicyRecord(
                    id=-op.seq,
                    action=d.action,
                    rule_name=d.rule_name,
                    url_pattern=d.url_pattern,
                    file_hash=d.file_hash,
                    mime_type=d.mime_type,
                    created_at=op.at,
                    created_by=d.created_by,
                    expires_at=d.expires_at,
                    reason=d.reason,
                )
            )
        elif isinstance(op, RemovePolicy):
            self.remove(op.policy_id)
