"""The Home Assistant bridge (cloud_worker/ha_bridge.py) through the session's real Mosquitto: discovery configs,
events, the last-command sensor, availability and Last Wills, the update entity, HA's birth message, removal, and
malformed input skipped.

The discovery payloads are checked here against the keys Home Assistant documents as required (and those it
deprecates); bench/ha_core.py checks them against Home Assistant core's own discovery schemas.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from broker_config.acl import BRIDGE_STATE, HA_BIRTH, HA_DISCOVERY, ROLE_RULES, Client, Role, render_acl
from broker_config.broker import PROD_CONFIG, Broker
from cloud_worker.ha_bridge import NOT_UNDERSTOOD, BridgeTopics, HaBridge, discovery_configs
from cloud_worker.settings import HaBridgeSettings
from common.mqtt import BrokerSettings, MqttLink, PublishRefused, TlsSettings
from firmware_tools.onboarding.provision import Fleet, ProvisionSettings, parse_clients
from schemas.envelope import Envelope
from schemas.model import ModelManifest
from schemas.result import Result, Source
from schemas.status import DeviceState, DeviceStatus
from schemas.topics import MANIFEST, RESULT, STATUS
from schemas.vocabulary import load_vocabulary
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_FIXTURE = ROOT / "schemas/fixtures/manifest/valid/canary.json"

DISCOVERY_TOPIC = re.compile(r"[^/+#]+/(event|sensor|update)/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config")
"""HA's discovery topic: <prefix>/<component>/<node_id>/<object_id>/config."""
REQUIRED = {"event": {"state_topic", "event_types"}, "sensor": {"state_topic"}, "update": {"state_topic"}}
"""What HA's MQTT event, sensor and update platforms document as required (update: a state or latest version
topic; the bridge gives a JSON state with both versions)."""
DEPRECATED = {"object_id"}
"""Replaced by default_entity_id (HA 2025.10; removed in 2026.4)."""


class Topics:
    """Every message arriving on a subscription, by topic, with a queue per topic to wait on."""

    def __init__(self) -> None:
        self.queues: dict[str, queue.Queue[bytes]] = {}

    def __call__(self, topic: str, envelope: Envelope) -> None:
        self.queues.setdefault(topic, queue.Queue()).put(envelope.payload)

    def next(self, topic: str, timeout_s: float = 5.0) -> bytes:
        if not wait_until(lambda: topic in self.queues, timeout_s):
            raise AssertionError(f"nothing arrived on {topic}; got {sorted(self.queues)}")
        return self.queues[topic].get(timeout=timeout_s)

    def json(self, topic: str) -> dict:
        return json.loads(self.next(topic))

    def count(self, topic: str) -> int:
        return self.queues[topic].qsize() if topic in self.queues else 0


def bridge_settings(broker_settings, tag: str, **changes) -> HaBridgeSettings:
    """Prefixes of this test's own: other tests' retained statuses are announced elsewhere."""
    return HaBridgeSettings(
        broker=broker_settings,
        client_id=f"ha-bridge-{tag}",
        discovery_prefix=f"ha-{tag}",
        state_prefix=f"mqvox-ha-{tag}",
        **changes,
    )


def status(device_id: str, state: DeviceState = DeviceState.ONLINE, **changes) -> DeviceStatus:
    fields = dict(software_version="0.1.0", model_version="1.2.0", channel=None) | changes
    return DeviceStatus(device_id=device_id, state=state, **fields)


def result(device_id: str, intent: str | None = "lights_on", **changes) -> Result:
    fields = dict(
        utterance_id=uuid.uuid4().hex[:16],
        source=Source.EDGE,
        transcript="lights on",
        slots={},
        confidence=0.91,
        timings_ms={"total": 120.0},
    )
    return Result(device_id=device_id, intent=intent, **(fields | changes))


def manifest(channel: str, version: str) -> ModelManifest:
    fixture = ModelManifest.from_dict(json.loads(MANIFEST_FIXTURE.read_text()))
    return dataclasses.replace(fixture, channel=channel, version=version, release_notes="better digits")


