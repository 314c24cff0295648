"""Properties of the protocol's receivers, with generated input (hypothesis).

Every valid message survives the wire unchanged; hostile payloads, JSON documents, MQTT properties and topics
are accepted as valid or refused with ProtocolError, never with another exception; identifiers that pass are
safe as one topic level; and the Opus codec returns bounded, finite samples or refuses with ProtocolError.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import math
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.opus import MAX_UTTERANCE_S, OPUS_SAMPLE_RATES, decode_opus, encode_opus
from common.recording import read_recording
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.model import MAX_BLOB_META_BYTES, Detection, Frontend, ModelBlob, ModelManifest, RolloutStage
from schemas.protocol import MESSAGE_TYPES, Message, decode, encode
from schemas.reply import CloudReply
from schemas.result import ErrorInfo, Result, Source
from schemas.status import DeviceState, DeviceStatus, OtaProgress, OtaState
from schemas.topics import MANIFEST, META_PROPERTY, MODEL_BLOB, UTTERANCE, check_identifier, spec_for
from schemas.utterance import MAX_META_BYTES, Hypothesis, UploadReason, Utterance
from schemas.validation import validate

from .conftest import IN_VOCABULARY_SAMPLE

FIXTURES = Path(__file__).resolve().parent.parent / "schemas" / "fixtures"

# No example database: it would be written into the working tree (.hypothesis/), and every run starts fresh.
QUICK = settings(max_examples=100, deadline=None, database=None)
SLOW = settings(max_examples=40, deadline=None, database=None)

# ---------------------------------------------------------------------------------------------------------------
# Valid messages, field by field, within what json/*.schema.json allows.


def _matching(pattern: str) -> st.SearchStrategy[str]:
    return st.from_regex(pattern, fullmatch=True)


device_ids = _matching(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
utterance_ids = _matching(r"[A-Za-z0-9_-]{8,64}")
names = _matching(r"[a-z][a-z0-9_]{0,63}")
versions = st.tuples(*[st.integers(0, 999_999)] * 3).map(lambda parts: "{}.{}.{}".format(*parts))
sha256s = _matching(r"[0-9a-f]{64}")
probabilities = st.floats(0, 1)
unix_times = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
# Slots and texts stay small enough that every message fits its topic's size limit, so a round trip never fails
# on size; the hostile tests below go over the limits on purpose.
slots = st.dictionaries(names, st.integers() | st.text(max_size=16), max_size=3)


@st.composite
def replies(draw: st.DrawFn) -> CloudReply:
    error = draw(st.none() | st.builds(ErrorInfo, st.sampled_from(ErrorCode), st.text(min_size=1, max_size=200)))
    timings = draw(st.dictionaries(_matching(r"[a-z][a-z0-9_]{0,31}"), st.floats(0, 1e9), max_size=6))
    return CloudReply(
        device_id=draw(device_ids),
        utterance_id=draw(utterance_ids),
        transcript=draw(st.none() | st.text(max_size=300)),
        intent=None if error else draw(st.none() | names),  # the schema: an error reply has no intent
        slots=draw(slots),
        confidence=draw(probabilities),
        timings_ms=timings | {"total": draw(st.floats(0, 1e9))},
        error=error,
        sent_at=draw(unix_times),
    )


@st.composite
def results(draw: st.DrawFn) -> Result:
    error = draw(st.none() | st.builds(ErrorInfo, st.sampled_from(ErrorCode), st.text(min_size=1, max_size=200)))
    timings = draw(st.dictionaries(_matching(r"[a-z][a-z0-9_]{0,31}"), st.floats(0, 1e9), max_size=6))
    intent = None if error else draw(st.none() | names)  # the schema: an error result has no intent
    return Result(
        device_id=draw(device_ids),
        utterance_id=draw(utterance_ids),
        source=draw(st.sampled_from(Source)),
        transcript=draw(st.none() | st.text(max_size=300)),
        intent=intent,
        slots=draw(slots),
        confidence=draw(probabilities),
        timings_ms=timings | {"total": draw(st.floats(0, 1e9))},
        error=error,
        acted=intent is not None and draw(st.booleans()),  # and nothing is acted on without an intent
        sent_at=draw(unix_times),
    )


statuses = st.builds(
    DeviceStatus,
    device_id=device_ids,
    state=st.sampled_from(DeviceState),
    software_version=versions,
    model_version=st.none() | versions,
    channel=st.none() | device_ids,
    uptime_s=st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    counters=st.dictionaries(names, st.integers(0, 2**64), max_size=8),
    ota=st.none() | st.builds(OtaProgress, st.sampled_from(OtaState), versions, st.none() | st.text(max_size=200)),
    sent_at=unix_times,
)

error_reports = st.builds(
    ErrorReport,
    code=st.sampled_from(ErrorCode),
    message=st.text(min_size=1, max_size=200),
    reporter=st.text(min_size=1, max_size=128),
    topic_name=st.none() | st.text(max_size=200),
    device_id=st.none() | st.text(max_size=100),
    utterance_id=st.none() | st.text(max_size=100),
    sent_at=unix_times,
)

frontends = st.builds(
    Frontend,
    kind=st.sampled_from(["mfcc", "logfbank"]),
    sample_rate=st.sampled_from([8000, 16000]),
    window_s=st.floats(0, 0.1, exclude_min=True),
    step_s=st.floats(0, 0.1, exclude_min=True),
    num_filters=st.integers(1, 128),
    num_features=st.integers(1, 128),
    fft_size=st.integers(64, 4096),
    low_hz=st.floats(0, 1e5),
    high_hz=st.floats(0, 1e5, exclude_min=True),
    preemphasis=st.floats(0, 1),
    frames=st.integers(1, 1000),
    window=st.sampled_from(["hamming", "hann", "rectangular"]),
    energy_floor=st.floats(0, 1e6, exclude_min=True),
)

detections = st.builds(
    Detection,
    wake_label=st.text(min_size=1, max_size=32),
    wake_threshold=probabilities,
    stride_frames=st.integers(1, 1000),
    smoothing_windows=st.integers(1, 100),
    refractory_s=st.floats(0, 60),
    command_threshold=probabilities,
)

manifests = st.builds(
    ModelManifest,
    channel=device_ids,
    version=versions,
    sha256=sha256s,
    size_bytes=st.integers(1, 4 * 1024 * 1024),
    frontend=frontends,
    labels=st.lists(st.text(min_size=1, max_size=32), min_size=2, max_size=8, unique=True).map(tuple),
    detection=detections,
    min_device_version=versions,
    stage=st.builds(
        RolloutStage,
        name=st.text(min_size=1, max_size=64),
        devices=st.lists(device_ids, max_size=4, unique=True).map(tuple),
        percent=st.floats(0, 100),
    ),
    key_id=_matching(r"[0-9a-f]{16}"),
    signature=st.binary(min_size=64, max_size=64).map(lambda raw: base64.b64encode(raw).decode("ascii")),
    release_notes=st.text(max_size=200),
    rollback=st.booleans(),
    created_at=unix_times,
)

model_blobs = st.builds(ModelBlob, channel=device_ids, version=versions, model=st.binary(min_size=1, max_size=2048))

utterances = st.builds(
    Utterance,
    device_id=device_ids,
    utterance_id=utterance_ids,
    sample_rate=st.sampled_from(OPUS_SAMPLE_RATES),
    duration_s=st.floats(0, MAX_UTTERANCE_S, exclude_min=True),
    hypotheses=st.lists(st.builds(Hypothesis, st.none() | names, slots, probabilities), max_size=5).map(tuple),
    model_version=st.none() | versions,
    reason=st.sampled_from(UploadReason),
    # Receivers check only the OGG magic before decoding (decode_opus is tested on its own below).
    audio=st.binary(max_size=2048).map(lambda tail: b"OggS" + tail),
    captured_at=unix_times,
    share_for_training=st.booleans(),
)

MESSAGES: dict[str, st.SearchStrategy[Message]] = {
    "utterance": utterances,
    "reply": replies(),
    "result": results(),
    "status": statuses,
    "error": error_reports,
    "manifest": manifests,
    "model_blob": model_blobs,
}
KINDS = sorted(MESSAGES)
META_KINDS = {"utterance", "model_blob"}
"""Messages whose JSON travels in the mqvox-meta user property; the others' JSON is the payload."""


