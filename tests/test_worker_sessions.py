"""A worker's broker session on a real Mosquitto: a clean stop ends it, and `cloud_worker retire` ends a gone
worker's, so that no share of the group's utterances waits in the session of a worker that is not there."""

from __future__ import annotations

import queue
import subprocess
import sys

import pytest

from cloud_worker.service import worker_client_id
from common.mqtt import MqttLink, PublishRefused
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.protocol import decode
from schemas.topics import REPLY, UTTERANCE, shared_filter
from tests.conftest import Inbox, make_utterance

MESSAGES = 12


def group_member(broker_settings, client_id: str, group: str) -> tuple[MqttLink, queue.Queue]:
    """A persistent member of the shared subscription, like a worker: what it receives goes on the queue."""
    link = MqttLink(client_id, broker_settings, manual_ack=True, clean_start=False, session_expiry_s=600)
    received: queue.Queue = queue.Queue()
    link.consume(shared_filter(group, UTTERANCE), received.put, qos=UTTERANCE.qos)
    return link, received


def send_utterances(links, device_id: str) -> None:
    sender = links()
    for number in range(MESSAGES):
        # The broker routes by topic; what the payload says does not matter to the shared subscription.
        sender.publish(
            UTTERANCE.topic(device_id=device_id), Envelope(f"{number}".encode(), "text/plain"), qos=1, retain=False
        )


def drained(received: queue.Queue, timeout_s: float = 1.5) -> int:
    count = 0
    try:
        while True:
            received.get(timeout=timeout_s)
            count += 1
    except queue.Empty:
        return count


@pytest.mark.slow
@pytest.mark.subprocess
def test_retire_ends_a_gone_workers_session_and_the_live_worker_gets_everything(
    broker_settings, links, device_id, tmp_path
):
    group = f"retire-{device_id}"
    live, live_received = group_member(broker_settings, f"live-{device_id}", group)
    gone_id = f"gone-{device_id}"
    gone, _ = group_member(broker_settings, worker_client_id(gone_id), group)
    try:
        gone.close()  # as a worker that died: its session stays, and the broker keeps routing to it
        send_utterances(links, device_id)
        before = drained(live_received)
        assert 0 < before < MESSAGES, f"the gone worker's session should have taken a share, live got {before}"
        retired = subprocess.run(
            [
                sys.executable,
                "-m",
                "cloud_worker",
                "retire",
                "--worker-id",
                gone_id,
                "--port",
                str(broker_settings.port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert retired.returncode == 0, retired.stderr
        assert f'"retired": "{gone_id}"' in retired.stdout
        send_utterances(links, device_id)
        assert drained(live_received) == MESSAGES
    finally:
        live.close(end_session=True)


@pytest.mark.slow
def test_a_worker_that_stops_cleanly_leaves_no_session_behind(worker_factory, broker_settings, links, device_id):
    # Issue 21: after a worker with a persistent session stopped cleanly, half of the devices' utterances went
    # unanswered, queued in its session until it expired.
    group = f"stop-{device_id}"
    live, live_received = group_member(broker_settings, f"live-{device_id}", group)
    try:
        worker_factory(group, f"stopping-{device_id}").stop()
        send_utterances(links, device_id)
        assert drained(live_received) == MESSAGES
        # Kept on request (--keep-session), for a restart that takes up its queued share.
        worker_factory(group, f"keeping-{device_id}").stop(end_session=False)
        send_utterances(links, device_id)
        assert 0 < drained(live_received) < MESSAGES
    finally:
        live.close(end_session=True)
        MqttLink(worker_client_id(f"keeping-{device_id}"), broker_settings, clean_start=True).close(end_session=True)


@pytest.mark.slow
def test_draining_a_gone_workers_session_answers_what_was_queued_for_it(
    worker_factory, broker_settings, links, device_id
):
    # A worker killed for good leaves its share of the load in its session; `serve --drain` under its id
    # resumes the session, leaves the group, answers all of it, and ends it.
    group = f"drain-{device_id}"
    live, live_received = group_member(broker_settings, f"live-{device_id}", group)  # takes a share, answers none
    gone_id = f"gone-{device_id}"
    gone, _ = group_member(broker_settings, worker_client_id(gone_id), group)
    replies: queue.Queue = queue.Queue()
    links().subscribe(REPLY.topic(device_id=device_id), lambda topic, envelope: replies.put(decode(topic, envelope)))
    try:
        gone.close()  # killed: its session keeps its share
        device = links()
        sent = set()
        for _ in range(8):
            utterance = make_utterance(device_id)
            sent.add(utterance.utterance_id)
            device.send(utterance)
        taken_by_live = drained(live_received)
        assert 0 < taken_by_live < 8
        worker_factory(group, gone_id).stop()  # resumed, drained, ended
        answered = set()
        try:
            while True:
                answered.add(replies.get(timeout=2).utterance_id)
        except queue.Empty:
            pass
        assert len(answered) == 8 - taken_by_live and answered <= sent
    finally:
        live.close(end_session=True)


def test_a_refusal_whose_report_the_broker_refuses_is_counted_and_the_worker_goes_on(
    worker_factory, links, device_id, monkeypatch
):
    """The error report of a refused utterance is published from inside the refusal's exception handler: a publish
    that fails there is logged and counted, not raised out of it (which cost the whole batch its answers)."""
    worker = worker_factory(f"refusals-{device_id}", f"w-{device_id}")
    send = worker._link.send

    def refuse_reports(message, **options):
        if isinstance(message, ErrorReport):
            raise PublishRefused("broker refused the publish: Quota exceeded")
        send(message, **options)

    monkeypatch.setattr(worker._link, "send", refuse_reports)
    replies = Inbox()
    links().subscribe(REPLY.topic(device_id=device_id), replies)
    sender = links()
    sender.publish(UTTERANCE.topic(device_id=device_id), Envelope(b"{}", "text/plain"), qos=1, retain=False)
    utterance = make_utterance(device_id)
    sender.send(utterance)
    assert decode(*replies.get(10)).utterance_id == utterance.utterance_id
    # Handled in arrival order: the refusal was counted before the answer went out.
    assert (worker.counts["refused"], worker.counts["refusals_unsent"]) == (1, 1)
