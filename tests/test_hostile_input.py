"""Hostile utterances through a real Mosquitto to a real cloud worker.

Each is refused clearly: an error reply on the device's reply topic when the request can be trusted that far,
an error report on mqvox/v1/errors, a warning in the worker's log and its failure metric; or, where no MQTT
client may publish it, the broker drops it with a reason in its log. After each, the worker answers the next
valid utterance.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import logging
import math
import os
import queue
import re
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import pytest
import soundfile

from broker_config.broker import DEV_CONFIG
from cloud_worker.service import UtteranceService
from cloud_worker.settings import BatchSettings
from common.mqtt import MqttLink
from common.opus import encode_opus
from common.recording import read_recording
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.topics import ERROR, MAX_PAYLOAD_BYTES, META_PROPERTY, REPLY, RESULT, UTTERANCE
from schemas.utterance import Utterance, new_utterance_id

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, Inbox, make_utterance, wait_until
from .test_properties import ogg_pages, value_at, with_valid_checksums

pytestmark = pytest.mark.slow

_workers = itertools.count()


@dataclass
class Requester:
    """One device in front of one worker: where it publishes, and where its answers and the fleet's reports arrive."""

    worker: UtteranceService
    device_id: str
    link: MqttLink
    results: Inbox
    """Everything published on the device's reply topic, where the worker answers, and on its result topic, where
    the worker must never publish."""
    reports: Inbox
    """Everything published on mqvox/v1/errors."""

    @property
    def topic(self) -> str:
        return UTTERANCE.topic(device_id=self.device_id)

    def publish(self, envelope: Envelope, topic: str | None = None) -> None:
        """Publish as a device that ignores the protocol would: the envelope as it is, on any topic."""
        self.link.publish(topic or self.topic, envelope, qos=1, retain=False)


def requester_of(worker: UtteranceService, links, device_id: str) -> Requester:
    results, reports = Inbox(), Inbox()
    links().subscribe(REPLY.topic(device_id=device_id), results)
    links().subscribe(RESULT.topic(device_id=device_id), results)
    links().subscribe(ERROR.topic(), reports)
    return Requester(worker, device_id, links(), results, reports)


def start_worker(worker_factory, **settings) -> UtteranceService:
    # A group and a client id of its own: no other test's worker or session shares these utterances.
    name = f"hostile-{os.getpid()}-{next(_workers)}"
    return worker_factory(name, name, **settings)


@pytest.fixture
def requester(worker_factory, links, device_id: str, caplog: pytest.LogCaptureFixture) -> Requester:
    caplog.set_level(logging.INFO, logger="cloud_worker")
    return requester_of(start_worker(worker_factory), links, device_id)


def hostile_request(
    sender: str,
    /,
    *,
    payload: bytes | Callable[[bytes], bytes] | None = None,
    meta_text: Callable[[dict[str, Any]], str] = json.dumps,
    **meta_changes: Any,
) -> tuple[Utterance, Envelope]:
    """The request of a real utterance (make_utterance) with its payload or metadata replaced, however wrong.

    ``payload`` replaces the Opus, or makes the payload from it; ``meta_changes`` replace metadata fields, and
    ``meta_text`` writes the metadata (json.dumps writes NaN and infinities as the literals NaN and Infinity).
    """
    utterance = make_utterance(sender)
    envelope = utterance.to_wire()
    if callable(payload):
        payload = payload(envelope.payload)
    meta = json.loads(envelope.user_property(META_PROPERTY, "utterance")) | meta_changes
    hostile = dataclasses.replace(
        envelope,
        payload=envelope.payload if payload is None else payload,
        user_properties=((META_PROPERTY, meta_text(meta)),),
    )
    return utterance, hostile


def worker_errors(caplog: pytest.LogCaptureFixture) -> str:
    """What the worker logged as errors, to say why an expected answer never came."""
    return "\n".join(
        f"{record.getMessage()}: {record.exc_info[1]!r}" if record.exc_info else record.getMessage()
        for record in caplog.records
        if record.name.startswith("cloud_worker") and record.levelno >= logging.ERROR
    )


def next_result(requester: Requester, caplog: pytest.LogCaptureFixture, timeout_s: float = 15.0) -> CloudReply:
    try:
        answer = decode(*requester.results.get(timeout_s))
    except queue.Empty:
        raise AssertionError(
            f"no reply for {requester.device_id} in {timeout_s} s; worker errors: {worker_errors(caplog) or 'none'}"
        ) from None
    assert isinstance(answer, CloudReply), f"the worker published on the result topic: {answer}"
    return answer


