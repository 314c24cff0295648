"""The worker's database as every program opens it: its tables, and the training contributions kept in them.

The worker writes every table (cloud_worker/storage.py, ``Store``); the operator tools
(firmware_tools) read and delete the training contributions: utterances of devices whose
owners consent (``Utterance.share_for_training``), kept with the cloud's answers for
``training_retention_days``. Both open the database through ``WorkerDatabase``, so each
table has one definition, and a database either of them makes first has the whole schema.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ForeignKey, UniqueConstraint, delete, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from common.database import COLUMN_TYPES, Database, DatabaseSettings

log = logging.getLogger("common.worker_database")

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class WorkerDatabaseSettings(DatabaseSettings):
    """How to reach the worker's database, and how long it keeps training contributions."""

    training_retention_days: float = 30.0
    """Retention of training contributions (utterances of consenting devices, with their answers): older ones
    (days since the worker received them) are deleted, audio and all. 0 keeps none. Their audio is kept whatever
    the worker's ``keep_audio`` says."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.training_retention_days) and self.training_retention_days >= 0):
            raise ValueError(
                f"training_retention_days must be a number of days, 0 or more, not {self.training_retention_days}"
            )


@dataclass(frozen=True)
class Contribution:
    """An utterance a consenting device sent, with the cloud's answer: one example to train device models on."""

    device_id: str
    """The device that sent it."""
    utterance_id: str
    """The device's id for it, unique per device."""
    received_at: float
    """Unix time (seconds) the worker received it; retention counts from here."""
    captured_at: float
    """Unix time (seconds) the device says the utterance ended."""
    model_version: str | None
    """The device model that was unsure of it; None when none ran (a forced upload)."""
    sample_rate: int
    """Sample rate (hertz) of the audio before encoding."""
    duration_s: float
    """Length of the audio (seconds)."""
    audio: bytes
    """The audio as received, Opus in OGG (common.opus.decode_opus reads it)."""
    intent: str | None
    """The cloud's intent: the label; None when it heard no command of the vocabulary."""
    slots: dict[str, Any]
    """Slot values of the intent."""
    confidence: float
    """The cloud's calibrated confidence in its answer, in [0, 1] (of the intent, or of 'no command')."""
    transcript: str | None
    """What the recogniser heard."""


@dataclass(frozen=True)
class ContributionSummary:
    """What is kept of one device for training."""

    device_id: str
    count: int
    """Contributions kept."""
    oldest_received_at: float
    """Unix time (seconds) the oldest kept one was received."""
    newest_received_at: float
    """Unix time (seconds) the newest kept one was received."""


class WorkerTables(DeclarativeBase):
    """The worker's tables."""

    type_annotation_map = COLUMN_TYPES


class DeviceRow(WorkerTables):
    """A device that has sent at least one stored utterance."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(primary_key=True)
    first_seen_at: Mapped[float]
    """Unix time (seconds) its earliest stored utterance was received."""
    last_seen_at: Mapped[float]
    """Unix time (seconds) its latest stored utterance was received."""
    utterance_count: Mapped[int]
    """How many of its utterances are stored."""


class UtteranceRow(WorkerTables):
    """An utterance a device was unsure of, with its metadata and (when retained) its audio."""

    __tablename__ = "utterances"
    __table_args__ = (UniqueConstraint("device_id", "utterance_id", name="utterances_device_utterance_key"),)

    row_id: Mapped[int] = mapped_column(primary_key=True)
    """This database's key for the row; ``utterance_id`` is the device's own id, unique per device only."""
    device_id: Mapped[str] = mapped_column(ForeignKey(DeviceRow.device_id))
    utterance_id: Mapped[str]
    received_at: Mapped[float]
    """Unix time (seconds) the worker received it."""
    captured_at: Mapped[float]
    """Unix time (seconds) the device says the utterance ended."""
    sample_rate: Mapped[int]
    """Sample rate (hertz) of the audio before encoding."""
    duration_s: Mapped[float]
    reason: Mapped[str]
    """Why the device asked the cloud (schemas.utterance.UploadReason)."""
    model_version: Mapped[str | None]
    """The device model that made the hypotheses; None when none ran."""
    hypotheses: Mapped[list[dict[str, Any]]]
    """The device's guesses, best first, as in the utterance metadata."""
    audio: Mapped[bytes | None]
    """Opus in OGG, as received; None when the settings do not keep audio."""
    audio_bytes: Mapped[int]
    """Size of the audio as received, stored or not."""

    transcript: Mapped[TranscriptRow | None] = relationship()
    """None when the utterance failed before speech recognition."""
    result: Mapped[ResultRow] = relationship()
    timings: Mapped[list[TimingRow]] = relationship()


