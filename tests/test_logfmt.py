"""The log lines themselves (common/logfmt.py): every ``extra=`` key in the JSON line, the ids a ContextLogger
carries, and the text line a person reads."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re

import pytest

from common.logfmt import ContextLogger, JsonLineFormatter, TextLineFormatter
from device.actions import ActionRequest

_loggers = itertools.count()


def _logger(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    """A logger of its own that writes with ``formatter`` to the returned buffer, and nowhere else."""
    logger = logging.getLogger(f"tests.logfmt.{next(_loggers)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    return logger, output


def _json_lines(output: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_every_extra_key_reaches_the_json_line_after_the_fixed_fields() -> None:
    logger, output = _logger(JsonLineFormatter("device"))
    # As the update thread logs a self-test that failed: the message does not name the version, the line must.
    ContextLogger(logger, device_id="pi-kitchen-01").warning(
        "self-test failed on %d of %d clips",
        3,
        5,
        extra={"version": "1.2.0", "rollout_share": 0.25, "clips": ["a.wav", "b.wav"], "reason": None},
    )

    (line,) = _json_lines(output)
    assert list(line)[:4] == ["ts", "level", "component", "event"]
    assert line["level"] == "warning" and line["component"] == "device"
    assert line["event"] == "self-test failed on 3 of 5 clips"
    assert line["device_id"] == "pi-kitchen-01"
    # Keys no list names reach the line as given, None included.
    assert line["version"] == "1.2.0" and line["rollout_share"] == 0.25 and line["clips"] == ["a.wav", "b.wav"]
    assert "reason" in line and line["reason"] is None
    # Nothing of the record's own bookkeeping comes along.
    assert not {"msg", "args", "levelname", "pathname", "message", "exc_info"} & set(line)


def test_an_exception_ends_the_json_line_and_non_ascii_stays_readable() -> None:
    logger, output = _logger(JsonLineFormatter("cloud_worker"))
    try:
        raise ValueError("débâcle")
    except ValueError:
        logger.exception("handling failed: température", extra={"topic": "device/pi/utterance"})

    raw = output.getvalue()
    assert "température" in raw and '"event": "handling failed: température"' in raw
    (line,) = _json_lines(output)
    assert list(line)[-1] == "exception" and "ValueError: débâcle" in line["exception"]
    assert line["topic"] == "device/pi/utterance"


def test_a_context_logger_carries_device_and_utterance_ids_and_merges_each_call_extra() -> None:
    logger, output = _logger(JsonLineFormatter("device"))
    device = ContextLogger(logger, device_id="pi-kitchen-01")
    utterance = device.bind(utterance_id="3f2a9c1e" * 4)

    device.info("stopped")
    utterance.info("wake", extra={"score": 0.93, "time_s": 1.5})
    utterance.info("edge result", extra={"intent": "lights_on", "device_id": "given-by-the-call"})
    device.bind(utterance_id=None).info("left in the outbox")
    device.about(ActionRequest("lights_on", {}, "edge", 0.99, "pi-hall-02", "ab" * 16)).info("action ran")

    stopped, wake, edge, no_utterance, action = _json_lines(output)
    assert stopped["device_id"] == "pi-kitchen-01" and "utterance_id" not in stopped
    assert (wake["device_id"], wake["utterance_id"]) == ("pi-kitchen-01", "3f2a9c1e" * 4)
    assert (wake["score"], wake["time_s"]) == (0.93, 1.5)
    # A key the call gives wins over the logger's own, and the bound logger is left as it was.
    assert edge["device_id"] == "given-by-the-call" and edge["utterance_id"] == "3f2a9c1e" * 4
    assert utterance.extra == {"device_id": "pi-kitchen-01", "utterance_id": "3f2a9c1e" * 4}
    assert "utterance_id" not in no_utterance
    assert (action["device_id"], action["utterance_id"]) == ("pi-hall-02", "ab" * 16)


def test_a_context_logger_keeps_the_caller_as_the_source_of_the_line() -> None:
    logger, _ = _logger(JsonLineFormatter("device"))
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)

    ContextLogger(logger, device_id="pi").bind(utterance_id="ab" * 16).info("wake")

    (record,) = records
    assert record.funcName == "test_a_context_logger_keeps_the_caller_as_the_source_of_the_line"
    assert record.pathname == __file__


@pytest.mark.parametrize(
    ("extra", "message", "details"),
    [
        # As before: the ids, the version a message names and the time in the stream are not listed.
        ({"device_id": "pi", "score": 0.934, "time_s": 1.5}, "wake", "wake: score 0.93"),
        ({"device_id": "pi", "version": "1.2.0"}, "now running 1.2.0 (was 1.1.0)", "now running 1.2.0 (was 1.1.0)"),
        ({"intent": "lights_on", "slots": {}, "confidence": 0.99, "time_s": 3.4}, "edge result",
         "edge result: lights_on, confidence 0.99"),
        ({"topic": "device/pi/result"}, "dropped a message", "dropped a message: topic device/pi/result"),
        # A version the message does not name, and keys text_details knows nothing of, are listed as they come.
        ({"version": "1.2.0"}, "self-test failed on 3 of 5 clips", "self-test failed on 3 of 5 clips: version 1.2.0"),
        ({"detail": "exit status 0", "attempt": 2, "left": None}, "action ran", "action ran: exit status 0, attempt 2"),
    ],
)  # fmt: skip
def test_text_lines_word_the_details_a_person_reads(extra: dict, message: str, details: str) -> None:
    logger, output = _logger(TextLineFormatter())
    ContextLogger(logger, utterance_id="3f2a9c1e" * 4).info(message, extra=extra)

    assert re.fullmatch(rf"\d\d:\d\d:\d\d {re.escape(details)} \[utt 3f2a9c1e\]\n", output.getvalue())
