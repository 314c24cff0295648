"""Device recognition on real voices: FSDD speakers never trained on, real non-commands, false wakes on real speech.

Every figure comes from the device's own ``ListeningPipeline``, the code ``python -m
device detect`` and the running device use.

- Commands: FSDD (``--fsdd DIR``), real digits by 6 speakers. The shipped head trained
  on all six, so it is not measured on them. Instead, the training run keeps one int8
  head per speaker, trained without that speaker (``<work>/head/folds/<speaker>.tflite``,
  ``firmware_tools head``), and each speaker's clips are judged by the package with its
  own fold's head: leave-one-speaker-out, every speaker once. Each clip is one
  utterance (``--skip-wake``). Closed-set top-1 is the best command among the three best
  classes the pipeline reports (a clip whose three best are no command counts wrong);
  open-set top-1 is the best class of all. The always-on model alone (the release
  before the head) is measured on the same clips beside it.
- Real non-commands: the voice lines of the evaluation Debian packages whose words are
  known and are no vocabulary phrase (firmware_tools/building/real_speech.py); the share the
  device decides as a command.
- False wakes: every evaluation-only real recording this machine has, streamed through
  the pipeline as a device hears it: the evaluation packages' voice lines, the Asterisk
  prompts (asterisk-core-sounds-en-wav), pocketsphinx's test recordings and codec2's
  speech samples (codec2-examples), with a
  second of silence between files. microWakeWord and openWakeWord hear the same audio
  (``firmware_tools/building/peers.py``, their own thresholds: 0.97 and 0.5, with our refractory
  period). The always-on CPU per audio second counts the verifier's runs at the trigger
  rate this speech causes; microWakeWord's is measured on the same audio in the same run.
- Sizes of the models, and peak RSS of ``python -m device detect`` over the committed samples in a
  child process (VmHWM, as bench/device_cpu.py measures it).

The held-out synthetic voices (wake recall, commands at 10 and 5 dB) are measured by
``make evaluate`` (firmware_tools/building/evaluate.py), which runs the same package.

Progress goes to stderr; the last line of stdout is one JSON object.
Run: .venv/bin/python bench/real_voices.py --fsdd DIR [--work-dir .cache/train/default] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from device_cpu import blocks, peak_rss

from common.recording import read_recording
from device.command_head import CommandHead
from device.detector import (
    NON_COMMAND_LABELS,
    WakeEvent,
    count_wakes,
)
from device.inference import TfliteClassifier
from device.local_model import LocalModel, load_local_model
from device.pipeline import CommandEvent, ListeningPipeline
from device.settings import CaptureSettings, DenoiseMode
from device.speech_embedding import SpeechEmbedding, embedding_directory
from firmware_tools.building.fsdd import fsdd_clips
from firmware_tools.building.real_speech import (
    EVALUATION_PACKAGES,
    VocabularyCheck,
    evaluation_speech,
    find_voice_lines,
)
from schemas.vocabulary import load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
PEER_THRESHOLDS = {"microwakeword": 0.97, "openwakeword": 0.5}
"""Each peer's own default detection threshold (ESPHome's hey_jarvis manifest; openWakeWord's default)."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_utterance(model: LocalModel, audio: np.ndarray) -> CommandEvent:
    """The pipeline's one event for a recording taken as one utterance, as ``device detect --skip-wake``."""
    pipeline = ListeningPipeline(model, CaptureSettings(), DenoiseMode.UTTERANCE, skip_wake=True)
    events = [event for block in blocks(audio) for event in pipeline.push(block)] + pipeline.finish()
    (event,) = [event for event in events if isinstance(event, CommandEvent)]
    return event