def _printable(text: str) -> str:
    # As error reports carry what a message claimed (schemas.error_report._clip).
    return "".join(char if char.isprintable() else "?" for char in text)


def next_report_about(requester: Requester, caplog: pytest.LogCaptureFixture, topic: str) -> ErrorReport:
    while True:  # other tests' reports may still be on their way on the shared error topic
        try:
            report = decode(*requester.reports.get(10))
        except queue.Empty:
            raise AssertionError(
                f"no error report about {topic!r}; worker errors: {worker_errors(caplog) or 'none'}"
            ) from None
        if report.topic_name == _printable(topic):  # reports carry unprintable characters as '?'
            return report


def expect_refused(
    requester: Requester,
    caplog: pytest.LogCaptureFixture,
    codes: ErrorCode | set[ErrorCode],
    *,
    utterance_id: str | None,
    topic: str | None = None,
) -> ErrorReport:
    """Check every trace of one refusal: the error result (when ``utterance_id``, else none), report, log, metric."""
    codes = codes if isinstance(codes, set) else {codes}
    topic = topic or requester.topic
    if utterance_id is not None:
        answer = next_result(requester, caplog)
        assert answer.error is not None and answer.error.code in codes, f"expected a refusal {codes}, got {answer}"
        assert (answer.utterance_id, answer.intent, answer.transcript) == (utterance_id, None, None)
        assert answer.error.message
    report = next_report_about(requester, caplog, topic)
    assert report.code in codes, report
    assert report.reporter == requester.worker.reporter
    if utterance_id is not None:
        assert report.code == answer.error.code
    else:
        requester.results.expect_nothing()
    warnings = [
        record
        for record in caplog.records
        if record.name == "cloud_worker.service"
        and record.levelno == logging.WARNING
        and getattr(record, "code", None) == str(report.code)
        and getattr(record, "topic", None) == topic
    ]
    assert len(warnings) == 1, [record.getMessage() for record in caplog.records]
    assert requester.worker.metrics.failed.labels(str(report.code))._value.get() == 1
    if utterance_id is not None:  # refused input is reported, never stored
        assert requester.worker.store.answer_of(requester.device_id, utterance_id) is None
    return report


def the_worker_answers_the_next_utterance(requester: Requester, caplog: pytest.LogCaptureFixture) -> None:
    utterance = make_utterance(requester.device_id)  # "hey jarvis, turn on the lights"
    requester.link.send(utterance)
    answer = next_result(requester, caplog)
    assert (answer.utterance_id, answer.intent, answer.error) == (utterance.utterance_id, "lights_on", None), answer
    assert "turn on the lights" in answer.transcript.lower()


# ---------------------------------------------------------------------------------------------------------------
# Size and length


@pytest.mark.parametrize(
    "size", [UTTERANCE.max_payload_bytes + 1, MAX_PAYLOAD_BYTES], ids=["just-over-256KiB", "4MiB-the-broker-limit"]
)
def test_a_payload_over_the_utterance_limit_gets_a_payload_too_large_result(
    requester: Requester, caplog, size: int
) -> None:
    # Real Opus padded out: only its size is wrong. The broker forwards it (its limit is the 4 MiB of model blobs).
    utterance, envelope = hostile_request(requester.device_id, payload=lambda audio: audio.ljust(size, b"\0"))
    requester.publish(envelope)
    report = expect_refused(requester, caplog, ErrorCode.PAYLOAD_TOO_LARGE, utterance_id=utterance.utterance_id)
    assert str(size) in report.message
    the_worker_answers_the_next_utterance(requester, caplog)


TEN_MINUTES_S = 600
LOW_RATE = 8000


@pytest.fixture(scope="module")
def ten_minute_clips() -> dict[str, bytes]:
    """Ten minutes of OGG/Opus at 8 kHz, written by soundfile (encode_opus refuses anything over 20 s).

    Faint noise costs over 256 KiB; silence, about 137 kB, fits under the utterance limit.
    """
    signals = {
        "noise": (np.random.default_rng(7).standard_normal(TEN_MINUTES_S * LOW_RATE) * 0.05).astype(np.float32),
        "silence": np.zeros(TEN_MINUTES_S * LOW_RATE, dtype=np.float32),
    }
    clips = {}
    for name, samples in signals.items():
        buffer = io.BytesIO()
        soundfile.write(buffer, samples, LOW_RATE, format="OGG", subtype="OPUS")
        clips[name] = buffer.getvalue()
    assert len(clips["noise"]) > UTTERANCE.max_payload_bytes >= len(clips["silence"])
    return clips


