"""Asking the cloud about an utterance: MQTT 5 request/response, answered on the device's own reply topic.

With an outbox, the request is written there and sent by its sender, in order with the
device's results; while the broker is unreachable it waits there, and ``ask`` raises
CloudDeferred: the cloud answers once the request reaches it, too late to act on, and
``on_deferred_reply`` is given that answer, so that the device publishes the utterance's
result then.

Threads: the link's dispatcher thread only puts each reply on a queue; the client's own
``cloud-replies`` thread decodes it and hands it on (to the waiting ``ask`` through its
Future), since a deferred one leads to a write to the outbox, which would hold up the
link's other deliveries, and ``close`` must stop that before the outbox closes while the
link stays open. The client remembers the requests it stopped waiting for (the most recent
ones, at least as many as the outbox holds), so that each reply is one of:

- awaited: handed to the ``ask`` waiting for it;
- late, after the device gave up (it published a ``cloud_timeout`` result): logged and
  counted (``cloud_late_replies``), not acted on, no second result;
- for a deferred request: given to ``on_deferred_reply``, once (``cloud_deferred_replies``);
- a copy of a reply already handled (QoS 1 delivers at least once): ignored;
- about an utterance this device is not waiting for and does not remember: a warning
  naming it, counted (``cloud_unknown_replies``), nothing acted on or published.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import TYPE_CHECKING

from common.logfmt import ContextLogger
from common.mqtt import MqttLink, PublishRefused
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.protocol import decode
from schemas.reply import CloudReply
from schemas.topics import REPLY
from schemas.utterance import Utterance

if TYPE_CHECKING:
    from device.outbox import Outbox, OutboxSender

log = logging.getLogger(__name__)

REMEMBERED_REQUESTS = 500
"""Requests the client stopped waiting for that it still tells apart (late, deferred, answered), most recent
first; with an outbox, at least its max_messages, so that every request it can hold is still known."""

SETTLE_POLL_S = 0.05
"""How often ``settle`` looks again whether the outbox has sent a deferred request."""


class CloudDeferred(Exception):
    """The request was still in the outbox (the broker unreachable) when the wait ended; it is sent later."""


class Outcome(StrEnum):
    """How the wait for a request's reply ended."""

    ANSWERED = "answered"
    """Its reply came (in time, or later for a deferred request) and was handled."""
    TIMED_OUT = "timed_out"
    """No reply in time: the device gave up (a cloud_timeout result)."""
    DEFERRED = "deferred"
    """Still in the outbox when the wait ended: its reply, when it comes, is given to ``on_deferred_reply``."""
    SAMPLE = "sample"
    """A training sample (decided on the device, sent only to be labelled): its reply is counted, nothing more."""


@dataclass(frozen=True)
class PastRequest:
    """A request the client no longer waits for."""

    outcome: Outcome
    """How its wait ended."""
    asked_at: float
    """Unix time (seconds) of the utterance (its end, or when it was put in the outbox)."""
    seq: int | None
    """Its place in the outbox, while it may still be there; None without an outbox."""


DeferredReplyHandler = Callable[[CloudReply, PastRequest], None]
"""Called on the client's thread with the reply to a deferred request and what the client remembers of it."""


