"""The utterance service: takes utterances from the shared subscription in micro-batches, answers each one.

For each batch: check every utterance (schema, topic, Opus audio, the worker's limits);
answer the ones already stored from storage (a redelivery is never transcribed twice,
and one whose answer was already published is acknowledged without a second answer);
transcribe the rest together; map each transcript to an intent; store everything in
one commit; reply to each on its device's reply topic (the utterance's Response Topic,
which must be that topic) with its Correlation Data; only then acknowledge the MQTT
messages; and record the publications, so that a message the broker sends again (its
acknowledgement lost with a connection) gets no second answer.

The worker's MQTT session is persistent: what arrives while it is down waits for it at
the broker, and what it had not acknowledged comes again. While the database is
unavailable, the batch in hand is retried with backoff and nothing is acknowledged, so
the broker holds everything until the database is back.

Refused input gets an error report on the error topic, and an error reply when the
request can be trusted that far; the worker goes on with the next one. The worker never
publishes on a device's result topic: the device judges the reply and publishes the
utterance's one result itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import soxr

from cloud_worker.asr import SAMPLE_RATE, Transcriber
from cloud_worker.calibration import Calibration
from cloud_worker.intents import IntentDecider
from cloud_worker.metrics import WorkerMetrics
from cloud_worker.settings import WorkerSettings
from cloud_worker.storage import Store, StoredAnswer, StoredUtterance
from cloud_worker.transcript import Transcript
from common.backoff import Backoff
from common.database import StorageUnavailable
from common.logfmt import ContextLogger
from common.mqtt import BrokerSettings, Delivery, LinkClosed, MqttLink, PublishRefused
from common.opus import decode_opus
from schemas.envelope import Envelope
from schemas.error_report import ErrorReport
from schemas.errors import ErrorCode, ProtocolError
from schemas.protocol import Message, decode
from schemas.reply import CloudReply
from schemas.result import ErrorInfo, Result, Source
from schemas.topics import REPLY, UTTERANCE, shared_filter
from schemas.utterance import Utterance
from schemas.vocabulary import load_vocabulary

log = ContextLogger(logging.getLogger(__name__))

_T = TypeVar("_T")

MAX_TRANSCRIPT_CHARS = 2048
"""Longest transcript a result carries (json/result.schema.json); a longer one is cut."""


@dataclass(frozen=True)
class _Received:
    """A delivery as it came off the broker."""

    delivery: Delivery
    received_at: float
    """time.monotonic() at receipt, for durations."""
    received_unix: float
    """time.time() at receipt, as stored."""


@dataclass(frozen=True)
class _Accepted:
    """A delivery whose utterance passed every check."""

    received: _Received
    utterance: Utterance
    samples: np.ndarray
    """The audio at the recogniser's rate."""
    decode_s: float
    """Time spent decoding its Opus."""

    @property
    def key(self) -> tuple[str, str]:
        return self.utterance.device_id, self.utterance.utterance_id


class _Stopping(Exception):
    """Raised out of a storage retry when the worker is told to stop during a database outage."""


def worker_client_id(worker_id: str) -> str:
    """The MQTT client id, and so the broker session, of the worker named ``worker_id``."""
    return f"mqvox-worker-{worker_id}"


def retire_session(worker_id: str, broker: BrokerSettings) -> None:
    """End the broker session of a worker that is gone for good, from outside: connect under its client id with a
    clean start and no expiry, and leave. Its share of the group's utterances then goes to the others; what was
    queued for it is dropped (devices send an unanswered request again). A worker still running is disconnected
    by it (the broker gives the client id to the newest connection) and connects again with a new session."""
    MqttLink(worker_client_id(worker_id), broker, clean_start=True, session_expiry_s=0).close(end_session=True)


