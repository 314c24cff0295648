"""The worker's utterance service against a real Mosquitto: every request answered once, on the device's reply topic
only, bad input refused clearly."""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import sqlite3
import time
import urllib.request

import numpy as np
import pytest
import soundfile
from prometheus_client.parser import text_string_to_metric_families

from cloud_worker.service import UtteranceService
from cloud_worker.settings import BatchSettings
from cloud_worker.storage import StorageSettings, Store, StoredUtterance
from common.backoff import BackoffSettings
from common.opus import MAX_UTTERANCE_S
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.result import Result, Source
from schemas.topics import ERROR, META_PROPERTY, REPLY, RESULT, UTTERANCE

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, Inbox, make_utterance, wait_until

_groups = itertools.count()


@pytest.fixture
def worker(worker_factory) -> UtteranceService:
    return worker_factory(f"g{next(_groups)}", "solo")


def replies_to(device_id: str, links) -> Inbox:
    """What arrives on the device's reply topic, where the worker answers."""
    inbox = Inbox()
    links().subscribe(REPLY.topic(device_id=device_id), inbox)
    return inbox


def results_of(device_id: str, links) -> Inbox:
    """What arrives on the device's result topic, which is the device's alone: the worker never publishes there."""
    inbox = Inbox()
    links().subscribe(RESULT.topic(device_id=device_id), inbox)
    return inbox


def error_reports(links) -> Inbox:
    inbox = Inbox()
    links().subscribe(ERROR.topic(), inbox)
    return inbox


def next_report_about(inbox: Inbox, topic: str) -> ErrorReport:
    while True:  # reports of other tests' workers share the topic
        report = decode(*inbox.get())
        if report.topic_name == topic:
            return report


@pytest.mark.slow
def test_an_out_of_vocabulary_utterance_is_answered_with_its_transcript_and_no_intent(
    worker, links, device_id: str
) -> None:
    results, device_results = replies_to(device_id, links), results_of(device_id, links)
    utterance = make_utterance(device_id, OUT_OF_VOCABULARY_SAMPLE)
    links().send(utterance)
    topic, envelope = results.get(10)
    result = decode(topic, envelope)
    assert envelope.correlation_data == utterance.utterance_id.encode()
    assert isinstance(result, CloudReply) and topic == REPLY.topic(device_id=device_id)
    assert (result.utterance_id, result.intent, result.error) == (utterance.utterance_id, None, None)
    assert "weather be like tomorrow" in result.transcript.lower()
    assert 0 < result.confidence <= 1
    timings = result.timings_ms
    assert set(timings) == {"queue", "decode", "asr", "total"}
    assert timings["total"] >= timings["queue"] + timings["asr"] and timings["decode"] > 0
    results.expect_nothing()  # exactly one answer
    device_results.expect_nothing()  # and none on the result topic, which is the device's to publish on


def test_a_command_is_answered_with_its_intent(worker, links, device_id: str) -> None:
    results = replies_to(device_id, links)
    links().send(make_utterance(device_id))  # "hey jarvis, turn on the lights"
    result = decode(*results.get(10))
    assert (result.intent, result.slots, result.error) == ("lights_on", {}, None)
    assert "turn on the lights" in result.transcript.lower()


def test_corrupt_audio_gets_an_error_result_and_a_report(worker, links, device_id: str) -> None:
    results, reports = replies_to(device_id, links), error_reports(links)
    good = make_utterance(device_id).to_wire()
    corrupt = Envelope(
        b"OggS" + bytes(3000), good.content_type, good.user_properties, good.response_topic, good.correlation_data
    )
    links().publish(UTTERANCE.topic(device_id=device_id), corrupt, qos=1, retain=False)
    answer = decode(*results.get(10))
    assert answer.error.code == ErrorCode.BAD_AUDIO and answer.intent is None
    report = next_report_about(reports, UTTERANCE.topic(device_id=device_id))
    assert (report.code, report.device_id, report.reporter) == (ErrorCode.BAD_AUDIO, device_id, "cloud_worker/solo")


