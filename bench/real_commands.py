"""Real commands and real non-commands through the worker's recogniser, for bench/cloud.py.

- Commands: FSDD, real digits by 6 speakers (a data directory, ``--fsdd``). Every figure
  is on speakers the calibration never saw: each speaker in turn is held out, a
  calibration is fitted on the other five (with the training negatives), and the held-out
  speaker's clips are judged with it.
- Non-commands: voice lines of Debian game and education packages whose words are known
  and are no vocabulary phrase (firmware_tools/building/real_speech.py). The training packages
  feed the fit; the evaluation packages are only measured.
- Isolation: the same real clips transcribed alone and in shuffled batches beside other
  simulated devices' clips; every transcript and every phrase score must be equal.

Transcribing is the slow part (about half a second a clip on 2 cores), so each clip's
reading is cached in ``.cache/bench/cloud_scores/``, under a key made of the recogniser's
source, settings, model and vocabulary: any change to them reads everything again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

import cloud_worker.asr
from cloud_worker.asr import Transcriber
from cloud_worker.calibration import OTHER, Calibration, Sample, act_floor, fit, reliability
from cloud_worker.intents import IntentDecider
from cloud_worker.transcript import PhraseScores, Transcript
from common.text_matching import IntentMatch, IntentMatcher
from firmware_tools.building.fsdd import fsdd_clips
from schemas.vocabulary import Command, Vocabulary, vocabulary_sha256

CACHE = Path(".cache/bench/cloud_scores")
BATCH = 8
"""Clips transcribed together while scoring: the service's default batch."""


@dataclass(frozen=True)
class Recording:
    """One clip to judge: where it is, who said it, and what it is."""

    key: str
    """The file (or archive member) it was read from: its cache key."""
    speaker: str
    """FSDD speaker, or the Debian package and voice."""
    truth: str
    """Command label, or ``OTHER`` for a non-command."""
    words: str | None
    """What is said, when known."""
    read: Callable[[], np.ndarray]
    """The audio, mono float32 at 16 kHz."""


@dataclass(frozen=True)
class Reading:
    """A recording and what the recogniser made of it."""

    recording: Recording
    text: str
    phrases: PhraseScores

    def sample(self) -> Sample:
        return Sample(self.phrases, self.recording.truth)


def fsdd_recordings(directory: Path, vocabulary: Vocabulary, takes: int = 50) -> list[Recording]:
    """FSDD's clips of the first ``takes`` takes, in take order (so a shorter run spans every speaker)."""
    labels = {command.slots.get("value"): command.label for command in vocabulary.commands if command.intent == "digit"}
    try:
        clips = fsdd_clips(directory, takes)
    except FileNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    return [
        Recording(
            key=str(clip.path), speaker=clip.speaker, truth=labels[clip.digit], words=str(clip.digit), read=clip.read
        )
        for clip in clips
    ]


def debian_recordings(packages: Iterable[str], vocabulary: Vocabulary, root: str = "/") -> list[Recording]:
    """Voice lines of ``packages`` whose words are known: non-commands, and the few that say a phrase."""
    from firmware_tools.building.real_speech import VocabularyCheck, find_voice_lines

    check = VocabularyCheck(vocabulary)
    chosen = []
    for line in find_voice_lines(packages=tuple(packages), root=root):
        if line.words is None:
            continue  # unknown words may be a command ("No!"): neither a positive nor a negative
        chosen.append(
            Recording(
                key=line.location,
                speaker=f"{line.package}/{line.voice}",
                truth=check.label(line.words) or OTHER,
                words=line.words,
                read=line.read,
            )
        )
    return chosen


def cache_file(transcriber: Transcriber, vocabulary_path: str | None = None) -> Path:
    """Where readings by this recogniser are cached: keyed by its code, settings, model and vocabulary."""
    settings = {key: value for key, value in asdict(transcriber.settings).items() if key != "cpu_threads"}
    identity = json.dumps(
        {
            "asr": hashlib.sha256(Path(cloud_worker.asr.__file__).read_bytes()).hexdigest(),
            "settings": settings,
            "model": transcriber.name,
            "vocabulary": vocabulary_sha256(vocabulary_path),
        },
        sort_keys=True,
    )
    return CACHE / f"{hashlib.sha256(identity.encode()).hexdigest()[:16]}.jsonl"


