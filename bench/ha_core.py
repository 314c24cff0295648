"""The Home Assistant bridge against a real Home Assistant core: the discovery payloads through HA's own MQTT
discovery schemas, then a running HA core that discovers the entities, fires an event on a command, marks them
unavailable when the device goes offline, and removes them when its status is cleared.

Home Assistant core does not fit the project's venv (it pins older aiohttp, cryptography, PyYAML, requests and
urllib3), so it lives in a venv of its own, made once (about 3 minutes, 35 MB wheel plus dependencies):

    python3.11 -m venv .run/ha-core
    .run/ha-core/bin/pip install homeassistant==2024.3.3 paho-mqtt==1.6.1 janus==1.0.0 josepy==1.14.0

2024.3 is the last release that runs on Python 3.11. Its MQTT integration requires paho-mqtt 1.6.1, and janus
through file_upload; josepy 2 (what pip picks today) breaks the acme package HA's cloud integration imports. It
predates ``default_entity_id`` (HA 2025.10), which its schemas drop as an unknown key: the entity ids below are
then HA's own, from the device and entity names.

Everything runs on this machine: a Mosquitto from broker_config, the bridge in this process, HA core in the
other venv's interpreter (stdout: one JSON line per entity state change), with no network.

Prints one JSON object. Run: .venv/bin/python bench/ha_core.py [--ha-venv .run/ha-core]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from broker_config.broker import Broker
from cloud_worker.ha_bridge import HaBridge
from cloud_worker.settings import HaBridgeSettings
from common.mqtt import BrokerSettings, MqttLink
from schemas.envelope import Envelope
from schemas.model import ModelManifest
from schemas.result import Result, Source
from schemas.status import DeviceState, DeviceStatus
from schemas.topics import STATUS
from schemas.vocabulary import load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_FIXTURE = ROOT / "schemas/fixtures/manifest/valid/canary.json"
DEVICE_ID = "pi-kitchen-01"
CHANNEL = "stable"

VALIDATE = r"""
import json, sys, importlib
from homeassistant.const import __version__
checked = {}
for topic, payload in json.load(sys.stdin).items():
    component = topic.split("/")[1]
    schema = importlib.import_module(f"homeassistant.components.mqtt.{component}").DISCOVERY_SCHEMA
    try:
        accepted = schema(payload)
    except Exception as error:
        checked[topic] = {"valid": False, "error": str(error)}
    else:
        checked[topic] = {"valid": True, "dropped_as_unknown": sorted(set(payload) - set(accepted))}
print(json.dumps({"version": __version__, "configs": checked}))
"""
"""Run by HA core's interpreter: each discovery payload through its platform's DISCOVERY_SCHEMA."""

HOME_ASSISTANT = r"""
import asyncio, json, os, sys
from homeassistant import bootstrap, runner
from homeassistant.config_entries import ConfigEntry
from homeassistant.const import EVENT_STATE_CHANGED, __version__

# The JSON lines get stdout to themselves: whatever else HA writes there goes to stderr.
lines_out = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)

def emit(**line):
    lines_out.write(json.dumps(line, default=str) + "\n")

async def main(port, http_port, config_dir):
    with open(os.path.join(config_dir, "configuration.yaml"), "w") as config:
        config.write(
            "homeassistant:\n  name: mqvox bench\n  time_zone: UTC\n  latitude: 0\n  longitude: 0\n"
            f"  elevation: 0\n  unit_system: metric\nhttp:\n  server_host: 127.0.0.1\n  server_port: {http_port}\n"
            "logger:\n  default: warning\n"
        )
    # No frontend is installed (no UI is needed): without this its failure would start HA in recovery mode.
    bootstrap.CRITICAL_INTEGRATIONS = set()
    hass = await bootstrap.async_setup_hass(runner.RuntimeConfig(config_dir=config_dir, skip_pip=True))

    def changed(event):
        new = event.data["new_state"]
        emit(kind="state", entity_id=event.data["entity_id"], state=new.state if new else None,
             attributes=dict(new.attributes) if new else None)

    hass.bus.async_listen(EVENT_STATE_CHANGED, changed)
    await hass.config_entries.async_add(ConfigEntry(
        version=1, minor_version=1, domain="mqtt", title="mqvox bench", source="user",
        data={"broker": "127.0.0.1", "port": port, "discovery": True},
    ))
    await hass.async_start()
    emit(kind="started", version=__version__)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    await hass.async_stop()

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
"""
"""Run by HA core's interpreter: a Home Assistant with the MQTT integration on the bench's broker."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Lines:
    """HA core's JSON lines, read on a thread of their own, to wait on."""

    def __init__(self, stream) -> None:
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.put(json.loads(line))

    def until(self, condition, timeout_s: float) -> dict:
        """The first line that satisfies ``condition``; TimeoutError after ``timeout_s``."""
        self.seen: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if condition(line):
                return line
        raise TimeoutError(f"Home Assistant did not get there in time; it said {self.seen}")