def test_discovery_payloads_carry_what_home_assistant_requires() -> None:
    topics = BridgeTopics.of(HaBridgeSettings())
    vocabulary = load_vocabulary()
    configs = discovery_configs(
        status("pi.Kitchen-01", model_version="1.2.0"), topics, vocabulary, support_url="https://example.org/mqvox"
    )
    assert len(configs) == 3
    unique_ids = set()
    for topic, payload in configs.items():
        match = DISCOVERY_TOPIC.fullmatch(topic)
        assert match, topic
        component = match.group(1)
        assert REQUIRED[component] <= set(payload), (component, payload)
        assert not DEPRECATED & set(payload)
        assert re.fullmatch(rf"{component}\.[a-z0-9_]+", payload["default_entity_id"]), payload["default_entity_id"]
        unique_ids.add(payload["unique_id"])
        assert payload["device"]["identifiers"] == ["mqvox_pi.Kitchen-01"]
        assert payload["device"]["sw_version"] == "1.2.0"
        assert {"name", "manufacturer", "model"} <= set(payload["device"])
        assert payload["origin"]["name"] == "mqvox" and payload["origin"]["support_url"] == "https://example.org/mqvox"
        assert {entry["topic"] for entry in payload["availability"]} == {
            "mqvox/ha/pi.Kitchen-01/availability",
            "mqvox/ha/_bridge/availability",
        }
        assert payload["availability_mode"] == "all"
        if component == "event":
            assert payload["event_types"] == [*vocabulary.intents, NOT_UNDERSTOOD]
        if component == "update":
            assert "command_topic" not in payload  # read-only
    assert len(unique_ids) == 3


def test_the_acl_s_bridge_role_covers_the_bridge_s_default_topics() -> None:
    defaults = HaBridgeSettings()
    assert (f"{defaults.discovery_prefix}/#", f"{defaults.discovery_prefix}/status") == (HA_DISCOVERY, HA_BIRTH)
    assert (f"{defaults.state_prefix}/#",) == (BRIDGE_STATE,)
    acl = render_acl([Client("ha-bridge", Role.BRIDGE)])
    assert "user ha-bridge\n" in acl
    assert f"topic read {STATUS.filter()}" in acl and f"topic read {RESULT.filter()}" in acl
    assert f"topic read {MANIFEST.filter()}" in acl
    assert "topic write homeassistant/#" in acl and "topic write mqvox/ha/#" in acl and "topic write hermes/#" in acl
    # Nothing else: no device's utterances, no replies, no blobs, nothing to publish on the protocol tree.
    assert len(ROLE_RULES[Role.BRIDGE]) == 7


