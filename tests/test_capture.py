"""Utterance capture (webrtcvad endpointing) and RNNoise, on real speech."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from common.recording import read_recording
from device.capture import NO_SPEECH, CapturedUtterance, EndReason, UtteranceCapture
from device.denoise import StreamDenoiser, denoise
from device.settings import CaptureSettings

from .conftest import COMMAND_START_S, IN_VOCABULARY_SAMPLE

RATE = 16000


@pytest.fixture(scope="module")
def request_speech() -> np.ndarray:
    """ "turn on the lights", trimmed to where the voice is."""
    audio = read_recording(IN_VOCABULARY_SAMPLE)[int(COMMAND_START_S * RATE) :]
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def capture(audio: np.ndarray, settings: CaptureSettings | None = None, *, after_wake=False, block=480):
    settings = settings or CaptureSettings()
    capturing = UtteranceCapture(settings, start_s=10.0, after_wake=after_wake)
    for start in range(0, len(audio), block):
        outcome = capturing.push(audio[start : start + block])
        if outcome is not None:
            return outcome
    return capturing.finish()


def test_speech_is_captured_with_its_pre_roll_and_ends_after_the_trailing_silence(request_speech) -> None:
    settings = CaptureSettings(pre_roll_ms=300, trailing_silence_ms=600)
    utterance = capture(np.concatenate((silence(1.0), request_speech, silence(2.0))), settings)
    assert isinstance(utterance, CapturedUtterance)
    assert utterance.end_reason == EndReason.TRAILING_SILENCE
    onset_s = utterance.start_s + utterance.speech_start / RATE
    assert 10.95 <= onset_s < 11.15  # the voice starts 1 s into a stream that starts at 10 (VAD frames: 30 ms)
    assert utterance.speech_start == pytest.approx(0.3 * RATE, abs=RATE * 0.03)  # the pre-roll
    speech_s = len(request_speech) / RATE
    assert utterance.end_s == pytest.approx(11.0 + speech_s, abs=0.1)
    # The pre-roll, the speech and at most 200 ms after the last voiced frame; not the 600 ms of silence.
    assert len(utterance.audio) - utterance.speech_end <= 0.2 * RATE
    assert utterance.duration_s < 0.3 + speech_s + 0.5
    # The endpoint came 600 ms into the silence, long before the end of the stream: push returned it.
    assert utterance.endpointed_at > 0


def test_the_utterance_is_cut_at_its_maximum_length(request_speech) -> None:
    talking = np.concatenate([request_speech] * 8)  # no pause long enough to end it
    utterance = capture(talking, CaptureSettings(max_utterance_s=1.0, pre_roll_ms=0))
    assert utterance.end_reason == EndReason.MAX_LENGTH
    assert 0.9 <= utterance.duration_s <= 1.05


def test_after_a_wake_nobody_speaking_gives_no_speech_at_the_timeout() -> None:
    capturing = UtteranceCapture(CaptureSettings(speech_timeout_s=2.0), start_s=0.0, after_wake=True)
    assert capturing.push(silence(1.9)) is None
    assert capturing.push(silence(0.2)) is NO_SPEECH
    assert capturing.push(silence(1.0)) is None  # done: later audio belongs to nobody


def test_the_tail_of_the_wake_phrase_is_left_out_of_the_command(request_speech) -> None:
    tail = request_speech[-int(0.25 * RATE) :]  # still voiced when the wake fires
    audio = np.concatenate((tail, silence(0.3), request_speech, silence(1.0)))
    utterance = capture(audio, after_wake=True)
    assert utterance.end_reason == EndReason.TRAILING_SILENCE
    # Neither the onset nor the pre-roll reach back into the tail.
    assert utterance.start_s >= 10.0 + len(tail) / RATE
    # The pause before the request (within the pre-roll), the request, and 200 ms after it.
    assert utterance.duration_s == pytest.approx(0.3 + len(request_speech) / RATE + 0.2, abs=0.1)
    # Without the wake, the same audio starts with the tail.
    assert capture(audio, after_wake=False).start_s == 10.0


def test_a_stream_that_ends_mid_speech_gives_what_was_heard(request_speech) -> None:
    utterance = capture(np.concatenate((silence(0.5), request_speech)))
    assert utterance.end_reason == EndReason.STREAM_END
    assert utterance.end_s == pytest.approx(10.5 + len(request_speech) / RATE, abs=0.05)
    # And a stream without speech gives nothing, unless the whole of it is wanted.
    assert capture(silence(3.0)) is None
    whole = UtteranceCapture(CaptureSettings(), start_s=0.0, after_wake=False)
    whole.push(silence(3.0))
    assert whole.finish(whole_if_silent=True).duration_s == 3.0


def test_capture_does_not_depend_on_the_block_size(request_speech) -> None:
    audio = np.concatenate((silence(1.0), request_speech, silence(2.0)))
    shapes = {
        (utterance.start_s, len(utterance.audio), utterance.speech_start, utterance.speech_end)
        for utterance in (capture(audio, block=block) for block in (1, 160, 480, 1234, 48000))
    }
    assert len(shapes) == 1, shapes


def test_rnnoise_removes_noise_and_keeps_the_speech(request_speech) -> None:
    rng = np.random.default_rng(3)
    clean = np.concatenate((silence(1.0), request_speech, silence(1.0)))
    noise = (0.03 * rng.standard_normal(len(clean))).astype(np.float32)
    cleaned = denoise(clean + noise)
    assert len(cleaned) == len(clean)
    quiet = slice(int(0.2 * RATE), int(0.9 * RATE))  # noise only
    assert np.std(cleaned[quiet]) < np.std(noise[quiet]) / 10  # more than 20 dB less noise
    voiced = slice(RATE, RATE + len(request_speech))
    assert np.corrcoef(cleaned[voiced], clean[voiced])[0, 1] > 0.8


def test_rnnoise_streaming_matches_the_whole_utterance(request_speech) -> None:
    audio = np.concatenate((silence(0.5), request_speech))
    whole = denoise(audio)
    stream = StreamDenoiser()
    pieces = [stream.push(audio[start : start + 333]) for start in range(0, len(audio), 333)]
    streamed = np.concatenate([*pieces, stream.flush()])[: len(audio)]
    assert np.max(np.abs(streamed - whole)) < 1e-3


@pytest.mark.subprocess
def test_rnnoise_does_not_import_pyrnnoises_file_helpers() -> None:
    code = (
        "import sys, numpy as np; from device.denoise import denoise; denoise(np.zeros(16000, np.float32));"
        "print(sorted(m for m in ('pyrnnoise', 'audiolab', 'av', 'tqdm') if m in sys.modules))"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"
