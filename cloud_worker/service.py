"""The utterance service: takes utterances from the shared subscription, checks them, answers each one.

Every utterance gets an answer on its Response Topic (the device's result topic) with
its Correlation Data, or, when even that cannot be trusted, a report on the error
topic. This worker has no speech recogniser yet, so a valid utterance is answered
with the error ``asr_unavailable``: the protocol round trip is real, the transcript is
not pretended.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter

from cloud_worker.settings import WorkerSettings
from schemas.audio import decode_opus
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.mqtt import MqttLink
from schemas.protocol import decode
from schemas.result import ErrorInfo, Result, Source
from schemas.topics import RESULT, UTTERANCE, shared_filter
from schemas.utterance import Utterance

log = logging.getLogger(__name__)


class UtteranceService:
    """One worker's consumer. ``start()`` connects and subscribes; ``stop()`` drains and disconnects."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.reporter = f"cloud_worker/{settings.worker_id}"
        self._inbox: queue.Queue[tuple[str, Envelope, float] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="utterances", daemon=True)
        self._link: MqttLink | None = None
        self.counts: Counter[str] = Counter()
        """Utterances ``answered`` and ``refused`` by this worker since start."""

    def start(self) -> UtteranceService:
        subscription = shared_filter(self.settings.group, UTTERANCE)
        self._link = MqttLink(f"mqvox-worker-{self.settings.worker_id}", self.settings.broker)
        self._thread.start()
        self._link.subscribe(subscription, self._receive, qos=UTTERANCE.qos)
        log.info("subscribed", extra={"topic": subscription})
        return self

    def stop(self) -> None:
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join()
        if self._link is not None:
            self._link.close()

    def _receive(self, topic: str, envelope: Envelope) -> None:
        # paho's network thread: hand over and return, since answering waits for PUBACKs.
        self._inbox.put((topic, envelope, time.monotonic()))

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            topic, envelope, received_at = item
            try:
                self.handle(topic, envelope, received_at)
            except Exception:
                log.exception("failed to handle a message", extra={"topic": topic})

    def handle(self, topic: str, envelope: Envelope, received_at: float) -> None:
        """Check one utterance and publish its answer."""
        started = time.monotonic()
        try:
            utterance = decode(topic, envelope)
            audio_started = time.monotonic()
            samples = decode_opus(utterance.audio, expected_rate=utterance.sample_rate)
            self._check_duration(utterance, samples.size / utterance.sample_rate)
        except ProtocolError as error:
            self._refuse(topic, envelope, error)
            return
        done = time.monotonic()
        result = Result.failure(
            utterance.device_id,
            utterance.utterance_id,
            Source.CLOUD,
            ErrorInfo(ErrorCode.ASR_UNAVAILABLE, "this worker has no speech recogniser configured"),
            timings_ms={
                "queue": _ms(started - received_at),
                "decode": _ms(done - audio_started),
                "total": _ms(done - received_at),
            },
        )
        self._link.send(result)
        self.counts["answered"] += 1
        log.info("answered", extra={"device_id": result.device_id, "utterance_id": result.utterance_id})

    def _check_duration(self, utterance: Utterance, decoded_s: float) -> None:
        if abs(decoded_s - utterance.duration_s) > self.settings.duration_tolerance_s:
            raise ProtocolError(
                ErrorCode.MISMATCH,
                "utterance audio",
                f"decoded {decoded_s:.3f} s of audio, metadata says {utterance.duration_s:.3f} s",
            )

    def _refuse(self, topic: str, envelope: Envelope, error: ProtocolError) -> None:
        """Report a refused utterance; also answer the device when its request can be trusted that far."""
        self.counts["refused"] += 1
        device_id = (UTTERANCE.match(topic) or {}).get("device_id")
        utterance_id = (envelope.correlation_data or b"").decode("ascii", errors="replace") or None
        log.warning(
            "refused: %s",
            error,
            extra={"device_id": device_id, "utterance_id": utterance_id, "topic": topic, "code": str(error.code)},
        )
        report = ErrorReport.from_error(
            error, reporter=self.reporter, topic=topic, device_id=device_id, utterance_id=utterance_id
        )
        self._link.send(report)
        if device_id is None or utterance_id is None:
            return
        try:
            # Answer only on the device's own result topic, never on a topic the request chose.
            if envelope.response_topic != RESULT.topic(device_id=device_id):
                return
            answer = Result.failure(
                device_id,
                utterance_id,
                Source.CLOUD,
                ErrorInfo(error.code, str(error)[:1024]),
                timings_ms={"total": 0.0},
            )
            self._link.send(answer)
        except ProtocolError:
            # The ids themselves are what is wrong: the error report is all we can do.
            return


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)