def test_bridge_announces_fires_events_and_removes_devices(broker_settings, links, device_id, caplog) -> None:
    tag = device_id
    settings = bridge_settings(broker_settings, tag, channel=f"ch-{os.getpid()}", hermes=True, restate_delay_s=0.1)
    topics = BridgeTopics.of(settings)
    observer = Topics()
    watch = links()
    watch.subscribe(f"{settings.discovery_prefix}/#", observer)
    watch.subscribe(f"{settings.state_prefix}/#", observer)
    watch.subscribe("hermes/intent/#", observer)
    device = links()
    live = manifest(settings.channel, "1.3.0")
    device.send(live)  # retained before the bridge starts: read as it subscribes
    node = topics.node_id(device_id)
    event_config = f"{settings.discovery_prefix}/event/{node}/command/config"
    configs = [event_config] + [
        f"{settings.discovery_prefix}/{component}/{node}/{object_id}/config"
        for component, object_id in (("sensor", "last_command"), ("update", "model"))
    ]
    event_topic = topics.device_topic(device_id, "event")
    last_command = topics.device_topic(device_id, "last_command")
    availability = topics.device_topic(device_id, "availability")
    update = topics.device_topic(device_id, "update")
    caplog.set_level(logging.WARNING, logger="cloud_worker.ha_bridge")
    try:
        with HaBridge(settings, load_vocabulary()) as bridge:
            assert observer.next(topics.bridge_availability) == b"online"
            device.send(status(device_id))
            for topic in configs:
                assert observer.json(topic)["device"]["identifiers"] == [f"mqvox_{device_id}"]
            assert observer.next(availability) == b"online"
            assert observer.json(update) == {
                "title": "mqvox model",
                "installed_version": "1.2.0",
                "latest_version": "1.3.0",
                "release_summary": "better digits",
            }

            # A newer manifest on the channel: the latest version follows.
            device.send(dataclasses.replace(live, version="1.4.0"))
            assert observer.json(update)["latest_version"] == "1.4.0"

            # One event per final result, and the sensor's state and attributes.
            command = result(device_id, intent="digit", slots={"value": 7}, transcript="seven", source=Source.CLOUD)
            device.send(command)
            event = observer.json(event_topic)
            assert event["event_type"] == "digit" and event["slots"] == {"value": 7}
            assert event["confidence"] == pytest.approx(0.91) and event["source"] == "cloud"
            sensor = observer.json(last_command)
            assert sensor["command"] == "digit[value=7]" and sensor["source"] == "cloud"
            device.send(result(device_id, intent=None, transcript="open the pod bay doors", confidence=0.1))
            assert observer.json(event_topic)["event_type"] == NOT_UNDERSTOOD
            assert observer.json(last_command)["command"] == NOT_UNDERSTOOD
            assert observer.count(event_topic) == 0  # once per result

            # Events are not retained (HA ignores retained events); the sensor's state, update and availability are.
            late = Topics()
            links().subscribe(f"{settings.state_prefix}/{device_id}/#", late)
            assert late.json(last_command)["command"] == NOT_UNDERSTOOD
            late.next(update)
            late.next(availability)
            assert event_topic not in late.queues

            # Malformed status and results are logged and skipped; the bridge keeps going.
            status_topic = STATUS.topic(device_id=device_id)
            device.publish(status_topic, Envelope(b"{not json", "application/json"), qos=1, retain=False)
            result_topic = RESULT.topic(device_id=device_id)
            device.publish(result_topic, Envelope(b'{"device_id": "x"}', "application/json"), qos=1, retain=False)
            assert wait_until(lambda: bridge.counts["skipped"] == 2)
            skipped = [record for record in caplog.records if record.getMessage() == "skipped a malformed message"]
            assert {record.topic for record in skipped} == {status_topic, result_topic}
            device.send(result(device_id, intent="stop", transcript="stop", acted=True))
            assert observer.json(event_topic)["event_type"] == "stop"
            assert observer.json(last_command)["command"] == "stop"
            # --hermes: the same result on Rhasspy's topics too (tests/test_hermes.py checks the payloads).
            assert observer.json("hermes/intent/stop")["siteId"] == device_id

            # The device goes offline (its Last Will is this same status): its entities become unavailable.
            device.send(status(device_id, DeviceState.OFFLINE))
            assert observer.next(availability) == b"offline"
            assert observer.json(update)["installed_version"] == "1.2.0"

            # HA's birth message: every config again, then (restate_delay_s later) every state and availability.
            watch.publish(topics.ha_status, Envelope(b"online", "text/plain"), qos=1, retain=False)
            for topic in configs:
                observer.json(topic)
            assert observer.next(availability) == b"offline"
            assert observer.json(update)["latest_version"] == "1.4.0"
            assert observer.json(last_command)["command"] == "stop"
            assert observer.next(topics.bridge_availability) == b"online"
            # HA's Last Will says offline on the same topic: nothing is sent for it (the removal below reads on).
            watch.publish(topics.ha_status, Envelope(b"offline", "text/plain"), qos=1, retain=False)

            # The device's retained status cleared: its configs and states are cleared, so HA removes it.
            device.publish(status_topic, Envelope(b"", None), qos=1, retain=True)
            for topic in [*configs, availability, last_command, update]:
                assert observer.next(topic) == b"", topic
            assert bridge.counts["removed"] == 1
        # Stopped: the bridge says offline itself.
        assert observer.next(topics.bridge_availability) == b"offline"
    finally:
        device.publish(MANIFEST.topic(channel=settings.channel), Envelope(b"", None), qos=1, retain=True)
        device.publish(topics.bridge_availability, Envelope(b"", None), qos=1, retain=True)


DEVICE_THAT_DIES = """
import sys, time
from common.mqtt import BrokerSettings, MqttLink
from schemas.status import DeviceState, DeviceStatus
online = DeviceStatus(sys.argv[1], DeviceState.ONLINE, "0.1.0", "1.2.0")
will = DeviceStatus(sys.argv[1], DeviceState.OFFLINE, "0.1.0", "1.2.0")
link = MqttLink(sys.argv[1], BrokerSettings(port=int(sys.argv[2])), will=will)
link.send(online)
print("online", flush=True)
time.sleep(60)
"""


