"""From model scores to decisions: the wake detector on the always-on path, and the command decision after it.

Both read their settings from the model package's :class:`~schemas.model.Detection`,
so thresholds travel with the model they were tuned for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device.features import StreamingFrontend, frame_step, window_features, window_samples
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
        # Audio waits until it completes a stride: the model runs no more often than that, and a few larger
        # feature computations cost less than many small ones (numpy's per-call overhead dominates at 30 ms).
        self._batch_samples = package.detection.stride_frames * frame_step(package.frontend)
        self.reset()

    def reset(self) -> None:
        """Forget the stream."""
        frontend = self.package.frontend
        self.frontend.reset()
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._frames = np.zeros((0, frontend.num_features), np.float32)  # the last frames, oldest first
        self._recent: list[float] = []
        self._last_wake_s = -np.inf
        self.runs = 0
        self.last_score = 0.0

    @property
    def samples_pending(self) -> int:
        """Audio pushed but not yet analysed (less than one stride)."""
        return self._pending_samples

    def push(self, audio: np.ndarray) -> list[WakeEvent]:
        """Add audio; return the wakes it completes."""
        self._pending.append(audio)
        self._pending_samples += len(audio)
        if self._pending_samples < self._batch_samples:
            return []
        batch = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending, self._pending_samples = [], 0
        new_frames = self.frontend.push(batch)
        if len(new_frames) == 0:
            return []
        frontend, detection = self.package.frontend, self.package.detection
        total = self.frontend.frames_emitted  # frames of the whole stream so far
        self._frames = np.concatenate((self._frames[-frontend.frames :], new_frames))
        first = total - len(self._frames)  # stream index of self._frames[0]
        events = []
        # The model runs once the window is full, then every stride: after frames n = F, F + s, F + 2s, ...
        due = max(frontend.frames, total - len(new_frames) + 1)
        offset = (due - frontend.frames) % detection.stride_frames
        if offset:
            due += detection.stride_frames - offset
        for end in range(due, total + 1, detection.stride_frames):
            window = self._frames[end - frontend.frames - first : end - first]
            self.runs += 1
            self._recent = [*self._recent, float(self.classifier(window)[self.wake_index])]
            self._recent = self._recent[-detection.smoothing_windows :]
            score = self.last_score = float(np.mean(self._recent))
            # The time of this frame, not of the end of the pushed audio: wakes do not depend on block size.
            now = end * frontend.step_s
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
    features = window_features(package.frontend, window_audio)
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
