"""MODEL_CARD.md of a packaged model: data, engines and voices, augmentations, metrics and intended use.

Written by the package stage from the recipe and the training report, and again by
evaluate with the held-out figures; every number in it comes from those JSON files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from firmware_tools.building.corruptions import Augmenter
from firmware_tools.building.recipe import RECIPES_DIR, Recipe
from firmware_tools.building.voices import HELD_OUT_VOICES
from schemas.model import ModelPackage


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def render_model_card(model_dir: Path, recipe: Recipe) -> str:
    """The card's Markdown."""
    package = ModelPackage.load(model_dir)
    training: dict[str, Any] = json.loads((model_dir / "training.json").read_text())
    evaluation_path = model_dir / "evaluation.json"
    evaluation = json.loads(evaluation_path.read_text()) if evaluation_path.exists() else None
    augment = Augmenter(recipe.dataset.augment, np.random.default_rng(0)).describe()
    data = training["data"]
    detection = package.detection
    front = package.frontend
    lines = [
        f"# mqvox device model {package.version} ({recipe.name} recipe)",
        "",
        "An int8 TFLite file with two networks behind two signatures. The always-on network (`wake`, the first "
        "subgraph) reads one window of "
        f"{package.frontend.frames} log-mel frames ({package.frontend.frames * package.frontend.step_s:.2f} s) and "
        f"scores {len(package.labels)} classes: `_silence_`, `_unknown_`, `wake` and each command."
        + (
            " A second network (`command_head`, see below) reads a pretrained speech embedding, scores the same "
            "classes, decides the commands after a wake and verifies each wake of the first."
            if detection.head_signature
            else ""
        ),
        "",
        "## Why two stages",
        "- The over-the-air protocol (issue 2) ships one signed blob; both networks travel in it, with their "
        "thresholds in the same manifest. A device of an older release refuses the manifest (its schema does not "
        "know the head's fields) and keeps the model it has.",
        "- The always-on path runs the small network every "
        f"{detection.stride_frames * package.frontend.step_s * 1000:.0f} ms and reads only the `wake` score; it "
        "costs tens of microseconds a run. The speech embedding costs far more, so it runs only on the two seconds "
        "before a first-stage wake (to verify it) and on the utterance after a wake (to decide the command).",
        "- The first network was trained on synthetic voices only; the head reads an embedding Google trained on "
        "a large amount of real speech, and was itself trained on real and synthetic speech, so it holds on "
        "real voices where the first does not (figures below).",
        "",
        "## Intended use",
        "- Wake phrase and a fixed command vocabulary, English, on low-power devices (Raspberry Pi, industrial "
        "controllers), 16 kHz mono microphones.",
        "- A command is decided on the device only when its score reaches the command threshold; anything else "
        "goes to the cloud worker (Whisper). The threshold was tuned for precision, not coverage.",
        "- Not for: open-vocabulary speech, speaker identification, safety-critical control without a confirmation "
        "step, languages other than English. Real speech in training is limited (six FSDD speakers, digits only, "
        "and game voice lines as other speech): validate on the voices and rooms of the deployment.",
        "",
        "## Always-on network: training data (all synthetic; rendered, never committed)",
        f"- {data['rendered_clips']} rendered clips plus {data['world_speakers']} WORLD-transformed speakers "
        f"(pitch x{recipe.synth.world_f0_range[0]}-{recipe.synth.world_f0_range[1]}, vocal tract "
        f"x{recipe.synth.world_formant_range[0]}-{recipe.synth.world_formant_range[1]}).",
        f"- Speaking rate x{recipe.synth.speed_range[0]}-{recipe.synth.speed_range[1]}; pitch "
        f"x{recipe.synth.pitch_range[0]}-{recipe.synth.pitch_range[1]} (espeak-ng, flite).",
        "- Engines and voices (renders):",
        *[f"  - `{voice}`: {count}" for voice, count in data["renders_by_voice"].items()],
        f"  - espeak-ng voice variants drawn from: {data['espeak_variants']} installed variants.",
        "  - piper: length, noise and noise_w scales drawn per render.",
        "- Held out, never trained on: " + ", ".join(f"{e} `{v}`" for e, v in sorted(HELD_OUT_VOICES)) + ".",
        '- Negatives: confusable phrases (e.g. "hey travis", "hey jar", "lights out", "one more"), everyday '
        "words, sentences, commands inside other speech, the wake phrase and commands cut short, speech that "
        "follows the wake phrase, silence and noise.",
        f"- Windows: {training['train_windows']} training, {training['validation_windows']} validation "
        "(validation windows come from renders kept apart).",
        "",
        "## Augmentations (applied in this order)",
        f"- speed: p={augment['speed']['probability']}, x{augment['speed']['factor_range']}",
        f"- pitch: p={augment['pitch']['probability']}, {augment['pitch']['semitones_range']} semitones",
        f"- reverb: p={augment['reverb']['probability']}, synthetic room impulse responses, RT60 "
        f"{augment['reverb']['rt60_s_range']} s",
        f"- noise: p={augment['noise']['probability']}, SNR {augment['noise']['snr_db_range']} dB, kinds (weight) "
        + ", ".join(f"{kind} ({weight:g})" for kind, weight in recipe.dataset.augment.noise_kinds)
        + "; babble is made of other training clips, hum is mains/motor harmonics plus fan noise",
        f"- band limit to {augment['band_limit']['cutoff_hz']:g} Hz: p={augment['band_limit']['probability']}",
        f"- gain: {augment['gain']['gain_db_range']} dB",
        "- time shift: every clip is placed at a random offset in its window",
        f"- SpecAugment on {recipe.dataset.spec_augment_probability:.0%} of training windows: "
        f"{recipe.dataset.spec_augment.time_masks} time masks up to {recipe.dataset.spec_augment.max_time_width} "
        f"frames, {recipe.dataset.spec_augment.frequency_masks} frequency masks up to "
        f"{recipe.dataset.spec_augment.max_frequency_width} bins",
        "",
        "## Network and front end",
        f"- DS-CNN, {training['parameters']} parameters, full int8 (int8 input and output), "
        f"{package.size_bytes} bytes.",
        f"- Front end (also in manifest.json): {front.kind}, {front.num_filters} mel filters "
        f"{front.low_hz:g}-{front.high_hz:g} Hz, {front.window_s * 1000:g} ms {front.window} window every "
        f"{front.step_s * 1000:g} ms, FFT {front.fft_size}, pre-emphasis {front.preemphasis}, energy floor "
        f"{front.energy_floor}.",
        f"- Decision settings (tuned on validation): wake threshold {detection.wake_threshold} on the mean of "
        f"{detection.smoothing_windows} runs, refractory {detection.refractory_s} s, command threshold "
        f"{detection.command_threshold}.",
        f"- Validation accuracy: float {_percent(training['validation_accuracy_float'])}, int8 "
        f"{_percent(training['validation_accuracy_int8'])}. Recipe `{recipe.name}`, seed {recipe.seed}, trained in "
        f"{training['train_seconds']:.0f} s."
        + (
            f" The packaged always-on network is not the one trained in that run: it comes from "
            f"`{training['always_on_from']}` (`package --always-on`), with its thresholds tuned on the same "
            "validation windows."
            if training.get("always_on_from", "").endswith(".tflite")
            else ""
        ),
        "",
        "## Held-out evaluation",
    ]
    if evaluation is None:
        lines.append("Not evaluated yet: run `make evaluate`.")
    else:
        lines += _evaluation_lines(evaluation)
    lines += _head_lines(training.get("head"), model_dir)
    lines += _fleet_lines(training.get("fleet", []))
    lines += _trial_lines()
    return "\n".join(lines) + "\n"