def command_figures(events: list[tuple[CommandEvent, str]]) -> dict:
    """Closed-set and open-set top-1, share decided on the device and its precision."""
    closed = open_set = decided = right_decided = 0
    for event, truth in events:
        commands = [a.label for a in event.alternatives if a.label not in NON_COMMAND_LABELS and a.intent is not None]
        closed += bool(commands) and commands[0] == truth
        open_set += event.alternatives[0].label == truth
        if event.local:
            decided += 1
            right_decided += event.decision.label == truth
    count = len(events)
    return {
        "clips": count,
        "closed_set_top1": round(closed / count, 4),
        "open_set_top1": round(open_set / count, 4),
        "decided_on_device": round(decided / count, 4),
        "precision_when_decided": round(right_decided / decided, 4) if decided else None,
    }


def fsdd_commands(model: LocalModel, fsdd_dir: Path, folds_dir: Path, takes: int) -> dict:
    """Every FSDD speaker judged by the fold head that never heard them, and by the always-on model alone."""
    vocabulary = load_vocabulary()
    label_of = {int(c.slots["value"]): c.label for c in vocabulary.commands if c.intent == "digit"}
    clips = fsdd_clips(fsdd_dir, takes=takes)
    embedding = model.head.embedding if model.head is not None else SpeechEmbedding()
    by_speaker: dict[str, list] = {}
    baseline: list = []
    always_on = replace(model, head=None)
    for speaker in sorted({clip.speaker for clip in clips}):
        fold_path = folds_dir / f"{speaker}.tflite"
        if not fold_path.is_file():
            raise SystemExit(f"error: no head trained without {speaker}: {fold_path} (run firmware_tools head)")
        fold = replace(model, head=CommandHead(TfliteClassifier(fold_path), embedding))
        started = time.monotonic()
        for clip in (clip for clip in clips if clip.speaker == speaker):
            audio = clip.read(RATE)
            truth = label_of[clip.digit]
            by_speaker.setdefault(speaker, []).append((one_utterance(fold, audio), truth))
            baseline.append((one_utterance(always_on, audio), truth))
        log(f"fsdd {speaker}: {command_figures(by_speaker[speaker])} ({time.monotonic() - started:.0f} s)")
    every = [pair for pairs in by_speaker.values() for pair in pairs]
    return {
        "measured_on": "FSDD real speakers, each judged by a head trained without them (leave one speaker out)",
        **command_figures(every),
        "per_speaker": {speaker: command_figures(pairs) for speaker, pairs in by_speaker.items()},
        # Its own command threshold went with the release before the head, so only its top-1 compares.
        "always_on_model_alone": {key: command_figures(baseline)[key] for key in ("closed_set_top1", "open_set_top1")},
    }


def non_commands(model: LocalModel) -> dict:
    """Evaluation packages' voice lines whose words are no vocabulary phrase: how many the device decides."""
    check = VocabularyCheck(load_vocabulary())
    lines = [
        line
        for line in find_voice_lines(packages=EVALUATION_PACKAGES)
        if line.words is not None and check.label(line.words) is None
    ]
    if not lines:
        raise SystemExit(
            f"error: no voice lines of {', '.join(EVALUATION_PACKAGES)}: install them (make bench-real-voices)"
        )
    decided = []
    for line in lines:
        event = one_utterance(model, line.read(RATE))
        if event.local:
            decided.append({"line": line.location, "words": line.words, "taken_for": event.decision.label})
    return {
        "measured_on": f"voice lines of {', '.join(EVALUATION_PACKAGES)} (never trained on) saying no command",
        "lines": len(lines),
        "decided_on_device": round(len(decided) / len(lines), 4),
        "decided_examples": decided[:10],
    }


