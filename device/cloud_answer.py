"""What the device makes of a cloud worker's reply: the floor under which it does not act, and the final result.

The worker replies on the device's reply topic only; the device is the one that publishes
the utterance's result, once, saying whether it acted. A reply whose confidence is under
``cloud.min_confidence`` is reported as not understood, with what the cloud heard, so a
consumer sees why nothing happened.
"""

from __future__ import annotations

from schemas.errors import ErrorCode
from schemas.reply import CloudReply
from schemas.result import ErrorInfo, Result, Source
from schemas.vocabulary import Command

MAX_HEARD_CHARS = 200
"""Longest part of the transcript quoted in a not_understood message (an error message holds 1024 characters)."""


def under_floor(reply: CloudReply, min_confidence: float) -> ErrorInfo | None:
    """Why the device must not act on the intent of ``reply``, when it has one under ``min_confidence``; else None."""
    if reply.intent is None or reply.error is not None or reply.confidence >= min_confidence:
        return None
    heard = reply.transcript or ""
    if len(heard) > MAX_HEARD_CHARS:
        heard = heard[:MAX_HEARD_CHARS] + "…"
    command = Command(reply.intent, reply.slots, ()).label
    return ErrorInfo(
        ErrorCode.NOT_UNDERSTOOD,
        f"the cloud heard {heard!r} as {command} at {reply.confidence:.2f},"
        f" under this device's floor of {min_confidence:.2f}",
    )


def cloud_result(reply: CloudReply, *, min_confidence: float, may_act: bool, total_ms: float) -> Result:
    """The utterance's one final result from the cloud's ``reply``, as this device judges it.

    The intent stays only when the reply has no error and reaches ``min_confidence``; under that floor the
    intent is dropped for a not_understood error that quotes what was heard, and the transcript and confidence
    stay. ``acted`` is whether an intent stayed and ``may_act`` (the device still waited for this answer): the
    caller acts on ``result.intent`` exactly when ``result.acted``. Timings are the worker's, its ``total`` as
    ``cloud``, and ``total`` the device's own (``total_ms``).
    """
    refusal = under_floor(reply, min_confidence)
    error = refusal or reply.error
    intent = None if error is not None else reply.intent
    timings = {stage: ms for stage, ms in reply.timings_ms.items() if stage != "total"}
    return Result(
        device_id=reply.device_id,
        utterance_id=reply.utterance_id,
        source=Source.CLOUD,
        transcript=reply.transcript,
        intent=intent,
        slots=dict(reply.slots) if intent is not None else {},
        confidence=reply.confidence,
        timings_ms=timings | {"cloud": reply.timings_ms["total"], "total": total_ms},
        error=error,
        acted=may_act and intent is not None,
    )
