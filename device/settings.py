"""The device's settings: frozen dataclasses grouped by concern, read from one TOML file.

Every field has a default, so an empty file is a working configuration (the shipped
model, the default microphone, the loopback broker). ``device/config.example.toml``
documents each field; a test keeps it loadable and in step with these classes.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from common.config import ConfigError, read_toml, settings_from_table
from common.locations import Role, StateLocationError, make_state_folder
from common.mqtt import BrokerSettings, TlsSettings
from common.opus import MAX_UTTERANCE_S
from schemas.errors import ProtocolError
from schemas.topics import check_identifier


class SettingsError(ConfigError):
    """A configuration that cannot be used; the message names the file and the setting."""


class AudioSourceKind(StrEnum):
    """Where the device's audio comes from."""

    MICROPHONE = "microphone"
    """A sound card input, through sounddevice (PortAudio)."""
    FILE = "file"
    """Recordings (WAV, FLAC, OGG), played one after the other as one stream."""
    STDIN = "stdin"
    """Raw signed 16-bit little-endian mono PCM on standard input."""


class DenoiseMode(StrEnum):
    """Where RNNoise runs."""

    OFF = "off"
    """Never."""
    UTTERANCE = "utterance"
    """On each captured utterance, before the command model: no cost while idle. A model with a command head
    (1.1.0 on) reads the utterance as heard instead: RNNoise's artefacts cost its speech embedding accuracy."""
    ALWAYS = "always"
    """On the whole stream, before the wake detector too: helps in steady noise, costs CPU all day."""


class UploadPolicy(StrEnum):
    """Whether audio may leave the device."""

    UNCERTAIN = "uncertain"
    """Utterances the device is unsure of are sent to the cloud as Opus."""
    NEVER = "never"
    """No audio ever leaves the device; unsure utterances are reported as not understood."""


@dataclass(frozen=True)
class AudioSettings:
    """The audio input."""

    source: AudioSourceKind = AudioSourceKind.MICROPHONE
    """microphone, file or stdin."""
    input_device: str | int | None = None
    """Microphone: an input's index, or a case-insensitive part of its name; None for the system default."""
    files: tuple[str, ...] = ()
    """File source: the recordings to play, in order (paths relative to the config file)."""
    stdin_sample_rate: int = 16000
    """Stdin source: sample rate (hertz) of the raw PCM; resampled to 16 kHz when different."""
    block_ms: int = 30
    """Audio is read in blocks of this many milliseconds."""

    def __post_init__(self) -> None:
        if not 10 <= self.block_ms <= 1000:
            raise SettingsError(f"audio.block_ms must be between 10 and 1000, not {self.block_ms}")
        if self.source == AudioSourceKind.FILE and not self.files:
            raise SettingsError("audio.files must name at least one recording when audio.source is 'file'")


