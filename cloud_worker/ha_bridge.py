"""Home Assistant through its own MQTT discovery: every mqvox device seen in the retained statuses becomes an HA
device with an event entity (one event per final result), a last-command sensor and a read-only model update entity.

What HA reads (``state_prefix`` is HaBridgeSettings.state_prefix, ``<node>`` the device's node id):

- ``<discovery_prefix>/{event,sensor,update}/<node>/{command,last_command,model}/config``: retained discovery
  configs, sent again whenever HA publishes ``online`` on ``<discovery_prefix>/status`` (its birth message), and
  cleared (empty retained payloads) when the device's retained status is cleared, which removes its entities;
- ``<state_prefix>/<device_id>/event``: one message per final result, NOT retained (HA ignores retained events);
- ``<state_prefix>/<device_id>/last_command`` and ``/update``: retained JSON states;
- ``<state_prefix>/<device_id>/availability``: retained ``online``/``offline``, from the device's retained status
  (its Last Will included), and ``<state_prefix>/_bridge/availability``, the bridge's own, with its Last Will (no
  device id starts with ``_``). Every entity needs both (``availability_mode: all``): with the bridge gone, nothing
  tells HA that a device went.

The bridge republishes what the devices say rather than pointing HA at the mqvox topics, so HA's own MQTT client
needs no right on the protocol tree.

Threads: every handler runs on the link's one dispatcher thread; the states sent again after HA's birth message are
sent from a timer's thread. Both hold the bridge's lock while they read or change its state (statuses, manifests,
last commands) and hand their messages to the link (which only queues them), so that what goes out last is the
latest state. paho's thread never takes that lock.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from importlib.metadata import version
from typing import Any

from cloud_worker.settings import HaBridgeSettings
from common.logfmt import ContextLogger
from common.mqtt import MqttLink, NoMatchingSubscribers
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.model import ModelManifest
from schemas.protocol import Message, decode
from schemas.result import Result
from schemas.status import DeviceState, DeviceStatus
from schemas.topics import MANIFEST, RESULT, STATUS, TopicSpec
from schemas.vocabulary import Command, Vocabulary

log = ContextLogger(logging.getLogger("cloud_worker.ha_bridge"))

NOT_UNDERSTOOD = "not_understood"
"""The event type, and last command, of a result without an intent (outside the vocabulary, or an error)."""

MANUFACTURER = "mqvox"
"""The device entry's manufacturer."""

ONLINE = "online"
OFFLINE = "offline"
"""HA's default availability payloads, and its birth message."""

RELEASE_SUMMARY_CHARS = 255
"""HA's limit on an update entity's release summary."""

Publication = tuple[str, bytes, bool]
"""A message a result sink wants published: topic, payload, retained."""

ResultSink = Callable[[Result], Sequence[Publication]]
"""Called with each final result, on the dispatcher thread; returns what to publish for it (the Hermes topics,
for example). A sink that raises is logged and the others still run."""


def slug(text: str) -> str:
    """``text`` as HA writes an entity id's object part: lower case, runs of anything else than a letter or digit
    as one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def command_name(result: Result) -> str:
    """What the device was told: the vocabulary's label of the intent and its slots (``lights_on``,
    ``digit[value=7]``), or ``not_understood``."""
    if result.intent is None:
        return NOT_UNDERSTOOD
    return Command(result.intent, result.slots, ()).label


@dataclass(frozen=True)
class BridgeTopics:
    """Every topic the bridge publishes on, from its settings."""

    discovery_prefix: str
    """HA's discovery prefix."""
    state_prefix: str
    """Root of the bridge's own topics."""
    node_prefix: str
    """Start of each node id."""

    @classmethod
    def of(cls, settings: HaBridgeSettings) -> BridgeTopics:
        return cls(settings.discovery_prefix, settings.state_prefix, settings.node_prefix)

    @property
    def ha_status(self) -> str:
        """Where HA publishes its birth (``online``) and Last Will (``offline``)."""
        return f"{self.discovery_prefix}/status"

    @property
    def bridge_availability(self) -> str:
        """The bridge's own availability: ``online`` while connected, ``offline`` as its Last Will."""
        return f"{self.state_prefix}/_bridge/availability"

    def node_id(self, device_id: str) -> str:
        """The device's discovery node id: device ids may hold '.', which a discovery topic level may not."""
        return f"{self.node_prefix}_{device_id.replace('.', '_')}"

    def device_topic(self, device_id: str, what: str) -> str:
        """One of the bridge's per-device topics: ``event``, ``last_command``, ``update``, ``availability``."""
        return f"{self.state_prefix}/{device_id}/{what}"

    def config(self, component: str, device_id: str, object_id: str) -> str:
        """A discovery config topic."""
        return f"{self.discovery_prefix}/{component}/{self.node_id(device_id)}/{object_id}/config"


