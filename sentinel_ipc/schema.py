"""Generate ``protocol/`` from the message types: JSON Schema, golden vectors, tables.

``python -m sentinel_ipc.schema`` writes

* ``protocol/schema.json``: :func:`msgspec.json.schema_components` over the
  :data:`~sentinel_ipc.messages.Request` and :data:`~sentinel_ipc.messages.Reply`
  unions, plus the facts a schema cannot say (admin and idempotent requests);
* ``protocol/vectors.json``: golden vectors, frame bytes as hex beside the
  decoded message, for every message type, and invalid frames with the error
  a conforming server answers;
* the generated section of ``protocol/PROTOCOL.md`` (the per-message field
  tables), between the ``BEGIN GENERATED`` / ``END GENERATED`` markers.

``--check`` writes nothing and exits 1 when any of them differs from what the
code would generate, so CI (``tests/test_schema.py``) catches drift between
``messages.py`` and the published protocol.

The output is deterministic: it depends only on the message classes and the
examples below, never on hash order, time or randomness.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from msgspec import inspect as mi

from .codec import encode_framed
from .errors import ErrorCode
from .framing import HEADER
from .messages import (
    ADMIN_REQUESTS,
    DEFAULT_MAX_FRAME_BYTES,
    IDEMPOTENT_REQUESTS,
    PROTOCOL_VERSION,
    REPLY_TYPES,
    REQUEST_TYPES,
    Ack,
    BreakerControl,
    BreakerInfo,
    Breakers,
    BreakersReport,
    ComponentHealth,
    DegradedAck,
    Error,
    Event,
    Health,
    HealthReport,
    Hello,
    Limits,
    Metrics,
    MetricsReport,
    Ping,
    PolicyAdd,
    PolicyDecision,
    PolicyImport,
    PolicyImportItem,
    PolicyImportResult,
    PolicyList,
    PolicyListResult,
    PolicyQuery,
    PolicyRecord,
    PolicyRemove,
    PolicyResult,
    Pong,
    QuarantineDelete,
    QuarantineItem,
    QuarantineList,
    QuarantineListResult,
    QuarantineRestore,
    QuarantineResult,
    Reload,
    ReloadResult,
    Reply,
    Request,
    RuleMatch,
    Scan,
    ScanBegin,
    ScanChunk,
    ScanEnd,
    ScanFd,
    ScanResult,
    ServiceRetry,
    Shutdown,
    Subscribe,
    Subscribed,
    ThreatRecord,
    Threats,
    ThreatsResult,
    Unsubscribe,
    Welcome,
    type_tag,
)

PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"
SCHEMA_FILE = "schema.json"
VECTORS_FILE = "vectors.json"
PROTOCOL_FILE = "PROTOCOL.md"
BEGIN_MARKER = "<!-- BEGIN GENERATED: python -m sentinel_ipc.schema (do not edit by hand) -->"
END_MARKER = "<!-- END GENERATED -->"

#: What a server answers to each request, for the tables (the schema cannot say it).
REPLY_FOR: dict[type[Any], str] = {
    Hello: "welcome",
    Ping: "pong",
    Scan: "scan_result",
    ScanBegin: "none (an error only if the stream cannot open)",
    ScanChunk: "none (an error only if the chunk is refused)",
    ScanEnd: "scan_result",
    ScanFd: "scan_result",
    PolicyAdd: "policy_result",
    PolicyImport: "policy_import_result",
    PolicyRemove: "policy_result",
    PolicyList: "policy_list_result",
    PolicyQuery: "policy_decision",
    Threats: "threats_result",
    QuarantineList: "quarantine_list_result",
    QuarantineRestore: "quarantine_result",
    QuarantineDelete: "quarantine_result",
    Health: "health_report",
    Metrics: "metrics_report",
    Breakers: "breakers_report",
    BreakerControl: "ack",
    Subscribe: "subscribed, then `event` frames with the same id",
    Unsubscribe: "ack",
    ServiceRetry: "ack",
    DegradedAck: "ack",
    Reload: "reload_result",
    Shutdown: "ack",
}

#: One line per message type for the tables, used when the class has no docstring.
PURPOSE: dict[type[Any], str] = {
    Hello: "Optional first request: announce the client and its protocol version.",
    Ping: "Liveness round trip; the cheapest request.",
    ScanChunk: "The next piece of an open stream, in order; same `id` as its `scan_begin`.",
    ScanEnd: "Close the stream and ask for its verdict; same `id` as its `scan_begin`.",
    PolicyAdd: "Add a policy (hash, URL pattern, rule name or MIME type -> action).",
    PolicyRemove: "Remove a policy by its id.",
    PolicyImportResult: "Answer to `policy_import`: how many were added, how many existed.",
    PolicyList: "List every policy.",
    PolicyQuery: "Which action the policies decide for a hash / URL / rule names.",
    Threats: "The most recent detections (threat history), newest first.",
    QuarantineList: "List quarantined files.",
    QuarantineDelete: "Delete a quarantined file for good.",
    Health: "Health: `full` (every component), `live` (process answers), `ready`.",
    Metrics: "Prometheus metrics as text.",
    Breakers: "Status of every circuit breaker.",
    BreakerControl: "Manually trip (open) or reset (close) a circuit breaker.",
    Subscribe: "Receive pushed `event` frames for the topics on this connection.",
    Reload: "Recompile the YARA rules; the old rules stay active if the new ones fail.",
    Shutdown: "Drain and stop the daemon (same as SIGTERM).",
    Welcome: "Answer to `hello`: server version, protocol version, limits.",
    Pong: "Answer to `ping`.",
    ScanResult: "A verdict: action, matches, deciding policy, sha256, degraded flags, timing.",
    PolicyResult: "Answer to `policy_add` / `policy_remove`.",
    PolicyListResult: "Answer to `policy_list`.",
    PolicyDecision: "Answer to `policy_query`.",
    ThreatsResult: "Answer to `threats`.",
    QuarantineListResult: "Answer to `quarantine_list`.",
    QuarantineResult: "Answer to `quarantine_restore` / `quarantine_delete`.",
    HealthReport: "Answer to `health`.",
    MetricsReport: "Answer to `metrics`.",
    BreakersReport: "Answer to `breakers`.",
    Subscribed: "Answer to `subscribe`: the topics now delivered.",
    ReloadResult: "Answer to `reload`: the rules now active.",
}

#: Per-field notes for the tables (``Class.field``).
FIELD_NOTES: dict[str, str] = {
    "*.id": "client-chosen request id, echoed in the reply (see Envelope)",
    "Hello.client": "free text identifying the client, for logs",
    "Hello.protocol_version": f"the version the client speaks (current: {PROTOCOL_VERSION})",
    "Hello.capabilities": "optional features the client understands (informational)",
    "Scan.data": "the whole file; must fit in one frame",
    "ScanBegin.size": "expected total size if known; over the stream limit -> `too_large`",
    "ScanChunk.data": "the next bytes of the stream",
    "ScanFd.size": (
        "scan only the first `size` bytes (a client reusing a larger buffer); "
        "nil = the whole file; more than the file holds -> `bad_fd`"
    ),
    "PolicyAdd.sha256": "lower-case hex SHA-256 of the file",
    "PolicyAdd.url_pattern": "glob matched against the download URL",
    "PolicyAdd.expires_at": "Unix time (seconds); nil = never",
    "PolicyAdd.idempotency_key": "same key twice = applied once (see Idempotency)",
    "PolicyRemove.idempotency_key": "same key twice = applied once (see Idempotency)",
    "PolicyImport.policies": (
        "1 .. 1000 items (more -> `invalid_message`), each checked like `policy_add`; "
        "one invalid -> `policy_invalid` naming `policies[i]`, nothing added"
    ),
    "PolicyImport.idempotency_key": (
        "same key twice = the batch applied once, the first counts answered (see Idempotency)"
    ),
    "PolicyImportResult.added": "policies added (or queued) by this request",
    "PolicyImportResult.existing": (
        "items whose rule_name/url_pattern/sha256 already had a policy: skipped, not an error"
    ),
    "PolicyImportResult.policy_ids": "ids of the added policies, in item order; empty when queued",
    "PolicyImportResult.queued": "journaled during a database outage; applied later",
    "PolicyImportItem.sha256": "lower-case hex SHA-256 of the file",
    "Threats.limit": "1 .. 1000",
    "PolicyList.after_id": "list policies with `id > after_id` (0 = from the start); "
    "0 .. 2^63-1",
    "PolicyList.limit": (
        "1 .. 1000: one page of at most this many, fewer when they would not fit in "
        "one frame; nil = everything in one reply, or `reply_too_large`"
    ),
    "PolicyListResult.next_after_id": (
        "more policies follow: send `policy_list` again with this `after_id` (the last "
        "id of this page); nil = the list is complete"
    ),
    "PolicyListResult.degraded": "this page came from the cached policies (database down)",
    "QuarantineRestore.path": "daemon's own uid only; otherwise pass a writable fd (SCM_RIGHTS)",
    "QuarantineList.after": (
        "list items whose `quarantine_id` sorts after this one (32 lower-case hex digits); "
        "nil = from the start; ignored without `limit`"
    ),
    "QuarantineList.limit": (
        "1 .. 1000: one page of at most this many, in `quarantine_id` order, fewer when "
        "they would not fit in one frame; nil = everything in one reply (oldest first), "
        "or `reply_too_large`"
    ),
    "QuarantineListResult.next_after": (
        "more items follow: send `quarantine_list` again with this `after` (the last "
        "id of this page); nil = the list is complete"
    ),
    "Error.code": "one of the error codes (see Errors)",
    "Error.message": "for people: names the field or the bound that failed",
    "Error.retryable": "true when the same request may succeed later",
    "Error.retry_after_ms": "hint: wait at least this long before retrying; nil = no hint",
    "Welcome.max_frame_bytes": "largest frame the server accepts (also in limits)",
    "ScanResult.sha256": "lower-case hex SHA-256 of the scanned bytes",
    "ScanResult.size": "bytes scanned",
    "ScanResult.degraded": "decided while a dependency was down",
    "ScanResult.degraded_reasons": "services that were down (empty when not degraded)",
    "ScanResult.policy_id": "the policy that decided the action, if any",
    "ScanResult.scan_ms": "time spent scanning, milliseconds",
    "PolicyResult.queued": "journaled during a database outage; applied later",
    "Unsubscribe.subscription": (
        "the `id` of the `subscribe` that made it, on this connection; "
        "unknown -> `not_found`"
    ),
    "Event.topic": "`services`, `degraded`, `breakers`, or `events` (for `events_dropped`)",
    "Event.kind": "`service_state`, `degraded_notice`, `degraded_cleared`, "
    "`breaker_transition`, `events_dropped`",
    "Event.actions": "button labels: `Retry Connection` (send `service_retry`), "
    "`Continue with Cache` (send `degraded_ack`)",
    "Event.dropped": "in `events_dropped`: how many events this subscriber missed",
    "Event.at": "Unix time (seconds)",
    "BreakerInfo.state_since": (
        "Unix time (seconds) the breaker entered its current state (unchanged since "
        "the daemon started: the start); nil from older daemons"
    ),
}

_SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

#: One canonical example per message type. Values are chosen to be exactly
#: representable in JSON and MessagePack (no float rounding), and non-default
#: wherever possible, so the vectors pin every field name and type.
EXAMPLES: tuple[msgspec.Struct, ...] = (
    # --- requests
    Hello(
        id=1, client="chromium/126 sentinel-bridge", protocol_version=1, capabilities=["scan_fd"]
    ),
    Ping(id=2),
    Scan(
        id=3,
        data=b"hello, world\n",
        url="https://example.com/hello.txt",
        filename="hello.txt",
        mime_type="text/plain",
    ),
    ScanBegin(
        id=4,
        url="https://example.com/setup.exe",
        filename="setup.exe",
        mime_type="application/x-msdownload",
        size=8,
    ),
    ScanChunk(id=4, data=b"MZ\x90\x00\x03\x00\x00\x00"),
    ScanEnd(id=4),
    ScanFd(id=5, url="https://example.com/report.pdf", filename="report.pdf", mime_type=None),
    PolicyAdd(
        id=6,
        action="block",
        sha256=_SHA,
        reason="known bad installer",
        expires_at=1767225600.0,
        idempotency_key="c0ffee00-0000-4000-8000-000000000001",
    ),
    PolicyImport(
        id=24,
        policies=[
            PolicyImportItem(action="block", sha256=_SHA, reason="threat feed 2026-01-01"),
            PolicyImportItem(action="block", sha256="e" * 64, reason="threat feed 2026-01-01"),
        ],
        idempotency_key="c0ffee00-0000-4000-8000-000000000003",
    ),
    PolicyRemove(id=7, policy_id=42, idempotency_key="c0ffee00-0000-4000-8000-000000000002"),
    PolicyList(id=8),
    PolicyQuery(
        id=9, sha256=_SHA, url="https://example.com/setup.exe", rule_names=["Suspicious_PE"]
    ),
    Threats(id=10, limit=20),
    QuarantineList(id=11),
    QuarantineRestore(id=12, quarantine_id="q-20260101-0001", path="/home/alice/setup.exe"),
    QuarantineDelete(id=13, quarantine_id="q-20260101-0001"),
    Health(id=14, probe="ready"),
    Metrics(id=15, format="prometheus"),
    Breakers(id=16),
    BreakerControl(id=17, name="database", action="trip"),
    Subscribe(id=18, topics=["services", "degraded"]),
    Unsubscribe(id=23, subscription=18),
    ServiceRetry(id=19, service="database"),
    DegradedAck(id=20, service="database"),
    Reload(id=21),
    Shutdown(id=22),
    # --- replies
    Welcome(
        id=1,
        server="sentineld/0.1.0",
        protocol_version=1,
        max_frame_bytes=DEFAULT_MAX_FRAME_BYTES,
        limits=Limits(),
    ),
    Pong(id=2),
    Error(
        id=3,
        code=ErrorCode.RATE_LIMITED,
        message="uid 1000 is over its scan rate (10/s, burst 20)",
        retryable=True,
        retry_after_ms=250,
    ),
    ScanResult(
        id=3,
        action="quarantine",
        sha256=_SHA,
        size=13,
        matches=[
            RuleMatch(
                rule="Suspicious_Script",
                namespace="scripts",
                tags=["script", "dropper"],
                meta={"severity": "high", "score": 80},
            )
        ],
        rules_version="builtin-3f2a",
        degraded=True,
        warnings=["policy database unavailable: decided from cache"],
        scan_ms=1.25,
        policy_id=42,
        reason="rule Suspicious_Script",
        degraded_reasons=["database"],
    ),
    PolicyResult(id=6, policy_id=42, queued=False),
    PolicyImportResult(id=24, added=1, existing=1, policy_ids=[43], queued=False),
    PolicyListResult(
        id=8,
        policies=[
            PolicyRecord(
                id=42,
                action="block",
                file_hash=_SHA,
                created_at=1767139200.0,
                created_by="uid:1000",
                hit_count=3,
                last_hit=1767140000.5,
                reason="known bad installer",
            )
        ],
        degraded=False,
    ),
    PolicyDecision(id=9, action="block", policy_id=42, reason="hash policy 42", degraded=False),
    ThreatsResult(
        id=10,
        threats=[
            ThreatRecord(
                id=7,
                detected_at=1767140000.5,
                url="https://example.com/setup.exe",
                filename="setup.exe",
                file_hash=_SHA,
                mime_type="application/x-msdownload",
                file_size=8,
                rule_names=["Suspicious_PE"],
                severity="high",
                action_taken="block",
                policy_id=42,
            )
        ],
    ),
    QuarantineListResult(
        id=11,
        items=[
            QuarantineItem(
                quarantine_id="q-20260101-0001",
                sha256=_SHA,
                size=8,
                url="https://example.com/setup.exe",
                filename="setup.exe",
                rules=["Suspicious_PE"],
                quarantined_at=1767140000.5,
            )
        ],
    ),
    QuarantineResult(id=12, quarantine_id="q-20260101-0001", done=True),
    HealthReport(
        id=14,
        status="degraded",
        alive=True,
        ready=True,
        reason="database: circuit open",
        uptime_seconds=3600.5,
        timestamp=1767140000.5,
        rules_version="builtin-3f2a",
        components={
            "database": ComponentHealth(
                status="unhealthy", message="circuit open", response_ms=0.0, value=None
            ),
            "scanner": ComponentHealth(
                status="healthy", message="4 workers", response_ms=0.5, value=4.0
            ),
        },
    ),
    MetricsReport(
        id=15,
        content_type="text/plain; version=0.0.4; charset=utf-8",
        text="# TYPE sentinel_scans_total counter\nsentinel_scans_total 3\n",
    ),
    BreakersReport(
        id=16,
        breakers=[
            BreakerInfo(
                name="database",
                state="open",
                consecutive_failures=5,
                failures_total=9,
                successes_total=120,
                rejected_total=4,
                opened_at=1767140000.5,
                retry_after_s=12.5,
                availability=0.875,
                state_since=1767140000.5,
            )
        ],
    ),
    Subscribed(id=18, topics=["services", "degraded"]),
    Ack(id=17, detail="breaker database tripped"),
    ReloadResult(id=21, rules_version="builtin-4b1c", rule_count=37, namespaces=4),
    Event(
        id=18,
        topic="degraded",
        kind="degraded_notice",
        service="database",
        state="degraded",
        previous="healthy",
        reason="circuit open after 5 failures",
        at=1767140000.5,
        message="Sentinel operating in degraded mode — database connection lost, "
        "using cached security policies",
        actions=["Retry Connection", "Continue with Cache"],
        dropped=0,
    ),
)

#: Extra valid vectors beyond one per type: cases an implementer gets wrong.
EXTRA_EXAMPLES: tuple[tuple[str, msgspec.Struct], ...] = (
    (
        "error_undecodable_frame",
        Error(
            id=0,
            code=ErrorCode.BAD_FRAME,
            message="undecodable frame: Input data was truncated",
            retryable=False,
            retry_after_ms=None,
        ),
    ),
    ("ping_large_id", Ping(id=2**63 - 1)),
    ("policy_list_paged", PolicyList(id=24, after_id=42, limit=100)),
    (
        "policy_list_result_page",
        PolicyListResult(
            id=24,
            policies=[
                PolicyRecord(
                    id=43,
                    action="warn",
                    url_pattern="https://downloads.example/*.exe",
                    created_at=1767139200.0,
                    created_by="uid:0",
                    reason="unsigned installers",
                )
            ],
            degraded=False,
            next_after_id=43,
        ),
    ),
    (
        "error_reply_too_large",
        Error(
            id=8,
            code=ErrorCode.REPLY_TOO_LARGE,
            message="the policy_list_result reply would be 70368601 bytes, over this "
            "daemon's max_frame_bytes of 67108864; page the request: policy_list with "
            "limit (1..1000) and after_id, continuing from each reply's next_after_id, "
            "or raise [server] max_frame_bytes",
            retryable=False,
            retry_after_ms=None,
        ),
    ),
    ("scan_empty_data", Scan(id=300, data=b"")),
    (
        "quarantine_list_paged",
        QuarantineList(id=25, after="0f3c5e8a9b7d4c2e8f1a6b5c4d3e2f10", limit=100),
    ),
    (
        "quarantine_list_result_page",
        QuarantineListResult(
            id=25,
            items=[
                QuarantineItem(
                    quarantine_id="1a2b3c4d5e6f47a8b9c0d1e2f3a4b5c6",
                    sha256=_SHA,
                    size=8,
                    url="https://downloads.example/tool.exe",
                    filename="tool.exe",
                    rules=["Suspicious_PE"],
                    quarantined_at=1767140000.5,
                )
            ],
            next_after="1a2b3c4d5e6f47a8b9c0d1e2f3a4b5c6",
        ),
    ),
)


def _pack(obj: Any) -> bytes:
    """MessagePack of a plain object (dict keys keep their insertion order)."""
    return msgspec.msgpack.encode(obj)


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


#: Valid frames that are *not* in the canonical encoding (decode-only): what a
#: peer written in another language may legitimately send.
NONCANONICAL: tuple[tuple[str, str, bytes, msgspec.Struct], ...] = (
    (
        "ping_keys_reordered",
        "request",
        _frame(_pack({"id": 5, "type": "ping"})),
        Ping(id=5),
    ),
    (
        "ping_unknown_field_ignored",
        "request",
        _frame(_pack({"type": "ping", "id": 6, "trace": "abc", "x-future": [1, 2]})),
        Ping(id=6),
    ),
    (
        "hello_defaults_omitted",
        "request",
        _frame(_pack({"type": "hello", "id": 1, "client": "c", "protocol_version": 1})),
        Hello(id=1, client="c", protocol_version=1),
    ),
    (
        "scan_begin_only_required",
        "request",
        _frame(_pack({"type": "scan_begin", "id": 9})),
        ScanBegin(id=9),
    ),
    (
        "subscribe_default_topics",
        "request",
        _frame(_pack({"type": "subscribe", "id": 10})),
        Subscribe(id=10),
    ),
    (
        "error_optional_fields_omitted",
        "reply",
        _frame(_pack({"type": "error", "id": 4, "code": "busy", "message": "m"})),
        Error(id=4, code="busy", message="m"),
    ),
)


def _invalid(
    name: str,
    frame: bytes,
    code: str,
    *,
    request_id: int = 0,
    close: bool,
    eof: bool = False,
    contains: str | None = None,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    note: str,
) -> dict[str, Any]:
    return {
        "name": name,
        "valid": False,
        "direction": "request",
        "frame_hex": frame.hex(),
        "eof": eof,
        "max_frame_bytes": max_frame_bytes,
        "expected_error_code": code,
        "expected_id": request_id,
        "close": close,
        "message_contains": contains,
        "note": note,
    }


def _invalid_vectors() -> list[dict[str, Any]]:
    """Bad frames and the answer a conforming server gives (hand-written: golden)."""
    c = ErrorCode
    over = DEFAULT_MAX_FRAME_BYTES + 1
    return [
        _invalid(
            "truncated_header",
            b"\x00\x00",
            c.BAD_FRAME,
            close=True,
            eof=True,
            note="the stream ends inside the 4-byte header: the frame is discarded; "
            "a server has no one to answer and closes without a reply",
        ),
        _invalid(
            "truncated_body",
            _frame(_pack({"type": "ping", "id": 1}))[:-2],
            c.BAD_FRAME,
            close=True,
            eof=True,
            note="the stream ends inside the body: discarded, closed without a reply",
        ),
        _invalid(
            "oversized_length",
            HEADER.pack(over),
            c.FRAME_TOO_LARGE,
            close=True,
            note=f"length {over} > max_frame_bytes: refused on the header alone, before "
            "any body byte is read; error with id 0, then close",
        ),
        _invalid(
            "max_length_header",
            b"\xff\xff\xff\xff",
            c.FRAME_TOO_LARGE,
            close=True,
            note="the largest length the header can carry; never allocated",
        ),
        _invalid(
            "zero_length_frame",
            HEADER.pack(0),
            c.BAD_FRAME,
            close=True,
            note="an empty body is not a MessagePack value: error with id 0, then close",
        ),
        _invalid(
            "not_msgpack",
            _frame(b"\xc1"),
            c.BAD_FRAME,
            close=True,
            note="0xc1 is never used in MessagePack: undecodable, id 0, then close",
        ),
        _invalid(
            "msgpack_trailing_bytes",
            _frame(_pack({"type": "ping", "id": 1}) + b"\x00"),
            c.BAD_FRAME,
            close=True,
            note="one MessagePack value per frame; trailing bytes make it undecodable",
        ),
        _invalid(
            "msgpack_array_not_map",
            _frame(_pack(["ping", 1])),
            c.BAD_FRAME,
            close=True,
            note="valid MessagePack but not a map: no id can be read; id 0, then close",
        ),
        _invalid(
            "msgpack_string_not_map",
            _frame(_pack("ping")),
            c.BAD_FRAME,
            close=True,
            note="valid MessagePack but not a map",
        ),
        _invalid(
            "unknown_type",
            _frame(_pack({"type": "frobnicate", "id": 41})),
            c.UNKNOWN_TYPE,
            request_id=41,
            close=False,
            contains="frobnicate",
            note="answered with the request's id; the connection stays usable",
        ),
        _invalid(
            "reply_type_sent_as_request",
            _frame(_pack({"type": "pong", "id": 42})),
            c.UNKNOWN_TYPE,
            request_id=42,
            close=False,
            contains="pong",
            note="server->client types are not requests",
        ),
        _invalid(
            "missing_type",
            _frame(_pack({"id": 43})),
            c.INVALID_MESSAGE,
            request_id=43,
            close=False,
            contains="$.type",
            note="a map without a string `type`",
        ),
        _invalid(
            "type_not_a_string",
            _frame(_pack({"type": 7, "id": 44})),
            c.INVALID_MESSAGE,
            request_id=44,
            close=False,
            contains="$.type",
            note="`type` must be a string",
        ),
        _invalid(
            "missing_field",
            _frame(_pack({"type": "hello", "id": 45, "client": "c"})),
            c.INVALID_MESSAGE,
            request_id=45,
            close=False,
            contains="protocol_version",
            note="a required field is missing: the message names it",
        ),
        _invalid(
            "wrong_field_type",
            _frame(_pack({"type": "hello", "id": 46, "client": "c", "protocol_version": "1"})),
            c.INVALID_MESSAGE,
            request_id=46,
            close=False,
            contains="$.protocol_version",
            note="a field of the wrong type: the message names it",
        ),
        _invalid(
            "bytes_field_sent_as_string",
            _frame(_pack({"type": "scan", "id": 47, "data": "hello"})),
            c.INVALID_MESSAGE,
            request_id=47,
            close=False,
            contains="$.data",
            note="`data` must be MessagePack bin, not str",
        ),
        _invalid(
            "literal_out_of_range",
            _frame(_pack({"type": "policy_add", "id": 48, "action": "explode"})),
            c.INVALID_MESSAGE,
            request_id=48,
            close=False,
            contains="$.action",
            note="an enumerated string outside its values",
        ),
        _invalid(
            "nested_wrong_type",
            _frame(_pack({"type": "policy_query", "id": 49, "rule_names": ["a", 5]})),
            c.INVALID_MESSAGE,
            request_id=49,
            close=False,
            contains="$.rule_names[1]",
            note="the path names the element inside the field",
        ),
        _invalid(
            "unsubscribe_without_subscription",
            _frame(_pack({"type": "unsubscribe", "id": 50})),
            c.INVALID_MESSAGE,
            request_id=50,
            close=False,
            contains="subscription",
            note="`subscription` is required: there is no 'end all of them'",
        ),
        _invalid(
            "id_wrong_type",
            _frame(_pack({"type": "ping", "id": "seven"})),
            c.INVALID_MESSAGE,
            close=False,
            contains="$.id",
            note="an id that is not an integer cannot be echoed: the error carries id 0",
        ),
        _invalid(
            "id_missing",
            _frame(_pack({"type": "ping"})),
            c.INVALID_MESSAGE,
            close=False,
            contains="id",
            note="every message needs an integer id",
        ),
    ]


def _vector(name: str, direction: str, frame: bytes, message: msgspec.Struct) -> dict[str, Any]:
    return {
        "name": name,
        "valid": True,
        "direction": direction,
        "canonical": True,
        "frame_hex": frame.hex(),
        "message": json.loads(msgspec.json.encode(message)),
    }


def build_vectors() -> list[dict[str, Any]]:
    """Every vector, valid ones first, in a fixed order."""
    requests = set(REQUEST_TYPES)
    covered: set[type[Any]] = set()
    vectors: list[dict[str, Any]] = []
    for example in EXAMPLES:
        cls = type(example)
        direction = "request" if cls in requests else "reply"
        vectors.append(_vector(type_tag(cls), direction, encode_framed(example), example))
        covered.add(cls)
    # A message type added later without an example still gets a vector (made
    # from its required fields), so the vectors never silently skip a type.
    for cls in (*REQUEST_TYPES, *REPLY_TYPES):
        if cls not in covered:
            example = synthesize(cls)
            direction = "request" if cls in requests else "reply"
            vectors.append(_vector(type_tag(cls), direction, encode_framed(example), example))
    for name, example in EXTRA_EXAMPLES:
        direction = "request" if type(example) in requests else "reply"
        vectors.append(_vector(name, direction, encode_framed(example), example))
    for name, direction, frame, message in NONCANONICAL:
        vector = _vector(name, direction, frame, message)
        vector["canonical"] = False
        vectors.append(vector)
    vectors.extend(_invalid_vectors())
    names = [v["name"] for v in vectors]
    if len(names) != len(set(names)):
        raise AssertionError("duplicate vector names")
    return vectors


def synthesize(cls: type[Any]) -> Any:
    """An instance of ``cls`` with every required field filled by a plain value."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    kwargs = {f.name: _sample(f.type) for f in info.fields if f.required}
    return cls(**kwargs)