@dataclass(frozen=True)
class ModelSettings:
    """The on-device model and the decisions it makes."""

    directory: str | None = None
    """Model package directory (model.tflite + manifest.json); None for the model shipped with mqvox."""
    vocabulary: str | None = None
    """Vocabulary TOML the model's labels come from; None for the one shipped with mqvox."""
    wake_threshold: float | None = None
    """Smoothed wake score needed to wake, in (0, 1]; None for the threshold tuned with the model."""
    command_threshold: float | None = None
    """Command score needed to decide on the device, in (0, 1]; None for the model's own."""
    num_threads: int = 1
    """TFLite interpreter threads; one keeps a small device's other cores free."""

    def __post_init__(self) -> None:
        for name in ("wake_threshold", "command_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise SettingsError(f"model.{name} must be in (0, 1], not {value}")
        if self.num_threads < 1:
            raise SettingsError(f"model.num_threads must be at least 1, not {self.num_threads}")


@dataclass(frozen=True)
class CaptureSettings:
    """Capturing the utterance after the wake word, with webrtcvad endpointing."""

    vad_aggressiveness: int = 2
    """webrtcvad mode, 0 (keeps most audio as speech) to 3 (most aggressive filtering of non-speech)."""
    vad_frame_ms: int = 30
    """webrtcvad frame length: 10, 20 or 30 milliseconds."""
    speech_onset_ms: int = 90
    """Speech starts after this much consecutive voiced audio."""
    wake_gap_ms: int = 60
    """The wake fires before the wake phrase is over: voiced audio right after it is the phrase's tail, up to the
    first pause of this length."""
    max_wake_tail_ms: int = 600
    """A wake phrase tail longer than this is taken to run straight into the command, which starts there."""
    pre_roll_ms: int = 300
    """Audio kept from before the detected onset, so the first syllable is not cut (never from before the wake)."""
    trailing_silence_ms: int = 600
    """The utterance ends after this much consecutive unvoiced audio."""
    max_utterance_s: float = 5.0
    """The utterance ends after this long, speaking or not."""
    speech_timeout_s: float = 4.0
    """After a wake, give up if no speech starts within this many seconds."""

    def __post_init__(self) -> None:
        if self.vad_aggressiveness not in (0, 1, 2, 3):
            raise SettingsError(f"capture.vad_aggressiveness must be 0, 1, 2 or 3, not {self.vad_aggressiveness}")
        if self.vad_frame_ms not in (10, 20, 30):
            raise SettingsError(f"capture.vad_frame_ms must be 10, 20 or 30, not {self.vad_frame_ms}")
        for name in ("speech_onset_ms", "trailing_silence_ms", "wake_gap_ms"):
            if getattr(self, name) < self.vad_frame_ms:
                raise SettingsError(f"capture.{name} must be at least one VAD frame ({self.vad_frame_ms} ms)")
        if self.max_wake_tail_ms < 0:
            raise SettingsError(f"capture.max_wake_tail_ms must not be negative, not {self.max_wake_tail_ms}")
        if self.pre_roll_ms < 0:
            raise SettingsError(f"capture.pre_roll_ms must not be negative, not {self.pre_roll_ms}")
        if not 0.5 <= self.max_utterance_s <= MAX_UTTERANCE_S:
            raise SettingsError(
                f"capture.max_utterance_s must be between 0.5 and {MAX_UTTERANCE_S:.0f} (the protocol's limit),"
                f" not {self.max_utterance_s}"
            )
        if self.speech_timeout_s <= 0:
            raise SettingsError(f"capture.speech_timeout_s must be positive, not {self.speech_timeout_s}")


CLOUD_MIN_CONFIDENCE = 0.92
"""Default of cloud.min_confidence: the cloud confidence a device needs to act on a cloud intent. It is the
shipped calibration's act_floor (cloud_worker/calibration.json, 0.9171) rounded up: the least confidence at
which acted-on cloud answers were right at least 99.5 % of the time on real FSDD speakers held out from the fit,
with real non-commands beside them (bench/cloud.py --fsdd; tests/test_calibration.py keeps the two together)."""


@dataclass(frozen=True)
class CloudSettings:
    """Asking the cloud about utterances the device is unsure of."""

    upload: UploadPolicy = UploadPolicy.UNCERTAIN
    """uncertain: send unsure utterances as Opus; never: keep all audio on the device."""
    timeout_s: float = 10.0
    """How long to wait for the cloud's reply before publishing a cloud_timeout result."""
    resend_after_s: float = 3.0
    """Send a request again (same utterance id: the workers answer it once) when this many seconds pass without
    an answer, then after twice as long, and so on until timeout_s (at 3 and 9 s with the defaults): a request
    that went to a worker which died, or into the session of one that stopped, then reaches a live one, and
    workers that are only behind get few copies. 0 sends each request once."""
    max_in_flight: int = 4
    """Cloud requests waiting for an answer at once; further unsure utterances wait their turn."""
    min_confidence: float = CLOUD_MIN_CONFIDENCE
    """The floor, in [0, 1]: the device acts on a cloud intent only when its confidence is at least this. Under
    it the result says not_understood, with what the cloud heard and its confidence, and nothing is acted on."""
    share_for_training: bool = False
    """Consent: the cloud may keep the utterances this device sends, with their answers, to train device models
    (kept for the worker's training retention, 30 days by default). Off by default: then nothing this device sends
    is kept for training. Needs upload = "uncertain"."""

    training_sample_share: float = 0.0
    """Share, in [0, 1], of the commands the device decides itself that it also sends to the cloud, only to be
    labelled for training: the loop then learns from the commands the device gets wrong while sure, which it
    never asks about. Needs share_for_training. The device has acted already; the cloud's answer makes no
    result and is not acted on. Each costs an upload (about 20 kB for 5 s)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.training_sample_share <= 1.0:
            raise SettingsError(f"cloud.training_sample_share must be in [0, 1], not {self.training_sample_share}")
        if self.training_sample_share > 0 and not self.share_for_training:
            raise SettingsError(
                "cloud.training_sample_share sends utterances only for training: it needs share_for_training = true"
            )
        if self.share_for_training and self.upload == UploadPolicy.NEVER:
            raise SettingsError(
                'cloud.share_for_training cannot be true with cloud.upload = "never": no audio leaves the device,'
                ' so there is nothing to share; set upload = "uncertain", or share_for_training = false'
            )
        if self.timeout_s <= 0:
            raise SettingsError(f"cloud.timeout_s must be positive, not {self.timeout_s}")
        if self.resend_after_s < 0:
            raise SettingsError(f"cloud.resend_after_s must be 0 (never) or positive, not {self.resend_after_s}")
        if self.max_in_flight < 1:
            raise SettingsError(f"cloud.max_in_flight must be at least 1, not {self.max_in_flight}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise SettingsError(f"cloud.min_confidence must be in [0, 1], not {self.min_confidence}")


class DropPolicy(StrEnum):
    """What gives way when the outbox is full."""

    OLDEST = "oldest"
    """Drop the oldest messages to make room: the newest commands matter most."""
    NEWEST = "newest"
    """Refuse the new message: what is held is kept, in order."""


OUTBOX_FILE = "outbox.sqlite3"
"""The outbox's file in the device's state folder, unless outbox.path says otherwise."""


@dataclass(frozen=True)
class OutboxSettings:
    """The persistent outbox: results and utterances kept while the broker is unreachable, sent in order after."""

    path: str | None = None
    """SQLite file; None for ``outbox.sqlite3`` in the state folder (ota.state_dir, by default the device's own
    state folder: see OtaSettings.state_dir). ":memory:" keeps nothing across restarts."""
    max_messages: int = 1000
    """Most messages held."""
    max_bytes: int = 16 * 1024 * 1024
    """Most payload bytes held (an utterance of 5 s is about 20 kB of Opus)."""
    max_age_s: float = 24 * 3600.0
    """Messages older than this (seconds) are dropped unsent."""
    drop: DropPolicy = DropPolicy.OLDEST
    """When full: oldest (make room by dropping the oldest) or newest (refuse the new message)."""
    in_flight: int = 8
    """Messages sent and not yet acknowledged at once, during a replay."""
    retry_initial_s: float = 1.0
    """After the broker refuses a message, or has no cloud worker to give an utterance to, the first wait (seconds)
    before trying again; it doubles."""
    retry_max_s: float = 60.0
    """The longest wait (seconds) between tries."""
    max_attempts: int = 5
    """A message the broker refuses this many times in a row is dropped."""

    def __post_init__(self) -> None:
        for name in ("max_messages", "max_bytes", "in_flight", "max_attempts"):
            if getattr(self, name) < 1:
                raise SettingsError(f"outbox.{name} must be at least 1, not {getattr(self, name)}")
        if self.max_age_s <= 0:
            raise SettingsError(f"outbox.max_age_s must be positive, not {self.max_age_s}")
        if not 0 < self.retry_initial_s <= self.retry_max_s:
            raise SettingsError("outbox needs 0 < retry_initial_s <= retry_max_s")


@dataclass(frozen=True)
class OtaSettings:
    """Model updates over the air: signed manifests on the channel's retained topic, verified and self-tested."""

    public_key: str | None = None
    """PEM file of the Ed25519 public key that signs this fleet's models; None turns updates off (a device with no
    key must never accept a model)."""
    channel: str = "stable"
    """Release channel whose manifest the device follows (models/<channel>/manifest)."""
    state_dir: str | None = None
    """Where updated models, the update journal and the outbox are kept; None for the device's state folder,
    wherever the config file is: ``$STATE_DIRECTORY/device`` under systemd (StateDirectory=), else
    ``$MQVOX_STATE_DIR/device``, else ``$XDG_STATE_HOME/mqvox/device`` (``~/.local/state/mqvox/device``); it is
    made with mode 0700 (common/locations.py). The configured model stays the factory model, used until the
    first update and whenever nothing newer works."""
    self_test: str | None = None
    """Folder of the self-test suite (suite.toml and its clips); None for the suite shipped with mqvox."""
    download_timeout_s: float = 60.0
    """How long to wait for the model blob after accepting a manifest."""
    max_attempts: int = 2
    """An update interrupted this many times (power cut, crash during its self-test) is given up for that version."""

    def __post_init__(self) -> None:
        try:
            check_identifier("channel", self.channel)
        except ProtocolError as error:
            raise SettingsError(f"ota.channel: {error.reason}") from None
        if self.download_timeout_s <= 0:
            raise SettingsError(f"ota.download_timeout_s must be positive, not {self.download_timeout_s}")
        if self.max_attempts < 1:
            raise SettingsError(f"ota.max_attempts must be at least 1, not {self.max_attempts}")


_ENTRY_POINT = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


@dataclass(frozen=True)
class ActionSettings:
    """What to run when an intent is recognised: a shell command or a Python entry point, not both."""

    command: str | None = None
    """Shell command, run by /bin/sh with MQVOX_INTENT, MQVOX_SLOTS (JSON), MQVOX_SLOT_<NAME>, MQVOX_SOURCE,
    MQVOX_CONFIDENCE, MQVOX_DEVICE_ID and MQVOX_UTTERANCE_ID in its environment."""
    entry_point: str | None = None
    """Python callable as ``package.module:function``, called as ``function(intent=..., slots=...)``."""
    timeout_s: float = 10.0
    """A shell command still running after this many seconds is killed and counted as failed."""

    def __post_init__(self) -> None:
        if (self.command is None) == (self.entry_point is None):
            raise SettingsError("an action needs exactly one of 'command' or 'entry_point'")
        if self.entry_point is not None and not _ENTRY_POINT.fullmatch(self.entry_point):
            raise SettingsError(f"action entry_point must read 'package.module:function', not {self.entry_point!r}")
        if self.timeout_s <= 0:
            raise SettingsError(f"action timeout_s must be positive, not {self.timeout_s}")


ANY_INTENT = "*"
"""Key of the action run for intents that have no action of their own."""


def _default_device_id() -> str:
    # The host name is what an installer sees on a fleet; characters topics cannot carry become '-'.
    return re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64] or "mqvox-device"


