"""What can go wrong between a link and its broker: no connection, a refusal, a closed link, and why in words."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.mqtt.settings import BrokerSettings


class BrokerUnavailable(ConnectionError):
    """The broker could not be reached, refused the connection, or did not answer in time."""


class LinkClosed(ConnectionError):
    """The link was closed before the broker acknowledged: the message may or may not have reached it."""


class BrokerRefused(RuntimeError):
    """A publish or a subscription the broker refused, or one refused before sending because the broker would."""


class PublishRefused(BrokerRefused):
    """A publish the broker refused (PUBACK reason), or one that could not be handed to it (too large, not queued)."""


class SubscribeRefused(BrokerRefused):
    """A subscription the broker refused (SUBACK reason), or one that could not be sent."""


class NotAuthorized(BrokerRefused):
    """A publish or subscription the broker's ACL refused this client (MQTT 5 reason 0x87)."""


class PublishNotAuthorized(NotAuthorized, PublishRefused):
    """A publish the broker's ACL refused: both a NotAuthorized and a PublishRefused."""


class SubscribeNotAuthorized(NotAuthorized, SubscribeRefused):
    """A subscription the broker's ACL refused: both a NotAuthorized and a SubscribeRefused."""


class NoMatchingSubscribers(Exception):
    """The broker accepted a QoS 1 message but had no subscription to give it to (PUBACK reason 0x10): it is gone.

    Not a failure for a publish/subscribe message; a request whose consumer is not subscribed right now (the
    workers after a broker restart, before they subscribe again) is lost unless its sender keeps it and retries.
    """


NO_MATCHING_SUBSCRIBERS = 0x10
"""MQTT 5 PUBACK reason: accepted, and delivered to no one; Mosquitto 2 sends it to MQTT 5 publishers."""

NOT_AUTHORIZED = 0x87
"""MQTT 5 PUBACK or SUBACK reason: the broker's ACL does not let this client publish or read the topic."""


def publish_refusal(reason: int, message: str) -> PublishRefused:
    """The error for a PUBACK failure ``reason``: PublishNotAuthorized for the ACL's refusal."""
    return (PublishNotAuthorized if reason == NOT_AUTHORIZED else PublishRefused)(message)


def subscribe_refusal(reason: int, message: str) -> SubscribeRefused:
    """The error for a SUBACK failure ``reason``: SubscribeNotAuthorized for the ACL's refusal."""
    return (SubscribeNotAuthorized if reason == NOT_AUTHORIZED else SubscribeRefused)(message)


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
