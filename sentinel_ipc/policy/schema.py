"""The PolicyGraph schema, versioned with ``PRAGMA user_version``.

Theory of operation
-------------------
``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``. A new
database runs all of them in order; an old one runs the ones it lacks. Each
step runs in its own transaction together with the ``user_version`` bump, so a
crash mid-migration leaves the database at the previous version, never between
two. A database whose version is *newer* than this code refuses to open rather
than being written to by a program that does not know its shape.

Rows are always read by column name (``sqlite3.Row``), never by position, so a
migration may add columns anywhere.

Tables
------
``policies``
    what the user decided. Two columns are derived from ``url_pattern``:
    ``url_glob``, the pattern rewritten for SQLite's ``GLOB`` (so ``[`` is
    literal), and ``url_token``, one of the pattern's whole tokens ("" if it
    has none; see ``decision.pattern_tokens``). A URL lookup reads only the
    patterns filed under one of the URL's tokens, through an index, and lets
    ``GLOB`` in C confirm them. Rows migrated from version 1 get their token
    computed by the store after the migration (SQL cannot tokenise).
``threat_history``
    every detection and every non-allow verdict; the store keeps the newest
    ``threat_history_max_rows`` (see "Retention" in ``store.py``).
``applied_writes``
    idempotency keys of writes already applied (client keys and journal
    entries). A replayed or re-sent write whose key is here is not applied
    again; this is what makes journal replay exactly-once.
"""

from __future__ import annotations

from typing import Final

#: The version this code writes. ``len(MIGRATIONS)``.
SCHEMA_VERSION: Final = 2

_V1 = """
CREATE TABLE policies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_name   TEXT,
    url_pattern TEXT,
    file_hash   TEXT,
    mime_type   TEXT,
    action      TEXT NOT NULL CHECK (action IN ('allow', 'warn', 'quarantine', 'block')),
    created_at  REAL NOT NULL,
    created_by  TEXT NOT NULL DEFAULT '',
    expires_at  REAL,
    hit_count   INTEGER NOT NULL DEFAULT 0,
    last_hit    REAL,
    reason      TEXT
);
CREATE UNIQUE INDEX policies_identity
    ON policies (ifnull(rule_name, ''), ifnull(url_pattern, ''), ifnull(file_hash, ''));
CREATE INDEX policies_file_hash ON policies (file_hash) WHERE file_hash IS NOT NULL;
CREATE INDEX policies_rule_name ON policies (rule_name) WHERE rule_name IS NOT NULL;

CREATE TABLE threat_history (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    detected_at  REAL NOT NULL,
    url          TEXT,
    filename     TEXT,
    file_hash    TEXT NOT NULL,
    mime_type    TEXT,
    file_size    INTEGER NOT NULL DEFAULT 0,
    rule_names   TEXT NOT NULL DEFAULT '[]',
    severity     TEXT,
    action_taken TEXT NOT NULL,
    policy_id    INTEGER
);
CREATE INDEX threat_history_detected_at ON threat_history (detected_at);
"""

_V2 = """
ALTER TABLE policies ADD COLUMN url_glob TEXT;
ALTER TABLE policies ADD COLUMN url_token TEXT;
UPDATE policies SET url_glob = replace(url_pattern, '[', '[[]') WHERE url_pattern IS NOT NULL;
CREATE INDEX policies_url_token ON policies (url_token) WHERE url_glob IS NOT NULL;

CREATE TABLE applied_writes (
    idempotency_key TEXT PRIMARY KEY,
    policy_id       INTEGER,
    applied_at      REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX applied_writes_applied_at ON applied_writes (applied_at);
"""

#: ``MIGRATIONS[i]`` upgrades version ``i`` to ``i + 1``.
MIGRATIONS: Final[tuple[str, ...]] = (_V1, _V2)

assert len(MIGRATIONS) == SCHEMA_VERSION


def sqlite_glob(pattern: str) -> str:
    """Rewrite a Sentinel URL glob (``*``, ``?``, everything else literal) for
    SQLite's ``GLOB``, which also knows ``[...]`` classes: ``[`` becomes ``[[]``.

    Must agree with the ``replace()`` in migration 2.
    """
    return pattern.replace("[", "[[]")
