"""Evaluation, after the pipeline's stages: the packaged model and the peer wake word models, on held-out audio.

Everything is measured on the same audio: held-out voices (never trained on), mixed
with noise the model never heard at 10 dB and 5 dB SNR, and a long negative stream
of read speech and noise. Writes ``evaluation.json``, ``confusion_matrix.png`` and
``det_curve.png`` into the model directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from device.detector import count_wakes, decide_command, score_end_sample, utterance_window, wake_scores, wake_triggers
from device.features import StreamingFrontend, window_samples
from device.inference import TfliteClassifier
from device.local_model import LocalModel, load_local_model
from firmware_tools.building.heldout import HeldOutSet, HeldOutSettings, in_noise, load_or_build
from firmware_tools.building.model_card import write_model_card
from firmware_tools.building.phrases import SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL
from firmware_tools.building.recipe import Recipe
from schemas.model import ModelPackage
from schemas.vocabulary import Vocabulary

log = logging.getLogger("mqvox.evaluate")

SAMPLE_RATE = 16000
"""Rate (hertz) of all evaluation audio."""
SNRS_DB = (10.0, 5.0)
"""Noise conditions; the first is the one the targets are stated at."""
WAKE_PADDING_S = (1.0, 1.0)
"""Silence (then noise) before and after each wake clip, so the detector sees the phrase start and end."""
FALSE_ACCEPT_RATES = (0.5, 1.0)
"""False accepts per hour at which recall is reported (see recall_key); the DET plot marks each."""
NOISE_DRAWS = 2
"""Each held-out clip is mixed with this many different noises per SNR."""
CPU_SAMPLE_S = 120.0
"""Seconds of the negative stream on which the always-on path's CPU cost is measured."""


@dataclass(frozen=True)
class WakeCurve:
    """A detector's recall against false accepts per hour, over a sweep of thresholds."""

    thresholds: list[float]
    """Thresholds swept."""
    recall: list[float]
    """Share of wake clips detected at each threshold."""
    false_accepts_per_hour: list[float]
    """False accepts per hour of the negative stream at each threshold."""

    def recall_at(self, rate: float) -> float:
        """Best recall among thresholds with at most ``rate`` false accepts per hour."""
        allowed = [r for r, fa in zip(self.recall, self.false_accepts_per_hour, strict=True) if fa <= rate]
        return round(max(allowed, default=0.0), 4)

    def recalls(self) -> dict[str, float]:
        """Recall at each of FALSE_ACCEPT_RATES, under its report key."""
        return {recall_key(rate): self.recall_at(rate) for rate in FALSE_ACCEPT_RATES}


def recall_key(rate: float) -> str:
    """The report's key of the recall at ``rate`` false accepts per hour: ``recall_at_0p5_fa_per_hour`` for 0.5."""
    return f"recall_at_{rate:g}_fa_per_hour".replace(".", "p")


def sweep(positive_max: np.ndarray, negative_scores: np.ndarray, step_s: float, refractory_s: float) -> WakeCurve:
    """Recall (a clip is detected when its best score reaches the threshold) against false accepts per hour."""
    hours = len(negative_scores) * step_s / 3600
    candidates = np.unique(np.concatenate((positive_max, np.quantile(negative_scores, np.linspace(0.9, 1, 200)))))
    thresholds = np.unique(np.clip(np.concatenate((candidates, [1.0001])), 0, 1.0001))
    recall, rates = [], []
    for threshold in thresholds:
        recall.append(float((positive_max >= threshold).mean()))
        rates.append(count_wakes(negative_scores, threshold, step_s, refractory_s) / hours)
    return WakeCurve([float(t) for t in thresholds], recall, rates)


def _padded(clip: np.ndarray) -> np.ndarray:
    before, after = (np.zeros(round(s * SAMPLE_RATE), np.float32) for s in WAKE_PADDING_S)
    return np.concatenate((before, clip, after))


@dataclass(frozen=True)
class HeardUtterance:
    """A held-out clip as the device hears it: in noise, with where the speech is."""

    audio: np.ndarray
    start: int
    end: int


def heard_utterances(
    package: ModelPackage, clips: list[np.ndarray], snr_db: float, rng, babble
) -> list[HeardUtterance]:
    """Each clip centred in at least two seconds of silence, the whole in noise."""
    heard = []
    for clip in clips:
        length = max(window_samples(package.frontend), 2 * SAMPLE_RATE)
        canvas = np.zeros(max(length, len(clip)), np.float32)
        offset = (len(canvas) - len(clip)) // 2
        canvas[offset : offset + len(clip)] = clip
        heard.append(HeardUtterance(in_noise(canvas, snr_db, rng, babble), offset, offset + len(clip)))
    return heard


