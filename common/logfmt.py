"""Logs, one event per line: JSON objects for machines, or short text lines for a person at a terminal.

A log call names its event in the message and puts what it is about in ``extra=`` (see CONTEXT_FIELDS):
the JSON line carries each field as it is, the text line renders the ones a person reads.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

CONTEXT_FIELDS = (
    "device_id", "utterance_id", "topic", "code", "port", "version", "reason",
    "intent", "slots", "transcript", "confidence", "acted", "score", "time_s", "detail", "latency_ms", "duration_ms",
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


SHORT_ID_LENGTH = 8
"""Hex digits of an utterance id a text line shows: enough to match the lines of one utterance, and a prefix of
the full id that results, the worker and JSON logs carry."""


class TextLineFormatter(logging.Formatter):
    """Formats a record as one short line for a person, for example
    ``12:03:04 edge result: lights_on, confidence 0.99 [utt 3f2a9c1e]``.

    Local time, the level unless it is info, the event, its details in a fixed order, and the utterance it is
    about. The device id is left out: a process is one device, and its first line says which.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno != logging.INFO:
            line += f" {record.levelname}"
        line += f" {record.getMessage()}"
        details = text_details(record.__dict__)
        if details:
            line += f": {', '.join(details)}"
        utterance_id = getattr(record, "utterance_id", None)
        if utterance_id:
            line += f" [utt {utterance_id[:SHORT_ID_LENGTH]}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def text_details(fields: Mapping[str, object]) -> list[str]:
    """The context of a log call as a person reads it, most telling first: ``weather day=tomorrow``,
    ``"what's the weather tomorrow"``, ``confidence 0.96``, ``acted``, ``in 412 ms``. Fields that are absent or
    None are left out, but for an answer's intent: a transcript without one says ``no intent``."""

    def given(key: str) -> bool:
        return fields.get(key) is not None

    details = []
    if given("intent"):
        slots = fields.get("slots") or {}
        details.append(" ".join([str(fields["intent"]), *(f"{name}={value}" for name, value in slots.items())]))
    elif given("transcript"):
        details.append("no intent")
    if given("transcript"):
        details.append(json.dumps(fields["transcript"], ensure_ascii=False))
    if given("reason"):
        details.append(f"reason {fields['reason']}")
    if given("confidence"):
        details.append(f"confidence {fields['confidence']:.2f}")
    if given("score"):
        details.append(f"score {fields['score']:.2f}")
    if given("acted"):
        details.append("acted" if fields["acted"] else "not acted")
    if given("code"):
        details.append(str(fields["code"]))
    if given("detail"):
        details.append(str(fields["detail"]))
    for key in ("latency_ms", "duration_ms"):
        if given(key):
            details.append(f"in {fields[key]:.0f} ms")
    # The version is left out: the lines about a model name it in their message.
    for key in ("topic", "port"):
        if given(key):
            details.append(f"{key} {fields[key]}")
    return details


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
"""The levels ``--log-level`` takes, in any case."""

LOG_FORMATS = ("text", "json")
"""The formats ``--log-format`` takes: short lines for a person, or one JSON object per line."""


def log_level(text: str) -> str:
    """An argparse type for ``--log-level``: a known level, upper case; a clear error otherwise."""
    import argparse

    if text.lower() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}: one of {', '.join(LOG_LEVELS)}")
    return text.upper()


def configure_logging(component: str, level: str = "INFO", log_format: str = "json") -> None:
    """Send this process's logs to stderr, as JSON lines or as text lines (``log_format``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextLineFormatter() if log_format == "text" else JsonLineFormatter(component))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.Formatter.converter = time.gmtime
