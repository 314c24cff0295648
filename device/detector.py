"""From model scores to decisions: the wake detector on the always-on path, and the command decision after it.

Both read their settings from the model package's :class:`~schemas.model.Detection`,
so thresholds travel with the model they were tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.features import StreamingFrontend, batch_features, window_samples
from device.inference import TfliteClassifier
from schemas.model import ModelPackage

NON_COMMAND_LABELS = ("_silence_", "_unknown_")
"""Classes that are not commands, besides the wake label."""


@dataclass(frozen=True)
class WakeEvent:
    """The wake phrase was heard."""

    time_s: float
    """Stream time (seconds) of the end of the window that fired."""
    score: float
    """Smoothed wake score that crossed the threshold."""


@dataclass(frozen=True)
class CommandDecision:
    """What one utterance window was taken for, and who decides."""

    label: str | None
    """Best command label, or None when the best class is not a command."""
    confidence: float
    """Score of the best class."""
    alternatives: tuple[tuple[str, float], ...]
    """The three best classes and their scores, best first."""
    local: bool
    """True when the device decides on its own (a command at or above the command threshold)."""


class WakeDetector:
    """Streams audio through the front end and runs the model every ``stride_frames`` frames.

    Keeps the last ``frontend.frames`` feature frames in a ring buffer; the wake
    score is the mean of the last ``smoothing_windows`` runs, and after a wake no
    other fires for ``refractory_s``.
    """

    def __init__(self, classifier: TfliteClassifier, package: ModelPackage) -> None:
        self.classifier = classifier
        self.package = package
        self.frontend = StreamingFrontend(package.frontend)
        self.wake_index = package.labels.index(package.detection.wake_label)
        self.reset()

    def reset(self) -> None:
        """Forget the stream."""
        frontend = self.package.frontend
        self.frontend.reset()
        self._frames = np.zeros((frontend.frames, frontend.num_features), np.float32)
        self._filled = 0
        self._since_run = 0
        self._recent: list[float] = []
        self._last_wake_s = -np.inf
        self.runs = 0
        self.last_score = 0.0

    def push(self, audio: np.ndarray) -> list[WakeEvent]:
        """Add audio; return the wakes it completes."""
        events = []
        detection = self.package.detection
        step_s = self.package.frontend.step_s
        frames = self.frontend.push(audio)
        first_frame = self.frontend.frames_emitted - len(frames)
        for index, frame in enumerate(frames):
            self._frames = np.roll(self._frames, -1, axis=0)
            self._frames[-1] = frame
            self._filled = min(self._filled + 1, len(self._frames))
            self._since_run += 1
            if self._filled < len(self._frames) or self._since_run < detection.stride_frames:
                continue
            self._since_run = 0
            self.runs += 1
            self._recent = [*self._recent, float(self.classifier(self._frames)[self.wake_index])]
            self._recent = self._recent[-detection.smoothing_windows :]
            score = self.last_score = float(np.mean(self._recent))
            # The time of this frame, not of the end of the pushed audio: wakes do not depend on block size.
            now = (first_frame + index + 1) * step_s
            if score >= detection.wake_threshold and now - self._last_wake_s >= detection.refractory_s:
                self._last_wake_s = now
                events.append(WakeEvent(time_s=round(now, 3), score=round(score, 4)))
        return events


def wake_scores(classifier: TfliteClassifier, package: ModelPackage, audio: np.ndarray) -> np.ndarray:
    """Smoothed wake scores over a whole recording, one per stride, as :class:`WakeDetector` computes them."""
    frontend, detection = package.frontend, package.detection
    # Streaming in 10 s chunks gives the batch features (a test holds them equal) without hours in memory at once.
    stream = StreamingFrontend(frontend)
    chunk = 10 * frontend.sample_rate
    pieces = [stream.push(audio[start : start + chunk]) for start in range(0, len(audio), chunk)]
    features = np.concatenate(pieces) if pieces else np.zeros((0, frontend.num_features), np.float32)
    ends = np.arange(frontend.frames, len(features) + 1, detection.stride_frames)
    wake_index = package.labels.index(detection.wake_label)
    raw = np.array([classifier(features[end - frontend.frames : end])[wake_index] for end in ends], np.float32)
    if len(raw) == 0:
        return raw
    kernel = detection.smoothing_windows
    padded = np.concatenate((np.full(kernel - 1, np.nan, np.float32), raw))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel)
    return np.nanmean(windows, axis=1).astype(np.float32)


def count_wakes(scores: np.ndarray, threshold: float, step_s: float, refractory_s: float) -> int:
    """Wakes a score series fires at ``threshold``, with the refractory period applied."""
    above = np.flatnonzero(scores >= threshold)
    count, last = 0, -np.inf
    for index in above:
        if (index - last) * step_s >= refractory_s:
            count, last = count + 1, index
    return count


def utterance_window(package: ModelPackage, audio: np.ndarray, start: int, end: int) -> np.ndarray:
    """The model-sized stretch of ``audio`` centred on the utterance [start, end) (samples), zero-padded at edges."""
    length = window_samples(package.frontend)
    centre = (start + end) // 2
    first = centre - length // 2
    window = np.zeros(length, np.float32)
    source_start, source_end = max(0, first), min(len(audio), first + length)
    if source_end > source_start:
        window[source_start - first : source_end - first] = audio[source_start:source_end]
    return window


def decide_command(classifier: TfliteClassifier, package: ModelPackage, window_audio: np.ndarray) -> CommandDecision:
    """Classify one utterance window (from :func:`utterance_window`) and decide edge or cloud."""
    features = batch_features(package.frontend, window_audio)
    scores = classifier(features[: package.frontend.frames])
    order = np.argsort(scores)[::-1]
    best = package.labels[order[0]]
    confidence = float(scores[order[0]])
    is_command = best not in NON_COMMAND_LABELS and best != package.detection.wake_label
    return CommandDecision(
        label=best if is_command else None,
        confidence=round(confidence, 4),
        alternatives=tuple((package.labels[i], round(float(scores[i]), 4)) for i in order[:3]),
        local=is_command and confidence >= package.detection.command_threshold,
    )