def test_every_message_type_of_the_protocol_has_a_generator() -> None:
    assert set(MESSAGES) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
@pytest.mark.slow
def test_every_valid_message_survives_encode_and_decode_unchanged(kind: str, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[kind])
    topic, envelope = encode(message)
    assert topic == message.topic()
    assert envelope.content_type == message.spec.content_type
    assert decode(topic, envelope) == message


# ---------------------------------------------------------------------------------------------------------------
# Hostile input: whatever arrives is a valid message or a ProtocolError.


def accepted_or_refused(topic: str, envelope: Envelope) -> Message | None:
    """The message ``decode`` accepts, or None when it refuses with ProtocolError; any other exception escapes."""
    try:
        return decode(topic, envelope)
    except ProtocolError as error:
        assert isinstance(error.code, ErrorCode)
        assert str(error)  # a sentence, for the error report
        return None


def document_of(kind: str, envelope: Envelope) -> Any:
    """The JSON document of a valid envelope: its payload, or its mqvox-meta user property."""
    if kind in META_KINDS:
        return json.loads(envelope.user_property(META_PROPERTY, kind))
    return json.loads(envelope.payload)


def with_document(kind: str, envelope: Envelope, text: str) -> Envelope:
    """``envelope`` carrying ``text`` where its JSON document goes."""
    if kind in META_KINDS:
        others = tuple(pair for pair in envelope.user_properties if pair[0] != META_PROPERTY)
        return dataclasses.replace(envelope, user_properties=((META_PROPERTY, text), *others))
    return dataclasses.replace(envelope, payload=text.encode("utf-8"))


