"""What travels in one MQTT 5 PUBLISH besides its topic: payload and properties."""

from __future__ import annotations

from dataclasses import dataclass

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.errors import ErrorCode, ProtocolError


@dataclass(frozen=True)
class Envelope:
    """A message as it is on the wire: bytes plus the MQTT 5 properties mqvox uses."""

    payload: bytes
    """The message body: JSON, Opus in OGG, or a .tflite model."""
    content_type: str | None
    """MQTT 5 Content Type; every mqvox sender sets it."""
    user_properties: tuple[tuple[str, str], ...] = ()
    """MQTT 5 User Properties, in order."""
    response_topic: str | None = None
    """MQTT 5 Response Topic of a request."""
    correlation_data: bytes | None = None
    """MQTT 5 Correlation Data, echoed by whoever answers."""

    def properties(self) -> Properties:
        """paho Properties for a PUBLISH of this envelope."""
        properties = Properties(PacketTypes.PUBLISH)
        if self.content_type is not None:
            properties.ContentType = self.content_type
        if self.user_properties:
            properties.UserProperty = list(self.user_properties)
        if self.response_topic is not None:
            properties.ResponseTopic = self.response_topic
        if self.correlation_data is not None:
            properties.CorrelationData = self.correlation_data
        return properties

    @classmethod
    def from_mqtt(cls, payload: bytes, properties: Properties | None) -> Envelope:
        """The envelope of a received message (``message.payload``, ``message.properties``)."""

        def read(name: str):
            return getattr(properties, name, None) if properties is not None else None

        return cls(
            payload=bytes(payload),
            content_type=read("ContentType"),
            user_properties=tuple(tuple(pair) for pair in (read("UserProperty") or ())),
            response_topic=read("ResponseTopic"),
            correlation_data=read("CorrelationData"),
        )

    def user_property(self, key: str, what: str) -> str:
        """The single value of user property ``key``; ProtocolError if it is missing or repeated."""
        values = [value for name, value in self.user_properties if name == key]
        if len(values) != 1:
            problem = "missing" if not values else f"given {len(values)} times"
            raise ProtocolError(ErrorCode.MISSING_PROPERTY, what, f"user property {key!r} is {problem}")
        return values[0]

    def expect_content_type(self, expected: str, what: str) -> None:
        """Raise ProtocolError unless the Content Type is ``expected``."""
        if self.content_type != expected:
            raise ProtocolError(
                ErrorCode.WRONG_CONTENT_TYPE, what, f"content type is {self.content_type!r}, expected {expected!r}"
            )