class CloudClient:
    """Sends utterances and waits for the cloud's reply on the device's reply topic; ``close()`` when done."""

    def __init__(
        self,
        link: MqttLink,
        device_id: str,
        *,
        outbox: Outbox | None = None,
        sender: OutboxSender | None = None,
        on_deferred_reply: DeferredReplyHandler | None = None,
        count: Callable[[str], None] | None = None,
    ) -> None:
        """Requests go through ``outbox`` and its ``sender`` when given, else straight to the link. The requests
        the outbox still holds (from before a restart) are taken as deferred. ``count(name)`` adds to a counter of
        the device's status."""
        self._link = link
        self._log = ContextLogger(log, device_id=device_id)
        self._outbox = outbox
        self._sender = sender
        self._on_deferred_reply = on_deferred_reply
        self._count = count or (lambda name: None)
        self._pending: dict[str, Future[CloudReply]] = {}
        """By utterance id: the reply each ``ask`` waits for (set by the first reply to arrive)."""
        self._past: OrderedDict[str, PastRequest] = OrderedDict()
        self._capacity = max(REMEMBERED_REQUESTS, outbox.settings.max_messages if outbox is not None else 0)
        self._lock = threading.Lock()
        self._inbox: queue.Queue[tuple[str, Envelope] | None] = queue.Queue()
        if outbox is not None:
            for request in outbox.held_requests():
                self._remember(request.utterance_id, PastRequest(Outcome.DEFERRED, request.created_at, request.seq))
        self._thread = threading.Thread(target=self._run, name="cloud-replies", daemon=True)
        self._thread.start()
        # Subscribed before the first request, so no answer can arrive unheard.
        link.subscribe(REPLY.topic(device_id=device_id), self._receive, qos=REPLY.qos)

    def ask(self, utterance: Utterance, timeout_s: float, resend_after_s: float = 0.0) -> CloudReply | None:
        """Publish ``utterance`` and return the cloud's reply, or None if none came within ``timeout_s`` (the device
        then gives up on it: a later reply is late).

        After ``resend_after_s`` (0: never) without a reply, then after twice as long, and so on, a request that
        has left the device is sent again, with the same utterance id: one that went to a worker which died, or
        into the session of a worker that stopped, reaches a live one, and the workers answer an utterance id
        once. One still in the outbox (the broker unreachable) is not sent twice.

        Raises CloudDeferred when the request is still in the outbox at the end of the wait, and
        PublishRefused when it could not be sent or kept.
        """
        waiter: Future[CloudReply] = Future()
        utterance_id = utterance.utterance_id
        with self._lock:
            self._pending[utterance_id] = waiter
        try:
            queued = self._hand_over(utterance)
            deadline = time.monotonic() + timeout_s
            wait_s = resend_after_s if resend_after_s > 0 else float("inf")
            resend_at = time.monotonic() + wait_s
            while not wait([waiter], max(0.0, min(deadline, resend_at) - time.monotonic())).done:
                if time.monotonic() >= deadline:
                    break
                # Each wait twice the last: workers that are only slow (a backlog) get few copies to skip.
                wait_s *= 2
                resend_at = time.monotonic() + wait_s
                if queued is None or not self._outbox.holds(queued):
                    queued = self._resend(utterance, queued)
        except BaseException:
            with self._lock:
                del self._pending[utterance_id]
            raise
        with self._lock:
            # Under the lock that replies are matched under: a reply either resolved the Future or finds this record.
            del self._pending[utterance_id]
            if waiter.done():
                outcome = Outcome.ANSWERED
            elif queued is not None and self._outbox.holds(queued):
                outcome = Outcome.DEFERRED
            else:
                outcome = Outcome.TIMED_OUT
            self._remember(utterance_id, PastRequest(outcome, utterance.captured_at, queued))
        if outcome == Outcome.DEFERRED:
            raise CloudDeferred(f"the broker is unreachable: the request waits in the outbox after {timeout_s:g} s")
        return waiter.result() if waiter.done() else None

    def _resend(self, utterance: Utterance, queued: int | None) -> int | None:
        """Send an unanswered request again; its new outbox seq (the old one if it could not be sent)."""
        about = self._log.about(utterance)
        try:
            queued = self._hand_over(utterance)
        except (PublishRefused, TimeoutError) as error:
            about.warning("could not send an unanswered request again: %s", error)
            return queued
        self._count("cloud_resends")
        about.info("no cloud answer yet: sent the request again")
        return queued

    def settle(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the replies to the deferred requests that have left the outbox (a stopping
        device flushed them); whether none is left waiting. Those still in the outbox wait for the next start."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                waiting = [
                    past
                    for past in self._past.values()
                    if past.outcome == Outcome.DEFERRED and past.seq is not None and not self._outbox.holds(past.seq)
                ]
            if not waiting:
                return True
            if time.monotonic() >= deadline:
                self._log.warning("stopping with %d deferred request(s) sent and not answered yet", len(waiting))
                return False
            time.sleep(SETTLE_POLL_S)

    def close(self) -> None:
        """Stop handling replies (those already received are handled first)."""
        self._inbox.put(None)
        self._thread.join()

    def send_sample(self, utterance: Utterance) -> None:
        """Send a training sample straight to the broker (not through the outbox: a sample lost while the broker
        is away costs nothing), remembering it so that its reply is known and ignored.

        Raises PublishRefused or TimeoutError when the broker does not take it.
        """
        with self._lock:
            self._remember(utterance.utterance_id, PastRequest(Outcome.SAMPLE, time.time(), None))
        self._link.send(utterance)

    def _hand_over(self, utterance: Utterance) -> int | None:
        """Send or keep the request; its outbox seq, or None when sent straight."""
        if self._outbox is None:
            self._link.send(utterance)
            return None
        queued = self._outbox.put(utterance)
        if queued is None:
            raise PublishRefused("the outbox is full and its drop policy refused the request")
        if self._sender is not None:
            self._sender.wake()
        return queued

    def _remember(self, utterance_id: str, past: PastRequest) -> None:
        # Called with the lock held (or before the thread starts).
        self._past[utterance_id] = past
        self._past.move_to_end(utterance_id)
        while len(self._past) > self._capacity:
            self._past.popitem(last=False)

    def _receive(self, topic: str, envelope: Envelope) -> None:
        # The link's dispatcher thread: hand over and return (see the module's doc).
        self._inbox.put((topic, envelope))

    def _run(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                self._handle(*item)
            except Exception:
                self._log.exception("handling a cloud reply failed")

    def _handle(self, topic: str, envelope: Envelope) -> None:
        try:
            reply = decode(topic, envelope)
        except ProtocolError as error:
            self._log.warning("ignored invalid cloud reply: %s", error, extra={"topic": topic})
            return
        about = self._log.bind(utterance_id=reply.utterance_id, intent=reply.intent)
        with self._lock:
            waiter = self._pending.get(reply.utterance_id)
            if waiter is not None:
                if not waiter.done():  # only this thread sets it: the first reply is the answer
                    waiter.set_result(reply)
                return
            past = self._past.get(reply.utterance_id)
        if past is None:
            self._count("cloud_unknown_replies")
            about.warning(
                "cloud answer about utterance %s, which this device is not waiting for and does not remember:"
                " not acted on, no result",
                reply.utterance_id,
            )
        elif past.outcome == Outcome.TIMED_OUT:
            self._count("cloud_late_replies")
            about.warning("cloud answer after the device gave up, not acted on, no second result")
        elif past.outcome == Outcome.SAMPLE:
            self._count("training_samples_labelled")
            about.debug("cloud label of a training sample, nothing to do")
        elif past.outcome == Outcome.ANSWERED:
            about.info("copy of a cloud answer already handled, ignored")
        else:
            self._count("cloud_deferred_replies")
            about.info("cloud answer to a deferred request, too late to act on")
            if self._on_deferred_reply is not None:
                self._on_deferred_reply(reply, past)
            with self._lock:
                self._past[reply.utterance_id] = replace(past, outcome=Outcome.ANSWERED)
