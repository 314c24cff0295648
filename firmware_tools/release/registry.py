"""The model registry: every published model version, each channel's live version, and every rollout.

It lives in the worker's database, through the same code (common.database.Database),
so one SQLite file or PostgreSQL server holds utterances and models alike. The blob is
kept here too: an aborted rollout re-publishes the previous version from the registry,
even after its retained copy was cleared from the broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import ForeignKey, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from common.database import COLUMN_TYPES, Database
from schemas.model import ModelPackage, parse_version
from schemas.status import OtaState

FAILED_STEPS = (OtaState.REJECTED, OtaState.ROLLED_BACK)
"""Final update steps that count as failures."""


class RegistryError(ValueError):
    """A registration or rollout the registry refuses; the message says why."""


class RegistryTables(DeclarativeBase):
    """The registry's tables (apart from the worker's, so each side counts only its own rows)."""

    type_annotation_map = COLUMN_TYPES


class ModelVersionRow(RegistryTables):
    """A model version published on a channel."""

    __tablename__ = "model_versions"

    channel: Mapped[str] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(primary_key=True)
    sha256: Mapped[str]
    size_bytes: Mapped[int]
    package: Mapped[dict[str, Any]]
    """ModelPackage.to_dict() of the package it was published from: front end, labels, detection."""
    model: Mapped[bytes]
    """The .tflite file."""
    min_device_version: Mapped[str]
    release_notes: Mapped[str]
    key_id: Mapped[str]
    """The signing key it was published with."""
    registered_at: Mapped[float]
    """Unix time (seconds) of the first publication."""
    blob_retained: Mapped[bool]
    """Whether its blob is retained on the broker now (False once cleared as superseded)."""


class ChannelRow(RegistryTables):
    """What a channel's fleet is meant to run."""

    __tablename__ = "channels"

    channel: Mapped[str] = mapped_column(primary_key=True)
    live_version: Mapped[str | None]
    """The version offered to everyone, or restored by an aborted rollout; None before the first."""
    updated_at: Mapped[float]


class RolloutRow(RegistryTables):
    """One staged rollout of a version."""

    __tablename__ = "rollouts"

    rollout_id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str]
    version: Mapped[str]
    previous_version: Mapped[str | None]
    """The live version when it started: what an abort restores."""
    plan: Mapped[dict[str, Any]]
    """The stages and abort criteria, as given."""
    state: Mapped[str]
    """RolloutState."""
    stage_index: Mapped[int]
    """The stage reached, from 0."""
    started_at: Mapped[float]
    finished_at: Mapped[float | None]
    reason: Mapped[str | None]
    """Why it was aborted; None otherwise."""


class RolloutReportRow(RegistryTables):
    """The latest update step a device reported during a rollout."""

    __tablename__ = "rollout_reports"

    rollout_id: Mapped[int] = mapped_column(ForeignKey(RolloutRow.rollout_id), primary_key=True)
    device_id: Mapped[str] = mapped_column(primary_key=True)
    state: Mapped[str]
    """schemas.status.OtaState."""
    version: Mapped[str]
    reason: Mapped[str | None]
    reported_at: Mapped[float]


class RevokedDeviceRow(RegistryTables):
    """A device whose certificate was revoked: its retained status may still say "online" (the ACL now refuses
    its offline status and its Last Will), so rollouts and status must not trust it."""

    __tablename__ = "revoked_devices"

    device_id: Mapped[str] = mapped_column(primary_key=True)
    revoked_at: Mapped[float]
    """Unix time (seconds)."""


class LearningRoundRow(RegistryTables):
    """One round of fleet learning (firmware_tools/learning/learn.py): what went in, how the candidate did, what it
    cost."""

    __tablename__ = "learning_rounds"

    round_id: Mapped[int] = mapped_column(primary_key=True)
    channel: Mapped[str]
    base_version: Mapped[str]
    """The version the candidate was adapted from: what the channel ran."""
    version: Mapped[str]
    """The candidate's version."""
    created_at: Mapped[float]
    passed: Mapped[bool]
    """Whether it passed the gate."""
    outcome: Mapped[str]
    """``rejected`` (the gate stopped it), ``packaged`` (passed, not rolled out), or the rollout's state."""
    record: Mapped[dict[str, Any]]
    """Data counts per device and label (never audio), the gate's figures and reasons, seconds per stage."""