def test_announced_duration_must_match_the_audio(worker, links, device_id: str) -> None:
    results = replies_to(device_id, links)
    links().send(make_utterance(device_id, duration_s=9.5))
    answer = decode(*results.get(10))
    assert answer.error.code == ErrorCode.MISMATCH and "9.500 s" in answer.error.message


def test_a_request_cannot_redirect_the_answer(worker, links, device_id: str) -> None:
    victim = f"{device_id}-victim"
    victim_results, own_results, reports = replies_to(victim, links), replies_to(device_id, links), error_reports(links)
    good = make_utterance(device_id).to_wire()
    redirected = Envelope(
        good.payload,
        good.content_type,
        good.user_properties,
        REPLY.topic(device_id=victim),
        good.correlation_data,
    )
    links().publish(UTTERANCE.topic(device_id=device_id), redirected, qos=1, retain=False)
    report = next_report_about(reports, UTTERANCE.topic(device_id=device_id))
    assert report.code == ErrorCode.MISMATCH
    victim_results.expect_nothing()
    own_results.expect_nothing()


def test_a_request_naming_the_result_topic_as_before_is_refused_and_answered_nowhere(
    worker, links, device_id: str
) -> None:
    """A device of the previous release names its result topic as Response Topic: no reply, no result, a report."""
    replies, results, reports = replies_to(device_id, links), results_of(device_id, links), error_reports(links)
    good = make_utterance(device_id).to_wire()
    previous = dataclasses.replace(good, response_topic=RESULT.topic(device_id=device_id))
    links().publish(UTTERANCE.topic(device_id=device_id), previous, qos=1, retain=False)
    report = next_report_about(reports, UTTERANCE.topic(device_id=device_id))
    assert report.code == ErrorCode.MISMATCH and "reply topic" in report.message
    assert RESULT.topic(device_id=device_id) in report.message
    replies.expect_nothing()
    results.expect_nothing()
    assert worker.counts["refused"] == 1 and worker.counts["answered"] == 0


def test_unicode_device_id_in_the_topic_is_reported_not_answered(worker, links, device_id: str) -> None:
    reports = error_reports(links)
    topic = f"mqvox/v1/devices/{device_id}-é/utterance"
    links().publish(topic, make_utterance(device_id).to_wire(), qos=1, retain=False)
    report = next_report_about(reports, topic)
    assert report.code == ErrorCode.BAD_TOPIC and report.device_id == f"{device_id}-é"


def test_worker_keeps_answering_after_bad_input(worker, links, device_id: str) -> None:
    results = replies_to(device_id, links)
    sender = links()
    topic = UTTERANCE.topic(device_id=device_id)
    for junk in (Envelope(b"", None), Envelope(b"\x00" * 10, "audio/ogg; codecs=opus"), Envelope(b"{}", "x")):
        sender.publish(topic, junk, qos=1, retain=False)
    utterance = make_utterance(device_id)
    sender.send(utterance)
    answer = decode(*results.get(10))
    assert answer.utterance_id == utterance.utterance_id
    # Handled in arrival order, so the refusals were all counted before this answer went out.
    assert worker.counts["refused"] == 3
    assert wait_until(lambda: worker.counts["answered"] == 1)  # counted once the broker has the answer


@pytest.mark.slow
def test_workers_of_one_group_split_the_load_and_answer_each_utterance_once(
    worker_factory, links, device_id: str
) -> None:
    group = f"g{next(_groups)}"
    workers = [worker_factory(group, "a"), worker_factory(group, "b")]
    results = replies_to(device_id, links)
    sender = links()
    sent = [make_utterance(device_id) for _ in range(8)]
    for utterance in sent:
        sender.send(utterance)
    answers: list[CloudReply] = [decode(*results.get(15)) for _ in sent]
    results.expect_nothing()
    assert sorted(a.utterance_id for a in answers) == sorted(u.utterance_id for u in sent)
    assert wait_until(lambda: sum(w.counts["answered"] for w in workers) == len(sent))
    assert all(w.counts["answered"] >= 1 for w in workers), [w.counts for w in workers]
    assert sum(w.counts["transcribed"] for w in workers) == len(sent)


