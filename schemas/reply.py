"""A cloud worker's reply to one utterance: what it heard, for the device that asked and no one else."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from schemas.message import AnswerMessage
from schemas.result import ErrorInfo, Result, SlotValue
from schemas.topics import REPLY


@dataclass(frozen=True)
class CloudReply(AnswerMessage):
    """A worker's answer, published on the asking device's reply topic (the utterance's Response Topic).

    It is not a result: the device judges it (its confidence floor, whether it still waits for it) and
    publishes the utterance's one final Result on its result topic.
    """

    spec = REPLY

    device_id: str
    """The device that asked."""
    utterance_id: str
    """The utterance this answers (also the request's and this reply's Correlation Data)."""
    transcript: str | None
    """What the worker heard; None when nothing was transcribed (an error)."""
    intent: str | None
    """Intent from the vocabulary, or None when the transcript is outside it or on error."""
    slots: Mapping[str, SlotValue]
    """Slot values of the intent."""
    confidence: float
    """Calibrated probability in [0, 1] that the answer is right: that the intent is, or, without an intent, that
    no command of the vocabulary was said (cloud_worker/README.md)."""
    timings_ms: Mapping[str, float]
    """The worker's stage durations (milliseconds): ``queue``, ``decode``, ``asr`` and ``total`` (receipt to
    answer ready); always has ``total``."""
    error: ErrorInfo | None = None
    """Why the worker could not understand the utterance, or None."""
    sent_at: float = field(default_factory=time.time)
    """Unix time (seconds) of publication."""

    @classmethod
    def of_result(cls, result: Result) -> Self:
        """The reply that carries a worker's cloud result to the device; equal for equal results, so an answer
        sent again from the worker's storage is the same reply."""
        return cls(
            device_id=result.device_id,
            utterance_id=result.utterance_id,
            transcript=result.transcript,
            intent=result.intent,
            slots=result.slots,
            confidence=result.confidence,
            timings_ms=result.timings_ms,
            error=result.error,
            sent_at=result.sent_at,
        )

    def topic(self) -> str:
        return REPLY.topic(device_id=self.device_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "utterance_id": self.utterance_id,
            "transcript": self.transcript,
            "intent": self.intent,
            "slots": dict(self.slots),
            "confidence": self.confidence,
            "timings_ms": dict(self.timings_ms),
            "error": self.error.to_dict() if self.error else None,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            device_id=data["device_id"],
            utterance_id=data["utterance_id"],
            transcript=data["transcript"],
            intent=data["intent"],
            slots=data["slots"],
            confidence=data["confidence"],
            timings_ms=data["timings_ms"],
            error=ErrorInfo.from_dict(data["error"]) if data["error"] else None,
            sent_at=data["sent_at"],
        )
