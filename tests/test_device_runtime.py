"""The device online, against a real Mosquitto: edge results, cloud requests and replies, the confidence floor,
timeouts and late or unknown replies, upload = never, status."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker_config.broker import Broker, free_port
from common.mqtt import BrokerSettings, MqttLink
from common.opus import decode_opus
from common.recording import read_recording
from device.audio_sources import AudioSource, PlaylistSource
from device.outbox import Outbox
from device.runtime import DeviceRuntime
from device.settings import CloudSettings, OutboxSettings, SettingsError, settings_from_dict
from device.simulated import SilenceSource
from schemas.envelope import Envelope
from schemas.errors import ErrorCode
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.result import Result, Source
from schemas.status import DeviceState
from schemas.topics import META_PROPERTY, REPLY, RESULT, STATUS, UTTERANCE
from schemas.utterance import UploadReason, Utterance, new_utterance_id

from . import action_hooks
from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, REPO, Inbox, wait_until

NOISE = REPO / "device" / "self_test_clips" / "negative_noise.flac"
"""A recording with no wake phrase: a device that hears it says nothing of its own."""


def device_settings(broker_settings, device_id: str, files, **overrides):
    config = {
        "device_id": device_id,
        "broker": {"port": broker_settings.port},
        "audio": {"source": "file", "files": [str(path) for path in files]},
    } | overrides
    return settings_from_dict(config)


def run_device(broker_settings, device_id: str, local_model, files, **overrides) -> DeviceRuntime:
    """Run a device over ``files`` until they end (it waits for pending cloud answers), as `device run` does."""
    runtime = DeviceRuntime(device_settings(broker_settings, device_id, files, **overrides), local_model)
    runtime.run(PlaylistSource(runtime.settings.audio.files))
    return runtime


class PlaylistThenQuiet(AudioSource):
    """Recordings, then a quiet room until closed: a device that stays up after it has spoken."""

    def __init__(self, paths) -> None:
        self.playlist = PlaylistSource(paths)
        self.quiet = SilenceSource(interval_s=0.05)

    def blocks(self) -> Iterator:
        yield from self.playlist.blocks()
        yield from self.quiet.blocks()

    def close(self) -> None:
        self.playlist.close()
        self.quiet.close()


@contextlib.contextmanager
def device_running(broker_settings, device_id: str, local_model, files, **overrides) -> Iterator[DeviceRuntime]:
    """A device that hears ``files``, then stays up listening to silence until the block ends, and stops cleanly."""
    runtime = DeviceRuntime(device_settings(broker_settings, device_id, files, **overrides), local_model)
    thread = threading.Thread(target=runtime.run, args=(PlaylistThenQuiet(runtime.settings.audio.files),))
    thread.start()
    try:
        yield runtime
    finally:
        runtime.stop()
        thread.join(60)
    assert not thread.is_alive()


class CloudPeer:
    """A cloud worker played by the test: a real MQTT client on the real broker that answers each utterance of one
    device with ``make_reply(utterance)``, on the utterance's Response Topic, once ``release`` is set."""

    def __init__(self, link: MqttLink, device_id: str, make_reply: Callable[[Utterance], CloudReply]) -> None:
        self.link = link
        self.make_reply = make_reply
        self.release = threading.Event()
        self.release.set()
        self.utterances: queue.Queue[Utterance] = queue.Queue()
        link.subscribe(UTTERANCE.topic(device_id=device_id), self._on_utterance)

    def _on_utterance(self, topic: str, envelope: Envelope) -> None:
        utterance = decode(topic, envelope)
        self.utterances.put(utterance)
        # Off paho's thread, which the publish's PUBACK needs.
        threading.Thread(target=self._answer, args=(envelope.response_topic, self.make_reply(utterance))).start()

    def _answer(self, topic: str, reply: CloudReply) -> None:
        self.release.wait(30)
        self.link.publish(topic, reply.to_wire(), qos=1, retain=False)


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The device's log records whose message contains ``text``."""
    return [record for record in caplog.records if record.name.startswith("device") and text in record.getMessage()]


