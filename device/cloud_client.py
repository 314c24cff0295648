"""Asking the cloud about an utterance: MQTT 5 request/response on the device's own topics."""

from __future__ import annotations

import logging
import threading

from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.mqtt import MqttLink
from schemas.protocol import decode
from schemas.result import Result
from schemas.topics import RESULT
from schemas.utterance import Utterance

log = logging.getLogger(__name__)


class CloudClient:
    """Sends utterances and waits for the cloud's answer on the device's result topic."""

    def __init__(self, link: MqttLink, device_id: str) -> None:
        self._link = link
        self._device_id = device_id
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
        if waiter is not None and result.source == "cloud":
            waiter[1].append(result)
            waiter[0].set()

    def ask(self, utterance: Utterance, timeout_s: float) -> Result | None:
        """Publish ``utterance`` and return the cloud's result, or None if none came within ``timeout_s``."""
        done = threading.Event()
        answers: list[Result] = []
        with self._lock:
            self._pending[utterance.utterance_id] = (done, answers)
        try:
            self._link.send(utterance)
            done.wait(timeout_s)
        finally:
            with self._lock:
                del self._pending[utterance.utterance_id]
        return answers[0] if answers else None
