"""Structured logging: one line per event, ``key=value`` pairs (logfmt) on stderr.

Call sites pass the event name as the message and the fields as ``extra={"f": {...}}``
via :func:`log_event`, so a log line is greppable and machine-parseable::

    ts=2026-11-28T13:40:02.114Z level=info event=connection_opened uid=1000 pid=4242
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOGGER_NAME = "sentinel"
logger = logging.getLogger(LOGGER_NAME)


def _quote(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"event={_quote(record.getMessage())}",
        ]
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            parts.extend(f"{k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure_logging(level: str = "info") -> None:
    """Send Sentinel's log to stderr as logfmt; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(event: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (cheap when the level is off)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={"fields": fields})