def lights(confidence: float) -> Callable[[Utterance], CloudReply]:
    """Replies that heard "turn on the lights" as lights_on at ``confidence``."""

    def reply(utterance: Utterance) -> CloudReply:
        timings = {"queue": 1.0, "decode": 2.0, "asr": 40.0, "total": 44.0}
        return CloudReply(
            utterance.device_id, utterance.utterance_id, "turn on the lights", "lights_on", {}, confidence, timings
        )

    return reply


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
    assert result.acted
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


@pytest.mark.slow
def test_an_uncertain_utterance_goes_to_the_cloud_as_opus_with_mqtt5_properties(
    links, broker_settings, device_id, local_model, worker_factory, database_url
):
    """The whole loop: device audio in, the worker's reply to the device, one result out, rows in the database."""
    utterances, replies, results = Inbox(), Inbox(), Inbox()
    observer = links()
    observer.subscribe(UTTERANCE.topic(device_id=device_id), utterances)
    observer.subscribe(REPLY.topic(device_id=device_id), replies)
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    worker = worker_factory(f"g-{device_id}", device_id, database_url=database_url)
    runtime = run_device(broker_settings, device_id, local_model, [OUT_OF_VOCABULARY_SAMPLE])
    ((utterance, envelope),) = drain(utterances)
    assert envelope.content_type == UTTERANCE.content_type
    assert envelope.response_topic == REPLY.topic(device_id=device_id)
    assert envelope.correlation_data == utterance.utterance_id.encode()
    assert META_PROPERTY in dict(envelope.user_properties)
    assert utterance.reason in (UploadReason.LOW_CONFIDENCE, UploadReason.OUT_OF_VOCABULARY)
    assert utterance.model_version == local_model.version and len(utterance.hypotheses) == 3
    audio = decode_opus(utterance.audio, expected_rate=16000)
    assert audio.size / 16000 == pytest.approx(utterance.duration_s, abs=0.05)
    assert 2.0 < utterance.duration_s < 4.0  # the sentence after the wake phrase
    # One reply from the worker, to the device; one result from the device, with the words and nothing acted on.
    ((reply, _),) = drain(replies)
    ((answer, _),) = drain(results)
    assert answer.source == Source.CLOUD and answer.utterance_id == utterance.utterance_id
    assert "weather be like tomorrow" in answer.transcript.lower() and answer.intent is None
    assert (answer.error, answer.acted) == (None, False)
    assert runtime.presence.counters["cloud_requests"] == runtime.presence.counters["cloud_results"] == 1
    stored = worker.store.answer_of(device_id, utterance.utterance_id).result
    assert reply == CloudReply.of_result(stored)
    assert (answer.transcript, answer.confidence) == (stored.transcript, stored.confidence)
    assert answer.timings_ms["cloud"] == stored.timings_ms["total"] < answer.timings_ms["total"]
    counts = worker.store.counts()
    assert (counts["utterances"], counts["transcripts"], counts["results"]) == (1, 1, 1), counts


@pytest.mark.slow
def test_only_devices_that_consent_contribute_training_data(
    links, broker_settings, device_id, local_model, worker_factory, database_url
):
    """Two devices ask the same worker about the same sentence; only the one whose owner consents is kept for
    training, with the worker's answer as its label; the other's utterance is answered and stored, never kept."""
    sharing, private = f"{device_id}-sharing", f"{device_id}-private"
    utterances, results = Inbox(), Inbox()
    observer = links()
    for device in (sharing, private):
        observer.subscribe(UTTERANCE.topic(device_id=device), utterances)
        observer.subscribe(RESULT.topic(device_id=device), results)
    worker = worker_factory(f"g-{device_id}", device_id, database_url=database_url)
    run_device(broker_settings, sharing, local_model, [OUT_OF_VOCABULARY_SAMPLE], cloud={"share_for_training": True})
    run_device(broker_settings, private, local_model, [OUT_OF_VOCABULARY_SAMPLE])
    sent = {utterance.device_id: (utterance, envelope) for utterance, envelope in drain(utterances)}
    answers = {answer.device_id: answer for answer, _ in drain(results)}
    assert set(sent) == set(answers) == {sharing, private}
    assert all(answer.source == Source.CLOUD and answer.error is None for answer in answers.values())
    # The consent travels in the request's metadata, and only when given.
    meta = {device: json.loads(dict(envelope.user_properties)[META_PROPERTY]) for device, (_, envelope) in sent.items()}
    assert meta[sharing]["share_for_training"] is True and sent[sharing][0].share_for_training
    assert "share_for_training" not in meta[private] and not sent[private][0].share_for_training
    assert worker.store.counts()["utterances"] == 2  # both answered and stored as the worker's own records
    assert worker.store.contribution_counts() == {sharing: 1}
    (kept,) = worker.store.contributions()
    assert worker.store.contributions([private]) == []
    utterance, answer = sent[sharing][0], answers[sharing]
    assert (kept.device_id, kept.utterance_id, kept.audio) == (sharing, utterance.utterance_id, utterance.audio)
    assert (kept.model_version, kept.sample_rate, kept.duration_s) == (local_model.version, 16000, utterance.duration_s)
    assert (kept.intent, kept.transcript, kept.confidence) == (answer.intent, answer.transcript, answer.confidence)
    assert "weather be like tomorrow" in kept.transcript.lower()


