"""What the worker keeps of each utterance: audio, transcript, result and stage timings, in SQLite or PostgreSQL.

The worker acknowledges an MQTT message only after ``Store.save`` returns, so a
redelivered utterance finds its stored answer (``Store.answer_of``) instead of being
transcribed again; once the answer is published (``Store.mark_published``), a
redelivery is acknowledged without publishing it again. Idempotency is per device:
the key is (device_id, utterance_id), so no device can ever read the answer to
another device's utterance.

Utterances of devices whose owners consent (``Utterance.share_for_training``) are also
kept, with their answers, as training contributions (``Store.contributions``), for
``StorageSettings.training_retention_days``; no other utterance ever is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from sqlalchemy import (
    JSON,
    URL,
    Engine,
    ForeignKey,
    LargeBinary,
    UniqueConstraint,
    case,
    create_engine,
    delete,
    event,
    func,
    literal,
    make_url,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from cloud_worker.transcript import Transcript
from common.locations import Role, default_database_url, make_private_folder, make_state_folder, state_folder
from schemas.result import Result
from schemas.utterance import Utterance

log = logging.getLogger("cloud_worker.storage")

SECONDS_PER_DAY = 86400.0

PURGE_INTERVAL_S = 60.0
"""While saving, expired training contributions are deleted at most this often (seconds, monotonic clock)."""


@dataclass(frozen=True)
class StorageSettings:
    """Where and what the worker stores."""

    url: str = field(default_factory=default_database_url)
    """SQLAlchemy database URL. The default is an embedded SQLite file, ``mqvox.sqlite3`` in the worker's state
    folder (common/locations.py: ``$STATE_DIRECTORY/worker`` under systemd, else ``$MQVOX_STATE_DIR/worker``, else
    ``~/.local/state/mqvox/worker``), which the operator tools use too; a SQLite file's folder is made, mode 0700,
    when missing. ``postgresql+psycopg://user:password@host:5432/name`` for a shared server."""
    keep_audio: bool = True
    """Retention: whether the utterances' Opus audio is stored. Without it only its size is kept."""
    connect_timeout_s: int = 5
    """How long (seconds) to wait for a PostgreSQL server to accept a connection; libpq's minimum is 2."""
    busy_timeout_s: float = 5.0
    """How long (seconds) to wait for another worker to finish writing a shared SQLite file."""
    training_retention_days: float = 30.0
    """Retention of training contributions (utterances of consenting devices, with their answers): older ones
    (days since the worker received them) are deleted, audio and all. 0 keeps none. Their audio is kept whatever
    ``keep_audio`` says."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.training_retention_days) and self.training_retention_days >= 0):
            raise ValueError(
                f"training_retention_days must be a number of days, 0 or more, not {self.training_retention_days}"
            )


@dataclass(frozen=True)
class StoredUtterance:
    """One handled utterance, as the worker hands it over to be stored."""

    utterance: Utterance
    """The request, as received (audio included)."""
    received_at: float
    """Unix time (seconds) the worker received it."""
    transcript: Transcript | None
    """What the recogniser heard; None when the utterance failed before speech recognition."""
    result: Result
    """The answer published to the device."""

    def __post_init__(self) -> None:
        asked = (self.utterance.device_id, self.utterance.utterance_id)
        answered = (self.result.device_id, self.result.utterance_id)
        if asked != answered:
            raise ValueError(f"result for {answered} stored with utterance {asked}")


@dataclass(frozen=True)
class StoredAnswer:
    """The answer stored for an utterance, and whether it has been published."""

    result: Result
    """The Result, equal to the one published (or to be published)."""
    published_at: float | None
    """Unix time (seconds) the broker acknowledged its publication; None when it was not yet recorded."""


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


SUPPORTED_URLS = "use sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/NAME"
"""What a database URL may be, for error messages."""


class StorageUnavailable(ConnectionError):
    """The database cannot be reached, or went away; ``str(error)`` names it (password masked) and says why."""


COLUMN_TYPES: dict[Any, Any] = {dict[str, Any]: JSON, list[dict[str, Any]]: JSON, bytes: LargeBinary}
"""Column types of the annotations every mqvox table uses: JSON documents and binary payloads."""


class TableBase(DeclarativeBase):
    """The worker's tables."""

    type_annotation_map = COLUMN_TYPES


