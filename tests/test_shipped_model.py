"""The model shipped in device/models/default: its package, its cost, and what it hears in the committed recordings.

The recordings in samples/ are spoken by a held-out voice (flite slt), so these are
real checks of the real model on a voice it never trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from device.detector import WakeDetector, decide_command, utterance_window
from device.inference import TfliteClassifier
from device.recording import read_recording
from firmware_tools.package import vocabulary_sha256
from firmware_tools.phrases import model_labels
from schemas.model import ModelPackage
from schemas.vocabulary import load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "device" / "models" / "default"
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    return ModelPackage.load(MODEL_DIR)


@pytest.fixture(scope="module")
def model(package: ModelPackage) -> TfliteClassifier:
    return TfliteClassifier(package.model_path(MODEL_DIR))


def test_the_package_matches_the_vocabulary_it_ships_with(package: ModelPackage) -> None:
    assert package.labels == model_labels(load_vocabulary())
    assert package.vocabulary_sha256 == vocabulary_sha256()


def test_the_model_is_full_int8_and_within_the_size_budget(package: ModelPackage, model: TfliteClassifier) -> None:
    assert model.quantized
    assert model.input_shape == (package.frontend.frames, package.frontend.num_features)
    assert sum(path.stat().st_size for path in MODEL_DIR.glob("*.tflite")) <= 100_000


def test_the_committed_evaluation_carries_every_required_figure(package: ModelPackage) -> None:
    evaluation = json.loads((MODEL_DIR / "evaluation.json").read_text())
    for key in (
        "wake_recall_at_0p5_fa_per_hour",
        "wake_recall_at_1_fa_per_hour",
        "command_top1",
        "local_precision",
        "local_coverage",
    ):
        assert 0.0 <= evaluation[key] <= 1.0, key
    assert set(evaluation["peers"]) == {"microwakeword", "openwakeword"}
    for figures in evaluation["peers"].values():
        assert {"wake_recall_at_0p5_fa_per_hour", "cpu_ms_per_audio_s"} <= set(figures)
    assert evaluation["model"]["sha256"] == package.sha256, "evaluation.json is of another model"
    assert evaluation["heldout"]["negative_minutes"] >= 30
    for plot in ("confusion_matrix.png", "det_curve.png"):
        assert (MODEL_DIR / plot).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "sample, command",
    [("hey_jarvis_turn_on_the_lights.flac", "lights_on"), ("hey_jarvis_weather_tomorrow.flac", None)],
)
def test_the_model_wakes_on_a_held_out_voice_and_decides_as_it_should(
    package: ModelPackage, model: TfliteClassifier, sample: str, command: str | None
) -> None:
    speech = read_recording(SAMPLES / sample)
    padding = np.zeros(16000, np.float32)
    audio = np.concatenate((padding, speech, padding))
    detector = WakeDetector(model, package)
    wakes = [event for start in range(0, len(audio), 1600) for event in detector.push(audio[start : start + 1600])]
    assert len(wakes) == 1, wakes
    # What follows the wake phrase: from the wake until the end of the speech.
    start = round(wakes[0].time_s * 16000)
    end = len(padding) + len(speech)
    decision = decide_command(model, package, utterance_window(package, audio, start, end))
    if command is None:
        assert not decision.local, decision
    else:
        assert decision.label == command and decision.local, decision


def test_silence_and_noise_do_not_wake_it(package: ModelPackage, model: TfliteClassifier) -> None:
    rng = np.random.default_rng(5)
    audio = np.concatenate((np.zeros(16000 * 5, np.float32), (rng.standard_normal(16000 * 20) * 0.05)))
    detector = WakeDetector(model, package)
    assert detector.push(audio.astype(np.float32)) == []