ENTITIES = (("event", "command"), ("sensor", "last_command"), ("update", "model"))
"""(HA component, object id) of the entities of every device."""


def event_types(vocabulary: Vocabulary) -> list[str]:
    """The event entity's types: the vocabulary's intents, then ``not_understood``."""
    return [*vocabulary.intents, NOT_UNDERSTOOD]


def discovery_configs(
    status: DeviceStatus, topics: BridgeTopics, vocabulary: Vocabulary, support_url: str | None = None
) -> dict[str, dict[str, Any]]:
    """Config topic -> discovery payload of each entity of the device ``status`` is about."""
    device_id = status.device_id
    node = topics.node_id(device_id)
    device = {
        "identifiers": [f"mqvox_{device_id}"],
        "name": device_id,
        "manufacturer": MANUFACTURER,
        "model": "mqvox voice command device",
        # HA's device "software version" is the firmware; for mqvox what changes a device's behaviour is its model.
        "sw_version": status.model_version or "none",
        "hw_version": f"device software {status.software_version}",
    }
    origin = {"name": "mqvox", "sw_version": version("mqvox")} | ({"support_url": support_url} if support_url else {})
    common = {
        "device": device,
        "origin": origin,
        "availability": [
            {"topic": topics.device_topic(device_id, "availability")},
            {"topic": topics.bridge_availability},
        ],
        "availability_mode": "all",
        "qos": 1,
    }
    entities = {
        "command": {
            "name": "Command",
            "unique_id": f"{node}_command",
            "default_entity_id": f"event.{slug(node)}_command",
            "state_topic": topics.device_topic(device_id, "event"),
            "event_types": event_types(vocabulary),
            "icon": "mdi:microphone-message",
        },
        "last_command": {
            "name": "Last command",
            "unique_id": f"{node}_last_command",
            "default_entity_id": f"sensor.{slug(node)}_last_command",
            "state_topic": topics.device_topic(device_id, "last_command"),
            "value_template": "{{ value_json.command }}",
            "json_attributes_topic": topics.device_topic(device_id, "last_command"),
            "icon": "mdi:account-voice",
        },
        "model": {
            "name": "Model",
            "unique_id": f"{node}_model",
            "default_entity_id": f"update.{slug(node)}_model",
            "state_topic": topics.device_topic(device_id, "update"),
            "device_class": "firmware",
            "entity_category": "diagnostic",
            # No command_topic: read-only. Models install through the signed manifests' rollout stages.
        },
    }
    return {
        topics.config(component, device_id, object_id): common | entities[object_id]
        for component, object_id in ENTITIES
    }


def event_payload(result: Result) -> dict[str, Any]:
    """The event of one final result: ``event_type`` (HA requires it), the rest become the event's attributes."""
    return {
        "event_type": result.intent or NOT_UNDERSTOOD,
        "command": command_name(result),
        "slots": dict(result.slots),
        "confidence": result.confidence,
        "source": str(result.source),
        "transcript": result.transcript,
        "acted": result.acted,
        "utterance_id": result.utterance_id,
        "error": result.error.code.value if result.error else None,
    }


