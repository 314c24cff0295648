"""The whole training pipeline end to end on the tiny recipe: synth, augment, features, train, quantize, package,
then evaluate against the peers. Real engines, real TensorFlow, real LiteRT; the tiny model is not meant to be good.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.recording import read_recording
from device.detector import WakeDetector, wake_scores
from device.inference import TfliteClassifier
from device.local_model import load_local_model
from firmware_tools.building.clips import ClipBank
from firmware_tools.building.command_head import WINDOW_EMBEDDINGS
from firmware_tools.building.phrases import model_labels
from firmware_tools.building.pipeline import STAGES
from firmware_tools.building.recipe import RECIPES_DIR, RecipeError, load_recipe
from firmware_tools.building.synth import plan_renders
from firmware_tools.building.tflite_merge import HEAD_SIGNATURE
from firmware_tools.building.voices import HeldOutVoice, VoiceSpec, render
from schemas.model import ModelPackage
from schemas.vocabulary import load_vocabulary

pytestmark = pytest.mark.timeout(400)

FSDD = Path(__file__).parent / "data" / "fsdd"
"""Six real FSDD digits, one per speaker: the head stage's real speech here (the full set is a data directory)."""


def test_the_tiny_pipeline_runs_every_stage_in_under_two_minutes(tiny_run) -> None:
    _, _, seconds = tiny_run
    assert list(seconds) == list(STAGES)
    assert sum(seconds.values()) < 120, seconds


def test_synth_renders_every_engine_and_no_held_out_voice(tiny_run) -> None:
    work, _, _ = tiny_run
    bank = ClipBank(work / "synth")
    engines = {record.engine for record in bank.records}
    assert engines == {"espeak", "piper", "flite", "festival"}
    assert not {(r.engine, r.voice) for r in bank.records} & {("flite", "slt"), ("flite", "rms")}
    assert any(record.f0_factor != 1.0 for record in bank.records), "WORLD made no new speakers"
    labels = {record.label for record in bank.records}
    assert set(load_vocabulary().labels) <= labels
    audio = bank.audio(0)
    assert audio.dtype == np.float32 and 0.1 < np.abs(audio).max() <= 1.0


def test_windows_and_features_have_the_manifest_shapes(tiny_run) -> None:
    work, _, _ = tiny_run
    recipe = load_recipe("tiny")
    features = np.load(work / "features" / "train_features.npy", mmap_mode="r")
    labels = np.load(work / "features" / "train_labels.npy")
    assert features.shape == (recipe.dataset.train_examples, recipe.frontend.frames, recipe.frontend.num_features)
    assert np.isfinite(features[:50].astype(np.float32)).all()
    # Every class is represented, wake and silence included.
    assert set(np.unique(labels)) == set(range(len(model_labels(load_vocabulary()))))


def test_the_package_loads_in_litert_with_int8_input_and_output(tiny_run) -> None:
    _, out, _ = tiny_run
    package = ModelPackage.load(out)
    assert package.labels == model_labels(load_vocabulary())
    model = TfliteClassifier(package.model_path(out))
    assert model.quantized
    assert model.input_shape == (package.frontend.frames, package.frontend.num_features)
    assert model.num_labels == len(package.labels)
    probabilities = model(np.zeros(model.input_shape, np.float32))
    assert abs(float(probabilities.sum()) - 1.0) < 0.05
    report = json.loads((out / "training.json").read_text())
    assert abs(report["validation_accuracy_int8"] - report["validation_accuracy_float"]) <= 0.05


def test_the_package_joins_the_always_on_model_and_the_head_without_changing_either(tiny_run) -> None:
    work, out, _ = tiny_run
    package = ModelPackage.load(out)
    assert package.detection.head_signature == HEAD_SIGNATURE
    rng = np.random.default_rng(5)
    window = rng.standard_normal((package.frontend.frames, package.frontend.num_features)).astype(np.float32)
    # The first subgraph is the always-on model, as an older device reads it.
    np.testing.assert_array_equal(
        TfliteClassifier(package.model_path(out))(window), TfliteClassifier(work / "quantize" / "model.tflite")(window)
    )
    head = TfliteClassifier(package.model_path(out), signature=HEAD_SIGNATURE)
    alone = TfliteClassifier(work / "head" / "head.tflite")
    assert head.quantized and head.input_shape == alone.input_shape == (WINDOW_EMBEDDINGS, 96)
    embeddings = rng.uniform(0, 1, head.input_shape).astype(np.float32)
    np.testing.assert_array_equal(head(embeddings), alone(embeddings))
    assert head.num_labels == len(package.labels)


def test_the_head_is_judged_on_each_fsdd_speaker_by_a_fold_that_never_heard_them(tiny_run) -> None:
    work, out, _ = tiny_run
    report = json.loads((work / "head" / "head.json").read_text())
    speakers = sorted(path.name.split("_")[1] for path in FSDD.glob("*.flac"))
    assert sorted(path.stem for path in (work / "head" / "folds").glob("*.tflite")) == speakers
    held_out = report["held_out_fsdd"]
    assert held_out["clips"] == len(speakers) and sorted(held_out["per_speaker"]) == speakers
    detection = ModelPackage.load(out).detection
    assert detection.head_temperature == report["temperature"] > 0
    assert detection.command_threshold == report["command_threshold"]
    assert 0 < detection.verify_threshold <= 0.5


