"""broker_config/: the dev config's limits, and starting and stopping Mosquitto from it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from broker_config.broker import Broker, BrokerStartError, free_port, render_config
from common.mqtt import BrokerSettings, BrokerUnavailable, MqttLink
from schemas.protocol import decode
from schemas.status import DeviceState, DeviceStatus
from schemas.topics import MAX_PAYLOAD_BYTES

from .conftest import Inbox

CONFIG = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto.dev.conf"
PROD = CONFIG.with_name("mosquitto.prod.conf")


def setting(name: str, config: Path = CONFIG) -> str:
    values = re.findall(rf"^{name} (.+)$", config.read_text(), flags=re.MULTILINE)
    assert len(values) == 1, f"{name} must be set exactly once"
    return values[0]


def test_dev_config_states_its_limits_explicitly() -> None:
    assert int(setting("message_size_limit")) == MAX_PAYLOAD_BYTES
    assert int(setting("max_packet_size")) > MAX_PAYLOAD_BYTES  # room for topic and properties
    assert int(setting("max_queued_messages")) > 0
    assert int(setting("max_inflight_messages")) > 0
    assert setting("persistence") == "true"
    assert setting("set_tcp_nodelay") == "true"  # latency: see bench/protocol.py


def test_dev_config_listens_on_loopback_only() -> None:
    listeners = re.findall(r"^listener (\d+)(?: (\S+))?$", CONFIG.read_text(), flags=re.MULTILINE)
    assert listeners and all(address == "127.0.0.1" for _, address in listeners)


LIMITS = ("message_size_limit", "max_packet_size", "max_inflight_messages", "max_queued_messages", "max_keepalive")


def test_prod_config_has_the_dev_limits_and_no_way_in_without_a_certificate() -> None:
    assert {name: setting(name, PROD) for name in LIMITS} == {name: setting(name) for name in LIMITS}
    assert setting("allow_anonymous", PROD) == "false"
    assert setting("require_certificate", PROD) == "true"
    assert setting("use_identity_as_username", PROD) == "true"
    assert setting("use_username_as_clientid", PROD) == "true"
    assert setting("tls_version", PROD) == "tlsv1.2"
    assert re.findall(r"^listener .*$", PROD.read_text(), flags=re.MULTILINE) == ["listener 8883"]  # TLS only
    for name in ("cafile", "certfile", "keyfile", "crlfile", "acl_file"):
        assert setting(name, PROD).startswith("/etc/mosquitto/mqvox/")


@pytest.mark.broker
@pytest.mark.subprocess
def test_rendered_prod_config_reads_its_tls_files_from_the_given_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TLS files"):
        render_config(PROD.read_text(), port=1, data_dir=tmp_path)
    text = render_config(PROD.read_text(), port=12345, data_dir=tmp_path, tls_dir=tmp_path / "tls")
    assert "listener 12345 127.0.0.1" in text and "/etc/mosquitto" not in text
    assert f"cafile {tmp_path}/tls/ca.pem" in text
    refused = run("broker_config", "start", "--config", "prod", "--data-dir", str(tmp_path))
    assert refused.returncode == 1 and "TLS files" in refused.stderr


def test_rendered_config_has_its_own_port_and_data_dir(tmp_path: Path) -> None:
    text = render_config(CONFIG.read_text(), port=12345, data_dir=tmp_path)
    assert "listener 12345 127.0.0.1" in text
    assert f"persistence_location {tmp_path}/" in text
    assert f"log_dest file {tmp_path}/mosquitto.log" in text
    with pytest.raises(ValueError):
        render_config("allow_anonymous true\n", port=1, data_dir=tmp_path)


def status(device_id: str) -> DeviceStatus:
    return DeviceStatus(device_id=device_id, state=DeviceState.ONLINE, software_version="0.1.0", model_version=None)


@pytest.mark.broker
def test_given_port_and_retained_messages_survive_a_restart(tmp_path: Path) -> None:
    port = free_port()
    retained = status("persisted-1")
    with Broker(data_dir=tmp_path, port=port) as broker:
        assert broker.port == port
        with MqttLink("writer", BrokerSettings(port=port)) as link:
            link.send(retained)
    assert (tmp_path / "mosquitto.db").exists()
    with Broker(data_dir=tmp_path, port=port):
        inbox = Inbox()
        with MqttLink("reader", BrokerSettings(port=port)) as link:
            link.subscribe(retained.topic(), inbox)
            assert decode(*inbox.get()) == retained


def test_a_taken_port_is_a_clear_error(tmp_path: Path, broker) -> None:
    with pytest.raises(BrokerStartError, match="did not start"):
        Broker(data_dir=tmp_path, port=broker.port).start(timeout_s=3)


def test_an_absent_broker_is_a_clear_error() -> None:
    with pytest.raises(BrokerUnavailable, match="cannot reach"):
        MqttLink("nobody", BrokerSettings(port=free_port(), connect_timeout_s=2))


def run(*args: str, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, **options)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_starts_and_stops_a_broker(tmp_path: Path) -> None:
    started = run("broker_config", "start", "--data-dir", str(tmp_path))
    assert started.returncode == 0, started.stderr
    port = json.loads(started.stdout)["port"]
    try:
        MqttLink("probe", BrokerSettings(port=port)).close()
        again = run("broker_config", "start", "--data-dir", str(tmp_path))
        assert again.returncode == 1 and "already" in again.stderr
    finally:
        stopped = run("broker_config", "stop", "--data-dir", str(tmp_path))
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["stopped"] > 0
    with pytest.raises(BrokerUnavailable):
        MqttLink("probe", BrokerSettings(port=port, connect_timeout_s=2))
    assert "terminating" in (tmp_path / "mosquitto.log").read_text()
