"""What the cloud worker delivers on this machine, each figure beside a peer measured in the same run.

- wer: the worker's default recogniser (``Transcriber(AsrSettings(), load_vocabulary())``: tiny.en int8, the
  vocabulary prompt, packing on) over real read speech in batches of 8, as the service batches; reference and
  hypothesis normalised by Whisper's EnglishTextNormalizer, word error rate by jiwer over the whole corpus.
  Beside it: batches of 1, no prompt, and faster-whisper's own ``transcribe`` on the same clips;
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
Run: .venv/bin/python bench/cloud.py [--quick] [--every N] [--roundtrips N] [--repeats N]
(about 4 minutes on the shared 2-core machine; --quick: every 3rd clip for WER, 10 round trips, 1 repeat: under 2)
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
from whisper_normalizer.english import EnglishTextNormalizer

from broker_config.broker import Broker
from cloud_worker.asr import AsrSettings, Transcriber, default_model_directory
from cloud_worker.service import UtteranceService
from cloud_worker.settings import BatchSettings, WorkerSettings
from cloud_worker.storage import StorageSettings
from schemas.envelope import Envelope
from schemas.mqtt import BrokerSettings, MqttLink
from schemas.protocol import decode
from schemas.result import Result
from schemas.topics import RESULT
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

TARGETS = {"wer": 0.06, "roundtrip_p50_ms": 500.0, "batch_speedup": 1.5}


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


def wer_figures(transcriber: Transcriber, unprompted: Transcriber, clips: Sequence[Clip]) -> dict:
    references = [clip.text for clip in clips]
    audio_s = sum(clip.duration_s for clip in clips)
    texts, batched_s = in_batches(transcriber, clips, SERVICE_BATCH)
    log(f"  batches of {SERVICE_BATCH}: {batched_s:.1f} s")
    plain, _ = in_batches(unprompted, clips, SERVICE_BATCH)
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
        "wer_no_prompt": word_errors(references, plain)["wer"],
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
        self._arrived: dict[str, tuple[float, Result]] = {}
        self._changed = threading.Condition()
        self.link.subscribe(RESULT.topic(device_id=DEVICE_ID), self._on_result)

    def _on_result(self, topic: str, envelope: Envelope) -> None:
        at = time.perf_counter()
        result = decode(topic, envelope)
        if isinstance(result, Result):
            with self._changed:
                self._arrived[result.utterance_id] = (at, result)
                self._changed.notify_all()

    def wait_for(self, utterance_ids: Sequence[str]) -> list[tuple[float, Result]]:
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


def spread(clips: Sequence[Clip], count: int) -> list[Clip]:
    """``count`` clips taken evenly across ``clips`` (all of them if fewer)."""
    if len(clips) <= count:
        return list(clips)
    return [clips[index * len(clips) // count] for index in range(count)]


def summary(report: dict) -> str:
    passed = report["pass"]
    mark = {True: "ok", False: "MISSED"}
    return "\n".join(
        (
            f"cloud worker on {report['machine']['cpu_count']} cores, {report['n_utterances']} read-speech clips"
            f" ({report['audio_s']:.0f} s)",
            f"  WER {100 * report['wer']:.1f}% (target 6%, {mark[passed['wer']]}); one at a time"
            f" {100 * report['wer_unbatched']:.1f}%, no prompt {100 * report['wer_no_prompt']:.1f}%,"
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

    corpus, debs = load_corpus(log=log)
    clips = corpus[:: args.every]
    audio_s = sum(clip.duration_s for clip in clips)
    log(f"corpus: {len(clips)} of {len(corpus)} clips, {audio_s:.0f} s of read speech")
    vocabulary = load_vocabulary()
    transcriber = Transcriber(AsrSettings(), vocabulary)
    unprompted = Transcriber(AsrSettings(prompt=None), vocabulary)
    peer = FasterWhisperPeer(transcriber.settings.cpu_threads)
    mark = lap("load", started)

    log("word error rate")
    wer = wer_figures(transcriber, unprompted, clips)
    log(f"  WER {100 * wer['wer']:.2f}%, no prompt {100 * wer['wer_no_prompt']:.2f}%")
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

    report = {
        "bench": "cloud",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "quick": args.quick,
        "wer": wer["wer"],
        "rtf": single["rtf"],
        "roundtrip_p50_ms": trips["roundtrip_p50_ms"],
        "roundtrip_p95_ms": trips["roundtrip_p95_ms"],
        "batch_speedup": rate["batch_speedup"],
        "model": transcriber.name,
        "asr_threads": transcriber.settings.cpu_threads,
        "peer": peer.name,
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
        "targets": TARGETS,
        "pass": {
            "wer": wer["wer"] <= TARGETS["wer"],
            "roundtrip_p50": trips["roundtrip_p50_ms"] <= TARGETS["roundtrip_p50_ms"],
            "batch_speedup": rate["batch_speedup"] >= TARGETS["batch_speedup"],
        },
        "section_wall_s": walls,
        "wall_s": round(time.monotonic() - started, 1),
    }
    log(summary(report))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
