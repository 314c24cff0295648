"""The device's outbox: results and utterances kept in SQLite until the broker has them, sent in order.

Everything the device publishes about an utterance (edge results, requests to the
cloud, its own error results) is written here first and removed only when the
broker's PUBACK arrives, so a message survives a broker restart, a network cut and a
restart of the device itself. While the broker is unreachable the device goes on
listening and acting on confident commands; the outbox fills, within its bounds
(messages, bytes, age), and its drop policy says what gives way. ``OutboxSender``
replays what is held, oldest first, once the connection is back.

An utterance is a request: the broker accepting it is not enough, a cloud worker must be
subscribed to take it. When the broker answers that no one was (right after a broker
restart, before the workers have subscribed again), the utterance stays and is sent again
after a backoff, for as long as its age allows. A result is for whoever listens, and
leaves the outbox once the broker has it.

Delivery is at least once: a message whose PUBACK was lost with the connection is sent
again. Results and utterances carry their utterance id, which is what receivers
deduplicate on (the cloud worker answers a repeated utterance once).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.backoff import Backoff, BackoffSettings
from common.logfmt import ContextLogger
from common.mqtt import LinkClosed, MqttLink, NoMatchingSubscribers, PublishRefused
from device.settings import DropPolicy, OutboxSettings
from schemas.envelope import Envelope
from schemas.protocol import Message, encode
from schemas.topics import UTTERANCE

log = ContextLogger(logging.getLogger(__name__))

IN_MEMORY = ":memory:"
"""OutboxSettings.path of an outbox that is not kept across restarts."""


@dataclass(frozen=True)
class OutboxEntry:
    """One message waiting for the broker."""

    seq: int
    """Position in the outbox: entries are sent in this order."""
    kind: str
    """The message's topic kind (``result``, ``utterance``)."""
    utterance_id: str | None
    """The utterance the message is about, for logs."""
    topic: str
    envelope: Envelope
    qos: int
    retain: bool
    created_at: float
    """Unix time (seconds) it was put in the outbox."""

    @property
    def size(self) -> int:
        return len(self.envelope.payload)


@dataclass(frozen=True)
class HeldRequest:
    """A request to the cloud (an utterance) still in the outbox."""

    seq: int
    """Its position in the outbox."""
    utterance_id: str
    """The utterance it asks about."""
    created_at: float
    """Unix time (seconds) it was put in the outbox."""


@dataclass(frozen=True)
class OutboxStats:
    """How full the outbox is, and what it gave up."""

    messages: int
    bytes: int
    dropped: dict[str, int]
    """Messages given up, by reason: ``full`` (room made under the drop policy), ``expired`` (older than
    max_age_s), ``too_large`` (over max_bytes on its own), ``refused`` (the broker refused it)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    utterance_id TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    properties TEXT NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_at REAL NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dropped (
    reason TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
"""


