"""The worker's utterance service against a real Mosquitto: every request answered once, bad input refused clearly."""

from __future__ import annotations

import itertools

import pytest

from cloud_worker.service import UtteranceService
from cloud_worker.settings import WorkerSettings
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode
from schemas.protocol import decode
from schemas.result import Result, Source
from schemas.topics import ERROR, RESULT, UTTERANCE

from .conftest import OUT_OF_VOCABULARY_SAMPLE, Inbox, make_utterance, wait_until

_groups = itertools.count()


@pytest.fixture
def worker_factory(broker_settings):
    started: list[UtteranceService] = []

    def start(group: str, worker_id: str) -> UtteranceService:
        service = UtteranceService(WorkerSettings(broker=broker_settings, group=group, worker_id=worker_id)).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def worker(worker_factory) -> UtteranceService:
    return worker_factory(f"g{next(_groups)}", "solo")


def results_of(device_id: str, links) -> Inbox:
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


def test_valid_utterance_is_answered_on_its_response_topic(worker, links, device_id: str) -> None:
    results = results_of(device_id, links)
    utterance = make_utterance(device_id, OUT_OF_VOCABULARY_SAMPLE)
    links().send(utterance)
    topic, envelope = results.get(10)
    result = decode(topic, envelope)
    assert envelope.correlation_data == utterance.utterance_id.encode()
    assert (result.utterance_id, result.source, result.intent) == (utterance.utterance_id, Source.CLOUD, None)
    # No recogniser yet: said so, not pretended.
    assert result.error.code == ErrorCode.ASR_UNAVAILABLE
    assert result.timings_ms["total"] >= result.timings_ms["decode"] > 0
    results.expect_nothing()  # exactly one answer


def test_corrupt_audio_gets_an_error_result_and_a_report(worker, links, device_id: str) -> None:
    results, reports = results_of(device_id, links), error_reports(links)
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
    results = results_of(device_id, links)
    links().send(make_utterance(device_id, duration_s=9.5))
    answer = decode(*results.get(10))
    assert answer.error.code == ErrorCode.MISMATCH and "9.500 s" in answer.error.message


def test_a_request_cannot_redirect_the_answer(worker, links, device_id: str) -> None:
    victim = f"{device_id}-victim"
    victim_results, own_results, reports = results_of(victim, links), results_of(device_id, links), error_reports(links)
    good = make_utterance(device_id).to_wire()
    redirected = Envelope(
        good.payload,
        good.content_type,
        good.user_properties,
        RESULT.topic(device_id=victim),
        good.correlation_data,
    )
    links().publish(UTTERANCE.topic(device_id=device_id), redirected, qos=1, retain=False)
    report = next_report_about(reports, UTTERANCE.topic(device_id=device_id))
    assert report.code == ErrorCode.MISMATCH
    victim_results.expect_nothing()
    own_results.expect_nothing()


def test_unicode_device_id_in_the_topic_is_reported_not_answered(worker, links, device_id: str) -> None:
    reports = error_reports(links)
    topic = f"mqvox/v1/devices/{device_id}-é/utterance"
    links().publish(topic, make_utterance(device_id).to_wire(), qos=1, retain=False)
    report = next_report_about(reports, topic)
    assert report.code == ErrorCode.BAD_TOPIC and report.device_id == f"{device_id}-é"


def test_worker_keeps_answering_after_bad_input(worker, links, device_id: str) -> None:
    results = results_of(device_id, links)
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


def test_workers_of_one_group_split_the_load_and_answer_each_utterance_once(
    worker_factory, links, device_id: str
) -> None:
    group = f"g{next(_groups)}"
    workers = [worker_factory(group, "a"), worker_factory(group, "b")]
    results = results_of(device_id, links)
    sender = links()
    sent = [make_utterance(device_id) for _ in range(8)]
    for utterance in sent:
        sender.send(utterance)
    answers: list[Result] = [decode(*results.get(15)) for _ in sent]
    results.expect_nothing()
    assert sorted(a.utterance_id for a in answers) == sorted(u.utterance_id for u in sent)
    assert wait_until(lambda: sum(w.counts["answered"] for w in workers) == len(sent))
    assert all(w.counts["answered"] >= 1 for w in workers), [w.counts for w in workers]
