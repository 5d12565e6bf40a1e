"""Policy, threat-history and quarantine requests.

Writes (``policy_add``, ``policy_import``, ``policy_remove``), the threat history and every
quarantine operation are admin operations (the dispatcher refuses them to
other uids and audits the refusal): the history and the quarantine hold the
filenames and URLs of everything anyone scanned. A write during a database
outage is journaled and answered ``queued: true``; the PolicyService replays
it exactly once on recovery.

``policy_import`` adds up to 1000 policies as one write (one transaction,
one snapshot save): a hash blocklist of hundreds of thousands of entries
imported with single adds would commit and rewrite the snapshot file once
per hash. Existing ones are counted, not refused, so an import is re-runnable.

``policy_list`` pages (``limit``, ``after_id``): a policy table is unbounded
(a hash blocklist import), and a reply is one frame. A page holds at most
``limit`` policies and, whatever their size, only as many as fit in the
connection's ``max_frame_bytes`` (:mod:`sentinel_ipc.paging`); the client
continues from ``next_after_id``. Without ``limit`` the whole list is one
reply, as before paging existed, or ``reply_too_large`` when it cannot fit.
``quarantine_list`` pages the same way, keyed by quarantine id (``after``,
``next_after``): up to 10,000 items whose URLs and filenames a client chose.

Quarantine restore writes to a descriptor the client passes (SCM_RIGHTS), so
the daemon never opens a path on another user's behalf. Only the daemon's own
uid may name a ``path`` instead; then the daemon creates a new file (never
overwriting, never following a symlink).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import msgspec

from ..errors import (
    BadFileDescriptorError,
    BusyError,
    ForbiddenError,
    ProtocolError,
    ReplyTooLargeError,
)
from ..logs import log_event
from ..messages import (
    MAX_POLICY_IMPORT,
    PolicyAdd,
    PolicyDecision,
    PolicyImport,
    PolicyImportResult,
    PolicyList,
    PolicyListResult,
    PolicyQuery,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
    QuarantineDelete,
    QuarantineItem,
    QuarantineList,
    QuarantineListResult,
    QuarantineRestore,
    QuarantineResult,
    Threats,
    ThreatsResult,
)
from ..paging import (
    MAX_POLICY_PAGE,
    MAX_QUARANTINE_PAGE,
    PAGING_ADVICE,
    fit_records,
    records_budget,
)
from ..policy.service import PolicyListTooLarge
from ..server.dispatch import Dispatcher, RequestContext

if TYPE_CHECKING:
    from ..policy import PolicyService, Quarantine

MAX_THREATS = 1000
R = TypeVar("R", bound=msgspec.Struct)
_MAX_ID = 2**63 - 1
#: A quarantine id (uuid4 hex): the keyset of quarantine_list pages.
_QUARANTINE_ID = re.compile(r"[0-9a-f]{32}")


@contextlib.contextmanager
def read_share(ctx: RequestContext, limit: int | None) -> Iterator[None]:
    """Count a client's read of the policy database (a ``policy_list`` page, the
    unpaged list, ``threats``) against its uid's share, ``busy`` over it.

    Why: the store thread takes at most ``[policy] max_queued_reads`` client
    reads at a time, daemon-wide (``PolicyService._admit_read``). On a shared
    socket, one user pipelining pages over a few connections held all of
    them, and another user's reads got ``busy`` (15 of 100 sequential pages
    in one measurement); with a share (a quarter, ``ServerConfig.uid_share``)
    the others always find room. ``limit`` None: a private socket, no share."""
    usage = ctx.connection.usage
    if limit is not None and usage.policy_reads >= limit:
        raise BusyError(
            f"uid {ctx.peer.uid} has {usage.policy_reads} policy database reads in "
            f"progress (limit per user {limit})",
            retry_after=0.1,
        )
    usage.policy_reads += 1
    try:
        yield
    finally:
        usage.policy_reads -= 1


def register(
    dispatcher: Dispatcher,
    *,
    policy: PolicyService,
    quarantine: Quarantine | None,
    reads_per_uid: int | None = None,
) -> None:
    """``reads_per_uid``: each peer uid's share of the database reads clients may
    have in progress (see :func:`read_share`); None for no share."""
    async def policy_add(req: PolicyAdd, ctx: RequestContext) -> PolicyResult:
        policy_id, queued = await policy.add(
            action=req.action,
            sha256=req.sha256,
            url_pattern=req.url_pattern,
            rule_name=req.rule_name,
            mime_type=req.mime_type,
            reason=req.reason,
            expires_at=req.expires_at,
            created_by=f"uid:{ctx.peer.uid}",
            idempotency_key=req.idempotency_key,
        )
        return PolicyResult(id=req.id, policy_id=policy_id, queued=queued)

    async def policy_import(req: PolicyImport, ctx: RequestContext) -> PolicyImportResult:
        if len(req.policies) > MAX_POLICY_IMPORT:
            raise ProtocolError(
                f"policy_import.policies: at most {MAX_POLICY_IMPORT} per request, "
                f"got {len(req.policies)}; send them in batches"
            )
        result = await policy.import_policies(
            req.policies, created_by=f"uid:{ctx.peer.uid}", idempotency_key=req.idempotency_key
        )
        return PolicyImportResult(
            id=req.id,
            added=result.added,
            existing=result.existing,
            policy_ids=result.policy_ids,
            queued=result.queued,
        )

    async def policy_remove(req: PolicyRemove, ctx: RequestContext) -> PolicyResult:
        policy_id, queued = await policy.remove(
            req.policy_id, idempotency_key=req.idempotency_key, removed_by=f"uid:{ctx.peer.uid}"
        )
        return PolicyResult(id=req.id, policy_id=policy_id, queued=queued)

    whole_list_running = False

    async def send_whole_list(request_id: int, ctx: RequestContext) -> None:
        """The unpaged ``policy_list`` of a client from before paging: every policy
        in one reply, or ``reply_too_large``.

        One at a time, until its reply is written (another gets ``busy``): each
        holds the whole table in memory (about 1 KB of objects per policy) and
        runs a store call per ``load_chunk`` rows; eight at once on 300,000
        policies queued the database's health check past its timeout and put
        the daemon in degraded mode. And the rows stop loading as soon as they
        pass what one frame can carry."""
        nonlocal whole_list_running
        if whole_list_running:
            raise BusyError(
                "another unpaged policy_list is being served (one at a time); "
                + PAGING_ADVICE[PolicyListResult],
                retry_after=1.0,
            )
        whole_list_running = True
        try:
            with read_share(ctx, reads_per_uid):
                await send_list_reply(request_id, ctx)
        finally:
            whole_list_running = False

    async def send_list_reply(request_id: int, ctx: RequestContext) -> None:
        """The whole list in one reply (loading stops past one frame)."""
        limit = ctx.connection.max_frame_bytes
        empty = PolicyListResult(id=request_id, degraded=True)
        try:
            policies, degraded = await policy.list(max_bytes=records_budget(limit, empty))
        except PolicyListTooLarge as exc:
            log_event("reply_too_large", logging.WARNING, type="policy_list_result",
                      id=request_id, bytes=f">{exc.counted}", limit=limit)
            raise ReplyTooLargeError(
                f"the policy_list_result reply would be more than {exc.counted} bytes, "
                f"over this daemon's max_frame_bytes of {limit}; "
                f"{PAGING_ADVICE[PolicyListResult]}, or raise [server] max_frame_bytes"
            ) from None
        await ctx.connection.send(
            PolicyListResult(id=request_id, policies=policies, degraded=degraded)
        )

    async def policy_list(req: PolicyList, ctx: RequestContext) -> PolicyListResult | None:
        if req.limit is None:  # a client from before paging: all (or reply_too_large)
            await send_whole_list(req.id, ctx)
            return None
        if not 1 <= req.limit <= MAX_POLICY_PAGE:
            raise ProtocolError(f"policy_list.limit must be between 1 and {MAX_POLICY_PAGE}")
        if not 0 <= req.after_id <= _MAX_ID:
            raise ProtocolError(f"policy_list.after_id must be between 0 and {_MAX_ID}")
        with read_share(ctx, reads_per_uid):
            page = await policy.list_page(req.after_id, req.limit)
        return fit_policy_page(
            req.id, page.policies, more=page.more, degraded=page.degraded,
            max_frame_bytes=ctx.connection.max_frame_bytes,
        )

    async def policy_query(req: PolicyQuery, ctx: RequestContext) -> PolicyDecision:
        decision = await policy.query(sha256=req.sha256, url=req.url, rule_names=req.rule_names)
        return PolicyDecision(
            id=req.id,
            action=decision.action,
            policy_id=decision.policy_id,
            reason=decision.reason,
            degraded=decision.degraded,
            degraded_reason=decision.degraded_reason,
        )

    async def threats(req: Threats, ctx: RequestContext) -> ThreatsResult:
        if not 1 <= req.limit <= MAX_THREATS:
            raise ProtocolError(f"threats.limit must be between 1 and {MAX_THREATS}")
        with read_share(ctx, reads_per_uid):
            return ThreatsResult(id=req.id, threats=await policy.threats(req.limit))

    dispatcher.register(PolicyAdd, policy_add, admin=True)
    dispatcher.register(PolicyImport, policy_import, admin=True)
    dispatcher.register(PolicyRemove, policy_remove, admin=True)
    dispatcher.register(PolicyList, policy_list)
    dispatcher.register(PolicyQuery, policy_query)
    dispatcher.register(Threats, threats, admin=True)
    if quarantine is not None:
        register_quarantine(dispatcher, quarantine)


def fit_policy_page(
    request_id: int,
    policies: list[PolicyRecord],
    *,
    more: bool,
    degraded: bool,
    max_frame_bytes: int,
) -> PolicyListResult:
    """The reply for one page: the leading ``policies`` that fit in a frame of
    ``max_frame_bytes`` (``next_after_id`` set when any were cut or ``more``
    follow). Raises :class:`ReplyTooLargeError` when not even the first fits."""
    empty = PolicyListResult(id=request_id, degraded=degraded, next_after_id=_MAX_ID)
    page, more = _cut_page(
        policies, empty, max_frame_bytes, more=more,
        first=lambda: f"policy #{policies[0].id}",
    )
    return PolicyListResult(
        id=request_id, policies=page, degraded=degraded,
        next_after_id=page[-1].id if more and page else None,
    )


def fit_quarantine_page(
    request_id: int,
    items: list[QuarantineItem],
    *,
    more: bool,
    max_frame_bytes: int,
) -> QuarantineListResult:
    """The reply for one page: the leading ``items`` that fit in a frame of
    ``max_frame_bytes`` (``next_after`` set when any were cut or ``more``
    follow). Raises :class:`ReplyTooLargeError` when not even the first fits
    (a URL or filename near the frame limit), naming it so that an admin can
    page on past it."""
    empty = QuarantineListResult(id=request_id, next_after="f" * 32)
    page, more = _cut_page(
        items, empty, max_frame_bytes, more=more,
        first=lambda: f"quarantined item {items[0].quarantine_id}",
        way_past=lambda: f" (or continue after it: quarantine_list with "
        f"after={items[0].quarantine_id})",
    )
    return QuarantineListResult(
        id=request_id, items=page,
        next_after=page[-1].quarantine_id if more and page else None,
    )


def _cut_page(
    records: list[R],
    empty_reply: msgspec.Struct,
    max_frame_bytes: int,
    *,
    more: bool,
    first: Callable[[], str],
    way_past: Callable[[], str] = lambda: "",
) -> tuple[list[R], bool]:
    """The leading ``records`` that fit in a frame beside ``empty_reply``, and
    whether more follow (some were cut, or ``more``). A first record that does
    not fit alone is ``reply_too_large``, named by ``first()``: an empty page
    would make a client page forever."""
    count = fit_records(records, records_budget(max_frame_bytes, empty_reply))
    if count == 0 and records:
        raise ReplyTooLargeError(
            f"{first()} alone does not fit in a reply under this daemon's "
            f"max_frame_bytes of {max_frame_bytes}; raise [server] max_frame_bytes{way_past()}"
        )
    return records[:count], more or count < len(records)


def register_quarantine(dispatcher: Dispatcher, quarantine: Quarantine) -> None:
    async def q_list(req: QuarantineList, ctx: RequestContext) -> QuarantineListResult:
        if req.limit is None:  # a client from before paging: all (or reply_too_large)
            return QuarantineListResult(id=req.id, items=await quarantine.list())
        if not 1 <= req.limit <= MAX_QUARANTINE_PAGE:
            raise ProtocolError(
                f"quarantine_list.limit must be between 1 and {MAX_QUARANTINE_PAGE}"
            )
        if req.after is not None and not _QUARANTINE_ID.fullmatch(req.after):
            raise ProtocolError(
                "quarantine_list.after must be a quarantine id (32 lower-case hex digits) "
                "or nil for the first page"
            )
        items, more = await quarantine.list_page(req.after, req.limit)
        return fit_quarantine_page(
            req.id, items, more=more, max_frame_bytes=ctx.connection.max_frame_bytes
        )

    async def q_restore(req: QuarantineRestore, ctx: RequestContext) -> QuarantineResult:
        if ctx.fds:
            fd = ctx.fds[0]
            try:
                os.fstat(fd)
            except OSError as exc:
                raise BadFileDescriptorError(f"destination descriptor: {exc.strerror}") from exc
            await quarantine.restore(req.quarantine_id, fd)
            return QuarantineResult(id=req.id, quarantine_id=req.quarantine_id)
        if req.path is None:
            raise BadFileDescriptorError(
                "quarantine_restore needs a destination: a descriptor passed with SCM_RIGHTS"
                " (or, for the daemon's own user, a path)"
            )
        if ctx.peer.uid != os.getuid():
            raise ForbiddenError(
                "only the daemon's own user may restore to a path; pass a descriptor instead"
            )
        await quarantine.restore_to_path(req.quarantine_id, Path(req.path))
        return QuarantineResult(id=req.id, quarantine_id=req.quarantine_id)

    async def q_delete(req: QuarantineDelete, ctx: RequestContext) -> QuarantineResult:
        await quarantine.delete(req.quarantine_id)
        return QuarantineResult(id=req.id, quarantine_id=req.quarantine_id)

    dispatcher.register(QuarantineList, q_list, admin=True)
    dispatcher.register(QuarantineRestore, q_restore, admin=True)
    dispatcher.register(QuarantineDelete, q_delete, admin=True)
