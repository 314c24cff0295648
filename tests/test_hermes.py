"""Rhasspy's Hermes messages (cloud_worker/hermes.py), read back with rhasspy-hermes's own dataclasses.

dataclasses-json ignores keys a dataclass does not have, so each payload is also compared with what the
dataclass writes again: a misspelt key would be missing there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rhasspyhermes.asr import AsrTextCaptured
from rhasspyhermes.nlu import NluIntent, NluIntentNotRecognized
from rhasspyhermes.wake import HotwordDetected

from cloud_worker.hermes import hermes_messages
from schemas.errors import ErrorCode
from schemas.result import ErrorInfo, Result, Source
from schemas.vocabulary import load_vocabulary

VOCABULARY = load_vocabulary()


def result(**changes) -> Result:
    fields = {
        "device_id": "pi-kitchen-01",
        "utterance_id": "0f8c2b6a9d3e4f51",
        "source": Source.CLOUD,
        "transcript": "Turn on the lights.",
        "intent": "lights_on",
        "slots": {},
        "confidence": 0.93,
        "timings_ms": {"asr": 180.0, "total": 214.7},
        "acted": True,
    }
    return Result(**(fields | changes))


def parsed(messages: list[tuple[str, bytes]], topic: str, kind):
    """The message on ``topic`` as ``kind``, checked to carry no key the dataclass does not write."""
    payloads = [json.loads(payload) for message_topic, payload in messages if message_topic == topic]
    assert len(payloads) == 1, f"{topic} in {[message_topic for message_topic, _ in messages]}"
    message = kind.from_dict(payloads[0])
    assert message.to_dict() == payloads[0]
    return message


def test_an_acted_command_is_a_wake_a_transcript_and_an_intent() -> None:
    messages = hermes_messages(result(), VOCABULARY)
    assert [topic for topic, _ in messages] == [
        HotwordDetected.topic(wakeword_id="hey_jarvis"),
        AsrTextCaptured.topic(),
        NluIntent.topic(intent_name="lights_on"),
    ]
    wake = parsed(messages, "hermes/hotword/hey_jarvis/detected", HotwordDetected)
    assert (wake.model_id, wake.site_id, wake.session_id) == ("hey_jarvis", "pi-kitchen-01", "0f8c2b6a9d3e4f51")
    heard = parsed(messages, "hermes/asr/textCaptured", AsrTextCaptured)
    assert (heard.text, heard.likelihood, heard.seconds, heard.site_id) == (
        "Turn on the lights.",
        0.93,
        0.18,
        "pi-kitchen-01",
    )
    intent = parsed(messages, "hermes/intent/lights_on", NluIntent)
    assert (intent.intent.intent_name, intent.intent.confidence_score) == ("lights_on", 0.93)
    assert (intent.site_id, intent.session_id, intent.slots) == ("pi-kitchen-01", "0f8c2b6a9d3e4f51", [])
    assert (intent.input, intent.raw_input) == ("turn on the lights", "turn on the lights")


@pytest.mark.parametrize(("transcript", "value", "raw"), [("7.", 7, "seven"), ("Oh.", 0, "oh"), (None, 0, "zero")])
def test_an_integer_slot_is_a_number_with_its_words_and_ranges(transcript: str | None, value: int, raw: str) -> None:
    digit = result(transcript=transcript, intent="digit", slots={"value": value}, source=Source.EDGE)
    intent = parsed(hermes_messages(digit, VOCABULARY), NluIntent.topic(intent_name="digit"), NluIntent)
    (slot,) = intent.slots
    assert (slot.entity, slot.slot_name, slot.raw_value) == ("value", "value", raw)
    assert slot.value == {"kind": "Number", "value": value}
    assert (intent.input, intent.raw_input) == (str(value), raw)
    assert intent.input[slot.start : slot.end] == str(value)
    assert intent.raw_input[slot.raw_start : slot.raw_end] == raw


def test_a_string_slot_inside_a_phrase_is_unknown_with_its_ranges(tmp_path: Path) -> None:
    vocabulary_file = tmp_path / "vocabulary.toml"
    vocabulary_file.write_text(
        'version = 1\n[wake]\nphrase = "hey jarvis"\n'
        '[intents.set_colour]\nphrases = ["make the lamp {colour} please", "{colour}"]\n'
        '[intents.set_colour.slots.colour]\ntype = "string"\n'
        'values = { red = ["red", "deep red"], blue = ["blue"] }\n'
    )
    vocabulary = load_vocabulary(vocabulary_file)
    said = result(transcript="Make the lamp deep red, please.", intent="set_colour", slots={"colour": "red"})
    intent = parsed(hermes_messages(said, vocabulary), NluIntent.topic(intent_name="set_colour"), NluIntent)
    (slot,) = intent.slots
    assert slot.value == {"kind": "Unknown", "value": "red"}
    assert (intent.raw_input, slot.raw_value) == ("make the lamp deep red please", "deep red")
    assert intent.input == "make the lamp red please"
    assert intent.input[slot.start : slot.end] == "red"
    assert intent.raw_input[slot.raw_start : slot.raw_end] == "deep red"


@pytest.mark.parametrize(
    "outcome",
    [
        {"intent": None, "transcript": "What will the weather be like tomorrow?", "confidence": 0.8},
        {"intent": "lights_on", "acted": False},
        {
            "intent": None,
            "transcript": None,
            "confidence": 0.0,
            "error": ErrorInfo(ErrorCode.CLOUD_TIMEOUT, "no answer in time"),
            "acted": False,
        },
    ],
    ids=["outside the vocabulary", "not acted on", "error"],
)
def test_a_result_without_an_acted_intent_is_not_recognized(outcome: dict) -> None:
    messages = hermes_messages(result(**outcome), VOCABULARY)
    assert not [topic for topic, _ in messages if topic.startswith("hermes/intent/")]
    refused = parsed(messages, NluIntentNotRecognized.topic(), NluIntentNotRecognized)
    assert (refused.input, refused.site_id) == (outcome.get("transcript", "Turn on the lights.") or "", "pi-kitchen-01")
    assert ("hermes/asr/textCaptured" in [topic for topic, _ in messages]) == bool(refused.input)