class DeviceRow(TableBase):
    """A device that has sent at least one stored utterance."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(primary_key=True)
    first_seen_at: Mapped[float]
    """Unix time (seconds) its earliest stored utterance was received."""
    last_seen_at: Mapped[float]
    """Unix time (seconds) its latest stored utterance was received."""
    utterance_count: Mapped[int]
    """How many of its utterances are stored."""


class UtteranceRow(TableBase):
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


class TranscriptRow(TableBase):
    """What the recogniser heard in one utterance."""

    __tablename__ = "transcripts"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    text: Mapped[str]
    confidence: Mapped[float]
    """Transcript.confidence, in [0, 1]."""
    model: Mapped[str]
    """Which recogniser made it."""

    segments: Mapped[list[SegmentRow]] = relationship(order_by="SegmentRow.index")


class SegmentRow(TableBase):
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


class ResultRow(TableBase):
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


class PublicationRow(TableBase):
    """That the answer to an utterance reached the broker: a redelivery of it is acknowledged, not answered again.

    A table of its own (not a column of ``results``), so a database made by an earlier version gains it
    without a migration.
    """

    __tablename__ = "publications"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    published_at: Mapped[float]
    """Unix time (seconds) the broker acknowledged the answer."""


class TrainingContributionRow(TableBase):
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


class TimingRow(TableBase):
    """How long one stage took on one utterance (Result.timings_ms)."""

    __tablename__ = "timings"

    utterance_row_id: Mapped[int] = mapped_column(ForeignKey(UtteranceRow.row_id), primary_key=True)
    stage: Mapped[str] = mapped_column(primary_key=True)
    """Stage name, e.g. ``decode``, ``asr`` or ``total``."""
    milliseconds: Mapped[float]


class Database:
    """One SQLAlchemy engine on SQLite or PostgreSQL, with the tables of ``tables`` created on first use.

    Shared by the worker's Store and the model registry of firmware_tools, so both speak
    to the same database the same way and report an outage the same way.
    """

    tables: type[DeclarativeBase] = TableBase
    """The declarative base whose tables this database needs."""

    def __init__(self, settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings()
        try:
            url = make_url(self.settings.url)
        except ArgumentError:
            raise ValueError(f"{self.settings.url!r} is not a database URL: {SUPPORTED_URLS}") from None
        self.database = url.render_as_string(hide_password=True)
        """The database URL with its password masked, for messages and logs."""
        try:
            self._engine = _create_engine(url, self.settings)
        except OSError as error:  # The SQLite file's folder could not be made.
            raise StorageUnavailable(f"database {self.database} is unavailable ({error})") from error
        except NoSuchModuleError:  # SQLAlchemy knows no such dialect or driver
            raise ValueError(f"database {self.database}: unknown kind of database; {SUPPORTED_URLS}") from None
        dialect = self._engine.dialect.name
        if dialect not in _INSERTS:
            self._engine.dispose()
            raise ValueError(
                f"database {self.database}: dialect {dialect!r} is not supported, only SQLite and PostgreSQL"
            )
        self._insert = _INSERTS[dialect]
        try:
            with self._unavailable_as_error("create the tables"):
                self.tables.metadata.create_all(self._engine)
        except BaseException:
            self._engine.dispose()
            raise

    def counts(self) -> dict[str, int]:
        """Rows in each table, by table name."""
        with self._unavailable_as_error("count rows"), Session(self._engine) as session:
            return {
                table.name: session.scalar(select(func.count()).select_from(table)) or 0
                for table in self.tables.metadata.sorted_tables
            }

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _unavailable_as_error(self, action: str) -> Iterator[None]:
        """Turn the driver's ways of saying 'cannot reach the database' into StorageUnavailable."""
        try:
            yield
        except (OperationalError, InterfaceError, PoolTimeoutError) as error:
            raise StorageUnavailable(self._unavailable_message(action, error)) from error
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
            raise StorageUnavailable(self._unavailable_message(action, error)) from error

    def _unavailable_message(self, action: str, error: Exception) -> str:
        cause = getattr(error, "orig", None) or error
        reason = " ".join(str(cause).split()) or type(cause).__name__
        return f"cannot {action}: database {self.database} is unavailable ({reason})"


