"""The device online: the listening pipeline, connected to the broker, acting on what it understands.

Every utterance gets exactly one result on the device's result topic, published by
the device, saying where the decision came from and whether the device acted on it.
A confident command becomes an edge result at once, then its local action. An
uncertain or out-of-vocabulary utterance goes to the cloud as Opus over MQTT 5
request/response, on a pool of threads so that listening never waits for the cloud;
the worker replies on the device's reply topic, and the device judges the reply
(device/cloud_answer.py: it acts on a cloud intent only at ``cloud.min_confidence``
or above) and publishes the result, then acts. Without a reply in time it publishes
a ``cloud_timeout`` result, and a later reply is not acted on and gets no second
result. With ``upload = never`` no audio leaves the device, and the utterance is
reported as ``not_understood``.

Results and requests go through the persistent outbox (device/outbox.py): the device
starts, listens and acts on confident commands with the broker unreachable, and what
it has to say is sent, in order, when the connection is back. A request that never
reached the broker in time gets no ``cloud_timeout`` result: the cloud answers it
once it arrives, and the device publishes its result then, not acted on. The retained
status is sent directly, and again on each reconnection (the broker published the
offline Last Will meanwhile).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from common.logfmt import ContextLogger
from common.mqtt import MqttLink, PublishRefused
from device.actions import ActionRequest, ActionRunner
from device.audio_sources import AudioSource
from device.capture import NoSpeech
from device.cloud_answer import cloud_result
from device.cloud_client import CloudClient, CloudDeferred, PastRequest
from device.detector import WakeEvent
from device.local_model import LocalModel
from device.ota import ModelUpdater, StartingModel
from device.outbox import Outbox, OutboxSender
from device.pipeline import CommandEvent, ListeningPipeline
from device.presence import Presence
from device.settings import DeviceSettings, UploadPolicy
from schemas.errors import ErrorCode, ProtocolError
from schemas.reply import CloudReply
from schemas.result import ErrorInfo, Result, Source
from schemas.status import DeviceState, OtaProgress
from schemas.utterance import Hypothesis, UploadReason, Utterance, new_utterance_id

log = logging.getLogger(__name__)

FLUSH_ON_STOP_S = 5.0
"""On stopping, how long (seconds) to wait for the broker to take what the outbox holds."""


class DeviceRuntime:
    """One device process: ``run(source)`` listens until the source ends or ``stop()`` is called."""

    def __init__(self, settings: DeviceSettings, model: LocalModel, starting: StartingModel | None = None) -> None:
        """``starting`` carries the state folder and any pending update report, when model updates are on."""
        self.settings = settings
        self.model = model
        self._next_model: LocalModel | None = None
        self._updater: ModelUpdater | None = None
        if starting is not None and starting.installed is not None:
            self._updater = ModelUpdater(
                settings, starting.installed, report=self._report, on_model=self._use_model, count=self.count
            )
        self.device_id = settings.device_id
        self._log = ContextLogger(log, device_id=settings.device_id)
        """This device's logger: its lines carry the device id, and those about an utterance its id too."""
        channel = settings.ota.channel if self._updater is not None else None
        self.presence = Presence(settings.device_id, model.version, channel)
        self._counter_lock = threading.Lock()
        self.actions = ActionRunner(settings.actions, count=self.count)
        self.pipeline = ListeningPipeline(model, settings.capture, settings.denoise)
        self._stopping = threading.Event()
        self._link: MqttLink | None = None
        self._cloud: CloudClient | None = None
        self._source: AudioSource | None = None
        self.outbox = Outbox(settings.outbox, on_drop=self._dropped)
        self._sender: OutboxSender | None = None
        self._sample_rng = random.Random()
        """Draws which edge decisions go to the cloud as training samples (cloud.training_sample_share)."""
        self._announce = threading.Event()
        """Set on each connection: the status thread publishes the online status again."""
        self._heard_utterance_id: str | None = None
        """The id of the utterance after the last wake, given at the wake so that its log lines all carry it."""

    def count(self, name: str, amount: int = 1) -> None:
        """Add to one of the counters that the status reports."""
        with self._counter_lock:
            self.presence.counters[name] += amount

    def stop(self) -> None:
        """Stop listening (from a signal handler or another thread); ``run`` then finishes and returns."""
        self._stopping.set()
        if self._source is not None:
            self._source.close()

    def run(self, source: AudioSource) -> None:
        """Connect, announce online, listen to ``source`` until it ends or stop(), then announce offline."""
        self._source = source
        settings = self.settings
        link = MqttLink(self.device_id, settings.broker, will=self.presence.last_will(), require_connection=False)
        with link:
            self._link = link
            self._sender = OutboxSender(self.outbox, link, on_sent=self._sent)
            if settings.cloud.upload == UploadPolicy.UNCERTAIN:
                # Before the sender starts: requests held from an earlier run are known as deferred before they go.
                self._cloud = CloudClient(
                    link,
                    self.device_id,
                    outbox=self.outbox,
                    sender=self._sender,
                    on_deferred_reply=self._deferred_reply,
                    count=self.count,
                )
            self._sender.start()
            link.on_connection(lambda _session_present: self._announce.set())
            if link.connected:
                self._publish_status(DeviceState.ONLINE)
            self._start_updates(link)
            self._log.info(
                "listening as %s with model %s",
                self.device_id,
                self.model.version,
                extra={"version": self.model.version},
            )
            status_thread = threading.Thread(target=self._refresh_status, name="status", daemon=True)
            status_thread.start()
            cloud_pool = ThreadPoolExecutor(settings.cloud.max_in_flight, thread_name_prefix="cloud")
            try:
                for block in source.blocks():
                    if self._stopping.is_set():
                        break
                    if self._next_model is not None and not self.pipeline.capturing:
                        self._switch_model()
                    for event in self.pipeline.push(block):
                        self._handle(event, cloud_pool)
                for event in self.pipeline.finish():
                    self._handle(event, cloud_pool)
            finally:
                if self._updater is not None:
                    self._updater.stop()
                # Answers already asked for are still awaited (at most cloud.timeout_s), and their actions run.
                cloud_pool.shutdown(wait=True)
                self.actions.close(wait=True)
                self._stopping.set()
                self._announce.set()  # wakes the status thread, which then sees it is stopping
                status_thread.join()
                # What the broker can take now goes; the rest waits in the outbox for the next start.
                if link.connected:
                    self._sender.flush(FLUSH_ON_STOP_S)
                    if self._cloud is not None:
                        # Deferred requests just sent are answered within the cloud's timeout: their results too.
                        self._cloud.settle(settings.cloud.timeout_s)
                        self._sender.flush(FLUSH_ON_STOP_S)
                if self._cloud is not None:
                    self._cloud.close()
                self._sender.stop()
                unsent = self.outbox.stats().messages
                if unsent:
                    self._log.warning("%d message(s) left in the outbox for the next start", unsent)
                if link.connected:
                    self._publish_status(DeviceState.OFFLINE)
                self.outbox.close()
                self._log.info("stopped")

    def _start_updates(self, link: MqttLink) -> None:
        if self._updater is None:
            return
        installed = self._updater.installed
        pending = installed.pending_progress()
        if pending is not None and self._report(pending):
            installed.reported()
        self._updater.start(link)

    def _report(self, progress: OtaProgress) -> bool:
        """Publish a model update step in the retained status."""
        with self._counter_lock:
            self.presence.ota = progress
        return self._publish_status(DeviceState.ONLINE)

    def _use_model(self, model: LocalModel) -> None:
        """A committed update: the listening loop switches to it between utterances."""
        with self._counter_lock:
            self.presence.model_version = model.version
        self._next_model = model

    def _switch_model(self) -> None:
        model, self._next_model = self._next_model, None
        assert model is not None
        self.pipeline = ListeningPipeline(model, self.settings.capture, self.settings.denoise)
        self.model = model
        self._log.info("listening with model %s", model.version, extra={"version": model.version})

    def _status(self, state: DeviceState):
        outbox = self.outbox.stats()
        with self._counter_lock:
            self.presence.counters["outbox_messages"] = outbox.messages
            for name in ("dropped_blocks", "input_overflows"):
                if hasattr(self._source, name):
                    self.presence.counters[f"audio_{name}"] = getattr(self._source, name)
            return self.presence.status(state)

    def _refresh_status(self) -> None:
        next_refresh = time.monotonic() + self.settings.status_interval_s
        while not self._stopping.is_set():
            announce = self._announce.wait(max(next_refresh - time.monotonic(), 0.0))
            if self._stopping.is_set():
                return
            self._announce.clear()
            if announce or time.monotonic() >= next_refresh:
                if self._link is not None and self._link.connected:
                    self._publish_status(DeviceState.ONLINE)
                next_refresh = time.monotonic() + self.settings.status_interval_s

    def _publish_status(self, state: DeviceState) -> bool:
        """Publish the retained status now, directly (not through the outbox: the next one replaces it)."""
        assert self._link is not None
        try:
            self._link.send(self._status(state))
            return True
        except (PublishRefused, TimeoutError, ProtocolError) as error:
            self.count("publish_failures")
            self._log.error("publish failed: %s", error)
            return False

    def _queue_result(self, result: Result) -> bool:
        """Put a result in the outbox, to be sent in order as soon as the broker can take it; False when the
        outbox refused it (not valid, or dropped under its drop policy)."""
        try:
            seq = self.outbox.put(result)
        except ProtocolError as error:
            self.count("publish_failures")
            self._log.bind(utterance_id=result.utterance_id).error("result not valid, not sent: %s", error)
            return False
        if seq is not None and self._sender is not None:
            self._sender.wake()
        return seq is not None

    def _dropped(self, reason: str, count: int) -> None:
        self.count(f"outbox_dropped_{reason}", count)

    def _sent(self, entry) -> None:
        self.count(f"{entry.kind}s_sent")

    def _handle(self, event: WakeEvent | NoSpeech | CommandEvent, cloud_pool: ThreadPoolExecutor) -> None:
        if isinstance(event, WakeEvent):
            self.count("wakes")
            self._heard_utterance_id = new_utterance_id()
            heard = self._log.bind(utterance_id=self._heard_utterance_id)
            heard.info("wake", extra={"time_s": event.time_s, "score": event.score})
            return
        # The pipeline gives a wake, then its utterance's outcome: the outcome takes the id the wake was logged with.
        utterance_id = self._heard_utterance_id or new_utterance_id()
        self._heard_utterance_id = None
        if isinstance(event, NoSpeech):
            self.count("no_speech")
            self._log.bind(utterance_id=utterance_id).info("wake without speech")
        elif event.local:
            self._answer_locally(event, utterance_id)
            if self._cloud is not None and self._sample_rng.random() < self.settings.cloud.training_sample_share:
                cloud_pool.submit(self._share_sample, event, utterance_id)
        elif self._cloud is None:
            self._not_understood(event, utterance_id)
        else:
            cloud_pool.submit(self._ask_cloud, event, utterance_id)

    def _answer_locally(self, event: CommandEvent, utterance_id: str) -> None:
        """Publish the edge result and act on it."""
        result = Result(
            device_id=self.device_id,
            utterance_id=utterance_id,
            source=Source.EDGE,
            transcript=None,
            intent=event.intent,
            slots=dict(event.slots),
            confidence=event.decision.confidence,
            timings_ms=event.timings_ms | {"total": _ms_since(event.utterance.endpointed_at)},
            acted=True,
        )
        if self._queue_result(result):
            self.count("edge_results")
        self._log.bind(utterance_id=utterance_id).info("edge result", extra=_decision(event))
        self._act(event.intent, event.slots, Source.EDGE, event.decision.confidence, utterance_id)

    def _share_sample(self, event: CommandEvent, utterance_id: str) -> None:
        """Send an utterance decided on the device to the cloud, only to be labelled for training (same id as its
        edge result, so the label can be set beside the decision)."""
        assert self._cloud is not None
        try:
            self._cloud.send_sample(self._utterance(event, utterance_id, UploadReason.TRAINING_SAMPLE))
        except (PublishRefused, TimeoutError, ProtocolError) as error:
            self.count("training_samples_dropped")
            self._log.bind(utterance_id=utterance_id).warning("training sample not sent: %s", error)
            return
        self.count("training_samples_sent")

    def _utterance(self, event: CommandEvent, utterance_id: str, reason: UploadReason) -> Utterance:
        """The captured audio as heard, with the device's guesses, as a request to the cloud."""
        captured = event.utterance
        return Utterance.from_samples(
            self.device_id,
            captured.audio,
            captured.sample_rate,
            hypotheses=tuple(Hypothesis(best.intent, dict(best.slots), best.score) for best in event.alternatives),
            model_version=self.model.version,
            reason=reason,
            utterance_id=utterance_id,
            share_for_training=self.settings.cloud.share_for_training,
        )

    def _not_understood(self, event: CommandEvent, utterance_id: str) -> None:
        guess, score = event.decision.alternatives[0]
        error = ErrorInfo(
            ErrorCode.NOT_UNDERSTOOD,
            f"the device was unsure (best guess {guess} at {score:.2f}) and its upload policy is never",
        )
        timings = event.timings_ms | {"total": _ms_since(event.utterance.endpointed_at)}
        if self._queue_result(Result.failure(self.device_id, utterance_id, Source.EDGE, error, timings)):
            self.count("not_understood")
        about = self._log.bind(utterance_id=utterance_id)
        about.info("not understood, audio kept on the device", extra=_decision(event))

    def _ask_cloud(self, event: CommandEvent, utterance_id: str) -> None:
        assert self._cloud is not None
        captured = event.utterance
        about = self._log.bind(utterance_id=utterance_id)
        try:
            reason = UploadReason.OUT_OF_VOCABULARY if event.intent is None else UploadReason.LOW_CONFIDENCE
            utterance = self._utterance(event, utterance_id, reason)
            self.count("cloud_requests")
            about.info("asking the cloud", extra=_decision(event) | {"reason": str(reason)})
            reply = self._cloud.ask(
                utterance, timeout_s=self.settings.cloud.timeout_s, resend_after_s=self.settings.cloud.resend_after_s
            )
        except CloudDeferred as deferred:
            # No cloud_timeout result: the request is answered by the cloud once it gets there (_deferred_reply).
            self.count("cloud_deferred")
            about.warning("cloud request deferred: %s", deferred)
            return
        except (ProtocolError, PublishRefused, TimeoutError) as error:
            self.count("cloud_failures")
            about.error("cannot ask the cloud: %s", error)
            return
        if reply is None:
            self.count("cloud_timeouts")
            timeout = ErrorInfo(
                ErrorCode.CLOUD_TIMEOUT, f"no answer from the cloud within {self.settings.cloud.timeout_s:g} s"
            )
            timings = {"total": _ms_since(captured.endpointed_at)}
            self._queue_result(Result.failure(self.device_id, utterance_id, Source.EDGE, timeout, timings))
            about.warning("cloud timeout")
            return
        self.count("cloud_results")
        result = self._publish_cloud_result(reply, may_act=True, total_ms=_ms_since(captured.endpointed_at))
        if result.acted:
            self._act(result.intent, result.slots, Source.CLOUD, result.confidence, utterance_id)

    def _deferred_reply(self, reply: CloudReply, request: PastRequest) -> None:
        """The cloud's reply to a request that waited in the outbox: its result, published now and not acted on
        (a command obeyed minutes late could do harm)."""
        self._publish_cloud_result(reply, may_act=False, total_ms=round(1000 * (time.time() - request.asked_at), 3))

    def _publish_cloud_result(self, reply: CloudReply, *, may_act: bool, total_ms: float) -> Result:
        """The utterance's one result, from the cloud's reply as this device judges it, put in the outbox."""
        result = cloud_result(
            reply, min_confidence=self.settings.cloud.min_confidence, may_act=may_act, total_ms=max(total_ms, 0.0)
        )
        under_floor = reply.error is None and result.error is not None
        if under_floor:
            self.count("cloud_under_floor")
        self._queue_result(result)
        context = {
            "intent": reply.intent,
            "slots": dict(reply.slots),
            "transcript": reply.transcript,
            "confidence": reply.confidence,
            "acted": result.acted,
            "latency_ms": round(total_ms),
        }
        if result.error is not None:
            context |= {"code": str(result.error.code), "detail": result.error.message}
        message = "cloud result" if may_act else "cloud result of a deferred request, not acted on"
        self._log.bind(utterance_id=result.utterance_id).info(message, extra=context)
        return result

    def _act(self, intent: str | None, slots, source: Source, confidence: float, utterance_id: str) -> None:
        if intent is None:
            return
        request = ActionRequest(intent, dict(slots), str(source), confidence, self.device_id, utterance_id)
        self.actions.submit(request)


def _decision(event: CommandEvent) -> dict:
    """What the device made of an utterance, for its log lines; an unsure one names the device's best guess."""
    decision = {
        "intent": event.intent,
        "slots": dict(event.slots),
        "confidence": event.decision.confidence,
        "time_s": round(event.time_s, 3),
    }
    if event.intent is None:
        decision["detail"] = f"best guess {event.alternatives[0].label}"
    return decision


def _ms_since(moment: float) -> float:
    return round(1000 * (time.perf_counter() - moment), 3)