def _with_audio(utterance, samples: np.ndarray) -> Envelope:
    """The wire form of ``utterance`` carrying other Opus audio than its own (written without encode_opus's checks)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16000, format="OGG", subtype="OPUS")
    good = utterance.to_wire()
    return dataclasses.replace(good, payload=buffer.getvalue())


@pytest.mark.parametrize(
    ("audio", "code"),
    [
        (np.zeros(0, dtype=np.float32), ErrorCode.BAD_AUDIO),  # an OGG/Opus stream with no samples
        (np.zeros(int(16000 * (MAX_UTTERANCE_S + 1)), dtype=np.float32), ErrorCode.AUDIO_TOO_LONG),
    ],
    ids=["empty", "over-the-limit"],
)
@pytest.mark.slow
def test_unusable_audio_gets_an_error_result_and_the_worker_goes_on(
    worker, links, device_id: str, audio: np.ndarray, code: ErrorCode
) -> None:
    results = replies_to(device_id, links)
    sender = links()
    refused = make_utterance(device_id)
    sender.publish(refused.topic(), _with_audio(refused, audio), qos=1, retain=False)
    answer = decode(*results.get(10))
    assert (answer.utterance_id, answer.error.code, answer.intent) == (refused.utterance_id, code, None)
    following = make_utterance(device_id)
    sender.send(following)
    answer = decode(*results.get(10))
    assert (answer.utterance_id, answer.intent) == (following.utterance_id, "lights_on")
    assert worker.store.answer_of(device_id, refused.utterance_id) is None  # refused input is reported, not stored


def test_metadata_that_breaks_the_schema_is_refused(worker, links, device_id: str) -> None:
    results, reports = replies_to(device_id, links), error_reports(links)
    utterance = make_utterance(device_id)
    good = utterance.to_wire()
    meta = json.loads(dict(good.user_properties)[META_PROPERTY]) | {"sample_rate": 44100}
    broken = dataclasses.replace(good, user_properties=((META_PROPERTY, json.dumps(meta)),))
    links().publish(utterance.topic(), broken, qos=1, retain=False)
    report = next_report_about(reports, utterance.topic())
    assert report.code == ErrorCode.SCHEMA_VIOLATION and "sample_rate" in report.message
    assert decode(*results.get(10)).error.code == ErrorCode.SCHEMA_VIOLATION


@pytest.mark.slow
def test_a_redelivered_utterance_whose_answer_went_out_is_acknowledged_not_answered_twice(
    worker, links, device_id: str
) -> None:
    results = replies_to(device_id, links)
    sender = links()
    utterance = make_utterance(device_id, OUT_OF_VOCABULARY_SAMPLE)
    sender.send(utterance)
    decode(*results.get(10))
    assert wait_until(lambda: worker.store.answer_of(device_id, utterance.utterance_id).published_at is not None)
    # What a QoS 1 redelivery or a device's retry puts on the wire: the same request again.
    sender.send(utterance)
    assert wait_until(lambda: worker.counts["already_published"] == 1)
    results.expect_nothing()
    assert (worker.counts["answered"], worker.counts["transcribed"]) == (1, 1)
    assert worker.store.counts()["transcripts"] == 1


def weather_answer(utterance) -> Result:
    """The answer a worker stores for OUT_OF_VOCABULARY_SAMPLE: no intent, the transcript."""
    return Result(
        device_id=utterance.device_id,
        utterance_id=utterance.utterance_id,
        source=Source.CLOUD,
        transcript="What will the weather be like tomorrow?",
        intent=None,
        slots={},
        confidence=0.9,
        timings_ms={"total": 12.0},
    )


def test_a_stored_answer_that_never_went_out_is_published_from_storage_not_transcribed_again(
    worker, links, device_id: str
) -> None:
    utterance = make_utterance(device_id, OUT_OF_VOCABULARY_SAMPLE)
    # As a worker leaves it when it dies between its commit and its publish.
    stored = weather_answer(utterance)
    worker.store.save([StoredUtterance(utterance, time.time(), None, stored)])
    results = replies_to(device_id, links)
    links().send(utterance)
    assert decode(*results.get(10)) == CloudReply.of_result(stored)
    assert wait_until(lambda: worker.counts["replayed"] == 1)
    assert worker.counts["transcribed"] == 0
    assert wait_until(lambda: worker.store.answer_of(device_id, utterance.utterance_id).published_at is not None)


@pytest.mark.slow
def test_a_worker_deletes_expired_training_contributions_when_it_starts_and_keeps_new_ones(
    worker_factory, links, device_id: str, tmp_path
) -> None:
    url = f"sqlite:///{tmp_path / 'contributions.sqlite3'}"
    earlier = make_utterance(device_id, OUT_OF_VOCABULARY_SAMPLE, share_for_training=True)
    label = weather_answer(earlier)
    with Store(StorageSettings(url=url)) as store:  # kept two days ago by a worker that keeps them for 30
        store.save([StoredUtterance(earlier, time.time() - 2 * 86400, None, label)])
        assert store.contribution_counts() == {device_id: 1}
    worker = worker_factory(
        f"g{next(_groups)}", "retention", storage=StorageSettings(url=url, training_retention_days=1)
    )
    assert worker.store.contributions() == []  # gone at start, audio and all
    results = replies_to(device_id, links)
    spoken = make_utterance(device_id, share_for_training=True)
    links().send(spoken)
    assert decode(*results.get(10)).intent == "lights_on"
    assert wait_until(lambda: worker.store.contribution_counts() == {device_id: 1})
    (kept,) = worker.store.contributions()
    assert (kept.utterance_id, kept.intent, kept.audio) == (spoken.utterance_id, "lights_on", spoken.audio)


@pytest.mark.slow
def test_the_same_utterance_twice_in_one_batch_is_transcribed_and_answered_once(
    worker_factory, links, device_id: str
) -> None:
    worker = worker_factory(f"g{next(_groups)}", "batch", batching=BatchSettings(max_batch=8, window_ms=500))
    results = replies_to(device_id, links)
    sender = links()
    utterance = make_utterance(device_id)
    sender.send(utterance)
    sender.send(utterance)
    assert decode(*results.get(10)).intent == "lights_on"
    # The copy is acknowledged without an answer of its own: one utterance id, one result.
    assert wait_until(lambda: worker.counts["already_published"] == 1)
    results.expect_nothing()
    assert (worker.counts["answered"], worker.counts["transcribed"]) == (1, 1)


@pytest.mark.slow
def test_a_batch_answers_each_utterance_with_its_own_words(worker_factory, links, device_id: str) -> None:
    worker = worker_factory(f"g{next(_groups)}", "batch", batching=BatchSettings(max_batch=8, window_ms=1000))
    results = replies_to(device_id, links)
    sender = links()
    sent = {}
    for index in range(6):
        path = OUT_OF_VOCABULARY_SAMPLE if index % 2 else IN_VOCABULARY_SAMPLE
        utterance = make_utterance(device_id, path)
        sent[utterance.utterance_id] = path
        sender.send(utterance)
    answers = [decode(*results.get(15)) for _ in sent]
    for answer in answers:
        expected = "lights_on" if sent[answer.utterance_id] == IN_VOCABULARY_SAMPLE else None
        assert answer.intent == expected, answer
    assert worker.metrics.batch_size.collect()[0].samples  # observed
    assert max(_batch_sizes(worker)) > 1  # they were transcribed together


@pytest.mark.slow
def test_no_word_of_one_devices_utterance_reaches_another_devices_reply(worker_factory, links, device_id: str) -> None:
    """Two devices speak at once, into one batch: each reply holds its own device's words only."""
    worker = worker_factory(f"g{next(_groups)}", "batch", batching=BatchSettings(max_batch=8, window_ms=1000))
    other = f"{device_id}-b"
    own_replies, other_replies = replies_to(device_id, links), replies_to(other, links)
    sender = links()
    for _ in range(2):
        sender.send(make_utterance(device_id, IN_VOCABULARY_SAMPLE))
        sender.send(make_utterance(other, OUT_OF_VOCABULARY_SAMPLE))
    own = [decode(*own_replies.get(15)) for _ in range(2)]
    theirs = [decode(*other_replies.get(15)) for _ in range(2)]
    assert max(_batch_sizes(worker)) > 1  # they shared a batch
    weather_words = {"what", "will", "weather", "be", "like", "tomorrow"}
    for reply in own:
        assert reply.intent == "lights_on" and not set(reply.transcript.lower().strip(".?").split()) & weather_words
    for reply in theirs:
        assert reply.intent is None and not {"turn", "lights"} & set(reply.transcript.lower().split())