class UtteranceService:
    """One worker's consumer. ``start()`` connects and subscribes; ``stop()`` finishes the batch and disconnects.

    ``transcriber`` and ``store`` may be given (tests share one model between workers);
    otherwise ``start()`` loads them from the settings.
    """

    def __init__(
        self, settings: WorkerSettings, *, transcriber: Transcriber | None = None, store: Store | None = None
    ) -> None:
        self.settings = settings
        self.reporter = f"cloud_worker/{settings.worker_id}"
        self.vocabulary = load_vocabulary(settings.vocabulary)
        self.transcriber = transcriber
        self.store = store
        self._owns_store = store is None
        self.decider = IntentDecider(self.vocabulary, Calibration.load(settings.calibration))
        self.metrics = WorkerMetrics()
        self.metrics_port: int | None = None
        """The port /metrics is served on, once started; None when not served."""
        self._inbox: queue.Queue[_Received | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="utterances", daemon=True)
        self._link: MqttLink | None = None
        self._stopping = threading.Event()
        self._traffic = threading.Lock()
        self._outstanding = 0
        """Deliveries received and not yet handled (under ``_traffic``), for ``drain``."""
        self._last_received = time.monotonic()
        self.counts: Counter[str] = Counter()
        """Utterances ``transcribed``, ``answered`` (from storage too), ``replayed`` from storage, ``refused``,
        ``already_published`` (a redelivery acknowledged without a second answer), ``answered_elsewhere`` (a copy
        another worker stored first, acknowledged without an answer: that worker answers it), ``unstored`` (left
        unacknowledged when the worker stopped during a database outage), ``refusals_unsent`` (an error report or
        error reply of a refused utterance that the broker did not take), and ``storage_retries``."""

    def start(self) -> UtteranceService:
        """Open the store and delete its expired training contributions, load the model, serve metrics, subscribe.
        Raises StorageUnavailable, AsrUnavailable or BrokerUnavailable with a sentence saying what is missing."""
        if self.store is None:
            self.store = Store(self.settings.storage)
        self.store.purge_expired_contributions()  # then, while saving, at most once a minute
        if self.transcriber is None:
            self.transcriber = Transcriber(self.settings.asr, self.vocabulary)
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port)
            log.info("metrics served", extra={"detail": f"http://127.0.0.1:{self.metrics_port}/metrics"})
        subscription = shared_filter(self.settings.group, UTTERANCE)
        self._link = MqttLink(
            worker_client_id(self.settings.worker_id),
            self.settings.broker,
            manual_ack=True,
            clean_start=False,
            session_expiry_s=self.settings.session_expiry_s,
        )
        self._thread.start()
        self._link.consume(subscription, self._receive, qos=UTTERANCE.qos)
        log.info("subscribed", extra={"topic": subscription})
        return self

    def stop(self, *, end_session: bool = True, drain_timeout_s: float | None = None) -> None:
        """Stop taking utterances, answer those in hand, and disconnect, ending the broker session.

        Mosquitto keeps routing a share of the group's utterances to a member's session until it ends, where they
        would wait unanswered for ``session_expiry_s``: so the worker first leaves the group (the broker then
        gives the others everything), answers what its session still holds (``drain``, at most ``drain_timeout_s``,
        the settings' by default), and then ends it. ``end_session=False`` keeps the session and the subscription,
        for a restart that picks up its share.
        """
        if end_session and self._link is not None and self._link.connected:
            try:
                self._link.unsubscribe(shared_filter(self.settings.group, UTTERANCE), keep_handling=True)
            except (PublishRefused, TimeoutError) as error:
                log.warning("could not leave the shared subscription before stopping: %s", error)
            else:
                self.drain(self.settings.drain_timeout_s if drain_timeout_s is None else drain_timeout_s)
        self._stopping.set()  # ends a storage retry: what it holds stays unacknowledged, with the broker
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join()
        if self._link is not None:
            self._link.close(end_session=end_session)
        self.metrics.close()
        if self._owns_store and self.store is not None:
            self.store.close()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every delivery received is handled and none has come for ``drain_quiet_s``, at most
        ``timeout_s``; whether it got there. The broker sends a session's queue a window at a time, as the worker
        acknowledges, so quiet means the queue is empty."""
        settings = self.settings
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._traffic:
                quiet_for = time.monotonic() - self._last_received
                if self._outstanding == 0 and quiet_for >= settings.drain_quiet_s:
                    log.info("drained", extra={"detail": f"{self.counts['answered']} answered in all"})
                    return True
            time.sleep(0.05)
        with self._traffic:
            left = self._outstanding
        log.warning(
            "stopping before the session was drained: what it still holds is dropped with it",
            extra={"detail": f"{left} delivery(ies) in hand after {timeout_s:g} s"},
        )
        return False

    def _receive(self, delivery: Delivery) -> None:
        # The link's dispatcher thread: hand over to the batching thread, which gathers what arrives in its window.
        with self._traffic:
            self._outstanding += 1
            self._last_received = time.monotonic()
        self.metrics.received.inc()
        self.metrics.queue_depth.inc()
        self._inbox.put(_Received(delivery, time.monotonic(), time.time()))

    def _next_batch(self) -> list[_Received] | None:
        """Block for one delivery, then gather more: whatever is queued, and what arrives within the window."""
        first = self._inbox.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.settings.batching.window_ms / 1000
        while len(batch) < self.settings.batching.max_batch:
            try:
                item = self._inbox.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if item is None:
                self._inbox.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self.handle_batch(batch)
            except Exception:
                # Unacknowledged, the batch stays with the broker; this worker goes on with the next.
                log.exception("failed to handle a batch of %d", len(batch))
            finally:
                self.metrics.queue_depth.dec(len(batch))
                with self._traffic:
                    self._outstanding -= len(batch)

    def handle_batch(self, batch: list[_Received]) -> None:
        """Answer a batch of deliveries; see the module's doc for the order of the steps."""
        started = time.monotonic()
        accepted = [item for item in (self._check(received) for received in batch) if item is not None]
        fresh: dict[tuple[str, str], list[_Accepted]] = {}
        try:
            for item in accepted:
                if item.key in fresh:  # the same utterance twice in one batch: transcribed once
                    fresh[item.key].append(item)
                    continue
                stored = self._with_storage(lambda item=item: self.store.answer_of(*item.key))
                if stored is None:
                    fresh[item.key] = [item]
                else:
                    self._answer_again(item, stored)
            if fresh:
                self._transcribe_and_answer(list(fresh.values()), started)
        except _Stopping:
            left = sum(len(copies) for copies in fresh.values())
            self.counts["unstored"] += left
            log.warning(
                "stopped while the database is unavailable: the broker keeps what was not acknowledged",
                extra={"detail": f"{left} utterance(s)"},
            )

    def _answer_again(self, item: _Accepted, stored: StoredAnswer) -> None:
        """A redelivery of a stored utterance: acknowledged, and answered again only if its answer never went out."""
        if stored.published_at is not None:
            item.received.delivery.ack()
            self.counts["already_published"] += 1
            log.about(stored.result).info("redelivery of an answered utterance acknowledged")
            return
        if self._answer(item.received, stored.result, how="stored"):
            self._with_storage(lambda: self.store.mark_published([item.key], time.time()))
        self.counts["replayed"] += 1
        log.about(stored.result).info("answered again from storage")

    def _with_storage(self, action: Callable[[], _T]) -> _T:
        """``action()``, tried again with backoff for as long as the database is unavailable.

        Raises _Stopping when the worker is told to stop meanwhile.
        """
        backoff = Backoff(self.settings.storage_retry)
        while True:
            try:
                value = action()
            except StorageUnavailable as error:
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    self.metrics.storage_available.set(0)
                    log.error("database unavailable, retrying with backoff, acknowledging nothing: %s", error)
                self.counts["storage_retries"] += 1
                self.metrics.storage_retries.inc()
                if self._stopping.wait(delay):
                    raise _Stopping from error
                continue
            if backoff.failures:
                self.metrics.storage_available.set(1)
                log.info("database available again", extra={"detail": f"after {backoff.failures} retries"})
            return value

    def _check(self, received: _Received) -> _Accepted | None:
        """The utterance of a delivery with its audio decoded, or None once it has been refused."""
        topic, envelope = received.delivery.topic, received.delivery.envelope
        try:
            utterance = decode(topic, envelope)
            audio_started = time.monotonic()
            limits = self.settings.limits
            if len(utterance.audio) > limits.max_payload_bytes:
                raise ProtocolError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    "utterance audio",
                    f"{len(utterance.audio)} bytes is over this worker's limit of {limits.max_payload_bytes}",
                )
            samples = decode_opus(utterance.audio, expected_rate=utterance.sample_rate, max_s=limits.max_audio_s)
            self._check_duration(utterance, samples.size / utterance.sample_rate)
            if utterance.sample_rate != SAMPLE_RATE:
                samples = soxr.resample(samples, utterance.sample_rate, SAMPLE_RATE).astype(np.float32)
        except ProtocolError as error:
            self._refuse(topic, envelope, error)
            received.delivery.ack()  # nothing to store: the refusal was reported
            return None
        except Exception as error:
            # A check that broke on this input is a bug of ours, but it costs this utterance only: left
            # unacknowledged it would come back forever and, 20 of them, fill the broker's in-flight window.
            log.exception("checking an utterance failed", extra={"topic": topic})
            failure = ProtocolError(
                ErrorCode.INTERNAL_ERROR, "utterance", f"could not be checked ({type(error).__name__})"
            )
            self._refuse(topic, envelope, failure)
            received.delivery.ack()
            return None
        return _Accepted(received, utterance, samples, time.monotonic() - audio_started)

    def _transcribe_and_answer(self, groups: list[list[_Accepted]], started: float) -> None:
        firsts = [copies[0] for copies in groups]
        asr_started = time.monotonic()
        try:
            transcripts: list[Transcript | None] = self.transcriber.transcribe([item.samples for item in firsts])
            failure = None
        except Exception as error:
            log.exception("speech recognition failed for a batch of %d", len(firsts))
            transcripts, failure = [None] * len(firsts), error
        asr_s = time.monotonic() - asr_started
        audio_s = sum(item.samples.size for item in firsts) / SAMPLE_RATE
        self.metrics.batch_size.observe(len(firsts))
        self.metrics.real_time_factor.observe(asr_s / audio_s)
        records = []
        for item, transcript in zip(firsts, transcripts, strict=True):
            timings = {
                "queue": _ms(started - item.received.received_at),
                "decode": _ms(item.decode_s),
                "asr": _ms(asr_s),
                "total": _ms(time.monotonic() - item.received.received_at),
            }
            result = self._result(item.utterance, transcript, failure, timings)
            records.append(StoredUtterance(item.utterance, item.received.received_unix, transcript, result))
        stored = self._with_storage(lambda: self.store.save(records))
        self.counts["transcribed"] += len(firsts)
        published = []
        for copies, record in zip(groups, records, strict=True):
            self.metrics.latency.observe(record.result.timings_ms["total"] / 1000)
            if copies[0].key not in stored:
                # Another worker stored it first (a device sent it again while both had it): that worker's answer
                # stands, and it answers; should it die first, the device's next copy is answered from storage.
                for copy in copies:
                    copy.received.delivery.ack()
                self.counts["answered_elsewhere"] += 1
                log.about(record.result).info("stored first by another worker, which answers it")
                continue
            # One answer per utterance: the other copies in the batch (a redelivery that met its original)
            # are only acknowledged, and only once that answer has gone out.
            if self._answer(copies[0].received, record.result, how="transcribed"):
                published.append(copies[0].key)
                for copy in copies[1:]:
                    copy.received.delivery.ack()
                    self.counts["already_published"] += 1
            log.about(record.result).info(
                "answered",
                extra={
                    "intent": record.result.intent,
                    "confidence": record.result.confidence,
                    "detail": record.result.transcript,
                },
            )
        # Acknowledged already: should this fail, a redelivery cannot happen; the record only spares a second answer
        # to a message the broker sends again because its acknowledgement was lost.
        self._with_storage(lambda: self.store.mark_published(published, time.time()))

    def _result(
        self, utterance: Utterance, transcript: Transcript | None, failure: Exception | None, timings: dict[str, float]
    ) -> Result:
        if transcript is None:
            self.metrics.failed.labels(str(ErrorCode.ASR_FAILED)).inc()
            reason = f"speech recognition failed: {type(failure).__name__}: {failure}"[:1024]
            return Result.failure(
                utterance.device_id,
                utterance.utterance_id,
                Source.CLOUD,
                ErrorInfo(ErrorCode.ASR_FAILED, reason),
                timings,
            )
        match = self.decider.decide(transcript)
        return Result(
            device_id=utterance.device_id,
            utterance_id=utterance.utterance_id,
            source=Source.CLOUD,
            transcript=transcript.text[:MAX_TRANSCRIPT_CHARS],
            intent=match.intent,
            slots=dict(match.slots),
            confidence=match.score,
            timings_ms=timings,
        )

    def _answer(self, received: _Received, result: Result, *, how: str) -> bool:
        """Reply with ``result`` on the device's reply topic, then acknowledge; unacknowledged if the publish fails.

        Only there: the Response Topic was checked to be that topic (Utterance.from_wire), and the result topic is
        the device's to publish on.
        """
        try:
            self._link.send(CloudReply.of_result(result))
        except (PublishRefused, TimeoutError, ProtocolError) as error:
            log.about(result).error("could not publish the answer: %s", error)
            return False
        received.delivery.ack()
        self.counts["answered"] += 1
        self.metrics.answered.labels(how).inc()
        return True

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
        self.metrics.failed.labels(str(error.code)).inc()
        device_id = (UTTERANCE.match(topic) or {}).get("device_id")
        utterance_id = (envelope.correlation_data or b"").decode("ascii", errors="replace") or None
        log.bind(device_id=device_id, utterance_id=utterance_id).warning(
            "refused: %s", error, extra={"topic": topic, "code": str(error.code)}
        )
        report = ErrorReport.from_error(
            error, reporter=self.reporter, topic=topic, device_id=device_id, utterance_id=utterance_id
        )
        self._send_refusal(report, "error report", device_id, utterance_id)
        if device_id is None or utterance_id is None:
            return
        try:
            # Answer only on the device's own reply topic, never on a topic the request chose: a device of the
            # previous release, naming its result topic, gets the error report and no reply.
            if envelope.response_topic != REPLY.topic(device_id=device_id):
                return
            failure = Result.failure(
                device_id,
                utterance_id,
                Source.CLOUD,
                ErrorInfo(error.code, str(error)[:1024]),
                timings_ms={"total": 0.0},
            )
            self._send_refusal(CloudReply.of_result(failure), "error reply", device_id, utterance_id)
        except ProtocolError:
            # The ids themselves are what is wrong: the error report is all we can do.
            return

    def _send_refusal(self, message: Message, what: str, device_id: str | None, utterance_id: str | None) -> None:
        """Publish the error report or reply of a refused utterance. Called from the handler of the refusal, so a
        publish that fails is logged and counted (``refusals_unsent``), never raised: the utterance is still
        acknowledged, or it would come back forever."""
        try:
            self._link.send(message)
        except (PublishRefused, TimeoutError, LinkClosed) as error:
            self.counts["refusals_unsent"] += 1
            log.bind(device_id=device_id, utterance_id=utterance_id).error("could not publish the %s: %s", what, error)


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)
