"""Every schema against its valid and invalid fixtures, and every dataclass to and from the wire."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.model import ModelManifest
from schemas.protocol import MESSAGE_TYPES
from schemas.reply import CloudReply
from schemas.result import Result
from schemas.status import DeviceStatus
from schemas.topics import META_PROPERTY
from schemas.utterance import MAX_META_BYTES, Hypothesis, UploadReason, Utterance
from schemas.validation import SCHEMA_NAMES, decode_json, encode_json, schema_text, validate, validator

FIXTURES = Path(__file__).resolve().parent.parent / "schemas" / "fixtures"
MESSAGE_SCHEMAS = sorted(MESSAGE_TYPES)


def fixtures(kind: str) -> list[tuple[str, Path]]:
    return [(path.parent.parent.name, path) for path in sorted(FIXTURES.glob(f"*/{kind}/*.json"))]


def fixture_id(case: tuple[str, Path]) -> str:
    return f"{case[0]}/{case[1].stem}"


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_every_schema_is_valid_draft_2020_12(name: str) -> None:
    schema = json.loads(schema_text(name))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    validator(name)  # check_schema raises on an invalid schema


@pytest.mark.parametrize("name", MESSAGE_SCHEMAS)
def test_every_message_schema_has_valid_and_invalid_fixtures(name: str) -> None:
    assert len(list((FIXTURES / name / "valid").glob("*.json"))) >= 1
    assert len(list((FIXTURES / name / "invalid").glob("*.json"))) >= 3


@pytest.mark.parametrize("case", fixtures("valid"), ids=fixture_id)
def test_valid_fixture_passes(case: tuple[str, Path]) -> None:
    name, path = case
    validate(name, json.loads(path.read_text()))


@pytest.mark.parametrize("case", fixtures("invalid"), ids=fixture_id)
def test_invalid_fixture_is_refused_with_a_clear_error(case: tuple[str, Path]) -> None:
    name, path = case
    with pytest.raises(ProtocolError) as refused:
        decode_json(name, path.read_bytes(), max_bytes=1 << 20)
    assert refused.value.code == ErrorCode.SCHEMA_VIOLATION
    assert str(refused.value).startswith(f"invalid {name}")


JSON_MESSAGES = {
    "reply": CloudReply,
    "result": Result,
    "status": DeviceStatus,
    "error": ErrorReport,
    "manifest": ModelManifest,
}


@pytest.mark.parametrize("case", [case for case in fixtures("valid") if case[0] in JSON_MESSAGES], ids=fixture_id)
def test_json_message_round_trips_through_the_wire(case: tuple[str, Path]) -> None:
    name, path = case
    cls = JSON_MESSAGES[name]
    document = json.loads(path.read_text())
    message = cls.from_dict(document)
    envelope = message.to_wire()
    assert envelope.content_type == "application/json"
    assert json.loads(envelope.payload) == document
    assert cls.from_wire(envelope) == message


def test_error_codes_match_the_schema() -> None:
    common = json.loads(schema_text("common"))
    assert set(common["$defs"]["error_code"]["enum"]) == {str(code) for code in ErrorCode}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", ErrorCode.INVALID_JSON),
        (b"\xff\xfe", ErrorCode.INVALID_JSON),
        (b'{"confidence": NaN}', ErrorCode.INVALID_JSON),
        (b'{"confidence": Infinity}', ErrorCode.INVALID_JSON),
        (b"[]", ErrorCode.SCHEMA_VIOLATION),
        (b"{}", ErrorCode.SCHEMA_VIOLATION),
    ],
)
def test_malformed_payloads_get_one_clear_error_type(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as refused:
        Result.from_wire(Envelope(payload=payload, content_type="application/json"))
    assert refused.value.code == code


def test_error_names_the_offending_field() -> None:
    document = json.loads((FIXTURES / "result" / "valid" / "cloud_intent.json").read_text())
    document["confidence"] = 1.5
    with pytest.raises(ProtocolError) as refused:
        validate("result", document)
    assert refused.value.path == "/confidence"
    assert "/confidence" in str(refused.value)


def test_payload_over_the_topic_limit_is_refused_before_parsing() -> None:
    oversized = b'{"x":"' + b"a" * (16 * 1024) + b'"}'
    with pytest.raises(ProtocolError) as refused:
        Result.from_wire(Envelope(payload=oversized, content_type="application/json"))
    assert refused.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_wrong_content_type_is_refused() -> None:
    valid = (FIXTURES / "status" / "valid" / "online.json").read_bytes()
    with pytest.raises(ProtocolError) as refused:
        DeviceStatus.from_wire(Envelope(payload=valid, content_type="text/plain"))
    assert refused.value.code == ErrorCode.WRONG_CONTENT_TYPE


def test_senders_validate_too() -> None:
    document = json.loads((FIXTURES / "result" / "valid" / "cloud_intent.json").read_text())
    bad = Result.from_dict(document | {"confidence": 2.0})
    with pytest.raises(ProtocolError):
        bad.to_wire()
    with pytest.raises(ProtocolError) as refused:
        encode_json("result", document | {"transcript": "x" * 20000}, max_bytes=16 * 1024)
    assert refused.value.code in {ErrorCode.SCHEMA_VIOLATION, ErrorCode.PAYLOAD_TOO_LARGE}


def _utterance_of(meta: dict) -> Utterance:
    """The Utterance whose metadata document is ``meta``, with a stand-in OGG payload."""
    fields = {key: value for key, value in meta.items() if key not in ("hypotheses", "reason")}
    return Utterance(
        **fields,
        hypotheses=tuple(Hypothesis(h["intent"], h["slots"], h["score"]) for h in meta["hypotheses"]),
        reason=UploadReason(meta["reason"]),
        audio=b"OggS" + bytes(64),
    )


def test_consent_to_share_for_training_is_on_the_wire_only_when_given() -> None:
    before = json.loads((FIXTURES / "utterance" / "valid" / "low_confidence.json").read_text())
    silent = _utterance_of(before)
    assert silent.share_for_training is False
    assert "share_for_training" not in silent.meta()
    # A device that does not share sends byte for byte what it sent before the setting existed.
    sent = dict(silent.to_wire().user_properties)[META_PROPERTY]
    assert sent == encode_json("utterance", before, max_bytes=MAX_META_BYTES).decode()
    shared = dataclasses.replace(silent, share_for_training=True)
    assert shared.meta() == before | {"share_for_training": True}
    for utterance in (silent, shared):
        assert Utterance.from_wire(utterance.to_wire()) == utterance
    # A receiver takes an explicit false as no consent.
    explicit = encode_json("utterance", before | {"share_for_training": False}, max_bytes=MAX_META_BYTES).decode()
    envelope = dataclasses.replace(silent.to_wire(), user_properties=((META_PROPERTY, explicit),))
    assert Utterance.from_wire(envelope).share_for_training is False


def test_manifest_signature_covers_everything_but_itself() -> None:
    document = json.loads((FIXTURES / "manifest" / "valid" / "canary.json").read_text())
    manifest = ModelManifest.from_dict(document)
    signed = manifest.signing_bytes()
    assert b'"signature"' not in signed
    assert ModelManifest.from_dict(document | {"signature": "B" * 86 + "=="}).signing_bytes() == signed
    for field, value in [("version", "1.2.1"), ("sha256", "b" * 64), ("rollback", True)]:
        changed = document | {field: value}
        if field == "version":
            changed["blob_topic"] = "mqvox/v1/models/stable/blobs/1.2.1"
        assert ModelManifest.from_dict(changed).signing_bytes() != signed
    # Canonical: key order in the received JSON does not matter.
    reordered = dict(reversed(list(document.items())))
    assert ModelManifest.from_dict(reordered).signing_bytes() == signed


def test_manifest_blob_topic_must_name_its_own_version() -> None:
    document = json.loads((FIXTURES / "manifest" / "valid" / "canary.json").read_text())
    document["blob_topic"] = "mqvox/v1/models/stable/blobs/0.9.0"
    with pytest.raises(ProtocolError) as refused:
        ModelManifest.from_dict(document)
    assert refused.value.code == ErrorCode.MISMATCH


@pytest.mark.parametrize("junk", ["\x00\x1b\n\t" * 5000, "𝄞é" * 20000, '"\\' * 9000])
def test_error_reports_of_hostile_input_always_fit_their_topic(junk: str) -> None:
    error = ProtocolError(ErrorCode.BAD_TOPIC, "topic", f"{junk!r} is not a topic")
    report = ErrorReport.from_error(error, reporter=junk, topic=junk, device_id=junk, utterance_id=junk)
    envelope = report.to_wire()  # validates, and enforces the 8 KiB limit
    assert len(envelope.payload) <= 8 * 1024
    assert ErrorReport.from_wire(envelope) == report
