"""What every JSON message of the protocol shares: its topic kind and its way on and off the wire."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from schemas.envelope import Envelope
from schemas.errors import ErrorCode, ProtocolError
from schemas.topics import TopicSpec
from schemas.validation import decode_json, encode_json


class JsonMessage:
    """Base of the dataclasses whose whole payload is one JSON document of schema ``spec.name``.

    A subclass gives ``spec``, ``to_dict``, ``from_dict`` and ``topic``; this class
    validates against the schema both ways and applies the topic's size limit and
    content type.
    """

    spec: ClassVar[TopicSpec]
    """The kind of topic this message travels on."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        raise NotImplementedError

    def topic(self) -> str:
        """The topic this message is published on."""
        raise NotImplementedError

    def to_wire(self) -> Envelope:
        """Validate and encode; raises ProtocolError rather than sending something invalid."""
        payload = encode_json(self.spec.name, self.to_dict(), max_bytes=self.spec.max_payload_bytes)
        return Envelope(payload=payload, content_type=self.spec.content_type)

    @classmethod
    def from_wire(cls, envelope: Envelope) -> Self:
        """Check content type and size, parse and validate; raises ProtocolError on anything else."""
        envelope.expect_content_type(cls.spec.content_type, cls.spec.name)
        return cls.from_dict(decode_json(cls.spec.name, envelope.payload, max_bytes=cls.spec.max_payload_bytes))


class AnswerMessage(JsonMessage):
    """Base of the JSON messages that answer one utterance (the worker's reply, the device's result).

    A subclass has an ``utterance_id`` field; it travels as the MQTT 5 Correlation Data too.
    """

    def to_wire(self) -> Envelope:
        """As any JSON message, with the utterance id as Correlation Data (it answers that request)."""
        envelope = super().to_wire()
        return Envelope(envelope.payload, envelope.content_type, correlation_data=self.utterance_id.encode("ascii"))

    @classmethod
    def from_wire(cls, envelope: Envelope) -> Self:
        """As any JSON message; Correlation Data, when present, must be the utterance id."""
        message = super().from_wire(envelope)
        if envelope.correlation_data is not None and envelope.correlation_data != message.utterance_id.encode("ascii"):
            raise ProtocolError(ErrorCode.MISMATCH, cls.spec.name, "correlation data must be the utterance id")
        return message
