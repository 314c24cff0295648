"""The protocol's MQTT 5 binding: one connection that publishes and receives mqvox messages.

Publishing waits for the broker's PUBACK and raises if the broker refused the
message, so a sender always knows whether its message is in the broker's hands.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from schemas.envelope import Envelope
from schemas.protocol import Message, encode
from schemas.topics import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, refused the connection, or did not answer in time."""


class PublishRefused(RuntimeError):
    """A publish or subscription the broker refused, or one refused before sending because the broker would."""


class NotAuthorized(PublishRefused):
    """A publish or subscription the broker's ACL refused this client (MQTT 5 reason 0x87)."""


class NoMatchingSubscribers(Exception):
    """The broker accepted a QoS 1 message but had no subscription to give it to (PUBACK reason 0x10): it is gone.

    Not a failure for a publish/subscribe message; a request whose consumer is not subscribed right now (the
    workers after a broker restart, before they subscribe again) is lost unless its sender keeps it and retries.
    """


NO_MATCHING_SUBSCRIBERS = 0x10
"""MQTT 5 PUBACK reason: accepted, and delivered to no one; Mosquitto 2 sends it to MQTT 5 publishers."""

NOT_AUTHORIZED = 0x87
"""MQTT 5 PUBACK or SUBACK reason: the broker's ACL does not let this client publish or read the topic."""


def _refusal(reason: int, message: str) -> PublishRefused:
    """The error for a PUBACK or SUBACK failure ``reason``: NotAuthorized for the ACL's refusal."""
    return (NotAuthorized if reason == NOT_AUTHORIZED else PublishRefused)(message)


SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason: another client connected with this client id, and the broker closed this one."""

MAX_UNROUTED = 1000
"""Messages held for a handler not registered yet; beyond, they are dropped (unacknowledged, so sent again)."""

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
"""Backoff (seconds) between reconnection attempts: doubling from the first to the second, paho's own."""


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
        if not os.path.isdir(folder):
            raise BrokerUnavailable(
                f"TLS folder {folder} {'is not a folder' if os.path.exists(folder) else 'does not exist'}: give a "
                f"client folder of firmware_tools provision, with {TLS_CA_FILE}, {TLS_CERT_FILE} and {TLS_KEY_FILE}"
            )
        return cls(f"{folder}/{TLS_CA_FILE}", f"{folder}/{TLS_CERT_FILE}", f"{folder}/{TLS_KEY_FILE}")

    def identity(self) -> str | None:
        """The CN of this client's certificate: the name the production broker knows it by, as its user name and
        its client id (use_username_as_clientid), whatever client id it asks for. None without a certificate.

        Raises BrokerUnavailable when the certificate is missing or not a certificate."""
        if self.cert_file is None:
            return None
        certificate = _check_pem(self.cert_file, "client certificate", x509.load_pem_x509_certificate)
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else None

    def context(self) -> ssl.SSLContext:
        """A client context: the broker's certificate and host name verified, TLS 1.2 at least.

        Raises BrokerUnavailable naming the file that is missing, unreadable or not what it should be.
        """
        _check_pem(self.ca_file, "CA certificate", x509.load_pem_x509_certificates)
        if self.cert_file is not None:
            _check_pem(self.cert_file, "client certificate", x509.load_pem_x509_certificate)
        if self.key_file is not None:
            _check_pem(self.key_file, "private key", lambda data: serialization.load_pem_private_key(data, None))
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except ssl.SSLError as error:
            raise BrokerUnavailable(f"TLS: cannot use the CA certificate {self.ca_file}: {error.reason}") from None
        if self.cert_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as error:
                if error.reason == "KEY_VALUES_MISMATCH":
                    problem = f"the private key {self.key_file} is not the key of the certificate {self.cert_file}"
                else:
                    problem = f"cannot use the certificate {self.cert_file} with its key: {error.reason or error}"
                raise BrokerUnavailable(f"TLS: {problem}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


_Loaded = TypeVar("_Loaded")


def _check_pem(path: str, what: str, load: Callable[[bytes], _Loaded]) -> _Loaded:
    """What ``load`` reads in ``path``; BrokerUnavailable unless it is a readable file that ``load`` reads as
    ``what``."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BrokerUnavailable(f"TLS: the {what} {path} does not exist") from None
    except OSError as error:
        raise BrokerUnavailable(f"TLS: cannot read the {what} {path}: {error.strerror}") from None
    try:
        return load(data)
    except TypeError:
        # cryptography's answer to a key that needs a password.
        raise BrokerUnavailable(f"TLS: the {what} {path} is encrypted; mqvox needs it unencrypted") from None
    except ValueError:
        raise BrokerUnavailable(f"TLS: the {what} {path} is not a valid PEM {what}") from None


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

    @property
    def address(self) -> str:
        """``host:port``, as messages name the broker."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def tls_hint(broker: BrokerSettings) -> str:
    """What to try when a plain connection to ``broker`` was reset or closed during the MQTT handshake."""
    return f"the broker at {broker.address} may require TLS: pass --tls DIR (a device: [broker.tls] in its config)"


def connection_failure(error: OSError, broker: BrokerSettings) -> str:
    """Why a connection to ``broker`` failed, in one line that says what to check."""
    address = broker.address
    if isinstance(error, socket.gaierror):
        return f"cannot resolve host {broker.host!r} ({error.strerror})"
    if isinstance(error, ConnectionRefusedError):
        return f"connection refused at {address} (is the broker running?)"
    if isinstance(error, TimeoutError):
        return (
            f"connection to {address} timed out after {broker.connect_timeout_s:g} s "
            "(is the address right, and the port open in its firewall?)"
        )
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"TLS handshake with {address} failed: the broker's certificate does not verify against "
            f"{broker.tls.ca_file if broker.tls else 'the CA file'}: {error.verify_message}"
        )
    if isinstance(error, (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError)):
        if broker.tls is None:
            return f"connection reset by {address}: {tls_hint(broker)}"
        return f"connection reset by {address} during the TLS handshake (does this port speak TLS?)"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake with {address} failed: {error.reason or error}"
    return f"cannot connect to {address}: {error.strerror or error}"


MessageHandler = Callable[[str, Envelope], None]
"""Called with (topic, envelope) for each message matching its subscription, on paho's network thread."""


PublishDone = Callable[[Exception | None], None]
"""Called once per ``publish_later``: with None when the broker acknowledged, NoMatchingSubscribers when it accepted
the message but no one was subscribed, else with why it did not accept it."""

ConnectionListener = Callable[[bool], None]
"""Called on paho's network thread after every successful (re)connection, with the broker's session-present flag."""


@dataclass(frozen=True)
class Delivery:
    """A message received on a link with manual acknowledgement: the broker redelivers it until ``ack()``."""

    topic: str
    """The topic it was published on."""
    envelope: Envelope
    """Its payload and MQTT 5 properties."""
    ack: Callable[[], None]
    """Send the PUBACK (QoS 1): call once the message's effects are stored; a no-op for QoS 0, and for a message
    received on an earlier connection (the broker sends it again on the new one, and a PUBACK of its old packet
    id could acknowledge another message)."""


DeliveryHandler = Callable[[Delivery], None]
"""Called with each Delivery of a ``consume`` subscription, on paho's network thread."""


