"""The device's outbox: bounded, persistent, replayed in order; the device works while the broker is away."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import pytest

from broker_config.broker import Broker, free_port
from cloud_worker.service import UtteranceService
from cloud_worker.settings import WorkerSettings
from cloud_worker.storage import StorageSettings
from common.mqtt import BrokerSettings, Delivery, MqttLink
from device.audio_sources import PlaylistSource
from device.outbox import Outbox, OutboxSender
from device.runtime import DeviceRuntime
from device.settings import DropPolicy, OutboxSettings, settings_from_dict
from schemas.protocol import decode
from schemas.result import Result, Source
from schemas.status import DeviceState
from schemas.topics import RESULT, STATUS, UTTERANCE, shared_filter

from . import action_hooks
from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, REPO, Inbox, make_utterance, wait_until

NOISE = REPO / "device" / "self_test_clips" / "negative_noise.flac"
"""A recording with no wake phrase: a device run over it says nothing of its own."""


def result(device_id: str, number: int) -> Result:
    return Result(
        device_id=device_id,
        utterance_id=f"utterance{number:04d}",
        source=Source.EDGE,
        transcript=None,
        intent="lights_on",
        slots={},
        confidence=0.9,
        timings_ms={"total": 1.0},
        sent_at=1_800_000_000.0,
    )


def outbox_at(path: Path, **limits) -> Outbox:
    return Outbox(OutboxSettings(path=str(path), **limits))


def held_ids(outbox: Outbox) -> list[str]:
    return [entry.utterance_id for entry in outbox.pending(limit=10_000)]


def test_what_the_outbox_holds_survives_a_restart_in_order(tmp_path: Path) -> None:
    outbox = outbox_at(tmp_path / "outbox.sqlite3")
    for number in range(5):
        outbox.put(result("kitchen", number))
    outbox.remove(outbox.pending(limit=1)[0].seq)
    outbox.close()
    reopened = outbox_at(tmp_path / "outbox.sqlite3")
    assert held_ids(reopened) == ["utterance0001", "utterance0002", "utterance0003", "utterance0004"]
    entry = reopened.pending(limit=1)[0]
    assert decode(entry.topic, entry.envelope) == result("kitchen", 1)  # the message itself, properties and all


def test_when_full_the_oldest_gives_way_and_is_counted(tmp_path: Path) -> None:
    drops: list[tuple[str, int]] = []
    outbox = Outbox(
        OutboxSettings(path=str(tmp_path / "o.sqlite3"), max_messages=3), on_drop=lambda *d: drops.append(d)
    )
    for number in range(5):
        assert outbox.put(result("kitchen", number)) is not None
    assert held_ids(outbox) == ["utterance0002", "utterance0003", "utterance0004"]
    assert outbox.stats().dropped == {"full": 2}
    assert drops == [("full", 1), ("full", 1)]


def test_with_drop_newest_a_full_outbox_refuses_the_new_message(tmp_path: Path) -> None:
    outbox = outbox_at(tmp_path / "o.sqlite3", max_messages=2, drop=DropPolicy.NEWEST)
    seqs = [outbox.put(result("kitchen", number)) for number in range(4)]
    assert seqs[2:] == [None, None]
    assert held_ids(outbox) == ["utterance0000", "utterance0001"]
    assert outbox.stats().dropped == {"full": 2}


def test_a_drop_is_told_after_its_commit_outside_the_outboxs_lock(tmp_path: Path) -> None:
    # The callback reads the outbox (the lock it was once called under) and sees the drop already committed.
    told: list[tuple[str, int, dict[str, int]]] = []
    outbox = Outbox(
        OutboxSettings(path=str(tmp_path / "o.sqlite3"), max_messages=1, drop=DropPolicy.NEWEST),
        on_drop=lambda reason, count: told.append((reason, count, outbox.stats().dropped)),
    )
    putting = threading.Thread(target=lambda: [outbox.put(result("kitchen", number)) for number in range(2)])
    putting.start()
    putting.join(10)
    assert not putting.is_alive(), "on_drop was called with the outbox's lock held"
    assert told == [("full", 1, {"full": 1})]


def test_the_byte_bound_drops_as_many_as_needed_and_an_oversized_message_alone(tmp_path: Path) -> None:
    size = len(result("kitchen", 0).to_wire().payload)
    outbox = outbox_at(tmp_path / "o.sqlite3", max_bytes=3 * size)
    for number in range(4):
        outbox.put(result("kitchen", number))
    assert held_ids(outbox) == ["utterance0001", "utterance0002", "utterance0003"]
    assert outbox.stats().bytes <= 3 * size
    tiny = outbox_at(tmp_path / "tiny.sqlite3", max_bytes=size - 1)
    assert tiny.put(result("kitchen", 0)) is None
    assert tiny.stats() == type(tiny.stats())(messages=0, bytes=0, dropped={"too_large": 1})


def test_messages_older_than_max_age_are_dropped_unsent(tmp_path: Path) -> None:
    outbox = outbox_at(tmp_path / "o.sqlite3", max_age_s=0.2)
    outbox.put(result("kitchen", 0))
    time.sleep(0.3)  # the condition itself: the first message grows older than max_age_s
    outbox.put(result("kitchen", 1))
    assert held_ids(outbox) == ["utterance0001"]
    assert outbox.stats().dropped == {"expired": 1}


@pytest.mark.broker
@pytest.mark.slow
def test_an_outbox_filled_before_the_broker_exists_is_replayed_in_order_when_it_starts(tmp_path: Path) -> None:
    port = free_port()
    settings = BrokerSettings(port=port, connect_timeout_s=0.5)
    outbox = outbox_at(tmp_path / "o.sqlite3", in_flight=3)
    device = MqttLink("outbox-replay", settings, require_connection=False)
    assert not device.connected
    sender = OutboxSender(outbox, device).start()
    try:
        for number in range(20):
            outbox.put(result("outbox-replay", number))
            sender.wake()
        with Broker(data_dir=tmp_path / "broker", port=port):
            inbox = Inbox()
            with MqttLink("observer", settings) as observer:
                observer.subscribe(RESULT.topic(device_id="outbox-replay"), inbox)
                # paho's reconnection backoff starts at 1 s and doubles: allow a few rounds.
                received = [decode(*inbox.get(40)).utterance_id for _ in range(20)]
                assert received == [f"utterance{number:04d}" for number in range(20)]
                inbox.expect_nothing()
            assert wait_until(lambda: outbox.stats().messages == 0)
    finally:
        sender.stop()
        device.close()


def device_settings(port: int, device_id: str, outbox: Path, **overrides):
    return settings_from_dict(
        {
            "device_id": device_id,
            "broker": {"port": port, "connect_timeout_s": 0.5},
            "outbox": {"path": str(outbox)},
        }
        | overrides
    )


@pytest.mark.broker
@pytest.mark.slow
def test_a_device_without_broker_acts_on_commands_and_says_it_all_once_the_broker_is_back(
    tmp_path: Path, local_model, transcriber
) -> None:
    # The device's broker is down while it hears a command and a question; the shared test broker (with a worker)
    # is not reachable for it: its own broker starts later, on the port it was told.
    port = free_port()
    device_id = "offline-device"
    outbox = tmp_path / "outbox.sqlite3"
    action_hooks.CALLS.clear()
    offline = DeviceRuntime(
        device_settings(
            port,
            device_id,
            outbox,
            cloud={"timeout_s": 1.0},
            actions={"lights_on": {"entry_point": "tests.action_hooks:record"}},
        ),
        local_model,
    )
    offline.run(PlaylistSource([str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE)]))
    # The confident command was obeyed at once; both the result and the request wait on disk.
    assert action_hooks.CALLS == [{"intent": "lights_on", "slots": {}}]
    counters = offline.presence.counters
    assert (counters["edge_results"], counters["cloud_deferred"], counters["cloud_timeouts"]) == (1, 1, 0)
    held = Outbox(OutboxSettings(path=str(outbox)))
    assert [entry.kind for entry in held.pending()] == ["result", "utterance"]
    held.close()

    with Broker(data_dir=tmp_path / "broker", port=port):
        results, statuses = Inbox(), Inbox()
        broker_settings = BrokerSettings(port=port)
        with MqttLink("observer", broker_settings) as observer:
            observer.subscribe(RESULT.topic(device_id=device_id), results)
            observer.subscribe(STATUS.topic(device_id=device_id), statuses)
            storage = StorageSettings(url=f"sqlite:///{tmp_path / 'worker.sqlite3'}")
            worker = UtteranceService(
                WorkerSettings(broker=broker_settings, worker_id="offline-worker", storage=storage),
                transcriber=transcriber,
            ).start()
            # The device starts again (as its service would), hearing nothing new.
            restarted = DeviceRuntime(device_settings(port, device_id, outbox), local_model)
            restarted.run(PlaylistSource([str(NOISE)]))
            edge = decode(*results.get(10))
            assert (edge.source, edge.intent, edge.acted) == (Source.EDGE, "lights_on", True)
            # The reply to the request that waited on disk reaches the restarted device, which publishes its one
            # result, not acted on: it comes too late.
            cloud = decode(*results.get(30))
            assert cloud.source == Source.CLOUD and "weather" in cloud.transcript.lower() and not cloud.acted
            results.expect_nothing(1.0)  # once each, and no cloud_timeout for the deferred request
            assert restarted.presence.counters["cloud_deferred_replies"] == 1
            assert wait_until(lambda: worker.counts["answered"] == 1)
            states = [decode(*statuses.get(5)).state for _ in range(2)]
            assert states == [DeviceState.ONLINE, DeviceState.OFFLINE]
            worker.stop(end_session=True)
    assert Outbox(OutboxSettings(path=str(outbox))).stats().messages == 0


@pytest.mark.parametrize("clean_start", [True, False])
@pytest.mark.broker
def test_subscriptions_outlive_a_broker_restart(tmp_path: Path, clean_start: bool) -> None:
    port = free_port()
    settings = BrokerSettings(port=port, connect_timeout_s=5)
    inbox = Inbox()
    broker = Broker(data_dir=tmp_path / "broker", port=port).start()
    listener = MqttLink(
        f"listener-{clean_start}", settings, clean_start=clean_start, session_expiry_s=0 if clean_start else 600
    )
    try:
        listener.subscribe(RESULT.topic(device_id="restarted"), inbox)
        broker.stop()
        assert wait_until(lambda: not listener.connected)
        broker = Broker(data_dir=tmp_path / "broker", port=port).start()
        assert wait_until(lambda: listener.connected, timeout_s=40)
        with MqttLink("publisher", settings) as publisher:
            publisher.send(result("restarted", 1))
            assert decode(*inbox.get(10)) == result("restarted", 1)
    finally:
        listener.close()
        broker.stop()


def worker_link(client_id: str, settings: BrokerSettings) -> MqttLink:
    """A link as the cloud worker makes it: persistent session, messages acknowledged by hand."""
    return MqttLink(client_id, settings, manual_ack=True, clean_start=False, session_expiry_s=600)


@pytest.mark.broker
@pytest.mark.slow
def test_a_shared_subscription_outlives_a_broker_restart_that_says_it_kept_the_session(tmp_path: Path) -> None:
    # Mosquitto 2.0.11 restores the session from its persistence file and reports it present, but without the
    # shared subscription in it: the link subscribes again on every connection.
    port = free_port()
    settings = BrokerSettings(port=port, connect_timeout_s=5)
    deliveries: queue.Queue[Delivery] = queue.Queue()
    sessions: list[bool] = []
    broker = Broker(data_dir=tmp_path / "broker", port=port).start()
    worker = worker_link("restart-worker", settings)
    try:
        worker.on_connection(sessions.append)
        worker.consume(shared_filter("workers", UTTERANCE), deliveries.put)
        broker.stop()
        assert wait_until(lambda: not worker.connected)
        broker = Broker(data_dir=tmp_path / "broker", port=port).start()
        assert wait_until(lambda: worker.connected, timeout_s=40)
        assert sessions == [True]  # the broker says it kept the session
        with MqttLink("restart-device", settings) as device:
            utterance = make_utterance("restart-device")
            device.send(utterance)
            delivery = deliveries.get(timeout=10)
            assert decode(delivery.topic, delivery.envelope).utterance_id == utterance.utterance_id
            delivery.ack()
    finally:
        worker.close(end_session=True)
        broker.stop()


@pytest.mark.slow
def test_redeliveries_that_arrive_before_consume_are_handed_over_when_it_registers(broker_settings) -> None:
    # A restarted worker's session is resumed, and the broker sends what it had in flight as soon as it accepts
    # the connection: before the worker has said where those messages go.
    subscription = shared_filter("early", UTTERANCE)
    first: queue.Queue[Delivery] = queue.Queue()
    worker = worker_link("early-worker", broker_settings)
    worker.consume(subscription, first.put)
    sent = [make_utterance("early-device") for _ in range(3)]
    with MqttLink("early-device", broker_settings) as device:
        for utterance in sent:
            device.send(utterance)
    assert wait_until(lambda: first.qsize() == 3)
    worker.close()  # nothing acknowledged: the session keeps all three in flight

    again: queue.Queue[Delivery] = queue.Queue()
    resumed = worker_link("early-worker", broker_settings)
    try:
        # The broker sends the session's redeliveries as soon as it accepts the connection, ahead of anything
        # published to it later: once a message published after that has arrived, they have, with no handler yet.
        arrived_after = Inbox()
        resumed.subscribe(RESULT.topic(device_id="early-marker"), arrived_after)
        with MqttLink("early-marker", broker_settings) as marker:
            marker.send(result("early-marker", 1))
        arrived_after.get(10)
        resumed.consume(subscription, again.put)
        redelivered = [again.get(timeout=10) for _ in sent]
        ids = sorted(decode(d.topic, d.envelope).utterance_id for d in redelivered)
        assert ids == sorted(u.utterance_id for u in sent)
        for delivery in redelivered:
            delivery.ack()
    finally:
        resumed.close()
    # Acknowledged: a third connection of the same session gets nothing.
    last: queue.Queue[Delivery] = queue.Queue()
    third = worker_link("early-worker", broker_settings)
    try:
        third.consume(subscription, last.put)
        time.sleep(1.0)  # the condition itself: nothing arrives in this time
        assert last.empty()
    finally:
        third.close(end_session=True)


def tries_without_a_worker(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the outbox sender has said that an utterance found no cloud worker subscribed."""
    return sum(record.getMessage().startswith("outbox: no cloud worker is subscribed") for record in caplog.records)


