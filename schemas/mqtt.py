"""The protocol's MQTT 5 binding: one connection that publishes and receives mqvox messages.

Publishing waits for the broker's PUBACK and raises if the broker refused the
message, so a sender always knows whether its message is in the broker's hands.
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from schemas.envelope import Envelope
from schemas.protocol import Message, encode
from schemas.topics import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, refused the connection, or did not answer in time."""


class PublishRefused(RuntimeError):
    """A publish or subscription the broker refused, or one refused before sending because the broker would."""


TLS_CA_FILE = "ca.pem"
TLS_CERT_FILE = "cert.pem"
TLS_KEY_FILE = "key.pem"
"""The files of a client folder written by ``firmware_tools provision``: CA, certificate and private key."""


@dataclass(frozen=True)
class TlsSettings:
    """TLS towards the broker: the CA that signed the broker's certificate, and this client's own certificate."""

    ca_file: str
    """PEM file of the CA certificate(s) the broker's certificate must chain to."""
    cert_file: str | None = None
    """PEM file of this client's certificate, for brokers that require one (its CN is the client's identity)."""
    key_file: str | None = None
    """PEM file of the private key of ``cert_file``; None when the key is inside ``cert_file``."""

    @classmethod
    def from_folder(cls, folder: str) -> TlsSettings:
        """The CA, certificate and key of a client folder written by ``firmware_tools provision``."""
        return cls(f"{folder}/{TLS_CA_FILE}", f"{folder}/{TLS_CERT_FILE}", f"{folder}/{TLS_KEY_FILE}")

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate and host name verified, TLS 1.2 at least."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file is not None:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            raise BrokerUnavailable(f"cannot use the TLS files {self}: {error}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how long to wait for it."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port."""
    keepalive_s: int = 30
    """MQTT keep-alive (seconds); the Last Will fires after about 1.5 times this without traffic."""
    connect_timeout_s: float = 10.0
    """How long to wait for CONNACK (seconds)."""
    tls: TlsSettings | None = None
    """TLS settings; None for a plain TCP connection (the loopback development broker)."""


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line options of BrokerSettings, for every entry point that connects."""
    parser.add_argument("--host", default=BrokerSettings.host, help="MQTT broker host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=BrokerSettings.port, help="MQTT broker port (default: %(default)s)")
    parser.add_argument(
        "--tls",
        metavar="DIR",
        help=f"connect with TLS, with the {TLS_CA_FILE}, {TLS_CERT_FILE} and {TLS_KEY_FILE} of this client folder "
        "(firmware_tools provision); default: plain TCP",
    )


def broker_from_arguments(args: argparse.Namespace) -> BrokerSettings:
    """BrokerSettings from options added by add_broker_arguments."""
    tls = TlsSettings.from_folder(args.tls) if args.tls else None
    return BrokerSettings(host=args.host, port=args.port, tls=tls)


MessageHandler = Callable[[str, Envelope], None]
"""Called with (topic, envelope) for each message matching its subscription, on paho's network thread."""


@dataclass(frozen=True)
class Delivery:
    """A message received on a link with manual acknowledgement: the broker redelivers it until ``ack()``."""

    topic: str
    """The topic it was published on."""
    envelope: Envelope
    """Its payload and MQTT 5 properties."""
    ack: Callable[[], None]
    """Send the PUBACK (QoS 1): call once the message's effects are stored; a no-op for QoS 0."""


DeliveryHandler = Callable[[Delivery], None]
"""Called with each Delivery of a ``consume`` subscription, on paho's network thread."""