class Outbox:
    """A bounded, persistent FIFO of messages for the broker, safe to use from several threads."""

    def __init__(self, settings: OutboxSettings, *, on_drop: Callable[[str, int], None] | None = None) -> None:
        """``on_drop(reason, count)`` is told of every message given up (for the device's counters)."""
        self.settings = settings
        self._on_drop = on_drop
        path = settings.path or IN_MEMORY
        if path != IN_MEMORY:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._drops: list[tuple[str, int]] = []
        """Drops counted in the transaction under way, told to ``on_drop`` once it is committed."""
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        # WAL with full sync: a message put here survives a crash and a power cut.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.path = path

    def put(self, message: Message) -> int | None:
        """Validate, encode and keep ``message``; returns its seq, or None when the drop policy refused it.

        Raises ProtocolError for a message that is not valid (it could never be sent).
        """
        utterance_id = getattr(message, "utterance_id", None)  # results and utterances carry one, for the logs
        topic, envelope = encode(message)
        size = len(envelope.payload)
        now = time.time()
        with self._transaction():
            self._expire(now)
            if size > self.settings.max_bytes:
                self._count_drop("too_large", 1)
                log.bind(utterance_id=utterance_id).error(
                    "outbox: message of %d bytes is over max_bytes on its own, dropped", size
                )
                return None
            held_messages, held_bytes = self._totals()
            excess_messages = held_messages + 1 - self.settings.max_messages
            excess_bytes = held_bytes + size - self.settings.max_bytes
            if excess_messages > 0 or excess_bytes > 0:
                if self.settings.drop == DropPolicy.NEWEST:
                    self._count_drop("full", 1)
                    log.bind(utterance_id=utterance_id).warning(
                        "outbox full, the new message is dropped (drop = newest)"
                    )
                    return None
                self._drop_oldest(max(excess_messages, 0), max(excess_bytes, 0))
            cursor = self._db.execute(
                "INSERT INTO messages (kind, utterance_id, topic, payload, properties, qos, retain, created_at, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    message.spec.name,
                    utterance_id,
                    topic,
                    envelope.payload,
                    _properties_json(envelope),
                    message.spec.qos,
                    int(message.spec.retain),
                    now,
                    size,
                ),
            )
            return cursor.lastrowid

    def pending(self, *, after: int = 0, limit: int = 100) -> list[OutboxEntry]:
        """Entries with seq over ``after``, oldest first; entries past max_age_s are dropped first."""
        with self._transaction():
            self._expire(time.time())
            rows = self._db.execute(
                "SELECT seq, kind, utterance_id, topic, payload, properties, qos, retain, created_at FROM messages"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [_entry(row) for row in rows]

    def held_requests(self) -> list[HeldRequest]:
        """The utterances still waiting for the broker, oldest first (without their audio)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, utterance_id, created_at FROM messages WHERE kind = ? ORDER BY seq", (UTTERANCE.name,)
            ).fetchall()
        return [HeldRequest(seq, utterance_id, created_at) for seq, utterance_id, created_at in rows]

    def holds(self, seq: int) -> bool:
        """Whether the entry ``seq`` is still waiting for the broker."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM messages WHERE seq = ?", (seq,)).fetchone() is not None

    def remove(self, seq: int) -> None:
        """The broker has the entry: forget it."""
        with self._transaction():
            self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))

    def give_up(self, seq: int, reason: str) -> None:
        """Drop one entry that cannot be sent, counting it under ``reason``."""
        with self._transaction():
            if self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,)).rowcount:
                self._count_drop(reason, 1)

    def stats(self) -> OutboxStats:
        with self._lock:
            held_messages, held_bytes = self._totals()
            dropped = dict(self._db.execute("SELECT reason, count FROM dropped").fetchall())
        return OutboxStats(held_messages, held_bytes, dropped)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """The lock and one SQLite transaction. The drops it counts are told to ``on_drop`` after the commit, outside
        the lock: the callback may take locks of its own, or read the outbox, and a rolled-back drop is not told."""
        with self._lock, self._db:
            self._drops = drops = []
            yield
        if self._on_drop is not None:
            for reason, count in drops:
                self._on_drop(reason, count)

    def _totals(self) -> tuple[int, int]:
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
        return count, size

    def _expire(self, now: float) -> None:
        expired = self._db.execute(
            "DELETE FROM messages WHERE created_at < ?", (now - self.settings.max_age_s,)
        ).rowcount
        if expired:
            self._count_drop("expired", expired)
            log.warning("outbox: %d message(s) older than max_age_s dropped", expired)

    def _drop_oldest(self, messages: int, size: int) -> None:
        """Drop the oldest entries until ``messages`` entries and ``size`` bytes are freed."""
        freed_messages = freed_bytes = 0
        for seq, entry_size, utterance_id in self._db.execute(
            "SELECT seq, size, utterance_id FROM messages ORDER BY seq"
        ).fetchall():
            if freed_messages >= messages and freed_bytes >= size:
                break
            self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            freed_messages += 1
            freed_bytes += entry_size
            log.bind(utterance_id=utterance_id).warning("outbox full, oldest message dropped (drop = oldest)")
        self._count_drop("full", freed_messages)

    def _count_drop(self, reason: str, count: int) -> None:
        self._db.execute(
            "INSERT INTO dropped (reason, count) VALUES (?, ?)"
            " ON CONFLICT (reason) DO UPDATE SET count = count + excluded.count",
            (reason, count),
        )
        self._drops.append((reason, count))