def _fleet_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """What each fleet learning round (firmware_tools/learning/learn.py) put into this model: counts, never audio."""
    if not rounds:
        return []
    lines = [
        "",
        "## Fleet adaptation",
        "The command head was fine-tuned on utterances of devices whose owners allow it (`cloud.share_for_training`), "
        "labelled by the cloud worker, together with its original training windows. Only counts are recorded here; "
        "no audio is kept in a model package.",
    ]
    for record in rounds:
        data = record["data"]
        lines += [
            "",
            f"### {record['base']} -> {record['version']}",
            f"- {record['adapt']['trained']}; settings {json.dumps(record['adapt']['settings'])}.",
            f"- Cloud answers at confidence {record['min_cloud_confidence']} or above; "
            f"{data['training_utterances']} utterances trained on, {data['held_out_utterances']} held out to judge "
            f"it; {data['rehearsal_windows']} rehearsal windows of the original training.",
            "- Training utterances per device and label:",
            *[
                f"  - `{device}`: " + ", ".join(f"{label} {count}" for label, count in sorted(sides["train"].items()))
                for device, sides in data["per_device"].items()
            ],
        ]
        if data.get("left_out"):
            lines.append("- Left out: " + ", ".join(f"{reason} {count}" for reason, count in data["left_out"].items()))
    return lines


