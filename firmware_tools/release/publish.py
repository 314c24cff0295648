"""Publishing model versions: register in the database, sign the manifest, retain blob and manifest on the broker.

The blob always goes out before any manifest that names it, so a device that accepts
a manifest finds its blob waiting. Blobs that no manifest can lead to any more are
cleared (an empty retained message), so the broker does not keep every model ever made.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.mqtt import MqttLink
from firmware_tools.release.registry import ModelRegistry, ModelVersion
from schemas.envelope import Envelope
from schemas.model import ModelBlob, ModelManifest, ModelPackage, RolloutStage
from schemas.signing import key_id, sign_manifest
from schemas.topics import MANIFEST, MODEL_BLOB, check_identifier

log = logging.getLogger("mqvox.publish")

EVERYONE = RolloutStage("everyone", (), 100.0)
"""The stage of a plain publication, and of a rollback."""


class Publisher:
    """Publishes the models of one channel, signed with one key, recording each step in the registry."""

    def __init__(self, link: MqttLink, registry: ModelRegistry, channel: str, private_key: Ed25519PrivateKey) -> None:
        self.link = link
        self.registry = registry
        self.channel = check_identifier("channel", channel)
        self.private_key = private_key
        self.key_id = key_id(private_key.public_key())
        self._last_created_at = 0.0

    def register(self, package_dir: Path, *, notes: str = "", min_device_version: str = "0.1.0") -> ModelVersion:
        """Record the package in ``package_dir`` (checked against its own digest) as a version of the channel."""
        package = ModelPackage.load(package_dir)
        model = package.model_path(package_dir).read_bytes()
        return self.registry.register(
            self.channel, package, model, min_device_version=min_device_version, notes=notes, key_id=self.key_id
        )

    def publish_blob(self, version: ModelVersion) -> None:
        """Retain the version's .tflite on its own topic."""
        self.link.send(ModelBlob(self.channel, version.version, version.model))
        self.registry.set_blob_retained(self.channel, version.version, True)
        log.info(
            "blob of %s retained on %s",
            version.version,
            MODEL_BLOB.topic(channel=self.channel, version=version.version),
        )

    def publish_manifest(self, version: ModelVersion, stage: RolloutStage, *, rollback: bool = False) -> ModelManifest:
        """Sign and retain the manifest offering ``version`` to ``stage``; its blob is published first if needed."""
        if not self.registry.version(self.channel, version.version).blob_retained:  # as recorded now
            self.publish_blob(version)
        package = version.package
        # Devices take a manifest no older than the last one they accepted as a replay: keep creation times rising.
        created_at = max(round(time.time(), 6), round(self._last_created_at + 1e-3, 6))
        self._last_created_at = created_at
        manifest = sign_manifest(
            ModelManifest(
                channel=self.channel,
                version=version.version,
                sha256=package.sha256,
                size_bytes=package.size_bytes,
                frontend=package.frontend,
                labels=package.labels,
                detection=package.detection,
                min_device_version=version.min_device_version,
                stage=stage,
                key_id=self.key_id,
                signature="",
                release_notes=version.release_notes,
                rollback=rollback,
                created_at=created_at,
            ),
            self.private_key,
        )
        self.link.send(manifest)
        log.info("manifest of %s retained for stage %s (rollback %s)", version.version, stage.name, rollback)
        return manifest

    def clear_manifest(self) -> None:
        """Remove the channel's retained manifest: devices that start now are offered nothing."""
        self.link.publish(MANIFEST.topic(channel=self.channel), Envelope(b"", None), qos=MANIFEST.qos, retain=True)

    def clear_blob(self, version: str) -> None:
        """Remove a version's retained blob from the broker (the registry keeps the model)."""
        topic = MODEL_BLOB.topic(channel=self.channel, version=version)
        self.link.publish(topic, Envelope(b"", None), qos=MODEL_BLOB.qos, retain=True)
        self.registry.set_blob_retained(self.channel, version, False)
        log.info("blob of %s cleared from %s", version, topic)

    def clear_superseded(self, keep: set[str]) -> list[str]:
        """Clear every retained blob of the channel but those of ``keep``; the versions cleared."""
        cleared = []
        for version in self.registry.versions(self.channel):
            if version.blob_retained and version.version not in keep:
                self.clear_blob(version.version)
                cleared.append(version.version)
        return cleared