@pytest.mark.broker
@pytest.mark.slow
def test_an_utterance_no_worker_is_subscribed_to_stays_in_the_outbox_until_one_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A broker of its own: on the shared one, other tests' worker sessions may still hold utterance subscriptions.
    caplog.set_level(logging.WARNING, logger="device.outbox")
    port = free_port()
    broker_settings = BrokerSettings(port=port)
    broker = Broker(data_dir=tmp_path / "broker", port=port).start()
    outbox = outbox_at(tmp_path / "o.sqlite3", retry_initial_s=0.2, retry_max_s=0.5)
    device_id = "no-worker-device"
    device = MqttLink(device_id, broker_settings)
    sender = OutboxSender(outbox, device).start()
    try:
        utterance = make_utterance(device_id)
        outbox.put(result(device_id, 1))  # a result is for whoever listens: no listener, still sent
        outbox.put(utterance)
        sender.wake()
        assert wait_until(lambda: held_ids(outbox) == [utterance.utterance_id])
        # Several tries, each answered "no matching subscribers" (the sender says so once per try).
        assert wait_until(lambda: tries_without_a_worker(caplog) >= 3, timeout_s=10)
        assert held_ids(outbox) == [utterance.utterance_id]
        assert outbox.stats().dropped == {}
        deliveries: queue.Queue[Delivery] = queue.Queue()
        worker = worker_link("no-worker-worker", broker_settings)
        try:
            worker.consume(shared_filter("late", UTTERANCE), deliveries.put)
            delivery = deliveries.get(timeout=10)
            assert decode(delivery.topic, delivery.envelope).utterance_id == utterance.utterance_id
            delivery.ack()
            assert wait_until(lambda: outbox.stats().messages == 0)
        finally:
            worker.close(end_session=True)
    finally:
        sender.stop()
        device.close()
        broker.stop()
