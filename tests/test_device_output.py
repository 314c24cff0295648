"""What `python -m device run` says while it runs: one line per wake, decision, cloud answer and action, by default.

The device runs as a user runs it, in a subprocess, on the sample recordings, against the test's Mosquitto and,
for the cloud's answer, a real worker with the real recogniser.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from itertools import count
from pathlib import Path

import pytest

from common.logfmt import SHORT_ID_LENGTH, TextLineFormatter
from schemas.protocol import decode
from schemas.topics import RESULT

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, Inbox

TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (?P<event>[^:\[]+?)(?:: (?P<details>.*?))?(?: \[utt (?P<id>[0-9a-f]+)\])?$")
"""A device log line in text: local time, event, details, short utterance id."""

_groups = count()


def _config(tmp_path: Path, broker_settings, device_id: str, *recordings: Path, **cloud) -> Path:
    """A device config that plays ``recordings`` once, runs a shell action on lights_on, and uses the test broker."""
    config = tmp_path / "device.toml"
    files = ", ".join(json.dumps(str(path)) for path in recordings)
    cloud_lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in cloud.items())
    config.write_text(
        f'device_id = "{device_id}"\n[broker]\nport = {broker_settings.port}\n'
        f'[audio]\nsource = "file"\nfiles = [{files}]\n'
        f"[cloud]\n{cloud_lines}"
        f'[actions.lights_on]\ncommand = "echo lights on >> {tmp_path / "actions.log"}"\n'
    )
    return config


def _run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "device", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def _text_lines(stderr: str) -> list[re.Match]:
    """The device's own log lines; the TFLite runtime writes a line of its own to stderr too."""
    return [found for line in stderr.splitlines() if (found := TEXT_LINE.match(line))]


def _results(links, device_id: str) -> Inbox:
    results = Inbox()
    links().subscribe(RESULT.topic(device_id=device_id), results)
    return results


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_says_by_default_what_it_hears_decides_asks_and_does(
    links, broker_settings, device_id, worker_factory, tmp_path
):
    worker_factory(f"output{next(_groups)}", "solo")
    results = _results(links, device_id)
    config = _config(tmp_path, broker_settings, device_id, IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE)

    done = _run("run", "--config", str(config))

    assert done.stdout == ""
    lines = _text_lines(done.stderr)
    events = [line["event"] for line in lines]
    assert events == [
        f"listening as {device_id} with model 1.1.0",
        "wake",
        "edge result",
        "action ran",
        "wake",
        "asking the cloud",
        "cloud result",
        "stopped",
    ], done.stderr
    _, wake, edge, action, other_wake, asking, answer, _ = lines
    assert re.fullmatch(r"score \d\.\d\d", wake["details"])
    assert re.fullmatch(r"lights_on, confidence 0\.\d\d", edge["details"])
    assert re.fullmatch(r"lights_on, exit status 0, in \d+ ms", action["details"])
    assert (tmp_path / "actions.log").read_text() == "lights on\n"
    assert asking["details"].startswith("reason out_of_vocabulary, confidence 0.")
    assert re.fullmatch(r'(no intent|\w+( \w+=\w+)*), "[^"]*weather[^"]*", confidence \S+, (not )?acted, in \d+ ms',
                        answer["details"])  # fmt: skip
    # One id per utterance, on every line about it: its wake, its decision, the cloud's answer, its action.
    assert wake["id"] == edge["id"] == action["id"] and len(wake["id"]) == SHORT_ID_LENGTH
    assert other_wake["id"] == asking["id"] == answer["id"] != wake["id"]
    # The short id is the start of the utterance's real id, the one its published result carries.
    published = [decode(*results.get(timeout_s=10)).utterance_id for _ in range(2)]
    assert [utterance_id[:SHORT_ID_LENGTH] for utterance_id in published] == [wake["id"], other_wake["id"]]


@pytest.mark.slow
@pytest.mark.subprocess
def test_log_level_warning_keeps_run_quiet_and_json_keeps_the_ids(links, broker_settings, device_id, tmp_path):
    results = _results(links, device_id)
    config = _config(tmp_path, broker_settings, device_id, IN_VOCABULARY_SAMPLE)

    for quiet in (["--log-level", "warning", "run", "--config", str(config)],
                  ["run", "--config", str(config), "--log-level", "WARNING"]):  # fmt: skip
        done = _run(*quiet)
        assert _text_lines(done.stderr) == [] and "wake" not in done.stderr, done.stderr
        assert decode(*results.get(timeout_s=10)).intent == "lights_on"  # it worked, and said nothing

    done = _run("--log-format", "json", "run", "--config", str(config))
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    by_event = {line["event"]: line for line in logged}
    wake, edge, action = by_event["wake"], by_event["edge result"], by_event["action ran"]
    assert wake["level"] == edge["level"] == action["level"] == "info"
    assert wake["device_id"] == edge["device_id"] == action["device_id"] == device_id
    (result_id,) = [decode(*results.get(timeout_s=10)).utterance_id for _ in range(1)]
    assert wake["utterance_id"] == edge["utterance_id"] == action["utterance_id"] == result_id
    assert (edge["intent"], edge["slots"]) == ("lights_on", {}) and 0 < wake["score"] <= 1
    # Every extra= key reaches the line: the model version too, and the wake's place in the stream.
    listening = by_event[f"listening as {device_id} with model 1.1.0"]
    assert (listening["device_id"], listening["version"]) == (device_id, "1.1.0") and wake["time_s"] > 0


@pytest.mark.subprocess
def test_a_bad_log_format_is_refused_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "device", "--log-format", "xml", "run", "--config", "device.toml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "invalid choice: 'xml'" in done.stderr and "Traceback" not in done.stderr


def _record(level: int, message: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("device.runtime", level, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_text_lines_name_the_level_unless_info_and_say_what_an_answer_was() -> None:
    formatter = TextLineFormatter()
    warning = formatter.format(_record(logging.WARNING, "cloud timeout", device_id="d", utterance_id="ab" * 16))
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING cloud timeout \[utt abababab\]", warning)
    answer = formatter.format(
        _record(
            logging.INFO,
            "cloud result",
            intent="set_timer",
            slots={"minutes": 5},
            transcript="set a timer for five minutes",
            confidence=0.951,
            acted=True,
            latency_ms=412,
        )
    )
    assert answer.endswith(
        'cloud result: set_timer minutes=5, "set a timer for five minutes", confidence 0.95, acted, in 412 ms'
    )
    unsure = formatter.format(_record(logging.INFO, "cloud result", intent=None, transcript="hm", acted=False))
    assert unsure.endswith('cloud result: no intent, "hm", not acted')