def false_wakes(model: LocalModel, quick: bool) -> dict:
    """Wakes on real speech that never says the wake phrase, for us and both peers, and the always-on CPU."""
    from firmware_tools.building.peers import load_peers

    peers = load_peers()
    gap = np.zeros(RATE, np.float32)
    pipeline = ListeningPipeline(model, CaptureSettings(), DenoiseMode.UTTERANCE)
    seconds_by_source: dict[str, float] = {}
    wakes, our_cpu = 0, 0.0
    peer_wakes = dict.fromkeys(peers, 0)
    peer_cpu = dict.fromkeys(peers, 0.0)
    refractory = model.package.detection.refractory_s
    head_runs_before = model.head.runs if model.head is not None else 0
    for source, audio in evaluation_speech(8 if quick else 1, RATE):
        stream = np.concatenate((audio, gap))
        seconds_by_source[source] = seconds_by_source.get(source, 0.0) + len(stream) / RATE
        started = time.process_time()
        for block in blocks(stream):
            wakes += sum(isinstance(event, WakeEvent) for event in pipeline.push(block))
        our_cpu += time.process_time() - started
        for name, peer in peers.items():
            scored = peer.score(stream)
            peer_cpu[name] += scored.cpu_s
            peer_wakes[name] += count_wakes(scored.scores, PEER_THRESHOLDS[name], scored.step_s, refractory)
    hours = sum(seconds_by_source.values()) / 3600
    verifier_runs = (model.head.runs - head_runs_before) if model.head is not None else 0
    audio_s = hours * 3600
    return {
        "measured_on": "real speech kept for evaluation (never trained on), no wake phrase in it",
        "hours": round(hours, 3),
        "hours_by_source": {source: round(seconds / 3600, 3) for source, seconds in seconds_by_source.items()},
        "false_wakes_per_hour": round(wakes / hours, 3),
        "false_wakes": wakes,
        "first_stage_triggers": wakes + pipeline.rejected_wakes,
        "rejected_by_verifier": pipeline.rejected_wakes,
        "verifier_runs_per_hour": round(verifier_runs / hours, 2),
        "peers": {
            name: {
                "false_wakes_per_hour": round(count / hours, 3),
                "false_wakes": count,
                "threshold": PEER_THRESHOLDS[name],
            }
            for name, count in peer_wakes.items()
        },
        "always_on_cpu_ms_per_audio_s": round(1000 * our_cpu / audio_s, 3),
        "always_on_cpu_includes": "front end, always-on model, verifier runs at this speech's trigger rate, and the "
        "command stage after each wake that stood (RNNoise on the utterance)",
        "microwakeword_cpu_ms_per_audio_s": round(1000 * peer_cpu["microwakeword"] / audio_s, 3),
        "cpu_ratio_to_microwakeword": round(our_cpu / peer_cpu["microwakeword"], 3),
    }


def sizes(model: LocalModel) -> dict:
    training = json.loads((model.directory / "training.json").read_text())
    return {
        "package_model_bytes": model.package.size_bytes,
        "always_on_model_bytes": training.get("always_on_size_bytes", model.package.size_bytes),
        "head_bytes": (training.get("head") or {}).get("size_bytes"),
        "speech_embedding_bytes": sum(path.stat().st_size for path in embedding_directory().glob("*.tflite")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, help="FSDD recordings (a data directory); without it, no command figures")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache/train/default", help="training work directory")
    parser.add_argument("--model", type=Path, help="model package (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="10 takes per speaker and digit, an eighth of the speech")
    parser.add_argument(
        "--write", action="store_true", help="also write real_voices.json into the model package (for its model card)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    model = load_local_model(args.model)
    report: dict = {"model": model.version}
    report["fsdd_unseen_speakers"] = fsdd_commands(
        model, args.fsdd, args.work_dir / "head" / "folds", 10 if args.quick else 50
    )
    log("non-commands")
    report["real_non_commands"] = non_commands(model)
    log("false wakes")
    report["false_wakes"] = false_wakes(model, args.quick)
    report["sizes"] = sizes(model)
    # The committed samples: each wakes the device and is decided, so both stages and the embedding are loaded.
    samples = np.concatenate([read_recording(path) for path in sorted((ROOT / "samples").glob("*.flac"))])
    with tempfile.TemporaryDirectory() as folder:
        report["peak_rss"] = peak_rss(samples, Path(folder))
    report["quick"] = args.quick
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.write:
        (model.directory / "real_voices.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
