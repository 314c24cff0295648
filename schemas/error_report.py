"""Reports of refused messages, on the fleet error topic."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Self

from schemas.errors import ErrorCode, ProtocolError
from schemas.message import JsonMessage
from schemas.topics import ERROR


def _clip(text: str | None, limit_bytes: int) -> str | None:
    """``text`` made safe to report: unprintable characters as '?', cut to ``limit_bytes`` of UTF-8.

    The refused message may carry anything. Unprintable characters would be escaped
    six-fold in JSON; with them gone and every field cut by bytes, a report always
    fits its schema and the error topic's 8 KiB.
    """
    if text is None:
        return None
    printable = "".join(char if char.isprintable() else "?" for char in text)
    return printable.encode("utf-8")[:limit_bytes].decode("utf-8", errors="ignore")


@dataclass(frozen=True)
class ErrorReport(JsonMessage):
    """Who refused which message, and why."""

    spec = ERROR

    code: ErrorCode
    """Machine-readable reason."""
    message: str
    """A sentence for people."""
    reporter: str
    """The component that refused it, e.g. ``cloud_worker/worker-1``."""
    topic_name: str | None
    """Topic of the refused message."""
    device_id: str | None
    """Device id the refused message claimed, as received (it may be the invalid part)."""
    utterance_id: str | None
    """Utterance id the refused message claimed, as received."""
    sent_at: float = field(default_factory=time.time)
    """Unix time (seconds) of publication."""

    @classmethod
    def from_error(
        cls,
        error: ProtocolError,
        *,
        reporter: str,
        topic: str | None,
        device_id: str | None = None,
        utterance_id: str | None = None,
    ) -> Self:
        """A report of ``error``, with every field clipped to what the schema allows."""
        return cls(
            code=error.code,
            message=_clip(str(error), 1024) or str(error.code),
            reporter=_clip(reporter, 128) or "unknown",
            topic_name=_clip(topic, 1024),
            device_id=_clip(device_id, 256),
            utterance_id=_clip(utterance_id, 256),
        )

    def topic(self) -> str:
        return ERROR.topic()

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": str(self.code),
            "message": self.message,
            "reporter": self.reporter,
            "topic": self.topic_name,
            "device_id": self.device_id,
            "utterance_id": self.utterance_id,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            code=ErrorCode(data["code"]),
            message=data["message"],
            reporter=data["reporter"],
            topic_name=data["topic"],
            device_id=data["device_id"],
            utterance_id=data["utterance_id"],
            sent_at=data["sent_at"],
        )