class Store(Database):
    """The worker's database: saves handled utterances in batches and answers redeliveries from them.

    It also keeps the training contributions of consenting devices, and while saving deletes the expired ones
    at most once every PURGE_INTERVAL_S.
    """

    def __init__(self, settings: StorageSettings | None = None) -> None:
        super().__init__(settings)
        self._next_purge_at = time.monotonic()
        """When (time.monotonic()) ``save`` next deletes expired contributions; the first save does."""

    def answer_of(self, device_id: str, utterance_id: str) -> StoredAnswer | None:
        """The answer stored for this device's utterance, or None when it is not stored."""
        query = (
            select(ResultRow.published, PublicationRow.published_at)
            .join(UtteranceRow, UtteranceRow.row_id == ResultRow.utterance_row_id)
            .outerjoin(PublicationRow, PublicationRow.utterance_row_id == ResultRow.utterance_row_id)
            .where(UtteranceRow.device_id == device_id, UtteranceRow.utterance_id == utterance_id)
        )
        with self._unavailable_as_error("read an answer"), Session(self._engine) as session:
            row = session.execute(query).first()
        return None if row is None else StoredAnswer(Result.from_dict(row.published), row.published_at)

    def mark_published(self, keys: Sequence[tuple[str, str]], published_at: float) -> None:
        """Record that the answers of these (device_id, utterance_id) reached the broker; marked ones are kept."""
        if not keys:
            return
        with self._unavailable_as_error("record publications"), Session(self._engine) as session, session.begin():
            for device_id, utterance_id in sorted(set(keys)):
                stored = select(UtteranceRow.row_id, literal(published_at)).where(
                    UtteranceRow.device_id == device_id, UtteranceRow.utterance_id == utterance_id
                )
                session.execute(
                    self._insert(PublicationRow)
                    .from_select(["utterance_row_id", "published_at"], stored)
                    .on_conflict_do_nothing(index_elements=[PublicationRow.utterance_row_id])
                )

    def save(self, records: Sequence[StoredUtterance]) -> set[tuple[str, str]]:
        """Store every record in one transaction; one whose (device_id, utterance_id) is stored already is skipped.
        The (device_id, utterance_id) of the records stored by this call.

        A duplicate, even one another worker inserts at the same moment, is skipped by the
        database itself (INSERT ... ON CONFLICT DO NOTHING) and never aborts the others.
        """
        # One order for every worker, so two batches touching the same devices lock them in the same order.
        ordered = sorted(records, key=lambda record: (record.utterance.device_id, record.utterance.utterance_id))
        with self._unavailable_as_error("save utterances"), Session(self._engine) as session, session.begin():
            stored = {
                (record.utterance.device_id, record.utterance.utterance_id)
                for record in ordered
                if self._save_one(session, record)
            }
        if time.monotonic() >= self._next_purge_at:
            self.purge_expired_contributions()
        return stored

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
        ``training_retention_days``, audio and all; how many. ``save`` calls it at most every PURGE_INTERVAL_S."""
        now = time.time() if now is None else now
        cutoff = now - self.settings.training_retention_days * SECONDS_PER_DAY
        query = delete(TrainingContributionRow).where(TrainingContributionRow.received_at < cutoff)
        with (
            self._unavailable_as_error("delete expired training contributions"),
            Session(self._engine) as session,
            session.begin(),
        ):
            deleted = session.execute(query).rowcount
        self._next_purge_at = time.monotonic() + PURGE_INTERVAL_S
        if deleted:
            days = f"{self.settings.training_retention_days:g}"
            log.info("expired training contributions deleted", extra={"detail": f"{deleted} older than {days} days"})
        return deleted

    def _save_one(self, session: Session, record: StoredUtterance) -> bool:
        """Whether the record was stored (False: stored already)."""
        utterance, result, received_at = record.utterance, record.result, record.received_at
        session.execute(
            self._insert(DeviceRow)
            .values(
                device_id=utterance.device_id, first_seen_at=received_at, last_seen_at=received_at, utterance_count=0
            )
            .on_conflict_do_nothing(index_elements=[DeviceRow.device_id])
        )
        meta = utterance.meta()
        row_id = session.execute(
            self._insert(UtteranceRow)
            .values(
                device_id=utterance.device_id,
                utterance_id=utterance.utterance_id,
                received_at=received_at,
                captured_at=utterance.captured_at,
                sample_rate=utterance.sample_rate,
                duration_s=utterance.duration_s,
                reason=str(utterance.reason),
                model_version=utterance.model_version,
                hypotheses=meta["hypotheses"],
                audio=utterance.audio if self.settings.keep_audio else None,
                audio_bytes=len(utterance.audio),
            )
            .on_conflict_do_nothing(index_elements=[UtteranceRow.device_id, UtteranceRow.utterance_id])
            .returning(UtteranceRow.row_id)
        ).scalar_one_or_none()
        if row_id is None:
            return False  # Stored already, by this worker or another: its first answer stands.
        session.execute(
            update(DeviceRow)
            .where(DeviceRow.device_id == utterance.device_id)
            .values(
                utterance_count=DeviceRow.utterance_count + 1,
                first_seen_at=case((DeviceRow.first_seen_at > received_at, received_at), else_=DeviceRow.first_seen_at),
                last_seen_at=case((DeviceRow.last_seen_at < received_at, received_at), else_=DeviceRow.last_seen_at),
            )
        )
        rows: list[TableBase] = []
        if record.transcript is not None:
            transcript = record.transcript
            segments = [
                SegmentRow(
                    index=index,
                    start_s=segment.start_s,
                    end_s=segment.end_s,
                    text=segment.text,
                    avg_logprob=segment.avg_logprob,
                    no_speech_prob=segment.no_speech_prob,
                )
                for index, segment in enumerate(transcript.segments)
            ]
            rows.append(
                TranscriptRow(
                    utterance_row_id=row_id,
                    text=transcript.text,
                    confidence=transcript.confidence,
                    model=transcript.model,
                    segments=segments,
                )
            )
        rows.append(
            ResultRow(
                utterance_row_id=row_id,
                intent=result.intent,
                slots=dict(result.slots),
                confidence=result.confidence,
                error_code=str(result.error.code) if result.error else None,
                error_message=result.error.message if result.error else None,
                published=result.to_dict(),
            )
        )
        rows.extend(
            TimingRow(utterance_row_id=row_id, stage=stage, milliseconds=milliseconds)
            for stage, milliseconds in result.timings_ms.items()
        )
        # Only with the owner's consent, and only a label: a failed utterance has none.
        if utterance.share_for_training and result.error is None and self.settings.training_retention_days > 0:
            rows.append(
                TrainingContributionRow(
                    utterance_row_id=row_id,
                    device_id=utterance.device_id,
                    utterance_id=utterance.utterance_id,
                    received_at=received_at,
                    captured_at=utterance.captured_at,
                    model_version=utterance.model_version,
                    sample_rate=utterance.sample_rate,
                    duration_s=utterance.duration_s,
                    audio=utterance.audio,
                    intent=result.intent,
                    slots=dict(result.slots),
                    confidence=result.confidence,
                    transcript=record.transcript.text if record.transcript is not None else result.transcript,
                )
            )
        session.add_all(rows)
        return True


_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
"""The INSERT with ON CONFLICT of each supported dialect."""


def _create_engine(url: URL, settings: StorageSettings) -> Engine:
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:" and not url.database.startswith("file:"):
            folder = Path(url.database).parent
            if folder == state_folder(Role.WORKER):
                make_state_folder(Role.WORKER, "--database")
            else:
                make_private_folder(folder, "choose another --database")
        connect_args["timeout"] = settings.busy_timeout_s
    elif url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = max(settings.connect_timeout_s, 2)
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _prepare_sqlite_connection)
    return engine


def _prepare_sqlite_connection(dbapi_connection: Any, _connection_record: Any) -> None:
    """WAL, so one worker reads while another writes the same file; and foreign keys, off by default in SQLite."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()