class TranscriptRow(WorkerTables):
    """What the recogniser heard in one utterance."""

    __tablename__ = "transcripts"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    text: Mapped[str]
    confidence: Mapped[float]
    """Transcript.confidence, in [0, 1]."""
    model: Mapped[str]
    """Which recogniser made it."""

    segments: Mapped[list[SegmentRow]] = relationship(order_by="SegmentRow.index")


class SegmentRow(WorkerTables):
    """One segment of a transcript."""

    __tablename__ = "segments"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(TranscriptRow.utterance_row_id), primary_key=True)
    index: Mapped[int] = mapped_column(primary_key=True)
    """Position in the transcript, from 0, in time order."""
    start_s: Mapped[float]
    end_s: Mapped[float]
    text: Mapped[str]
    avg_logprob: Mapped[float]
    no_speech_prob: Mapped[float]


class ResultRow(WorkerTables):
    """The answer published for one utterance: its main fields for queries, and the whole of it for replay."""

    __tablename__ = "results"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    intent: Mapped[str | None]
    slots: Mapped[dict[str, Any]]
    confidence: Mapped[float]
    error_code: Mapped[str | None]
    """schemas.errors.ErrorCode of a failure; None on success."""
    error_message: Mapped[str | None]
    published: Mapped[dict[str, Any]]
    """Result.to_dict() of the answer as published: a redelivery is answered with an equal Result."""


class PublicationRow(WorkerTables):
    """That the answer to an utterance reached the broker: a redelivery of it is acknowledged, not answered again.

    A table of its own (not a column of ``results``), so a database made by an earlier version gains it
    without a migration.
    """

    __tablename__ = "publications"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    published_at: Mapped[float]
    """Unix time (seconds) the broker acknowledged the answer."""


class TrainingContributionRow(WorkerTables):
    """An utterance of a consenting device, with the cloud's answer, kept to train device models.

    A table of its own, with its own copy of the audio: it is kept whatever ``keep_audio`` says, and deleted,
    audio and all, after ``training_retention_days`` or when its device withdraws (``delete_contributions``).
    Only a successful answer is a label: a failed utterance is never a contribution.
    """

    __tablename__ = "training_contributions"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    device_id: Mapped[str] = mapped_column(index=True)
    utterance_id: Mapped[str]
    received_at: Mapped[float] = mapped_column(index=True)
    """Unix time (seconds) the worker received it; retention counts from here."""
    captured_at: Mapped[float]
    """Unix time (seconds) the device says the utterance ended."""
    model_version: Mapped[str | None]
    """The device model that was unsure of it; None when none ran."""
    sample_rate: Mapped[int]
    """Sample rate (hertz) of the audio before encoding."""
    duration_s: Mapped[float]
    audio: Mapped[bytes]
    """Opus in OGG, as received."""
    intent: Mapped[str | None]
    """The cloud's intent; None when it heard no command."""
    slots: Mapped[dict[str, Any]]
    confidence: Mapped[float]
    """The cloud's calibrated confidence, in [0, 1]."""
    transcript: Mapped[str | None]
    """What the recogniser heard."""