class RolloutState(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    """Every targeted online device applied the version: it is live."""
    PARTIAL = "partial"
    """The stages ran to the end within the abort criteria, but some devices could not apply the version: the
    live version is unchanged, and the devices that applied it keep it."""
    ABORTED = "aborted"


@dataclass(frozen=True)
class ModelVersion:
    """A registered version, as the rollout tools use it."""

    channel: str
    version: str
    package: ModelPackage
    model: bytes
    min_device_version: str
    release_notes: str
    key_id: str
    registered_at: float
    blob_retained: bool


@dataclass(frozen=True)
class Rollout:
    """A rollout as recorded."""

    rollout_id: int
    channel: str
    version: str
    previous_version: str | None
    plan: dict[str, Any]
    state: RolloutState
    stage_index: int
    started_at: float
    finished_at: float | None
    reason: str | None


class ModelRegistry(Database):
    """Model versions, channels and rollouts in the worker's database."""

    tables = RegistryTables

    def register(
        self, channel: str, package: ModelPackage, model: bytes, *, min_device_version: str, notes: str, key_id: str
    ) -> ModelVersion:
        """Record a version; the same version again is accepted only with the very same model bytes."""
        with self._unavailable_as_error("register a model"), Session(self._engine) as session, session.begin():
            row = session.get(ModelVersionRow, (channel, package.version))
            if row is not None and row.sha256 != package.sha256:
                raise RegistryError(
                    f"{channel} {package.version} is registered already with another model (sha256 {row.sha256[:12]}):"
                    " a published version never changes, give the new model a new version"
                )
            if row is None:
                row = ModelVersionRow(
                    channel=channel,
                    version=package.version,
                    sha256=package.sha256,
                    size_bytes=package.size_bytes,
                    package=package.to_dict(),
                    model=model,
                    min_device_version=min_device_version,
                    release_notes=notes,
                    key_id=key_id,
                    registered_at=time.time(),
                    blob_retained=False,
                )
                session.add(row)
            return _version(row)

    def version(self, channel: str, version: str) -> ModelVersion:
        """A registered version; RegistryError if there is none."""
        with self._unavailable_as_error("read a model"), Session(self._engine) as session:
            row = session.get(ModelVersionRow, (channel, version))
            if row is None:
                raise RegistryError(f"no model {version} is registered on channel {channel!r}")
            return _version(row)

    def versions(self, channel: str) -> list[ModelVersion]:
        """Every version registered on ``channel``, oldest version number first."""
        with self._unavailable_as_error("list models"), Session(self._engine) as session:
            rows = session.scalars(select(ModelVersionRow).where(ModelVersionRow.channel == channel)).all()
            return sorted((_version(row) for row in rows), key=lambda item: parse_version(item.version))

    def set_blob_retained(self, channel: str, version: str, retained: bool) -> None:
        with self._unavailable_as_error("update a model"), Session(self._engine) as session, session.begin():
            session.execute(
                update(ModelVersionRow)
                .where(ModelVersionRow.channel == channel, ModelVersionRow.version == version)
                .values(blob_retained=retained)
            )

    def live_version(self, channel: str) -> str | None:
        """The version the whole channel is meant to run, or None before the first."""
        with self._unavailable_as_error("read a channel"), Session(self._engine) as session:
            row = session.get(ChannelRow, channel)
            return None if row is None else row.live_version

    def set_live_version(self, channel: str, version: str) -> None:
        with self._unavailable_as_error("update a channel"), Session(self._engine) as session, session.begin():
            row = session.get(ChannelRow, channel)
            if row is None:
                session.add(ChannelRow(channel=channel, live_version=version, updated_at=time.time()))
            else:
                row.live_version, row.updated_at = version, time.time()

    def start_rollout(self, channel: str, version: str, previous_version: str | None, plan: dict[str, Any]) -> Rollout:
        """Record a new rollout; RegistryError while another one of the channel is running."""
        with self._unavailable_as_error("start a rollout"), Session(self._engine) as session, session.begin():
            running = session.scalar(
                select(RolloutRow).where(RolloutRow.channel == channel, RolloutRow.state == RolloutState.RUNNING)
            )
            if running is not None:
                raise RegistryError(
                    f"rollout {running.rollout_id} of {channel} {running.version} is still running;"
                    " finish or abort it first"
                )
            row = RolloutRow(
                channel=channel,
                version=version,
                previous_version=previous_version,
                plan=plan,
                state=str(RolloutState.RUNNING),
                stage_index=0,
                started_at=time.time(),
                finished_at=None,
                reason=None,
            )
            session.add(row)
            session.flush()
            return _rollout(row)

    def enter_stage(self, rollout_id: int, stage_index: int) -> None:
        with self._unavailable_as_error("update a rollout"), Session(self._engine) as session, session.begin():
            session.execute(
                update(RolloutRow).where(RolloutRow.rollout_id == rollout_id).values(stage_index=stage_index)
            )

    def finish_rollout(self, rollout_id: int, state: RolloutState, reason: str | None = None) -> None:
        with self._unavailable_as_error("finish a rollout"), Session(self._engine) as session, session.begin():
            session.execute(
                update(RolloutRow)
                .where(RolloutRow.rollout_id == rollout_id)
                .values(state=str(state), finished_at=time.time(), reason=reason)
            )

    def record_report(
        self, rollout_id: int, device_id: str, state: str, version: str, reason: str | None, reported_at: float
    ) -> None:
        """Keep a device's latest report of a rollout."""
        with self._unavailable_as_error("record a report"), Session(self._engine) as session, session.begin():
            session.merge(
                RolloutReportRow(
                    rollout_id=rollout_id,
                    device_id=device_id,
                    state=state,
                    version=version,
                    reason=reason,
                    reported_at=reported_at,
                )
            )

    def latest_rollout(self, channel: str) -> Rollout | None:
        with self._unavailable_as_error("read rollouts"), Session(self._engine) as session:
            row = session.scalar(
                select(RolloutRow).where(RolloutRow.channel == channel).order_by(RolloutRow.rollout_id.desc()).limit(1)
            )
            return None if row is None else _rollout(row)

    def record_round(
        self, channel: str, base_version: str, version: str, passed: bool, outcome: str, record: dict[str, Any]
    ) -> int:
        """Record a learning round; its id."""
        with self._unavailable_as_error("record a learning round"), Session(self._engine) as session, session.begin():
            row = LearningRoundRow(
                channel=channel,
                base_version=base_version,
                version=version,
                created_at=time.time(),
                passed=passed,
                outcome=outcome,
                record=record,
            )
            session.add(row)
            session.flush()
            return row.round_id

    def set_round_outcome(self, round_id: int, outcome: str, record: dict[str, Any]) -> None:
        with self._unavailable_as_error("update a learning round"), Session(self._engine) as session, session.begin():
            session.execute(
                update(LearningRoundRow)
                .where(LearningRoundRow.round_id == round_id)
                .values(outcome=outcome, record=record)
            )

    def rounds(self, channel: str) -> list[LearningRoundRow]:
        """The channel's learning rounds, oldest first (detached rows)."""
        with (
            self._unavailable_as_error("read learning rounds"),
            Session(self._engine, expire_on_commit=False) as session,
        ):
            rows = session.scalars(
                select(LearningRoundRow).where(LearningRoundRow.channel == channel).order_by(LearningRoundRow.round_id)
            ).all()
            session.expunge_all()
            return list(rows)

    def failed_reports(self, channel: str, version: str) -> dict[str, str]:
        """Devices that rejected or rolled back ``version`` in any rollout of the channel, with their reason."""
        failed = [str(step) for step in FAILED_STEPS]
        with self._unavailable_as_error("read reports"), Session(self._engine) as session:
            rows = session.execute(
                select(RolloutReportRow.device_id, RolloutReportRow.state, RolloutReportRow.reason)
                .join(RolloutRow, RolloutRow.rollout_id == RolloutReportRow.rollout_id)
                .where(
                    RolloutRow.channel == channel,
                    RolloutReportRow.version == version,
                    RolloutReportRow.state.in_(failed),
                )
            ).all()
            return {device: reason or state for device, state, reason in rows}

    def revoke_device(self, device_id: str) -> None:
        """Record that a device's certificate was revoked (again is fine)."""
        with self._unavailable_as_error("record a revocation"), Session(self._engine) as session, session.begin():
            if session.get(RevokedDeviceRow, device_id) is None:
                session.add(RevokedDeviceRow(device_id=device_id, revoked_at=time.time()))

    def revoked_devices(self) -> set[str]:
        """Every device recorded as revoked."""
        with self._unavailable_as_error("read revocations"), Session(self._engine) as session:
            return set(session.scalars(select(RevokedDeviceRow.device_id)).all())

    def reports(self, rollout_id: int) -> dict[str, RolloutReportRow]:
        """The latest report of each device in a rollout, by device id (detached rows)."""
        with self._unavailable_as_error("read reports"), Session(self._engine, expire_on_commit=False) as session:
            rows = session.scalars(select(RolloutReportRow).where(RolloutReportRow.rollout_id == rollout_id)).all()
            session.expunge_all()
            return {row.device_id: row for row in rows}


def _version(row: ModelVersionRow) -> ModelVersion:
    return ModelVersion(
        channel=row.channel,
        version=row.version,
        package=ModelPackage.from_dict(row.package),
        model=row.model,
        min_device_version=row.min_device_version,
        release_notes=row.release_notes,
        key_id=row.key_id,
        registered_at=row.registered_at,
        blob_retained=row.blob_retained,
    )


def _rollout(row: RolloutRow) -> Rollout:
    return Rollout(
        rollout_id=row.rollout_id,
        channel=row.channel,
        version=row.version,
        previous_version=row.previous_version,
        plan=dict(row.plan),
        state=RolloutState(row.state),
        stage_index=row.stage_index,
        started_at=row.started_at,
        finished_at=row.finished_at,
        reason=row.reason,
    )
