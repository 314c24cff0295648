"""Transcript to intent: exact phrases, Whisper's spelling of them, fuzzy near-misses, and inputs that mean nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.text_matching import IntentMatch, IntentMatcher, normalize_transcript, spell_numbers
from schemas.vocabulary import Command, Vocabulary, load_vocabulary

VOCABULARY = load_vocabulary()
MATCHER = IntentMatcher(VOCABULARY)
EVERY_PHRASE = [(phrase, command) for command in VOCABULARY.commands for phrase in command.phrases]


@pytest.mark.parametrize(("phrase", "command"), EVERY_PHRASE, ids=[phrase for phrase, _ in EVERY_PHRASE])
def test_every_phrase_of_the_shipped_vocabulary_matches_exactly(phrase: str, command: Command) -> None:
    assert MATCHER.match(phrase) == IntentMatch(
        intent=command.intent, slots=command.slots, score=1.0, phrase=phrase, text=phrase
    )


@pytest.mark.parametrize(
    ("transcript", "intent", "slots"),
    [
        ("Turn on the lights.", "lights_on", {}),
        ("Turn on the lights!", "lights_on", {}),
        ("Hey Jarvis, turn on the lights.", "lights_on", {}),
        ("Jarvis, stop.", "stop", {}),
        ("Lights off", "lights_off", {}),
        ("Seven.", "digit", {"value": 7}),
        ("7", "digit", {"value": 7}),
        (" 7. ", "digit", {"value": 7}),
        ("Oh.", "digit", {"value": 0}),
        ("0", "digit", {"value": 0}),
        ("Go forward.", "go_forward", {}),
        ("Stop!", "stop", {}),
        ("Please stop.", "stop", {}),
        ("Could you turn left, please?", "turn_left", {}),
        ("Okay, cancel now.", "cancel", {}),
        ("Hey Jarvis, can you slow down?", "slow_down", {}),
    ],
)
def test_whisper_style_transcripts_match_exactly(transcript: str, intent: str, slots: dict) -> None:
    match = MATCHER.match(transcript)
    assert (match.intent, match.slots, match.score) == (intent, slots, 1.0)
    assert match.text == normalize_transcript(transcript)


def test_integer_slot_values_are_ints() -> None:
    assert all(type(value) is int for value in MATCHER.match("9").slots.values())


def test_a_near_miss_matches_fuzzily_with_a_score_below_one() -> None:
    match = MATCHER.match("Turn on the light.")
    assert match.intent == "lights_on"
    assert match.phrase == "turn on the lights"
    assert 0.8 <= match.score < 1.0
    assert match.text == "turn on the light"


def test_the_threshold_is_the_constructor_s() -> None:
    assert MATCHER.match("stops").intent == "stop"
    assert IntentMatcher(VOCABULARY, threshold=0.95).match("stops").intent is None
    with pytest.raises(ValueError):
        IntentMatcher(VOCABULARY, threshold=0.0)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("10", "ten"),
        ("21", "twenty one"),
        ("twenty-one", "twenty one"),
        ("Go forward 10.", "go forward ten"),
        ("1,000", "one thousand"),
        ("3rd", "third"),
        ("2.5", "two point five"),
        ("007", "zero zero seven"),
        ("Café, ÇA VA?", "cafe ca va"),
        ("it\u2019s", "it's"),
    ],
)
def test_numbers_are_spelled_and_text_normalized(text: str, normalized: str) -> None:
    assert normalize_transcript(text) == normalized


def test_spell_numbers_leaves_words_alone() -> None:
    assert spell_numbers("go 10 steps") == "go  ten  steps"
    assert spell_numbers("no digits here") == "no digits here"
    assert normalize_transcript("1" * 40) == " ".join(["one"] * 40)


@pytest.mark.parametrize(
    "transcript",
    [
        "What will the weather be like tomorrow?",
        "Hey Jarvis, what will the weather be like tomorrow?",
        "Thank you.",
        "Play some music.",
        "Go forward 10.",
        "Please.",
        "Hey Jarvis.",
    ],
)
def test_out_of_vocabulary_transcripts_have_no_intent(transcript: str) -> None:
    match = MATCHER.match(transcript)
    assert match == IntentMatch(intent=None, slots={}, score=0.0, phrase=None, text=normalize_transcript(transcript))


def test_an_ambiguous_transcript_has_no_intent() -> None:
    # "turn the lights" is as far from "turn on the lights" as from "turn off the lights".
    assert IntentMatcher(VOCABULARY, threshold=0.7).match("Turn the lights.").intent is None
    assert IntentMatcher(VOCABULARY, threshold=0.5).match("Go.").intent is None
    # Without a rival within the margin, the same low threshold takes the match.
    assert IntentMatcher(VOCABULARY, threshold=0.7).match("Turn off lights.").intent == "lights_off"


def test_two_commands_within_the_margin_are_ambiguous() -> None:
    vocabulary = Vocabulary(
        wake_phrase="hey jarvis",
        commands=(Command("lamp_on", {}, ("lamp on",)), Command("lamp_one", {}, ("lamp one",))),
    )
    # "lamp onn" scores 0.9 against "lamp on" and 0.83 against "lamp one": a tie within 0.1, not within 0.05.
    assert IntentMatcher(vocabulary, margin=0.1).match("lamp onn").intent is None
    assert IntentMatcher(vocabulary, margin=0.05).match("lamp onn").intent == "lamp_on"


@pytest.mark.parametrize(
    "transcript",
    [
        "",
        "   \n\t",
        "😀🎉",
        "+/#",
        "$share/#",
        "\x00\ud800",
        "\uff33\uff34\uff2f\uff30",
        "\u0667",
        "-" * 1000,
        " ".join(["stop"] * 10_000),
    ],
)
def test_hostile_strings_do_not_raise(transcript: str) -> None:
    match = MATCHER.match(transcript)
    assert 0.0 <= match.score <= 1.0
    assert isinstance(match.text, str)


def test_very_long_text_has_no_intent() -> None:
    long = " ".join(["turn on the lights"] * 2_500)
    assert MATCHER.match(long).intent is None
    assert MATCHER.match("9" * 100_000).intent is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
@pytest.mark.slow
def test_match_never_raises_and_scores_are_in_range(transcript: str) -> None:
    match = MATCHER.match(transcript)
    assert 0.0 <= match.score <= 1.0
    assert (match.intent is None) == (match.score == 0.0)


def test_a_results_confidence_combines_the_words_and_the_match() -> None:
    matcher = IntentMatcher(load_vocabulary())
    exact, near, none = matcher.match("turn on the lights"), matcher.match("turn on the light"), matcher.match("")
    assert exact.confidence(0.9) == 0.9
    assert near.confidence(0.9) == round(0.9 * near.score, 4) < 0.9
    assert none.confidence(0.9) == 0.9  # no intent: how sure the words are
    assert exact.confidence(1.5) == 1.0 and exact.confidence(-0.1) == 0.0
