"""examples/consumer.py against the session's Mosquitto, and the README's result field table kept equal to the schema.

(The Node-RED example flow has its own module, tests/test_node_red.py.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from broker_config.acl import Role
from broker_config.broker import PROD_CONFIG, Broker, free_port
from common.mqtt import BrokerSettings, MqttLink, TlsSettings
from firmware_tools.onboarding.provision import Fleet, ProvisionSettings, parse_clients
from schemas.envelope import Envelope
from schemas.errors import ErrorCode
from schemas.result import ErrorInfo, Result, Source
from schemas.topics import RESULT

from .conftest import REPO

CONSUMER = REPO / "examples" / "consumer.py"
README = REPO / "README.md"
RESULT_SCHEMA = REPO / "schemas" / "json" / "result.schema.json"
FIELD_TABLE_HEADER = "| result field |"
"""The header of the README's table of result fields ("Use the results")."""


def interruptible_like_a_terminal() -> None:
    """In the child: Ctrl-C's default action back. A suite started in the background (CI, nohup) runs with SIGINT
    ignored, which children inherit, and Python then leaves it ignored instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def printing(command: list[str]) -> Iterator[tuple[subprocess.Popen, queue.Queue[str]]]:
    """``command`` running, and a queue of the lines it prints; killed at the end."""
    running = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible_like_a_terminal
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line.rstrip("\n")) for line in running.stdout], daemon=True)
    reader.start()
    try:
        yield running, lines
    finally:
        running.kill()
        running.wait()


@pytest.fixture
def consumer(broker_settings) -> Iterator[tuple[subprocess.Popen, queue.Queue[str]]]:
    """examples/consumer.py running against the session's broker, and a queue of the lines it prints."""
    with printing([sys.executable, str(CONSUMER), "127.0.0.1", str(broker_settings.port)]) as running:
        yield running


@pytest.mark.subprocess
def test_the_example_consumer_prints_each_result_and_skips_what_is_not_one(
    consumer, links, broker_settings, device_id
) -> None:
    running, lines = consumer
    assert lines.get(timeout=10) == f"listening for results on 127.0.0.1:{broker_settings.port}"
    publisher = links()
    topic = RESULT.topic(device_id=device_id)
    publisher.publish(topic, Envelope(b"{not json", "application/json"), qos=1, retain=False)
    seven = Result(device_id, "utterance-0001", Source.EDGE, "seven", "digit", {"value": 7}, 0.987, {"total": 4.0})
    publisher.send(dataclasses.replace(seven, acted=True))
    not_understood = ErrorInfo(ErrorCode.NOT_UNDERSTOOD, "nothing in the vocabulary was heard")
    publisher.send(Result.failure(device_id, "utterance-0002", Source.CLOUD, not_understood, {"total": 9.0}))
    assert lines.get(timeout=5).startswith(f"skipped a malformed message on {topic}: ")
    assert lines.get(timeout=5) == f'{device_id}: intent=digit slots={{"value": 7}} confidence=0.99 acted=True'
    assert lines.get(timeout=5) == f"{device_id}: intent=None slots={{}} confidence=0.00 acted=False"
    running.send_signal(signal.SIGINT)  # Ctrl-C ends it quietly
    assert running.wait(timeout=10) == 0
    assert "Traceback" not in running.stderr.read()


@pytest.mark.subprocess
def test_the_example_consumer_says_why_it_cannot_connect() -> None:
    done = subprocess.run(
        [sys.executable, str(CONSUMER), "127.0.0.1", str(free_port())], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "cannot connect to 127.0.0.1:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.broker
@pytest.mark.subprocess
def test_consumers_read_results_on_the_production_broker_with_consumer_certificates(keys, tmp_path) -> None:
    # Two consumers, as the README's commands run them: each connection at once needs a certificate of its own.
    fleet = Fleet(tmp_path / "fleet", ProvisionSettings())
    clients = parse_clients(Role.DEVICE, ["pi-kitchen-01"]) + parse_clients(Role.CONSUMER, ["dashboard", "dashboard-2"])
    fleet.provision(clients, signing_key=keys["fleet.pub"])
    dashboard, dashboard_2 = (tmp_path / "fleet" / "clients" / name for name in ("dashboard", "dashboard-2"))
    with (
        Broker(data_dir=tmp_path / "broker", config=PROD_CONFIG, tls_dir=tmp_path / "fleet" / "broker") as broker,
        printing([sys.executable, str(CONSUMER), "--tls", str(dashboard), "localhost", str(broker.port)]) as (_, lines),
        printing(
            ["stdbuf", "-oL",  # line-buffered, so its SUBACK line comes out when it is printed
             "mosquitto_sub", "-h", "localhost", "-p", str(broker.port), "--cafile", str(dashboard_2 / "ca.pem"),
             "--cert", str(dashboard_2 / "cert.pem"), "--key", str(dashboard_2 / "key.pem"),
             "-t", RESULT.filter(), "-V", "mqttv5", "-q", "1", "-v", "-d"]
        ) as (_, sub_lines),
    ):  # fmt: skip
        assert lines.get(timeout=10) == f"listening for results on localhost:{broker.port}"
        while "SUBACK" not in sub_lines.get(timeout=10):
            pass
        tls = TlsSettings.from_folder(str(tmp_path / "fleet" / "clients" / "pi-kitchen-01"))
        device = MqttLink("pi-kitchen-01", BrokerSettings(host="localhost", port=broker.port, tls=tls))
        try:
            lights = Result("pi-kitchen-01", "utterance-0003", Source.EDGE, None, "lights_on", {}, 0.99, {"total": 5.0})
            device.send(dataclasses.replace(lights, acted=True))
        finally:
            device.close()
        assert lines.get(timeout=10) == "pi-kitchen-01: intent=lights_on slots={} confidence=0.99 acted=True"
        while not (line := sub_lines.get(timeout=10)).startswith(RESULT.topic(device_id="pi-kitchen-01")):
            pass
        assert Result.from_dict(json.loads(line.split(" ", 1)[1])) == dataclasses.replace(lights, acted=True)


def readme_result_fields() -> list[str]:
    """The field names of the README's result field table, in order."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(FIELD_TABLE_HEADER))
    fields = []
    for line in lines[start + 2 :]:  # past the header and its separator
        if not line.startswith("|"):
            break
        fields.append(line.strip("|").split("|")[0].strip().strip("`"))
    return fields


def test_readme_describes_every_result_field_the_schema_has_in_its_order() -> None:
    schema = json.loads(RESULT_SCHEMA.read_text(encoding="utf-8"))
    assert readme_result_fields() == list(schema["properties"]) == [field.name for field in dataclasses.fields(Result)]
    assert schema["required"] == list(schema["properties"])
