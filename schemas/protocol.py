"""From a topic and an envelope to a typed message, and back: the one entry point for receivers."""

from __future__ import annotations

from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.model import ModelBlob, ModelManifest
from schemas.reply import CloudReply
from schemas.result import Result
from schemas.status import DeviceStatus
from schemas.topics import spec_for
from schemas.utterance import Utterance

Message = Utterance | CloudReply | Result | DeviceStatus | ModelManifest | ModelBlob | ErrorReport
"""Any message of the protocol."""

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.spec.name: cls for cls in (Utterance, CloudReply, Result, DeviceStatus, ModelManifest, ModelBlob, ErrorReport)
}
"""The message class of each topic kind, by TopicSpec.name."""


def decode(topic: str, envelope: Envelope) -> Message | None:
    """The message published on ``topic``, fully checked; None for an empty retained payload (a cleared topic).

    Besides each message's own checks, the ids in the topic must be the ids in the
    message: a device cannot publish a result or status in another device's name
    through its own topic, nor a worker reply to one device on another's reply topic.
    """
    spec, _ = spec_for(topic)
    if not envelope.payload and spec.retain:
        return None
    message = MESSAGE_TYPES[spec.name].from_wire(envelope)
    if message.topic() != topic:
        raise ProtocolError(ErrorCode.MISMATCH, spec.name, f"message belongs on {message.topic()!r}, not {topic!r}")
    return message


def encode(message: Message) -> tuple[str, Envelope]:
    """The topic and envelope to publish ``message`` with (QoS and retain come from ``message.spec``)."""
    return message.topic(), message.to_wire()
