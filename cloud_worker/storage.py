"""What the worker keeps of each utterance: audio, transcript, result and stage timings, in SQLite or PostgreSQL.

The worker acknowledges an MQTT message only after ``Store.save`` returns, so a
redelivered utterance finds its stored answer (``Store.answer_of``) instead of being
transcribed again; once the answer is published (``Store.mark_published``), a
redelivery is acknowledged without publishing it again. Idempotency is per device:
the key is (device_id, utterance_id), so no device can ever read the answer to
another device's utterance.

Utterances of devices whose owners consent (``Utterance.share_for_training``) are also
kept, with their answers, as training contributions (``Store.contributions``), for
``StorageSettings.training_retention_days``; no other utterance ever is. The tables, and the
queries on the contributions that the operator tools share, are in common/worker_database.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import case, literal, select, update
from sqlalchemy.orm import Session

from cloud_worker.settings import StorageSettings
from cloud_worker.transcript import Transcript
from common.worker_database import (
    DeviceRow,
    PublicationRow,
    ResultRow,
    SegmentRow,
    TimingRow,
    TrainingContributionRow,
    TranscriptRow,
    UtteranceRow,
    WorkerDatabase,
    WorkerTables,
)
from schemas.result import Result
from schemas.utterance import Utterance

PURGE_INTERVAL_S = 60.0
"""While saving, expired training contributions are deleted at most this often (seconds, monotonic clock)."""


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


class Store(WorkerDatabase):
    """The worker's database: saves handled utterances in batches and answers redeliveries from them.

    It also keeps the training contributions of consenting devices, and while saving deletes the expired ones
    at most once every PURGE_INTERVAL_S.
    """

    def __init__(self, settings: StorageSettings | None = None) -> None:
        super().__init__(settings or StorageSettings())
        self.settings: StorageSettings
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

    def purge_expired_contributions(self, now: float | None = None) -> int:
        """WorkerDatabase.purge_expired_contributions; ``save`` calls it at most every PURGE_INTERVAL_S."""
        deleted = super().purge_expired_contributions(now)
        self._next_purge_at = time.monotonic() + PURGE_INTERVAL_S
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
        rows: list[WorkerTables] = []
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
