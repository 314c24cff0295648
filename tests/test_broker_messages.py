"""Every message type through a real Mosquitto, validated at both ends; invalid ones refused clearly."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from common.mqtt import PublishRefused
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.model import ModelBlob, ModelManifest
from schemas.protocol import MESSAGE_TYPES, decode
from schemas.reply import CloudReply
from schemas.result import ErrorInfo, Result, Source
from schemas.status import DeviceState, DeviceStatus, OtaProgress, OtaState
from schemas.topics import MAX_PAYLOAD_BYTES, META_PROPERTY, MODEL_BLOB, REPLY, RESULT, STATUS, UTTERANCE

from .conftest import Inbox, make_utterance

FIXTURES = Path(__file__).resolve().parent.parent / "schemas" / "fixtures"


def one_of_each(device_id: str) -> list:
    manifest = ModelManifest.from_dict(json.loads((FIXTURES / "manifest" / "valid" / "canary.json").read_text()))
    channel = f"ch-{device_id}"
    manifest_document = manifest.to_dict() | {
        "channel": channel,
        "blob_topic": f"mqvox/v1/models/{channel}/blobs/1.2.0",
    }
    return [
        make_utterance(device_id),
        CloudReply(
            device_id=device_id,
            utterance_id="0123456789abcdef",
            transcript="seven",
            intent="digit",
            slots={"value": 7},
            confidence=0.91,
            timings_ms={"queue": 1.5, "decode": 2.0, "asr": 150.0, "total": 154.0},
        ),
        Result(
            device_id=device_id,
            utterance_id="0123456789abcdef",
            source=Source.EDGE,
            transcript="seven",
            intent="digit",
            slots={"value": 7},
            confidence=0.97,
            timings_ms={"model": 11.5, "total": 13.0},
            acted=True,
        ),
        DeviceStatus(
            device_id=device_id,
            state=DeviceState.ONLINE,
            software_version="0.1.0",
            model_version="1.2.0",
            uptime_s=12.5,
            counters={"wakes": 3},
            ota=OtaProgress(OtaState.REJECTED, "1.3.0", "signature does not verify"),
        ),
        ModelManifest.from_dict(manifest_document),
        ModelBlob(channel=channel, version="1.2.0", model=os.urandom(50_000)),
        ErrorReport(
            code=ErrorCode.BAD_AUDIO,
            message="cannot decode",
            reporter="tests",
            topic_name=UTTERANCE.topic(device_id=device_id),
            device_id=device_id,
            utterance_id=None,
        ),
    ]


def test_one_of_each_covers_every_message_type(device_id: str) -> None:
    assert {type(message) for message in one_of_each(device_id)} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("index", range(len(MESSAGE_TYPES)), ids=sorted(MESSAGE_TYPES))
def test_every_message_type_crosses_the_broker_intact(links, device_id: str, index: int) -> None:
    message = one_of_each(device_id)[index]
    inbox = Inbox()
    receiver, sender = links(), links()
    receiver.subscribe(message.topic(), inbox, qos=message.spec.qos)
    sender.send(message)
    topic, envelope = inbox.get()
    assert topic == message.topic()
    assert envelope.content_type == message.spec.content_type
    assert decode(topic, envelope) == message


def test_utterance_request_carries_response_topic_and_correlation_data(links, device_id: str) -> None:
    utterance = make_utterance(device_id)
    inbox = Inbox()
    links().subscribe(UTTERANCE.filter(), inbox)
    links().send(utterance)
    topic, envelope = inbox.get()
    while topic != utterance.topic():  # other tests' devices share the filter
        topic, envelope = inbox.get()
    assert envelope.response_topic == REPLY.topic(device_id=device_id)
    assert envelope.correlation_data == utterance.utterance_id.encode()
    assert envelope.payload.startswith(b"OggS")  # binary Opus, not base64
    meta = json.loads(envelope.user_property(META_PROPERTY, "utterance"))
    assert meta["device_id"] == device_id and meta["hypotheses"][0]["intent"] == "lights_on"


def raw_cases(device_id: str) -> list[tuple[str, str, Envelope, ErrorCode]]:
    valid_result = json.loads((FIXTURES / "result" / "valid" / "cloud_intent.json").read_text())
    valid_reply = json.loads((FIXTURES / "reply" / "valid" / "intent.json").read_text())
    utterance_envelope = make_utterance(device_id).to_wire()
    json_type = "application/json"
    return [
        ("malformed_json", RESULT.topic(device_id=device_id), Envelope(b"{oops", json_type), ErrorCode.INVALID_JSON),
        (
            "wrong_schema",
            RESULT.topic(device_id=device_id),
            Envelope(json.dumps({"hello": "world"}).encode(), json_type),
            ErrorCode.SCHEMA_VIOLATION,
        ),
        (
            "result_in_another_devices_name",
            RESULT.topic(device_id=device_id),
            Envelope(json.dumps(valid_result).encode(), json_type),
            ErrorCode.MISMATCH,
        ),
        (
            "reply_in_another_devices_name",
            REPLY.topic(device_id=device_id),
            Envelope(json.dumps(valid_reply).encode(), json_type),
            ErrorCode.MISMATCH,
        ),
        (
            "reply_answering_another_utterance",
            REPLY.topic(device_id=device_id),
            Envelope(
                json.dumps(valid_reply | {"device_id": device_id}).encode(), json_type, correlation_data=b"someone-else"
            ),
            ErrorCode.MISMATCH,
        ),
        (
            "result_as_a_reply",
            REPLY.topic(device_id=device_id),
            Envelope(json.dumps(valid_result | {"device_id": device_id}).encode(), json_type),
            ErrorCode.SCHEMA_VIOLATION,
        ),
        (
            "status_without_content_type",
            STATUS.topic(device_id=device_id),
            Envelope(b"{}", None),
            ErrorCode.WRONG_CONTENT_TYPE,
        ),
        (
            "utterance_without_metadata",
            UTTERANCE.topic(device_id=device_id),
            Envelope(utterance_envelope.payload, UTTERANCE.content_type, (), utterance_envelope.response_topic),
            ErrorCode.MISSING_PROPERTY,
        ),
        (
            "utterance_as_base64",
            UTTERANCE.topic(device_id=device_id),
            Envelope(
                __import__("base64").b64encode(utterance_envelope.payload),
                UTTERANCE.content_type,
                utterance_envelope.user_properties,
                utterance_envelope.response_topic,
                utterance_envelope.correlation_data,
            ),
            ErrorCode.BAD_AUDIO,
        ),
        (
            "utterance_replying_elsewhere",
            UTTERANCE.topic(device_id=device_id),
            Envelope(
                utterance_envelope.payload,
                UTTERANCE.content_type,
                utterance_envelope.user_properties,
                "mqvox/v1/models/stable/manifest",
                utterance_envelope.correlation_data,
            ),
            ErrorCode.MISMATCH,
        ),
        (
            "utterance_with_wrong_correlation",
            UTTERANCE.topic(device_id=device_id),
            Envelope(
                utterance_envelope.payload,
                UTTERANCE.content_type,
                utterance_envelope.user_properties,
                utterance_envelope.response_topic,
                b"someone-else",
            ),
            ErrorCode.MISMATCH,
        ),
    ]


@pytest.mark.parametrize("case", range(11))
def test_invalid_messages_are_refused_by_the_receiver_with_a_clear_error(links, device_id: str, case: int) -> None:
    name, topic, envelope, code = raw_cases(device_id)[case]
    inbox = Inbox()
    links().subscribe(topic, inbox)
    spec = {s.name: s for s in (REPLY, RESULT, STATUS, UTTERANCE)}[topic.rsplit("/", 1)[1]]
    links().publish(topic, envelope, qos=1, retain=False)
    received_topic, received = inbox.get()
    with pytest.raises(ProtocolError) as refused:
        decode(received_topic, received)
    assert refused.value.code == code, name
    assert spec.name in str(refused.value) or "audio" in str(refused.value)


def test_broker_drops_payloads_over_its_message_size_limit(links, broker, device_id: str) -> None:
    topic = MODEL_BLOB.topic(channel=f"ch-{device_id}", version="9.9.9")
    inbox = Inbox()
    links().subscribe(topic, inbox)
    # A peer that ignores the limit, speaking MQTT 3.1.1: the broker takes the message and drops it.
    rogue = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"rogue-{device_id}", protocol=paho.MQTTv311)
    rogue.connect("127.0.0.1", broker.port)
    rogue.loop_start()
    try:
        rogue.publish(topic, b"x" * (MAX_PAYLOAD_BYTES + 1), qos=1).wait_for_publish(10)
    finally:
        rogue.disconnect()
        rogue.loop_stop()
    inbox.expect_nothing()
    # The largest blob the protocol allows still goes through, properties and all.
    biggest = ModelBlob(channel=f"ch-{device_id}", version="9.9.9", model=os.urandom(MAX_PAYLOAD_BYTES))
    links().send(biggest)
    assert decode(*inbox.get()) == biggest


def test_links_refuse_to_send_over_the_broker_limit(links, device_id: str) -> None:
    topic = MODEL_BLOB.topic(channel=f"ch-{device_id}", version="9.9.9")
    with pytest.raises(PublishRefused, match="over the broker limit"):
        links().publish(topic, Envelope(b"x" * (MAX_PAYLOAD_BYTES + 1), MODEL_BLOB.content_type), qos=1, retain=False)


def test_senders_refuse_a_model_over_the_topic_limit(device_id: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        ModelBlob(channel="stable", version="1.0.0", model=bytes(MAX_PAYLOAD_BYTES + 1)).to_wire()
    assert refused.value.code == ErrorCode.PAYLOAD_TOO_LARGE


def test_tampered_blob_is_refused(links, device_id: str) -> None:
    blob = ModelBlob(channel=f"ch-{device_id}", version="1.0.0", model=os.urandom(1000))
    envelope = blob.to_wire()
    tampered = Envelope(b"\x00" + envelope.payload[1:], envelope.content_type, envelope.user_properties)
    inbox = Inbox()
    links().subscribe(blob.topic(), inbox)
    links().publish(blob.topic(), tampered, qos=1, retain=False)
    with pytest.raises(ProtocolError) as refused:
        decode(*inbox.get())
    assert refused.value.code == ErrorCode.MISMATCH


def test_retained_status_reaches_a_late_subscriber(links, device_id: str) -> None:
    (status,) = [message for message in one_of_each(device_id) if isinstance(message, DeviceStatus)]
    links().send(status)
    inbox = Inbox()
    links().subscribe(status.topic(), inbox)
    assert decode(*inbox.get()) == status


def test_cleared_retained_blob_decodes_as_none_and_is_gone(links, device_id: str) -> None:
    blob = ModelBlob(channel=f"ch-{device_id}", version="1.0.0", model=b"model")
    sender = links()
    sender.send(blob)
    inbox = Inbox()
    links().subscribe(blob.topic(), inbox)
    assert decode(*inbox.get()) == blob
    sender.publish(blob.topic(), Envelope(b"", None), qos=1, retain=True)
    assert decode(*inbox.get()) is None
    late = Inbox()
    links().subscribe(blob.topic(), late)
    late.expect_nothing()


DEVICE_THAT_DIES = """
import sys, time
from common.mqtt import BrokerSettings, MqttLink
from device.presence import Presence
from schemas.status import DeviceState
presence = Presence(sys.argv[1], model_version=None)
link = MqttLink(sys.argv[1], BrokerSettings(port=int(sys.argv[2])), will=presence.last_will())
link.send(presence.status(DeviceState.ONLINE))
print("online", flush=True)
time.sleep(60)
"""


@pytest.mark.subprocess
def test_last_will_marks_a_vanished_device_offline(links, broker, device_id: str) -> None:
    inbox = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), inbox)
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE_THAT_DIES, device_id, str(broker.port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert device.stdout.readline().strip() == "online"
        assert decode(*inbox.get()).state == DeviceState.ONLINE
        device.kill()  # no DISCONNECT: the broker must publish the Last Will
        device.wait()
        offline = decode(*inbox.get())
        assert offline.state == DeviceState.OFFLINE and offline.device_id == device_id
    finally:
        device.kill()
        device.wait()
    late = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), late)
    assert decode(*late.get()).state == DeviceState.OFFLINE  # retained


def test_error_result_cannot_carry_an_intent() -> None:
    with pytest.raises(ProtocolError):
        Result(
            device_id="pi-1",
            utterance_id="0123456789abcdef",
            source=Source.CLOUD,
            transcript=None,
            intent="stop",
            slots={},
            confidence=0.0,
            timings_ms={"total": 1},
            error=ErrorInfo(ErrorCode.ASR_FAILED, "boom"),
        ).to_wire()


def test_a_result_says_it_acted_only_on_an_intent_without_error() -> None:
    acted = Result("pi-1", "0123456789abcdef", Source.CLOUD, "hm", None, {}, 0.4, {"total": 1}, acted=True)
    with pytest.raises(ProtocolError):
        acted.to_wire()
    with pytest.raises(ProtocolError):
        dataclasses.replace(acted, error=ErrorInfo(ErrorCode.NOT_UNDERSTOOD, "under the floor")).to_wire()
    dataclasses.replace(acted, intent="stop").to_wire()


def test_links_disable_nagle_on_their_socket(links) -> None:
    # Nagle plus delayed ACKs cost ~40 ms per exchange (bench/protocol.py); keep it off.
    import socket

    connection = links()._client.socket()
    assert connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
