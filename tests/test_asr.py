"""Speech recognition with the real tiny.en on real recordings: isolation, phrase scores, silence, refusals."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from cloud_worker.asr import SAMPLE_RATE, WINDOW_S, AsrSettings, AsrUnavailable, Transcriber
from common.recording import read_recording
from schemas.vocabulary import load_vocabulary, normalize

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

VOCABULARY = load_vocabulary()
LIGHTS = read_recording(IN_VOCABULARY_SAMPLE, SAMPLE_RATE)
WEATHER = read_recording(OUT_OF_VOCABULARY_SAMPLE, SAMPLE_RATE)
REQUEST_START_S = 1.9
"""In both samples the wake phrase and most of the pause are over here, the request not yet begun."""
COMMAND = round(REQUEST_START_S * SAMPLE_RATE)
FSDD = sorted((Path(__file__).parent / "data" / "fsdd").glob("*.flac"))
"""Six real digits, one per FSDD speaker (tests/data/fsdd/README.md)."""
DIGITS = {path.stem: read_recording(path, SAMPLE_RATE) for path in FSDD}
SILENCE = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
HISS = np.random.default_rng(7).normal(0.0, 1e-4, 2 * SAMPLE_RATE).astype(np.float32)
"""Two seconds of noise about 80 dB under full scale."""
CLIPS = {
    **DIGITS,
    "lights_request": LIGHTS[COMMAND:],
    "weather_request": WEATHER[COMMAND:],
    "lights_whole": LIGHTS,
    "hiss": HISS,
}
"""Real digits, the two requests and a whole sample, and near silence: what devices send side by side."""

# ``transcriber`` (conftest.py) is the worker's: default settings, the shipped vocabulary.


@pytest.fixture(scope="module")
def alone(transcriber: Transcriber) -> dict:
    """Each of CLIPS read in a call of its own."""
    return {name: transcriber.transcribe([clip])[0] for name, clip in CLIPS.items()}


@pytest.mark.slow
def test_a_request_is_transcribed_and_its_phrase_scores_best(alone: dict) -> None:
    lights = alone["lights_request"]
    assert normalize(lights.text) == "turn on the lights"
    commands = lights.phrases.commands
    assert max(commands, key=commands.get) == "lights_on"
    assert commands["lights_on"] > lights.phrases.other
    assert (lights.segments[0].start_s, lights.segments[0].end_s) == (
        0.0,
        round(LIGHTS[COMMAND:].size / SAMPLE_RATE, 2),
    )


def test_a_sentence_outside_the_vocabulary_is_likelier_something_else(alone: dict) -> None:
    weather = alone["weather_request"]
    assert "weather" in normalize(weather.text)
    assert weather.phrases.other > max(weather.phrases.commands.values(), default=-np.inf)


def test_the_real_digits_score_their_own_digit_best(alone: dict) -> None:
    """tiny.en is no perfect judge of a single real digit, but these six it gets right."""
    for name in DIGITS:
        commands = alone[name].phrases.commands
        assert max(commands, key=commands.get) == f"digit[value={name[0]}]", (name, alone[name].text, commands)


@pytest.mark.slow
def test_every_clip_reads_the_same_alone_and_in_any_batch(transcriber: Transcriber, alone: dict) -> None:
    """Isolation: text, segments and every phrase score of a clip depend on its own audio only, whichever other
    devices' clips share its batch and in whatever order."""
    rng = random.Random(18)
    names = list(CLIPS)
    for _ in range(8):
        batch = rng.sample(names, rng.randint(2, 6))
        for name, transcript in zip(batch, transcriber.transcribe([CLIPS[n] for n in batch]), strict=True):
            assert transcript == alone[name], (name, batch)


@pytest.mark.slow
def test_no_word_of_a_neighbour_reaches_a_clip(transcriber: Transcriber, alone: dict) -> None:
    digit = next(iter(DIGITS))
    transcripts = transcriber.transcribe([CLIPS["weather_request"], CLIPS[digit], CLIPS["lights_request"]])
    neighbours = set(normalize(alone["weather_request"].text + " " + alone["lights_request"].text).split())
    assert not set(normalize(transcripts[1].text).split()) & neighbours


def test_silence_reads_as_nothing_and_nothing_in_the_vocabulary(transcriber: Transcriber, alone: dict) -> None:
    silent, lights = transcriber.transcribe([SILENCE, CLIPS["lights_request"]])
    assert silent.text == "" and silent.segments == ()
    assert silent.phrases.commands == {} and silent.phrases.other == 0.0
    assert lights == alone["lights_request"]


def test_digits_are_scored_as_words_and_as_numerals(transcriber: Transcriber) -> None:
    written = {form.text for form in transcriber._forms if form.label == "digit[value=7]"}
    assert written == {" Seven", " seven", " 7"}
    after_wake = {form.text for forms in transcriber._wake_forms.values() for form in forms}
    assert {" Hey Jarvis, seven", " Hey Jarvis. Seven", " Hey Jarvis, 7"} <= after_wake


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"beam_size": 0}, "beam_size"),
        ({"cpu_threads": 0}, "cpu_threads"),
        ({"prune_nats": 1.0}, "prune_nats"),
        ({"max_scored": 0}, "max_scored"),
        ({"score_margin_s": 0.1}, "score_margin_s"),
        ({"lead_s": 3.0}, "lead_s"),
        ({"peak": 0.0}, "peak"),
    ],
)
def test_bad_settings_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AsrSettings(**changes)


def test_a_directory_without_a_model_is_unavailable(tmp_path) -> None:
    with pytest.raises(AsrUnavailable, match=r"no model\.bin") as raised:
        Transcriber(AsrSettings(model_dir=str(tmp_path)), VOCABULARY)
    assert str(tmp_path) in str(raised.value)


@pytest.mark.parametrize(
    ("bad", "index"),
    [
        (np.zeros(0, dtype=np.float32), 1),
        (np.zeros((2, SAMPLE_RATE), dtype=np.float32), 0),
        (np.zeros(round((WINDOW_S - 0.4) * SAMPLE_RATE), dtype=np.float32), 2),
    ],
    ids=["empty", "two-dimensional", "over-the-window-with-its-lead"],
)
def test_bad_clips_are_refused_by_index(transcriber: Transcriber, bad: np.ndarray, index: int) -> None:
    batch = [CLIPS["lights_request"], CLIPS["weather_request"]]
    batch.insert(index, bad)
    with pytest.raises(ValueError, match=f"clip {index} "):
        transcriber.transcribe(batch)