@pytest.mark.parametrize(
    ("clip", "announced_s", "code"),
    [
        ("noise", 20.0, ErrorCode.PAYLOAD_TOO_LARGE),  # refused on its size, before any decoding
        ("silence", 20.0, ErrorCode.AUDIO_TOO_LONG),  # small enough: the decoder stops at 20 s
        ("silence", float(TEN_MINUTES_S), ErrorCode.SCHEMA_VIOLATION),  # honest metadata: over the schema's 20 s
    ],
    ids=["over-256KiB", "under-256KiB", "announced-as-600-s"],
)
def test_ten_minutes_of_audio_is_refused(
    requester: Requester, caplog, ten_minute_clips: dict[str, bytes], clip: str, announced_s: float, code: ErrorCode
) -> None:
    utterance, envelope = hostile_request(
        requester.device_id, payload=ten_minute_clips[clip], sample_rate=LOW_RATE, duration_s=announced_s
    )
    requester.publish(envelope)
    expect_refused(requester, caplog, code, utterance_id=utterance.utterance_id)
    the_worker_answers_the_next_utterance(requester, caplog)


@pytest.mark.parametrize(
    ("payload", "changes", "code"),
    [
        (b"", {}, ErrorCode.BAD_AUDIO),
        (b"OggS", {}, ErrorCode.BAD_AUDIO),
        (None, {"duration_s": 0}, ErrorCode.SCHEMA_VIOLATION),
    ],
    ids=["empty-payload", "ogg-magic-alone", "zero-duration-in-metadata"],
)
def test_zero_length_audio_is_refused(
    requester: Requester, caplog, payload: bytes | None, changes: dict, code: ErrorCode
) -> None:
    # An OGG stream holding no samples is tested in test_cloud_worker.py.
    utterance, envelope = hostile_request(requester.device_id, payload=payload, **changes)
    requester.publish(envelope)
    expect_refused(requester, caplog, code, utterance_id=utterance.utterance_id)
    the_worker_answers_the_next_utterance(requester, caplog)


# ---------------------------------------------------------------------------------------------------------------
# Corrupt Opus: real speech, damaged the ways a link or a buggy encoder damages it.


def _opus_head(stream: bytes) -> int:
    """Offset of the OpusHead packet: the first page's body."""
    return 27 + stream[26]


def _headers_only(stream: bytes) -> bytes:
    return stream[: ogg_pages(stream)[1][1]]


