"""The mqvox v1 topic tree: names, QoS, retained flag, size limit and content type.

schemas/README.md documents the same table for people; a test keeps the two equal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from string import Formatter

from schemas.errors import ErrorCode, ProtocolError
from schemas.validation import schema_text

PREFIX = "mqvox/v1"
"""Root of every mqvox topic; a protocol change that breaks peers gets a new version level."""

META_PROPERTY = "mqvox-meta"
"""MQTT 5 user property that carries the JSON metadata of a binary (audio or model) payload."""

KiB = 1024
MiB = 1024 * KiB


@cache
def _identifier_pattern(definition: str) -> re.Pattern[str]:
    # The patterns live once, in json/common.schema.json.
    common = json.loads(schema_text("common"))
    return re.compile(common["$defs"][definition]["pattern"])


def check_identifier(kind: str, value: str) -> str:
    """Return ``value`` if it is a valid ``kind`` (device_id, channel or version), else raise ProtocolError.

    This is what keeps '+', '#', '/' and other topic syntax out of the topic levels.
    """
    if not isinstance(value, str) or not _identifier_pattern(kind).fullmatch(value):
        raise ProtocolError(ErrorCode.BAD_TOPIC, kind, f"{value!r} is not a valid {kind.replace('_', ' ')}")
    return value


@dataclass(frozen=True)
class TopicSpec:
    """One kind of topic in the tree, and how messages on it travel."""

    name: str
    """Short name, also the name of the message's schema."""
    template: str
    """Topic with ``{placeholders}`` for its variable levels."""
    qos: int
    """MQTT QoS that publishers use and subscribers request."""
    retain: bool
    """Whether messages are published retained."""
    max_payload_bytes: int
    """Largest payload (bytes) a sender may publish and a receiver accepts."""
    content_type: str
    """MQTT 5 Content Type of every message on this topic."""
    publisher: str
    """Who publishes here."""
    subscribers: str
    """Who subscribes here."""

    @property
    def params(self) -> tuple[str, ...]:
        """The placeholders of the template, in order."""
        return tuple(field for _, field, _, _ in Formatter().parse(self.template) if field)

    def topic(self, **params: str) -> str:
        """The concrete topic for these parameters, each checked against its identifier rule."""
        if set(params) != set(self.params):
            raise TypeError(f"{self.name} topic takes {self.params}, got {tuple(params)}")
        for kind, value in params.items():
            check_identifier(kind, value)
        return self.template.format(**params)

    def check_size(self, payload: bytes, what: str) -> None:
        """Raise ProtocolError if ``payload`` is over this topic's limit."""
        if len(payload) > self.max_payload_bytes:
            raise ProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE, what, f"{len(payload)} bytes is over the limit of {self.max_payload_bytes}"
            )

    def filter(self) -> str:
        """Subscription filter that matches every topic of this kind ('+' for each placeholder)."""
        return self.template.format(**{param: "+" for param in self.params})

    def match(self, topic: str) -> dict[str, str] | None:
        """The parameters of ``topic`` if it is of this kind, else None. Parameters are not validated here."""
        pattern = re.escape(self.template)
        for param in self.params:
            pattern = pattern.replace(re.escape("{" + param + "}"), f"(?P<{param}>[^/]+)")
        found = re.fullmatch(pattern, topic)
        return found.groupdict() if found else None


UTTERANCE = TopicSpec(
    name="utterance",
    template=PREFIX + "/devices/{device_id}/utterance",
    qos=1,
    retain=False,
    max_payload_bytes=256 * KiB,
    content_type="audio/ogg; codecs=opus",
    publisher="the device",
    subscribers="cloud workers, through $share/<group>/",
)
RESULT = TopicSpec(
    name="result",
    template=PREFIX + "/devices/{device_id}/result",
    qos=1,
    retain=False,
    max_payload_bytes=16 * KiB,
    content_type="application/json",
    publisher="the device: one final result per utterance, edge or cloud",
    subscribers="consumers of results",
)
REPLY = TopicSpec(
    name="reply",
    template=PREFIX + "/devices/{device_id}/reply",
    qos=1,
    retain=False,
    max_payload_bytes=16 * KiB,
    content_type="application/json",
    publisher="cloud workers, answering the device's utterances",
    subscribers="that device only",
)
STATUS = TopicSpec(
    name="status",
    template=PREFIX + "/devices/{device_id}/status",
    qos=1,
    retain=True,
    max_payload_bytes=8 * KiB,
    content_type="application/json",
    publisher="the device; the broker on its behalf (Last Will)",
    subscribers="operators, rollout tooling",
)
MANIFEST = TopicSpec(
    name="manifest",
    template=PREFIX + "/models/{channel}/manifest",
    qos=1,
    retain=True,
    max_payload_bytes=64 * KiB,
    content_type="application/json",
    publisher="operators (firmware_tools publish/rollout)",
    subscribers="devices on that channel, with a normal (not shared) subscription",
)
MODEL_BLOB = TopicSpec(
    name="model_blob",
    template=PREFIX + "/models/{channel}/blobs/{version}",
    qos=1,
    retain=True,
    max_payload_bytes=4 * MiB,
    content_type="application/vnd.tflite",
    publisher="operators (firmware_tools publish)",
    subscribers="devices that accepted the manifest naming it",
)
ERROR = TopicSpec(
    name="error",
    template=PREFIX + "/errors",
    qos=1,
    retain=False,
    max_payload_bytes=8 * KiB,
    content_type="application/json",
    publisher="any component that refuses a message",
    subscribers="operators, monitoring",
)

ALL_TOPICS = (UTTERANCE, REPLY, RESULT, STATUS, MANIFEST, MODEL_BLOB, ERROR)
"""Every topic kind of the protocol."""

MAX_PAYLOAD_BYTES = max(spec.max_payload_bytes for spec in ALL_TOPICS)
"""The largest payload of any topic: the broker's message_size_limit must be at least this."""


def spec_for(topic: str) -> tuple[TopicSpec, dict[str, str]]:
    """The kind of ``topic`` and its validated parameters; ProtocolError if it is not an mqvox topic."""
    for spec in ALL_TOPICS:
        params = spec.match(topic)
        if params is not None:
            for kind, value in params.items():
                check_identifier(kind, value)
            return spec, params
    raise ProtocolError(ErrorCode.BAD_TOPIC, "topic", f"{topic!r} is not a topic of {PREFIX}")


def shared_filter(group: str, spec: TopicSpec) -> str:
    """MQTT 5 shared subscription of ``group`` to every topic of ``spec``: each message goes to one member."""
    check_identifier("channel", group)  # same safe character set
    return f"$share/{group}/{spec.filter()}"
