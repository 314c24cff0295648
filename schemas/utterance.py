"""An utterance the device was unsure of: its audio and what the device thought it heard."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

import numpy as np

from common.opus import encode_opus
from schemas.envelope import Envelope
from schemas.errors import ErrorCode, ProtocolError
from schemas.result import SlotValue
from schemas.topics import META_PROPERTY, REPLY, UTTERANCE, KiB
from schemas.validation import decode_json, encode_json

MAX_META_BYTES = 8 * KiB
"""Largest ``mqvox-meta`` user property accepted on an utterance."""

OGG_MAGIC = b"OggS"


def new_utterance_id() -> str:
    """A fresh utterance id (UUID4, hex)."""
    return uuid.uuid4().hex


class UploadReason(StrEnum):
    """Why the device sends the audio to the cloud."""

    LOW_CONFIDENCE = "low_confidence"
    """Its best hypothesis scored under the confidence threshold."""
    OUT_OF_VOCABULARY = "out_of_vocabulary"
    """It heard speech that matched no command."""
    FORCED = "forced"
    """It was told to, without running its model (``python -m device send``)."""
    TRAINING_SAMPLE = "training_sample"
    """It decided the utterance itself and acted on it; it sends it only so the cloud labels it, for training
    (``cloud.training_sample_share``, with the owner's consent). Its answer is not acted on and makes no result."""


@dataclass(frozen=True)
class Hypothesis:
    """One of the device model's guesses."""

    intent: str | None
    """Intent, or None for 'none of the commands'."""
    slots: Mapping[str, SlotValue]
    """Slot values of the intent."""
    score: float
    """Model score in [0, 1]."""


@dataclass(frozen=True)
class Utterance:
    """A request to the cloud: Opus-in-OGG audio as the payload, metadata in the ``mqvox-meta`` user property.

    The request uses MQTT 5 request/response: Response Topic is the device's own
    reply topic and Correlation Data is the utterance id.
    """

    spec = UTTERANCE

    device_id: str
    """The device that captured it."""
    utterance_id: str
    """Unique id, chosen by the device."""
    sample_rate: int
    """Sample rate (hertz) of the audio before encoding."""
    duration_s: float
    """Length of the audio (seconds)."""
    hypotheses: tuple[Hypothesis, ...]
    """The device's top guesses, best first."""
    model_version: str | None
    """Version of the device model that made the guesses; None when no model ran."""
    reason: UploadReason
    """Why the device asks the cloud."""
    audio: bytes
    """The audio, Opus in OGG (see common.opus)."""
    captured_at: float = field(default_factory=time.time)
    """Unix time (seconds) the utterance ended."""
    share_for_training: bool = False
    """The device's owner allows the cloud to keep this utterance, with its answer, to train device models
    (the device's ``cloud.share_for_training``). On the wire only when true, so a device that does not share
    sends what it sent before."""

    @classmethod
    def from_samples(
        cls,
        device_id: str,
        samples: np.ndarray,
        sample_rate: int,
        *,
        hypotheses: tuple[Hypothesis, ...],
        model_version: str | None,
        reason: UploadReason,
        utterance_id: str | None = None,
        share_for_training: bool = False,
    ) -> Self:
        """An utterance of mono float ``samples``: encoded as Opus, its duration taken from them, a fresh id."""
        return cls(
            device_id=device_id,
            utterance_id=utterance_id or new_utterance_id(),
            sample_rate=sample_rate,
            duration_s=round(len(samples) / sample_rate, 3),
            hypotheses=hypotheses,
            model_version=model_version,
            reason=reason,
            audio=encode_opus(samples, sample_rate),
            share_for_training=share_for_training,
        )

    def topic(self) -> str:
        return UTTERANCE.topic(device_id=self.device_id)

    def response_topic(self) -> str:
        """Where the answer goes: the device's own reply topic, which only that device reads."""
        return REPLY.topic(device_id=self.device_id)

    def meta(self) -> dict[str, Any]:
        """The metadata document (schema ``utterance``); ``share_for_training`` is in it only when true."""
        meta: dict[str, Any] = {
            "device_id": self.device_id,
            "utterance_id": self.utterance_id,
            "sample_rate": self.sample_rate,
            "duration_s": self.duration_s,
            "hypotheses": [
                {"intent": guess.intent, "slots": dict(guess.slots), "score": guess.score} for guess in self.hypotheses
            ],
            "model_version": self.model_version,
            "reason": str(self.reason),
            "captured_at": self.captured_at,
        }
        if self.share_for_training:
            meta["share_for_training"] = True
        return meta

    def to_wire(self) -> Envelope:
        """Validate and encode; raises ProtocolError rather than sending something invalid."""
        meta = encode_json(UTTERANCE.name, self.meta(), max_bytes=MAX_META_BYTES).decode("utf-8")
        _check_audio(self.audio)
        return Envelope(
            payload=self.audio,
            content_type=UTTERANCE.content_type,
            user_properties=((META_PROPERTY, meta),),
            response_topic=self.response_topic(),
            correlation_data=self.utterance_id.encode("ascii"),
        )

    @classmethod
    def from_wire(cls, envelope: Envelope) -> Self:
        """Check every part of the request; raises ProtocolError on anything off.

        The audio is only checked to be an OGG stream of allowed size here;
        decoding it (common.opus) is the receiver's next step.
        """
        envelope.expect_content_type(UTTERANCE.content_type, UTTERANCE.name)
        meta = decode_json(
            UTTERANCE.name, envelope.user_property(META_PROPERTY, UTTERANCE.name), max_bytes=MAX_META_BYTES
        )
        utterance = cls(
            device_id=meta["device_id"],
            utterance_id=meta["utterance_id"],
            sample_rate=meta["sample_rate"],
            duration_s=meta["duration_s"],
            hypotheses=tuple(Hypothesis(h["intent"], h["slots"], h["score"]) for h in meta["hypotheses"]),
            model_version=meta["model_version"],
            reason=UploadReason(meta["reason"]),
            audio=envelope.payload,
            captured_at=meta["captured_at"],
            share_for_training=meta.get("share_for_training", False),
        )
        if envelope.correlation_data != utterance.utterance_id.encode("ascii"):
            raise ProtocolError(ErrorCode.MISMATCH, UTTERANCE.name, "correlation data must be the utterance id")
        if envelope.response_topic != utterance.response_topic():
            raise ProtocolError(
                ErrorCode.MISMATCH,
                UTTERANCE.name,
                f"response topic must be the device's own reply topic {utterance.response_topic()!r},"
                f" not {envelope.response_topic!r}",
            )
        _check_audio(envelope.payload)
        return utterance


def _check_audio(audio: bytes) -> None:
    UTTERANCE.check_size(audio, "utterance audio")
    if not audio.startswith(OGG_MAGIC):
        raise ProtocolError(ErrorCode.BAD_AUDIO, "utterance audio", "payload is not an OGG stream")
