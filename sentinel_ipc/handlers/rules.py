"""``reload`` (admin) and SIGHUP: compile the new rule set beside the old one, swap.

In-flight scans finish on the old set; a failed compile keeps the old set
serving and the request gets ``rules_invalid`` naming file, line and message.
Every attempt is audited.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import SentinelError
from ..logs import log_event
from ..messages import Reload, ReloadResult
from ..server.dispatch import Dispatcher, RequestContext

if TYPE_CHECKING:
    from ..audit import AuditLog
    from ..scanning import RulesInfo, Scanner


async def reload_rules(scanner: Scanner, audit: AuditLog | None, *, trigger: str) -> RulesInfo:
    old = scanner.rules_version
    try:
        info = await scanner.reload()
    except SentinelError as exc:
        log_event("rules_reload_failed", logging.ERROR, trigger=trigger, error=exc.message)
        if audit is not None:
            audit.record("rules_reload_failed", trigger=trigger, error=exc.message, kept=old)
        raise
    log_event(
        "rules_reloaded",
        logging.INFO,
        trigger=trigger,
        old=old,
        new=info.version,
        rules=info.rule_count,
    )
    if audit is not None:
        audit.record(
            "rules_reloaded", trigger=trigger, old=old, new=info.version, rules=info.rule_count
        )
    return info


def register(dispatcher: Dispatcher, *, scanner: Scanner, audit: AuditLog | None) -> None:
    async def reload(req: Reload, ctx: RequestContext) -> ReloadResult:
        info = await reload_rules(scanner, audit, trigger=f"request uid:{ctx.peer.uid}")
        return ReloadResult(
            id=req.id,
            rules_version=info.version,
            rule_count=info.rule_count,
            namespaces=info.namespaces,
        )

    dispatcher.register(Reload, reload, admin=True)