@dataclass(frozen=True)
class DeviceSettings:
    """Everything ``python -m device run`` needs."""

    device_id: str = field(default_factory=_default_device_id)
    """This device's id, in its topics (letters, digits, '_', '-', '.'); defaults to the host name."""
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    """The MQTT broker, with [broker.tls] for TLS and a client certificate."""
    audio: AudioSettings = field(default_factory=AudioSettings)
    """The audio input."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """The model and its thresholds."""
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    """Utterance capture after the wake word."""
    denoise: DenoiseMode = DenoiseMode.UTTERANCE
    """RNNoise: off, utterance (on each captured utterance) or always (on the whole stream)."""
    cloud: CloudSettings = field(default_factory=CloudSettings)
    """Upload policy, the cloud's timeout, the confidence needed to act on a cloud intent, and consent to share
    utterances for training."""
    actions: Mapping[str, ActionSettings] = field(default_factory=dict)
    """Action per intent name; the key "*" is the action for every intent without its own."""
    status_interval_s: float = 60.0
    """The retained status (uptime, counters) is refreshed this often."""
    ota: OtaSettings = field(default_factory=OtaSettings)
    """Model updates over the air."""
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    """What is kept, and how it is sent, while the broker is unreachable."""

    def __post_init__(self) -> None:
        try:
            check_identifier("device_id", self.device_id)
        except ProtocolError as error:
            raise SettingsError(f"device_id: {error.reason}") from None
        if self.status_interval_s <= 0:
            raise SettingsError(f"status_interval_s must be positive, not {self.status_interval_s}")


def settings_from_dict(data: Mapping[str, Any], where: str = "settings") -> DeviceSettings:
    """Build and check DeviceSettings from a parsed TOML document; SettingsError names what is wrong."""
    try:
        return settings_from_table(DeviceSettings, data, where)
    except ConfigError as error:
        raise SettingsError(str(error)) from None


def load_settings(path: str | Path) -> DeviceSettings:
    """Read a device config file. Relative file paths in it are taken relative to the file's folder.

    A config that names no state folder (ota.state_dir) gets the device's own, wherever the file is
    (common/locations.py); it is made here, so a folder that cannot be written is a SettingsError.
    """
    path = Path(path)
    try:
        data = read_toml(path)
    except ConfigError as error:
        raise SettingsError(str(error)) from None
    settings = settings_from_dict(data, str(path))
    return _resolve_paths(settings, path)


def _resolve_paths(settings: DeviceSettings, config: Path) -> DeviceSettings:
    def resolve(value: str | None) -> str | None:
        return None if value is None else str((config.parent / Path(value).expanduser()).resolve())

    ota = settings.ota
    state_dir = resolve(ota.state_dir)
    # The outbox is always on: a config file always names its file, in the state folder unless it says otherwise.
    if state_dir is None and (ota.public_key is not None or settings.outbox.path is None):
        try:
            state_dir = str(make_state_folder(Role.DEVICE, f"ota.state_dir in {config}"))
        except StateLocationError as error:
            raise SettingsError(str(error)) from None
    ota = replace(
        ota,
        public_key=resolve(ota.public_key),
        # The default folder is only named when updates are on, so an empty file still equals the defaults.
        state_dir=state_dir if ota.public_key is not None else resolve(ota.state_dir),
        self_test=resolve(ota.self_test),
    )
    outbox_path = settings.outbox.path
    if outbox_path != ":memory:":
        outbox_path = resolve(outbox_path) or str(Path(state_dir or "") / OUTBOX_FILE)
    outbox = replace(settings.outbox, path=outbox_path)
    tls = settings.broker.tls
    if tls is not None:
        tls = TlsSettings(resolve(tls.ca_file), resolve(tls.cert_file), resolve(tls.key_file))
    return replace(
        settings,
        broker=replace(settings.broker, tls=tls),
        ota=ota,
        outbox=outbox,
        audio=replace(settings.audio, files=tuple(resolve(name) for name in settings.audio.files)),
        model=replace(
            settings.model, directory=resolve(settings.model.directory), vocabulary=resolve(settings.model.vocabulary)
        ),
    )