def _command_metrics(model: LocalModel, utterances, labels, oov_utterances) -> dict[str, Any]:
    decisions = [model.decide(u.audio, u.start, u.end) for u in utterances]
    oov_decisions = [model.decide(u.audio, u.start, u.end) for u in oov_utterances]
    predicted = [d.alternatives[0][0] for d in decisions]
    correct = np.array([p == t for p, t in zip(predicted, labels, strict=True)])
    per_class = {
        label: round(float(correct[[t == label for t in labels]].mean()), 4) for label in dict.fromkeys(labels)
    }
    local = np.array([d.local for d in decisions])
    local_right = np.array([d.local and d.label == t for d, t in zip(decisions, labels, strict=True)])
    oov_local = sum(d.local for d in oov_decisions)
    decided = int(local.sum()) + oov_local
    return {
        "command_top1": round(float(correct.mean()), 4),
        "command_top1_per_class": per_class,
        "local_precision": round(float(local_right.sum() / decided), 4) if decided else None,
        "local_coverage": round(float(local.mean()), 4),
        "out_of_vocabulary_decided_locally": round(oov_local / max(1, len(oov_decisions)), 4),
        "commands": len(labels),
        "out_of_vocabulary_utterances": len(oov_decisions),
        "decided_by": "command head on the speech embedding" if model.head is not None else "always-on model",
        "predicted": predicted,
    }


def verifier_scores(model: LocalModel, audio: np.ndarray, scores: np.ndarray) -> list[float]:
    """The head's wake score at each first-stage trigger of ``scores`` (the wake scores of ``audio``)."""
    package = model.package
    detection = package.detection
    step_s = detection.stride_frames * package.frontend.step_s
    triggers = wake_triggers(scores, detection.wake_threshold, step_s, detection.refractory_s)
    return [model.head.wake_score(package, audio[: score_end_sample(package, index)]) for index in triggers]


def two_stage(model: LocalModel, positives: list[np.ndarray], positive_scores, negative, negative_scores) -> dict:
    """Wake recall and false accepts of the first stage at its shipped threshold followed by the verifier.

    The first stage stays at its threshold; the sweep is over the verifier's. A clip is detected when any of
    its first-stage triggers is verified.
    """
    hours = len(negative) / SAMPLE_RATE / 3600
    positive_best = np.array(
        [max(verifier_scores(model, a, s), default=-1.0) for a, s in zip(positives, positive_scores, strict=True)]
    )
    negative_verified = np.array(verifier_scores(model, negative, negative_scores))
    # A clip the first stage never fired on (-1) is missed at every verifier threshold.
    thresholds = np.unique(np.concatenate((positive_best[positive_best >= 0], negative_verified, [1.0001])))
    recall = [float((positive_best >= t).mean()) for t in thresholds]
    rates = [float((negative_verified >= t).sum() / hours) for t in thresholds]
    curve = WakeCurve([float(t) for t in thresholds], recall, rates)
    shipped = model.package.detection.verify_threshold
    return curve.recalls() | {
        "at_shipped_thresholds": {
            "recall": round(float((positive_best >= shipped).mean()), 4),
            "false_accepts_per_hour": round(float((negative_verified >= shipped).sum() / hours), 3),
            "first_stage_recall": round(float((positive_best >= 0).mean()), 4),
            "first_stage_triggers_per_hour": round(len(negative_verified) / hours, 3),
        },
    }


def always_on_cpu(model: TfliteClassifier, package: ModelPackage, audio: np.ndarray) -> dict[str, float]:
    """CPU of the always-on path (streaming features in 100 ms chunks + the model every stride), per audio second."""
    from device.detector import WakeDetector

    detector = WakeDetector(model, package)
    chunk = SAMPLE_RATE // 10
    started = time.process_time()
    for start in range(0, len(audio), chunk):
        detector.push(audio[start : start + chunk])
    cpu_s = time.process_time() - started
    frontend = StreamingFrontend(package.frontend)
    started = time.process_time()
    for start in range(0, len(audio), chunk):
        frontend.push(audio[start : start + chunk])
    features_s = time.process_time() - started
    window = np.zeros(model.input_shape, np.float32)
    timings = []
    for _ in range(300):
        begun = time.perf_counter()
        model(window)
        timings.append(time.perf_counter() - begun)
    seconds = len(audio) / SAMPLE_RATE
    return {
        "cpu_ms_per_audio_s": round(1000 * cpu_s / seconds, 3),
        "features_cpu_ms_per_audio_s": round(1000 * features_s / seconds, 3),
        "inference_us_per_window_median": round(1e6 * float(np.median(timings)), 1),
        "model_runs_per_audio_s": round(detector.runs / seconds, 2),
    }


