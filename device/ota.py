"""Model updates over the air, on the device: follow the channel's signed manifest, and never lose a working model.

For each manifest on ``models/<channel>/manifest`` (a normal subscription, so the
retained one arrives at every start), the device checks, in order:

1. that it is not older than the newest manifest accepted before (an older one is a replay);
2. that this device is in the manifest's stage;
3. the Ed25519 signature, against the key provisioned on the device;
4. that the version is newer than the running one (an explicit rollback manifest names
   the version to run, older or not), and that this exact model was not refused before;
5. that this device's software and front end can run it, and knows its labels.

Only then does it report ``downloading`` and fetch the blob, check its SHA-256 and size
against the signed manifest (``verified``), install it next to the running model, and
put it on trial: the journal names it active, the previous model is kept. The trial is
the self-test on the clips that ship with the device. A pass commits it and the
listening pipeline switches to it (``applied``, or ``rolled_back`` for an operator's
rollback); a failure goes back to the previous model (``rolled_back``, with the reason).
Each step is published in the device's retained status. A check that fails reports
``rejected`` with its reason, and the running model keeps running.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from common.logfmt import ContextLogger
from common.mqtt import MqttLink
from device.detector import NON_COMMAND_LABELS
from device.features import UnsupportedFrontend, check_frontend
from device.installed_models import InstalledModels, newer
from device.local_model import LocalModel, ModelUnavailable, load_configured_model
from device.presence import SOFTWARE_VERSION
from device.self_test import SelfTestSuite, run_self_test
from device.settings import DeviceSettings
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.model import MODEL_FILE, ModelBlob, ModelManifest, ModelPackage
from schemas.protocol import decode
from schemas.signing import SignatureError, load_public_key, verify_manifest
from schemas.status import OtaProgress, OtaState
from schemas.topics import MANIFEST, MODEL_BLOB
from schemas.vocabulary import load_vocabulary, vocabulary_sha256

log = logging.getLogger(__name__)

FAILPOINT_VARIABLE = "MQVOX_OTA_FAILPOINT"
"""Environment variable naming a step at which the device process kills itself (SIGKILL): for power-cut drills."""
FAILPOINTS = ("downloading", "verified", "written", "installed", "on_trial", "self_tested", "committed")
"""The steps a failpoint can name, in the order an update passes them."""


def failpoint(step: str) -> None:
    """Die here, as a power cut would, when the drill asks for this step."""
    if os.environ.get(FAILPOINT_VARIABLE) == step:
        log.warning("failpoint %s: the process kills itself", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class StartingModel:
    """What a device runs when it starts, and where its updates go."""

    model: LocalModel
    """The model to listen with."""
    installed: InstalledModels | None
    """The state folder, with any update step still to report; None when updates are off."""


def open_starting_model(settings: DeviceSettings) -> StartingModel:
    """The model to start with: the journal's active one, after closing an interrupted update.

    With updates off, that is the configured model. With them on, a model that does not
    load falls back to the previous one, then to the configured (factory) model, whose
    failure is the only one that stops the device (ModelUnavailable).
    """
    factory = load_configured_model(settings.model)
    if settings.ota.public_key is None:
        return StartingModel(factory, None)
    installed = InstalledModels(settings.ota.state_dir or "state", factory.directory, factory.version)
    installed.recover(settings.ota.max_attempts)
    while installed.active != installed.factory:
        active = installed.active
        try:
            model = load_configured_model(settings.model, active.directory)
            break
        except ModelUnavailable as error:
            installed.fall_back(active, str(error))
    else:
        model = factory
    return StartingModel(model, installed)


class ModelUpdater:
    """Follows one channel's manifest for a running device, on a thread of its own."""

    def __init__(
        self,
        settings: DeviceSettings,
        installed: InstalledModels,
        *,
        report: Callable[[OtaProgress], bool],
        on_model: Callable[[LocalModel], None],
        count: Callable[[str], None],
    ) -> None:
        """``report`` publishes a step (True once the broker has it); ``on_model`` hands over a committed model.

        The public key and the self-test suite are read here, so a device whose update set-up
        is broken says so before it connects.
        """
        self.settings = settings
        self.device_id = settings.device_id
        self._log = ContextLogger(log, device_id=settings.device_id)
        self.link: MqttLink | None = None
        self.installed = installed
        self.public_key = load_public_key(settings.ota.public_key)
        self.suite = SelfTestSuite.load(settings.ota.self_test)
        self.vocabulary = load_vocabulary(settings.model.vocabulary)
        self._report = report
        self._on_model = on_model
        self._count = count
        self._manifests: queue.Queue[tuple[str, Envelope] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="ota", daemon=True)
        self.following = threading.Event()
        """Set once the broker has confirmed the manifest subscription."""
        self.topic = MANIFEST.topic(channel=settings.ota.channel)

    def start(self, link: MqttLink) -> None:
        """Start the update thread, then subscribe on ``link``: the retained manifest follows at once."""
        self.link = link
        self._thread.start()
        link.subscribe(self.topic, self._on_manifest, qos=MANIFEST.qos)
        self.following.set()
        self._log.info("following %s", self.topic)

    def stop(self) -> None:
        """Finish the update under way, if any, and stop."""
        self._manifests.put(None)
        if self._thread.is_alive():
            self._thread.join()

    def _on_manifest(self, topic: str, envelope: Envelope) -> None:
        # The link's dispatcher thread: an update takes minutes, which would hold up every other delivery
        # (the cloud's replies); the update thread takes the newest manifest when it is free.
        self._manifests.put((topic, envelope))

    def _run(self) -> None:
        while True:
            item = self._manifests.get()
            # Only the newest manifest matters; the ones queued behind it are stale.
            while item is not None and not self._manifests.empty():
                item = self._manifests.get()
            if item is None:
                return
            try:
                self.consider(*item)
            except Exception:
                # An update bug must not stop the device from listening with the model it has.
                self._count("ota_errors")
                self._log.exception("model update failed")

    def consider(self, topic: str, envelope: Envelope) -> None:
        """Check one manifest and, if it is for this device and newer, update to it."""
        try:
            manifest = decode(topic, envelope)
        except ProtocolError as error:
            self._count("ota_invalid_manifests")
            self._log.warning("ignored an invalid manifest: %s", error)
            return
        if manifest is None:
            return  # the channel's manifest was cleared
        assert isinstance(manifest, ModelManifest)
        journal = self.installed.journal
        if manifest.created_at < journal.last_manifest_at:
            # The newest accepted one itself comes again at every reconnect, and after an interrupted update it
            # must be taken up again: only an older one is a replay.
            self._count("ota_replays_ignored")
            self._log.warning(
                "ignored a replayed manifest of %s", manifest.version, extra={"version": manifest.version}
            )
            return
        if not manifest.stage.includes(self.device_id):
            self._count("ota_not_in_stage")
            self._log.debug(
                "manifest of %s is for stage %s, without this device",
                manifest.version,
                manifest.stage.name,
                extra={"version": manifest.version},
            )
            return
        try:
            verify_manifest(manifest, self.public_key)
        except SignatureError as error:
            self._reject(manifest, f"signature: {error}")
            return
        self.installed.accept_manifest(manifest.created_at)
        running = self.installed.active.version
        # A rollback manifest names the version to run, older or not: a device that missed the rollout it
        # undoes may be behind it. Any other manifest only ever moves a device forward.
        if manifest.rollback and manifest.version == running:
            self._log.debug("rollback to %s: it runs already", manifest.version, extra={"version": manifest.version})
            return
        if not manifest.rollback and not newer(manifest.version, running):
            if newer(running, manifest.version):
                self._count("ota_replays_ignored")
            # Routine: the retained manifest comes again at every start and reconnection.
            self._log.debug(
                "manifest of %s ignored: %s runs already",
                manifest.version,
                running,
                extra={"version": manifest.version},
            )
            return
        refused = self.installed.refused_reason(manifest.version, manifest.sha256)
        if refused is not None:
            self._log.info("%s was refused before (%s)", manifest.version, refused, extra={"version": manifest.version})
            return
        incompatible = self._incompatibility(manifest)
        if incompatible is not None:
            self._reject(manifest, incompatible, refuse=True)
            return
        self._update(manifest)

    def _update(self, manifest: ModelManifest) -> None:
        self._progress(OtaState.DOWNLOADING, manifest.version)
        failpoint("downloading")
        envelope = self._fetch(manifest.blob_topic)
        if envelope is None:
            waited = self.settings.ota.download_timeout_s
            self._reject(manifest, f"no model on {manifest.blob_topic} within {waited:g} s")
            return
        try:
            blob = ModelBlob.from_wire(envelope)
        except ProtocolError as error:
            self._reject(manifest, f"model blob: {error}", refuse=True)
            return
        if blob.sha256 != manifest.sha256 or len(blob.model) != manifest.size_bytes:
            self._reject(
                manifest,
                f"the model's SHA-256 {blob.sha256[:16]}... ({len(blob.model)} bytes) does not match the signed"
                f" manifest's {manifest.sha256[:16]}... ({manifest.size_bytes} bytes)",
                refuse=True,
            )
            return
        self._progress(OtaState.VERIFIED, manifest.version)
        failpoint("verified")
        package = ModelPackage(
            version=manifest.version,
            model_file=MODEL_FILE,
            sha256=manifest.sha256,
            size_bytes=manifest.size_bytes,
            frontend=manifest.frontend,
            labels=manifest.labels,
            detection=manifest.detection,
            vocabulary_sha256=vocabulary_sha256(self.settings.model.vocabulary),
            created_at=manifest.created_at,
        )
        candidate = self.installed.install(package, blob.model, on_written=lambda: failpoint("written"))
        failpoint("installed")
        previous = self.installed.active.version
        self.installed.begin_trial(candidate, manifest.sha256, rollback=manifest.rollback)
        failpoint("on_trial")
        failure, model = self._trial(candidate.directory)
        failpoint("self_tested")
        if failure is not None:
            reason = f"{failure}; {previous} kept"
            self.installed.roll_back(reason)
            self.installed.refuse(manifest.version, manifest.sha256, reason)
            self._count("ota_rolled_back")
            if self._progress(OtaState.ROLLED_BACK, manifest.version, reason):
                self.installed.reported()
            return
        assert model is not None
        self.installed.commit()
        failpoint("committed")
        self._on_model(model)
        if manifest.rollback and newer(previous, manifest.version):
            self._count("ota_rolled_back")
            self._progress(OtaState.ROLLED_BACK, manifest.version, f"rollback from {previous} by the operator")
        else:
            self._count("ota_applied")
            self._progress(OtaState.APPLIED, manifest.version)
        self._log.info("now running %s (was %s)", manifest.version, previous, extra={"version": manifest.version})

    def _trial(self, directory: str) -> tuple[str | None, LocalModel | None]:
        """Load the installed candidate as the device would, and self-test it: (failure or None, model)."""
        try:
            model = load_configured_model(self.settings.model, directory)
        except ModelUnavailable as error:
            return f"the model does not load: {error}", None
        report = run_self_test(model, self.settings.capture, self.settings.denoise, self.suite)
        # A failed self-test means the update is refused and rolled back: an operator must see it by default.
        self._log.log(
            logging.INFO if report.passed else logging.WARNING, report.reason(), extra={"version": model.version}
        )
        return (None if report.passed else report.reason()), model

    def _incompatibility(self, manifest: ModelManifest) -> str | None:
        """Why this device cannot run the manifest's model, or None."""
        if newer(manifest.min_device_version, SOFTWARE_VERSION):
            return f"needs device software {manifest.min_device_version} or newer, this is {SOFTWARE_VERSION}"
        try:
            check_frontend(manifest.frontend)
        except UnsupportedFrontend as error:
            return f"front end: {error}"
        known = {*self.vocabulary.labels, *NON_COMMAND_LABELS, manifest.detection.wake_label}
        unknown = [label for label in manifest.labels if label not in known]
        if unknown:
            return f"labels {', '.join(unknown)} are not in this device's vocabulary"
        if manifest.detection.wake_label not in manifest.labels:
            return f"the wake label {manifest.detection.wake_label!r} is not one of its labels"
        return None

    def _fetch(self, topic: str) -> Envelope | None:
        """The retained blob of ``topic``, or None if none arrives in time."""
        assert self.link is not None
        arrived: Future[Envelope] = Future()

        def keep(_topic: str, envelope: Envelope) -> None:
            # On the link's dispatcher thread, one message at a time: the first blob wins.
            if envelope.payload and not arrived.done():
                arrived.set_result(envelope)

        self.link.subscribe(topic, keep, qos=MODEL_BLOB.qos)
        try:
            return arrived.result(timeout=self.settings.ota.download_timeout_s)
        except TimeoutError:
            return None
        finally:
            self.link.unsubscribe(topic)

    def _reject(self, manifest: ModelManifest, reason: str, *, refuse: bool = False) -> None:
        self._count("ota_rejected")
        self._log.warning("rejected model %s: %s", manifest.version, reason, extra={"version": manifest.version})
        if refuse:
            self.installed.refuse(manifest.version, manifest.sha256, reason)
        self._progress(OtaState.REJECTED, manifest.version, reason)

    def _progress(self, state: OtaState, version: str, reason: str | None = None) -> bool:
        return self._report(OtaProgress(state, version, None if reason is None else reason[:1024]))
