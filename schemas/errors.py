"""The one error type for anything that breaks the mqvox protocol."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a message could not be handled.

    Mirrors ``$defs/error_code`` in json/common.schema.json (a test keeps them equal):
    the same codes travel in results and on the error topic.
    """

    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    WRONG_CONTENT_TYPE = "wrong_content_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    BAD_TOPIC = "bad_topic"
    MISSING_PROPERTY = "missing_property"
    MISMATCH = "mismatch"
    BAD_AUDIO = "bad_audio"
    AUDIO_TOO_LONG = "audio_too_long"
    ASR_UNAVAILABLE = "asr_unavailable"
    ASR_FAILED = "asr_failed"
    CLOUD_TIMEOUT = "cloud_timeout"
    NOT_UNDERSTOOD = "not_understood"
    INTERNAL_ERROR = "internal_error"


class ProtocolError(ValueError):
    """A message, topic or file that does not follow the mqvox v1 protocol.

    ``str(error)`` is a sentence a person can act on; ``code`` is what a program
    reports on the error topic.
    """

    def __init__(self, code: ErrorCode, what: str, reason: str, *, path: str = "") -> None:
        self.code = code
        """Machine-readable reason, one of :class:`ErrorCode`."""
        self.what = what
        """What was being read, e.g. ``"result"`` or ``"utterance audio"``."""
        self.reason = reason
        """Why it was refused."""
        self.path = path
        """JSON pointer to the offending value, when there is one."""
        where = f" at {path}" if path else ""
        super().__init__(f"invalid {what}{where}: {reason} [{code}]")