def _sample(t: mi.Type) -> Any:
    samplers: dict[type[mi.Type], Callable[[Any], Any]] = {
        mi.IntType: lambda _: 1,
        mi.FloatType: lambda _: 1.5,
        mi.StrType: lambda _: "x",
        mi.BoolType: lambda _: True,
        mi.BytesType: lambda _: b"\x00",
        mi.NoneType: lambda _: None,
        mi.AnyType: lambda _: None,
        mi.LiteralType: lambda lt: lt.values[0],
        mi.ListType: lambda _: [],
        mi.DictType: lambda _: {},
        mi.UnionType: lambda ut: _sample(ut.types[0]),
        mi.StructType: lambda st: synthesize(st.cls),
    }
    for kind, sampler in samplers.items():
        if isinstance(t, kind):
            return sampler(t)
    raise TypeError(f"no sample value for {t!r}")


# ---------------------------------------------------------------------------
# JSON Schema
# ---------------------------------------------------------------------------


def build_schema() -> dict[str, Any]:
    (request_schema, reply_schema), components = msgspec.json.schema_components(
        (Request, Reply), ref_template="#/$defs/{name}"
    )
    clash = {"Request", "Reply"} & set(components)
    if clash:
        raise AssertionError(f"a message class is named like a union: {clash}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"Sentinel IPC protocol, version {PROTOCOL_VERSION}",
        "description": (
            "Generated by `python -m sentinel_ipc.schema` from sentinel_ipc/messages.py; "
            "do not edit. Messages travel as MessagePack maps in length-prefixed frames "
            "(see PROTOCOL.md). This schema describes their JSON form: a string with "
            "`contentEncoding: base64` is MessagePack `bin` on the wire. `Request` is "
            "client->server, `Reply` is server->client (replies and pushed events)."
        ),
        "x-protocol-version": PROTOCOL_VERSION,
        "x-default-max-frame-bytes": DEFAULT_MAX_FRAME_BYTES,
        "x-admin-requests": sorted(type_tag(t) for t in ADMIN_REQUESTS),
        "x-idempotent-requests": sorted(type_tag(t) for t in IDEMPOTENT_REQUESTS),
        "x-error-codes": sorted(value for key, value in vars(ErrorCode).items() if key.isupper()),
        "anyOf": [{"$ref": "#/$defs/Request"}, {"$ref": "#/$defs/Reply"}],
        "$defs": {"Request": request_schema, "Reply": reply_schema, **components},
    }