class MqttLink:
    """One MQTT 5 client connection, started and connected on construction."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerSettings,
        *,
        will: Message | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        manual_ack: bool = False,
    ) -> None:
        """``manual_ack``: messages of ``consume`` subscriptions are acknowledged by their Delivery's ``ack``,
        those of ``subscribe`` ones as soon as their handler returns."""
        self.client_id = client_id
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self._manual_ack = manual_ack
        self._client.manual_ack_set(manual_ack)
        self._connected = threading.Event()
        self._connect_reason: str | None = None
        self._lock = threading.RLock()
        self._acks: dict[int, tuple[threading.Event, list]] = {}
        self._subscribed: dict[int, tuple[threading.Event, list]] = {}
        self._client.on_connect = self._handle_connect
        self._client.on_publish = self._handle_publish
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_log = self._handle_log
        self._last_error: str | None = None
        if will is not None:
            topic, envelope = encode(will)
            self._client.will_set(
                topic, envelope.payload, qos=will.spec.qos, retain=will.spec.retain, properties=envelope.properties()
            )
        if broker.tls is not None:
            self._client.tls_set_context(broker.tls.context())
        connect_properties = Properties(PacketTypes.CONNECT)
        connect_properties.SessionExpiryInterval = session_expiry_s
        try:
            self._client.connect(
                broker.host,
                broker.port,
                keepalive=broker.keepalive_s,
                clean_start=clean_start,
                properties=connect_properties,
            )
        except OSError as error:
            raise BrokerUnavailable(f"cannot reach MQTT broker at {broker.host}:{broker.port}: {error}") from error
        self._client.loop_start()
        if not self._connected.wait(broker.connect_timeout_s) or self._connect_reason is not None:
            self._client.loop_stop()
            self._client.disconnect()
            reason = self._connect_reason or f"no CONNACK within {broker.connect_timeout_s} s"
            raise BrokerUnavailable(f"MQTT broker at {broker.host}:{broker.port} refused {client_id!r}: {reason}")

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # paho leaves Nagle's algorithm on; with delayed ACKs it adds ~40 ms to each
        # small request/response exchange (bench/protocol.py measures it).
        connection = client.socket()
        if isinstance(connection, socket.socket) and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connect_reason = None if not reason_code.is_failure else str(reason_code)
        self._connected.set()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._connected.is_set():
            # Closed before any CONNACK: with TLS, the broker refused the certificate (unknown CA,
            # expired, revoked). Fail now, with the socket's error, rather than wait out the timeout.
            detail = self._last_error or str(reason_code)
            self._connect_reason = f"connection closed before CONNACK: {detail}"
            self._connected.set()

    def _handle_log(self, client, userdata, level, message) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._last_error = message

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            waiter = self._acks.pop(mid, None)
        if waiter is not None:
            waiter[1].append(reason_code)
            waiter[0].set()

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            waiter = self._subscribed.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(reason_codes)
            waiter[0].set()

    def _deliver(self, handler: MessageHandler, message: paho.MQTTMessage) -> None:
        try:
            handler(message.topic, Envelope.from_mqtt(message.payload, message.properties))
        except Exception:
            # A handler bug must not kill paho's network thread and with it the connection.
            log.exception("message handler failed", extra={"topic": message.topic})
        finally:
            if self._manual_ack:
                self._ack(message.mid, message.qos)

    def _hand_over(self, handler: DeliveryHandler, message: paho.MQTTMessage) -> None:
        mid, qos = message.mid, message.qos
        delivery = Delivery(
            message.topic, Envelope.from_mqtt(message.payload, message.properties), lambda: self._ack(mid, qos)
        )
        try:
            handler(delivery)
        except Exception:
            log.exception("message handler failed", extra={"topic": message.topic})

    def _ack(self, mid: int, qos: int) -> None:
        if qos > 0 and self._manual_ack:
            self._client.ack(mid, qos)

    def publish(self, topic: str, envelope: Envelope, *, qos: int, retain: bool, timeout_s: float = 10.0) -> None:
        """Publish and, for QoS > 0, wait for the PUBACK; raise PublishRefused or TimeoutError otherwise.

        Payloads over the broker's message_size_limit are refused here, before sending:
        Mosquitto 2.0.11 answers them with PUBACK reason 0x95, which paho 2.2.0 reads
        as a malformed packet, then reconnects and re-sends the message forever.
        """
        if len(envelope.payload) > MAX_PAYLOAD_BYTES:
            raise PublishRefused(
                f"payload of {len(envelope.payload)} bytes to {topic!r} is over the broker limit of {MAX_PAYLOAD_BYTES}"
            )
        done = threading.Event()
        outcome: list = []
        with self._lock:
            info = self._client.publish(
                topic, envelope.payload, qos=qos, retain=retain, properties=envelope.properties()
            )
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise PublishRefused(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
            if qos == 0:
                return
            self._acks[info.mid] = (done, outcome)
        if not done.wait(timeout_s):
            with self._lock:
                self._acks.pop(info.mid, None)
            raise TimeoutError(f"no PUBACK for {topic!r} within {timeout_s} s")
        if outcome[0].is_failure:
            raise PublishRefused(f"broker refused publish to {topic!r}: {outcome[0]}")

    def send(self, message: Message, *, timeout_s: float = 10.0) -> None:
        """Validate, encode and publish ``message`` with its topic's QoS and retained flag."""
        topic, envelope = encode(message)
        self.publish(topic, envelope, qos=message.spec.qos, retain=message.spec.retain, timeout_s=timeout_s)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe, route matching messages to ``handler``, and wait for the SUBACK.

        Raises PublishRefused if the broker refused the subscription. The handler runs
        on paho's network thread: it must not block, and must not wait for a PUBACK.
        """
        self._subscribe(topic_filter, lambda client, userdata, message: self._deliver(handler, message), qos, timeout_s)

    def consume(self, topic_filter: str, handler: DeliveryHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe as ``subscribe`` does, handing each message over as a Delivery to acknowledge later.

        Needs a link made with ``manual_ack=True``: the broker then keeps each message
        in flight, and redelivers it to a persistent session, until its ``ack()``.
        """
        if not self._manual_ack:
            raise ValueError("consume() needs a link made with manual_ack=True")
        self._subscribe(
            topic_filter, lambda client, userdata, message: self._hand_over(handler, message), qos, timeout_s
        )

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` to its handler at once, and ask the broker to stop sending it."""
        self._client.message_callback_remove(_route(topic_filter))
        rc, _ = self._client.unsubscribe(topic_filter)
        if rc != paho.MQTT_ERR_SUCCESS:
            log.warning("unsubscribe from %r failed: %s", topic_filter, paho.error_string(rc))

    def _subscribe(self, topic_filter: str, callback, qos: int, timeout_s: float) -> None:
        route = _route(topic_filter)
        self._client.message_callback_add(route, callback)
        done = threading.Event()
        outcome: list = []
        with self._lock:
            rc, mid = self._client.subscribe(topic_filter, qos=qos)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise PublishRefused(f"subscribe to {topic_filter!r} failed: {paho.error_string(rc)}")
            self._subscribed[mid] = (done, outcome)
        if not done.wait(timeout_s):
            with self._lock:
                self._subscribed.pop(mid, None)
            raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout_s} s")
        if outcome[0].is_failure:
            raise PublishRefused(f"broker refused subscription to {topic_filter!r}: {outcome[0]}")

    def close(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _route(topic_filter: str) -> str:
    """The filter paho matches incoming topics against: a shared subscription's arrive without '$share/<group>/'."""
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