def _head_lines(head: dict[str, Any] | None, model_dir: Path) -> list[str]:
    """The command head: its data (and FSDD's licence), how it was judged on real speakers, the real-voice bench."""
    if head is None:
        return []
    held = head["held_out_fsdd"]
    examples = head["examples"]
    lines = [
        "",
        "## Command head and wake verifier (second stage, on a pretrained speech embedding)",
        "- After a wake, commands are decided by a second network in the same .tflite file (signature "
        f"`command_head`): two 1-D convolutions over {head['window_embeddings']} embeddings (about 2 s of audio) "
        "of Google's speech embedding (`melspectrogram.tflite` and `embedding_model.tflite` as packaged in "
        "pyopen-wakeword, Apache-2.0, shipped in `device/models/speech_embedding/`). It scores the same labels; "
        f"int8, {head['size_bytes']} bytes.",
        "- The same head verifies each first-stage wake on the two seconds before it: the wake stands only if it "
        f"scores `wake` at least {head['verify_threshold']}.",
        f"- Trained on: FSDD's real digits ({examples.get('fsdd', 0)} augmented windows of 6 speakers), "
        f"synthetic speech of the training voices ({examples.get('synth', 0)} windows: every label, wake phrase "
        f"and other speech), real other speech from the training Debian packages ({examples.get('debian', 0)} "
        f"windows of hedgewars, nexuiz, openarena and redeclipse voice lines) and {examples.get('silence', 0)} "
        "windows of noise. Every window goes through the same augmenter, real or synthetic.",
        "- **Licence:** FSDD is CC BY-SA 4.0 (Z. Jackson et al., Free Spoken Digit Dataset). This head was trained "
        "on it, so the weights are offered under CC BY-SA 4.0 with that attribution; the always-on model and the "
        "rest of mqvox are not trained on it.",
        f"- Calibration: the logits are divided by {head['temperature']} (fitted on speakers held out from "
        f"training), and a command is decided on the device at a calibrated score of {head['command_threshold']} "
        f"or more, the lowest threshold at which the held-out decisions were at least "
        f"{_percent(head['settings']['precision_target'])} right.",
        "",
        "Held out, real speakers never trained on (one head per FSDD speaker, trained without that speaker; each "
        "clip as recorded, centred in the window):",
        "",
        "| speakers | clips | closed-set top-1 | open-set top-1 | decided on the device | right when decided |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in [("all six", held), *held["per_speaker"].items()]:
        lines.append(
            f"| {name} | {figures['clips']} | {_percent(figures['closed_set_top1'])} | "
            f"{_percent(figures['open_set_top1'])} | {_percent(figures['decided_on_device'])} | "
            f"{_percent(figures['precision_when_decided'])} |"
        )
    real_path = model_dir / "real_voices.json"
    if real_path.exists():
        real = json.loads(real_path.read_text())
        lines += ["", "From `bench/real_voices.py --write` (`real_voices.json`), through the device's pipeline:", ""]
        fsdd = real.get("fsdd_unseen_speakers", {})
        if "clips" in fsdd:
            lines.append(
                f"- FSDD, speakers never trained on: closed-set {_percent(fsdd['closed_set_top1'])}, open-set "
                f"{_percent(fsdd['open_set_top1'])}, decided on the device {_percent(fsdd['decided_on_device'])} "
                f"at {_percent(fsdd['precision_when_decided'])} precision; the always-on model alone: closed-set "
                f"{_percent(fsdd['always_on_model_alone']['closed_set_top1'])}, open-set "
                f"{_percent(fsdd['always_on_model_alone']['open_set_top1'])}."
            )
        non = real["real_non_commands"]
        lines.append(
            f"- Real non-commands ({non['lines']} voice lines of the evaluation packages): "
            f"{_percent(non['decided_on_device'])} decided on the device as a command."
        )
        wakes = real["false_wakes"]
        peers = ", ".join(f"{name} {p['false_wakes_per_hour']:.2f}" for name, p in wakes["peers"].items())
        lines.append(
            f"- False wakes on {wakes['hours']:.2f} h of real evaluation-only speech: "
            f"{wakes['false_wakes_per_hour']:.2f} per hour (peers on the same audio: {peers}); the verifier "
            f"rejected {wakes['rejected_by_verifier']} of {wakes['first_stage_triggers']} first-stage triggers."
        )
        lines.append(
            f"- Always-on CPU with the verifier's runs: {wakes['always_on_cpu_ms_per_audio_s']:.2f} ms per audio "
            f"second against microWakeWord's {wakes['microwakeword_cpu_ms_per_audio_s']:.2f} in the same run."
        )
    return lines


TRIALS = RECIPES_DIR / "trials" / "results.jsonl"
"""Measured results of the trial recipes (bench/heldout_commands.py output, one JSON object per line)."""


def _trial_lines() -> list[str]:
    if not TRIALS.exists():
        return []
    lines = [
        "",
        "## What was tried",
        "Small trials (16 000 windows, 6 epochs, recipes in `firmware_tools/building/recipes/trials/`), each measured "
        "with `bench/heldout_commands.py` on the held-out command clips: open set is the best of all classes, closed "
        "set the best among commands only.",
        "",
        "| trial | open, clean | closed, clean | open, 10 dB | closed, 10 dB |",
        "|---|---|---|---|---|",
    ]
    for line in TRIALS.read_text().splitlines():
        trial = json.loads(line)
        overall = trial["overall"]
        name = Path(trial["recipe"]).name if trial["recipe"].endswith(".toml") else trial["recipe"]
        lines.append(
            f"| `{name}` | {_percent(overall['open_clean'])} | "
            f"{_percent(overall['closed_clean'])} | {_percent(overall['open_10db'])} | "
            f"{_percent(overall['closed_10db'])} |"
        )
    lines += [
        "",
        "- Mean normalisation over the window and fewer, plainer `_unknown_` windows cut the held-out commands "
        "taken for `_unknown_`; speed perturbation toward slower speech helped in noise (held-out voices speak "
        "more slowly than the training voices: median command 0.61 s against 0.44-0.53 s).",
        "- `slow + vtlp (removed)`: the slow trial plus warping the filterbank axis of 80% of the training "
        "features (vocal tract length perturbation) gave no gain, so the code was removed.",
        "- The largest remaining gap is speaker generalisation: the errors are spread over voices the engines "
        "here cannot imitate (see the per-voice figures of `bench/heldout_commands.py`).",
    ]
    return lines


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    heldout = evaluation["heldout"]
    lines = [
        "From `evaluation.json` (`python -m firmware_tools evaluate`), on held-out voices only ("
        + ", ".join(sorted({v.split(" speed")[0] for v in heldout["voices"]}))
        + f"), {heldout['wake_clips']} wake clips, {heldout['command_clips']} command clips and "
        f"{heldout['out_of_vocabulary_utterances']} out-of-vocabulary utterances, each mixed with "
        f"{heldout['noise_draws_per_clip']} unseen noises at 10 dB and at 5 dB SNR, and "
        f"{heldout['negative_minutes']:.0f} minutes of read speech and noise without "
        "the wake phrase.",
        "",
        "| figure | mqvox | " + " | ".join(p["name"] for p in evaluation["peers"].values()) + " |",
        "|---|---|" + "---|" * len(evaluation["peers"]),
        "| wake recall at 0.5 false accepts/hour, 10 dB | "
        + _percent(evaluation["wake_recall_at_0p5_fa_per_hour"])
        + " | "
        + " | ".join(_percent(p["wake_recall_at_0p5_fa_per_hour"]) for p in evaluation["peers"].values())
        + " |",
        "| wake recall at 1 false accept/hour, 10 dB | "
        + _percent(evaluation["wake_recall_at_1_fa_per_hour"])
        + " | "
        + " | ".join(_percent(p["wake_recall_at_1_fa_per_hour"]) for p in evaluation["peers"].values())
        + " |",
        "| wake recall at 0.5 false accepts/hour, 5 dB | "
        + _percent(evaluation["wake_5db"]["recall_at_0p5_fa_per_hour"])
        + " | "
        + " | ".join(_percent(p["wake_recall_at_0p5_fa_per_hour_5db"]) for p in evaluation["peers"].values())
        + " |",
        "| CPU ms per second of audio | "
        + f"{evaluation['cpu_ms_per_audio_s']:.2f} | "
        + " | ".join(f"{p['cpu_ms_per_audio_s']:.2f}" for p in evaluation["peers"].values())
        + " |",
        "",
        f"- Command top-1 at 10 dB: {_percent(evaluation['command_top1'])}; at 5 dB: "
        f"{_percent(evaluation['commands_5db']['command_top1'])}.",
        f"- Local decisions at the shipped threshold, 10 dB: precision {_percent(evaluation['local_precision'])}, "
        f"coverage {_percent(evaluation['local_coverage'])} (5 dB: "
        f"{_percent(evaluation['commands_5db']['local_precision'])}, "
        f"{_percent(evaluation['commands_5db']['local_coverage'])}).",
        f"- At the shipped wake threshold, 10 dB: recall "
        f"{_percent(evaluation['wake_10db']['at_shipped_threshold']['recall'])}, "
        f"{evaluation['wake_10db']['at_shipped_threshold']['false_accepts_per_hour']:.2f} false accepts/hour "
        "(the first stage alone; the wake figures above are the first stage too).",
    ]
    if "two_stage" in evaluation["wake_10db"]:
        both = evaluation["wake_10db"]["two_stage"]
        lines.append(
            f"- What the device does, the first stage then the verifier, 10 dB: recall "
            f"{_percent(both['at_shipped_thresholds']['recall'])} at "
            f"{both['at_shipped_thresholds']['false_accepts_per_hour']:.2f} false accepts/hour at the shipped "
            f"thresholds; best recall at 0.5 false accepts/hour over verifier thresholds "
            f"{_percent(both['recall_at_0p5_fa_per_hour'])}."
        )
    if "int8_vs_float" in evaluation:
        pair = evaluation["int8_vs_float"]
        lines.append(
            f"- The always-on model's own command classes, int8 against float, top-1 at 10 dB: "
            f"{_percent(pair['always_on_command_top1_int8'])} vs {_percent(pair['always_on_command_top1_float'])}."
        )
    lines.append(
        f"- Inference: {evaluation['cost']['inference_us_per_window_median']:.0f} µs per window (median, LiteRT, "
        "one thread, the evaluation machine)."
    )
    lines += ["", "Targets (issue 3), at 10 dB on held-out voices:", ""]
    best_peer = max((p["wake_recall_at_0p5_fa_per_hour"] for p in evaluation["peers"].values()), default=0.0)
    targets = (
        ("wake recall at 0.5 false accepts/hour", evaluation["wake_recall_at_0p5_fa_per_hour"], 0.95),
        ("wake recall, against the best peer", evaluation["wake_recall_at_0p5_fa_per_hour"], best_peer),
        ("command top-1", evaluation["command_top1"], 0.95),
        ("local precision", evaluation["local_precision"] or 0.0, 0.99),
        ("local coverage", evaluation["local_coverage"], 0.80),
    )
    for name, value, target in targets:
        verdict = "met" if value >= target else f"missed by {100 * (target - value):.1f} points"
        lines.append(f"- {name}: {_percent(value)} against {_percent(target)}: {verdict}")
    size, inference = evaluation["cost"]["model_bytes"], evaluation["cost"]["inference_us_per_window_median"]
    lines.append(f"- int8 model size: {size} bytes against 100000: {'met' if size <= 100_000 else 'missed'}")
    met = "met" if inference <= 200 else "missed"
    lines.append(f"- inference per window: {inference:.0f} µs against 200 µs: {met}")
    lines += ["", "Per-class top-1 at 10 dB:", ""]
    lines += [f"- `{label}`: {_percent(value)}" for label, value in evaluation["command_top1_per_class"].items()]
    lines += ["", "![confusion matrix](confusion_matrix.png)", "", "![DET curve](det_curve.png)"]
    return lines


def write_model_card(model_dir: Path, recipe: Recipe) -> Path:
    """Write ``MODEL_CARD.md`` into ``model_dir``."""
    path = model_dir / "MODEL_CARD.md"
    path.write_text(render_model_card(model_dir, recipe))
    return path