class MqttLink:
    """One MQTT 5 client connection, started on construction; paho reconnects it, with backoff, when it drops.

    Every subscription is made again on every reconnection, whether or not the broker says it kept the session:
    Mosquitto 2.0.11 reports a session restored from its persistence file as present, but restores no shared
    subscription into it.

    A message that arrives before its subscription's handler is registered (a resumed session's redeliveries,
    sent as soon as the broker accepts the connection) is held, and handed to the handler when it registers.
    """

    def __init__(
        self,
        client_id: str,
        broker: BrokerSettings,
        *,
        will: Message | None = None,
        clean_start: bool = True,
        session_expiry_s: int = 0,
        manual_ack: bool = False,
        require_connection: bool = True,
    ) -> None:
        """``manual_ack``: messages of ``consume`` subscriptions are acknowledged by their Delivery's ``ack``,
        those of ``subscribe`` ones as soon as their handler returns.

        ``clean_start`` False resumes the session the broker kept for this client id (its subscriptions and the
        messages queued while it was away), on the first connection and on every reconnection; the broker keeps it
        ``session_expiry_s`` after a disconnection.

        ``require_connection`` True raises BrokerUnavailable when the first connection fails or is refused; False
        waits at most ``broker.connect_timeout_s`` for it and then goes on, paho connecting in the background
        (a device starts and obeys local commands while its network is down)."""
        self.client_id = client_id
        self._broker = broker
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        self._manual_ack = manual_ack
        self._client.manual_ack_set(manual_ack)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._connected = threading.Event()
        self._connect_reason: str | None = None
        self._lock = threading.RLock()
        # PUBACK bookkeeping has a lock of its own, never held while calling paho: paho calls on_publish
        # holding its message lock, which its publish() takes too.
        self._ack_lock = threading.Lock()
        self._acks: dict[int, PublishDone] = {}
        self._early_acks: dict[int, Exception | None] = {}
        """Outcomes that arrived before their publish_later had registered, by packet id."""
        self._abandoned: set[int] = set()
        """Packet ids whose waiter gave up (publish timed out): their PUBACK, when it comes, is nobody's."""
        self._subscribed: dict[int, tuple[threading.Event, list]] = {}
        self._subscriptions: dict[str, int] = {}
        """Topic filter -> QoS of every subscription made, to be made again on each connection."""
        self._routes: dict[str, Callable[[paho.MQTTMessage, int], None]] = {}
        """Topic filter as paho matches it (see _route) -> the handler of its messages."""
        self._unrouted: list[tuple[paho.MQTTMessage, int]] = []
        """Messages, with their connection generation, that arrived before any handler matched them."""
        self._generation = 0
        """How many times this link has connected; a Delivery is acknowledged only on its own connection."""
        self._listeners: list[ConnectionListener] = []
        self._client.on_connect = self._handle_connect
        self._client.on_message = self._handle_message
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
        # paho's socket timeout bounds the TCP connection and the TLS handshake; the CONNACK wait is below.
        self._client.connect_timeout = broker.connect_timeout_s
        connect = dict(
            host=broker.host,
            port=broker.port,
            keepalive=broker.keepalive_s,
            clean_start=clean_start,
            properties=connect_properties,
        )
        # The first attempt is made here, not on paho's thread, so that its failure is known at once, with its cause
        # (paho's on_connect_fail is told neither): a refused connection must not read as a CONNACK timeout.
        try:
            self._client.connect(**connect)
        except OSError as error:
            reason = connection_failure(error, broker)
            if require_connection:
                raise BrokerUnavailable(f"cannot reach MQTT broker: {reason}") from error
            log.warning("not connected to the MQTT broker: %s; retrying in the background", reason)
            self._client.connect_async(**connect)  # paho's thread retries from the start, with backoff
            self._client.loop_start()
            return
        self._client.loop_start()
        if not self._connected.wait(broker.connect_timeout_s):
            self._connect_reason = (
                f"no CONNACK from the MQTT broker at {broker.address} within {broker.connect_timeout_s:g} s"
            )
        reason = self._connect_reason  # before disconnect(), whose callback would tell of the disconnection instead
        if reason is None:
            return
        if require_connection:
            self._client.loop_stop()
            self._client.disconnect()
            raise BrokerUnavailable(reason)
        log.warning("not connected to the MQTT broker yet: %s; retrying in the background", reason)

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (it may still drop before the next publish)."""
        return self._client.is_connected()

    def on_connection(self, listener: ConnectionListener) -> None:
        """Call ``listener`` after each connection from now on; it runs on paho's thread and must not block."""
        with self._lock:
            self._listeners.append(listener)

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        # paho leaves Nagle's algorithm on; with delayed ACKs it adds ~40 ms to each
        # small request/response exchange (bench/protocol.py measures it).
        connection = client.socket()
        if isinstance(connection, socket.socket) and connection.family in (socket.AF_INET, socket.AF_INET6):
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if reason_code.is_failure:
            self._connect_reason = (
                f"the MQTT broker at {self._broker.address} refused {self.client_id!r}: {reason_code}"
            )
            log.error("the MQTT broker refused %r: %s", self.client_id, reason_code)
            self._connected.set()
            return
        with self._lock:
            self._generation += 1
            if self._generation > 1:
                log.info(
                    "reconnected to the MQTT broker", extra={"detail": f"session present: {flags.session_present}"}
                )
            # Held messages of an earlier connection: the broker sends them again on this one.
            self._unrouted.clear()
            # Subscriptions made while disconnected, lost with a session the broker did not keep, or missing from
            # one it says it kept: made (again) now, without waiting for the SUBACK, since this is paho's thread.
            # Retain handling 1: retained messages only for a subscription that did not exist, not on every
            # reconnection.
            for topic_filter, qos in self._subscriptions.items():
                client.subscribe(topic_filter, options=SubscribeOptions(qos=qos, retainHandling=1))
            listeners = list(self._listeners)
        self._connect_reason = None
        self._connected.set()
        for listener in listeners:
            try:
                listener(bool(flags.session_present))
            except Exception:
                log.exception("connection listener failed")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if not self._connected.is_set():
            # Closed before any CONNACK: with TLS, the broker refused the certificate (unknown CA, expired,
            # revoked); without, a TLS listener reset what it took for a handshake. Fail now, with the socket's
            # error, rather than wait out the timeout.
            detail = self._last_error or str(reason_code)
            if self._broker.tls is None:
                hint = tls_hint(self._broker)
            else:
                hint = "it may have refused this client's certificate (signed by another CA, expired or revoked)"
            self._connect_reason = (
                f"the MQTT broker at {self._broker.address} closed the connection before CONNACK ({detail}): {hint}"
            )
            self._connected.set()
            return
        if reason_code.value == SESSION_TAKEN_OVER:
            log.error(
                "the broker closed %r: another client connected with the same client id; give each process its own",
                self.client_id,
            )
        elif reason_code.is_failure or reason_code.value != 0:
            log.warning("disconnected from the MQTT broker: %s; reconnecting", reason_code)

    def _handle_log(self, client, userdata, level, message) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._last_error = message

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        outcome: Exception | None = None
        if reason_code.is_failure:
            outcome = _refusal(reason_code.value, f"broker refused the publish: {reason_code}")
        elif reason_code.value == NO_MATCHING_SUBSCRIBERS:
            outcome = NoMatchingSubscribers(f"no subscriber: {reason_code}")
        with self._ack_lock:
            done = self._acks.pop(mid, None)
            if done is None:
                if mid in self._abandoned:
                    self._abandoned.discard(mid)
                else:
                    self._early_acks[mid] = outcome
        if done is not None:
            done(outcome)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            waiter = self._subscribed.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(reason_codes)
            waiter[0].set()

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        with self._lock:
            generation = self._generation
            handlers = [
                handler for route, handler in self._routes.items() if paho.topic_matches_sub(route, message.topic)
            ]
            if not handlers:
                if len(self._unrouted) < MAX_UNROUTED:
                    self._unrouted.append((message, generation))
                else:
                    # Unacknowledged (manual_ack), the broker sends it again on the next connection.
                    log.warning("dropped a message no subscription handles yet", extra={"topic": message.topic})
                return
        for handler in handlers:
            handler(message, generation)

    def _deliver(self, handler: MessageHandler, message: paho.MQTTMessage) -> None:
        try:
            handler(message.topic, Envelope.from_mqtt(message.payload, message.properties))
        except Exception:
            # A handler bug must not kill paho's network thread and with it the connection.
            log.exception("message handler failed", extra={"topic": message.topic})
        finally:
            if self._manual_ack:
                self._ack(message.mid, message.qos)

    def _hand_over(self, handler: DeliveryHandler, message: paho.MQTTMessage, generation: int) -> None:
        mid, qos = message.mid, message.qos
        delivery = Delivery(
            message.topic,
            Envelope.from_mqtt(message.payload, message.properties),
            lambda: self._ack(mid, qos, generation),
        )
        try:
            handler(delivery)
        except Exception:
            log.exception("message handler failed", extra={"topic": message.topic})

    def _ack(self, mid: int, qos: int, generation: int | None = None) -> None:
        if qos == 0 or not self._manual_ack:
            return
        with self._lock:
            if generation is not None and generation != self._generation:
                return  # received on an earlier connection: the broker has sent it again on this one
            self._client.ack(mid, qos)

    def publish(self, topic: str, envelope: Envelope, *, qos: int, retain: bool, timeout_s: float = 10.0) -> None:
        """Publish and, for QoS > 0, wait for the PUBACK; raise PublishRefused or TimeoutError otherwise.

        A message no one was subscribed to counts as published, as publish/subscribe has it; a sender that
        needs a consumer uses ``publish_later``, whose ``done`` tells it so.

        While the connection is down, a QoS 1 message waits in paho's queue and goes out
        on reconnection; a TimeoutError leaves it there, so it may still be delivered.

        Payloads over the broker's message_size_limit are refused here, before sending:
        Mosquitto 2.0.11 answers them with PUBACK reason 0x95, which paho 2.2.0 reads
        as a malformed packet, then reconnects and re-sends the message forever.
        """
        done = threading.Event()
        outcome: list[Exception | None] = []

        def finished(error: Exception | None) -> None:
            outcome.append(error)
            done.set()

        mid = self.publish_later(topic, envelope, qos=qos, retain=retain, done=finished)
        if mid is None:
            return
        if not done.wait(timeout_s):
            with self._ack_lock:
                if self._acks.pop(mid, None) is not None:
                    self._abandoned.add(mid)
            if not done.is_set():
                raise TimeoutError(f"no PUBACK for {topic!r} within {timeout_s} s")
        if outcome[0] is not None and not isinstance(outcome[0], NoMatchingSubscribers):
            refused = NotAuthorized if isinstance(outcome[0], NotAuthorized) else PublishRefused
            raise refused(f"publish to {topic!r}: {outcome[0]}")

    def publish_later(self, topic: str, envelope: Envelope, *, qos: int, retain: bool, done: PublishDone) -> int | None:
        """Hand the message to paho and return at once; ``done`` is called, on paho's thread, with the outcome.

        Returns the packet id that ``done`` waits on, or None for QoS 0 (``done`` is then called at once).
        While disconnected, a QoS 1 message waits in paho's queue, in order, until reconnection. Raises
        PublishRefused for a payload over the broker limit, or when paho cannot queue it.
        """
        if len(envelope.payload) > MAX_PAYLOAD_BYTES:
            raise PublishRefused(
                f"payload of {len(envelope.payload)} bytes to {topic!r} is over the broker limit of {MAX_PAYLOAD_BYTES}"
            )
        info = self._client.publish(topic, envelope.payload, qos=qos, retain=retain, properties=envelope.properties())
        # NO_CONN: queued by paho, sent when the connection is back (QoS > 0).
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN) or (
            qos == 0 and info.rc != paho.MQTT_ERR_SUCCESS
        ):
            raise PublishRefused(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos == 0:
            done(None)
            return None
        with self._ack_lock:
            arrived = info.mid in self._early_acks
            outcome = self._early_acks.pop(info.mid, None)
            if not arrived:
                self._acks[info.mid] = done
        if arrived:
            done(outcome)
        return info.mid

    def send(self, message: Message, *, timeout_s: float = 10.0) -> None:
        """Validate, encode and publish ``message`` with its topic's QoS and retained flag."""
        topic, envelope = encode(message)
        self.publish(topic, envelope, qos=message.spec.qos, retain=message.spec.retain, timeout_s=timeout_s)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe, route matching messages to ``handler``, and wait for the SUBACK.

        Raises PublishRefused if the broker refused the subscription. The handler runs
        on paho's network thread: it must not block, and must not wait for a PUBACK.
        """
        self._subscribe(topic_filter, lambda message, generation: self._deliver(handler, message), qos, timeout_s)

    def consume(self, topic_filter: str, handler: DeliveryHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe as ``subscribe`` does, handing each message over as a Delivery to acknowledge later.

        Needs a link made with ``manual_ack=True``: the broker then keeps each message
        in flight, and redelivers it to a persistent session, until its ``ack()``.
        """
        if not self._manual_ack:
            raise ValueError("consume() needs a link made with manual_ack=True")
        self._subscribe(
            topic_filter, lambda message, generation: self._hand_over(handler, message, generation), qos, timeout_s
        )

    def unsubscribe(self, topic_filter: str, *, keep_handling: bool = False) -> None:
        """Ask the broker to stop sending ``topic_filter``, and stop routing it to its handler at once, unless
        ``keep_handling``: a worker leaving a shared subscription still answers what the broker had already
        given it (its session's queue), which goes on arriving after the unsubscription."""
        with self._lock:
            if not keep_handling:
                self._routes.pop(_route(topic_filter), None)
            self._subscriptions.pop(topic_filter, None)
        rc, _ = self._client.unsubscribe(topic_filter)
        if rc != paho.MQTT_ERR_SUCCESS:
            log.warning("unsubscribe from %r failed: %s", topic_filter, paho.error_string(rc))

    def _subscribe(
        self, topic_filter: str, handler: Callable[[paho.MQTTMessage, int], None], qos: int, timeout_s: float
    ) -> None:
        route = _route(topic_filter)
        done = threading.Event()
        outcome: list = []
        with self._lock:
            self._routes[route] = handler
            held = [item for item in self._unrouted if paho.topic_matches_sub(route, item[0].topic)]
            self._unrouted = [item for item in self._unrouted if not paho.topic_matches_sub(route, item[0].topic)]
        for message, generation in held:
            handler(message, generation)
        with self._lock:
            self._subscriptions[topic_filter] = qos
            rc, mid = self._client.subscribe(topic_filter, qos=qos)
            if rc == paho.MQTT_ERR_NO_CONN:
                return  # made on connection (see _handle_connect)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise PublishRefused(f"subscribe to {topic_filter!r} failed: {paho.error_string(rc)}")
            self._subscribed[mid] = (done, outcome)
        if not done.wait(timeout_s):
            with self._lock:
                self._subscribed.pop(mid, None)
            raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout_s} s")
        if outcome[0].is_failure:
            raise _refusal(outcome[0].value, f"broker refused subscription to {topic_filter!r}: {outcome[0]}")

    def close(self, *, end_session: bool = False) -> None:
        """Disconnect cleanly (no Last Will) and stop the network thread.

        ``end_session`` tells the broker to drop this client's session now rather than keep it until it expires:
        for a worker retired for good, whose share of a shared subscription would otherwise wait for it.
        """
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        self._client.disconnect(properties=properties)
        self._client.loop_stop()

    def __enter__(self) -> MqttLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _route(topic_filter: str) -> str:
    """The filter paho matches incoming topics against: a shared subscription's arrive without '$share/<group>/'."""
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