# ---------------------------------------------------------------------------
# Markdown tables for PROTOCOL.md
# ---------------------------------------------------------------------------


def _type_name(t: mi.Type) -> str:
    simple: dict[type[mi.Type], str] = {
        mi.IntType: "int",
        mi.FloatType: "float",
        mi.StrType: "str",
        mi.BoolType: "bool",
        mi.BytesType: "bin",
        mi.NoneType: "nil",
        mi.AnyType: "any",
    }
    for kind, name in simple.items():
        if isinstance(t, kind):
            return name
    if isinstance(t, mi.LiteralType):
        return " \\| ".join(json.dumps(v) for v in t.values)
    if isinstance(t, mi.ListType):
        return f"array of {_type_name(t.item_type)}"
    if isinstance(t, mi.DictType):
        return f"map of {_type_name(t.key_type)} to {_type_name(t.value_type)}"
    if isinstance(t, mi.UnionType):
        return " \\| ".join(_type_name(u) for u in t.types)
    if isinstance(t, mi.StructType):
        return f"[{t.cls.__name__}](#record-{t.cls.__name__.lower()})"
    raise TypeError(f"cannot name {t!r}")


def _default(field: mi.Field) -> str:
    if field.required:
        return "**required**"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, msgspec.Struct):
        return f"`{type(value).__name__}` defaults"
    text = json.dumps(value).replace("null", "nil")
    return f"`{text}`"


