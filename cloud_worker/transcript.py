"""What the speech recogniser heard in one utterance: its text, and each segment with its confidence."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True)
class Segment:
    """One stretch of speech the recogniser decoded, with how sure it was."""

    start_s: float
    """Start, seconds from the start of the utterance's audio."""
    end_s: float
    """End, seconds from the start of the utterance's audio."""
    text: str
    """The words, as the recogniser wrote them (case and punctuation kept)."""
    avg_logprob: float
    """Mean log probability of the segment's tokens (natural log, <= 0)."""
    no_speech_prob: float
    """The recogniser's probability that its window held no speech at all."""

    @property
    def confidence(self) -> float:
        """Geometric mean probability of the segment's tokens, in [0, 1]."""
        return math.exp(min(self.avg_logprob, 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_s": self.start_s,
            "end_s": self.end_s,
            "text": self.text,
            "avg_logprob": self.avg_logprob,
            "no_speech_prob": self.no_speech_prob,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            start_s=float(data["start_s"]),
            end_s=float(data["end_s"]),
            text=str(data["text"]),
            avg_logprob=float(data["avg_logprob"]),
            no_speech_prob=float(data["no_speech_prob"]),
        )


@dataclass(frozen=True)
class PhraseScores:
    """How well each command's phrases, and anything else, explain the audio (natural-log likelihoods).

    cloud_worker/intents.py turns them into an intent and a calibrated confidence.
    """

    commands: Mapping[str, float]
    """log P(any way of writing one of the command's phrases, then the end | audio), by ``Command.label``; a
    command whose phrases were too improbable to score is absent."""
    other: float
    """log P(the utterance is something else | audio): words that no phrase starts with, and the free reading
    when it starts like a phrase but is none. -inf when nothing else is possible."""
    free: float | None
    """log P(the free reading | audio), or None when it read no words."""

    def to_dict(self) -> dict[str, Any]:
        return {"commands": dict(self.commands), "other": self.other, "free": self.free}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return cls(commands=dict(data["commands"]), other=float(data["other"]), free=data["free"])


@dataclass(frozen=True)
class Transcript:
    """The recogniser's reading of one utterance."""

    text: str
    """Every segment's text joined, stripped; empty when no speech was found."""
    segments: tuple[Segment, ...]
    """The segments, in time order."""
    model: str
    """Which recogniser made it (model directory name and compute type)."""
    phrases: PhraseScores | None = None
    """The vocabulary's phrases scored against the audio; None for silence and for transcripts read back from
    storage, which keeps only the words."""

    @classmethod
    def silence(cls, model: str) -> Self:
        """What a silent clip reads as: no words, and nothing but "something else" possible."""
        return cls(text="", segments=(), model=model, phrases=PhraseScores(commands={}, other=0.0, free=None))

    @property
    def confidence(self) -> float:
        """Confidence of the whole transcript: the segments' confidences weighted by length; 0 without segments."""
        if not self.segments:
            return 0.0
        weights = [max(len(segment.text.strip()), 1) for segment in self.segments]
        total = sum(weight * segment.confidence for weight, segment in zip(weights, self.segments, strict=True))
        return round(total / sum(weights), 4)