class RawNumber(str):
    """A number written as this JSON text: valid JSON that a double cannot hold (1e999) or Python refuses to parse."""


def hostile_json(document: Any) -> str:
    """``document`` as JSON text, NaN and infinities written as Python writes them and RawNumbers as they are."""
    raws: list[str] = []

    def placeholders(value: Any) -> Any:
        if isinstance(value, RawNumber):
            raws.append(str(value))
            return f"\x00raw{len(raws) - 1}\x00"
        if isinstance(value, dict):
            return {key: placeholders(item) for key, item in value.items()}
        if isinstance(value, list):
            return [placeholders(item) for item in value]
        return value

    text = json.dumps(placeholders(document))  # allow_nan: NaN, Infinity and -Infinity literals
    for index, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{index}\x00"), raw)
    return text


def paths_in(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (keys and indexes) to a value inside a JSON document, the document itself first."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_in(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_in(item, (*prefix, index))
    return found


def value_at(document: Any, path: tuple) -> Any:
    """The value at ``path`` inside ``document``."""
    return functools.reduce(lambda value, step: value[step], path, document)


def replaced(document: Any, path: tuple, value: Any) -> Any:
    """A copy of ``document`` with the value at ``path`` set to ``value``."""
    if not path:
        return value
    copy = json.loads(json.dumps(document))
    value_at(copy, path[:-1])[path[-1]] = value
    return copy


def removed(document: Any, path: tuple) -> Any:
    """A copy of ``document`` without the value at ``path`` (``path`` not empty)."""
    copy = json.loads(json.dumps(document))
    del value_at(copy, path[:-1])[path[-1]]
    return copy


UNPARSEABLE_NUMBERS = [RawNumber("1e999"), RawNumber("-1e999"), RawNumber("1" + "0" * 5000), RawNumber("1e-999")]
"""JSON numbers Python cannot hold as written: overflow, too many digits (int_max_str_digits), underflow."""

hostile_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -1, 0, 2**63, -(2**64), 1e308, -1e-308, 16000.0]),
    st.sampled_from(UNPARSEABLE_NUMBERS),
    st.text(max_size=30),
    st.sampled_from(["", "x" * 100_000, "é" * 3000, "\x00", "+", "#", "a/b", "pi-1\n"]),
    st.lists(st.integers() | st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)
