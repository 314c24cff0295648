"""The command head: a small classifier on the pretrained speech embedding, run only after the always-on stage.

It scores the same labels as the always-on model, on about two seconds of audio:

- centred on an utterance after a wake, to decide the command (:meth:`CommandHead.decide`);
- ending at a first-stage wake, to verify it (:meth:`CommandHead.wake_score`): the
  always-on model is tuned to miss few wakes, the head to let few false ones through.

Its logits are divided by the package's fitted temperature before the softmax, so a
score of 0.99 is right about 99 times in 100 on speakers it did not train on.
"""

from __future__ import annotations

import numpy as np

from device.detector import CommandDecision, centred_window, decide_scores
from device.inference import TfliteClassifier
from device.speech_embedding import SpeechEmbedding, samples_for
from schemas.model import ModelPackage


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits along the last axis (training calibrates with the same function)."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class CommandHead:
    """The head of a model package, with the embedding it reads. Thresholds and temperature come from the package
    passed to each call, so that a device's configured overrides apply."""

    def __init__(self, classifier: TfliteClassifier, embedding: SpeechEmbedding) -> None:
        self.classifier = classifier
        self.embedding = embedding
        self.embeddings = classifier.input_shape[0]
        """Embeddings in one input window."""
        self.window_samples = samples_for(self.embeddings)
        """Audio (samples) of one input window."""
        self.runs = 0
        """Windows scored so far (each costs the embedding of two seconds of audio)."""

    def probabilities(self, package: ModelPackage, window_audio: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities for one window of ``window_samples`` samples."""
        self.runs += 1
        embeddings = self.embedding(window_audio)[: self.embeddings]
        return softmax(self.classifier(embeddings) / package.detection.head_temperature).astype(np.float32)

    def decide(self, package: ModelPackage, audio: np.ndarray, start: int, end: int) -> CommandDecision:
        """The command of the utterance [start, end) (samples of ``audio``), on a window centred on it."""
        window = centred_window(audio, start, end, self.window_samples)
        return decide_scores(package, self.probabilities(package, window))

    def wake_score(self, package: ModelPackage, audio_before: np.ndarray) -> float:
        """Probability of the wake label on the window that ends where ``audio_before`` ends."""
        window = np.zeros(self.window_samples, np.float32)
        tail = audio_before[-self.window_samples :]
        window[len(window) - len(tail) :] = tail
        return float(self.probabilities(package, window)[package.labels.index(package.detection.wake_label)])
