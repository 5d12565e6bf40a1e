"""From a scan outcome to the verdict the client receives.

This is where the scanner's result, the reputation service, the PolicyGraph
and the fail-open / fail-closed setting meet. Each input can be missing or
degraded on its own, and the verdict says so (``degraded``, ``warnings``,
``degraded_reasons``) instead of failing:

* scanner unavailable (``scanned=False``): hash and URL policies still apply;
  otherwise allow with a warning (fail-open) or block (fail-closed);
* policy database down: the PolicyService decides from its snapshot and marks
  the decision degraded;
* reputation service down or slow: skipped within its deadline, marked.

A ``quarantine`` action stores the scanned bytes before the verdict is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .logs import log_event
from .messages import Action, ScanResult

if TYPE_CHECKING:
    from .audit import AuditLog
    from .external import EventForwarder, ReputationClient
    from .policy import PolicyService, Quarantine
    from .scanning import ScanMeta, ScanOutcome

VerdictObserver = Callable[[ScanResult, "ScanOutcome"], None]


class VerdictMaker:
    def __init__(
        self,
        *,
        policy: PolicyService | None = None,
        quarantine: Quarantine | None = None,
        reputation: ReputationClient | None = None,
        fail_closed: bool = False,
        forwarder: EventForwarder | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.policy = policy
        self.quarantine = quarantine
        self.reputation = reputation
        self.fail_closed = fail_closed
        self.forwarder = forwarder
        self.audit = audit
        self.observers: list[VerdictObserver] = []

    async def verdict(
        self,
        request_id: int,
        outcome: ScanOutcome,
        meta: ScanMeta,
        *,
        content: bytes | None = None,
        content_fd: int | None = None,
    ) -> ScanResult:
        warnings = list(outcome.warnings)
        reasons: list[str] = []
        if outcome.degraded:
            reasons.append("scanner")

        # Reputation first: a known-bad answer is part of the decision (and of
        # the threat row), not a correction after it was recorded.
        reputation: str | None = None
        known_bad: str | None = None
        if self.reputation is not None:
            looked_up = await self.reputation.lookup(outcome.sha256)
            reputation = looked_up.verdict
            if looked_up.verdict == "unavailable":
                reasons.append("reputation")
                warnings.append(looked_up.warning or "reputation lookup unavailable")
            elif looked_up.verdict == "known_bad":
                known_bad = looked_up.name or "known malware"

        action: Action
        policy_id: int | None = None
        reason: str | None
        if self.policy is not None:
            decision = await self.policy.decide(
                sha256=outcome.sha256,
                url=meta.url,
                matches=outcome.matches,
                scanned=outcome.scanned,
                fail_closed=self.fail_closed,
                filename=meta.filename,
                mime_type=meta.mime_type,
                size=outcome.size,
                audit=False,  # audited below, once, with the final verdict
                known_bad=known_bad,
            )
            action, policy_id, reason = decision.action, decision.policy_id, decision.reason
            warnings.extend(w for w in decision.warnings if w not in warnings)
            # A decision is degraded for an unscanned file too (its "scanner
            # unavailable" step); only a decision from the snapshot means the
            # database was down.
            if decision.degraded and (outcome.scanned or self.policy.degraded):
                reasons.append("database")
        else:
            action, reason = self._without_policy(outcome)
            if known_bad is not None and action != "block":
                action, reason = "block", f"reputation: known malware {known_bad!r}"

        quarantine_id: str | None = None
        if action == "quarantine" and self.quarantine is not None:
            source = content if content is not None else content_fd
            try:
                if source is None:
                    raise ValueError("no content to keep")
                item = await self.quarantine.store(
                    source,
                    sha256=outcome.sha256,
                    url=meta.url,
                    filename=meta.filename,
                    rules=[m.rule for m in outcome.matches],
                    size=outcome.size,
                )
                quarantine_id = item.quarantine_id
            except Exception as exc:
                # The verdict still stands; the user must know the copy failed.
                warnings.append(f"quarantine copy failed: {exc}; the file was not kept")
                log_event("quarantine_failed", logging.ERROR, sha256=outcome.sha256, error=str(exc))

        result = ScanResult(
            id=request_id,
            action=action,
            sha256=outcome.sha256,
            size=outcome.size,
            matches=outcome.matches,
            rules_version=outcome.rules_version,
            degraded=bool(reasons),
            warnings=warnings,
            scan_ms=outcome.scan_ms,
            policy_id=policy_id,
            reason=reason,
            degraded_reasons=reasons,
            reputation=reputation,
        )
        if outcome.matches or action != "allow":
            self._report_detection(result, meta, quarantine_id)
        for observer in self.observers:
            observer(result, outcome)
        return result

    def _report_detection(
        self, result: ScanResult, meta: ScanMeta, quarantine_id: str | None
    ) -> None:
        """Audit and forward a detection or non-allow verdict (never blocks)."""
        fields: dict[str, Any] = {
            "sha256": result.sha256,
            "action": result.action,
            "rules": [m.rule for m in result.matches],
            "url": meta.url,
            "filename": meta.filename,
            "policy_id": result.policy_id,
            "reason": result.reason,
            "degraded": result.degraded,
        }
        if result.degraded_reasons:
            fields["degraded_reasons"] = result.degraded_reasons
        if quarantine_id is not None:
            fields["quarantine_id"] = quarantine_id
        if self.audit is not None:
            self.audit.record("detection", **fields)
        if self.forwarder is not None:
            kind = "quarantine" if quarantine_id is not None else "detection"
            self.forwarder.emit(kind, "high", fields)

    def _without_policy(self, outcome: ScanOutcome) -> tuple[Action, str]:
        """No policy store: the scanner's own default decides; only the reason is ours."""
        action = outcome.default_action(self.fail_closed)
        if outcome.matches:
            reason = "matched " + ", ".join(sorted({m.rule for m in outcome.matches}))
        elif not outcome.scanned:
            mode = "fail-closed" if self.fail_closed else "fail-open"
            reason = f"scanner unavailable; {mode}"
        else:
            reason = "no rule matched"
        return action, reason
