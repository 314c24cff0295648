"""What the cloud worker delivers on this machine, each figure beside a peer measured in the same run.

- real commands (with ``--fsdd DIR``; bench/real_commands.py): every FSDD clip through the worker's recogniser
  and intent decision, each speaker judged with a calibration fitted without them: right, wrong and no intent;
  what a device would act on at the floor; how well the confidence is calibrated; faster-whisper's own
  ``transcribe`` with text matching (the old way) on every Nth clip. Real words and phrases outside the
  vocabulary from Debian packages never used in a fit: the share given an intent. The same real clips alone
  and in shuffled batches beside other devices' clips: how many readings differ (the target is none).
  ``--write-calibration`` writes the calibration fitted on every speaker, with the floor found held out;
- wer: the worker's default recogniser (``Transcriber(AsrSettings(), load_vocabulary())``: tiny.en int8, no
  prompt, each utterance in its own window) over real read speech in batches of 8, as the service batches;
  reference and hypothesis normalised by Whisper's EnglishTextNormalizer, word error rate by jiwer over the
  whole corpus. Beside it: batches of 1, and faster-whisper's own ``transcribe`` on the same clips;
- rtf: ASR seconds per audio second, utterances one at a time (median over utterances), against faster-whisper's
  ``WhisperModel.transcribe(beam_size=1, language="en", without_timestamps=True)`` on the same model
  directory, int8, same threads; ours and the peer take turns on each clip, so both see the same load;
- round trip: a real Mosquitto (broker_config) and an ``UtteranceService`` with default settings but for its
  SQLite file; a device-side MqttLink sends corpus utterances of about 2 s (1.5 to 2.5 s, Opus as
  ``Utterance.from_samples`` encodes them) one at a time and waits for each result; timed from just before
  ``send()`` to the result's arrival, p50 and p95 after 3 warm-ups; peer: faster-whisper transcribing the
  same clip, without broker, Opus or storage;
- batch_speedup: 24 corpus utterances of 2 to 6 s published at once, time until all 24 results arrived, with
  the default batching (8 utterances, 50 ms window) and without (max_batch 1), everything else equal (one
  loaded model shared by both services); configurations alternate, medians over repeats; speedup is the
  time without over the time with.

Corpus: bench/read_speech.py; Asterisk prompts read by Allison Smith and LibriVox sentences, recordings of
people from Debian packages, none synthetic. Licences: Asterisk sounds CC-BY-SA 3.0; LibriVox public domain.
Progress and a summary go to stderr; the last line of stdout is one JSON object.
Run: .venv/bin/python bench/cloud.py [--fsdd DIR] [--takes N] [--quick] [--every N] [--roundtrips N] [--repeats N]
(about 4 minutes on the shared 2-core machine without --fsdd; the real-command section reads about 3,600 clips
once, half a second each, and caches the readings in .cache/bench/cloud_scores/)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jiwer
import numpy as np
from read_speech import Clip, load_corpus
from real_commands import (
    OTHER,
    answered,
    calibration_error,
    debian_recordings,
    floor_from,
    fsdd_recordings,
    held_out_speakers,
    isolation,
    judge,
    peer_intents,
    peer_shares,
    per_speaker,
    read_all,
    shares,
    with_floor,
)
from whisper_normalizer.english import EnglishTextNormalizer

from broker_config.broker import Broker
from cloud_worker.asr import AsrSettings, Transcriber, default_model_directory
from cloud_worker.calibration import fit, reliability
from cloud_worker.service import UtteranceService
from cloud_worker.settings import BatchSettings, WorkerSettings
from cloud_worker.storage import StorageSettings
from common.mqtt import BrokerSettings, MqttLink
from schemas.envelope import Envelope
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.topics import REPLY
from schemas.utterance import UploadReason, Utterance
from schemas.vocabulary import load_vocabulary

DEVICE_ID = "bench-cloud-device"
SERVICE_BATCH = BatchSettings().max_batch
"""Batch size of the WER pass: the service's default."""
ROUNDTRIP_S = (1.5, 2.5)
"""Lengths (seconds) of the clips sent one at a time."""
BURST_S = (2.0, 6.0)
"""Lengths (seconds) of the clips published at once."""
BURST = 24
"""Utterances published at once."""
WARMUPS = 3
"""Round trips before timing."""
RESULT_TIMEOUT_S = 120.0

