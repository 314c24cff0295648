"""Settings of a cloud worker, grouped by concern."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

from cloud_worker.asr import AsrSettings
from cloud_worker.storage import StorageSettings
from common.backoff import BackoffSettings
from common.mqtt import BrokerSettings
from common.opus import MAX_UTTERANCE_S
from schemas.topics import UTTERANCE


def _default_worker_id() -> str:
    # Stable across restarts: the broker keeps the worker's session under it (see WorkerSettings.worker_id).
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "mqvox-worker"


@dataclass(frozen=True)
class UtteranceLimits:
    """What the worker accepts, at most; the protocol's limits (schemas/README.md) are the ceiling."""

    max_audio_s: float = MAX_UTTERANCE_S
    """Longest audio (seconds) decoded; a longer utterance gets an ``audio_too_long`` error result."""
    max_payload_bytes: int = UTTERANCE.max_payload_bytes
    """Largest Opus payload (bytes) accepted; a larger one gets a ``payload_too_large`` error result."""

    def __post_init__(self) -> None:
        if not 0 < self.max_audio_s <= MAX_UTTERANCE_S:
            raise ValueError(f"max_audio_s must be in (0, {MAX_UTTERANCE_S:g}], not {self.max_audio_s}")
        if not 0 < self.max_payload_bytes <= UTTERANCE.max_payload_bytes:
            raise ValueError(
                f"max_payload_bytes must be in (0, {UTTERANCE.max_payload_bytes}], not {self.max_payload_bytes}"
            )


@dataclass(frozen=True)
class BatchSettings:
    """Dynamic micro-batching: how utterances that arrive close together are gathered into one transcription."""

    max_batch: int = 8
    """Most utterances transcribed together; 1 turns batching off."""
    window_ms: float = 50.0
    """How long (milliseconds) to wait, after an utterance arrives, for others to join its batch. Whatever
    arrived while the previous batch was being transcribed joins at once, without waiting."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {self.max_batch}")
        if not 0 <= self.window_ms <= 5000:
            raise ValueError(f"window_ms must be between 0 and 5000, not {self.window_ms}")


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker joins the fleet, recognises speech, batches and stores."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    """Where the broker is."""
    group: str = "mqvox-workers"
    """MQTT 5 shared subscription group: workers of one group split the utterances between them."""
    worker_id: str = field(default_factory=_default_worker_id)
    """This worker's name, in its MQTT client id and in error reports; defaults to the host name. Keep it across
    restarts, so the worker resumes its session and gets what was queued for it; give each worker process of
    one host its own (two with one id take the session from each other)."""
    session_expiry_s: int = 3600
    """How long (seconds) the broker keeps this worker's session, and queues its share of the utterances, while
    it is away; a worker back within this time answers them all."""
    drain_quiet_s: float = 1.0
    """On a clean stop the worker leaves the group and answers what the broker still sends it from its session's
    queue; it is drained once nothing has come for this long (seconds) and all is answered."""
    drain_timeout_s: float = 60.0
    """The longest a stop drains; what is left then is dropped with the session, and devices send their
    unanswered requests again."""
    storage_retry: BackoffSettings = field(default_factory=BackoffSettings)
    """Waits between tries while the database is unavailable; nothing is acknowledged meanwhile."""
    limits: UtteranceLimits = field(default_factory=UtteranceLimits)
    """The longest and largest utterance accepted."""
    duration_tolerance_s: float = 0.1
    """How far (seconds) the decoded audio's length may be from the duration the device announced."""
    asr: AsrSettings = field(default_factory=AsrSettings)
    """The speech recogniser."""
    batching: BatchSettings = field(default_factory=BatchSettings)
    """Dynamic micro-batching."""
    storage: StorageSettings = field(default_factory=StorageSettings)
    """The database, and what is kept in it."""
    vocabulary: str | None = None
    """Vocabulary file of the phrases scored and the intents; None for the one shipped in schemas/."""
    calibration: str | None = None
    """Calibration JSON that turns phrase scores into confidences (cloud_worker/calibration.py); None for the
    shipped cloud_worker/calibration.json."""
    metrics_port: int | None = None
    """TCP port of the Prometheus /metrics endpoint on 127.0.0.1 (0 picks a free one); None serves none."""