@pytest.mark.subprocess
def test_the_ha_bridge_program_and_the_last_wills(broker, broker_settings, links, device_id) -> None:
    """``python -m cloud_worker ha-bridge`` announces a device; the device's Last Will makes it unavailable, and the
    bridge's own Last Will makes every entity unavailable."""
    settings = bridge_settings(broker_settings, device_id)
    topics = BridgeTopics.of(settings)
    observer = Topics()
    links().subscribe(f"{settings.state_prefix}/#", observer)
    links().subscribe(f"{settings.discovery_prefix}/#", observer)
    command = [sys.executable, "-m", "cloud_worker", "ha-bridge", "--port", str(broker.port)]
    command += ["--client-id", settings.client_id, "--discovery-prefix", settings.discovery_prefix]
    command += ["--state-prefix", settings.state_prefix]
    bridge = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE_THAT_DIES, device_id, str(broker.port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    availability = topics.device_topic(device_id, "availability")
    try:
        assert device.stdout.readline().strip() == "online"
        assert observer.next(topics.bridge_availability, timeout_s=20) == b"online"
        assert observer.json(f"{settings.discovery_prefix}/event/{topics.node_id(device_id)}/command/config")
        assert observer.next(availability) == b"online"
        device.kill()  # no DISCONNECT: the broker publishes the device's Last Will
        assert observer.next(availability) == b"offline"
        bridge.send_signal(signal.SIGKILL)  # and the bridge's
        assert observer.next(topics.bridge_availability) == b"offline"
    finally:
        for process in (device, bridge):
            process.kill()
            process.wait()
        cleaner = links()
        for topic in (STATUS.topic(device_id=device_id), topics.bridge_availability):
            cleaner.publish(topic, Envelope(b"", None), qos=1, retain=True)


@pytest.mark.broker
@pytest.mark.subprocess
def test_on_the_production_broker_home_assistant_reads_what_the_bridge_announces_and_nothing_of_mqvox(
    keys, tmp_path
) -> None:
    # Three certificates, as the README provisions them: a device, the bridge, and Home Assistant's own client.
    fleet_dir = tmp_path / "fleet"
    fleet = Fleet(fleet_dir, ProvisionSettings())
    clients = (
        parse_clients(Role.DEVICE, ["pi-kitchen-01"])
        + parse_clients(Role.BRIDGE, ["ha-bridge"])
        + parse_clients(Role.HOMEASSISTANT, ["hass"])
    )
    fleet.provision(clients, signing_key=keys["fleet.pub"])

    def over_tls(name: str, port: int) -> BrokerSettings:
        return BrokerSettings(
            host="localhost", port=port, tls=TlsSettings.from_folder(str(fleet_dir / "clients" / name))
        )

    with Broker(data_dir=tmp_path / "broker", config=PROD_CONFIG, tls_dir=fleet_dir / "broker") as broker:
        seen = Topics()
        with (
            MqttLink("pi-kitchen-01", over_tls("pi-kitchen-01", broker.port)) as device,
            MqttLink("hass", over_tls("hass", broker.port)) as home_assistant,
        ):
            home_assistant.subscribe("homeassistant/#", seen)
            home_assistant.subscribe("mqvox/ha/#", seen)
            home_assistant.subscribe(RESULT.filter(), seen)  # granted by Mosquitto, and nothing must arrive on it
            device.send(status("pi-kitchen-01"))
            settings = HaBridgeSettings(broker=over_tls("ha-bridge", broker.port), client_id="ha-bridge")
            topics = BridgeTopics.of(settings)
            with HaBridge(settings, load_vocabulary()):
                node = topics.node_id("pi-kitchen-01")
                config = seen.json(f"homeassistant/event/{node}/command/config")
                assert config["device"]["identifiers"] == ["mqvox_pi-kitchen-01"]
                assert seen.next(topics.device_topic("pi-kitchen-01", "availability")) == b"online"
                # HA's birth message is accepted (publish waits for the PUBACK and raises on a refusal), and the
                # bridge, which may read it, announces the device again ...
                home_assistant.publish(HA_BIRTH, Envelope(b"online", "text/plain"), qos=1, retain=False)
                assert seen.json(f"homeassistant/event/{node}/command/config") == config
                # ... its events arrive, and mqvox's own topics stay closed to it.
                device.send(result("pi-kitchen-01", intent="lights_on"))
                assert seen.json(topics.device_topic("pi-kitchen-01", "event"))["event_type"] == "lights_on"
                assert seen.count(RESULT.topic(device_id="pi-kitchen-01")) == 0
                with pytest.raises(PublishRefused):
                    home_assistant.send(result("pi-kitchen-01"))
