"""The fleet's training data: what consenting devices' users said, labelled by the cloud, curated for the head.

The worker keeps the utterances of devices whose owners allow it
(``[cloud] share_for_training``), each with the cloud's answer and its calibrated
confidence (common/worker_database.py, ``WorkerDatabase.contributions``). :func:`curate` turns
them into examples:

- a command the cloud named at ``min_confidence`` or above is an example of its label;
  the cloud's confidence that no command was said, at the same floor, makes an example
  of other speech (a negative); anything less sure is left out, so a wrong cloud answer
  rarely becomes a wrong label (the floor is the one the device acts at: about 99.5 %
  of the cloud's answers at it are right on real speakers it never fitted on);
- at most ``max_per_device_label`` examples per device and label, so one chatty device
  or one favourite command does not dominate;
- a held-out slice per device, chosen by a hash of the utterance, so the same utterance
  stays on the same side from round to round: it judges a new model (the gate) and is
  never trained on.

Each example's window is the one the device's head reads: two seconds centred on the
speech, found by the device's own capture (device/capture.py) on the audio as uploaded.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.opus import decode_opus
from common.worker_database import Contribution
from device.capture import CapturedUtterance, UtteranceCapture
from device.detector import centred_window
from device.settings import CLOUD_MIN_CONFIDENCE, CaptureSettings
from firmware_tools.building.command_head import WINDOW_SAMPLES
from firmware_tools.building.phrases import UNKNOWN_LABEL
from schemas.errors import ProtocolError
from schemas.vocabulary import Vocabulary

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class CurateSettings:
    """Which contributions become examples, and which of them judge instead of teach."""

    min_confidence: float = CLOUD_MIN_CONFIDENCE
    """Cloud answers (a command, or that no command was said) below this calibrated confidence are left out."""
    max_per_device_label: int = 40
    """Most training examples of one label from one device; the newest are kept."""
    held_out_share: float = 0.3
    """Share of each device's utterances kept for judging a new model, never trained on (by a hash of its id)."""
    negatives: bool = True
    """Whether utterances the cloud is sure hold no command become examples of other speech."""
    devices: tuple[str, ...] = ()
    """Only these devices' contributions (a per-site or per-device model); empty for every device."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], not {self.min_confidence}")
        if self.max_per_device_label < 1:
            raise ValueError(f"max_per_device_label must be at least 1, not {self.max_per_device_label}")
        if not 0.0 < self.held_out_share < 1.0:
            raise ValueError(f"held_out_share must be between 0 and 1, not {self.held_out_share}")


@dataclass(frozen=True)
class FleetExample:
    """One curated utterance: who said it, what the cloud says it is, and the head's window of it."""

    device_id: str
    utterance_id: str
    label: str
    """Model label: a command's, or other speech."""
    confidence: float
    """The cloud's calibrated confidence in the label."""
    window: np.ndarray
    """WINDOW_SAMPLES samples at 16 kHz, centred on the speech as the device centres it."""
    held_out: bool
    """Kept for judging, never trained on."""


@dataclass(frozen=True)
class FleetDataset:
    """What curation kept, and why the rest was left out."""

    examples: tuple[FleetExample, ...]
    left_out: Counter = field(default_factory=Counter)
    """Contributions not used, by reason."""

    def split(self, held_out: bool) -> tuple[FleetExample, ...]:
        return tuple(example for example in self.examples if example.held_out == held_out)

    def counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """Per device: examples per label, for training and held out (what a model card reports: never audio)."""
        table: dict[str, dict[str, dict[str, int]]] = {}
        for example in self.examples:
            side = "held_out" if example.held_out else "train"
            per_device = table.setdefault(example.device_id, {"train": {}, "held_out": {}})
            per_device[side][example.label] = per_device[side].get(example.label, 0) + 1
        return {device: table[device] for device in sorted(table)}


def is_held_out(device_id: str, utterance_id: str, share: float) -> bool:
    """Whether this utterance judges rather than teaches: a stable hash, the same in every round."""
    digest = hashlib.sha256(f"{device_id}/{utterance_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def label_of(contribution: Contribution, vocabulary: Vocabulary) -> str | None:
    """The model label of the cloud's answer: a command's, other speech, or None when it names no known command."""
    if contribution.intent is None:
        return UNKNOWN_LABEL
    command = vocabulary.command_for(contribution.intent, contribution.slots)
    return command.label if command is not None else None


def speech_window(audio: np.ndarray, capture: CaptureSettings | None = None) -> np.ndarray:
    """The head's window of an uploaded utterance: centred on its speech, as the device's capture finds it."""
    stage = UtteranceCapture(capture or CaptureSettings(), start_s=0.0, after_wake=False, sample_rate=SAMPLE_RATE)
    block = SAMPLE_RATE * 30 // 1000
    captured = None
    for start in range(0, len(audio), block):
        outcome = stage.push(audio[start : start + block])
        if isinstance(outcome, CapturedUtterance):
            captured = outcome
            break
    captured = captured or stage.finish(whole_if_silent=True)
    if captured is None:
        return centred_window(audio, 0, len(audio), WINDOW_SAMPLES)
    return centred_window(captured.audio, captured.speech_start, captured.speech_end, WINDOW_SAMPLES)


def curate(contributions: Sequence[Contribution], vocabulary: Vocabulary, settings: CurateSettings) -> FleetDataset:
    """The fleet's examples: sure answers only, balanced per device and label, with a held-out slice per device."""
    left_out: Counter = Counter()
    kept: dict[tuple[str, str, bool], list[tuple[Contribution, str]]] = {}
    for contribution in contributions:
        if settings.devices and contribution.device_id not in settings.devices:
            continue
        if contribution.confidence < settings.min_confidence:
            left_out["cloud not sure enough"] += 1
            continue
        label = label_of(contribution, vocabulary)
        if label is None:
            left_out["intent not in this vocabulary"] += 1
            continue
        if label == UNKNOWN_LABEL and not settings.negatives:
            left_out["no command (negatives off)"] += 1
            continue
        held_out = is_held_out(contribution.device_id, contribution.utterance_id, settings.held_out_share)
        kept.setdefault((contribution.device_id, label, held_out), []).append((contribution, label))
    examples = []
    for (device_id, _label, held_out), group in sorted(kept.items()):
        # The newest first: a user's voice and room today matter more than a month ago.
        group.sort(key=lambda item: item[0].received_at, reverse=True)
        if not held_out and len(group) > settings.max_per_device_label:
            left_out["over the per-device cap"] += len(group) - settings.max_per_device_label
            group = group[: settings.max_per_device_label]
        for contribution, label in group:
            if contribution.sample_rate != SAMPLE_RATE:
                left_out[f"recorded at {contribution.sample_rate} Hz"] += 1
                continue
            try:
                audio = decode_opus(contribution.audio, expected_rate=SAMPLE_RATE)
            except ProtocolError:
                left_out["audio unreadable"] += 1
                continue
            examples.append(
                FleetExample(
                    device_id=device_id,
                    utterance_id=contribution.utterance_id,
                    label=label,
                    confidence=contribution.confidence,
                    window=speech_window(audio),
                    held_out=held_out,
                )
            )
    return FleetDataset(tuple(examples), left_out)
