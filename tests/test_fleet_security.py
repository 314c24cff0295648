"""The production broker (broker_config/mosquitto.prod.conf) with a fleet from `firmware_tools provision`.

A real Mosquitto with the production config on a free port: TLS with client
certificates, no anonymous access, and the generated ACL. Denials are checked by what
arrives: each check ends with a sentinel from the same publisher, so "nothing arrived"
is known without sleeping (Mosquitto delivers one publisher's messages in order).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import queue
import socket
import ssl
import subprocess
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_config.acl import ROLE_RULES, Client, Role, render_acl
from broker_config.broker import PROD_CONFIG, Broker
from common.mqtt import BrokerSettings, BrokerUnavailable, MqttLink, PublishRefused, TlsSettings
from device.settings import load_settings
from firmware_tools.onboarding.certificates import CertificateAuthority, certificate_pem, key_pem, new_key
from firmware_tools.onboarding.provision import Fleet, ProvisionError, ProvisionSettings, parse_clients
from schemas.envelope import Envelope
from schemas.protocol import decode
from schemas.result import Result
from schemas.topics import ALL_TOPICS, ERROR, MANIFEST, MODEL_BLOB, REPLY, RESULT, STATUS, UTTERANCE

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, REPO, wait_until

DEVICE_A, DEVICE_B = "pi-a", "pi-b"
WORKER, OPERATOR, CONSUMER = "worker-1", "ops-1", "app-1"
OBSERVER = "test-observer"
"""Test-only client with `readwrite #`, appended to the generated ACL: it sees what arrives and sends sentinels."""
SENTINEL_TOPIC = "test/sentinel"

TOPICS = {
    "utterance A": UTTERANCE.topic(device_id=DEVICE_A),
    "utterance B": UTTERANCE.topic(device_id=DEVICE_B),
    "reply A": REPLY.topic(device_id=DEVICE_A),
    "reply B": REPLY.topic(device_id=DEVICE_B),
    "result A": RESULT.topic(device_id=DEVICE_A),
    "result B": RESULT.topic(device_id=DEVICE_B),
    "status A": STATUS.topic(device_id=DEVICE_A),
    "status B": STATUS.topic(device_id=DEVICE_B),
    "manifest": MANIFEST.topic(channel="stable"),
    "blob": MODEL_BLOB.topic(channel="stable", version="1.0.0"),
    "errors": ERROR.topic(),
}
"""One concrete topic of every kind in the tree, for device A and device B where it is per device."""

MATRIX = {
    # client: (may publish, may read), by TOPICS name. Everything else is denied.
    DEVICE_A: ({"utterance A", "status A", "result A"}, {"reply A", "manifest", "blob"}),
    WORKER: ({"reply A", "reply B", "errors"}, {"utterance A", "utterance B"}),
    OPERATOR: ({"manifest", "blob"}, {"manifest", "blob", "status A", "status B", "errors"}),
    CONSUMER: (set(), {"result A", "result B"}),
}
"""The ACL as designed (broker_config/README.md), written out by hand to check the generated file against."""


def provision_fleet(folder: Path, signing_key: Path) -> Fleet:
    fleet = Fleet(folder, ProvisionSettings())
    clients = (
        parse_clients(Role.DEVICE, [DEVICE_A, DEVICE_B])
        + parse_clients(Role.WORKER, [WORKER])
        + parse_clients(Role.OPERATOR, [OPERATOR])
        + parse_clients(Role.CONSUMER, [CONSUMER])
    )
    fleet.provision(clients, signing_key=signing_key)
    return fleet


def client_files(ca: CertificateAuthority, folder: Path, name: str, **issue) -> Path:
    """A client folder for ``name`` signed by ``ca``, outside provision (strangers, expired certificates)."""
    key = new_key()
    folder.mkdir(parents=True)
    (folder / "key.pem").write_bytes(key_pem(key))
    (folder / "cert.pem").write_bytes(certificate_pem(ca.issue(name, key.public_key(), **issue)))
    (folder / "ca.pem").write_bytes(certificate_pem(ca.certificate))
    return folder


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, keys) -> Fleet:
    fleet = provision_fleet(tmp_path_factory.mktemp("fleet"), keys["fleet.pub"])
    observer = client_files(fleet.ca, tmp_path_factory.mktemp("observer") / OBSERVER, OBSERVER, days=1)
    fleet.observer_dir = observer
    with open(fleet.folder / "broker" / "acl", "a", encoding="utf-8") as acl:
        acl.write(f"\n# test only\nuser {OBSERVER}\ntopic readwrite #\n")
    return fleet


@pytest.fixture(scope="module")
def prod_broker(fleet, tmp_path_factory) -> Iterator[Broker]:
    with Broker(
        data_dir=tmp_path_factory.mktemp("prod-broker"), config=PROD_CONFIG, tls_dir=fleet.folder / "broker"
    ) as b:
        yield b


def tls_link(broker: Broker, folder: Path, client_id: str | None = None, **options) -> MqttLink:
    settings = BrokerSettings(
        host="localhost", port=broker.port, connect_timeout_s=5.0, tls=TlsSettings.from_folder(str(folder))
    )
    return MqttLink(client_id or folder.name, settings, **options)


class Collector:
    """Payloads that arrive on a link, by topic, and a way to wait for a sentinel."""

    def __init__(self) -> None:
        self.arrived: queue.Queue[tuple[str, bytes]] = queue.Queue()

    def __call__(self, topic: str, envelope: Envelope) -> None:
        self.arrived.put((topic, envelope.payload))

    def until(self, sentinel: bytes, timeout_s: float = 10.0) -> list[tuple[str, bytes]]:
        """Everything that arrived before ``sentinel``."""
        seen = []
        while True:
            topic, payload = self.arrived.get(timeout=timeout_s)
            if payload == sentinel:
                return seen
            seen.append((topic, payload))


def raw(payload: bytes) -> Envelope:
    return Envelope(payload=payload, content_type="application/octet-stream")


@pytest.fixture(scope="module")
def observer(fleet, prod_broker) -> Iterator[tuple[MqttLink, Collector]]:
    collector = Collector()
    with tls_link(prod_broker, fleet.observer_dir) as link:
        link.subscribe("#", collector)
        yield link, collector


def test_the_generated_acl_gives_each_role_exactly_the_designed_rights(fleet) -> None:
    acl = (fleet.folder / "broker" / "acl").read_text()
    assert f"user {DEVICE_A}\ntopic write mqvox/v1/devices/{DEVICE_A}/utterance\n" in acl
    assert "topic readwrite #" not in acl.split("# test only")[0]  # nobody but the test observer reads all
    # Every topic kind of the protocol is in some role's rules: a new kind cannot be forgotten silently.
    patterns = " ".join(rule.pattern for rules in ROLE_RULES.values() for rule in rules)
    for spec in ALL_TOPICS:
        assert spec.template.split("/{")[0].rsplit("/", 1)[0] in patterns, spec.name
    # Deterministic: the same clients give the same file, whatever their order.
    clients = [Client("b", Role.DEVICE), Client("a", Role.WORKER)]
    assert render_acl(clients) == render_acl(reversed(clients))


@pytest.mark.parametrize("name", list(MATRIX))
@pytest.mark.broker
def test_acl_matrix_publish(fleet, prod_broker, observer, name: str) -> None:
    """Every role publishes on every topic; the allowed ones arrive, the others are refused and never arrive."""
    allowed, _ = MATRIX[name]
    observer_link, collector = observer
    marker = uuid.uuid4().hex
    refused = set()
    with tls_link(prod_broker, fleet.client_dir(name)) as link:
        for topic_name, topic in TOPICS.items():
            try:
                link.publish(topic, raw(f"{marker} {topic_name}".encode()), qos=1, retain=False)
            except PublishRefused as error:
                assert "Not authorized" in str(error)
                refused.add(topic_name)
    sentinel = f"{marker} sentinel".encode()
    observer_link.publish(SENTINEL_TOPIC, raw(sentinel), qos=1, retain=False)
    arrived = {
        payload.decode().split(" ", 1)[1] for _, payload in collector.until(sentinel) if marker in payload.decode()
    }
    assert arrived == allowed
    assert refused == set(TOPICS) - allowed


# A topic each role may read, for its sentinel.
SENTINEL_READ = {DEVICE_A: "reply A", WORKER: "utterance A", OPERATOR: "status A", CONSUMER: "result A"}


@pytest.mark.parametrize("name", list(MATRIX))
@pytest.mark.broker
def test_acl_matrix_subscribe(fleet, prod_broker, observer, name: str) -> None:
    """Every role subscribes to every topic; only what it may read arrives."""
    _, readable = MATRIX[name]
    observer_link, _ = observer
    marker = uuid.uuid4().hex
    collector = Collector()
    with tls_link(prod_broker, fleet.client_dir(name)) as link:
        for topic in TOPICS.values():
            # Mosquitto grants every subscription; the ACL decides what is delivered.
            link.subscribe(topic, collector)
        for topic_name, topic in TOPICS.items():
            observer_link.publish(topic, raw(f"{marker} {topic_name}".encode()), qos=1, retain=False)
        sentinel = f"{marker} sentinel".encode()
        observer_link.publish(TOPICS[SENTINEL_READ[name]], raw(sentinel), qos=1, retain=False)
        arrived = {payload.decode().split(" ", 1)[1] for _, payload in collector.until(sentinel)}
    assert arrived == readable


@pytest.mark.broker
def test_wildcards_do_not_widen_a_device_s_reach(fleet, prod_broker, observer) -> None:
    observer_link, _ = observer
    marker = uuid.uuid4().hex
    collector = Collector()
    with tls_link(prod_broker, fleet.client_dir(DEVICE_A)) as link:
        link.subscribe("#", collector)
        link.subscribe(f"$share/thieves/{UTTERANCE.filter()}", collector)
        for topic_name in ("utterance B", "reply B", "result B", "status B", "result A", "reply A"):
            observer_link.publish(TOPICS[topic_name], raw(f"{marker} {topic_name}".encode()), qos=1, retain=False)
        sentinel = f"{marker} sentinel".encode()
        observer_link.publish(TOPICS["reply A"], raw(sentinel), qos=1, retain=False)
        arrived = {payload.decode().split(" ", 1)[1] for _, payload in collector.until(sentinel)}
    assert arrived == {"reply A"}


@pytest.mark.broker
def test_the_worker_s_shared_subscription_gets_device_utterances(fleet, prod_broker) -> None:
    collector = Collector()
    with (
        tls_link(prod_broker, fleet.client_dir(WORKER)) as worker,
        tls_link(prod_broker, fleet.client_dir(DEVICE_B)) as device,
    ):
        worker.subscribe(f"$share/mqvox-workers/{UTTERANCE.filter()}", collector)
        device.publish(TOPICS["utterance B"], raw(b"audio"), qos=1, retain=False)
        assert collector.arrived.get(timeout=5) == (TOPICS["utterance B"], b"audio")


@pytest.mark.broker
def test_device_a_cannot_take_over_device_b_s_session_or_read_its_replies(fleet, prod_broker) -> None:
    b_replies = Collector()
    a_replies = Collector()
    log_start = prod_broker.log_size()
    with tls_link(prod_broker, fleet.client_dir(DEVICE_B)) as device_b:
        device_b.subscribe(TOPICS["reply B"], b_replies)
        # The broker takes the client id from the certificate, so naming B's id gets A its own session.
        with (
            tls_link(prod_broker, fleet.client_dir(DEVICE_A), client_id=DEVICE_B) as device_a,
            tls_link(prod_broker, fleet.client_dir(WORKER)) as worker,
        ):
            device_a.subscribe(TOPICS["reply B"], a_replies)
            device_a.subscribe(TOPICS["reply A"], a_replies)
            worker.publish(TOPICS["reply B"], raw(b"for B"), qos=1, retain=False)
            worker.publish(TOPICS["reply A"], raw(b"for A"), qos=1, retain=False)
            assert b_replies.arrived.get(timeout=5) == (TOPICS["reply B"], b"for B")  # B is still connected
            assert a_replies.until(b"for A") == []
        log = prod_broker.log_since(log_start)
        assert log.count(f"as {DEVICE_B} (") == 1 and f"as {DEVICE_A} (" in log  # A's connection was named pi-a


@pytest.mark.broker
def test_only_the_device_publishes_its_results_and_only_it_reads_its_replies(fleet, prod_broker, observer) -> None:
    """The reply route of issue 18: a worker answers on the device's reply topic, never on its result topic."""
    observer_link, _ = observer
    own, other, results = Collector(), Collector(), Collector()
    with (
        tls_link(prod_broker, fleet.client_dir(WORKER)) as worker,
        tls_link(prod_broker, fleet.client_dir(DEVICE_A)) as device_a,
        tls_link(prod_broker, fleet.client_dir(DEVICE_B)) as device_b,
        tls_link(prod_broker, fleet.client_dir(CONSUMER)) as consumer,
    ):
        device_a.subscribe(TOPICS["reply A"], own)
        device_b.subscribe(TOPICS["reply A"], other)
        device_b.subscribe(TOPICS["reply B"], other)  # for its sentinel
        consumer.subscribe(RESULT.filter(), results)
        consumer.subscribe(REPLY.filter(), results)
        with pytest.raises(PublishRefused, match="Not authorized"):
            worker.publish(TOPICS["result A"], raw(b"worker result"), qos=1, retain=False)
        worker.publish(TOPICS["reply A"], raw(b"worker reply"), qos=1, retain=False)
        assert own.arrived.get(timeout=5) == (TOPICS["reply A"], b"worker reply")
        device_a.publish(TOPICS["result A"], raw(b"device result"), qos=1, retain=False)
        # Each sentinel is published after the broker acknowledged what it follows, so it arrives after whatever
        # of that its reader may read.
        observer_link.publish(TOPICS["reply A"], raw(b"reply sentinel"), qos=1, retain=False)
        observer_link.publish(TOPICS["reply B"], raw(b"b sentinel"), qos=1, retain=False)
        observer_link.publish(TOPICS["result A"], raw(b"result sentinel"), qos=1, retain=False)
        assert own.until(b"reply sentinel") == []
        assert other.until(b"b sentinel") == []  # B reads its own replies, not A's
        assert results.until(b"result sentinel") == [(TOPICS["result A"], b"device result")]