def last_command_payload(result: Result) -> dict[str, Any]:
    """The last-command sensor's state (``command``) and attributes (every key)."""
    return {
        "command": command_name(result),
        "confidence": result.confidence,
        "source": str(result.source),
        "transcript": result.transcript,
        "slots": dict(result.slots),
        "acted": result.acted,
        "utterance_id": result.utterance_id,
        "sent_at": result.sent_at,
    }


def update_payload(status: DeviceStatus, manifest: ModelManifest | None) -> dict[str, Any]:
    """The update entity's JSON state: the model the device runs, and the one its channel's live manifest names
    (left out while no manifest is known, so HA shows it as unknown rather than up to date)."""
    payload: dict[str, Any] = {"title": "mqvox model"}
    if status.model_version is not None:
        payload["installed_version"] = status.model_version
    if manifest is not None:
        payload["latest_version"] = manifest.version
        if manifest.release_notes:
            payload["release_summary"] = manifest.release_notes[:RELEASE_SUMMARY_CHARS]
    return payload


def hermes_sink(vocabulary: Vocabulary) -> ResultSink:
    """The sink that publishes each result on Rhasspy 2.5's Hermes topics (cloud_worker/hermes.py), not retained,
    as Rhasspy published them."""
    from cloud_worker.hermes import hermes_messages  # only a bridge that publishes Hermes needs it

    def publications(result: Result) -> list[Publication]:
        return [(topic, payload, False) for topic, payload in hermes_messages(result, vocabulary)]

    return publications


class Malformed(Enum):
    """What ``HaBridge._read`` returns for a message it skipped."""

    MALFORMED = "malformed"


MALFORMED = Malformed.MALFORMED


def _json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass(frozen=True)
class BridgeAvailability:
    """The bridge's own availability as a message MqttLink can leave as its Last Will (it takes a protocol
    message: this has the same ``spec``, ``topic()`` and ``to_wire()``)."""

    topic_name: str
    """The bridge's availability topic."""
    online: bool
    """Whether it says ``online``."""

    spec = TopicSpec(
        name="ha_bridge_availability",
        template="{state_prefix}/_bridge/availability",
        qos=1,
        retain=True,
        max_payload_bytes=16,
        content_type="text/plain",
        publisher="the Home Assistant bridge; the broker on its behalf (Last Will)",
        subscribers="Home Assistant",
    )

    def topic(self) -> str:
        return self.topic_name

    def to_wire(self) -> Envelope:
        return Envelope((ONLINE if self.online else OFFLINE).encode(), self.spec.content_type)


