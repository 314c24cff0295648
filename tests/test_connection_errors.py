"""What a client says when it cannot use the broker, and the development broker on a LAN address.

Against real Mosquitto brokers: the development one, and the production one (TLS, client certificates, the
generated ACL) with a fleet from provision. Each failure must name its cause in one line, with exit status 2 in
the command-line tools, and a refused connection must be known at once, not after the CONNACK timeout.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_config.broker import PROD_CONFIG, Broker, exposure_warning, free_port
from common.mqtt import BrokerSettings, BrokerUnavailable, MqttLink, NotAuthorized, PublishRefused, TlsSettings
from device.presence import Presence
from firmware_tools.onboarding.provision import Fleet
from schemas.envelope import Envelope
from schemas.status import DeviceState

from .conftest import IN_VOCABULARY_SAMPLE, wait_until
from .test_fleet_security import DEVICE_A, DEVICE_B, OPERATOR, provision_fleet


def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a command printed on stderr, having exited with status 2."""
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys) -> Fleet:
    return provision_fleet(tmp_path_factory.mktemp("fleet"), keys["fleet.pub"])


@pytest.fixture(scope="module")
def tls_broker(fleet, tmp_path_factory) -> Iterator[Broker]:
    with Broker(
        data_dir=tmp_path_factory.mktemp("tls-broker"), config=PROD_CONFIG, tls_dir=fleet.folder / "broker"
    ) as running:
        yield running


def tls_settings(broker: Broker, folder: Path) -> BrokerSettings:
    tls = TlsSettings.from_folder(str(folder))
    return BrokerSettings(host="localhost", port=broker.port, connect_timeout_s=5.0, tls=tls)


# 1. The broker is not there.


def test_a_refused_connection_is_named_at_once() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(
        BrokerUnavailable, match=rf"connection refused at 127\.0\.0\.1:{port} \(is the broker running\?\)"
    ):
        MqttLink("nobody", BrokerSettings(port=port, connect_timeout_s=10.0))
    assert time.monotonic() - started < 2.0  # not the 10 s CONNACK timeout


def test_a_host_that_does_not_resolve_and_a_port_that_never_answers_are_named() -> None:
    with pytest.raises(BrokerUnavailable, match=r"cannot resolve host 'no-such-broker\.invalid'"):
        MqttLink("nobody", BrokerSettings(host="no-such-broker.invalid", connect_timeout_s=5.0))
    # A listener whose queue is full: Linux drops the next SYN, so the connection hangs as with a firewall.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with socket.create_connection(listener.getsockname(), timeout=1):
            port = listener.getsockname()[1]
            with pytest.raises(BrokerUnavailable, match=rf"connection to 127\.0\.0\.1:{port} timed out after 1 s"):
                MqttLink("nobody", BrokerSettings(port=port, connect_timeout_s=1.0))


@pytest.mark.broker
@pytest.mark.slow
def test_a_device_started_before_its_broker_says_why_at_once_then_connects_when_it_comes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="common.mqtt"):
        link = MqttLink("early-device", BrokerSettings(port=port, connect_timeout_s=10.0), require_connection=False)
    try:
        assert time.monotonic() - started < 2.0
        assert f"connection refused at 127.0.0.1:{port} (is the broker running?)" in caplog.text
        assert "CONNACK" not in caplog.text
        assert not link.connected
        # The broker comes up later: paho's reconnection with backoff still finds it.
        with Broker(data_dir=tmp_path / "late-broker", port=port):
            assert wait_until(lambda: link.connected, timeout_s=20.0)
            link.publish("test/late", Envelope(b"here", "text/plain"), qos=1, retain=False)
    finally:
        link.close()


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_clis_name_a_refused_broker_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    sent = python_m("device", "send", str(IN_VOCABULARY_SAMPLE), "--device-id", "pi-1", "--port", str(port))
    assert f"connection refused at 127.0.0.1:{port} (is the broker running?)" in one_error_line(sent)
    status = python_m("firmware_tools", "status", "--port", str(port), "--database", f"sqlite:///{tmp_path}/r.db")
    assert f"connection refused at 127.0.0.1:{port}" in one_error_line(status)