def _doc(cls: type[Any]) -> str:
    """The class docstring's first paragraph, else :data:`PURPOSE`, in Markdown."""
    own = cls.__dict__.get("__doc__")
    if not own:
        return PURPOSE.get(cls, "")
    return " ".join(own.strip().split("\n\n")[0].split()).replace("``", "`")


def _field_table(cls: type[Any], *, skip: frozenset[str] = frozenset()) -> list[str]:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    rows = ["| field | type | default | notes |", "|---|---|---|---|"]
    if info.tag_field is not None:
        rows.append(f"| `{info.tag_field}` | str | `{json.dumps(info.tag)}` | the type tag |")
    ordered = sorted(info.fields, key=lambda f: f.name != "id")  # id first, then declared order
    for field in ordered:
        if field.name in skip:
            continue
        note = FIELD_NOTES.get(f"{cls.__name__}.{field.name}", "")
        if not note and info.tag_field is not None:
            note = FIELD_NOTES.get(f"*.{field.name}", "")
        rows.append(
            f"| `{field.encode_name}` | {_type_name(field.type)} | {_default(field)} | {note} |"
        )
    return rows


def _records() -> list[type[Any]]:
    """Shared record Structs reachable from the messages, in first-use order."""
    seen: list[type[Any]] = []

    def walk(t: mi.Type) -> None:
        if isinstance(t, mi.StructType):
            if t.cls not in seen and t.cls not in REQUEST_TYPES and t.cls not in REPLY_TYPES:
                seen.append(t.cls)
            for field in t.fields:
                walk(field.type)
        elif isinstance(t, (mi.ListType, mi.SetType, mi.FrozenSetType)):
            walk(t.item_type)
        elif isinstance(t, mi.DictType):
            walk(t.value_type)
        elif isinstance(t, mi.UnionType):
            for u in t.types:
                walk(u)

    for cls in (*REQUEST_TYPES, *REPLY_TYPES):
        walk(mi.type_info(cls))
    return seen


