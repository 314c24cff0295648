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


def silence_features(frontend) -> np.ndarray:
    """A window of the features of silence: what a stream is taken to have heard before it starts."""
    return window_features(frontend, np.zeros(window_samples(frontend), np.float32))[: frontend.frames]


class WakeDetector:
    """Streams audio through the front end and runs the model every ``stride_frames`` frames.

    Keeps the last ``frontend.frames`` feature frames in a ring buffer; the wake
    score is the mean of the last ``smoothing_windows`` runs, and after a wake no
    other fires for ``refractory_s``. The buffer starts full of silence, so the model
    runs from the first stride: a recording that starts straight into the wake
    phrase is heard as if someone had been quiet before it.
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
        self._frames = silence_features(frontend)  # the last frames, oldest first
        self._recent: list[float] = []
        self._last_wake_s = -np.inf
        self.runs = 0
        self.last_score = 0.0

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
        # The model runs every stride, after frames n = s, 2s, 3s, ... (windows reach back into the silence before
        # the stream until F frames have arrived).
        due = total - len(new_frames) + 1
        offset = due % detection.stride_frames
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
    heard = [stream.push(audio[start : start + chunk]) for start in range(0, len(audio), chunk)]
    features = np.concatenate([silence_features(frontend), *heard])
    # As WakeDetector: a run every stride of the stream, its window reaching back into silence at the start.
    ends = np.arange(detection.stride_frames, len(features) - frontend.frames + 1, detection.stride_frames)
    wake_index = package.labels.index(detection.wake_label)
    raw = np.array([classifier(features[end : end + frontend.frames])[wake_index] for end in ends], np.float32)
    if len(raw) == 0:
        return raw
    kernel = detection.smoothing_windows
    padded = np.concatenate((np.full(kernel - 1, np.nan, np.float32), raw))
    windows = np.lib.stride_tricks.sliding_window_view(padded, kernel)
    return np.nanmean(windows, axis=1).astype(np.float32)


def wake_triggers(scores: np.ndarray, threshold: float, step_s: float, refractory_s: float) -> list[int]:
    """Indices of the scores at which a wake fires at ``threshold``, with the refractory period applied."""
    above = np.flatnonzero(scores >= threshold)
    fired, last = [], -np.inf
    for index in above:
        if (index - last) * step_s >= refractory_s:
            fired.append(int(index))
            last = index
    return fired


def count_wakes(scores: np.ndarray, threshold: float, step_s: float, refractory_s: float) -> int:
    """Wakes a score series fires at ``threshold``, with the refractory period applied."""
    return len(wake_triggers(scores, threshold, step_s, refractory_s))


def score_end_sample(package: ModelPackage, index: int) -> int:
    """The audio sample at which the window of score ``index`` (from :func:`wake_scores`) ends."""
    frontend = package.frontend
    end_frame = (index + 1) * package.detection.stride_frames
    return round(end_frame * frontend.step_s * frontend.sample_rate)


def centred_window(audio: np.ndarray, start: int, end: int, length: int) -> np.ndarray:
    """``length`` samples of ``audio`` centred on [start, end), zero-padded past the edges."""
    centre = (start + end) // 2
    first = centre - length // 2
    window = np.zeros(length, np.float32)
    source_start, source_end = max(0, first), min(len(audio), first + length)
    if source_end > source_start:
        window[source_start - first : source_end - first] = audio[source_start:source_end]
    return window


def utterance_window(package: ModelPackage, audio: np.ndarray, start: int, end: int) -> np.ndarray:
    """The model-sized stretch of ``audio`` centred on the utterance [start, end) (samples), zero-padded at edges."""
    return centred_window(audio, start, end, window_samples(package.frontend))


def decide_scores(package: ModelPackage, scores: np.ndarray) -> CommandDecision:
    """The decision that class scores (in the package's label order) lead to: edge, cloud, or no command."""
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


def decide_command(classifier: TfliteClassifier, package: ModelPackage, window_audio: np.ndarray) -> CommandDecision:
    """Classify one utterance window (from :func:`utterance_window`) with the always-on model and decide."""
    features = window_features(package.frontend, window_audio)
    return decide_scores(package, classifier(features[: package.frontend.frames]))