TARGETS = {
    "wer": 0.05,
    "roundtrip_p50_ms": 500.0,
    "batch_speedup": 1.5,
    "fsdd_right_intent": 0.97,
    "fsdd_wrong_intent": 0.005,
    "out_of_vocabulary_given_intent": 0.02,
    "isolation_differ": 0,
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_normalise = EnglishTextNormalizer()


def word_errors(references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """Corpus word error rate, after Whisper's English normalisation of both sides, and its parts."""
    output = jiwer.process_words([_normalise(text) for text in references], [_normalise(text) for text in hypotheses])
    return {
        "wer": round(output.wer, 4),
        "substitutions": output.substitutions,
        "deletions": output.deletions,
        "insertions": output.insertions,
        "reference_words": output.hits + output.substitutions + output.deletions,
    }


class FasterWhisperPeer:
    """faster-whisper's own pipeline on the worker's model directory, int8, with the worker's threads."""

    def __init__(self, threads: int) -> None:
        from faster_whisper import WhisperModel

        directory = default_model_directory()
        self.name = f"faster-whisper WhisperModel.transcribe ({directory.name}, int8, {threads} threads)"
        self.model = WhisperModel(
            str(directory), device="cpu", compute_type="int8", cpu_threads=threads, local_files_only=True
        )

    def transcribe(self, samples: np.ndarray) -> str:
        segments, _ = self.model.transcribe(samples, beam_size=1, language="en", without_timestamps=True)
        return " ".join(segment.text.strip() for segment in segments).strip()


def in_batches(transcriber: Transcriber, clips: Sequence[Clip], size: int) -> tuple[list[str], float]:
    """Transcripts of ``clips`` in consecutive batches of ``size``, and the seconds it took."""
    texts = []
    started = time.perf_counter()
    for start in range(0, len(clips), size):
        texts += [
            transcript.text for transcript in transcriber.transcribe([c.samples for c in clips[start : start + size]])
        ]
    return texts, time.perf_counter() - started


def wer_figures(transcriber: Transcriber, clips: Sequence[Clip]) -> dict:
    references = [clip.text for clip in clips]
    audio_s = sum(clip.duration_s for clip in clips)
    texts, batched_s = in_batches(transcriber, clips, SERVICE_BATCH)
    log(f"  batches of {SERVICE_BATCH}: {batched_s:.1f} s")
    main = word_errors(references, texts)
    per_source = {}
    for source in sorted({clip.source for clip in clips}):
        chosen = [index for index, clip in enumerate(clips) if clip.source == source]
        per_source[source] = word_errors([references[i] for i in chosen], [texts[i] for i in chosen]) | {
            "n": len(chosen),
            "audio_s": round(sum(clips[i].duration_s for i in chosen), 1),
        }
    worst = sorted(
        zip(clips, texts, strict=True),
        key=lambda pair: -jiwer.wer(_normalise(pair[0].text), _normalise(pair[1])),
    )[:5]
    return {
        "wer": main["wer"],
        "wer_errors": main,
        "wer_per_source": per_source,
        "wer_batch": SERVICE_BATCH,
        "wer_worst": [
            {"name": f"{clip.source}/{clip.name}", "reference": clip.text, "hypothesis": text} for clip, text in worst
        ],
        "rtf_batches_of_8": round(batched_s / audio_s, 4),
    }


def one_at_a_time(transcriber: Transcriber, peer: FasterWhisperPeer, clips: Sequence[Clip]) -> dict:
    """Each clip alone through ours, then through the peer: timings and transcripts."""
    ours_rtf, peer_rtf, ours_texts, peer_texts = [], [], [], []
    ours_total = peer_total = 0.0
    for number, clip in enumerate(clips, 1):
        started = time.perf_counter()
        ours_texts.append(transcriber.transcribe([clip.samples])[0].text)
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        peer_texts.append(peer.transcribe(clip.samples))
        peer_s = time.perf_counter() - started
        ours_rtf.append(ours_s / clip.duration_s)
        peer_rtf.append(peer_s / clip.duration_s)
        ours_total += ours_s
        peer_total += peer_s
        if number % 20 == 0:
            log(f"  {number}/{len(clips)} clips one at a time")
    references = [clip.text for clip in clips]
    rtf, rtf_peer = statistics.median(ours_rtf), statistics.median(peer_rtf)
    audio_s = sum(clip.duration_s for clip in clips)
    return {
        "rtf": round(rtf, 4),
        "rtf_total": round(ours_total / audio_s, 4),
        "rtf_faster_whisper": round(rtf_peer, 4),
        "rtf_faster_whisper_total": round(peer_total / audio_s, 4),
        "rtf_to_faster_whisper_ratio": round(rtf / rtf_peer, 3),
        "rtf_to_faster_whisper_ratio_per_clip_median": round(
            statistics.median(o / p for o, p in zip(ours_rtf, peer_rtf, strict=True)), 3
        ),
        "wer_unbatched": word_errors(references, ours_texts)["wer"],
        "wer_faster_whisper": word_errors(references, peer_texts)["wer"],
    }


class DeviceSide:
    """The device's end of the broker: sends utterances and notes when each result arrives."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.link = MqttLink(DEVICE_ID, settings)
        self._arrived: dict[str, tuple[float, CloudReply]] = {}
        self._changed = threading.Condition()
        self.link.subscribe(REPLY.topic(device_id=DEVICE_ID), self._on_result)

    def _on_result(self, topic: str, envelope: Envelope) -> None:
        at = time.perf_counter()
        result = decode(topic, envelope)
        if isinstance(result, CloudReply):
            with self._changed:
                self._arrived[result.utterance_id] = (at, result)
                self._changed.notify_all()

    def wait_for(self, utterance_ids: Sequence[str]) -> list[tuple[float, CloudReply]]:
        """Arrival time and result of each utterance, in order; raises if one is missing or failed."""
        with self._changed:
            if not self._changed.wait_for(lambda: all(i in self._arrived for i in utterance_ids), RESULT_TIMEOUT_S):
                missing = sum(i not in self._arrived for i in utterance_ids)
                raise TimeoutError(f"{missing} of {len(utterance_ids)} results did not arrive in {RESULT_TIMEOUT_S} s")
            arrived = [self._arrived.pop(i) for i in utterance_ids]
        failed = [result for _, result in arrived if result.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} results failed, the first: {failed[0].error}")
        return arrived


def utterance(clip: Clip) -> Utterance:
    return Utterance.from_samples(
        DEVICE_ID, clip.samples, 16000, hypotheses=(), model_version=None, reason=UploadReason.OUT_OF_VOCABULARY
    )


@contextlib.contextmanager
def service(
    broker: BrokerSettings, storage_url: str, transcriber: Transcriber, batching: BatchSettings
) -> Iterator[UtteranceService]:
    """A worker with default settings but for broker, storage and batching, on an already loaded model."""
    settings = WorkerSettings(broker=broker, storage=StorageSettings(url=storage_url), batching=batching)
    running = UtteranceService(settings, transcriber=transcriber).start()
    try:
        yield running
    finally:
        running.stop()


def round_trips(device: DeviceSide, clips: Sequence[Clip], peer: FasterWhisperPeer, count: int) -> dict:
    latencies, peer_ms, references, texts = [], [], [], []
    worker_ms: dict[str, list[float]] = {"queue": [], "decode": [], "asr": [], "total": []}
    for number in range(WARMUPS + count):
        clip = clips[number % len(clips)]
        message = utterance(clip)
        started = time.perf_counter()
        device.link.send(message)
        [(at, result)] = device.wait_for([message.utterance_id])
        if number < WARMUPS:
            continue
        latencies.append(1000 * (at - started))
        for name, values in worker_ms.items():
            values.append(result.timings_ms[name])
        references.append(clip.text)
        texts.append(result.transcript or "")
        started = time.perf_counter()
        peer.transcribe(clip.samples)
        peer_ms.append(1000 * (time.perf_counter() - started))
    p50, peer_p50 = statistics.median(latencies), statistics.median(peer_ms)
    return {
        "roundtrip_p50_ms": round(p50, 1),
        "roundtrip_p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "roundtrip_max_ms": round(max(latencies), 1),
        "roundtrip_n": count,
        "roundtrip_clips": len(clips),
        "roundtrip_audio_s_median": round(statistics.median(clip.duration_s for clip in clips), 2),
        "roundtrip_worker_ms_median": {name: round(statistics.median(v), 1) for name, v in worker_ms.items()},
        "roundtrip_wer": word_errors(references, texts)["wer"],
        "roundtrip_peer_faster_whisper_ms": round(peer_p50, 1),
        "roundtrip_to_peer_ratio": round(p50 / peer_p50, 3),
    }


def burst_s(device: DeviceSide, clips: Sequence[Clip]) -> tuple[float, list[str]]:
    """Seconds from the first send until every result arrived, for ``clips`` published at once; transcripts."""
    messages = [utterance(clip) for clip in clips]
    started = time.perf_counter()
    for message in messages:
        device.link.send(message)
    arrived = device.wait_for([message.utterance_id for message in messages])
    return max(at for at, _ in arrived) - started, [result.transcript or "" for _, result in arrived]


def throughput(
    broker: BrokerSettings, folder: Path, transcriber: Transcriber, device: DeviceSide, clips: list[Clip], repeats: int
) -> dict:
    configurations = {"batched": BatchSettings(), "unbatched": BatchSettings(max_batch=1)}
    runs: dict[str, list[float]] = {name: [] for name in configurations}
    texts: dict[str, list[str]] = {}
    for repeat in range(repeats):
        # Alternate which goes first, so neither always follows the other on the shared machine.
        order = list(configurations) if repeat % 2 == 0 else list(reversed(configurations))
        for name in order:
            with service(broker, f"sqlite:///{folder / f'{name}.sqlite3'}", transcriber, configurations[name]):
                seconds, texts[name] = burst_s(device, clips)
            runs[name].append(seconds)
            log(f"  repeat {repeat + 1}/{repeats} {name}: {len(clips)} utterances in {seconds:.2f} s")
    batched, unbatched = statistics.median(runs["batched"]), statistics.median(runs["unbatched"])
    references = [clip.text for clip in clips]
    return {
        "batch_speedup": round(unbatched / batched, 3),
        "throughput_batched_utterances_per_s": round(len(clips) / batched, 3),
        "throughput_unbatched_utterances_per_s": round(len(clips) / unbatched, 3),
        "throughput_batched_s": round(batched, 3),
        "throughput_unbatched_s": round(unbatched, 3),
        "throughput_runs_s": {name: [round(value, 3) for value in values] for name, values in runs.items()},
        "throughput_utterances": len(clips),
        "throughput_audio_s": round(sum(clip.duration_s for clip in clips), 1),
        "throughput_repeats": repeats,
        "throughput_batch_settings": {
            name: {"max_batch": value.max_batch, "window_ms": value.window_ms} for name, value in configurations.items()
        },
        "throughput_wer_batched": word_errors(references, texts["batched"])["wer"],
        "throughput_wer_unbatched": word_errors(references, texts["unbatched"])["wer"],
    }


def real_commands(args: argparse.Namespace, transcriber: Transcriber, peer: FasterWhisperPeer) -> dict:
    """The real-command section (see bench/real_commands.py): FSDD held out by speaker, real non-commands,
    isolation, the peer."""
    from firmware_tools.building.real_speech import EVALUATION_PACKAGES, TRAINING_PACKAGES

    vocabulary = load_vocabulary()
    log("real commands: reading every clip (cached)")
    training = read_all(transcriber, debian_recordings(TRAINING_PACKAGES, vocabulary, args.debian_root), log, "fit")
    evaluation = read_all(
        transcriber, debian_recordings(EVALUATION_PACKAGES, vocabulary, args.debian_root), log, "evaluation"
    )
    fsdd = read_all(transcriber, fsdd_recordings(Path(args.fsdd), vocabulary, args.takes), log, "fsdd")
    log("  each FSDD speaker judged with a calibration fitted on the others")
    judged, calibrations = held_out_speakers(fsdd, training, vocabulary, log)
    shipped = fit([reading.sample() for reading in fsdd + training])
    training_judged = judge(training, shipped, vocabulary)
    floor = floor_from(judged + training_judged)
    if floor is None:
        raise SystemExit("error: no confidence floor reaches 99.5 % precision on the held-out answers")
    speakers = sorted({reading.recording.speaker for reading in fsdd})
    fitted_on = (
        f"FSDD, {len(fsdd)} clips by {len(speakers)} speakers ({', '.join(speakers)}), CC BY-SA 4.0; "
        f"{len(training)} voice lines of {', '.join(TRAINING_PACKAGES)}; floor from the speakers held out in turn"
    )
    shipped = with_floor(shipped, floor, fitted_on)
    if args.write_calibration:
        shipped.save(args.write_calibration)
        log(f"  wrote {args.write_calibration}: {shipped}")
    outside = [reading for reading in evaluation if reading.recording.truth == OTHER]
    inside = [reading for reading in evaluation if reading.recording.truth != OTHER]
    if not outside or not training:
        raise SystemExit(
            "error: no real non-commands found; install the voice packages first: "
            f"apt-get install {' '.join(TRAINING_PACKAGES + EVALUATION_PACKAGES)} (make bench-real-commands does)"
        )
    outside_judged = judge(outside, shipped, vocabulary)
    named = [j for j in outside_judged if j.intent_label is not None]
    log(f"  isolation: {args.isolation_batches} shuffled batches")
    isolated = isolation(
        transcriber,
        [reading.recording for reading in fsdd[:: max(1, len(fsdd) // 24)]][:24]
        + [reading.recording for reading in outside[:: max(1, len(outside) // 8)]][:8],
        args.isolation_batches,
    )
    log(f"  faster-whisper with text matching on every {args.peer_every}th clip")
    peer_fsdd = [reading.recording for reading in fsdd[:: args.peer_every]]
    peer_outside = [reading.recording for reading in outside[:: args.peer_every]]
    peer_fsdd_labels = peer_intents(peer_fsdd, vocabulary, peer.transcribe)
    peer_outside_labels = peer_intents(peer_outside, vocabulary, peer.transcribe)
    ours_on_peer_clips = [j for j in judged if j.reading.recording in set(peer_fsdd)]
    held_out = shares(judged, floor)
    return {
        "fsdd": held_out
        | {
            "speakers": speakers,
            "takes": args.takes,
            "measured_on": "real speech, FSDD; each speaker judged with a calibration fitted without them",
            "per_speaker": per_speaker(judged, floor),
            "calibration_per_held_out_speaker": {
                speaker: {"temperature": c.temperature, "other_bias": c.other_bias}
                for speaker, c in calibrations.items()
            },
            "calibration_error": calibration_error(judged),
            "reliability": reliability(answered(judged)),
            "peer_faster_whisper_text_matching": peer_shares(peer_fsdd, peer_fsdd_labels)
            | {"every": args.peer_every, "ours_on_the_same_clips": shares(ours_on_peer_clips, floor)},
        },
        "out_of_vocabulary": {
            "lines": len(outside),
            "packages": list(EVALUATION_PACKAGES),
            "measured_on": "real speech from Debian packages never used in a fit; words known and no phrase",
            "given_intent": round(len(named) / max(len(outside), 1), 4),
            "acted": round(sum(j.confidence >= floor for j in named) / max(len(outside), 1), 4),
            "examples": [
                {
                    "words": j.reading.recording.words,
                    "heard": j.reading.text,
                    "intent": j.intent_label,
                    "p": j.confidence,
                }
                for j in named[:12]
            ],
            "peer_faster_whisper_text_matching_given_intent": round(
                sum(label is not None for label in peer_outside_labels) / max(len(peer_outside), 1), 4
            ),
            "peer_lines": len(peer_outside),
            "in_vocabulary_lines": shares(judge(inside, shipped, vocabulary), floor),
        },
        "isolation": isolated,
        "act_floor": floor,
        "act_floor_precision_target": 0.995,
        "calibration_fitted_on_all": {"temperature": shipped.temperature, "other_bias": shipped.other_bias},
    }


def spread(clips: Sequence[Clip], count: int) -> list[Clip]:
    """``count`` clips taken evenly across ``clips`` (all of them if fewer)."""
    if len(clips) <= count:
        return list(clips)
    return [clips[index * len(clips) // count] for index in range(count)]


def real_summary(report: dict) -> str:
    fsdd, outside, isolated = report["fsdd"], report["out_of_vocabulary"], report["isolation"]
    peer = fsdd["peer_faster_whisper_text_matching"]
    return "\n".join(
        (
            f"real commands, FSDD {fsdd['clips']} clips by {len(fsdd['speakers'])} speakers, each held out:",
            f"  right {100 * fsdd['right_intent']:.1f}% (target 97%), wrong {100 * fsdd['wrong_intent']:.2f}%"
            f" (target 0.5%), none {100 * fsdd['no_intent']:.1f}%; calibration error {fsdd['calibration_error']}",
            f"  at the floor {report['act_floor']:.3f}: acted {100 * fsdd['acted']:.1f}%, precision"
            f" {fsdd['acted_precision']}",
            f"  faster-whisper + text matching (every {peer['every']}th clip): right {100 * peer['right_intent']:.1f}%,"
            f" wrong {100 * peer['wrong_intent']:.1f}%",
            f"  real non-commands: {outside['lines']} lines, given an intent {100 * outside['given_intent']:.1f}%"
            f" (target 2%), acted {100 * outside['acted']:.1f}%; faster-whisper + text matching"
            f" {100 * outside['peer_faster_whisper_text_matching_given_intent']:.1f}%",
            f"  isolation: {isolated['differ']} of {isolated['compared']} readings differ in batches (target 0)",
        )
    )


def summary(report: dict) -> str:
    passed = report["pass"]
    mark = {True: "ok", False: "MISSED"}
    return "\n".join(
        (
            f"cloud worker on {report['machine']['cpu_count']} cores, {report['n_utterances']} read-speech clips"
            f" ({report['audio_s']:.0f} s)",
            f"  WER {100 * report['wer']:.1f}% (target {100 * TARGETS['wer']:.0f}%, {mark[passed['wer']]});"
            " one at a time"
            f" {100 * report['wer_unbatched']:.1f}%,"
            f" faster-whisper {100 * report['wer_faster_whisper']:.1f}%",
            f"  RTF {report['rtf']:.3f} one at a time; faster-whisper {report['rtf_faster_whisper']:.3f}"
            f" (ratio {report['rtf_to_faster_whisper_ratio']:.2f})",
            f"  round trip p50 {report['roundtrip_p50_ms']:.0f} ms, p95 {report['roundtrip_p95_ms']:.0f} ms"
            f" (target 500 ms, {mark[passed['roundtrip_p50']]}); bare faster-whisper"
            f" {report['roundtrip_peer_faster_whisper_ms']:.0f} ms",
            f"  batching x{report['batch_speedup']:.2f} ({report['throughput_batched_utterances_per_s']:.2f} vs"
            f" {report['throughput_unbatched_utterances_per_s']:.2f} utterances/s; target x1.5,"
            f" {mark[passed['batch_speedup']]})",
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, help="WER and RTF over every Nth clip of the corpus (default 1)")
    parser.add_argument("--roundtrips", type=int, help=f"round trips timed after {WARMUPS} warm-ups (default 30)")
    parser.add_argument("--repeats", type=int, help="repeats of each throughput configuration (default 3)")
    parser.add_argument("--quick", action="store_true", help="defaults of every 3rd clip, 10 round trips, 1 repeat")
    parser.add_argument("--fsdd", help="FSDD directory ({digit}_{speaker}_{take}.flac): adds the real-command section")
    parser.add_argument("--takes", type=int, default=50, help="FSDD takes per speaker and digit (default: all 50)")
    parser.add_argument("--debian-root", default="/", help="where the Debian voice packages are installed")
    parser.add_argument("--isolation-batches", type=int, default=40, help="shuffled batches compared (default 40)")
    parser.add_argument("--peer-every", type=int, default=10, help="the peer reads every Nth real clip (default 10)")
    parser.add_argument("--write-calibration", help="write the calibration fitted on every FSDD speaker here")
    parser.add_argument("--skip-speed", action="store_true", help="only the real-command section")
    args = parser.parse_args()
    defaults = (3, 10, 1) if args.quick else (1, 30, 3)
    for name, default in zip(("every", "roundtrips", "repeats"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    started = time.monotonic()
    walls: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        walls[name] = round(time.monotonic() - since, 1)
        return time.monotonic()

    vocabulary = load_vocabulary()
    transcriber = Transcriber(AsrSettings(), vocabulary)
    peer = FasterWhisperPeer(transcriber.settings.cpu_threads)
    mark = lap("load", started)
    report: dict = {
        "bench": "cloud",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "model": transcriber.name,
        "asr_threads": transcriber.settings.cpu_threads,
        "peer": peer.name,
        "targets": TARGETS,
        "pass": {},
        "section_wall_s": walls,
    }
    if args.fsdd:
        real = real_commands(args, transcriber, peer)
        mark = lap("real_commands", mark)
        report |= real
        report["pass"] |= {
            "fsdd_right_intent": real["fsdd"]["right_intent"] >= TARGETS["fsdd_right_intent"],
            "fsdd_wrong_intent": real["fsdd"]["wrong_intent"] <= TARGETS["fsdd_wrong_intent"],
            "out_of_vocabulary_given_intent": real["out_of_vocabulary"]["given_intent"]
            <= TARGETS["out_of_vocabulary_given_intent"],
            "isolation_differ": real["isolation"]["differ"] == TARGETS["isolation_differ"],
        }
        log(real_summary(report))
    if not args.skip_speed:
        figures = speed(args, transcriber, peer, lap, mark)
        report["pass"] |= figures.pop("pass")
        report |= figures
        log(summary(report))
    report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))


def speed(args: argparse.Namespace, transcriber: Transcriber, peer: FasterWhisperPeer, lap, mark: float) -> dict:
    """WER on read speech, RTF, round trip and throughput against their peers."""
    corpus, debs = load_corpus(log=log)
    clips = corpus[:: args.every]
    audio_s = sum(clip.duration_s for clip in clips)
    log(f"corpus: {len(clips)} of {len(corpus)} clips, {audio_s:.0f} s of read speech")
    log("word error rate")
    wer = wer_figures(transcriber, clips)
    log(f"  WER {100 * wer['wer']:.2f}%")
    mark = lap("wer", mark)
    log("one at a time, against faster-whisper")
    single = one_at_a_time(transcriber, peer, clips)
    log(f"  RTF {single['rtf']:.4f}, faster-whisper {single['rtf_faster_whisper']:.4f}")
    mark = lap("one_at_a_time", mark)

    short = [clip for clip in corpus if ROUNDTRIP_S[0] <= clip.duration_s <= ROUNDTRIP_S[1]]
    burst = spread([clip for clip in corpus if BURST_S[0] <= clip.duration_s <= BURST_S[1]], BURST)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqvox-bench-")))
        broker = stack.enter_context(Broker(data_dir=folder / "broker"))
        settings = BrokerSettings(port=broker.port)
        device = DeviceSide(settings)
        stack.callback(device.link.close)
        log(f"round trip through Mosquitto on port {broker.port}")
        with service(settings, f"sqlite:///{folder / 'worker.sqlite3'}", transcriber, BatchSettings()):
            trips = round_trips(device, short, peer, args.roundtrips)
        log(f"  p50 {trips['roundtrip_p50_ms']} ms, p95 {trips['roundtrip_p95_ms']} ms")
        mark = lap("roundtrip", mark)
        log(f"throughput: {len(burst)} utterances at once, with and without batching")
        rate = throughput(settings, folder, transcriber, device, burst, args.repeats)
        mark = lap("throughput", mark)

    return {
        "quick": args.quick,
        "wer": wer["wer"],
        "rtf": single["rtf"],
        "roundtrip_p50_ms": trips["roundtrip_p50_ms"],
        "roundtrip_p95_ms": trips["roundtrip_p95_ms"],
        "batch_speedup": rate["batch_speedup"],
        "corpus": "bench/read_speech.py: Asterisk prompts read by Allison Smith (8 kHz, resampled to 16 kHz)"
        " and LibriVox Sense and Sensibility sentences, from Debian packages",
        "corpus_packages": debs,
        "corpus_every": args.every,
        "n_utterances": len(clips),
        "audio_s": round(audio_s, 1),
        "normaliser": "whisper_normalizer.english.EnglishTextNormalizer",
        **{key: value for key, value in wer.items() if key != "wer"},
        **{key: value for key, value in single.items() if key != "rtf"},
        **{key: value for key, value in trips.items() if key not in ("roundtrip_p50_ms", "roundtrip_p95_ms")},
        **{key: value for key, value in rate.items() if key != "batch_speedup"},
        "pass": {
            "wer": wer["wer"] <= TARGETS["wer"],
            "roundtrip_p50": trips["roundtrip_p50_ms"] <= TARGETS["roundtrip_p50_ms"],
            "batch_speedup": rate["batch_speedup"] >= TARGETS["batch_speedup"],
        },
    }


if __name__ == "__main__":
    main()