@pytest.mark.slow
def test_a_training_sample_of_an_edge_decision_is_labelled_by_the_cloud_and_makes_no_second_result(
    links, broker_settings, device_id, local_model, worker_factory
):
    """With training_sample_share 1, the command the device decides itself is also sent, with the edge result's
    id, only to be labelled: one result (the edge one, acted on), one training contribution with the cloud's
    label, and a reply the device counts and does nothing with."""
    utterances, results = Inbox(), Inbox()
    observer = links()
    observer.subscribe(UTTERANCE.topic(device_id=device_id), utterances)
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    worker = worker_factory(f"g-{device_id}", device_id)
    with device_running(
        broker_settings,
        device_id,
        local_model,
        [IN_VOCABULARY_SAMPLE],
        cloud={"share_for_training": True, "training_sample_share": 1.0},
    ) as runtime:
        assert wait_until(lambda: runtime.presence.counters["training_samples_labelled"] == 1, timeout_s=30)
        counters = dict(runtime.presence.counters)
    (edge,) = [answer for answer, _ in drain(results)]
    assert (edge.source, edge.intent, edge.acted) == (Source.EDGE, "lights_on", True)
    (sample,) = [utterance for utterance, _ in drain(utterances)]
    assert sample.reason == UploadReason.TRAINING_SAMPLE and sample.share_for_training
    assert sample.utterance_id == edge.utterance_id
    assert counters["training_samples_sent"] == 1 and counters.get("cloud_unknown_replies", 0) == 0
    assert counters.get("cloud_requests", 0) == 0  # a sample is not a question
    (kept,) = worker.store.contributions()
    assert (kept.utterance_id, kept.intent) == (edge.utterance_id, "lights_on")


def test_training_samples_need_consent_and_a_share_in_range() -> None:
    with pytest.raises(SettingsError, match="needs share_for_training"):
        CloudSettings(training_sample_share=0.1)
    with pytest.raises(SettingsError, match=r"must be in \[0, 1\]"):
        CloudSettings(share_for_training=True, training_sample_share=1.5)


def answered_at(confidence: float, links, broker_settings, device_id, local_model):
    """A device with a floor of 0.9 asks about a sentence it does not know, and a cloud peer replies that it heard
    lights_on at ``confidence``: the device, the utterance it sent, and the one result and envelope it published."""
    results = Inbox()
    links().subscribe(RESULT.topic(device_id=device_id), results)
    peer = CloudPeer(links(), device_id, lights(confidence))
    action_hooks.CALLS.clear()
    runtime = run_device(
        broker_settings,
        device_id,
        local_model,
        [OUT_OF_VOCABULARY_SAMPLE],
        cloud={"min_confidence": 0.9},
        actions={"*": {"entry_point": "tests.action_hooks:record"}},
    )
    ((result, envelope),) = drain(results)  # the device's result; the peer published only its reply
    return runtime, peer.utterances.get(5), result, envelope