def test_the_device_decides_commands_with_the_head(tiny_run) -> None:
    _, out, _ = tiny_run
    model = load_local_model(out)
    assert model.head is not None
    audio = read_recording(sorted(FSDD.glob("*.flac"))[0], 16000)
    decision = model.decide(audio, 0, len(audio))
    scores = [score for _, score in decision.alternatives]
    assert model.head.runs == 1 and scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1


def test_a_tampered_model_file_is_refused(tiny_run, tmp_path: Path) -> None:
    _, out, _ = tiny_run
    package = ModelPackage.load(out)
    for name in ("manifest.json", package.model_file):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    data = bytearray((tmp_path / package.model_file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / package.model_file).write_bytes(bytes(data))
    with pytest.raises(Exception, match="digest"):
        package.model_path(tmp_path)


def test_the_streaming_detector_scores_as_the_offline_path_does(tiny_run) -> None:
    _, out, _ = tiny_run
    package = ModelPackage.load(out)
    model = TfliteClassifier(package.model_path(out))
    rng = np.random.default_rng(3)
    audio = (rng.standard_normal(16000 * 4) * 0.05).astype(np.float32)
    offline = wake_scores(model, package, audio)
    detector = WakeDetector(model, package)
    stride = package.detection.stride_frames * 160
    streamed = []
    for start in range(0, len(audio), stride):
        runs = detector.runs
        detector.push(audio[start : start + stride])
        if detector.runs > runs:
            streamed.append(detector.last_score)
    assert len(streamed) == len(offline) > 10
    np.testing.assert_allclose(streamed, offline, atol=1e-3)


def test_evaluate_reports_every_required_figure_and_draws_the_plots(tiny_run, tmp_path: Path) -> None:
    from firmware_tools.building.evaluate import evaluate
    from firmware_tools.building.heldout import HELD_OUT_SPECS, HeldOutSettings
    from firmware_tools.building.peers import load_peers

    work, out, _ = tiny_run
    settings = HeldOutSettings(voices=HELD_OUT_SPECS[::3], negative_minutes=0.5, max_phrases=3)
    report = evaluate(
        out,
        load_vocabulary(),
        settings,
        cache_root=tmp_path,
        float_model=work / "quantize" / "model_float.tflite",
        peers=load_peers(),
    )
    for key in (
        "wake_recall_at_0p5_fa_per_hour",
        "wake_recall_at_1_fa_per_hour",
        "command_top1",
        "local_precision",
        "local_coverage",
        "peers",
    ):
        assert key in report
    assert set(report["peers"]) == {"microwakeword", "openwakeword"}
    for figures in report["peers"].values():
        assert 0 <= figures["wake_recall_at_0p5_fa_per_hour"] <= 1 and figures["cpu_ms_per_audio_s"] > 0
    assert report["heldout"]["command_clips"] == 3 * len(settings.voices)
    assert report["heldout"]["noise_draws_per_clip"] >= 1
    assert report["heldout"]["negative_minutes"] >= 0.45
    assert json.loads((out / "evaluation.json").read_text())["command_top1"] == report["command_top1"]
    for plot in ("confusion_matrix.png", "det_curve.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_held_out_voices_are_never_used_for_training() -> None:
    jobs = plan_renders(load_recipe("default"), load_vocabulary())
    assert len(jobs) > 5000
    assert not [job for job in jobs if job.voice.held_out]
    for engine, voice in (("flite", "slt"), ("flite", "rms"), ("festival", "cmu_us_slt_arctic_hts")):
        with pytest.raises(HeldOutVoice):
            render(VoiceSpec(engine, voice), "hey jarvis")


def test_a_recipe_with_an_unknown_setting_is_refused(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.toml"
    text = (RECIPES_DIR / "tiny.toml").read_text()
    recipe.write_text(text.replace("[train]\n", "[train]\nepoch = 3\n"))
    with pytest.raises(RecipeError, match="epoch"):
        load_recipe(recipe)


@pytest.mark.parametrize("start", [-30, -10, -1, 0, 5, 15, 19, 20, 40])
def test_a_clip_placed_partly_outside_a_window_keeps_what_fits(start: int) -> None:
    from firmware_tools.building.augment import place

    canvas = np.zeros(20, np.float32)
    clip = np.arange(1, 11, dtype=np.float32)
    place(clip, start, canvas)
    expected = np.zeros(20, np.float32)
    for i, value in enumerate(clip):
        if 0 <= start + i < 20:
            expected[start + i] = value
    np.testing.assert_array_equal(canvas, expected)


def test_a_head_can_be_packaged_with_another_always_on_network(tiny_run, tmp_path: Path) -> None:
    from firmware_tools.building.package import run_package

    work, _, _ = tiny_run
    other = tmp_path / "always_on.tflite"
    other.write_bytes((work / "quantize" / "model.tflite").read_bytes())
    out = run_package(load_recipe("tiny"), work, tmp_path / "model", always_on=other)
    report = json.loads((out / "training.json").read_text())
    assert report["always_on_from"] == str(other) and report["validation_accuracy_float"] is None
    package = ModelPackage.load(out)
    window = np.random.default_rng(9).standard_normal((package.frontend.frames, package.frontend.num_features))
    window = window.astype(np.float32)
    np.testing.assert_array_equal(TfliteClassifier(package.model_path(out))(window), TfliteClassifier(other)(window))
    assert package.detection.head_signature == HEAD_SIGNATURE
