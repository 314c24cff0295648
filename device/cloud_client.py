"""Asking the cloud about an utterance: MQTT 5 request/response on the device's own topics.

With an outbox, the request is written there and sent by its sender, in order with the
device's results; while the broker is unreachable it waits there, and ``ask`` raises
CloudDeferred: the cloud answers once the request reaches it, too late to act on.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.mqtt import MqttLink, PublishRefused
from schemas.protocol import decode
from schemas.result import Result
from schemas.topics import RESULT
from schemas.utterance import Utterance

if TYPE_CHECKING:
    from device.outbox import Outbox, OutboxSender

log = logging.getLogger(__name__)


class CloudDeferred(Exception):
    """The request was still in the outbox (the broker unreachable) when the wait ended; it is sent later."""


class CloudClient:
    """Sends utterances and waits for the cloud's answer on the device's result topic."""

    def __init__(
        self, link: MqttLink, device_id: str, *, outbox: Outbox | None = None, sender: OutboxSender | None = None
    ) -> None:
        """Requests go through ``outbox`` and its ``sender`` when given, else straight to the link."""
        self._link = link
        self._device_id = device_id
        self._outbox = outbox
        self._sender = sender
        self._pending: dict[str, tuple[threading.Event, list[Result]]] = {}
        self._lock = threading.Lock()
        # Subscribed before the first request, so no answer can arrive unheard.
        link.subscribe(RESULT.topic(device_id=device_id), self._on_result, qos=RESULT.qos)

    def _on_result(self, topic: str, envelope: Envelope) -> None:
        try:
            result = decode(topic, envelope)
        except ProtocolError as error:
            log.warning("ignored invalid result: %s", error, extra={"device_id": self._device_id, "topic": topic})
            return
        with self._lock:
            waiter = self._pending.get(result.utterance_id)
        if result.source != "cloud":
            return
        if waiter is None:
            # Asked before a broker or network outage, answered after it: reported, too late to act on.
            log.info(
                "cloud answer after the wait ended, not acted on",
                extra={"device_id": self._device_id, "utterance_id": result.utterance_id, "intent": result.intent},
            )
            return
        waiter[1].append(result)
        waiter[0].set()

    def ask(self, utterance: Utterance, timeout_s: float) -> Result | None:
        """Publish ``utterance`` and return the cloud's result, or None if none came within ``timeout_s``.

        Raises CloudDeferred when the request is still in the outbox at the end of the wait, and
        PublishRefused when it could not be sent or kept.
        """
        done = threading.Event()
        answers: list[Result] = []
        queued: int | None = None
        with self._lock:
            self._pending[utterance.utterance_id] = (done, answers)
        try:
            if self._outbox is None:
                self._link.send(utterance)
            else:
                queued = self._outbox.put(utterance)
                if queued is None:
                    raise PublishRefused("the outbox is full and its drop policy refused the request")
                if self._sender is not None:
                    self._sender.wake()
            done.wait(timeout_s)
        finally:
            with self._lock:
                del self._pending[utterance.utterance_id]
        if answers:
            return answers[0]
        if queued is not None and self._outbox.holds(queued):
            raise CloudDeferred(f"the broker is unreachable: the request waits in the outbox after {timeout_s:g} s")
        return None