@pytest.mark.slow
@pytest.mark.subprocess
def test_device_run_without_its_broker_says_so_at_once_and_still_listens(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "pi-offline"\n[broker]\nport = {port}\nconnect_timeout_s = 60.0\n'
        f'[audio]\nsource = "file"\nfiles = ["{IN_VOCABULARY_SAMPLE}"]\n[cloud]\nupload = "never"\n'
    )
    started = time.monotonic()
    done = python_m("device", "run", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60.0  # it never waited out the CONNACK timeout
    assert f"connection refused at 127.0.0.1:{port} (is the broker running?); retrying in the background" in done.stderr
    assert "edge result: lights_on" in done.stderr  # it listened and decided meanwhile


# 2. A TLS folder without valid files.


def _missing_certificate(folder: Path, fleet: Fleet) -> str:
    (folder / "cert.pem").unlink()
    return f"TLS: the client certificate {folder}/cert.pem does not exist"


def _garbage_ca(folder: Path, fleet: Fleet) -> str:
    (folder / "ca.pem").write_text("not a certificate\n")
    return f"TLS: the CA certificate {folder}/ca.pem is not a valid PEM CA certificate"


def _empty_certificate(folder: Path, fleet: Fleet) -> str:
    (folder / "cert.pem").write_bytes(b"")
    return f"TLS: the client certificate {folder}/cert.pem is not a valid PEM client certificate"


def _garbage_key(folder: Path, fleet: Fleet) -> str:
    (folder / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    return f"TLS: the private key {folder}/key.pem is not a valid PEM private key"


def _another_clients_key(folder: Path, fleet: Fleet) -> str:
    shutil.copy(fleet.client_dir(DEVICE_B) / "key.pem", folder / "key.pem")
    return f"TLS: the private key {folder}/key.pem is not the key of the certificate {folder}/cert.pem"


@pytest.mark.parametrize(
    "damage", [_missing_certificate, _garbage_ca, _empty_certificate, _garbage_key, _another_clients_key]
)
@pytest.mark.broker
@pytest.mark.subprocess
def test_a_tls_folder_without_valid_files_names_the_file(fleet, tls_broker, tmp_path: Path, damage) -> None:
    folder = tmp_path / "pi-a"
    shutil.copytree(fleet.client_dir(DEVICE_A), folder)
    expected = damage(folder, fleet)
    with pytest.raises(BrokerUnavailable) as refused:
        MqttLink(DEVICE_A, tls_settings(tls_broker, folder))
    assert str(refused.value) == expected
    done = python_m(
        "device", "send", str(IN_VOCABULARY_SAMPLE), "--device-id", DEVICE_A,
        "--host", "localhost", "--port", str(tls_broker.port), "--tls", str(folder),
    )  # fmt: skip
    assert one_error_line(done) == f"error: {expected}"


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_tls_folder_that_is_not_there_is_named(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match=f"TLS folder {tmp_path}/nowhere does not exist"):
        TlsSettings.from_folder(str(tmp_path / "nowhere"))
    (tmp_path / "a-file").write_text("")
    database = f"sqlite:///{tmp_path}/r.db"
    done = python_m("firmware_tools", "status", "--tls", str(tmp_path / "a-file"), "--database", database)
    line = one_error_line(done)
    assert f"TLS folder {tmp_path}/a-file is not a folder" in line and "TlsSettings(" not in line


# 3. A plain connection to the TLS broker, and TLS to the plain one.


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_a_plain_connection_to_the_tls_broker_suggests_tls(tls_broker, tmp_path: Path) -> None:
    address = f"localhost:{tls_broker.port}"
    hint = f"the broker at {address} may require TLS: pass --tls DIR"
    with pytest.raises(BrokerUnavailable, match="before CONNACK") as refused:
        MqttLink("plain", BrokerSettings(host="localhost", port=tls_broker.port, connect_timeout_s=5.0))
    assert hint in str(refused.value)
    done = python_m(
        "firmware_tools", "status", "--host", "localhost", "--port", str(tls_broker.port),
        "--database", f"sqlite:///{tmp_path}/r.db",
    )  # fmt: skip
    assert hint in one_error_line(done)


def test_tls_to_a_plain_broker_and_to_a_broker_of_another_ca_are_named(fleet, broker, tls_broker, keys, tmp_path):
    tls = TlsSettings.from_folder(str(fleet.client_dir(DEVICE_A)))
    with pytest.raises(BrokerUnavailable, match=rf"reset by localhost:{broker.port} during the TLS handshake"):
        MqttLink(DEVICE_A, BrokerSettings(host="localhost", port=broker.port, connect_timeout_s=5.0, tls=tls))
    other = provision_fleet(tmp_path / "other-fleet", keys["fleet.pub"])
    with pytest.raises(BrokerUnavailable, match=r"the broker's certificate does not verify against .*other-fleet"):
        MqttLink(DEVICE_A, tls_settings(tls_broker, other.client_dir(DEVICE_A)))


# 4. status with a certificate the ACL hides the fleet from.


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_status_says_when_the_acl_hides_the_statuses_from_its_certificate(fleet, tls_broker, tmp_path: Path) -> None:
    def status(client: str) -> subprocess.CompletedProcess:
        return python_m(
            "firmware_tools", "status", "--host", "localhost", "--port", str(tls_broker.port),
            "--tls", str(fleet.client_dir(client)), "--database", f"sqlite:///{tmp_path}/registry.db",
        )  # fmt: skip

    empty = status(OPERATOR)
    assert empty.returncode == 0, empty.stderr
    assert "(no device has published a status)" in empty.stdout  # an operator, and an empty fleet: nothing hidden
    with MqttLink(DEVICE_A, tls_settings(tls_broker, fleet.client_dir(DEVICE_A))) as device:
        device.send(Presence(DEVICE_A, model_version="1.1.0", channel="stable").status(DeviceState.ONLINE))
    seen = status(OPERATOR)
    assert seen.returncode == 0 and DEVICE_A in seen.stdout, seen.stderr
    hidden = one_error_line(status(DEVICE_B))
    assert hidden.startswith(f"error: received no device status: the broker refused '{DEVICE_B}'")
    assert "ACL shows the devices' statuses to operators alone" in hidden and "no device has published" not in hidden


@pytest.mark.broker
def test_a_publish_the_acl_refuses_fails_its_future_with_publish_refused(fleet, tls_broker) -> None:
    """publish_later's Future carries the ACL's refusal; publish raises it, as a PublishRefused."""
    with MqttLink(DEVICE_A, tls_settings(tls_broker, fleet.client_dir(DEVICE_A))) as device:
        others = "mqvox/v1/devices/pi-b/utterance"
        refused = device.publish_later(others, Envelope(b"not mine", "text/plain"), qos=1, retain=False).exception(5)
        assert isinstance(refused, PublishRefused) and isinstance(refused, NotAuthorized), refused
        with pytest.raises(PublishRefused, match="Not authorized"):
            device.publish(others, Envelope(b"not mine", "text/plain"), qos=1, retain=False)


# 5. The development broker on a LAN address.


def own_lan_address() -> str | None:
    """This machine's address on its default route, if it has one that is not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("198.51.100.1", 9))  # UDP: no packet is sent, the kernel only picks the source address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


# A machine with no address besides loopback runs the first alone (the warning's text is checked below).
@pytest.mark.parametrize("address", [address for address in ("127.0.0.2", own_lan_address()) if address])
@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_start_bind_listens_on_that_address_alone(tmp_path: Path, address: str) -> None:
    started = python_m("broker_config", "start", "--bind", address, "--data-dir", str(tmp_path))
    assert started.returncode == 0, started.stderr
    try:
        running = json.loads(started.stdout)
        assert running["host"] == address
        with MqttLink("lan-client", BrokerSettings(host=address, port=running["port"])) as link:
            link.publish("test/lan", Envelope(b"across the room", "text/plain"), qos=1, retain=False)
        with pytest.raises(BrokerUnavailable, match=r"connection refused at 127\.0\.0\.1:"):
            MqttLink("loopback-client", BrokerSettings(port=running["port"]))
        loopback = ipaddress.ip_address(address).is_loopback
        assert ("no authentication and no encryption" in started.stderr) is not loopback
    finally:
        stopped = python_m("broker_config", "stop", "--data-dir", str(tmp_path))
    assert json.loads(stopped.stdout)["stopped"] == running["pid"]


def test_the_lan_warning_says_who_can_use_the_broker() -> None:
    warning = exposure_warning("mosquitto.dev.conf", "192.168.1.20", 1883)
    assert warning.startswith("warning: this development broker listens on 192.168.1.20:1883")
    assert "no authentication and no encryption" in warning and "anyone on that network" in warning
    assert exposure_warning("mosquitto.dev.conf", "127.0.0.1", 1883) is None
    assert exposure_warning(PROD_CONFIG, "192.168.1.20", 8883) is None  # TLS and client certificates


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("198.51.100.7", "cannot listen on 198.51.100.7: not an address of this machine"),
        ("laptop.local", "cannot listen on 'laptop.local': not an IP address"),
    ],
)
@pytest.mark.subprocess
def test_start_bind_refuses_an_address_of_another_machine(tmp_path: Path, address: str, message: str) -> None:
    done = python_m("broker_config", "start", "--bind", address, "--data-dir", str(tmp_path))
    line = one_error_line(done)
    assert line.startswith(f"error: --bind: {message}") and "ip -brief address" in line
    assert not (tmp_path / "broker.json").exists()
