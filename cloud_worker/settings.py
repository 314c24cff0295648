"""Settings of a cloud worker, grouped by concern."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from cloud_worker.asr import AsrSettings
from cloud_worker.storage import StorageSettings
from schemas.mqtt import BrokerSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


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
    """This worker's name, in its MQTT client id and in error reports."""
    duration_tolerance_s: float = 0.1
    """How far (seconds) the decoded audio's length may be from the duration the device announced."""
    asr: AsrSettings = field(default_factory=AsrSettings)
    """The speech recogniser."""
    batching: BatchSettings = field(default_factory=BatchSettings)
    """Dynamic micro-batching."""
    storage: StorageSettings = field(default_factory=StorageSettings)
    """The database, and what is kept in it."""
    vocabulary: str | None = None
    """Vocabulary file for the prompt and intents; None for the one shipped in schemas/."""
    metrics_port: int | None = None
    """TCP port of the Prometheus /metrics endpoint on 127.0.0.1 (0 picks a free one); None serves none."""
