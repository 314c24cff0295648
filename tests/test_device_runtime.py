"""The device online, against a real Mosquitto: edge results, cloud requests, timeouts, upload = never, status."""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from broker_config.broker import Broker, free_port
from device.audio_sources import PlaylistSource
from device.outbox import Outbox
from device.recording import read_recording
from device.runtime import DeviceRuntime
from device.settings import OutboxSettings, settings_from_dict
from schemas.audio import decode_opus
from schemas.mqtt import BrokerSettings, MqttLink
from schemas.protocol import decode
from schemas.result import Result, Source
from schemas.status import DeviceState
from schemas.topics import META_PROPERTY, RESULT, STATUS, UTTERANCE
from schemas.utterance import UploadReason

from . import action_hooks
from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, Inbox


def run_device(broker_settings, device_id: str, local_model, files, **overrides) -> DeviceRuntime:
    """Run a device over ``files`` until they end (it waits for pending cloud answers), as `device run` does."""
    config = {
        "device_id": device_id,
        "broker": {"port": broker_settings.port},
        "audio": {"source": "file", "files": [str(path) for path in files]},
    } | overrides
    runtime = DeviceRuntime(settings_from_dict(config), local_model)
    runtime.run(PlaylistSource(runtime.settings.audio.files))
    return runtime


def drain(inbox: Inbox, wait_s: float = 0.5) -> list:
    """Every message the inbox got, decoded, in order."""
    messages = []
    while True:
        try:
            topic, envelope = inbox.get(wait_s)
        except queue.Empty:
            return messages
        messages.append((decode(topic, envelope), envelope))


def test_a_confident_command_is_published_at_once_then_acted_on(links, broker_settings, device_id, local_model):
    results, statuses = Inbox(), Inbox()
    observer = links()
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    observer.subscribe(STATUS.topic(device_id=device_id), statuses)
    action_hooks.CALLS.clear()
    runtime = run_device(
        broker_settings,
        device_id,
        local_model,
        [IN_VOCABULARY_SAMPLE],
        actions={"lights_on": {"entry_point": "tests.action_hooks:record"}},
    )
    ((result, envelope),) = drain(results)
    assert isinstance(result, Result)  # decode() validated it against the schema
    assert envelope.content_type == "application/json"
    assert envelope.correlation_data == result.utterance_id.encode()
    assert (result.source, result.intent, result.slots, result.error) == (Source.EDGE, "lights_on", {}, None)
    assert result.confidence >= local_model.package.detection.command_threshold
    assert {"denoise", "inference", "decide", "total"} <= set(result.timings_ms)
    assert action_hooks.CALLS == [{"intent": "lights_on", "slots": {}}]
    online, offline = (message for message, _ in drain(statuses))
    assert (online.state, online.model_version) == (DeviceState.ONLINE, local_model.version)
    assert offline.state == DeviceState.OFFLINE
    assert offline.counters == {
        "wakes": 1,
        "edge_results": 1,
        "actions_run": 1,
        "results_sent": 1,
        "outbox_messages": 0,
    }
    assert runtime.presence.counters["cloud_requests"] == 0


def test_an_uncertain_utterance_goes_to_the_cloud_as_opus_with_mqtt5_properties(
    links, broker_settings, device_id, local_model, worker_factory, database_url
):
    """The whole loop: device audio in, a cloud result out, and its rows in the worker's database."""
    utterances, results = Inbox(), Inbox()
    observer = links()
    observer.subscribe(UTTERANCE.topic(device_id=device_id), utterances)
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    worker = worker_factory(f"g-{device_id}", device_id, database_url=database_url)
    runtime = run_device(broker_settings, device_id, local_model, [OUT_OF_VOCABULARY_SAMPLE])
    ((utterance, envelope),) = drain(utterances)
    assert envelope.content_type == UTTERANCE.content_type
    assert envelope.response_topic == RESULT.topic(device_id=device_id)
    assert envelope.correlation_data == utterance.utterance_id.encode()
    assert META_PROPERTY in dict(envelope.user_properties)
    assert utterance.reason in (UploadReason.LOW_CONFIDENCE, UploadReason.OUT_OF_VOCABULARY)
    assert utterance.model_version == local_model.version and len(utterance.hypotheses) == 3
    audio = decode_opus(utterance.audio, expected_rate=16000)
    assert audio.size / 16000 == pytest.approx(utterance.duration_s, abs=0.05)
    assert 2.0 < utterance.duration_s < 4.0  # the sentence after the wake phrase
    # One answer, from the cloud, with the words; no edge result was published for it.
    ((answer, _),) = drain(results)
    assert answer.source == Source.CLOUD and answer.utterance_id == utterance.utterance_id
    assert "weather be like tomorrow" in answer.transcript.lower() and answer.intent is None
    assert runtime.presence.counters["cloud_requests"] == runtime.presence.counters["cloud_results"] == 1
    assert worker.store.answer_of(device_id, utterance.utterance_id).result == answer
    counts = worker.store.counts()
    assert (counts["utterances"], counts["transcripts"], counts["results"]) == (1, 1, 1), counts