def render_tables() -> str:
    """The generated section of PROTOCOL.md: one table per message and record."""
    lines: list[str] = [BEGIN_MARKER, ""]
    lines += ["### Requests (client -> server)", ""]
    lines += [
        "| type | reply | admin | idempotent | purpose |",
        "|---|---|---|---|---|",
    ]
    for cls in REQUEST_TYPES:
        tag = type_tag(cls)
        lines.append(
            f"| [`{tag}`](#msg-{tag}) | {REPLY_FOR.get(cls, '?')} | "
            f"{'yes' if cls in ADMIN_REQUESTS else ''} | "
            f"{'yes' if cls in IDEMPOTENT_REQUESTS else ''} | {_doc(cls)} |"
        )
    lines.append("")
    lines += ["### Replies and events (server -> client)", ""]
    lines += ["| type | purpose |", "|---|---|"]
    for cls in REPLY_TYPES:
        tag = type_tag(cls)
        lines.append(f"| [`{tag}`](#msg-{tag}) | {_doc(cls)} |")
    lines.append("")
    lines += ["### Fields of every message", ""]
    for cls in (*REQUEST_TYPES, *REPLY_TYPES):
        tag = type_tag(cls)
        lines.append(f'<a id="msg-{tag}"></a>')
        lines.append(f"#### `{tag}` ({cls.__name__})")
        lines.append("")
        doc = _doc(cls)
        if doc:
            lines += [doc, ""]
        lines += _field_table(cls)
        lines.append("")
    lines += ["### Records (nested maps)", ""]
    for cls in _records():
        lines.append(f'<a id="record-{cls.__name__.lower()}"></a>')
        lines.append(f"#### {cls.__name__}")
        lines.append("")
        doc = _doc(cls)
        if doc:
            lines += [doc, ""]
        lines += _field_table(cls)
        lines.append("")
    lines.append(END_MARKER)
    return "\n".join(lines)


