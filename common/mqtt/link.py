"""One MQTT 5 connection that publishes and receives mqvox messages: its life from connection to close.

Publishing waits for the broker's PUBACK and raises if the broker refused the
message, so a sender always knows whether its message is in the broker's hands.

Threads: paho's network thread reads packets and only hands work over. It resolves
the Future of each acknowledgement (pending.py) and gives each message to the router
(routing.py). The link's dispatcher thread (dispatcher.py, named
``mqtt-dispatcher/<client id>``) runs every message handler, every connection
listener and every Future callback, one at a time, in order.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from common.mqtt.dispatcher import Dispatcher
from common.mqtt.errors import (
    NO_MATCHING_SUBSCRIBERS,
    BrokerUnavailable,
    LinkClosed,
    NoMatchingSubscribers,
    NotAuthorized,
    PublishNotAuthorized,
    PublishRefused,
    SubscribeRefused,
    connection_failure,
    publish_refusal,
    subscribe_refusal,
    tls_hint,
)
from common.mqtt.pending import PendingAcks
from common.mqtt.routing import DeliveryHandler, MessageHandler, Router
from common.mqtt.settings import BrokerSettings
from schemas.envelope import Envelope
from schemas.protocol import Message, encode
from schemas.topics import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

SESSION_TAKEN_OVER = 0x8E
"""MQTT 5 DISCONNECT reason: another client connected with this client id, and the broker closed this one."""

RECONNECT_MIN_S = 1
RECONNECT_MAX_S = 30
"""Backoff (seconds) between reconnection attempts: doubling from the first to the second, paho's own."""

DISPATCHER_THREAD = "mqtt-dispatcher"
"""The start of the name of each link's dispatcher thread: ``mqtt-dispatcher/<client id>``."""

DISPATCHER_STOP_S = 5.0
"""How long ``close`` waits for a handler still running before it lets the dispatcher go (seconds)."""
DISCONNECT_FLUSH_S = 5.0
"""At close, how long (seconds) to wait for paho to write the DISCONNECT, and the acknowledgements queued before it."""

ConnectionListener = Callable[[bool], None]
"""Called on the dispatcher thread after every successful (re)connection, with the broker's session-present flag."""