def _batch_sizes(worker) -> list[float]:
    """Upper bounds of the batch-size histogram buckets that counted at least one batch."""
    buckets = [s for s in worker.metrics.batch_size.collect()[0].samples if s.name.endswith("_bucket")]
    sizes, below = [], 0.0
    for sample in buckets:
        if sample.value > below:
            sizes.append(float(sample.labels["le"]))
        below = sample.value
    return sizes


@pytest.mark.slow
def test_nothing_is_answered_or_acknowledged_while_the_database_is_locked_and_all_is_answered_after(
    worker_factory, links, device_id: str, tmp_path
) -> None:
    database = tmp_path / "locked.sqlite3"
    storage = StorageSettings(url=f"sqlite:///{database}", busy_timeout_s=0.2)
    retry = BackoffSettings(initial_s=0.1, max_s=0.5)
    worker = worker_factory(f"g{next(_groups)}", "locked", storage=storage, storage_retry=retry)
    results = replies_to(device_id, links)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another writer holds the file: every write of the worker times out
    sender = links()
    try:
        first, second = make_utterance(device_id), make_utterance(device_id)
        sender.send(first)
        assert wait_until(lambda: worker.counts["storage_retries"] >= 2, timeout_s=10)
        sender.send(second)
        results.expect_nothing(1.0)
        assert worker.metrics.storage_available._value.get() == 0
        assert worker.counts["answered"] == 0
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # The database is back: both are answered, once each, in the order they were sent.
    answered = [decode(*results.get(10)).utterance_id for _ in range(2)]
    assert answered == [first.utterance_id, second.utterance_id]
    results.expect_nothing()
    assert worker.metrics.storage_available._value.get() == 1
    assert worker.counts["transcribed"] == 2


@pytest.mark.slow
def test_metrics_are_served_for_prometheus(worker_factory, links, device_id: str) -> None:
    worker = worker_factory(f"g{next(_groups)}", "metrics", metrics_port=0)
    results = replies_to(device_id, links)
    links().send(make_utterance(device_id))
    results.get(10)
    assert wait_until(lambda: worker.counts["answered"] == 1)
    page = urllib.request.urlopen(f"http://127.0.0.1:{worker.metrics_port}/metrics", timeout=5).read().decode()
    families = {family.name: family for family in text_string_to_metric_families(page)}
    assert families["mqvox_worker_utterances_received"].samples[0].value == 1
    answered = {s.labels.get("how"): s.value for s in families["mqvox_worker_utterances_answered"].samples}
    assert answered["transcribed"] == 1
    assert "mqvox_worker_queue_depth" in families
    latency = {s.name: s.value for s in families["mqvox_worker_latency_seconds"].samples}
    assert latency["mqvox_worker_latency_seconds_count"] == 1 and latency["mqvox_worker_latency_seconds_sum"] > 0
    assert {s.name for s in families["mqvox_worker_real_time_factor"].samples} >= {
        "mqvox_worker_real_time_factor_count"
    }
