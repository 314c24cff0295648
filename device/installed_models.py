"""The models on a device's disk, and the journal that says which one runs, kept safe across power cuts.

Layout of the state folder::

    journal.json          which model is active, which is kept for rollback, an update on trial
    models/<version>/     model.tflite + manifest.json of each installed version

Every write goes to a temporary name, is fsynced, then renamed over the old one, and
the folder is fsynced: after a power cut the journal is either the old or the new one,
never half of each, and it only ever names a model folder that is complete.

An update is first put *on trial*: the journal names it active and remembers the
previous model. If the device dies before the trial is committed (a self-test that
crashed the process, a power cut), the next start finds the trial still open and goes
back to the previous model. The configured model directory is the *factory* model:
used before any update, and the last resort when nothing installed loads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from schemas.errors import ProtocolError
from schemas.model import ModelPackage, parse_version
from schemas.status import OtaProgress, OtaState

log = logging.getLogger(__name__)

JOURNAL_FILE = "journal.json"
MODELS_FOLDER = "models"
PARTIAL_SUFFIX = ".partial"
"""A model folder still being written; removed at the next start."""


@dataclass(frozen=True)
class InstalledModel:
    """A model the journal refers to."""

    version: str
    """Its version."""
    directory: str
    """Its package folder (absolute)."""


@dataclass(frozen=True)
class Trial:
    """An update applied but not yet confirmed by its self-test."""

    version: str
    """The version on trial."""
    sha256: str
    """SHA-256 of its model."""
    attempts: int
    """How many times this version has been put on trial, this one included."""
    rollback: bool = False
    """Whether it came from an explicit rollback manifest."""
    kept: InstalledModel | None = None
    """The model kept for rollback before the trial began (None: the factory model), restored with it."""


@dataclass(frozen=True)
class Journal:
    """What survives a restart of the device process."""

    active: InstalledModel | None = None
    """The model to run; None for the factory model."""
    previous: InstalledModel | None = None
    """The model kept for rollback; None for the factory model."""
    trial: Trial | None = None
    """The update on trial, if one is open."""
    last_manifest_at: float = 0.0
    """created_at of the newest signed manifest accepted: an older one is a replay."""
    refused: dict[str, dict[str, str]] = field(default_factory=dict)
    """Versions never to try again, by version: their model's sha256 and why."""
    interrupted: dict[str, int] = field(default_factory=dict)
    """Trials cut short by a restart, by version."""
    pending_report: dict[str, Any] | None = None
    """An update step decided before the broker could hear it (a rollback at start); sent once connected."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Journal:
        def model(value: dict | None) -> InstalledModel | None:
            return InstalledModel(**value) if value else None

        return cls(
            active=model(data.get("active")),
            previous=model(data.get("previous")),
            trial=_trial(data.get("trial")),
            last_manifest_at=float(data.get("last_manifest_at", 0.0)),
            refused=dict(data.get("refused", {})),
            interrupted={version: int(count) for version, count in data.get("interrupted", {}).items()},
            pending_report=data.get("pending_report"),
        )


def _trial(data: dict | None) -> Trial | None:
    if not data:
        return None
    kept = data.get("kept")
    return Trial(**(data | {"kept": InstalledModel(**kept) if kept else None}))


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it: on the disk, not only in the page cache, when this returns."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, fsync and rename: old or new content, nothing between."""
    temporary = path.with_name(f".{path.name}.tmp")
    write_synced(temporary, data)
    os.replace(temporary, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename inside it survives a power cut."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class InstalledModels:
    """The state folder of one device: its journal and its installed models."""

    def __init__(self, state_dir: str | Path, factory_dir: str | Path, factory_version: str) -> None:
        self.state_dir = Path(state_dir)
        self.factory = InstalledModel(factory_version, str(Path(factory_dir).resolve()))
        self.models_dir = self.state_dir / MODELS_FOLDER
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.journal = self._read_journal()

    @property
    def active(self) -> InstalledModel:
        """The model the journal says to run."""
        return self.journal.active or self.factory

    @property
    def previous(self) -> InstalledModel:
        """The model kept for rollback."""
        return self.journal.previous or self.factory

    def recover(self, max_attempts: int) -> dict[str, Any] | None:
        """At start: close an interrupted trial by going back, and remove half-written folders.

        A version whose trial was interrupted ``max_attempts`` times is refused for good, so a
        model that crashes the device cannot make it restart forever. Returns the update step
        still to report, kept in the journal until ``reported()``.
        """
        for partial in self.models_dir.glob(f"*{PARTIAL_SUFFIX}"):
            shutil.rmtree(partial, ignore_errors=True)
        trial = self.journal.trial
        if trial is None:
            return self.journal.pending_report
        interrupted = dict(self.journal.interrupted)
        interrupted[trial.version] = interrupted.get(trial.version, 0) + 1
        self._write(replace(self.journal, interrupted=interrupted))
        reason = f"the device stopped during the trial of {trial.version} ({interrupted[trial.version]} time(s))"
        log.warning("rolling back an interrupted update: %s", reason)
        self.roll_back(reason)
        if interrupted[trial.version] >= max_attempts:
            self.refuse(trial.version, trial.sha256, f"{reason}; not tried again")
        return self.journal.pending_report

    def roll_back(self, reason: str) -> None:
        """End the open trial: the previous model is active again, and the trial's version is remembered."""
        trial = self.journal.trial
        assert trial is not None
        journal = replace(
            self.journal,
            active=self.journal.previous,
            previous=trial.kept,
            trial=None,
            pending_report={"state": "rolled_back", "version": trial.version, "reason": reason[:1024]},
        )
        self._write(journal)

    def refuse(self, version: str, sha256: str, reason: str) -> None:
        """Never try this model again."""
        refused = dict(self.journal.refused)
        refused[version] = {"sha256": sha256, "reason": reason[:1024]}
        self._write(replace(self.journal, refused=refused))

    def refused_reason(self, version: str, sha256: str) -> str | None:
        """Why this exact model was refused before, or None."""
        entry = self.journal.refused.get(version)
        return entry["reason"] if entry and entry["sha256"] == sha256 else None

    def accept_manifest(self, created_at: float) -> None:
        """Remember the newest signed manifest, so an older one is recognised as a replay."""
        self._write(replace(self.journal, last_manifest_at=max(created_at, self.journal.last_manifest_at)))

    def install(self, package: ModelPackage, model: bytes, on_written=None) -> InstalledModel:
        """Write a package into ``models/<version>`` (through a ``.partial`` folder, fsynced, renamed)."""
        final = self.models_dir / package.version
        if final.exists() and self._same_model(final, package):
            return InstalledModel(package.version, str(final.resolve()))
        partial = self.models_dir / f"{package.version}{PARTIAL_SUFFIX}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        write_synced(partial / package.model_file, model)
        write_synced(partial / "manifest.json", package.to_json().encode("utf-8"))
        sync_folder(partial)
        if on_written is not None:
            on_written()
        if final.exists():
            shutil.rmtree(final)  # a different model under the same version: only an explicit rollback gets here
        os.replace(partial, final)
        sync_folder(self.models_dir)
        return InstalledModel(package.version, str(final.resolve()))

    def begin_trial(self, model: InstalledModel, sha256: str, *, rollback: bool) -> None:
        """Make ``model`` active on trial, keeping the active one as previous."""
        assert self.journal.trial is None, "a trial is open already"
        attempts = self.journal.interrupted.get(model.version, 0) + 1
        trial = Trial(model.version, sha256, attempts, rollback, kept=self.journal.previous)
        self._write(replace(self.journal, active=model, previous=self.active, trial=trial, pending_report=None))

    def commit(self) -> None:
        """The trial passed: keep it, and delete installed models that are neither active nor previous."""
        interrupted = {version: n for version, n in self.journal.interrupted.items() if version != self.active.version}
        self._write(replace(self.journal, trial=None, pending_report=None, interrupted=interrupted))
        keep = {Path(self.active.directory).name, Path(self.previous.directory).name}
        for folder in self.models_dir.iterdir():
            if folder.is_dir() and folder.name not in keep:
                shutil.rmtree(folder, ignore_errors=True)

    def pending_progress(self) -> OtaProgress | None:
        """The update step still to report (kept until ``reported()``), or None."""
        pending = self.journal.pending_report
        return OtaProgress(OtaState(pending["state"]), pending["version"], pending["reason"]) if pending else None

    def reported(self) -> None:
        """The pending report reached the broker."""
        if self.journal.pending_report is not None:
            self._write(replace(self.journal, pending_report=None))

    def fall_back(self, broken: InstalledModel, reason: str) -> InstalledModel:
        """``broken`` does not load at start: use the previous model (or the factory one) and say so."""
        target = self.previous if broken != self.previous else self.factory
        log.error(
            "model %s in %s is unusable (%s); falling back to %s",
            broken.version,
            broken.directory,
            reason,
            target.version,
        )
        self._write(
            replace(
                self.journal,
                active=None if target == self.factory else target,
                previous=None,
                trial=None,
                pending_report={"state": "rolled_back", "version": broken.version, "reason": reason[:1024]},
            )
        )
        return target

    def _same_model(self, folder: Path, package: ModelPackage) -> bool:
        try:
            installed = ModelPackage.load(folder)
            installed.model_path(folder)
        except (OSError, ProtocolError):
            return False  # missing, damaged or half-written: not the same complete model
        return installed.sha256 == package.sha256

    def _read_journal(self) -> Journal:
        path = self.state_dir / JOURNAL_FILE
        if not path.exists():
            return Journal()
        try:
            return Journal.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as error:
            # Only a disk fault gets here (writes are atomic); the factory model is the safe answer.
            log.error("update journal %s is unreadable (%s); starting from the factory model", path, error)
            return Journal()

    def _write(self, journal: Journal) -> None:
        write_durably(self.state_dir / JOURNAL_FILE, json.dumps(journal.to_dict(), indent=2).encode("utf-8"))
        self.journal = journal


def newer(version: str, than: str) -> bool:
    """Whether ``version`` is a higher version number than ``than``."""
    return parse_version(version) > parse_version(than)