"""What one field of a valid document becomes: wrong types, out of range, NaN, infinity, huge strings."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=24,
)


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
def test_arbitrary_payload_bytes_are_accepted_or_refused_with_a_protocol_error(kind: str, data: st.DataObject) -> None:
    topic, envelope = encode(data.draw(MESSAGES[kind]))
    payload = data.draw(
        st.binary(max_size=4096)
        | st.binary(max_size=512).map(lambda tail: b"OggS" + tail)
        | st.binary(max_size=512).map(lambda tail: envelope.payload[: len(envelope.payload) // 2] + tail)
    )
    accepted_or_refused(topic, dataclasses.replace(envelope, payload=payload))


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
@pytest.mark.slow
def test_arbitrary_json_values_are_accepted_or_refused_with_a_protocol_error(kind: str, data: st.DataObject) -> None:
    topic, envelope = encode(data.draw(MESSAGES[kind]))
    accepted_or_refused(topic, with_document(kind, envelope, json.dumps(data.draw(json_values))))


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
@pytest.mark.slow
def test_a_valid_document_with_one_field_made_hostile_is_accepted_or_refused_with_a_protocol_error(
    kind: str, data: st.DataObject
) -> None:
    topic, envelope = encode(data.draw(MESSAGES[kind]))
    document = document_of(kind, envelope)
    path = data.draw(st.sampled_from(paths_in(document)), label="path")
    change = data.draw(st.sampled_from(["replace", "remove", "add beside"]), label="change")
    if change == "remove" and path:
        hostile = removed(document, path)
    elif change == "add beside" and isinstance(value_at(document, path), dict):
        hostile = replaced(document, (*path, "unknown_field"), data.draw(hostile_values))
    else:
        hostile = replaced(document, path, data.draw(hostile_values))
    accepted_or_refused(topic, with_document(kind, envelope, hostile_json(hostile)))


mqtt_texts = st.text(max_size=64) | st.sampled_from(["", "mqvox/v1/devices/+/result", "#", "\x00", "é" * 40])


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
@pytest.mark.slow
def test_hostile_mqtt_properties_are_accepted_or_refused_with_a_protocol_error(kind: str, data: st.DataObject) -> None:
    topic, envelope = encode(data.draw(MESSAGES[kind]))
    meta = [pair for pair in envelope.user_properties if pair[0] == META_PROPERTY]
    user_properties = data.draw(
        st.just(envelope.user_properties)
        | st.lists(st.tuples(mqtt_texts | st.just(META_PROPERTY), mqtt_texts), max_size=4).map(tuple)
        | st.just(tuple(meta * 2))  # the metadata given twice
        | mqtt_texts.map(lambda value: ((META_PROPERTY, value),))
        | st.lists(st.tuples(mqtt_texts, mqtt_texts), max_size=3).map(lambda extra: (*envelope.user_properties, *extra))
    )
    hostile = Envelope(
        payload=envelope.payload,
        content_type=data.draw(st.just(envelope.content_type) | st.none() | mqtt_texts),
        user_properties=user_properties,
        response_topic=data.draw(st.just(envelope.response_topic) | st.none() | mqtt_texts),
        correlation_data=data.draw(st.just(envelope.correlation_data) | st.none() | st.binary(max_size=300)),
    )
    accepted_or_refused(topic, hostile)


topic_levels = st.sampled_from(
    ["mqvox", "v1", "devices", "models", "blobs", "utterance", "result", "status", "manifest", "errors", "+", "#", ""]
) | st.text(max_size=12)


@pytest.mark.parametrize("kind", KINDS)
@QUICK
@given(data=st.data())
@pytest.mark.slow
def test_a_message_on_any_topic_is_accepted_there_only_if_it_belongs_there(kind: str, data: st.DataObject) -> None:
    message = data.draw(MESSAGES[kind])
    _, envelope = encode(message)
    # Anything, or a topic of the message's own kind whose ids may be another device's, channel's or version's.
    ids = {param: data.draw(versions if param == "version" else device_ids) for param in message.spec.params}
    topic = data.draw(
        st.lists(topic_levels, max_size=7).map("/".join) | st.text(max_size=200) | st.just(message.spec.topic(**ids))
    )
    accepted = accepted_or_refused(topic, envelope)
    assert accepted is None or (topic == message.topic() and accepted == message)


@functools.cache
def fixed_messages() -> dict[str, Message]:
    """One valid message of each kind, mostly from schemas/fixtures/, with numbers in most fields that take one."""

    def load(kind: str, name: str) -> dict[str, Any]:
        return json.loads((FIXTURES / kind / "valid" / f"{name}.json").read_text())

    meta = load("utterance", "low_confidence")
    return {
        "utterance": Utterance(
            **{key: value for key, value in meta.items() if key not in ("hypotheses", "reason")},
            hypotheses=tuple(Hypothesis(h["intent"], h["slots"], h["score"]) for h in meta["hypotheses"]),
            reason=UploadReason(meta["reason"]),
            audio=b"OggS" + bytes(64),
        ),
        "reply": CloudReply.from_dict(load("reply", "digit")),
        "result": Result.from_dict(load("result", "edge_digit")),
        "status": DeviceStatus.from_dict(load("status", "online")),
        "error": ErrorReport.from_dict(load("error", "bad_audio")),
        "manifest": ModelManifest.from_dict(load("manifest", "canary")),
        "model_blob": ModelBlob("stable", "1.2.0", b"model"),
    }


SIZE_LIMITS = {"utterance": MAX_META_BYTES, "model_blob": MAX_BLOB_META_BYTES}
"""Largest JSON document of the kinds whose JSON is metadata; the others' is their topic's payload limit."""


@pytest.mark.parametrize("kind", KINDS)
@SLOW
@given(depth=st.integers(1, 70_000), opener=st.sampled_from(["[", '{"a":']))
@example(depth=5000, opener="[")  # deeper than the parser follows, where the size limit lets it
def test_json_nested_deeper_than_the_parser_follows_is_refused_with_a_protocol_error(
    kind: str, depth: int, opener: str
) -> None:
    # json.loads raises RecursionError, not ValueError, about a thousand levels down; a document under every
    # size limit gets there.
    topic, envelope = encode(fixed_messages()[kind])
    levels = min(depth, SIZE_LIMITS.get(kind, MESSAGE_TYPES[kind].spec.max_payload_bytes) // len(opener))
    accepted_or_refused(topic, with_document(kind, envelope, opener * levels))


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_receiver_accepts_it_can_send_again_unchanged(kind: str) -> None:
    # Every number of the document, in turn, written as a number a double cannot hold. A receiver that accepts it
    # holds infinity, which no sender may write (encode_json: allow_nan=False): that is an error, and a
    # ProtocolError at the receiver, not a ValueError at whoever passes the message on.
    message = fixed_messages()[kind]
    topic, envelope = encode(message)
    document = document_of(kind, envelope)
    numbers = [
        path
        for path in paths_in(document)
        if isinstance(value_at(document, path), int | float) and not isinstance(value_at(document, path), bool)
    ]
    assert numbers
    problems = []
    for path in numbers:
        for raw in UNPARSEABLE_NUMBERS[:2]:
            received = accepted_or_refused(
                topic, with_document(kind, envelope, hostile_json(replaced(document, path, raw)))
            )
            if received is None:
                continue
            try:
                again = decode(*encode(received))
            except Exception as error:
                problems.append(f"/{'/'.join(map(str, path))} = {raw}: accepted, then {type(error).__name__}: {error}")
                continue
            if again != received:
                problems.append(f"/{'/'.join(map(str, path))} = {raw}: accepted, then changed on the wire")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# Identifiers: what passes check_identifier is one safe topic level.

hostile_text = st.one_of(
    st.text(),
    st.text(alphabet="aZ09_.-+#/$ \x00\n\t\u00e9\u0440\u200b\u202e\U0001f3a4", max_size=80),
    st.text(alphabet="abc-", min_size=60, max_size=300),
    device_ids,
    device_ids.map(lambda value: value + "\n"),
    versions,
)
IDENTIFIER_TOPICS = {
    "device_id": lambda value: UTTERANCE.topic(device_id=value),
    "channel": lambda value: MANIFEST.topic(channel=value),
    "version": lambda value: MODEL_BLOB.topic(channel="stable", version=value),
}


@QUICK
@given(kind=st.sampled_from(sorted(IDENTIFIER_TOPICS)), value=hostile_text | st.none() | st.integers() | st.binary())
def test_check_identifier_passes_only_values_that_are_one_safe_topic_level(kind: str, value: Any) -> None:
    try:
        returned = check_identifier(kind, value)
    except ProtocolError as error:
        assert error.code == ErrorCode.BAD_TOPIC
        return
    assert returned == value
    assert not set(value) & set("+#/\x00"), value
    assert value.isascii() and value.isprintable() and not value.startswith("$") and 1 <= len(value) <= 64
    topic = IDENTIFIER_TOPICS[kind](value)
    assert spec_for(topic)[1][kind] == value  # it parses back as the same single level


SCHEMA_FIELDS = {
    "device_id": ("result", "device_id"),
    "channel": ("status", "channel"),
    "version": ("status", "software_version"),
}
"""A message field whose schema is each identifier's definition in json/common.schema.json."""


