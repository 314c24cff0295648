"""Device models on the wire: the signed manifest and the .tflite blob it points to."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from schemas.envelope import Envelope
from schemas.errors import ErrorCode, ProtocolError
from schemas.message import JsonMessage
from schemas.topics import MANIFEST, META_PROPERTY, MODEL_BLOB, KiB
from schemas.validation import canonical_json, decode_json, encode_json, validate

MODEL_FILE = "model.tflite"
"""Name of the .tflite file in a model package, as training writes it and as a device installs it."""
MAX_BLOB_META_BYTES = 1 * KiB
"""Largest ``mqvox-meta`` user property accepted on a model blob."""
MAX_PACKAGE_MANIFEST_BYTES = 64 * KiB
"""Largest model package manifest.json read from disk."""


def parse_version(version: str) -> tuple[int, int, int]:
    """``"1.10.2"`` -> ``(1, 10, 2)``, for ordering versions numerically."""
    major, minor, patch = (int(part) for part in version.split("."))
    return major, minor, patch


class FlatRecord:
    """A dataclass of plain fields whose JSON object is exactly its fields (nested in a message, validated there)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(**data)


@dataclass(frozen=True)
class Frontend(FlatRecord):
    """The feature front end a model was trained with (python_speech_features parameters)."""

    kind: str
    """'mfcc' or 'logfbank'."""
    sample_rate: int
    """Sample rate (hertz)."""
    window_s: float
    """Analysis window (seconds)."""
    step_s: float
    """Hop between windows (seconds)."""
    num_filters: int
    """Mel filters."""
    num_features: int
    """Features per frame."""
    fft_size: int
    """FFT size (samples)."""
    low_hz: float
    """Lowest filter edge (hertz)."""
    high_hz: float
    """Highest filter edge (hertz)."""
    preemphasis: float
    """Pre-emphasis coefficient."""
    frames: int
    """Frames in one model input window."""
    window: str = "hamming"
    """Analysis window applied to each frame: 'hamming', 'hann' or 'rectangular'."""
    energy_floor: float = 1.0
    """Filterbank energies (16-bit PCM units) are floored at this before the log, so silence stays finite."""


@dataclass(frozen=True)
class Detection(FlatRecord):
    """How a device turns the model's scores into decisions; tuned at training time, shipped with the model."""

    wake_label: str
    """The label whose score is the wake score."""
    wake_threshold: float
    """A smoothed wake score at or above this wakes the device (0-1)."""
    stride_frames: int
    """Feature frames between two runs of the model on the always-on path."""
    smoothing_windows: int
    """The wake score is the mean over this many consecutive runs."""
    refractory_s: float
    """After a wake, no other wake for this long (seconds)."""
    command_threshold: float
    """A command scored at or above this is decided on the device; below it, the cloud decides (0-1)."""
    head_signature: str = ""
    """Signature (in the same .tflite file) of a command head on the pretrained speech embedding, scoring the same
    labels; empty when the always-on model scores commands too."""
    head_temperature: float = 1.0
    """The head's logits are divided by this before the softmax, so that its confidence is calibrated."""
    verify_threshold: float = 0.0
    """A first-stage wake stands only if the head scores the wake label at least this high on the audio before it
    (0: every first-stage wake stands)."""

    _OPTIONAL = ("head_signature", "head_temperature", "verify_threshold")

    def to_dict(self) -> dict[str, Any]:
        # The head's fields are written only when they say something: a manifest without a head stays the same
        # JSON, and so keeps the signature it was signed with, whichever release reads and writes it.
        data = super().to_dict()
        for name in self._OPTIONAL:
            if data[name] == Detection.__dataclass_fields__[name].default:
                del data[name]
        return data


@dataclass(frozen=True)
class RolloutStage:
    """Which devices a manifest is for."""

    name: str
    """Stage name, e.g. 'canary' or 'fleet'."""
    devices: tuple[str, ...] = ()
    """Devices named explicitly."""
    percent: float = 0.0
    """Share of the fleet (0-100) chosen by a stable hash of the device id, on top of ``devices``."""

    def includes(self, device_id: str) -> bool:
        """Whether ``device_id`` is in this stage: named, or in the first ``percent`` of the hash buckets."""
        return device_id in self.devices or fleet_bucket(device_id) < round(self.percent * 100)


