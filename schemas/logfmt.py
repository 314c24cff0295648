"""Structured logs: one JSON object per line, carrying device and utterance ids when known."""

from __future__ import annotations

import json
import logging
import sys
import time

CONTEXT_FIELDS = (
    "device_id", "utterance_id", "topic", "code", "port",
    "intent", "confidence", "acted", "score", "time_s", "detail", "duration_ms",
)  # fmt: skip
"""``extra=`` keys copied into each line when a log call gives them."""


class JsonLineFormatter(logging.Formatter):
    """Formats a record as one JSON line: time, level, component, event and context."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "event": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels ``--log-level`` takes, in any case."""


def log_level(text: str) -> str:
    """An argparse type for ``--log-level``: a known level, upper case; a clear error otherwise."""
    import argparse

    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}: one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def configure_logging(component: str, level: str = "INFO") -> None:
    """Send this process's logs to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter(component))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.Formatter.converter = time.gmtime
