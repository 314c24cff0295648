"""The vocabulary file: the default is exactly the specified one, and broken files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.errors import ProtocolError
from schemas.vocabulary import load_vocabulary, normalize

EXPECTED = {
    "lights_on": ["lights on", "turn on the lights"],
    "lights_off": ["lights off", "turn off the lights"],
    "start": ["start"],
    "stop": ["stop"],
    "go_forward": ["go forward"],
    "go_back": ["go back"],
    "turn_left": ["turn left"],
    "turn_right": ["turn right"],
    "speed_up": ["speed up"],
    "slow_down": ["slow down"],
    "yes": ["yes"],
    "no": ["no"],
    "cancel": ["cancel"],
}
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_default_vocabulary_is_exactly_the_specified_one() -> None:
    vocabulary = load_vocabulary()
    assert vocabulary.wake_phrase == "hey jarvis"
    assert vocabulary.intents == (*EXPECTED, "digit")
    plain = {c.intent: list(c.phrases) for c in vocabulary.commands if c.intent != "digit"}
    assert plain == EXPECTED
    digits = [c for c in vocabulary.commands if c.intent == "digit"]
    assert [c.slots for c in digits] == [{"value": n} for n in range(10)]
    assert [c.phrases[0] for c in digits] == DIGITS
    assert digits[0].phrases == ("zero", "oh")
    assert all(len(c.phrases) == 1 for c in digits[1:])
    assert len(vocabulary.labels) == len(set(vocabulary.labels)) == 23
    assert "digit[value=7]" in vocabulary.labels


@pytest.mark.parametrize(
    ("text", "intent", "slots"),
    [
        ("Turn on the lights!", "lights_on", {}),
        ("  lights   OFF. ", "lights_off", {}),
        ("Oh", "digit", {"value": 0}),
        ("seven", "digit", {"value": 7}),
    ],
)
def test_phrases_match_after_normalization(text: str, intent: str, slots: dict) -> None:
    command = load_vocabulary().match(text)
    assert command is not None
    assert (command.intent, dict(command.slots)) == (intent, slots)


def test_text_outside_the_vocabulary_matches_nothing() -> None:
    vocabulary = load_vocabulary()
    assert vocabulary.match("what will the weather be like tomorrow") is None
    assert vocabulary.match("lights") is None
    assert normalize("Turn-on, the LIGHTS?") == "turn on the lights"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "vocabulary.toml"
    path.write_text(text)
    return path


HEADER = 'version = 1\n[wake]\nphrase = "hey robot"\n'


def test_a_custom_vocabulary_with_string_slots_loads(tmp_path: Path) -> None:
    text = HEADER + (
        '[intents.set_mode]\nphrases = ["{mode} mode", "switch to {mode}"]\n'
        '[intents.set_mode.slots.mode]\ntype = "string"\nvalues = { eco = ["eco", "economy"], fast = ["fast"] }\n'
    )
    vocabulary = load_vocabulary(write(tmp_path, text))
    assert vocabulary.labels == ("set_mode[mode=eco]", "set_mode[mode=fast]")
    assert vocabulary.commands[0].phrases == ("eco mode", "economy mode", "switch to eco", "switch to economy")
    assert vocabulary.match("switch to fast").slots == {"mode": "fast"}


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ('[intents.go]\nphrases = ["{where}"]\n', "undefined slot"),
        ('[intents.a]\nphrases = ["stop"]\n[intents.b]\nphrases = ["stop"]\n', "belongs to both"),
        ('[intents.Bad]\nphrases = ["x"]\n', "Bad"),
        ("[intents.a]\nphrases = []\n", "phrases"),
        ('[intents.a]\nphrases = ["LOUD"]\n', "LOUD"),
        ('[intents.a]\nphrases = ["{n}"]\n[intents.a.slots.n]\ntype = "integer"\nvalues = { x = ["ex"] }\n', "integer"),
        ("[intents.a\n", "Expected"),
    ],
)
def test_broken_vocabularies_are_refused_clearly(tmp_path: Path, body: str, complaint: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        load_vocabulary(write(tmp_path, HEADER + body))
    assert complaint in str(refused.value)


def test_command_for_finds_the_command_of_an_intent_and_its_exact_slot_values() -> None:
    vocabulary = load_vocabulary()
    assert vocabulary.command_for("digit", {"value": 7}).label == "digit[value=7]"
    assert vocabulary.command_for("lights_on", {}).label == "lights_on"
    assert vocabulary.command_for("digit", {"value": 12}) is None  # no such slot value
    assert vocabulary.command_for("digit", {}) is None
    assert vocabulary.command_for("open_the_pod_bay_doors", {}) is None