def test_a_cloud_answer_over_the_floor_is_acted_on_and_its_one_result_says_so(
    links, broker_settings, device_id, local_model
):
    runtime, asked, result, envelope = answered_at(0.93, links, broker_settings, device_id, local_model)
    assert action_hooks.CALLS == [{"intent": "lights_on", "slots": {}}]
    assert (result.utterance_id, result.source, result.intent, result.acted) == (
        asked.utterance_id,
        Source.CLOUD,
        "lights_on",
        True,
    )
    assert (result.transcript, result.confidence, result.error) == ("turn on the lights", 0.93, None)
    assert envelope.correlation_data == asked.utterance_id.encode()
    assert result.timings_ms["cloud"] == 44.0 and result.timings_ms["asr"] == 40.0
    assert runtime.presence.counters["cloud_results"] == 1 and runtime.presence.counters["cloud_under_floor"] == 0


def test_a_cloud_answer_under_the_floor_is_not_acted_on_and_its_result_says_not_understood(
    links, broker_settings, device_id, local_model
):
    runtime, asked, result, _ = answered_at(0.62, links, broker_settings, device_id, local_model)
    assert action_hooks.CALLS == []
    assert (result.utterance_id, result.source, result.intent, result.slots, result.acted) == (
        asked.utterance_id,
        Source.CLOUD,
        None,
        {},
        False,
    )
    assert result.error.code == ErrorCode.NOT_UNDERSTOOD
    assert result.error.message == (
        "the cloud heard 'turn on the lights' as lights_on at 0.62, under this device's floor of 0.90"
    )
    assert (result.transcript, result.confidence) == ("turn on the lights", 0.62)  # what was heard, still said
    counters = runtime.presence.counters
    assert (counters["cloud_results"], counters["cloud_under_floor"], counters["actions_run"]) == (1, 1, 0)


@pytest.mark.slow
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


class FirstCopyLost:
    """A worker that died with the first copy of each request (it never answers it) and a live one that answers
    every later copy, played on the real broker."""

    def __init__(self, link: MqttLink, device_id: str) -> None:
        self.link = link
        self.copies: list[Utterance] = []
        link.subscribe(UTTERANCE.topic(device_id=device_id), self._on_utterance)

    def _on_utterance(self, topic: str, envelope: Envelope) -> None:
        utterance = decode(topic, envelope)
        self.copies.append(utterance)
        if len(self.copies) > 1:
            reply = lights(0.99)(utterance)
            threading.Thread(
                target=self.link.publish,
                args=(envelope.response_topic, reply.to_wire()),
                kwargs={"qos": 1, "retain": False},
            ).start()


@pytest.mark.slow
def test_an_unanswered_request_is_sent_again_with_the_same_utterance_id(links, broker_settings, device_id, local_model):
    # Issue 21: a request that went to a worker which died, or into a stopped worker's session, waited there
    # unanswered; the device now sends it again after cloud.resend_after_s, and a live worker answers it.
    results = Inbox()
    links().subscribe(RESULT.topic(device_id=device_id), results)
    workers = FirstCopyLost(links(), device_id)
    runtime = run_device(
        broker_settings, device_id, local_model, [OUT_OF_VOCABULARY_SAMPLE], cloud={"timeout_s": 6, "resend_after_s": 1}
    )
    ((result, _),) = drain(results)
    assert (result.source, result.intent, result.acted) == (Source.CLOUD, "lights_on", True)
    assert len(workers.copies) == 2 and workers.copies[0].utterance_id == workers.copies[1].utterance_id
    assert workers.copies[0].utterance_id == result.utterance_id
    assert runtime.presence.counters["cloud_resends"] == 1
    # Without re-sending, the same lost first copy is a cloud_timeout.
    lost = FirstCopyLost(links(), f"{device_id}-once")
    once = run_device(
        broker_settings, f"{device_id}-once", local_model, [OUT_OF_VOCABULARY_SAMPLE],
        cloud={"timeout_s": 2, "resend_after_s": 0},
    )  # fmt: skip
    assert len(lost.copies) == 1 and once.presence.counters["cloud_timeouts"] == 1
    assert once.presence.counters.get("cloud_resends", 0) == 0