def read_all(
    transcriber: Transcriber, recordings: Sequence[Recording], log: Callable[[str], None], what: str
) -> list[Reading]:
    """Every recording's reading, from the cache or transcribed (and cached) in batches."""
    path = cache_file(transcriber)
    cached: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            cached[record["key"]] = record
    missing = [recording for recording in recordings if recording.key not in cached]
    log(f"  {what}: {len(recordings) - len(missing)} cached in {path}, {len(missing)} to transcribe")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for start in range(0, len(missing), BATCH):
            chunk = missing[start : start + BATCH]
            for recording, transcript in zip(chunk, transcriber.transcribe([r.read() for r in chunk]), strict=True):
                record = {"key": recording.key, "text": transcript.text, "phrases": transcript.phrases.to_dict()}
                cached[recording.key] = record
                out.write(json.dumps(record) + "\n")
            out.flush()
            if (start // BATCH) % 25 == 24:
                log(f"    {start + len(chunk)}/{len(missing)}")
    return [
        Reading(recording, cached[recording.key]["text"], PhraseScores.from_dict(cached[recording.key]["phrases"]))
        for recording in recordings
    ]


@dataclass(frozen=True)
class Judged:
    """One reading judged with a calibration the reading's speaker did not shape."""

    reading: Reading
    intent_label: str | None
    """The command label answered, or None."""
    confidence: float

    @property
    def right(self) -> bool:
        return self.intent_label == self.reading.recording.truth or (
            self.intent_label is None and self.reading.recording.truth == OTHER
        )


def judge(readings: Sequence[Reading], calibration: Calibration, vocabulary: Vocabulary) -> list[Judged]:
    decider = IntentDecider(vocabulary, calibration)
    judged = []
    for reading in readings:
        match = decider.decide(Transcript(reading.text, (), "cached", reading.phrases))
        judged.append(Judged(reading, _label(match), match.score))
    return judged


def shares(judged: Sequence[Judged], floor: float | None = None) -> dict:
    """Right, wrong and no intent as shares of the clips; with a floor, what a device would act on."""
    count = max(len(judged), 1)
    named = [j for j in judged if j.intent_label is not None]
    figures = {
        "clips": len(judged),
        "right_intent": round(sum(j.right for j in named) / count, 4),
        "wrong_intent": round(sum(not j.right for j in named) / count, 4),
        "no_intent": round((len(judged) - len(named)) / count, 4),
    }
    if floor is not None:
        acted = [j for j in named if j.confidence >= floor]
        figures |= {
            "acted": round(len(acted) / count, 4),
            "acted_wrong": round(sum(not j.right for j in acted) / count, 4),
            "acted_precision": round(sum(j.right for j in acted) / len(acted), 4) if acted else None,
        }
    return figures


def held_out_speakers(
    fsdd: Sequence[Reading], training_negatives: Sequence[Reading], vocabulary: Vocabulary, log: Callable[[str], None]
) -> tuple[list[Judged], dict[str, Calibration]]:
    """Each FSDD speaker judged with a calibration fitted on the other speakers and the training negatives."""
    judged: list[Judged] = []
    calibrations = {}
    for speaker in sorted({reading.recording.speaker for reading in fsdd}):
        others = [reading.sample() for reading in fsdd if reading.recording.speaker != speaker]
        calibration = fit(others + [reading.sample() for reading in training_negatives])
        calibrations[speaker] = calibration
        held = [reading for reading in fsdd if reading.recording.speaker == speaker]
        judged_here = judge(held, calibration, vocabulary)
        judged += judged_here
        log(
            f"    {speaker} held out: temperature {calibration.temperature}, bias {calibration.other_bias};"
            f" right {sum(j.right and j.intent_label is not None for j in judged_here)}/{len(held)}"
        )
    return judged, calibrations


def isolation(
    transcriber: Transcriber, recordings: Sequence[Recording], batches: int, seed: int = 7
) -> dict[str, int | list]:
    """Each recording alone, then in ``batches`` shuffled batches of 2 to 8 beside other devices' clips."""
    rng = random.Random(seed)
    audio = {recording.key: recording.read() for recording in recordings}
    alone = {key: transcriber.transcribe([samples])[0] for key, samples in audio.items()}
    keys = list(audio)
    compared = differ = 0
    examples = []
    for _ in range(batches):
        chosen = rng.sample(keys, rng.randint(2, min(BATCH, len(keys))))
        for key, transcript in zip(chosen, transcriber.transcribe([audio[key] for key in chosen]), strict=True):
            compared += 1
            if transcript != alone[key]:
                differ += 1
                if len(examples) < 5:
                    examples.append({"clip": key, "alone": alone[key].text, "in_batch": transcript.text})
    return {"clips": len(keys), "batches": batches, "compared": compared, "differ": differ, "examples": examples}


def peer_intents(
    recordings: Sequence[Recording], vocabulary: Vocabulary, transcribe: Callable[[np.ndarray], str]
) -> list[str | None]:
    """The command label that text matching gives a peer's transcript of each recording (the old way)."""
    matcher = IntentMatcher(vocabulary)
    return [_label(matcher.match(transcribe(recording.read()))) for recording in recordings]


def _label(match: IntentMatch) -> str | None:
    """The command label of a match ('digit[value=7]'), or None without an intent."""
    return None if match.intent is None else Command(match.intent, match.slots, ()).label


def peer_shares(recordings: Sequence[Recording], labels: Sequence[str | None]) -> dict:
    count = max(len(recordings), 1)
    right = sum(label is not None and label == r.truth for r, label in zip(recordings, labels, strict=True))
    wrong = sum(label is not None and label != r.truth for r, label in zip(recordings, labels, strict=True))
    return {
        "clips": len(recordings),
        "right_intent": round(right / count, 4),
        "wrong_intent": round(wrong / count, 4),
        "no_intent": round((len(recordings) - right - wrong) / count, 4),
    }


def per_speaker(judged: Sequence[Judged], floor: float) -> dict[str, dict]:
    speakers = sorted({j.reading.recording.speaker for j in judged})
    return {s: shares([j for j in judged if j.reading.recording.speaker == s], floor) for s in speakers}


def answered(judged: Sequence[Judged]) -> list[tuple[float, bool]]:
    """(confidence, right) of the answers that name an intent: what a device could act on."""
    return [(j.confidence, j.right) for j in judged if j.intent_label is not None]


def calibration_error(judged: Sequence[Judged]) -> float:
    """Expected calibration error of the answers that name an intent: |confidence - share right|, weighted."""
    table = reliability(answered(judged))
    total = sum(row["count"] for row in table)
    return round(sum(row["count"] * abs(row["mean_confidence"] - row["right"]) for row in table) / max(total, 1), 4)


def floor_from(judged: Sequence[Judged], precision: float = 0.995) -> float | None:
    return act_floor(answered(judged), precision)


def with_floor(calibration: Calibration, floor: float, fitted_on: str) -> Calibration:
    return replace(calibration, act_floor=round(floor, 4), fitted_on=fitted_on)