@QUICK
@given(kind=st.sampled_from(sorted(SCHEMA_FIELDS)), value=hostile_text)
@example(kind="device_id", value="pi-1\n")
@example(kind="version", value="1.2.0\n")
def test_the_json_schemas_accept_exactly_the_identifiers_that_check_identifier_accepts(kind: str, value: str) -> None:
    # json/common.schema.json and check_identifier share one pattern; the schema must mean the same by it. In JSON
    # Schema (ECMA 262) '$' is the end of the text; in Python's re.search it also matches before a final newline.
    schema, field = SCHEMA_FIELDS[kind]
    document = json.loads(
        (FIXTURES / schema / "valid" / ("online.json" if schema == "status" else "edge_digit.json")).read_text()
    )
    try:
        validate(schema, document | {field: value})
        schema_accepts = True
    except ProtocolError:
        schema_accepts = False
    try:
        check_identifier(kind, value)
        identifier_accepts = True
    except ProtocolError:
        identifier_accepts = False
    assert schema_accepts == identifier_accepts, (
        f"{value!r}: schema {schema_accepts}, check_identifier {identifier_accepts}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Audio: decode_opus returns bounded, finite samples or refuses; encode_opus encodes or refuses.

AUDIO_CODES = {ErrorCode.BAD_AUDIO, ErrorCode.MISMATCH, ErrorCode.AUDIO_TOO_LONG}
DECODE_BUDGET_S = 5.0
"""Longest one decode may take: the limit of 20 s of audio bounds the work, whatever the bytes say."""


@functools.cache
def speech(rate: int) -> np.ndarray:
    """Real speech, from samples/, at ``rate``."""
    return read_recording(IN_VOCABULARY_SAMPLE, rate)


@functools.cache
def real_opus(rate: int = 16000) -> bytes:
    """Real speech as a device encodes it at ``rate``."""
    return encode_opus(speech(rate), rate)


def bounded_or_refused(data: bytes, expected_rate: int) -> np.ndarray | None:
    """decode_opus's samples after checking their bounds, or None when it refused with ProtocolError."""
    started = time.monotonic()
    try:
        samples = decode_opus(data, expected_rate=expected_rate)
    except ProtocolError as error:
        samples = None
        assert error.code in AUDIO_CODES, error
    elapsed = time.monotonic() - started
    assert elapsed < DECODE_BUDGET_S, f"decoding {len(data)} bytes took {elapsed:.1f} s"
    if samples is not None:
        assert samples.dtype == np.float32 and samples.ndim == 1
        assert 0 < samples.size <= MAX_UTTERANCE_S * expected_rate
        assert np.isfinite(samples).all()
    return samples


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
        table.append(crc)
    return table


OGG_CRC_TABLE = _crc_table()
"""OGG's page checksum: CRC-32, polynomial 0x04C11DB7, not reflected (zlib's crc32 is the reflected one)."""


def ogg_pages(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each whole OGG page at the start of ``data``."""
    pages, start = [], 0
    while start + 27 <= len(data) and data[start : start + 4] == b"OggS":
        segments = data[start + 26]
        end = start + 27 + segments + sum(data[start + 27 : start + 27 + segments])
        if end > len(data):
            break
        pages.append((start, end))
        start = end
    return pages


def with_valid_checksums(data: bytes) -> bytes:
    """``data`` with each page's CRC recomputed, so libogg passes an edited page on to the Opus decoder."""
    fixed = bytearray(data)
    for start, end in ogg_pages(data):
        page = bytearray(fixed[start:end])
        page[22:26] = bytes(4)
        crc = 0
        for byte in page:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ OGG_CRC_TABLE[((crc >> 24) ^ byte) & 0xFF]
        fixed[start + 22 : start + 26] = struct.pack("<I", crc)
    return bytes(fixed)


def test_the_checksum_helper_reproduces_libsndfiles_own_checksums() -> None:
    # Otherwise the edited streams below would only ever test libogg's checksum check.
    assert with_valid_checksums(real_opus()) == real_opus()


rates = st.sampled_from(OPUS_SAMPLE_RATES)


@QUICK
@given(data=st.binary(max_size=4096), rate=rates)
def test_decoding_arbitrary_bytes_gives_bounded_finite_samples_or_a_protocol_error(data: bytes, rate: int) -> None:
    bounded_or_refused(data, rate)


@QUICK
@given(tail=st.binary(max_size=4096), rate=rates, headers=st.integers(0, 2))
def test_decoding_bytes_that_start_like_ogg_gives_bounded_finite_samples_or_a_protocol_error(
    tail: bytes, rate: int, headers: int
) -> None:
    # After nothing, after the OpusHead page, or after both header pages of a real stream.
    pages = ogg_pages(real_opus(rate))
    prefix = real_opus(rate)[: pages[headers - 1][1]] if headers else b"OggS"
    bounded_or_refused(prefix + tail, rate)


@SLOW
@given(data=st.data(), rate=rates)
def test_truncated_real_opus_decodes_to_no_more_than_it_held_or_is_refused(data: st.DataObject, rate: int) -> None:
    whole = real_opus(rate)
    cut = data.draw(st.integers(0, len(whole) - 1), label="cut")
    samples = bounded_or_refused(whole[:cut], rate)
    if samples is not None:
        assert samples.size <= speech(rate).size


@SLOW
@given(data=st.data(), rate=rates)
def test_bit_flipped_real_opus_gives_bounded_finite_samples_or_a_protocol_error(data: st.DataObject, rate: int) -> None:
    stream = bytearray(real_opus(rate))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 7)), min_size=1, max_size=32))
    for index, bit in flips:
        stream[index] ^= 1 << bit
    bounded_or_refused(bytes(stream), rate)