def _page_failing_its_checksum(stream: bytes) -> bytes:
    start, end = ogg_pages(stream)[3]
    damaged = bytearray(stream)
    damaged[(start + end) // 2] ^= 0xFF
    return bytes(damaged)


def _opus_head_overwritten(stream: bytes) -> bytes:
    head = _opus_head(stream)
    return with_valid_checksums(stream[:head] + b"OpusHeaX" + stream[head + 8 :])


def _stereo_header(stream: bytes) -> bytes:
    damaged = bytearray(stream)
    damaged[_opus_head(stream) + 9] = 2  # channel count
    return with_valid_checksums(bytes(damaged))


def _audio_packets_zeroed(stream: bytes) -> bytes:
    damaged = bytearray(stream)
    for start, end in ogg_pages(stream)[2:]:
        body = start + 27 + stream[start + 26]
        damaged[body:end] = bytes(end - body)
    return with_valid_checksums(bytes(damaged))


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        (_headers_only, ErrorCode.BAD_AUDIO),
        (lambda stream: stream[: len(stream) // 2], ErrorCode.MISMATCH),  # decodes, to less than announced
        (_page_failing_its_checksum, ErrorCode.MISMATCH),  # libogg drops the page
        (_opus_head_overwritten, ErrorCode.BAD_AUDIO),
        (_stereo_header, ErrorCode.BAD_AUDIO),
        (_audio_packets_zeroed, ErrorCode.MISMATCH),  # valid pages of garbage packets
    ],
    ids=["header-pages-only", "cut-in-half", "page-failing-its-checksum", "opus-head-overwritten", "stereo", "zeroed"],
)
def test_corrupt_opus_gets_an_error_result(
    requester: Requester, caplog, damage: Callable[[bytes], bytes], code: ErrorCode
) -> None:
    # Bytes that are not OGG at all after "OggS" are tested in test_cloud_worker.py.
    utterance, envelope = hostile_request(requester.device_id, payload=damage)
    requester.publish(envelope)
    expect_refused(requester, caplog, code, utterance_id=utterance.utterance_id)
    the_worker_answers_the_next_utterance(requester, caplog)


# ---------------------------------------------------------------------------------------------------------------
# Sample rates


def _announcing_rate(stream: bytes, rate: int) -> bytes:
    """``stream`` with its OpusHead's input sample rate set to ``rate``, checksums valid."""
    head = _opus_head(stream)
    return with_valid_checksums(stream[: head + 12] + struct.pack("<I", rate) + stream[head + 16 :])


def _opus_at(rate: int) -> bytes:
    return encode_opus(read_recording(IN_VOCABULARY_SAMPLE, rate), rate)


@pytest.mark.parametrize(
    ("stream", "announced"),
    [
        (lambda: _opus_at(48000), 16000),
        (lambda: _opus_at(16000), 8000),
        # libsndfile decodes a stream announcing 44.1 kHz, which Opus does not have, at 48 kHz.
        (lambda: _announcing_rate(_opus_at(16000), 44100), 16000),
    ],
    ids=["48k-stream-announced-as-16k", "16k-stream-announced-as-8k", "header-says-44.1k-announced-as-16k"],
)
def test_audio_at_another_rate_than_announced_gets_a_mismatch_result(
    requester: Requester, caplog, stream: Callable[[], bytes], announced: int
) -> None:
    # Metadata at 44100 Hz is refused by the schema, tested in test_cloud_worker.py.
    utterance, envelope = hostile_request(requester.device_id, payload=stream(), sample_rate=announced)
    requester.publish(envelope)
    report = expect_refused(requester, caplog, ErrorCode.MISMATCH, utterance_id=utterance.utterance_id)
    assert "sample rate" in report.message
    the_worker_answers_the_next_utterance(requester, caplog)


@pytest.mark.parametrize(
    ("rate", "written"), [(48000, 48000), (16000, 16000.0)], ids=["48k-resampled", "16000-written-as-16000.0"]
)
def test_audio_at_another_allowed_rate_or_a_rate_written_as_a_float_is_answered(
    requester: Requester, caplog, rate: int, written: float
) -> None:
    # The other side of the mismatch cases: the same speech at a rate it truly has is understood.
    utterance, envelope = hostile_request(requester.device_id, payload=_opus_at(rate), sample_rate=written)
    requester.publish(envelope)
    answer = next_result(requester, caplog)
    assert (answer.utterance_id, answer.intent, answer.error) == (utterance.utterance_id, "lights_on", None), answer
    the_worker_answers_the_next_utterance(requester, caplog)


# ---------------------------------------------------------------------------------------------------------------
# Numbers and JSON that are not what they seem


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("duration_s",), math.nan),
        (("duration_s",), math.inf),
        (("captured_at",), math.inf),
        (("hypotheses", 0, "score"), math.nan),
        (("hypotheses", 0, "score"), -math.inf),
    ],
    ids=["duration-NaN", "duration-Infinity", "captured-at-Infinity", "score-NaN", "score-minus-Infinity"],
)
def test_nan_or_infinity_in_the_metadata_gets_an_invalid_json_result(
    requester: Requester, caplog, path: tuple, value: float
) -> None:
    def write(meta: dict[str, Any]) -> str:
        value_at(meta, path[:-1])[path[-1]] = value
        return json.dumps(meta)  # as the literal NaN, Infinity or -Infinity

    utterance, envelope = hostile_request(requester.device_id, meta_text=write)
    assert re.search(r"\bNaN\b|Infinity", envelope.user_property(META_PROPERTY, "utterance"))
    requester.publish(envelope)
    expect_refused(requester, caplog, ErrorCode.INVALID_JSON, utterance_id=utterance.utterance_id)
    the_worker_answers_the_next_utterance(requester, caplog)


