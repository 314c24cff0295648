"""Incoming messages to their handlers: routes by topic filter, messages held until their handler registers, and
the acknowledgement of each message when the link acknowledges by hand."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho

from common.mqtt.dispatcher import Dispatcher
from schemas.envelope import Envelope

log = logging.getLogger(__name__)

MAX_UNROUTED = 1000
"""Messages held for a handler not registered yet; beyond, they are dropped (unacknowledged, so sent again)."""

MessageHandler = Callable[[str, Envelope], None]
"""Called with (topic, envelope) for each message matching its subscription, on the link's dispatcher thread."""


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
"""Called with each Delivery of a ``consume`` subscription, on the link's dispatcher thread."""

_Route = Callable[[paho.MQTTMessage, int], None]
"""What a route runs on the dispatcher for a message and the connection (generation) it came on."""


class Router:
    """Hands each incoming message to the handlers whose filter matches it, on the dispatcher, in arrival order.

    A message that arrives before any handler matches it (a resumed session's redeliveries, sent as soon as the
    broker accepts the connection) is held, and handed to the first handler registered for it.
    """

    def __init__(self, client: paho.Client, dispatcher: Dispatcher, *, manual_ack: bool) -> None:
        """``manual_ack``: the client was made to acknowledge by hand (``consume`` subscriptions by their Delivery,
        the others once their handler returns)."""
        self._client = client
        self._dispatcher = dispatcher
        self.manual_ack = manual_ack
        # Held while calling paho's ack(), which takes no lock paho holds while calling back; never held while a
        # handler runs. Handing work to the dispatcher under it keeps held messages ahead of newer ones.
        self._lock = threading.Lock()
        self._routes: dict[str, _Route] = {}
        """Topic filter as paho matches it (see ``route_filter``) -> what runs for its messages."""
        self._unrouted: list[tuple[paho.MQTTMessage, int]] = []
        """Messages, with their connection generation, that arrived before any handler matched them."""
        self._generation = 0
        """How many times the link has connected; a message is acknowledged only on its own connection."""

    def new_connection(self) -> int:
        """The link (re)connected: held messages of the earlier connection are dropped (the broker sends them again
        on this one). Returns how many times it has connected. On paho's thread."""
        with self._lock:
            self._generation += 1
            self._unrouted.clear()
            return self._generation

    def arrived(self, message: paho.MQTTMessage) -> None:
        """Hand ``message`` to its handlers, or hold it for the first one to register. On paho's thread."""
        with self._lock:
            routes = [route for topic, route in self._routes.items() if paho.topic_matches_sub(topic, message.topic)]
            if not routes:
                if len(self._unrouted) < MAX_UNROUTED:
                    self._unrouted.append((message, self._generation))
                else:
                    # Unacknowledged (manual_ack), the broker sends it again on the next connection.
                    log.warning("dropped a message no subscription handles yet", extra={"topic": message.topic})
                return
            for route in routes:
                self._dispatcher.submit(functools.partial(route, message, self._generation))

    def route_messages(self, topic_filter: str, handler: MessageHandler) -> None:
        """Hand ``handler`` the messages of ``topic_filter``, acknowledged (manual_ack) once it returns."""
        self._add(topic_filter, functools.partial(self._deliver, handler))

    def route_deliveries(self, topic_filter: str, handler: DeliveryHandler) -> None:
        """Hand ``handler`` the messages of ``topic_filter`` as Deliveries, acknowledged by their ``ack()``."""
        self._add(topic_filter, functools.partial(self._hand_over, handler))

    def stop_routing(self, topic_filter: str) -> None:
        """Hand no more messages of ``topic_filter`` to its handler (those already handed over still run)."""
        with self._lock:
            self._routes.pop(route_filter(topic_filter), None)

    def _add(self, topic_filter: str, route: _Route) -> None:
        matched = route_filter(topic_filter)
        with self._lock:
            self._routes[matched] = route
            held = [item for item in self._unrouted if paho.topic_matches_sub(matched, item[0].topic)]
            self._unrouted = [item for item in self._unrouted if not paho.topic_matches_sub(matched, item[0].topic)]
            for message, generation in held:
                self._dispatcher.submit(functools.partial(route, message, generation))

    def _deliver(self, handler: MessageHandler, message: paho.MQTTMessage, generation: int) -> None:
        try:
            handler(message.topic, Envelope.from_mqtt(message.payload, message.properties))
        except Exception:
            log.exception("message handler failed", extra={"topic": message.topic})
        finally:
            self._ack(message.mid, message.qos, generation)

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

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        if qos == 0 or not self.manual_ack:
            return
        with self._lock:
            if generation != self._generation:
                return  # received on an earlier connection: the broker has sent it again on this one
            self._client.ack(mid, qos)


def route_filter(topic_filter: str) -> str:
    """The filter paho matches incoming topics against: a shared subscription's arrive without '$share/<group>/'."""
    return topic_filter.split("/", 2)[2] if topic_filter.startswith("$share/") else topic_filter