class HaBridge:
    """Announces the devices of the retained statuses to Home Assistant and turns their results into HA events.

    ``sinks`` are called with each final result, after the HA event, and what they return is published too; with
    ``settings.hermes`` the Hermes sink is added after them.
    """

    def __init__(self, settings: HaBridgeSettings, vocabulary: Vocabulary, sinks: Sequence[ResultSink] = ()) -> None:
        self.settings = settings
        self.vocabulary = vocabulary
        self.sinks = (*sinks, hermes_sink(vocabulary)) if settings.hermes else tuple(sinks)
        self.topics = BridgeTopics.of(settings)
        self.statuses: dict[str, DeviceStatus] = {}
        """The last status of each device announced, by device id."""
        self.manifests: dict[str, ModelManifest] = {}
        """The live manifest of each channel."""
        self.last_commands: dict[str, bytes] = {}
        """The last-command sensor's state of each device, sent again after HA's birth message."""
        self.counts = {"announced": 0, "removed": 0, "events": 0, "skipped": 0}
        """Devices announced and removed, events fired, malformed messages skipped."""
        self._link: MqttLink | None = None
        self._lock = threading.Lock()
        self._restating: threading.Timer | None = None

    @property
    def link(self) -> MqttLink:
        if self._link is None:
            raise RuntimeError("the bridge is not started")
        return self._link

    def start(self) -> HaBridge:
        """Connect (leaving ``offline`` as the Last Will), say ``online``, and subscribe. Raises BrokerUnavailable."""
        will = BridgeAvailability(self.topics.bridge_availability, online=False)
        self._link = MqttLink(self.settings.client_id, self.settings.broker, will=will)  # type: ignore[arg-type]
        self._say_online()
        # After a dropped connection the broker sent the Last Will: say online again on each reconnection.
        self.link.on_connection(lambda _session_present: self._say_online())
        # Manifests first, so that a device's first update state already has its channel's latest version.
        self.link.subscribe(MANIFEST.filter(), self._on_manifest)
        self.link.subscribe(STATUS.filter(), self._on_status)
        self.link.subscribe(RESULT.filter(), self._on_result)
        self.link.subscribe(self.topics.ha_status, self._on_ha_status)
        log.info("ready", extra={"detail": f"discovery under {self.settings.discovery_prefix}/"})
        return self

    def stop(self) -> None:
        """Say ``offline`` (HA marks every entity unavailable) and disconnect."""
        if self._link is None:
            return
        with self._lock:
            if self._restating is not None:
                self._restating.cancel()
        try:
            self._publish(self.topics.bridge_availability, OFFLINE.encode(), retain=True).result(5.0)
        except NoMatchingSubscribers:
            pass  # retained all the same, for HA's next start
        except Exception as error:  # a stop goes on whatever the broker says
            log.warning("could not say offline before stopping: %s", error)
        self._link.close()
        self._link = None

    def __enter__(self) -> HaBridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Handlers, on the dispatcher thread.

    def _read(self, topic: str, envelope: Envelope) -> Message | Malformed | None:
        """The message on ``topic`` (None for a cleared retained topic), or MALFORMED once logged and counted: a
        malformed message is skipped, and the bridge goes on."""
        try:
            return decode(topic, envelope)
        except ProtocolError as error:
            log.warning("skipped a malformed message", extra={"topic": topic, "detail": str(error)})
            # Counted once logged: whoever sees the count may read the line.
            self.counts["skipped"] += 1
            return MALFORMED

    def _on_status(self, topic: str, envelope: Envelope) -> None:
        status = self._read(topic, envelope)
        if status is MALFORMED:
            return
        with self._lock:
            if status is None:
                params = STATUS.match(topic)
                if params is not None:
                    self._remove(params["device_id"])
                return
            assert isinstance(status, DeviceStatus)
            self._announce(status)

    def _announce(self, status: DeviceStatus) -> None:
        device_id = status.device_id
        earlier = self.statuses.get(device_id)
        self.statuses[device_id] = status
        if earlier is None or _config_fields(earlier) != _config_fields(status):
            if earlier is None:
                self.counts["announced"] += 1
                log.bind(device_id=device_id).info("announced")
            self._send_configs(status)
        state = ONLINE if status.state is DeviceState.ONLINE else OFFLINE
        self._publish(self.topics.device_topic(device_id, "availability"), state.encode(), retain=True)
        self._send_update(status)

    def _send_configs(self, status: DeviceStatus) -> None:
        configs = discovery_configs(status, self.topics, self.vocabulary, self.settings.support_url)
        for topic, payload in configs.items():
            self._publish(topic, _json(payload), retain=True)

    def _send_update(self, status: DeviceStatus) -> None:
        manifest = self.manifests.get(status.channel or self.settings.channel)
        payload = update_payload(status, manifest)
        self._publish(self.topics.device_topic(status.device_id, "update"), _json(payload), retain=True)

    def _remove(self, device_id: str) -> None:
        """The device's retained status was cleared: clear its configs (HA removes its entities) and states."""
        self.last_commands.pop(device_id, None)
        if self.statuses.pop(device_id, None) is None:
            return
        for component, object_id in ENTITIES:
            self._publish(self.topics.config(component, device_id, object_id), b"", retain=True)
        for what in ("availability", "last_command", "update"):
            self._publish(self.topics.device_topic(device_id, what), b"", retain=True)
        self.counts["removed"] += 1
        log.bind(device_id=device_id).info("removed")

    def _on_manifest(self, topic: str, envelope: Envelope) -> None:
        manifest = self._read(topic, envelope)
        if manifest is MALFORMED:
            return
        params = MANIFEST.match(topic) or {}
        channel = manifest.channel if manifest is not None else params.get("channel", "")
        with self._lock:
            if manifest is None:
                self.manifests.pop(channel, None)
            else:
                self.manifests[channel] = manifest
            for status in self.statuses.values():
                if (status.channel or self.settings.channel) == channel:
                    self._send_update(status)

    def _on_result(self, topic: str, envelope: Envelope) -> None:
        result = self._read(topic, envelope)
        if result is MALFORMED:
            return
        if result is None:
            return
        assert isinstance(result, Result)
        device_id = result.device_id
        last_command = _json(last_command_payload(result))
        with self._lock:
            # HA ignores retained events: the event is never retained; the sensor's state is, for HA's next start.
            self._publish(self.topics.device_topic(device_id, "event"), _json(event_payload(result)), retain=False)
            self._publish(self.topics.device_topic(device_id, "last_command"), last_command, retain=True)
            self.last_commands[device_id] = last_command
            self.counts["events"] += 1
        log.about(result).debug("event", extra={"command": command_name(result)})
        for sink in self.sinks:
            try:
                publications = sink(result)
            except Exception:
                log.about(result).exception("result sink failed", extra={"sink": repr(sink)})
                continue
            for sink_topic, payload, retain in publications:
                self._publish(sink_topic, payload, retain=retain)

    def _on_ha_status(self, topic: str, envelope: Envelope) -> None:
        if envelope.payload.decode("utf-8", "replace") != ONLINE:
            return
        # HA (re)started: it may have lost what it read, and the broker may have lost the retained configs.
        with self._lock:
            log.info("Home Assistant online: announcing again", extra={"detail": f"{len(self.statuses)} devices"})
            for status in self.statuses.values():
                self._send_configs(status)
            # A broker that lost the retained configs lost the retained states and availability too: without them
            # the entities would stay unavailable. They go again once HA has read the configs and subscribed.
            if self._restating is not None:
                self._restating.cancel()
            self._restating = threading.Timer(self.settings.restate_delay_s, self._restate)
            self._restating.daemon = True
            self._restating.start()

    def _restate(self) -> None:
        """Send the bridge's availability and every device's states again (on the timer's thread)."""
        with self._lock:
            if self._link is None:
                return
            self._say_online()
            for device_id, status in self.statuses.items():
                state = ONLINE if status.state is DeviceState.ONLINE else OFFLINE
                self._publish(self.topics.device_topic(device_id, "availability"), state.encode(), retain=True)
                self._send_update(status)
                if device_id in self.last_commands:
                    last_command = self.last_commands[device_id]
                    self._publish(self.topics.device_topic(device_id, "last_command"), last_command, retain=True)

    def _say_online(self) -> None:
        self._publish(self.topics.bridge_availability, ONLINE.encode(), retain=True)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> Future[None]:
        """Publish without waiting (handlers must not hold up the others); a refusal is logged when it comes."""
        content_type = "application/json" if payload.startswith(b"{") else "text/plain"
        sent = self.link.publish_later(topic, Envelope(payload, content_type), qos=1, retain=retain)
        sent.add_done_callback(lambda done: _log_refusal(topic, done))
        return sent


def _config_fields(status: DeviceStatus) -> tuple[str | None, str]:
    """What in a status the discovery configs depend on."""
    return status.model_version, status.software_version


def _log_refusal(topic: str, sent: Future[None]) -> None:
    error = sent.exception()
    if error is not None and not isinstance(error, NoMatchingSubscribers):
        log.warning("publish failed", extra={"topic": topic, "detail": str(error)})
