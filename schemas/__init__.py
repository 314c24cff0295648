"""The mqvox v1 protocol: topics, message dataclasses, JSON Schemas, vocabulary and the MQTT binding.

See schemas/README.md for the protocol itself.
"""

from schemas.errors import ErrorCode, ProtocolError

__all__ = ["ErrorCode", "ProtocolError"]
