"""The Node-RED example flow (examples/node-red/flows.json): kept equal to the vocabulary, and run by a real, headless
Node-RED (pinned in examples/node-red/package.json, installed by `make setup`) on a real device's results."""

from __future__ import annotations

import importlib.util
import json
import queue
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_config.broker import free_port
from device.audio_sources import PlaylistSource
from device.runtime import DeviceRuntime
from device.settings import settings_from_dict
from schemas.result import Result, Source
from schemas.vocabulary import load_vocabulary

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, REPO, Inbox

EXAMPLE = REPO / "examples" / "node-red"
NODE_RED = EXAMPLE / "node_modules" / ".bin" / "node-red"
START_TIMEOUT_S = 30.0


def build_flows_module():
    """examples/node-red/build_flows.py, which writes flows.json (its folder is no package: loaded by path)."""
    spec = importlib.util.spec_from_file_location("build_flows", EXAMPLE / "build_flows.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flows_json_is_what_build_flows_writes_for_the_vocabulary() -> None:
    build_flows = build_flows_module()
    assert (EXAMPLE / "flows.json").read_text(encoding="utf-8") == build_flows.flows_text(load_vocabulary().intents), (
        "run .venv/bin/python examples/node-red/build_flows.py"
    )
    switch = next(node for node in json.loads(build_flows.FLOWS_FILE.read_text()) if node["id"] == "mqvox-intent")
    assert [rule.get("v") for rule in switch["rules"]] == [*load_vocabulary().intents, None]


@pytest.fixture
def node_red(broker_settings, tmp_path) -> Iterator[Path]:
    """A headless Node-RED running the example flow against the session's broker; yields its log file."""
    if not NODE_RED.exists():
        pytest.fail(f"{NODE_RED.relative_to(REPO)} is missing: run make setup (npm ci --prefix examples/node-red)")
    flows = json.loads((EXAMPLE / "flows.json").read_text(encoding="utf-8"))
    for node in flows:
        if node["type"] == "mqtt-broker":
            node.update(broker="127.0.0.1", port=str(broker_settings.port))
    (tmp_path / "flows.json").write_text(json.dumps(flows))
    ui_port = free_port()
    # No editor login, nothing fetched (telemetry, palette installs), no diagnostics endpoint.
    (tmp_path / "settings.js").write_text(
        "module.exports = {\n"
        f'  uiHost: "127.0.0.1", uiPort: {ui_port}, flowFile: "flows.json", credentialSecret: false,\n'
        "  diagnostics: {enabled: false, ui: false}, telemetry: {enabled: false, updateNotification: false},\n"
        "  externalModules: {autoInstall: false, palette: {allowInstall: false}},\n"
        '  logging: {console: {level: "info", metrics: false, audit: false}},\n'
        "};\n"
    )
    log = tmp_path / "node-red.log"
    with log.open("wb") as output:
        running = subprocess.Popen(
            [str(NODE_RED), "--userDir", str(tmp_path), "--settings", str(tmp_path / "settings.js")],
            cwd=tmp_path,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _serves_the_flow(ui_port):
            if running.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Node-RED did not start its flows:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield log
    finally:
        running.terminate()
        try:
            running.wait(timeout=10)
        except subprocess.TimeoutExpired:
            running.kill()
            running.wait()


def _serves_the_flow(ui_port: int) -> bool:
    """Whether Node-RED's admin API answers with the example flow loaded."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/flows", timeout=2) as answer:
            return any(node.get("id") == "mqvox-result-in" for node in json.load(answer))
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def flow_outputs(inbox: Inbox, device_id: str, count: int, timeout_s: float) -> list[tuple[str, dict]]:
    """The next ``count`` messages the flow published about ``device_id``'s results, as (topic, payload)."""
    found = []
    deadline = time.monotonic() + timeout_s
    while len(found) < count:
        topic, envelope = inbox.get(max(0.0, deadline - time.monotonic()))
        message = json.loads(envelope.payload)
        if message["device"] == device_id:
            found.append((topic, message))
    return found


@pytest.mark.slow
@pytest.mark.subprocess
def test_node_red_turns_a_device_run_into_one_message_per_intent(
    node_red, links, broker_settings, device_id, local_model
) -> None:
    outputs = Inbox()
    links().subscribe("mqvox-example/intent/#", outputs)
    # Node-RED is up, but its MQTT subscription may not be yet: a result from a probe device, until the flow answers.
    probe, publisher = f"{device_id}-probe", links()
    stop = Result(probe, "probe-0001", Source.EDGE, "stop", "stop", {}, 0.99, {"total": 1.0}, acted=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        publisher.send(stop)
        try:
            [(topic, message)] = flow_outputs(outputs, probe, 1, 0.5)
            break
        except queue.Empty:
            if time.monotonic() > deadline:
                pytest.fail(f"no message from the flow:\n{node_red.read_text(errors='replace')}")
    assert topic == "mqvox-example/intent/stop"
    assert message == {
        "intent": "stop",
        "slots": {},
        "device": probe,
        "confidence": 0.99,
        "source": "edge",
        "acted": True,
        "transcript": "stop",
        "error": None,
        "utterance_id": "probe-0001",
    }

    # A real device hears "hey jarvis, turn on the lights" (decided on the device) and a sentence outside the
    # vocabulary, which with upload = never it publishes as not understood, without asking the cloud.
    settings = settings_from_dict(
        {
            "device_id": device_id,
            "broker": {"port": broker_settings.port},
            "audio": {"source": "file", "files": [str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE)]},
            "cloud": {"upload": "never"},
        }
    )
    runtime = DeviceRuntime(settings, local_model)
    runtime.run(PlaylistSource(runtime.settings.audio.files))

    (lights_topic, lights), (none_topic, nothing) = flow_outputs(outputs, device_id, 2, 10.0)
    assert lights_topic == "mqvox-example/intent/lights_on"
    assert lights["intent"] == "lights_on" and lights["slots"] == {} and lights["source"] == "edge"
    assert lights["acted"] is True and lights["error"] is None and lights["confidence"] > 0.9
    assert none_topic == "mqvox-example/intent/none"
    assert nothing["intent"] is None and nothing["acted"] is False and nothing["error"]["code"] == "not_understood"
    assert lights["utterance_id"] != nothing["utterance_id"]