class TimingRow(WorkerTables):
    """How long one stage took on one utterance (Result.timings_ms)."""

    __tablename__ = "timings"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    stage: Mapped[str] = mapped_column(primary_key=True)
    """Stage name, e.g. ``decode``, ``asr`` or ``total``."""
    milliseconds: Mapped[float]


class WorkerDatabase(Database):
    """The worker's database, with the queries on its training contributions that worker and operator tools share.

    Ordinary ``Database`` behaviour otherwise: every table of ``WorkerTables`` is created on first use.
    """

    tables = WorkerTables

    def __init__(self, settings: WorkerDatabaseSettings | None = None) -> None:
        super().__init__(settings or WorkerDatabaseSettings())
        self.settings: WorkerDatabaseSettings

    def contributions(self, device_ids: Sequence[str] | None = None) -> list[Contribution]:
        """The training contributions kept, of these devices (every device when None), audio included.

        Ordered by (received_at, device_id, utterance_id).
        """
        query = select(TrainingContributionRow).order_by(
            TrainingContributionRow.received_at, TrainingContributionRow.device_id, TrainingContributionRow.utterance_id
        )
        if device_ids is not None:
            query = query.where(TrainingContributionRow.device_id.in_(list(device_ids)))
        with self._unavailable_as_error("read training contributions"), Session(self._engine) as session:
            return [
                Contribution(
                    device_id=row.device_id,
                    utterance_id=row.utterance_id,
                    received_at=row.received_at,
                    captured_at=row.captured_at,
                    model_version=row.model_version,
                    sample_rate=row.sample_rate,
                    duration_s=row.duration_s,
                    audio=row.audio,
                    intent=row.intent,
                    slots=dict(row.slots),
                    confidence=row.confidence,
                    transcript=row.transcript,
                )
                for row in session.scalars(query)
            ]

    def contribution_counts(self) -> dict[str, int]:
        """How many training contributions are kept, per device that has any."""
        return {summary.device_id: summary.count for summary in self.contribution_summaries()}

    def contribution_summaries(self) -> list[ContributionSummary]:
        """Per device that has training contributions: how many, the oldest and newest; ordered by device id."""
        row = TrainingContributionRow
        query = (
            select(row.device_id, func.count(), func.min(row.received_at), func.max(row.received_at))
            .group_by(row.device_id)
            .order_by(row.device_id)
        )
        with self._unavailable_as_error("count training contributions"), Session(self._engine) as session:
            return [
                ContributionSummary(device_id, count, oldest, newest)
                for device_id, count, oldest, newest in session.execute(query)
            ]

    def delete_contributions(self, device_id: str) -> int:
        """Delete every training contribution of this device, audio and all (its owner withdrew); how many."""
        query = delete(TrainingContributionRow).where(TrainingContributionRow.device_id == device_id)
        with (
            self._unavailable_as_error("delete training contributions"),
            Session(self._engine) as session,
            session.begin(),
        ):
            deleted = session.execute(query).rowcount
        log.info("training contributions deleted", extra={"device_id": device_id, "detail": f"{deleted} rows"})
        return deleted

    def purge_expired_contributions(self, now: float | None = None) -> int:
        """Delete the training contributions received before ``now`` (Unix time, default the present) less
        ``training_retention_days``, audio and all; how many."""
        now = time.time() if now is None else now
        cutoff = now - self.settings.training_retention_days * SECONDS_PER_DAY
        query = delete(TrainingContributionRow).where(TrainingContributionRow.received_at < cutoff)
        with (
            self._unavailable_as_error("delete expired training contributions"),
            Session(self._engine) as session,
            session.begin(),
        ):
            deleted = session.execute(query).rowcount
        if deleted:
            days = f"{self.settings.training_retention_days:g}"
            log.info("expired training contributions deleted", extra={"detail": f"{deleted} older than {days} days"})
        return deleted
