"""The final result of one utterance: what was said, what it means, who decided it and whether the device acted."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from schemas.errors import ErrorCode
from schemas.message import AnswerMessage
from schemas.topics import RESULT

SlotValue = int | str


class Source(StrEnum):
    """Where the result's decision came from."""

    EDGE = "edge"
    """The device's own model, with no audio leaving the device (or the device alone, when the cloud did not
    answer in time)."""
    CLOUD = "cloud"
    """A cloud worker's reply about the uploaded audio, as the device judged it."""


@dataclass(frozen=True)
class ErrorInfo:
    """Why an utterance could not be understood."""

    code: ErrorCode
    """Machine-readable reason."""
    message: str
    """A sentence for people."""

    def to_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "message": self.message}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> Self:
        return cls(code=ErrorCode(data["code"]), message=data["message"])


@dataclass(frozen=True)
class Result(AnswerMessage):
    """The one final result of an utterance, published by the device on its result topic.

    Cloud workers do not publish results: they reply to the device (schemas/reply.py), which decides whether to
    act on the reply and then publishes this.
    """

    spec = RESULT

    device_id: str
    """The device the utterance came from."""
    utterance_id: str
    """The utterance this answers (also the request's Correlation Data)."""
    source: Source
    """Edge or cloud."""
    transcript: str | None
    """What was heard; None when nothing was transcribed."""
    intent: str | None
    """Intent from the vocabulary, or None when outside it or on error."""
    slots: Mapping[str, SlotValue]
    """Slot values of the intent."""
    confidence: float
    """Confidence of the intent in [0, 1]."""
    timings_ms: Mapping[str, float]
    """Stage durations (milliseconds); always has ``total``."""
    error: ErrorInfo | None = None
    """Why the utterance could not be understood, or None on success."""
    acted: bool = False
    """Whether the device acted on the intent (handed it to its action for that intent). False for an error, a
    cloud answer under the device's floor, one that came after the device stopped waiting, or no intent."""
    sent_at: float = field(default_factory=time.time)
    """Unix time (seconds) of publication."""

    @classmethod
    def failure(
        cls, device_id: str, utterance_id: str, source: Source, error: ErrorInfo, timings_ms: Mapping[str, float]
    ) -> Self:
        """A result that understood nothing, and says why: no transcript, no intent, confidence 0."""
        return cls(
            device_id=device_id,
            utterance_id=utterance_id,
            source=source,
            transcript=None,
            intent=None,
            slots={},
            confidence=0.0,
            timings_ms=timings_ms,
            error=error,
        )

    def topic(self) -> str:
        return RESULT.topic(device_id=self.device_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "utterance_id": self.utterance_id,
            "source": str(self.source),
            "transcript": self.transcript,
            "intent": self.intent,
            "slots": dict(self.slots),
            "confidence": self.confidence,
            "timings_ms": dict(self.timings_ms),
            "error": self.error.to_dict() if self.error else None,
            "acted": self.acted,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            device_id=data["device_id"],
            utterance_id=data["utterance_id"],
            source=Source(data["source"]),
            transcript=data["transcript"],
            intent=data["intent"],
            slots=data["slots"],
            confidence=data["confidence"],
            timings_ms=data["timings_ms"],
            error=ErrorInfo.from_dict(data["error"]) if data["error"] else None,
            # The schema requires it on the wire; a worker's database holds results stored before it existed.
            acted=data.get("acted", False),
            sent_at=data["sent_at"],
        )
