"""The PolicyGraph: what the user decided and what was detected, on SQLite,
with a snapshot and a journal so verdicts and writes survive a failing database.

Layers (I/O at the edges):

* ``validation`` and ``decision``: pure; input checks and the verdict function.
* ``schema``: DDL and migrations (``PRAGMA user_version``).
* ``store``: blocking SQLite access and the one thread that runs it.
* ``journal`` and ``snapshot``: the durable outage journal and the cached policies.
* ``service``: the async façade the server calls (:func:`open_policy_service`).
* ``quarantine``: files kept aside when the verdict is ``quarantine``.
"""

from sentinel_ipc.policy.decision import Decision, PolicyIndex, decide
from sentinel_ipc.policy.quarantine import Quarantine, QuarantineError
from sentinel_ipc.policy.service import (
    PolicyConfig,
    PolicyService,
    open_policy_service,
    outage_reason,
)
from sentinel_ipc.policy.validation import PolicyDraft, validate_policy

__all__ = [
    "Decision",
    "PolicyConfig",
    "PolicyDraft",
    "PolicyIndex",
    "PolicyService",
    "Quarantine",
    "QuarantineError",
    "decide",
    "open_policy_service",
    "outage_reason",
    "validate_policy",
]