def test_a_number_too_large_for_a_double_in_the_metadata_is_refused_not_taken_as_infinity(
    requester: Requester, caplog
) -> None:
    # 1e999 is a JSON number, with no literal to refuse: Python reads it as infinity. captured_at has no maximum in
    # the schema, so only the parser can refuse it, as it refuses the Infinity literal.
    utterance, envelope = hostile_request(
        requester.device_id,
        meta_text=lambda meta: json.dumps(meta | {"captured_at": "HUGE"}).replace('"HUGE"', "1e999"),
    )
    requester.publish(envelope)
    expect_refused(
        requester, caplog, {ErrorCode.INVALID_JSON, ErrorCode.SCHEMA_VIOLATION}, utterance_id=utterance.utterance_id
    )
    the_worker_answers_the_next_utterance(requester, caplog)


def test_metadata_nested_thousands_deep_gets_an_invalid_json_result(requester: Requester, caplog) -> None:
    # Valid JSON, 4000 levels deep in 8000 bytes, under the 8 KiB metadata limit; json.loads gives up after about
    # a thousand.
    utterance, envelope = hostile_request(requester.device_id, meta_text=lambda meta: "[" * 4000 + "]" * 4000)
    requester.publish(envelope)
    expect_refused(requester, caplog, ErrorCode.INVALID_JSON, utterance_id=utterance.utterance_id)
    the_worker_answers_the_next_utterance(requester, caplog)


def test_a_valid_utterance_batched_with_hostile_metadata_is_still_answered(
    worker_factory, links, device_id: str, caplog
) -> None:
    # Whatever one utterance of a batch does, the others in it are answered: refusing one is per utterance.
    caplog.set_level(logging.INFO, logger="cloud_worker")
    requester = requester_of(start_worker(worker_factory, batching=BatchSettings(window_ms=1000)), links, device_id)
    hostile, envelope = hostile_request(requester.device_id, meta_text=lambda meta: "[" * 4000 + "]" * 4000)
    valid = make_utterance(requester.device_id)
    requester.publish(envelope)
    requester.link.send(valid)  # within the window: the same batch
    answers = {answer.utterance_id: answer for answer in (next_result(requester, caplog) for _ in range(2))}
    assert answers[valid.utterance_id].intent == "lights_on"
    assert answers[hostile.utterance_id].error.code == ErrorCode.INVALID_JSON


def test_more_hostile_utterances_than_the_broker_keeps_in_flight_do_not_starve_the_worker(
    requester: Requester, caplog
) -> None:
    # An utterance the worker fails on stays unacknowledged, and the broker sends a client no more than
    # max_inflight_messages unacknowledged messages: one more hostile utterance than that, and it sends nothing else.
    config = resources.files("broker_config").joinpath(DEV_CONFIG).read_text(encoding="utf-8")
    in_flight = int(re.search(r"^max_inflight_messages (\d+)$", config, re.MULTILINE)[1])
    _, envelope = hostile_request(requester.device_id, meta_text=lambda meta: "[" * 4000 + "]" * 4000)
    for _ in range(in_flight + 1):
        requester.publish(envelope)
    valid = make_utterance(requester.device_id)
    requester.link.send(valid)
    refusals = []
    while (answer := next_result(requester, caplog, timeout_s=20)).utterance_id != valid.utterance_id:
        refusals.append(answer.error.code if answer.error else answer)
    assert (answer.intent, answer.error) == ("lights_on", None), answer
    assert refusals == [ErrorCode.INVALID_JSON] * (in_flight + 1)


# ---------------------------------------------------------------------------------------------------------------
# Device ids: in the topic level, and in the metadata


@pytest.mark.parametrize(
    "claimed",
    ["pi 1", "$pi", "\u0440i-1", "pi-\u200b1", "\U0001f3a4-pi", "x" * 65],
    ids=["space", "dollar", "cyrillic-look-alike", "zero-width-space", "emoji", "65-characters"],
)
def test_a_device_id_in_the_topic_that_is_not_safe_is_reported_and_answered_nowhere(
    requester: Requester, links, caplog, claimed: str
) -> None:
    # 'é' in the topic is tested in test_cloud_worker.py.
    topic = f"mqvox/v1/devices/{claimed}/utterance"
    answers_there = Inbox()
    links().subscribe(f"mqvox/v1/devices/{claimed}/reply", answers_there)
    links().subscribe(f"mqvox/v1/devices/{claimed}/result", answers_there)
    requester.publish(make_utterance(requester.device_id).to_wire(), topic)
    report = expect_refused(requester, caplog, ErrorCode.BAD_TOPIC, utterance_id=None, topic=topic)
    assert report.device_id == _printable(claimed)
    answers_there.expect_nothing()
    the_worker_answers_the_next_utterance(requester, caplog)


