"""Cutting a list reply to fit in one frame (pure: no I/O).

Why: a reply is one frame, and a frame over ``max_frame_bytes`` is one the
client must refuse, losing the connection with it (the server refuses to
write one: see ``reply_too_large`` in :mod:`sentinel_ipc.server.connection`).
A paged reply (``policy_list`` or ``quarantine_list`` with ``limit``) is
therefore cut to the records that fit, however large each one is, and the
client continues from the last id it got (the keyset: an integer policy id, a
quarantine id string).

The arithmetic is exact for MessagePack: an array's encoding is its header
followed by its elements' encodings, so a reply's size is the size of the
reply with an empty list, plus the growth of the array header, plus the sum
of the records' own sizes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import accumulate

import msgspec

from .codec import encode
from .messages import PolicyListResult, QuarantineListResult

#: Largest ``limit`` of a paged list request a server accepts (the page size
#: clients ask for): bounds the records a page reads and encodes to measure.
MAX_PAGE = 1000
#: Largest ``policy_list.limit``.
MAX_POLICY_PAGE = MAX_PAGE
#: Largest ``quarantine_list.limit``.
MAX_QUARANTINE_PAGE = MAX_PAGE

#: The way out that ``reply_too_large`` names for a reply that pages (besides a
#: larger ``max_frame_bytes``), so the server's generic guard need not know it.
PAGING_ADVICE: dict[type[msgspec.Struct], str] = {
    PolicyListResult: f"page the request: policy_list with limit (1..{MAX_POLICY_PAGE}) and "
    "after_id, continuing from each reply's next_after_id",
    QuarantineListResult: "page the request: quarantine_list with limit "
    f"(1..{MAX_QUARANTINE_PAGE}) and after, continuing from each reply's next_after",
}

#: MessagePack array header: 1 byte up to 15 elements, at most 5 (array 32). The
#: empty reply is measured with the 1-byte form, so up to 4 more may be needed.
_ARRAY_HEADER_GROWTH = 4
#: How far under the limit a cut page may stop: the budget assumes the largest
#: array header and a 9-byte ``next_after_id``, where the real ones may take 1
#: byte each. Exact to the byte would need a re-measure per page, for nothing.
#: (A cut ``quarantine_list`` page always carries its 32-character
#: ``next_after``, the size it was measured with, so only the header counts.)
MAX_SLACK = _ARRAY_HEADER_GROWTH + 8


def fit_count(sizes: Iterable[int], budget: int) -> int:
    """How many leading items, of these encoded ``sizes``, fit in ``budget`` bytes
    together: the largest ``k`` with ``sum(sizes[:k]) <= budget`` (0 when even
    the first does not fit, or ``budget`` is negative)."""
    count = 0
    for total in accumulate(sizes):
        if total > budget:
            break
        count += 1
    return count


def records_budget(max_frame_bytes: int, empty_reply: msgspec.Struct) -> int:
    """Bytes left for the records of ``empty_reply`` (the reply with an empty list,
    every other field at its largest: a ``next_after_id`` of 2**63-1, a
    ``next_after`` of 32 characters) in a frame of ``max_frame_bytes``.
    Negative when even the empty reply does not fit."""
    return max_frame_bytes - len(encode(empty_reply)) - _ARRAY_HEADER_GROWTH


def fit_records(records: Sequence[msgspec.Struct], budget: int) -> int:
    """How many leading ``records`` fit in ``budget`` bytes (see :func:`fit_count`).

    Encodes each record once to measure it; a page is at most
    :data:`MAX_PAGE` records, so that costs about a millisecond."""
    return fit_count((len(encode(r)) for r in records), budget)


__all__ = [
    "MAX_PAGE",
    "MAX_POLICY_PAGE",
    "MAX_QUARANTINE_PAGE",
    "MAX_SLACK",
    "PAGING_ADVICE",
    "fit_count",
    "fit_records",
    "records_budget",
]
