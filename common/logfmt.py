"""Logs, one event per line: JSON objects for machines, or short text lines for a person at a terminal.

A log call names its event in the message and puts what it is about in ``extra=``; a ``ContextLogger`` adds the
ids of the device and the utterance it is about. The JSON line carries every ``extra=`` key as it is (formatted by
python-json-logger); the text line renders them for a person (``text_details``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

RECORD_ATTRIBUTES = frozenset(RESERVED_ATTRS) | {"message", "asctime", "taskName"}
"""The attributes every log record has of its own: any other attribute came from ``extra=``."""


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """What a log call gave in ``extra=`` (a ``ContextLogger``'s ids included), in the order given."""
    return {
        key: value for key, value in record.__dict__.items() if key not in RECORD_ATTRIBUTES and not key.startswith("_")
    }


class AboutAnUtterance(Protocol):
    """What a line about one utterance takes its ids from: a result, a request, an action."""

    @property
    def device_id(self) -> str: ...

    @property
    def utterance_id(self) -> str: ...


class ContextLogger(logging.LoggerAdapter):
    """A logger whose lines carry the ids of what they are about, for example
    ``ContextLogger(log, device_id="pi-kitchen-01").bind(utterance_id=utterance_id).info("wake", extra={...})``.

    Its context (``device_id``, ``utterance_id``, and whatever else it was bound to) is added to each call's
    ``extra=``; a key the call gives itself wins. A context value that is None is left out, so a line about no
    utterance carries no ``utterance_id``.
    """

    def __init__(self, logger: logging.Logger, **context: Any) -> None:
        super().__init__(logger, {key: value for key, value in context.items() if value is not None})

    def bind(self, **context: Any) -> ContextLogger:
        """A logger for the lines about one thing: this one's context, with ``context`` added (an utterance id, a
        model version)."""
        assert isinstance(self.logger, logging.Logger)
        return ContextLogger(self.logger, **{**(self.extra or {}), **context})

    def about(self, subject: AboutAnUtterance) -> ContextLogger:
        """A logger for the lines about one utterance, with the device and utterance ids of ``subject``."""
        return self.bind(device_id=subject.device_id, utterance_id=subject.utterance_id)

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        # The standard adapter replaces the call's extra= with its own; here the two are merged.
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class JsonLineFormatter(JsonFormatter):
    """Formats a record as one JSON line: ``ts``, ``level``, ``component`` and ``event`` (the message), then every
    ``extra=`` key as given, then the traceback of the exception, if any, as ``exception``. The first four are the
    line's own: an ``extra=`` key by one of those names does not replace them (no log call uses them)."""

    def __init__(self, component: str) -> None:
        super().__init__(rename_fields={"message": "event", "exc_info": "exception"}, json_ensure_ascii=False)
        self.component = component

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        own = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "event": record.message,
        }
        log_data.update(own)  # first, so that they lead the line
        super().add_fields(log_data, record, message_dict)
        log_data.update(own)  # again, over any extra= key of the same name; their place stays first
        if "exception" in log_data:
            log_data["exception"] = log_data.pop("exception")  # last: it runs over many lines


SHORT_ID_LENGTH = 8
"""Hex digits of an utterance id a text line shows: enough to match the lines of one utterance, and a prefix of
the full id that results, the worker and JSON logs carry."""


class TextLineFormatter(logging.Formatter):
    """Formats a record as one short line for a person, for example
    ``12:03:04 edge result: lights_on, confidence 0.99 [utt 3f2a9c1e]``.

    Local time, the level unless it is info, the event, its details (``text_details``), and the utterance it is
    about.
    """

    def format(self, record: logging.LogRecord) -> str:
        line = time.strftime("%H:%M:%S", time.localtime(record.created))
        if record.levelno != logging.INFO:
            line += f" {record.levelname}"
        message = record.getMessage()
        line += f" {message}"
        details = text_details(extra_fields(record), message)
        if details:
            line += f": {', '.join(details)}"
        utterance_id = getattr(record, "utterance_id", None)
        if utterance_id:
            line += f" [utt {utterance_id[:SHORT_ID_LENGTH]}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


TEXT_LEFT_OUT = frozenset({"device_id", "utterance_id", "time_s"})
"""``extra=`` keys a text line does not list: the device (a process is one device, and its first line says which),
the utterance (its short id ends the line) and the time in the audio stream (JSON lines carry it). A model
``version`` is listed only where the message does not name it already."""

_TEXT_RENDERED = frozenset(
    {"intent", "slots", "transcript", "reason", "confidence", "score", "acted", "code", "detail", "latency_ms",
     "duration_ms"}
)  # fmt: skip
"""``extra=`` keys that ``text_details`` words in a way of their own; any other is listed as ``key value``."""


def text_details(fields: Mapping[str, object], message: str = "") -> list[str]:
    """The ``extra=`` of a log call as a person reads it, most telling first: ``weather day=tomorrow``,
    ``"what's the weather tomorrow"``, ``confidence 0.96``, ``acted``, ``in 412 ms``, then any other key but those
    of TEXT_LEFT_OUT as ``key value`` (``topic device/pi/result``, ``version 1.2.0`` unless ``message`` names it).
    Fields that are absent or None are left out, but for an answer's intent: a transcript without one says
    ``no intent``."""

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
    for key, value in fields.items():
        if value is None or key in _TEXT_RENDERED or key in TEXT_LEFT_OUT:
            continue
        if key == "version" and str(value) in message:
            continue  # "now running 1.2.0 (was 1.1.0)" says it already
        details.append(f"{key} {value}")
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