@SLOW
@given(data=st.data(), rate=rates, expected=rates)
def test_real_opus_with_edited_pages_and_valid_checksums_gives_bounded_finite_samples_or_a_protocol_error(
    data: st.DataObject, rate: int, expected: int
) -> None:
    # Past libogg's checksum: header fields (channels, pre-skip, gain, rate) and packets reach libopus.
    stream = bytearray(real_opus(rate))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for index, value in edits:
        stream[index] = value
    bounded_or_refused(with_valid_checksums(bytes(stream)), expected)


@SLOW
@given(stream_rate=rates, expected=rates)
def test_real_opus_is_decoded_only_at_the_rate_it_was_encoded_at(stream_rate: int, expected: int) -> None:
    samples = bounded_or_refused(real_opus(stream_rate), expected)
    assert (samples is not None) == (stream_rate == expected)


@settings(max_examples=10, deadline=None, database=None)
@given(seconds=st.floats(MAX_UTTERANCE_S + 0.01, 60), rate=rates)
@pytest.mark.slow
def test_a_stream_longer_than_the_limit_is_refused_as_too_long(seconds: float, rate: int) -> None:
    # Written by soundfile directly: encode_opus itself refuses it.
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(int(seconds * rate), dtype=np.float32), rate, format="OGG", subtype="OPUS")
    with pytest.raises(ProtocolError) as refused:
        decode_opus(buffer.getvalue(), expected_rate=rate)
    assert refused.value.code == ErrorCode.AUDIO_TOO_LONG