def test_a_device_id_with_a_slash_makes_a_topic_the_worker_never_receives(requester: Requester, links, caplog) -> None:
    topic = f"mqvox/v1/devices/{requester.device_id}/pi/utterance"  # device id "<id>/pi": one level too many
    seen = Inbox()
    links().subscribe(f"mqvox/v1/devices/{requester.device_id}/pi/#", seen)
    requester.publish(make_utterance(requester.device_id).to_wire(), topic)
    assert seen.get()[0] == topic  # the broker took it, and delivers it to whoever subscribed to it
    requester.results.expect_nothing()
    assert requester.worker.metrics.received._value.get() == 0  # the worker's filter, devices/+/utterance, skips it
    the_worker_answers_the_next_utterance(requester, caplog)
    assert requester.worker.metrics.received._value.get() == 1


CONNACK, DISCONNECT = 0x20, 0xE0
MALFORMED_PACKET, PROTOCOL_ERROR = 0x81, 0x82
"""MQTT 5 packet types, and the reason codes of a DISCONNECT."""


def _mqtt_string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _mqtt_packet(first_byte: int, body: bytes) -> bytes:
    length, remaining = bytearray(), len(body)
    while True:
        digit, remaining = remaining % 128, remaining // 128
        length.append(digit | (0x80 if remaining else 0))
        if not remaining:
            return bytes([first_byte]) + bytes(length) + body