class OutboxSender:
    """Sends what the outbox holds while the link is up: oldest first, ``in_flight`` at a time, backing off
    after a refusal. An entry leaves the outbox when the broker acknowledges it, and an utterance only when the
    broker had a subscriber to give it to."""

    def __init__(self, outbox: Outbox, link: MqttLink, *, on_sent: Callable[[OutboxEntry], None] | None = None) -> None:
        self.outbox = outbox
        self.link = link
        self._on_sent = on_sent
        settings = outbox.settings
        self._backoff = Backoff(BackoffSettings(settings.retry_initial_s, settings.retry_max_s))
        self._no_consumer = Backoff(BackoffSettings(settings.retry_initial_s, settings.retry_max_s))
        """Waits after utterances that found no cloud worker subscribed; never a reason to drop one."""
        self._in_flight: dict[int, tuple[OutboxEntry, Future[None]]] = {}
        """By seq: the entries handed to the link, with the Future of the broker's answer."""
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._resume_at = 0.0
        self._thread = threading.Thread(target=self._run, name="outbox", daemon=True)
        link.on_connection(lambda _session_present: self.wake())

    def start(self) -> OutboxSender:
        self._thread.start()
        return self

    def wake(self) -> None:
        """Something new was put, or the connection came back: look again now."""
        self._wake.set()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the outbox to empty (while connected); whether it did."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.outbox.stats().messages == 0:
                return True
            self.wake()
            time.sleep(0.02)
        return self.outbox.stats().messages == 0

    def stop(self) -> None:
        """Stop sending; what the broker has not acknowledged stays in the outbox for the next start."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._collect_outcomes()
            if self.link.connected and time.monotonic() >= self._resume_at:
                self._send_more()
            self._wake.wait(0.5)
            self._wake.clear()

    def _send_more(self) -> None:
        room = self.outbox.settings.in_flight - len(self._in_flight)
        if room <= 0:
            return
        after = max(self._in_flight, default=0)
        for entry in self.outbox.pending(after=after, limit=room):
            try:
                sent = self.link.publish_later(entry.topic, entry.envelope, qos=entry.qos, retain=entry.retain)
            except PublishRefused as error:
                log.bind(utterance_id=entry.utterance_id).error("outbox: message cannot be sent, dropped: %s", error)
                self.outbox.give_up(entry.seq, "refused")
                continue
            # The callback runs on the link's dispatcher thread: it only wakes this one, which writes to the outbox.
            sent.add_done_callback(lambda _sent: self._wake.set())
            self._in_flight[entry.seq] = (entry, sent)

    def _collect_outcomes(self) -> None:
        for seq in sorted(self._in_flight):  # in the order sent
            entry, sent = self._in_flight[seq]
            if not sent.done():
                continue
            del self._in_flight[seq]
            error = sent.exception()
            if isinstance(error, LinkClosed):
                continue  # the link closed first: kept, for the next start
            if isinstance(error, NoMatchingSubscribers) and entry.kind == UTTERANCE.name:
                # Gone, delivered to no one: kept, and sent again once a worker may have subscribed. Only its age
                # (outbox.max_age_s) ends this. The wait grows once per round, not once per message in flight.
                now = time.monotonic()
                if now >= self._resume_at:
                    delay = self._no_consumer.next_delay()
                    self._resume_at = now + delay
                    log.bind(utterance_id=entry.utterance_id).warning(
                        "outbox: no cloud worker is subscribed; utterances are kept and sent again in %.1f s", delay
                    )
                continue
            if error is None or isinstance(error, NoMatchingSubscribers):
                self.outbox.remove(entry.seq)
                self._backoff.reset()
                if error is None and entry.kind == UTTERANCE.name:
                    self._no_consumer.reset()
                if self._on_sent is not None:
                    self._on_sent(entry)
                continue
            # Refused by the broker (quota, server busy, not authorised): kept, and tried again after a wait.
            delay = self._backoff.next_delay()
            self._resume_at = time.monotonic() + delay
            log.bind(utterance_id=entry.utterance_id).warning(
                "outbox: the broker refused a message (%s); trying again in %.1f s", error, delay
            )
            if self._backoff.failures >= self.outbox.settings.max_attempts:
                log.bind(utterance_id=entry.utterance_id).error(
                    "outbox: refused %d times, dropped", self._backoff.failures
                )
                self.outbox.give_up(entry.seq, "refused")
                self._backoff.reset()


def _properties_json(envelope: Envelope) -> str:
    return json.dumps(
        {
            "content_type": envelope.content_type,
            "user_properties": [list(pair) for pair in envelope.user_properties],
            "response_topic": envelope.response_topic,
            "correlation_data": envelope.correlation_data.hex() if envelope.correlation_data is not None else None,
        }
    )


def _entry(row: tuple) -> OutboxEntry:
    seq, kind, utterance_id, topic, payload, properties, qos, retain, created_at = row
    fields = json.loads(properties)
    correlation = fields["correlation_data"]
    envelope = Envelope(
        payload=bytes(payload),
        content_type=fields["content_type"],
        user_properties=tuple((name, value) for name, value in fields["user_properties"]),
        response_topic=fields["response_topic"],
        correlation_data=bytes.fromhex(correlation) if correlation is not None else None,
    )
    return OutboxEntry(seq, kind, utterance_id, topic, envelope, qos, bool(retain), created_at)