WILL_CLIENT = """
import sys, time
from common.mqtt import BrokerSettings, MqttLink, TlsSettings
from schemas.status import DeviceState, DeviceStatus
folder, port, owner = sys.argv[1:]
will = DeviceStatus(device_id=owner, state=DeviceState.OFFLINE, software_version="9.9.9", model_version=None)
tls = TlsSettings.from_folder(folder)
MqttLink("will-test", BrokerSettings(host="localhost", port=int(port), tls=tls), will=will)
print("connected", flush=True)
time.sleep(60)
"""


def wills_left_by_a_killed_device(broker: Broker, folder: Path, owner: str, observer) -> list[str]:
    """Connect as ``folder``'s client with a Last Will on ``owner``'s status, SIGKILL it; the wills that arrive."""
    observer_link, collector = observer
    log_start = broker.log_size()
    client = subprocess.Popen(
        [sys.executable, "-c", WILL_CLIENT, str(folder), str(broker.port), owner],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert client.stdout.readline().strip() == "connected"
    finally:
        client.kill()
        client.wait()
    # The broker sends the will (if allowed) when it sees the connection drop, before logging it.
    assert wait_until(lambda: "closed its connection" in broker.log_since(log_start), 10)
    sentinel = uuid.uuid4().hex.encode()
    observer_link.publish(SENTINEL_TOPIC, raw(sentinel), qos=1, retain=False)
    return [
        json.loads(payload)["device_id"]
        for topic, payload in collector.until(sentinel)
        if topic.endswith("/status") and b"9.9.9" in payload
    ]


@pytest.mark.broker
@pytest.mark.subprocess
def test_device_a_cannot_leave_a_last_will_on_device_b_s_status(fleet, prod_broker, observer) -> None:
    # Mosquitto 2.0.11 accepts the CONNECT, but the will is checked when it is published.
    client = fleet.client_dir(DEVICE_A)
    assert wills_left_by_a_killed_device(prod_broker, client, DEVICE_B, observer) == []
    assert wills_left_by_a_killed_device(prod_broker, client, DEVICE_A, observer) == [DEVICE_A]  # its own works


def handshake(broker: Broker, context: ssl.SSLContext) -> str:
    """The TLS version a raw handshake with the broker negotiates (and the broker accepts)."""
    with (
        socket.create_connection(("127.0.0.1", broker.port), timeout=5) as plain,
        context.wrap_socket(plain, server_hostname="localhost") as tls,
    ):
        # TLS 1.3 sends the broker's verdict on the client certificate after the handshake: read to see it.
        tls.sendall(b"\x10\x00")  # a bad CONNECT; the broker closes, but only after accepting the certificate
        try:
            tls.recv(1)
        except ssl.SSLError as error:
            raise ssl.SSLError(f"refused after the handshake: {error}") from None
        except ConnectionError:
            pass  # closed for the bad CONNECT, with the certificate accepted
        return tls.version()


def client_context(folder: Path, *, minimum=None, maximum=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    return context


@pytest.mark.broker
def test_tls_1_3_is_preferred_and_1_2_is_the_minimum(fleet, prod_broker) -> None:
    folder = fleet.client_dir(DEVICE_A)
    assert handshake(prod_broker, client_context(folder)) == "TLSv1.3"
    assert handshake(prod_broker, client_context(folder, maximum=ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is deprecated: that is the point
        old = client_context(folder, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that it is the broker, not this client, that refuses TLS 1.1
    with pytest.raises(ssl.SSLError):
        handshake(prod_broker, old)


@pytest.mark.broker
@pytest.mark.slow
def test_plaintext_anonymous_unknown_ca_and_expired_certificates_are_refused(fleet, prod_broker, tmp_path) -> None:
    plain = BrokerSettings(host="localhost", port=prod_broker.port, connect_timeout_s=5.0)
    with pytest.raises(BrokerUnavailable):
        MqttLink("plaintext", plain)
    no_certificate = TlsSettings(ca_file=str(fleet.client_dir(DEVICE_A) / "ca.pem"))
    with pytest.raises(BrokerUnavailable, match="before CONNACK"):
        MqttLink(DEVICE_A, BrokerSettings(host="localhost", port=prod_broker.port, tls=no_certificate))
    rogue_ca = CertificateAuthority.create("rogue", days=30)
    rogue = client_files(rogue_ca, tmp_path / "rogue", DEVICE_A, days=30)
    (rogue / "ca.pem").write_bytes(certificate_pem(fleet.ca.certificate))  # it trusts the broker; not vice versa
    with pytest.raises(BrokerUnavailable, match="before CONNACK"):
        tls_link(prod_broker, rogue)
    expired = client_files(
        fleet.ca, tmp_path / "expired", DEVICE_A, days=1, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    )
    log_start = prod_broker.log_size()
    # The client sees the connection closed (with or without the alert, as TLS 1.3 timing has it)...
    with pytest.raises(BrokerUnavailable, match="before CONNACK"):
        tls_link(prod_broker, expired)
    # ...and the broker says it refused the certificate.
    assert "certificate verify failed" in prod_broker.log_since(log_start)
    # And the real one still connects.
    with tls_link(prod_broker, fleet.client_dir(DEVICE_A)):
        pass


@pytest.mark.broker
def test_a_certificate_the_acl_does_not_know_can_do_nothing(fleet, prod_broker, observer, tmp_path) -> None:
    """Valid CA, valid dates, but not provisioned (or removed from the ACL): connected, and powerless."""
    stranger = client_files(fleet.ca, tmp_path / "pi-stranger", "pi-stranger", days=1)
    observer_link, collector = observer
    own = Collector()
    with tls_link(prod_broker, stranger) as link:
        link.subscribe(REPLY.topic(device_id="pi-stranger"), own)
        with pytest.raises(PublishRefused, match="Not authorized"):
            link.publish(UTTERANCE.topic(device_id="pi-stranger"), raw(b"x"), qos=1, retain=False)
        observer_link.publish(REPLY.topic(device_id="pi-stranger"), raw(b"answer"), qos=1, retain=False)
        observer_link.publish(SENTINEL_TOPIC, raw(b"stranger sentinel"), qos=1, retain=False)
        assert not [item for item in collector.until(b"stranger sentinel") if item[0].endswith("pi-stranger/utterance")]
        assert own.arrived.empty()


def digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def provision_cli(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "firmware_tools", "provision", *args], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def copy_client(folder: Path, to: Path) -> Path:
    to.mkdir()
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_reissue_and_revoke_touch_only_their_device(keys, tmp_path) -> None:
    fleet = provision_fleet(tmp_path / "fleet", keys["fleet.pub"])
    before_b, before_ca = digest(fleet.client_dir(DEVICE_B)), digest(fleet.folder / "ca")
    old_a = copy_client(fleet.client_dir(DEVICE_A), tmp_path / "old-pi-a")
    with Broker(data_dir=tmp_path / "broker", config=PROD_CONFIG, tls_dir=fleet.folder / "broker") as broker:
        connected_b = tls_link(broker, fleet.client_dir(DEVICE_B))
        try:
            outcome = provision_cli("--fleet-dir", str(fleet.folder), "--reissue", DEVICE_A)
            assert outcome["reissued"] == [DEVICE_A] and outcome["clients"] == 5 and not outcome["ca_created"]
            assert digest(fleet.client_dir(DEVICE_B)) == before_b and digest(fleet.folder / "ca") == before_ca
            assert digest(old_a)["key.pem"] != digest(fleet.client_dir(DEVICE_A))["key.pem"]
            broker.reload()  # the CRL and the ACL are re-read
            with pytest.raises(BrokerUnavailable, match="before CONNACK"):
                tls_link(broker, old_a)
            with tls_link(broker, fleet.client_dir(DEVICE_A)) as new_a:
                new_a.publish(TOPICS["utterance A"], raw(b"new key"), qos=1, retain=False)
            connected_b.publish(TOPICS["utterance B"], raw(b"still connected"), qos=1, retain=False)
            connected_b.close()
            # A new connection with B's unchanged certificate (the client id is the CN, so one at a time).
            connected_b = tls_link(broker, fleet.client_dir(DEVICE_B))
            connected_b.publish(TOPICS["utterance B"], raw(b"reconnected"), qos=1, retain=False)

            # A stolen device B: its files, taken before the revocation.
            stolen_b = copy_client(fleet.client_dir(DEVICE_B), tmp_path / "stolen-pi-b")
            outcome = provision_cli("--fleet-dir", str(fleet.folder), "--revoke", DEVICE_B)
            assert outcome["revoked"] == [DEVICE_B] and outcome["clients"] == 4
            assert f"user {DEVICE_B}" not in (fleet.folder / "broker" / "acl").read_text()
            assert not fleet.client_dir(DEVICE_B).exists()
            broker.reload()
            # Out of the ACL: even the connection it already had can no longer publish...
            with pytest.raises(PublishRefused, match="Not authorized"):
                connected_b.publish(TOPICS["utterance B"], raw(b"after revocation"), qos=1, retain=False)
        finally:
            connected_b.close()
        # ...and in the CRL: a new connection with its certificate is refused.
        with pytest.raises(BrokerUnavailable, match="before CONNACK"):
            tls_link(broker, stolen_b)
        with tls_link(broker, fleet.client_dir(DEVICE_A)):
            pass


def test_provision_refuses_unclear_requests_and_changes_nothing(keys, tmp_path) -> None:
    fleet = provision_fleet(tmp_path / "fleet", keys["fleet.pub"])
    inventory = (fleet.folder / "inventory.json").read_bytes()
    again = Fleet(fleet.folder, ProvisionSettings())
    for request, message in (
        ({"clients": parse_clients(Role.WORKER, [DEVICE_A])}, "already a device"),
        ({"clients": [], "reissue": ["pi-nobody"]}, "not provisioned: pi-nobody"),
        ({"clients": [], "revoke": [DEVICE_A], "reissue": [DEVICE_A]}, "named more than once"),
        ({"clients": [], "channel": "no/slashes"}, "channel"),
    ):
        with pytest.raises(ProvisionError, match=message):
            again.provision(**request)
    with pytest.raises(ProvisionError, match="device id"):
        parse_clients(Role.DEVICE, ["pi/+"])
    with pytest.raises(ProvisionError, match="--signing-key"):
        Fleet(tmp_path / "new", ProvisionSettings()).provision(parse_clients(Role.DEVICE, ["pi-x"]))
    assert (fleet.folder / "inventory.json").read_bytes() == inventory
    assert not (tmp_path / "new").exists()


@pytest.mark.subprocess
def test_provisioning_again_keeps_keys_and_the_ca(keys, tmp_path) -> None:
    fleet = provision_fleet(tmp_path / "fleet", keys["fleet.pub"])
    before = {name: digest(fleet.client_dir(name)) for name in (DEVICE_A, WORKER)}
    ca = digest(fleet.folder / "ca")
    server_before = digest(fleet.folder / "broker")["server.pem"]
    outcome = provision_cli("--fleet-dir", str(fleet.folder), "--device", DEVICE_A, "--worker", WORKER)
    assert outcome["refreshed"] == [DEVICE_A, WORKER] and outcome["created"] == []
    assert {name: digest(fleet.client_dir(name)) for name in (DEVICE_A, WORKER)} == before
    assert digest(fleet.folder / "ca") == ca
    assert digest(fleet.folder / "broker")["server.pem"] == server_before
    assert (fleet.folder / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (fleet.client_dir(DEVICE_A) / "key.pem").stat().st_mode & 0o777 == 0o600
    settings = load_settings(fleet.client_dir(DEVICE_A) / "device.toml")
    assert settings.device_id == DEVICE_A and settings.broker.port == 8883
    assert settings.broker.tls.cert_file == str(fleet.client_dir(DEVICE_A) / "cert.pem")
    assert settings.ota.public_key == str(fleet.client_dir(DEVICE_A) / "signing.pub")


@pytest.mark.broker
@pytest.mark.subprocess
def test_a_provisioned_device_runs_over_tls_end_to_end(fleet, prod_broker, observer, tmp_path) -> None:
    """The real device process, with provision's device.toml: its status and its edge result reach the fleet."""
    config = fleet.client_dir(DEVICE_B) / "device-test.toml"
    text = (fleet.client_dir(DEVICE_B) / "device.toml").read_text().replace("port = 8883", f"port = {prod_broker.port}")
    state = tmp_path / "state"
    text = text.replace("[ota]\n", f'[ota]\nstate_dir = "{state}"\n')
    config.write_text(text + f'\n[audio]\nsource = "file"\nfiles = ["{IN_VOCABULARY_SAMPLE}"]\n')
    results, statuses = Collector(), Collector()
    with (
        tls_link(prod_broker, fleet.client_dir(CONSUMER)) as consumer,
        tls_link(prod_broker, fleet.client_dir(OPERATOR)) as operator,
    ):
        consumer.subscribe(RESULT.filter(), results)
        operator.subscribe(STATUS.topic(device_id=DEVICE_B), statuses)
        done = subprocess.run(
            [sys.executable, "-m", "device", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        topic, payload = results.arrived.get(timeout=10)
        result = decode(topic, Envelope(payload=payload, content_type="application/json"))
        assert isinstance(result, Result) and result.device_id == DEVICE_B
        assert result.intent == "lights_on" and result.source == "edge" and result.acted
        seen = []
        while not statuses.arrived.empty():
            seen.append(json.loads(statuses.arrived.get()[1]))
        assert {status["state"] for status in seen} >= {"online"}
        assert all(status["device_id"] == DEVICE_B for status in seen)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_a_worker_answers_a_device_over_tls_with_their_certificates(fleet, prod_broker, transcriber, tmp_path) -> None:
    """The real worker (its shared subscription, results) and `device send --tls`, with provisioned certificates."""
    from cloud_worker.service import UtteranceService
    from cloud_worker.settings import WorkerSettings
    from cloud_worker.storage import StorageSettings

    broker = BrokerSettings(
        host="localhost", port=prod_broker.port, tls=TlsSettings.from_folder(str(fleet.client_dir(WORKER)))
    )
    settings = WorkerSettings(
        broker=broker, worker_id=WORKER, storage=StorageSettings(url=f"sqlite:///{tmp_path / 'worker.sqlite3'}")
    )
    service = UtteranceService(settings, transcriber=transcriber).start()
    try:
        connection = ["--host", "localhost", "--port", str(prod_broker.port), "--tls", str(fleet.client_dir(DEVICE_A))]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "device",
                "send",
                "--device-id",
                DEVICE_A,
                *connection,
                str(OUT_OF_VOCABULARY_SAMPLE),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        service.stop()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[0])["result"]
    assert result["device_id"] == DEVICE_A and result["source"] == "cloud"
    assert "weather" in result["transcript"].lower()


def test_a_broker_certificate_close_to_expiry_is_renewed_by_the_next_run(keys, tmp_path) -> None:
    Fleet(tmp_path, ProvisionSettings(client_days=20)).provision([], signing_key=keys["fleet.pub"])
    first = digest(tmp_path / "broker")["server.pem"]
    Fleet(tmp_path, ProvisionSettings()).provision([])
    renewed = digest(tmp_path / "broker")["server.pem"]
    assert renewed != first  # 20 days left is within the 30-day margin
    Fleet(tmp_path, ProvisionSettings()).provision([])
    assert digest(tmp_path / "broker")["server.pem"] == renewed  # now 825 days: kept


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_retire_on_the_production_broker_needs_the_gone_worker_s_own_certificate(fleet, prod_broker) -> None:
    # The production broker takes a certificate's name as the client id: retiring worker-1 with the operator's
    # certificate would end the operator's session, so it is refused before connecting.
    def retire(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "cloud_worker", "retire", "--worker-id", WORKER, "--host", "localhost",
             "--port", str(prod_broker.port), "--tls", str(folder)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    with tls_link(prod_broker, fleet.client_dir(WORKER), clean_start=False, session_expiry_s=600) as gone:
        gone.subscribe(f"$share/mqvox-workers/{UTTERANCE.filter()}", Collector())
    wrong = retire(fleet.client_dir(OPERATOR))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert f"the broker knows this certificate as '{OPERATOR}'" in wrong.stderr
    assert f"not '{WORKER}''s" in wrong.stderr
    right = retire(fleet.client_dir(WORKER))
    assert right.returncode == 0, right.stderr
    assert json.loads(right.stdout) == {"retired": WORKER, "client_id": WORKER}


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.subprocess
def test_a_publish_the_acl_refuses_is_a_clear_error(fleet, prod_broker, keys, tmp_path) -> None:
    # A device's certificate may not publish models: one line and exit 2, not a traceback.
    refused = subprocess.run(
        [sys.executable, "-m", "firmware_tools", "publish", "--model", "device/models/default",
         "--key", str(keys["fleet.key"]), "--database", f"sqlite:///{tmp_path}/registry.sqlite3",
         "--host", "localhost", "--port", str(prod_broker.port), "--tls", str(fleet.client_dir(DEVICE_A))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("error: ") and "Traceback" not in refused.stderr
    assert "Not authorized" in refused.stderr