@pytest.mark.slow
def test_a_reply_after_the_timeout_gets_no_second_result_and_is_counted_late(
    links, broker_settings, device_id, local_model, caplog
):
    caplog.set_level(logging.INFO, logger="device")
    results = Inbox()
    links().subscribe(RESULT.topic(device_id=device_id), results)
    peer = CloudPeer(links(), device_id, lights(0.99))
    peer.release.clear()  # the worker is slow: it answers once the device has given up
    action_hooks.CALLS.clear()
    with device_running(
        broker_settings,
        device_id,
        local_model,
        [OUT_OF_VOCABULARY_SAMPLE],
        cloud={"timeout_s": 1},
        actions={"*": {"entry_point": "tests.action_hooks:record"}},
    ) as runtime:
        timed_out = decode(*results.get(30))
        assert (timed_out.source, timed_out.error.code, timed_out.acted) == (Source.EDGE, "cloud_timeout", False)
        peer.release.set()
        assert wait_until(lambda: runtime.presence.counters["cloud_late_replies"] == 1, timeout_s=10)
        results.expect_nothing(1.0)  # one result for the utterance: the cloud_timeout
    assert drain(results) == []
    assert action_hooks.CALLS == []
    assert runtime.presence.counters["cloud_results"] == 0
    late = logged(caplog, "cloud answer after the device gave up")
    assert len(late) == 1 and late[0].utterance_id == timed_out.utterance_id
    assert "no second result" in late[0].getMessage() and late[0].levelno == logging.WARNING


@pytest.mark.slow
def test_a_reply_about_an_unknown_utterance_is_warned_about_counted_and_ignored(
    links, broker_settings, device_id, local_model, caplog
):
    caplog.set_level(logging.INFO, logger="device")
    results, statuses = Inbox(), Inbox()
    observer = links()
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    observer.subscribe(STATUS.topic(device_id=device_id), statuses)
    action_hooks.CALLS.clear()
    unknown = new_utterance_id()
    stray = CloudReply(device_id, unknown, "turn on the lights", "lights_on", {}, 0.99, {"total": 40.0})
    with device_running(
        broker_settings, device_id, local_model, [NOISE], actions={"*": {"entry_point": "tests.action_hooks:record"}}
    ) as runtime:
        assert decode(*statuses.get(30)).state == DeviceState.ONLINE  # subscribed to its reply topic by now
        worker = links()
        worker.publish(REPLY.topic(device_id=device_id), stray.to_wire(), qos=1, retain=False)
        # And replies that are not valid: logged and ignored, as any invalid message.
        worker.publish(REPLY.topic(device_id=device_id), Envelope(b"{oops", "application/json"), qos=1, retain=False)
        someone_else = CloudReply(f"{device_id}-other", unknown, None, None, {}, 0.0, {"total": 1.0})
        worker.publish(REPLY.topic(device_id=device_id), someone_else.to_wire(), qos=1, retain=False)
        assert wait_until(lambda: len(logged(caplog, "ignored invalid cloud reply")) == 2)
        assert runtime.presence.counters["cloud_unknown_replies"] == 1
        results.expect_nothing(1.0)
    assert action_hooks.CALLS == []
    warnings = [record for record in logged(caplog, unknown) if record.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "not waiting for and does not remember" in warnings[0].getMessage()
    assert drain(results) == []
    assert runtime.presence.counters["cloud_late_replies"] == 0


@pytest.mark.broker
@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.subprocess
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


@pytest.mark.slow
@pytest.mark.subprocess
def test_device_run_stops_cleanly_at_the_end_of_stdin(links, broker_settings, device_id, tmp_path):
    statuses = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), statuses)
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "{device_id}"\n[broker]\nport = {broker_settings.port}\n[audio]\nsource = "stdin"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "device", "--log-format", "json", "run", "--config", str(config)],
        input=_pcm(IN_VOCABULARY_SAMPLE),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    states = [decode(*statuses.get()).state for _ in range(2)]
    assert states == [DeviceState.ONLINE, DeviceState.OFFLINE]
    assert b'"event": "edge result"' in done.stderr and b'"intent": "lights_on"' in done.stderr