def publish_past_the_client(port: int, client_id: str, topic: bytes, payload: bytes) -> bytes:
    """A QoS 1 PUBLISH over MQTT 5 written by hand, for topics paho refuses to send; what the broker sent back."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        clean_start, keepalive_s, no_properties = 0x02, 60, b"\x00"
        connect = _mqtt_string(b"MQTT") + bytes([5, clean_start]) + keepalive_s.to_bytes(2, "big") + no_properties
        connection.sendall(_mqtt_packet(0x10, connect + _mqtt_string(client_id.encode())))
        connack = connection.recv(256)
        assert connack[0] == CONNACK and connack[3] == 0, connack  # connected: the refusal is the PUBLISH's
        packet_id = (1).to_bytes(2, "big")
        connection.sendall(_mqtt_packet(0x32, _mqtt_string(topic) + packet_id + no_properties + payload))
        answer = b""
        try:
            while chunk := connection.recv(256):  # until the broker closes the connection
                answer += chunk
        except TimeoutError:  # still open: it took the message, and whatever came (a PUBACK) is the answer
            pass
        return answer


@pytest.mark.parametrize(
    "claimed", [b"+", b"#", b"pi\x00", b"pi\xff"], ids=["plus-wildcard", "hash-wildcard", "nul", "invalid-utf-8"]
)
def test_a_topic_no_client_may_publish_is_dropped_by_the_broker_with_a_logged_reason(
    requester: Requester, broker, caplog, claimed: bytes
) -> None:
    # Had the broker taken "devices/+/utterance" as a topic name, the worker's filter devices/+/utterance would match.
    client_id = f"rogue-{requester.device_id}"
    log_start = broker.log_size()
    topic = b"mqvox/v1/devices/" + claimed + b"/utterance"
    answer = publish_past_the_client(broker.port, client_id, topic, make_utterance(requester.device_id).audio)
    # No PUBACK: a DISCONNECT saying why, and the connection closed.
    assert answer[:2] == bytes([DISCONNECT, 1]) and answer[2] in (MALFORMED_PACKET, PROTOCOL_ERROR), answer
    dropped = re.compile(rf"Client {re.escape(client_id)} disconnected due to (protocol error|malformed packet)")
    assert wait_until(lambda: dropped.search(broker.log_since(log_start))), broker.log_since(log_start)
    requester.results.expect_nothing()
    assert requester.worker.metrics.received._value.get() == 0
    the_worker_answers_the_next_utterance(requester, caplog)


@pytest.mark.parametrize(
    ("claimed", "codes"),
    [
        ("pi+1", {ErrorCode.SCHEMA_VIOLATION}),
        ("pi#", {ErrorCode.SCHEMA_VIOLATION}),
        ("site/pi", {ErrorCode.SCHEMA_VIOLATION}),
        ("\u043f\u0438-1", {ErrorCode.SCHEMA_VIOLATION}),
        ("pi\x00", {ErrorCode.SCHEMA_VIOLATION}),
        ("", {ErrorCode.SCHEMA_VIOLATION}),
        # The schema's pattern lets a final newline through (Python's '$'); the topic check after it does not.
        ("pi-1\n", {ErrorCode.SCHEMA_VIOLATION, ErrorCode.BAD_TOPIC}),
    ],
    ids=["plus", "hash", "slash", "cyrillic", "nul", "empty", "final-newline"],
)
def test_a_device_id_in_the_metadata_that_is_not_safe_gets_an_error_result(
    requester: Requester, caplog, claimed: str, codes: set[ErrorCode]
) -> None:
    # The topic and the Response Topic are the device's own, so the refusal is answered there.
    utterance, envelope = hostile_request(requester.device_id, device_id=claimed)
    requester.publish(envelope)
    report = expect_refused(requester, caplog, codes, utterance_id=utterance.utterance_id)
    assert report.device_id == requester.device_id  # the topic's id: the one the broker vouches for
    the_worker_answers_the_next_utterance(requester, caplog)


def test_metadata_in_another_devices_name_gets_a_mismatch_result_and_the_other_device_hears_nothing(
    requester: Requester, links, caplog
) -> None:
    # A Response Topic naming the victim is tested in test_cloud_worker.py; here it is the metadata.
    victim = f"{requester.device_id}-victim"
    victim_results = Inbox()
    links().subscribe(REPLY.topic(device_id=victim), victim_results)
    links().subscribe(RESULT.topic(device_id=victim), victim_results)
    utterance, envelope = hostile_request(requester.device_id, device_id=victim)
    requester.publish(envelope)
    expect_refused(requester, caplog, ErrorCode.MISMATCH, utterance_id=utterance.utterance_id)
    victim_results.expect_nothing()
    the_worker_answers_the_next_utterance(requester, caplog)


# ---------------------------------------------------------------------------------------------------------------
# The same utterance id from two devices


def _batches(worker: UtteranceService) -> tuple[float, float]:
    """(batches transcribed, utterances in them) from the batch-size histogram."""
    samples = {sample.name: sample.value for sample in worker.metrics.batch_size.collect()[0].samples}
    return samples["mqvox_worker_batch_size_count"], samples["mqvox_worker_batch_size_sum"]


@pytest.mark.parametrize("together", [True, False], ids=["in-one-batch", "one-after-the-other"])
def test_the_same_utterance_id_from_two_devices_gets_each_device_its_own_answer(
    worker_factory, links, device_id: str, caplog, together: bool
) -> None:
    # Idempotency is per device: the second must be neither answered from the first's stored answer, nor merged
    # with it in a batch.
    caplog.set_level(logging.INFO, logger="cloud_worker")
    worker = start_worker(worker_factory, batching=BatchSettings(window_ms=1000) if together else BatchSettings())
    first, second = requester_of(worker, links, device_id), requester_of(worker, links, f"{device_id}-twin")
    shared = new_utterance_id()
    lights = make_utterance(first.device_id, IN_VOCABULARY_SAMPLE, utterance_id=shared)
    weather = make_utterance(second.device_id, OUT_OF_VOCABULARY_SAMPLE, utterance_id=shared)
    first.link.send(lights)
    first_heard = None if together else next_result(first, caplog)
    second.link.send(weather)
    first_heard = first_heard or next_result(first, caplog)
    second_heard = next_result(second, caplog)
    if together:
        assert _batches(worker) == (1, 2)
    assert (first_heard.device_id, first_heard.utterance_id, first_heard.intent) == (
        first.device_id,
        shared,
        "lights_on",
    )
    assert "turn on the lights" in first_heard.transcript.lower()
    assert (second_heard.device_id, second_heard.utterance_id, second_heard.intent) == (second.device_id, shared, None)
    assert "weather" in second_heard.transcript.lower() and second_heard.error is None
    first.results.expect_nothing()
    second.results.expect_nothing()
    assert wait_until(lambda: worker.counts["answered"] == 2)
    assert (worker.counts["transcribed"], worker.counts["replayed"]) == (2, 0)
    the_worker_answers_the_next_utterance(first, caplog)
