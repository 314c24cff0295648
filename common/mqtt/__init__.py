"""The protocol's MQTT 5 binding: one connection that publishes and receives mqvox messages.

- ``settings``: where the broker is (BrokerSettings, TlsSettings) and the command-line options for it;
- ``errors``: what can go wrong (BrokerUnavailable, BrokerRefused and its kinds, LinkClosed, NoMatchingSubscribers);
- ``link``: MqttLink, the connection from start to close;
- ``pending``: the Futures of the PUBACKs and SUBACKs not received yet;
- ``routing``: incoming messages to their handlers, held until one registers, acknowledged by hand or not;
- ``dispatcher``: the one thread per link that runs handlers and callbacks, so paho's thread never does.
"""

from common.mqtt.errors import (
    NO_MATCHING_SUBSCRIBERS,
    NOT_AUTHORIZED,
    BrokerRefused,
    BrokerUnavailable,
    LinkClosed,
    NoMatchingSubscribers,
    NotAuthorized,
    PublishNotAuthorized,
    PublishRefused,
    SubscribeNotAuthorized,
    SubscribeRefused,
    connection_failure,
    tls_hint,
)
from common.mqtt.link import (
    DISPATCHER_THREAD,
    RECONNECT_MAX_S,
    RECONNECT_MIN_S,
    SESSION_TAKEN_OVER,
    ConnectionListener,
    MqttLink,
)
from common.mqtt.routing import MAX_UNROUTED, Delivery, DeliveryHandler, MessageHandler
from common.mqtt.settings import (
    TLS_CA_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    BrokerSettings,
    TlsSettings,
    add_broker_arguments,
    broker_from_arguments,
)

__all__ = [
    "DISPATCHER_THREAD",
    "MAX_UNROUTED",
    "NOT_AUTHORIZED",
    "NO_MATCHING_SUBSCRIBERS",
    "RECONNECT_MAX_S",
    "RECONNECT_MIN_S",
    "SESSION_TAKEN_OVER",
    "TLS_CA_FILE",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "BrokerRefused",
    "BrokerSettings",
    "BrokerUnavailable",
    "ConnectionListener",
    "Delivery",
    "DeliveryHandler",
    "LinkClosed",
    "MessageHandler",
    "MqttLink",
    "NoMatchingSubscribers",
    "NotAuthorized",
    "PublishNotAuthorized",
    "PublishRefused",
    "SubscribeNotAuthorized",
    "SubscribeRefused",
    "TlsSettings",
    "add_broker_arguments",
    "broker_from_arguments",
    "connection_failure",
    "tls_hint",
]
