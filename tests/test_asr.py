"""Speech recognition with the real tiny.en on the real samples: packing, silence, loops, prompt, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_worker.asr import (
    SAMPLE_RATE,
    AsrSettings,
    AsrUnavailable,
    Transcriber,
    _assign,
    _degenerate,
    _Placement,
    vocabulary_prompt,
)
from cloud_worker.transcript import Segment
from device.recording import read_recording
from schemas.vocabulary import load_vocabulary, normalize

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

VOCABULARY = load_vocabulary()
LIGHTS = read_recording(IN_VOCABULARY_SAMPLE, SAMPLE_RATE)
WEATHER = read_recording(OUT_OF_VOCABULARY_SAMPLE, SAMPLE_RATE)
REQUEST_START_S = 1.9
"""In both samples the wake phrase and most of the pause are over here, the request not yet begun."""
COMMAND = round(REQUEST_START_S * SAMPLE_RATE)
CLIPS = (LIGHTS[COMMAND:], WEATHER[COMMAND:], LIGHTS, WEATHER)
"""The two requests alone, then both whole samples (wake phrase, pause, request)."""
SILENCE = np.zeros(2 * SAMPLE_RATE, dtype=np.float32)
HISS = np.random.default_rng(7).normal(0.0, 1e-4, 2 * SAMPLE_RATE).astype(np.float32)
"""Two seconds of noise about 80 dB under full scale."""


def seconds(clip: np.ndarray) -> float:
    return clip.size / SAMPLE_RATE


# ``transcriber`` (conftest.py) is the worker's: default settings, prompted with the shipped vocabulary.


@pytest.fixture(scope="module")
def unprompted() -> Transcriber:
    return Transcriber(AsrSettings(prompt=None), VOCABULARY)


@pytest.fixture(scope="module")
def unpacked() -> Transcriber:
    return Transcriber(AsrSettings(pack=False), VOCABULARY)


@pytest.fixture(scope="module")
def alone(transcriber: Transcriber) -> list[str]:
    """The words of each of CLIPS, transcribed in a call of its own."""
    return [normalize(transcriber.transcribe([clip])[0].text) for clip in CLIPS]


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch):
    """Spy on a transcriber's ``_decode``: every call's windows (lists of clip indices), and whether it was prompted."""

    def spy(transcriber: Transcriber) -> list[tuple[list[list[int]], bool]]:
        calls: list[tuple[list[list[int]], bool]] = []
        real = transcriber._decode

        def decode(clips, windows, prompt):
            calls.append(
                ([[placement.clip for placement in window] for window in windows], prompt == transcriber._prompt)
            )
            return real(clips, windows, prompt)

        monkeypatch.setattr(transcriber, "_decode", decode)
        return calls

    return spy


def test_a_sample_is_transcribed_with_timed_confident_segments(transcriber: Transcriber) -> None:
    (transcript,) = transcriber.transcribe([LIGHTS])
    assert "turn on the lights" in normalize(transcript.text)
    assert transcript.segments
    for segment in transcript.segments:
        assert 0.0 <= segment.start_s <= segment.end_s <= seconds(LIGHTS)
        assert 0.0 < segment.confidence <= 1.0
        assert 0.0 <= segment.no_speech_prob <= 1.0
    assert 0.0 < transcript.confidence <= 1.0
    assert transcript.model == transcriber.name
    assert transcriber.name.endswith("/int8")
    assert len(transcriber.name) > len("/int8")


def test_the_alone_transcripts_are_right(alone: list[str]) -> None:
    assert alone == [
        "turn on the lights",
        "what will the weather be like tomorrow",
        "hey jarvis turn on the lights",
        "hey jarvis what will the weather be like tomorrow",
    ]


def test_a_packed_batch_is_decoded_in_one_window_with_the_words_of_each_clip_alone(
    transcriber: Transcriber, alone: list[str], decoded
) -> None:
    calls = decoded(transcriber)
    transcripts = transcriber.transcribe(CLIPS)
    assert [normalize(transcript.text) for transcript in transcripts] == alone
    assert calls == [([[0, 1, 2, 3]], True)]  # one window, and no clip transcribed again
    for clip, transcript in zip(CLIPS, transcripts, strict=True):
        for segment in transcript.segments:
            assert 0.0 <= segment.start_s <= segment.end_s <= seconds(clip) + 0.5


def test_pack_is_first_fit_in_arrival_order(transcriber: Transcriber) -> None:
    gap = transcriber.settings.pack_gap_s
    clips = [np.zeros(round(s * SAMPLE_RATE), dtype=np.float32) for s in (20.0, 12.0, 5.0, 3.0, 25.0)]
    windows = transcriber._pack(clips)
    assert [[placement.clip for placement in window] for window in windows] == [[0, 2], [1, 3], [4]]
    assert windows[0] == [_Placement(0, 0.0, 20.0), _Placement(2, 20.0 + gap, 25.0 + gap)]
    assert windows[1] == [_Placement(1, 0.0, 12.0), _Placement(3, 12.0 + gap, 15.0 + gap)]
    assert windows[2] == [_Placement(4, 0.0, 25.0)]


def test_a_batch_over_one_window_is_split_and_answered_in_order(
    transcriber: Transcriber, alone: list[str], decoded
) -> None:
    clips = list(CLIPS) * 2
    assert sum(seconds(clip) for clip in clips) > 30.0
    windows = [[placement.clip for placement in window] for window in transcriber._pack(clips)]
    assert len(windows) > 1
    assert sorted(index for window in windows for index in window) == list(range(len(clips)))
    assert all(window == sorted(window) for window in windows)
    calls = decoded(transcriber)
    transcripts = transcriber.transcribe(clips)
    assert calls[0] == (windows, True)
    assert [normalize(transcript.text) for transcript in transcripts] == alone * 2


def test_unpacked_gives_each_clip_a_window(unpacked: Transcriber, alone: list[str], decoded) -> None:
    calls = decoded(unpacked)
    transcripts = unpacked.transcribe(CLIPS)
    assert calls[0] == ([[0], [1], [2], [3]], True)
    assert all(len(window) == 1 for windows, _ in calls for window in windows)
    assert [normalize(transcript.text) for transcript in transcripts] == alone


@pytest.mark.parametrize(
    ("recogniser", "quiet", "speech_first"),
    [
        pytest.param("transcriber", SILENCE, True, id="prompted-zeros-after"),
        pytest.param("transcriber", HISS, True, id="prompted-hiss-after"),
        pytest.param("transcriber", SILENCE, False, id="prompted-zeros-before"),
        pytest.param("transcriber", HISS, False, id="prompted-hiss-before"),
        pytest.param("unprompted", SILENCE, True, id="unprompted-zeros-after"),
        pytest.param("unprompted", SILENCE, False, id="unprompted-zeros-before"),
    ],
)
def test_silence_packed_beside_speech_gets_none_of_its_words(
    request: pytest.FixtureRequest, recogniser: str, quiet: np.ndarray, speech_first: bool
) -> None:
    speech = CLIPS[0]
    batch = [speech, quiet] if speech_first else [quiet, speech]
    transcripts = request.getfixturevalue(recogniser).transcribe(batch)
    heard, silent = (transcripts[0], transcripts[1]) if speech_first else (transcripts[1], transcripts[0])
    assert normalize(heard.text) == "turn on the lights"
    assert not set(normalize(silent.text).split()) & {"turn", "on", "the", "lights"}


def test_a_window_that_loops_is_transcribed_again(transcriber: Transcriber, alone: list[str]) -> None:
    """Prompted, tiny.en loops on this window ("Eight." a second, the prompt's last sentence), a few per clip."""
    batch = [CLIPS[2], CLIPS[3], CLIPS[0], CLIPS[1], CLIPS[2]]
    transcripts = transcriber.transcribe(batch)
    assert [normalize(transcript.text) for transcript in transcripts] == [alone[i] for i in (2, 3, 0, 1, 2)]


def segment(text: str, start_s: float = 0.0, end_s: float = 1.0, avg_logprob: float = -0.1) -> Segment:
    return Segment(start_s=start_s, end_s=end_s, text=text, avg_logprob=avg_logprob, no_speech_prob=0.01)


@pytest.mark.parametrize("text", [" 4" * 40, "8" * 60, " Eight." * 10])
def test_a_repetitive_transcript_is_degenerate(text: str) -> None:
    assert _degenerate([segment(text)])
    assert _degenerate([segment(text[: len(text) // 2]), segment(text[len(text) // 2 :])])


def test_a_sentence_is_not_degenerate_unless_improbable() -> None:
    sentence = [segment(" Hey Jarvis,"), segment(" what will the weather be like tomorrow?")]
    assert not _degenerate(sentence)
    assert not _degenerate([])
    assert not _degenerate([segment("   ", avg_logprob=-3.0)])
    assert _degenerate(
        [
            segment(" Hey Jarvis,", avg_logprob=-1.4),
            segment(" what will the weather be like tomorrow?", avg_logprob=-0.9),
        ]
    )


def test_a_short_loop_is_degenerate() -> None:
    """Too short for the compression ratio: a clip's share of a window that loops."""
    assert _degenerate([segment(" Eight.", start_s=float(s), end_s=s + 1.0) for s in range(4)])
    assert _degenerate([segment(" 4 4 4 4 4 4 4 4 4 4 4 4")])
    assert _degenerate([segment(" Turn left. Turn left. Turn left. Turn left.")])


WINDOW = [_Placement(0, 0.0, 2.0), _Placement(1, 3.0, 5.0)]


def test_assign_marks_both_clips_of_a_straddling_segment() -> None:
    assigned = _assign(WINDOW, [segment(" Turn on the lights.", start_s=1.0, end_s=4.0)])
    assert assigned == {0: None, 1: None}
    later = _assign(WINDOW, [segment(" One.", 3.2, 3.8), segment(" Two three.", 1.5, 3.5), segment(" Four.", 4.0, 4.5)])
    assert later == {0: None, 1: None}


def test_assign_gives_a_segment_in_the_gap_to_the_nearest_clip() -> None:
    assert _assign(WINDOW, [segment(" Stop.", start_s=2.1, end_s=2.5)]) == {0: [segment(" Stop.", 2.1, 2.5)], 1: []}
    assert _assign(WINDOW, [segment(" Go.", start_s=2.6, end_s=2.9)]) == {0: [], 1: [segment(" Go.", 0.0, 0.0)]}


def test_assign_makes_times_relative_to_the_clip_and_drops_blank_text() -> None:
    segments = [
        segment(" Yes.", 0.2, 1.8),
        segment(" ", 2.0, 3.0),
        segment(" No.", 3.4, 4.9),
        segment(" Nine.", 4.8, 5.2),
    ]
    assert _assign(WINDOW, segments) == {
        0: [segment(" Yes.", 0.2, 1.8)],
        1: [segment(" No.", 0.4, 1.9), segment(" Nine.", 1.8, 2.2)],
    }
    alone = _assign([_Placement(4, 0.0, 2.0)], [segment(" Yes.", 0.2, 1.8), segment("", 1.8, 2.0)])
    assert alone == {4: [segment(" Yes.", 0.2, 1.8)]}


def test_the_default_prompt_is_the_vocabulary(transcriber: Transcriber) -> None:
    assert transcriber.prompt_text == vocabulary_prompt(VOCABULARY)
    assert VOCABULARY.wake_phrase in transcriber.prompt_text.lower()
    assert "Lights on." in transcriber.prompt_text
    assert transcriber._prompt != transcriber._unprompted


def test_no_prompt(unprompted: Transcriber) -> None:
    assert unprompted.prompt_text is None
    assert unprompted._prompt == unprompted._unprompted
    assert Transcriber(AsrSettings(prompt="")).prompt_text is None
    assert Transcriber(AsrSettings()).prompt_text is None  # the vocabulary prompt without a vocabulary


def test_the_prompt_is_stamped_and_under_half_the_context(transcriber: Transcriber) -> None:
    tokenizer = transcriber._tokenizer
    half = transcriber._whisper.max_length // 2
    for text in (transcriber.prompt_text, " ".join(f"Sentence number {n} of many." for n in range(200))):
        tokens = transcriber._stamped(text)
        assert tokens[0] >= tokenizer.timestamp_begin
        assert tokens[-1] >= tokenizer.timestamp_begin
        assert 0 < len(tokens) < half
    assert any(token < tokenizer.timestamp_begin for token in tokens)
    prompt = transcriber._prompt
    assert prompt[0] == tokenizer.sot_prev
    assert prompt[1] >= tokenizer.timestamp_begin


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"beam_size": 0}, "beam_size"), ({"cpu_threads": 0}, "cpu_threads"), ({"pack_gap_s": 0.1}, "pack_gap_s")],
)
def test_bad_settings_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AsrSettings(**changes)


def test_a_directory_without_a_model_is_unavailable(tmp_path) -> None:
    with pytest.raises(AsrUnavailable, match=r"no model\.bin") as raised:
        Transcriber(AsrSettings(model_dir=str(tmp_path)))
    assert str(tmp_path) in str(raised.value)


@pytest.mark.parametrize(
    ("bad", "index"),
    [
        (np.zeros(0, dtype=np.float32), 1),
        (np.zeros((2, SAMPLE_RATE), dtype=np.float32), 0),
        (np.zeros(round(29.5 * SAMPLE_RATE), dtype=np.float32), 2),
    ],
    ids=["empty", "two-dimensional", "over-29-s"],
)
def test_bad_clips_are_refused_by_index(transcriber: Transcriber, bad: np.ndarray, index: int) -> None:
    batch = [CLIPS[0], CLIPS[1]]
    batch.insert(index, bad)
    with pytest.raises(ValueError, match=f"clip {index} "):
        transcriber.transcribe(batch)


def test_a_segment_stamped_over_a_quiet_clip_goes_to_its_loud_neighbour() -> None:
    """Greedy timestamps are coarse: "Turn on the lights." stamped 1.0-3.0 s lies over the quiet clip (0-2 s)
    while the request it transcribes sounds at 3.0-5.6 s."""
    window = [_Placement(0, 0.0, 2.0), _Placement(1, 3.0, 5.6)]
    loudness = np.full(3000, 1e-4)
    loudness[300:560] = 0.05
    words = segment(" Turn on the lights.", start_s=1.0, end_s=3.0)
    assert _assign(window, [words], loudness) == {0: [], 1: [segment(" Turn on the lights.", 0.0, 0.0)]}
    # Sound on both sides of a segment is a straddle, loudness or not.
    loudness[100:200] = 0.05
    assert _assign(window, [segment(" Turn on the lights.", start_s=1.0, end_s=4.0)], loudness) == {0: None, 1: None}


def test_a_silent_clip_is_not_transcribed(transcriber: Transcriber, decoded) -> None:
    calls = decoded(transcriber)
    transcripts = transcriber.transcribe([np.zeros(32000, dtype=np.float32), CLIPS[0]])
    assert transcripts[0].text == "" and transcripts[0].segments == ()
    assert all(0 not in window for windows, _ in calls for window in windows)
