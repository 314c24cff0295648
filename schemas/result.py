"""The answer to one utterance: what was said and what it means."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from schemas.envelope import Envelope
from schemas.errors import ErrorCode, ProtocolError
from schemas.message import JsonMessage
from schemas.topics import RESULT

SlotValue = int | str


class Source(StrEnum):
    """Who decided the result."""

    EDGE = "edge"
    """The device's own model, with no audio leaving the device."""
    CLOUD = "cloud"
    """A cloud worker, from the uploaded audio."""


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
class Result(JsonMessage):
    """An edge or cloud result, published on the device's result topic."""

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

    def to_wire(self) -> Envelope:
        """As any JSON message, with the utterance id as Correlation Data (it answers that request)."""
        envelope = super().to_wire()
        return Envelope(envelope.payload, envelope.content_type, correlation_data=self.utterance_id.encode("ascii"))

    @classmethod
    def from_wire(cls, envelope: Envelope) -> Self:
        """As any JSON message; Correlation Data, when present, must be the utterance id."""
        result = super().from_wire(envelope)
        if envelope.correlation_data is not None and envelope.correlation_data != result.utterance_id.encode("ascii"):
            raise ProtocolError(ErrorCode.MISMATCH, RESULT.name, "correlation data must be the utterance id")
        return result

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
            sent_at=data["sent_at"],
        )
