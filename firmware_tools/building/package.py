"""The package stage, the last: thresholds tuned on validation, then the model directory a device loads.

Writes ``model.tflite``, ``manifest.json`` (schema ``model_package``), ``MODEL_CARD.md``
and ``training.json`` into the output directory (``device/models/default`` for the
shipped model). Thresholds are chosen on the validation windows, never on the
held-out evaluation sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from device.inference import TfliteClassifier
from firmware_tools.building.clips import ClipBank
from firmware_tools.building.model_card import write_model_card
from firmware_tools.building.phrases import SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL
from firmware_tools.building.recipe import Recipe
from firmware_tools.building.synth import describe_voices, plan_renders
from firmware_tools.building.tflite_merge import HEAD_SIGNATURE, merge_models
from firmware_tools.building.train import load_split
from firmware_tools.building.voices import espeak_variants
from schemas.model import MODEL_FILE, Detection, ModelPackage
from schemas.vocabulary import load_vocabulary, vocabulary_sha256

log = logging.getLogger("mqvox.package")

STALE_FILES = ("evaluation.json", "confusion_matrix.png", "det_curve.png", "real_voices.json")
"""Measurements of a packaged model, left out of a new package until they are measured again."""
THRESHOLD_GRID = np.round(np.arange(0.30, 0.996, 0.005), 3)
"""Thresholds tried when tuning."""


def tune_command_threshold(scores: np.ndarray, labels: np.ndarray, names: list[str], target: float) -> float:
    """Lowest threshold whose local decisions (a command scored at or above it) reach ``target`` precision."""
    best = scores.argmax(axis=1)
    confidence = scores.max(axis=1)
    is_command = np.array([names[i] not in (SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL) for i in best])
    for threshold in THRESHOLD_GRID:
        local = is_command & (confidence >= threshold)
        if local.sum() and (best[local] == labels[local]).mean() >= target:
            return float(threshold)
    return float(THRESHOLD_GRID[-1])


def tune_wake_threshold(scores: np.ndarray, labels: np.ndarray, wake: int, quantile: float) -> float:
    """The ``quantile`` of the wake score over validation windows without the wake phrase (at least 0.5)."""
    others = scores[labels != wake, wake]
    # float(), then round: the float32 quantile would otherwise write 0.984000027179718 into the manifest.
    return round(float(np.clip(np.quantile(others, quantile), 0.5, 0.99)), 3)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((scores.argmax(axis=1) == labels).mean())


def run_package(
    recipe: Recipe,
    work_dir: Path,
    out_dir: Path,
    vocabulary_path: str | Path | None = None,
    always_on: Path | None = None,
) -> Path:
    """Tune, then write the package into ``out_dir``; returns it.

    ``always_on`` joins the head to another int8 always-on network of the same recipe (a previous release's,
    say) instead of the one the train stage just made; its thresholds are tuned here all the same.
    """
    labels = json.loads((work_dir / "features" / "labels.json").read_text())
    quantized_path = always_on or work_dir / "quantize" / MODEL_FILE
    int8 = TfliteClassifier(quantized_path)
    features, targets = load_split(work_dir, "validation")
    int8_scores = int8.scores(features)
    # The float twin exists only for the network trained here.
    float_scores = (
        None if always_on else TfliteClassifier(work_dir / "quantize" / "model_float.tflite").scores(features)
    )
    tuning = recipe.detection
    wake_index = labels.index(WAKE_LABEL)
    detection = Detection(
        wake_label=WAKE_LABEL,
        wake_threshold=tune_wake_threshold(int8_scores, targets, wake_index, tuning.wake_false_accept_quantile),
        stride_frames=tuning.stride_frames,
        smoothing_windows=tuning.smoothing_windows,
        refractory_s=tuning.refractory_s,
        command_threshold=tune_command_threshold(int8_scores, targets, labels, tuning.local_precision_target),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    data = quantized_path.read_bytes()
    head_dir = work_dir / "head"
    head_report = None
    if (head_dir / "head.tflite").exists():
        # The head decides commands and verifies wakes; its thresholds were fitted on held-out real speakers.
        head_report = json.loads((head_dir / "head.json").read_text())
        data = merge_models(data, (head_dir / "head.tflite").read_bytes())
        detection = replace(
            detection,
            head_signature=HEAD_SIGNATURE,
            head_temperature=head_report["temperature"],
            command_threshold=head_report["command_threshold"],
            verify_threshold=head_report["verify_threshold"],
        )
    (out_dir / MODEL_FILE).write_bytes(data)
    for stale in STALE_FILES:
        # They describe the model this package replaces: evaluate and bench/real_voices.py write them anew.
        (out_dir / stale).unlink(missing_ok=True)
    package = ModelPackage(
        version=recipe.version,
        model_file=MODEL_FILE,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        frontend=recipe.frontend,
        labels=tuple(labels),
        detection=detection,
        vocabulary_sha256=vocabulary_sha256(vocabulary_path),
        created_at=round(time.time(), 3),
    )
    (out_dir / "manifest.json").write_text(package.to_json())
    history = json.loads((work_dir / "train" / "history.json").read_text())
    report = {
        "recipe": recipe.name,
        "seed": recipe.seed,
        "parameters": history["parameters"],
        "train_seconds": history["seconds"],
        "size_bytes": len(data),
        "train_windows": len(np.load(work_dir / "features" / "train_labels.npy", mmap_mode="r")),
        "validation_windows": len(targets),
        "validation_accuracy_float": round(accuracy(float_scores, targets), 4) if float_scores is not None else None,
        "always_on_from": str(always_on) if always_on else "the train and quantize stages of this run",
        "validation_accuracy_int8": round(accuracy(int8_scores, targets), 4),
        "detection": detection.to_dict(),
        "data": _data_summary(recipe, work_dir, vocabulary_path),
        "always_on_size_bytes": quantized_path.stat().st_size,
        "head": head_report,
    }
    (out_dir / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out_dir, recipe)
    log.info("packaged %s: %s", out_dir, report)
    return out_dir


def _data_summary(recipe: Recipe, work_dir: Path, vocabulary_path: str | Path | None) -> dict:
    """What the model was trained on, for the card."""
    bank = ClipBank(work_dir / "synth")
    jobs = plan_renders(recipe, load_vocabulary(vocabulary_path))
    return {
        "rendered_clips": len(jobs),
        "world_speakers": sum(1 for r in bank.records if r.f0_factor != 1.0 or r.formant_factor != 1.0),
        "renders_by_voice": describe_voices(jobs),
        "espeak_variants": len(recipe.synth.espeak_variants or espeak_variants()),
    }