FLEET_BUCKETS = 10_000
"""A percentage stage is resolved to 0.01 % of the fleet."""


def fleet_bucket(device_id: str) -> int:
    """The device's place in the fleet, 0 to FLEET_BUCKETS - 1, from SHA-256 of its id.

    The same id always lands in the same bucket, on the device and in the rollout tool,
    so a 10 % stage is a subset of a later 50 % stage: nobody who updated early is skipped.
    """
    return int.from_bytes(hashlib.sha256(device_id.encode("utf-8")).digest()[:8], "big") % FLEET_BUCKETS


@dataclass(frozen=True)
class ModelManifest(JsonMessage):
    """Retained on ``models/<channel>/manifest``; Ed25519-signed over :meth:`signing_bytes`."""

    spec = MANIFEST

    channel: str
    """Release channel."""
    version: str
    """Model version (MAJOR.MINOR.PATCH)."""
    sha256: str
    """SHA-256 of the .tflite blob, hex."""
    size_bytes: int
    """Size of the blob (bytes)."""
    frontend: Frontend
    """Feature front end the model needs."""
    labels: tuple[str, ...]
    """Output classes, in output order."""
    detection: Detection
    """Thresholds, stride, smoothing and refractory period the model was tuned for."""
    min_device_version: str
    """Oldest device software that can run it."""
    stage: RolloutStage
    """Which devices should install it."""
    key_id: str
    """Id of the signing key (first 16 hex of SHA-256 of the raw public key)."""
    signature: str
    """Base64 Ed25519 signature over :meth:`signing_bytes`."""
    release_notes: str = ""
    """Free text for operators."""
    rollback: bool = False
    """True only on a deliberate downgrade."""
    created_at: float = field(default_factory=time.time)
    """Unix time (seconds) of creation."""

    @property
    def blob_topic(self) -> str:
        """Where the blob of this version is retained."""
        return MODEL_BLOB.topic(channel=self.channel, version=self.version)

    def topic(self) -> str:
        return MANIFEST.topic(channel=self.channel)

    def signing_bytes(self) -> bytes:
        """What the signature covers: the canonical JSON of the manifest without ``signature``."""
        unsigned = self.to_dict()
        del unsigned["signature"]
        return canonical_json(unsigned)

    def to_dict(self) -> dict[str, Any]:
        return {
            "channel": self.channel,
            "version": self.version,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "blob_topic": self.blob_topic,
            "frontend": self.frontend.to_dict(),
            "labels": list(self.labels),
            "detection": self.detection.to_dict(),
            "min_device_version": self.min_device_version,
            "created_at": self.created_at,
            "release_notes": self.release_notes,
            "stage": {"name": self.stage.name, "devices": list(self.stage.devices), "percent": self.stage.percent},
            "rollback": self.rollback,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        stage = data["stage"]
        manifest = cls(
            channel=data["channel"],
            version=data["version"],
            sha256=data["sha256"],
            size_bytes=data["size_bytes"],
            frontend=Frontend.from_dict(data["frontend"]),
            labels=tuple(data["labels"]),
            detection=Detection.from_dict(data["detection"]),
            min_device_version=data["min_device_version"],
            stage=RolloutStage(stage["name"], tuple(stage["devices"]), stage["percent"]),
            key_id=data["key_id"],
            signature=data["signature"],
            release_notes=data["release_notes"],
            rollback=data["rollback"],
            created_at=data["created_at"],
        )
        if data["blob_topic"] != manifest.blob_topic:
            raise ProtocolError(
                ErrorCode.MISMATCH, MANIFEST.name, f"blob_topic must be {manifest.blob_topic!r}", path="/blob_topic"
            )
        return manifest


@dataclass(frozen=True)
class ModelBlob:
    """A .tflite model, retained on ``models/<channel>/blobs/<version>``; metadata in ``mqvox-meta``.

    The digest here only catches a damaged transfer: trust comes from the signed manifest.
    """

    spec = MODEL_BLOB

    channel: str
    """Release channel."""
    version: str
    """Model version."""
    model: bytes
    """The .tflite file."""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model).hexdigest()

    def topic(self) -> str:
        return MODEL_BLOB.topic(channel=self.channel, version=self.version)

    def to_wire(self) -> Envelope:
        """Validate and encode; raises ProtocolError rather than sending something invalid."""
        MODEL_BLOB.check_size(self.model, MODEL_BLOB.name)
        meta = {"channel": self.channel, "version": self.version, "sha256": self.sha256, "size_bytes": len(self.model)}
        text = encode_json(MODEL_BLOB.name, meta, max_bytes=MAX_BLOB_META_BYTES).decode("utf-8")
        return Envelope(
            payload=self.model, content_type=MODEL_BLOB.content_type, user_properties=((META_PROPERTY, text),)
        )

    @classmethod
    def from_wire(cls, envelope: Envelope) -> Self:
        """Check content type, metadata, size and digest; raises ProtocolError on anything off."""
        envelope.expect_content_type(MODEL_BLOB.content_type, MODEL_BLOB.name)
        MODEL_BLOB.check_size(envelope.payload, MODEL_BLOB.name)
        meta = decode_json(
            MODEL_BLOB.name, envelope.user_property(META_PROPERTY, MODEL_BLOB.name), max_bytes=MAX_BLOB_META_BYTES
        )
        blob = cls(channel=meta["channel"], version=meta["version"], model=envelope.payload)
        if len(blob.model) != meta["size_bytes"]:
            raise ProtocolError(
                ErrorCode.MISMATCH,
                MODEL_BLOB.name,
                f"payload is {len(blob.model)} bytes, metadata says {meta['size_bytes']}",
            )
        if blob.sha256 != meta["sha256"]:
            raise ProtocolError(ErrorCode.MISMATCH, MODEL_BLOB.name, "payload SHA-256 does not match its metadata")
        return blob