def test_the_device_acts_on_the_clouds_answer(links, broker_settings, device_id, local_model):
    # A cloud peer on the real broker that understands everything as "lights_off".
    responder = links()

    def answer(topic, envelope):
        utterance = decode(topic, envelope)
        result = Result(
            device_id, utterance.utterance_id, Source.CLOUD, "lights off", "lights_off", {}, 0.93, {"total": 1}
        )
        responder.publish(envelope.response_topic, result.to_wire(), qos=0, retain=False)

    responder.subscribe(UTTERANCE.topic(device_id=device_id), answer)
    action_hooks.CALLS.clear()
    runtime = run_device(
        broker_settings,
        device_id,
        local_model,
        [OUT_OF_VOCABULARY_SAMPLE],
        actions={"*": {"entry_point": "tests.action_hooks:record"}},
    )
    assert action_hooks.CALLS == [{"intent": "lights_off", "slots": {}}]
    assert runtime.presence.counters["cloud_results"] == 1


def test_without_an_answer_the_device_publishes_a_cloud_timeout(links, broker_settings, device_id, local_model):
    results, requests = Inbox(), Inbox()
    observer = links()
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    observer.subscribe(UTTERANCE.topic(device_id=device_id), requests)  # a worker that takes it and never answers
    started = time.monotonic()
    runtime = run_device(broker_settings, device_id, local_model, [OUT_OF_VOCABULARY_SAMPLE], cloud={"timeout_s": 1})
    assert time.monotonic() - started < 10
    assert decode(*requests.get(5)).device_id == device_id
    ((result, _),) = drain(results)
    assert result.source == Source.EDGE and result.intent is None
    assert result.error.code == "cloud_timeout" and "1 s" in result.error.message
    assert result.timings_ms["total"] >= 1000
    assert runtime.presence.counters["cloud_timeouts"] == 1


def test_with_no_worker_subscribed_the_request_is_kept_for_later_not_timed_out(tmp_path, device_id, local_model):
    # A broker of its own, where surely no worker is subscribed: it accepts the request and gives it to no one.
    port = free_port()
    settings = BrokerSettings(port=port)
    outbox = tmp_path / "outbox.sqlite3"
    with Broker(data_dir=tmp_path / "broker", port=port), MqttLink("observer", settings) as observer:
        results = Inbox()
        observer.subscribe(RESULT.topic(device_id=device_id), results)
        runtime = run_device(
            settings,
            device_id,
            local_model,
            [OUT_OF_VOCABULARY_SAMPLE],
            cloud={"timeout_s": 1},
            outbox={"path": str(outbox)},
        )
        assert drain(results) == []  # no cloud_timeout: the request is still to be answered
    counters = runtime.presence.counters
    assert (counters["cloud_deferred"], counters["cloud_timeouts"]) == (1, 0)
    held = Outbox(OutboxSettings(path=str(outbox)))
    try:
        assert [entry.kind for entry in held.pending()] == ["utterance"]
        assert held.stats().dropped == {}
    finally:
        held.close()


def test_with_upload_never_no_audio_leaves_the_device(links, broker_settings, device_id, local_model):
    everything = Inbox()
    links().subscribe(f"mqvox/v1/devices/{device_id}/#", everything)
    runtime = run_device(
        broker_settings,
        device_id,
        local_model,
        [OUT_OF_VOCABULARY_SAMPLE, IN_VOCABULARY_SAMPLE],
        cloud={"upload": "never"},
    )
    messages = [message for message, _ in drain(everything)]
    assert [type(message).__name__ for message in messages] == ["DeviceStatus", "Result", "Result", "DeviceStatus"]
    not_understood, lights_on = messages[1:3]
    assert not_understood.error.code == "not_understood" and "upload policy is never" in not_understood.error.message
    assert lights_on.intent == "lights_on"  # confident commands still work
    assert runtime.presence.counters["not_understood"] == 1 and runtime.presence.counters["cloud_requests"] == 0


def _pcm(path: Path) -> bytes:
    return (np.clip(read_recording(path), -1, 1) * 32767).astype("<i2").tobytes()


def test_device_run_listens_to_stdin_and_its_last_will_marks_it_offline(links, broker_settings, device_id, tmp_path):
    results, statuses = Inbox(), Inbox()
    observer = links()
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    observer.subscribe(STATUS.topic(device_id=device_id), statuses)
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "{device_id}"\n[broker]\nport = {broker_settings.port}\nkeepalive_s = 1\n'
        '[audio]\nsource = "stdin"\nstdin_sample_rate = 16000\n'
    )
    device = subprocess.Popen(
        [sys.executable, "-m", "device", "run", "--config", str(config)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert decode(*statuses.get(timeout_s=30)).state == DeviceState.ONLINE
        device.stdin.write(_pcm(IN_VOCABULARY_SAMPLE))
        device.stdin.flush()
        topic, envelope = results.get(timeout_s=30)
        assert decode(topic, envelope).intent == "lights_on"
        device.kill()  # no clean stop: the broker publishes the Last Will
        topic, envelope = statuses.get(timeout_s=10)
        assert decode(topic, envelope).state == DeviceState.OFFLINE
    finally:
        device.kill()
        device.wait()


def test_device_run_stops_cleanly_at_the_end_of_stdin(links, broker_settings, device_id, tmp_path):
    statuses = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), statuses)
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "{device_id}"\n[broker]\nport = {broker_settings.port}\n[audio]\nsource = "stdin"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "device", "--log-level", "INFO", "run", "--config", str(config)],
        input=_pcm(IN_VOCABULARY_SAMPLE),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    states = [decode(*statuses.get()).state for _ in range(2)]
    assert states == [DeviceState.ONLINE, DeviceState.OFFLINE]
    assert b'"event": "edge result"' in done.stderr and b'"intent": "lights_on"' in done.stderr