def splice_tables(document: str, tables: str) -> str:
    """``document`` with its generated section replaced (unchanged if it has none)."""
    start = document.find(BEGIN_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < start:
        return document
    return document[:start] + tables + document[end + len(END_MARKER) :]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def generated_files(directory: Path) -> dict[Path, str]:
    """Each generated file and the text it should have."""
    files = {
        directory / SCHEMA_FILE: _dumps(build_schema()),
        directory / VECTORS_FILE: _dumps(build_vectors()),
    }
    protocol = directory / PROTOCOL_FILE
    if protocol.exists():
        text = protocol.read_text(encoding="utf-8")
        files[protocol] = splice_tables(text, render_tables())
    return files


def stale_files(directory: Path = PROTOCOL_DIR) -> list[Path]:
    """Generated files whose content differs from what the code generates."""
    stale = []
    for path, text in generated_files(directory).items():
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sentinel_ipc.schema",
        description="Generate protocol/schema.json, protocol/vectors.json and the "
        "tables in protocol/PROTOCOL.md from sentinel_ipc/messages.py.",
    )
    parser.add_argument("--out", type=Path, default=PROTOCOL_DIR, help="protocol directory")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file is stale"
    )
    args = parser.parse_args(argv)
    directory: Path = args.out
    if args.check:
        stale = stale_files(directory)
        for path in stale:
            print(f"stale: {path} (run `python -m sentinel_ipc.schema`)", file=sys.stderr)
        return 1 if stale else 0
    directory.mkdir(parents=True, exist_ok=True)
    for path, text in generated_files(directory).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 0


__all__ = [
    "EXAMPLES",
    "PROTOCOL_DIR",
    "build_schema",
    "build_vectors",
    "main",
    "render_tables",
    "stale_files",
    "synthesize",
]

if __name__ == "__main__":
    sys.exit(main())