float_arrays = st.one_of(
    hnp.arrays(np.float32, st.integers(0, 4000), elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
    hnp.arrays(np.float64, st.integers(0, 4000), elements=st.floats(allow_nan=True, allow_infinity=True)),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=8), elements=st.floats(-1, 1, width=32)),
)
any_rates = rates | st.sampled_from([0, -16000, 11025, 22050, 44100, 96000])


def encodable(samples: np.ndarray, rate: int) -> bool:
    """What encode_opus promises to encode: mono, non-empty, finite as float32, at an Opus rate, at most 20 s."""
    with np.errstate(over="ignore"):
        finite = bool(np.isfinite(samples.astype(np.float32)).all())
    return (
        rate in OPUS_SAMPLE_RATES
        and samples.ndim == 1
        and samples.size > 0
        and finite
        and samples.size / rate <= MAX_UTTERANCE_S
    )


@QUICK
@given(samples=float_arrays, rate=any_rates)
def test_encoding_any_float_array_gives_opus_of_its_length_or_a_protocol_error(samples: np.ndarray, rate: int) -> None:
    try:
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes infinity, and is refused
            encoded = encode_opus(samples, rate)
    except ProtocolError as error:
        assert error.code in {ErrorCode.BAD_AUDIO, ErrorCode.AUDIO_TOO_LONG}
        assert not encodable(samples, rate), error
        return
    assert encodable(samples, rate)
    assert encoded.startswith(b"OggS")
    decoded = bounded_or_refused(encoded, rate)
    assert decoded is not None and decoded.size == samples.size


@settings(max_examples=15, deadline=None, database=None)
@given(seconds=st.floats(0.001, 2 * MAX_UTTERANCE_S), rate=rates, level=st.floats(-4, 4))
def test_encoding_a_constant_signal_of_any_length_gives_opus_of_its_length_or_refuses_it_as_too_long(
    seconds: float, rate: int, level: float
) -> None:
    samples = np.full(max(int(seconds * rate), 1), level, dtype=np.float32)
    if samples.size / rate > MAX_UTTERANCE_S:
        with pytest.raises(ProtocolError) as refused:
            encode_opus(samples, rate)
        assert refused.value.code == ErrorCode.AUDIO_TOO_LONG
        return
    decoded = bounded_or_refused(encode_opus(samples, rate), rate)
    assert decoded is not None and decoded.size == samples.size
