"""The front end: streaming features equal batch features, whatever the chunking; unsupported front ends are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from common.recording import read_recording
from device.features import (
    StreamingFrontend,
    UnsupportedFrontend,
    batch_features,
    check_frontend,
    complete_frames,
    frame_length,
    frame_step,
    mel_filterbank,
    power_spectrum,
    window_features,
)
from schemas.model import Frontend

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
FRONTEND = Frontend(
    kind="logfbank",
    sample_rate=16000,
    window_s=0.025,
    step_s=0.01,
    num_filters=40,
    num_features=40,
    fft_size=512,
    low_hz=20.0,
    high_hz=8000.0,
    preemphasis=0.97,
    frames=150,
)


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_recording(SAMPLES / "hey_jarvis_turn_on_the_lights.flac")


@pytest.mark.parametrize("chunk", [1, 160, 257, 512, 1600, 100_000])
def test_streaming_features_equal_batch_features(speech: np.ndarray, chunk: int) -> None:
    batch = batch_features(FRONTEND, speech)
    stream = StreamingFrontend(FRONTEND)
    pieces = [stream.push(speech[start : start + chunk]) for start in range(0, len(speech), chunk)]
    streamed = np.concatenate(pieces)
    assert streamed.shape == batch.shape == (complete_frames(FRONTEND, len(speech)), 40)
    np.testing.assert_allclose(streamed, batch, atol=1e-4)
    assert stream.frames_emitted == len(batch)


def test_features_see_the_speech(speech: np.ndarray) -> None:
    features = batch_features(FRONTEND, speech)
    loud = features.mean(axis=1)
    # Speech frames carry far more energy than the silence TTS leaves at the ends.
    assert loud.max() - loud.min() > 5.0
    assert np.isfinite(features).all()


def test_digital_silence_stays_finite_at_the_floor() -> None:
    features = batch_features(FRONTEND, np.zeros(16000, np.float32))
    assert features.shape == (98, 40)
    assert np.all(features == np.float32(np.log(FRONTEND.energy_floor)))


def test_too_short_input_gives_no_frames() -> None:
    assert batch_features(FRONTEND, np.zeros(399, np.float32)).shape == (0, 40)
    assert StreamingFrontend(FRONTEND).push(np.zeros(399, np.float32)).shape == (0, 40)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"kind": "mfcc"}, "kind"),
        ({"window": "kaiser"}, "window"),
        ({"num_features": 13}, "num_features"),
        ({"high_hz": 9000.0}, "filter edges"),
        ({"window_s": 0.04}, "longer than the FFT"),
    ],
)
def test_a_front_end_the_device_cannot_compute_is_refused(change: dict, reason: str) -> None:
    with pytest.raises(UnsupportedFrontend, match=reason):
        check_frontend(dataclasses.replace(FRONTEND, **change))


@pytest.mark.parametrize(
    "changes",
    [{}, {"num_filters": 20, "num_features": 20}, {"low_hz": 300.0, "high_hz": 3800.0}, {"fft_size": 1024}],
)
def test_the_device_front_end_is_python_speech_features_written_in_numpy(changes: dict) -> None:
    import python_speech_features
    from python_speech_features import sigproc

    frontend = dataclasses.replace(FRONTEND, **changes)
    reference = python_speech_features.get_filterbanks(
        frontend.num_filters, frontend.fft_size, frontend.sample_rate, frontend.low_hz, frontend.high_hz
    )
    np.testing.assert_array_equal(mel_filterbank(frontend), reference)
    frames = np.random.default_rng(1).standard_normal((7, frame_length(frontend)))
    np.testing.assert_allclose(power_spectrum(frames, frontend.fft_size), sigproc.powspec(frames, frontend.fft_size))
    for seconds in (0.025, 0.0125, 0.0155, 0.01):  # half-up rounding, not to even
        assert frame_length(dataclasses.replace(frontend, window_s=seconds)) == sigproc.round_half_up(seconds * 16000)
    assert frame_step(frontend) == sigproc.round_half_up(frontend.step_s * 16000)


def test_window_features_equal_training_features(speech: np.ndarray) -> None:
    window = speech[16000 : 16000 + 24240]
    np.testing.assert_allclose(window_features(FRONTEND, window), batch_features(FRONTEND, window), atol=1e-4)


@pytest.mark.subprocess
def test_the_device_front_end_does_not_load_scipy() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np; from device.local_model import load_local_model; from device.pipeline import *;"
        "m = load_local_model(); print('scipy' in sys.modules, 'python_speech_features' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert shown.stdout.split() == ["False", "False"]