def evaluate(
    model_dir: Path,
    vocabulary: Vocabulary,
    settings: HeldOutSettings,
    cache_root: Path,
    float_model: Path | None = None,
    peers: dict[str, Any] | None = None,
    recipe: Recipe | None = None,
) -> dict[str, Any]:
    """Measure everything; returns the report (also written to ``model_dir/evaluation.json``) and draws the plots.

    With ``recipe`` (the one that built the model), the model card is rewritten with the new figures.
    """
    local_model = load_local_model(model_dir, vocabulary)
    package = local_model.package
    model = local_model.classifier
    heldout: HeldOutSet = load_or_build(settings, vocabulary, cache_root)
    rng = np.random.default_rng(settings.seed + 1)
    babble = heldout.babble
    detection = package.detection
    step_s = detection.stride_frames * package.frontend.step_s

    log.info("wake: negative stream (%.1f min)", len(heldout.negative_stream) / SAMPLE_RATE / 60)
    negative_scores = wake_scores(model, package, heldout.negative_stream)
    negative_hours = len(heldout.negative_stream) / SAMPLE_RATE / 3600
    wake_clips = [_padded(clip) for clip in heldout.wake for _ in range(NOISE_DRAWS)]
    wake_audio = {snr: [in_noise(clip, snr, rng, babble) for clip in wake_clips] for snr in SNRS_DB}
    report: dict[str, Any] = {}
    curves: dict[str, dict[float, WakeCurve]] = {"mqvox": {}}
    verify = local_model.head is not None and detection.verify_threshold > 0
    for snr in SNRS_DB:
        positive_scores = [wake_scores(model, package, a) for a in tqdm(wake_audio[snr], desc="wake")]
        positive_max = np.array([scores.max() for scores in positive_scores])
        curves["mqvox"][snr] = sweep(positive_max, negative_scores, step_s, detection.refractory_s)
        shipped = {
            "recall": round(float((positive_max >= detection.wake_threshold).mean()), 4),
            "false_accepts_per_hour": round(
                count_wakes(negative_scores, detection.wake_threshold, step_s, detection.refractory_s) / negative_hours,
                3,
            ),
        }
        report[f"wake_{int(snr)}db"] = curves["mqvox"][snr].recalls() | {"at_shipped_threshold": shipped}
        if verify:
            # What the device does: the first stage at its threshold, then the verifier. The figures above are
            # the first stage alone, swept over its threshold.
            report[f"wake_{int(snr)}db"]["two_stage"] = two_stage(
                local_model, wake_audio[snr], positive_scores, heldout.negative_stream, negative_scores
            )

    command_labels = [label for label, _ in heldout.commands for _ in range(NOISE_DRAWS)]
    command_clips = [clip for _, clip in heldout.commands for _ in range(NOISE_DRAWS)]
    per_snr = {}
    windows_10db = None
    for snr in SNRS_DB:
        utterances = heard_utterances(package, command_clips, snr, rng, babble)
        oov_clips = [clip for clip in heldout.out_of_vocabulary for _ in range(NOISE_DRAWS)]
        oov = heard_utterances(package, oov_clips, snr, rng, babble)
        per_snr[snr] = _command_metrics(local_model, utterances, command_labels, oov)
        if windows_10db is None:
            windows_10db = [utterance_window(package, u.audio, u.start, u.end) for u in utterances]
    first = SNRS_DB[0]
    int8_top1 = per_snr[first]["command_top1"]
    report.update({f"wake_{key}": recall for key, recall in curves["mqvox"][first].recalls().items()})
    report.update(
        {
            "command_top1": int8_top1,
            "command_top1_per_class": per_snr[first]["command_top1_per_class"],
            "local_precision": per_snr[first]["local_precision"],
            "local_coverage": per_snr[first]["local_coverage"],
            "commands_5db": {k: v for k, v in per_snr[SNRS_DB[1]].items() if k != "predicted"},
            "snr_db": first,
        }
    )
    training = json.loads((model_dir / "training.json").read_text()) if (model_dir / "training.json").exists() else {}
    # The float twin is the network trained in the work directory; a package may hold another (package --always-on).
    joined_elsewhere = str(training.get("always_on_from", "")).endswith(".tflite")
    if float_model is not None and float_model.exists() and not joined_elsewhere:
        # The always-on model's own command classes, int8 against float (the head has its own report).
        top1 = {}
        for name, classifier in (("int8", model), ("float", TfliteClassifier(float_model))):
            right = [
                decide_command(classifier, package, w).alternatives[0][0] == t
                for w, t in zip(windows_10db, command_labels, strict=True)
            ]
            top1[f"always_on_command_top1_{name}"] = round(float(np.mean(right)), 4)
        report["int8_vs_float"] = top1
    cpu_audio = heldout.negative_stream[: round(CPU_SAMPLE_S * SAMPLE_RATE)]
    report["cost"] = always_on_cpu(model, package, cpu_audio) | {"model_bytes": package.size_bytes}
    report["cpu_ms_per_audio_s"] = report["cost"]["cpu_ms_per_audio_s"]

    report["peers"] = {}
    for name, peer in (peers or {}).items():
        log.info("peer %s", name)
        stream = peer.score(heldout.negative_stream)
        curves[name] = {}
        for snr in SNRS_DB:
            positive_max = np.array([peer.score(a).scores.max() for a in wake_audio[snr]])
            curves[name][snr] = sweep(positive_max, stream.scores, stream.step_s, detection.refractory_s)
        seconds = len(heldout.negative_stream) / SAMPLE_RATE
        lowest_rate = FALSE_ACCEPT_RATES[0]
        report["peers"][name] = (
            {"name": peer.name}
            | {f"wake_{key}": recall for key, recall in curves[name][first].recalls().items()}
            | {
                f"wake_{recall_key(lowest_rate)}_5db": curves[name][SNRS_DB[1]].recall_at(lowest_rate),
                "cpu_ms_per_audio_s": round(1000 * stream.cpu_s / seconds, 3),
            }
        )
    report["heldout"] = {
        "voices": [f"{v.engine}:{v.voice} speed {v.speed} pitch {v.pitch}" for v in settings.voices],
        "wake_clips": len(heldout.wake),
        "command_clips": len(heldout.commands),
        "out_of_vocabulary_utterances": len(heldout.out_of_vocabulary),
        "noise_draws_per_clip": NOISE_DRAWS,
        "negative_minutes": round(len(heldout.negative_stream) / SAMPLE_RATE / 60, 2),
        "settings": asdict(settings) | {"voices": len(settings.voices)},
        "refractory_s": detection.refractory_s,
    }
    report["model"] = {"version": package.version, "sha256": package.sha256, "detection": detection.to_dict()}
    (model_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot_confusion(model_dir / "confusion_matrix.png", package, command_labels, per_snr[first]["predicted"], first)
    _plot_det(model_dir / "det_curve.png", curves)
    if recipe is not None:
        write_model_card(model_dir, recipe)
    return report


def _plot_confusion(path: Path, package: ModelPackage, truth: list[str], predicted: list[str], snr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [label for label in package.labels if label != WAKE_LABEL]
    index = {label: i for i, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)))
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t], index.get(p, index[UNKNOWN_LABEL])] += 1
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    shown = [i for i, label in enumerate(classes) if rows[i, 0] > 0 or label in (SILENCE_LABEL, UNKNOWN_LABEL)]
    figure, axes = plt.subplots(figsize=(11, 9))
    image = axes.imshow(shares[np.ix_(shown, shown)], cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in shown]
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("said (held-out voices)")
    axes.set_title(f"Command confusion, held-out voices at {snr:g} dB SNR (row-normalised)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_det(path: Path, curves: dict[str, dict[float, WakeCurve]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 6))
    for (name, by_snr), colour in zip(curves.items(), ("C0", "C1", "C2", "C3"), strict=False):
        for snr, style in zip(sorted(by_snr, reverse=True), ("-", "--"), strict=False):
            curve = by_snr[snr]
            # One point per false-accept rate: the best recall any threshold reaches at that rate.
            all_rates = np.array(curve.false_accepts_per_hour)
            rates = np.unique(all_rates)
            miss = np.array([1 - max(np.array(curve.recall)[all_rates == rate]) for rate in rates])
            miss = np.minimum.accumulate(miss)
            shown = np.maximum(rates, 0.01)
            axes.step(shown, miss, style, color=colour, where="post", label=f"{name} {snr:g} dB")
    axes.set_xscale("log")
    axes.set_xlabel("false accepts per hour (negative stream; 0 drawn at 0.01)")
    axes.set_ylabel("miss rate (held-out wake clips)")
    axes.set_ylim(0, 1)
    for rate, style in zip(FALSE_ACCEPT_RATES, ("-", ":"), strict=True):
        axes.axvline(rate, color="grey", linewidth=0.8, linestyle=style)
    axes.set_title("Wake word DET: mqvox and peers on the same held-out audio")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