class MqttLink:
    """One MQTT 5 client connection, started on construction; paho reconnects it, with backoff, when it drops.

    Every subscription is made again on every reconnection, whether or not the broker says it kept the session:
    Mosquitto 2.0.11 reports a session restored from its persistence file as present, but restores no shared
    subscription into it.

    A message that arrives before its subscription's handler is registered (a resumed session's redeliveries,
    sent as soon as the broker accepts the connection) is held, and handed to the handler when it registers.

    Handlers, connection listeners and the callbacks of ``publish_later``'s Futures all run on the link's one
    dispatcher thread, in order: they may block (later deliveries wait, the connection does not) and may publish
    and wait for the PUBACK.
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
        self._client.manual_ack_set(manual_ack)
        self._client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        self._connected = threading.Event()
        self._disconnected = threading.Event()
        """Set by paho's network thread each time a connection ends; close() waits for it."""
        self._connect_reason: str | None = None
        self._dispatcher = Dispatcher(f"{DISPATCHER_THREAD}/{client_id}")
        self._acks: PendingAcks[None] = PendingAcks(self._dispatcher.future)
        """Publishes waiting for their PUBACK."""
        self._subacks: PendingAcks[list[ReasonCode]] = PendingAcks(self._dispatcher.future)
        """Subscriptions waiting for their SUBACK."""
        self._router = Router(self._client, self._dispatcher, manual_ack=manual_ack)
        # Guards the subscriptions and listeners; held across paho's subscribe(), which takes no lock that paho
        # holds while calling back, so that a subscription is either made by _handle_connect or by _subscribe.
        self._lock = threading.RLock()
        self._subscriptions: dict[str, int] = {}
        """Topic filter -> QoS of every subscription made, to be made again on each connection."""
        self._listeners: list[ConnectionListener] = []
        self._client.on_connect = self._handle_connect
        self._client.on_message = self._handle_message
        self._client.on_publish = self._handle_publish
        self._client.on_subscribe = self._handle_subscribe
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_log = self._handle_log
        self._last_error: str | None = None
        try:
            self._connect(will, clean_start, session_expiry_s, require_connection)
        except BaseException:
            self._dispatcher.stop(DISPATCHER_STOP_S)
            raise

    def _connect(self, will: Message | None, clean_start: bool, session_expiry_s: int, required: bool) -> None:
        broker = self._broker
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
            if required:
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
        if required:
            self._client.loop_stop()
            self._client.disconnect()
            raise BrokerUnavailable(reason)
        log.warning("not connected to the MQTT broker yet: %s; retrying in the background", reason)

    @property
    def connected(self) -> bool:
        """Whether the connection is up now (it may still drop before the next publish)."""
        return self._client.is_connected()

    @property
    def dispatcher_thread(self) -> str:
        """The name of the thread that runs this link's handlers, listeners and Future callbacks."""
        return self._dispatcher.name

    def on_connection(self, listener: ConnectionListener) -> None:
        """Call ``listener`` after each connection from now on, on the dispatcher thread."""
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
        if self._router.new_connection() > 1:
            log.info("reconnected to the MQTT broker", extra={"detail": f"session present: {flags.session_present}"})
        with self._lock:
            # Subscriptions made while disconnected, lost with a session the broker did not keep, or missing from
            # one it says it kept: made (again) now, without waiting for the SUBACK, since this is paho's thread.
            # Retain handling 1: retained messages only for a subscription that did not exist, not on every
            # reconnection.
            for topic_filter, qos in self._subscriptions.items():
                _, mid = client.subscribe(topic_filter, options=SubscribeOptions(qos=qos, retainHandling=1))
                if mid is not None:
                    self._subacks.ignore(mid)
            listeners = list(self._listeners)
        self._connect_reason = None
        self._connected.set()
        for listener in listeners:
            self._dispatcher.submit(functools.partial(_tell, listener, bool(flags.session_present)))

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        try:
            self._report_disconnect(reason_code)
        finally:
            self._disconnected.set()

    def _report_disconnect(self, reason_code: ReasonCode) -> None:
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
            outcome = publish_refusal(reason_code.value, f"broker refused the publish: {reason_code}")
        elif reason_code.value == NO_MATCHING_SUBSCRIBERS:
            outcome = NoMatchingSubscribers(f"no subscriber: {reason_code}")
        self._acks.resolve(mid, outcome)

    def _handle_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        self._subacks.resolve(mid, list(reason_codes))

    def _handle_message(self, client, userdata, message: paho.MQTTMessage) -> None:
        self._router.arrived(message)

    def publish(self, topic: str, envelope: Envelope, *, qos: int, retain: bool, timeout_s: float = 10.0) -> None:
        """Publish and, for QoS > 0, wait for the PUBACK; raise PublishRefused or TimeoutError otherwise.

        A message no one was subscribed to counts as published, as publish/subscribe has it; a sender that
        needs a consumer uses ``publish_later``, whose Future tells it so.

        While the connection is down, a QoS 1 message waits in paho's queue and goes out
        on reconnection; a TimeoutError leaves it there, so it may still be delivered.
        Raises LinkClosed when the link is closed before the PUBACK.

        Payloads over the broker's message_size_limit are refused here, before sending:
        Mosquitto 2.0.11 answers them with PUBACK reason 0x95, which paho 2.2.0 reads
        as a malformed packet, then reconnects and re-sends the message forever.

        May be called from a handler: the PUBACK is read on paho's thread, not the dispatcher's.
        """
        mid, sent = self._publish(topic, envelope, qos=qos, retain=retain)
        if mid is None:
            return
        try:
            outcome = sent.exception(timeout_s)
        except TimeoutError:
            self._acks.abandon(mid)
            if not sent.done():
                raise TimeoutError(f"no PUBACK for {topic!r} within {timeout_s} s") from None
            outcome = sent.exception()
        if outcome is None or isinstance(outcome, NoMatchingSubscribers):
            return
        if isinstance(outcome, LinkClosed):
            raise outcome
        refused = PublishNotAuthorized if isinstance(outcome, NotAuthorized) else PublishRefused
        raise refused(f"publish to {topic!r}: {outcome}")

    def publish_later(self, topic: str, envelope: Envelope, *, qos: int, retain: bool) -> Future[None]:
        """Hand the message to paho and return at once, with the Future of its outcome.

        The Future's result is None once the broker acknowledged the message (at once for QoS 0). Its exception
        is NoMatchingSubscribers when the broker accepted it but no one was subscribed, PublishRefused (or
        PublishNotAuthorized) when the broker refused it, LinkClosed when the link was closed first. Its done
        callbacks run on the link's dispatcher thread, after the handlers and callbacks handed over before; a
        waiter on ``result()`` wakes as soon as paho's thread reads the PUBACK, even while a handler runs.

        While disconnected, a QoS 1 message waits in paho's queue, in order, until reconnection. Raises
        PublishRefused for a payload over the broker limit, or when paho cannot queue it.
        """
        return self._publish(topic, envelope, qos=qos, retain=retain)[1]

    def _publish(self, topic: str, envelope: Envelope, *, qos: int, retain: bool) -> tuple[int | None, Future[None]]:
        """The packet id (None for QoS 0) and the Future of a message handed to paho."""
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
            sent = self._dispatcher.future()
            sent.set_result(None)
            return None, sent
        return info.mid, self._acks.expect(info.mid)

    def send(self, message: Message, *, timeout_s: float = 10.0) -> None:
        """Validate, encode and publish ``message`` with its topic's QoS and retained flag."""
        topic, envelope = encode(message)
        self.publish(topic, envelope, qos=message.spec.qos, retain=message.spec.retain, timeout_s=timeout_s)

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe, route matching messages to ``handler``, and wait for the SUBACK.

        Raises SubscribeRefused (SubscribeNotAuthorized for the ACL) if the broker refused the subscription. The
        handler runs on the dispatcher thread; while it runs, the link's other handlers and callbacks wait.
        """
        self._router.route_messages(topic_filter, handler)
        self._subscribe(topic_filter, qos, timeout_s)

    def consume(self, topic_filter: str, handler: DeliveryHandler, *, qos: int = 1, timeout_s: float = 10.0) -> None:
        """Subscribe as ``subscribe`` does, handing each message over as a Delivery to acknowledge later.

        Needs a link made with ``manual_ack=True``: the broker then keeps each message
        in flight, and redelivers it to a persistent session, until its ``ack()``.
        """
        if not self._router.manual_ack:
            raise ValueError("consume() needs a link made with manual_ack=True")
        self._router.route_deliveries(topic_filter, handler)
        self._subscribe(topic_filter, qos, timeout_s)

    def unsubscribe(self, topic_filter: str, *, keep_handling: bool = False) -> None:
        """Ask the broker to stop sending ``topic_filter``, and stop routing it to its handler at once, unless
        ``keep_handling``: a worker leaving a shared subscription still answers what the broker had already
        given it (its session's queue), which goes on arriving after the unsubscription."""
        if not keep_handling:
            self._router.stop_routing(topic_filter)
        with self._lock:
            self._subscriptions.pop(topic_filter, None)
        rc, _ = self._client.unsubscribe(topic_filter)
        if rc != paho.MQTT_ERR_SUCCESS:
            log.warning("unsubscribe from %r failed: %s", topic_filter, paho.error_string(rc))

    def _subscribe(self, topic_filter: str, qos: int, timeout_s: float) -> None:
        with self._lock:
            self._subscriptions[topic_filter] = qos
            rc, mid = self._client.subscribe(topic_filter, qos=qos)
        if rc == paho.MQTT_ERR_NO_CONN:
            return  # made on connection (see _handle_connect)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise SubscribeRefused(f"subscribe to {topic_filter!r} failed: {paho.error_string(rc)}")
        acknowledged = self._subacks.expect(mid)
        try:
            reason_codes = acknowledged.result(timeout_s)
        except TimeoutError:
            self._subacks.abandon(mid)
            if not acknowledged.done():
                raise TimeoutError(f"no SUBACK for {topic_filter!r} within {timeout_s} s") from None
            reason_codes = acknowledged.result()
        if reason_codes[0].is_failure:
            raise subscribe_refusal(
                reason_codes[0].value, f"broker refused subscription to {topic_filter!r}: {reason_codes[0]}"
            )

    def close(self, *, end_session: bool = False) -> None:
        """Disconnect cleanly (no Last Will), stop the network thread, fail the Futures still waiting (LinkClosed),
        and stop the dispatcher once it has run what was handed to it.

        ``end_session`` tells the broker to drop this client's session now rather than keep it until it expires:
        for a worker retired for good, whose share of a shared subscription would otherwise wait for it.
        """
        properties = None
        if end_session:
            properties = Properties(PacketTypes.DISCONNECT)
            properties.SessionExpiryInterval = 0
        was_connected = self._client.is_connected()
        self._disconnected.clear()
        self._client.disconnect(properties=properties)
        if was_connected:
            # loop_stop() does not flush what is queued: without this wait, an ack() just before close() could be
            # dropped with the DISCONNECT, and the broker would send the message again to the session's next
            # connection. paho writes its packets in order and ends the connection once the DISCONNECT is out.
            self._disconnected.wait(DISCONNECT_FLUSH_S)
        self._client.loop_stop()
        self._acks.close(lambda: LinkClosed(f"the link {self.client_id!r} was closed before the broker's PUBACK"))
        self._subacks.close(lambda: LinkClosed(f"the link {self.client_id!r} was closed before the broker's SUBACK"))
        self._dispatcher.stop(DISPATCHER_STOP_S)

    def __enter__(self) -> MqttLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tell(listener: ConnectionListener, session_present: bool) -> None:
    try:
        listener(session_present)
    except Exception:
        log.exception("connection listener failed")