@dataclass(frozen=True)
class ModelPackage:
    """``manifest.json`` beside a model's .tflite file on the device (schema ``model_package``)."""

    version: str
    """Model version (MAJOR.MINOR.PATCH)."""
    model_file: str
    """The .tflite file, relative to the manifest."""
    sha256: str
    """SHA-256 of the .tflite file, hex."""
    size_bytes: int
    """Size of the .tflite file (bytes)."""
    frontend: Frontend
    """Feature front end the model needs."""
    labels: tuple[str, ...]
    """Output classes, in output order."""
    detection: Detection
    """Thresholds, stride, smoothing and refractory period."""
    vocabulary_sha256: str
    """SHA-256 of the vocabulary file the model was trained on."""
    created_at: float
    """Unix time (seconds) the model was built."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return cls(
            version=data["version"],
            model_file=data["model_file"],
            sha256=data["sha256"],
            size_bytes=data["size_bytes"],
            frontend=Frontend.from_dict(data["frontend"]),
            labels=tuple(data["labels"]),
            detection=Detection.from_dict(data["detection"]),
            vocabulary_sha256=data["vocabulary_sha256"],
            created_at=data["created_at"],
        )

    def to_json(self) -> str:
        """Validated, indented JSON for the file."""
        data = self.to_dict()
        validate("model_package", data)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def load(cls, directory: str | Path) -> Self:
        """Read and validate ``manifest.json`` in ``directory``; raises ProtocolError on a bad one."""
        path = Path(directory) / "manifest.json"
        return cls.from_dict(decode_json("model_package", path.read_bytes(), max_bytes=MAX_PACKAGE_MANIFEST_BYTES))

    def model_path(self, directory: str | Path) -> Path:
        """The .tflite file of this package in ``directory``, after checking its size and digest."""
        path = Path(directory) / self.model_file
        data = path.read_bytes()
        if len(data) != self.size_bytes or hashlib.sha256(data).hexdigest() != self.sha256:
            raise ProtocolError(ErrorCode.MISMATCH, "model_package", f"{path} does not match its manifest's digest")
        return path