def result(intent: str, transcript: str, **slots) -> Result:
    return Result(
        device_id=DEVICE_ID,
        utterance_id=uuid.uuid4().hex[:16],
        source=Source.EDGE,
        transcript=transcript,
        intent=intent,
        slots=slots,
        confidence=0.93,
        timings_ms={"total": 80.0},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ha-venv", type=Path, default=ROOT / ".run/ha-core", help="venv with homeassistant")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each step")
    args = parser.parse_args()
    ha_python = args.ha_venv / "bin/python"
    if not ha_python.exists():
        print(f"error: no Home Assistant venv at {args.ha_venv}: see this script's docstring", file=sys.stderr)
        return 2
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="mqvox-ha-") as scratch, Broker(data_dir=Path(scratch) / "broker") as mq:
        broker = BrokerSettings(port=mq.port)
        settings = HaBridgeSettings(broker=broker, support_url="https://example.org/mqvox")
        device = MqttLink("bench-device", broker)
        fixture = ModelManifest.from_dict(json.loads(MANIFEST_FIXTURE.read_text()))
        device.send(dataclasses.replace(fixture, channel=CHANNEL, version="1.3.0"))  # the channel's live manifest
        device.send(DeviceStatus(DEVICE_ID, DeviceState.ONLINE, "0.1.0", "1.2.0", channel=CHANNEL))
        configs: dict[str, dict] = {}
        collected = threading.Event()

        def collect(topic: str, envelope: Envelope) -> None:
            if topic.endswith("/config") and envelope.payload:
                configs[topic] = json.loads(envelope.payload)
                if len(configs) == 3:
                    collected.set()

        with HaBridge(settings, load_vocabulary()) as bridge:
            watcher = MqttLink("bench-watcher", broker)
            watcher.subscribe(f"{settings.discovery_prefix}/#", collect)
            if not collected.wait(10):
                raise TimeoutError("the bridge announced nothing")
            validated = subprocess.run(
                [str(ha_python), "-c", VALIDATE], input=json.dumps(configs), capture_output=True, text=True, check=True
            )
            report["schema"] = json.loads(validated.stdout)

            started = time.monotonic()
            home_assistant = subprocess.Popen(
                [str(ha_python), "-c", HOME_ASSISTANT, str(mq.port), str(free_port()), str(Path(scratch))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(Path(scratch) / "ha.stderr", "w"),  # noqa: SIM115 (closed with the folder)
                text=True,
            )
            lines = Lines(home_assistant.stdout)
            try:
                entities: dict[str, dict] = {}

                def discovered(line: dict) -> bool:
                    # Each entity appears unavailable, then available once the availability topics are read.
                    if line["kind"] == "state" and line["entity_id"].split(".")[0] in ("event", "sensor", "update"):
                        entities[line["entity_id"]] = line
                    # The update entity's versions come with its state topic, read after the availability.
                    return {entity.split(".")[0] for entity in entities} == {"event", "sensor", "update"} and all(
                        line["state"] != "unavailable"
                        and (not entity.startswith("update.") or line["attributes"].get("latest_version"))
                        for entity, line in entities.items()
                    )

                lines.until(discovered, args.timeout)
                report["discovered_s"] = round(time.monotonic() - started, 1)
                report["entities"] = {entity: line["state"] for entity, line in entities.items()}
                update = next(line for entity, line in entities.items() if entity.startswith("update."))
                report["update"] = {"state": update["state"]} | {
                    key: update["attributes"].get(key) for key in ("installed_version", "latest_version")
                }
                event_entity = next(entity for entity in entities if entity.startswith("event."))
                sensor_entity = next(entity for entity in entities if entity.startswith("sensor."))

                device.send(result("digit", "seven", value=7))
                fired = lines.until(
                    lambda line: (
                        line.get("entity_id") == event_entity and line["state"] not in ("unknown", "unavailable", None)
                    ),
                    args.timeout,
                )
                report["event"] = {
                    key: fired["attributes"].get(key) for key in ("event_type", "slots", "confidence", "source")
                }
                sensor = lines.until(
                    lambda line: line.get("entity_id") == sensor_entity and line["state"] == "digit[value=7]",
                    args.timeout,
                )
                report["sensor"] = {"state": sensor["state"], "source": sensor["attributes"].get("source")}

                device.send(DeviceStatus(DEVICE_ID, DeviceState.OFFLINE, "0.1.0", "1.2.0", channel=CHANNEL))
                unavailable: set[str] = set()

                def all_unavailable(line: dict) -> bool:
                    if line.get("kind") == "state" and line["state"] == "unavailable":
                        unavailable.add(line["entity_id"])
                    return unavailable >= set(entities)

                lines.until(all_unavailable, args.timeout)
                report["unavailable_when_offline"] = sorted(unavailable)

                device.publish(STATUS.topic(device_id=DEVICE_ID), Envelope(b"", None), qos=1, retain=True)
                removed: set[str] = set()

                def all_removed(line: dict) -> bool:
                    if line.get("kind") == "state" and line["state"] is None:
                        removed.add(line["entity_id"])
                    return removed >= set(entities)

                lines.until(all_removed, args.timeout)
                report["removed_on_clear"] = sorted(removed)
                report["bridge_counts"] = dict(bridge.counts)
            except TimeoutError:
                report["ha_stderr_tail"] = (Path(scratch) / "ha.stderr").read_text()[-3000:]
                raise
            finally:
                home_assistant.stdin.close()
                try:
                    home_assistant.wait(30)
                except subprocess.TimeoutExpired:
                    home_assistant.kill()
                watcher.close()
                print(json.dumps(report, indent=2), flush=True)
        device.close()
    # Exit status 1 if HA's own schema refused a config (each step above raises if HA does not get there).
    return 0 if all(config["valid"] for config in report["schema"]["configs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
