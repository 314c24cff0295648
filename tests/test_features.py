"""The front end: streaming features equal batch features, whatever the chunking; unsupported front ends are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from device.features import (
    StreamingFrontend,
    UnsupportedFrontend,
    batch_features,
    check_frontend,
    complete_frames,
)
from device.recording import read_recording
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
