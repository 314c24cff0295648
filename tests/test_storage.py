"""cloud_worker.storage on a SQLite file and on the real PostgreSQL, each test in its own schema there."""

from __future__ import annotations

import dataclasses
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from cloud_worker.settings import StorageSettings
from cloud_worker.storage import Store, StoredUtterance
from cloud_worker.transcript import Segment, Transcript
from common.database import StorageUnavailable
from common.recording import read_recording
from common.worker_database import (
    Contribution,
    DeviceRow,
    ResultRow,
    SegmentRow,
    TimingRow,
    TrainingContributionRow,
    UtteranceRow,
)
from schemas.errors import ErrorCode
from schemas.result import ErrorInfo, Result, Source
from schemas.utterance import Hypothesis, UploadReason, Utterance
from tests.conftest import OUT_OF_VOCABULARY_SAMPLE

SAMPLE_RATE = 16000

StoreFactory = Callable[..., Store]


@pytest.fixture
def open_store(database_url: str) -> Iterator[StoreFactory]:
    """Opens Stores on the test database, all closed after the test (before its schema is dropped)."""
    opened: list[Store] = []

    def open_(**settings) -> Store:
        store = Store(StorageSettings(url=database_url, **settings))
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def rows(database_url: str, entity) -> list:
    """Every row of a table, read through an engine of its own."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(entity)))
    finally:
        engine.dispose()


def tone(duration_s: float = 0.5) -> np.ndarray:
    times = np.arange(int(duration_s * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440.0 * times)).astype(np.float32)


def utterance(device_id: str = "kitchen", utterance_id: str | None = None, samples: np.ndarray | None = None):
    return Utterance.from_samples(
        device_id,
        tone() if samples is None else samples,
        SAMPLE_RATE,
        hypotheses=(Hypothesis("lights_on", {}, 0.41), Hypothesis("digit", {"value": 7}, 0.2)),
        model_version="1.0.0",
        reason=UploadReason.OUT_OF_VOCABULARY,
        utterance_id=utterance_id,
    )


TRANSCRIPT = Transcript(
    text="What's the weather tomorrow?",
    segments=(
        Segment(0.0, 1.2, " What's the weather", -0.21, 0.01),
        Segment(1.2, 2.05, " tomorrow?", -0.4375, 0.02),
    ),
    model="small.en/int8",
)


def answered(spoken: Utterance, transcript: Transcript = TRANSCRIPT, intent: str | None = "weather") -> StoredUtterance:
    """A successful record of ``spoken``."""
    result = Result(
        device_id=spoken.device_id,
        utterance_id=spoken.utterance_id,
        source=Source.CLOUD,
        transcript=transcript.text,
        intent=intent,
        slots={"day": "tomorrow", "count": 2},
        confidence=0.8137,
        timings_ms={"decode": 3.25, "asr": 412.0625, "total": 420.1},
    )
    return StoredUtterance(spoken, received_at=time.time(), transcript=transcript, result=result)


def failed(spoken: Utterance) -> StoredUtterance:
    """A record of ``spoken`` that failed before speech recognition."""
    error = ErrorInfo(ErrorCode.BAD_AUDIO, "the audio is not Opus")
    result = Result.failure(spoken.device_id, spoken.utterance_id, Source.CLOUD, error, {"decode": 0.5, "total": 0.7})
    return StoredUtterance(spoken, received_at=time.time(), transcript=None, result=result)


def test_saved_answer_is_returned_equal(open_store: StoreFactory) -> None:
    store = open_store()
    record = answered(utterance(samples=read_recording(OUT_OF_VOCABULARY_SAMPLE, SAMPLE_RATE)))
    store.save([record])
    answer = store.answer_of("kitchen", record.utterance.utterance_id)
    assert answer is not None and answer.result == record.result
    assert answer.result.to_dict() == record.result.to_dict()
    assert answer.published_at is None
    assert store.answer_of("kitchen", "not-stored") is None
    assert store.answer_of("hall", record.utterance.utterance_id) is None


def test_saving_again_stores_nothing_new(open_store: StoreFactory) -> None:
    store = open_store()
    record = answered(utterance())
    key = ("kitchen", record.utterance.utterance_id)
    assert store.save([record]) == {key}
    before = store.counts()
    redelivered = dataclasses.replace(record, result=dataclasses.replace(record.result, intent="other"))
    # Nothing stored, so the worker that saved it (another, say) answers it, and this one does not.
    assert store.save([redelivered]) == set()
    assert store.save([record, record]) == set()
    assert store.counts() == before
    assert store.answer_of("kitchen", record.utterance.utterance_id).result == record.result


def test_a_publication_is_recorded_once_and_for_that_device_only(open_store: StoreFactory) -> None:
    store = open_store()
    kitchen, hall = answered(utterance("kitchen", "same-id")), answered(utterance("hall", "same-id"))
    store.save([kitchen, hall])
    store.mark_published([("kitchen", "same-id"), ("kitchen", "not-stored")], 1000.0)
    store.mark_published([("kitchen", "same-id")], 2000.0)  # a second publication keeps the first time
    assert store.answer_of("kitchen", "same-id").published_at == 1000.0
    assert store.answer_of("hall", "same-id").published_at is None
    assert store.counts()["publications"] == 1


def test_one_utterance_id_from_two_devices_is_two_utterances(open_store: StoreFactory, database_url: str) -> None:
    store = open_store()
    kitchen = answered(utterance("kitchen", "same-id"), intent="weather")
    hall = answered(utterance("hall", "same-id"), intent="lights_on")
    store.save([kitchen, hall])
    assert store.counts()["utterances"] == 2
    assert store.counts()["devices"] == 2
    assert store.answer_of("kitchen", "same-id").result == kitchen.result
    assert store.answer_of("hall", "same-id").result == hall.result


def test_audio_is_kept_or_only_its_size(open_store: StoreFactory, database_url: str) -> None:
    kept, dropped = answered(utterance("kitchen")), answered(utterance("hall"))
    open_store().save([kept])
    open_store(keep_audio=False).save([dropped])
    by_device = {row.device_id: row for row in rows(database_url, UtteranceRow)}
    assert by_device["kitchen"].audio == kept.utterance.audio
    assert by_device["hall"].audio is None
    assert by_device["hall"].audio_bytes == len(dropped.utterance.audio) > 0
    assert by_device["hall"].hypotheses == dropped.utterance.meta()["hypotheses"]
    assert by_device["hall"].reason == "out_of_vocabulary"


def test_segments_timings_and_result_fields_are_rows(open_store: StoreFactory, database_url: str) -> None:
    store = open_store()
    record = answered(utterance())
    store.save([record])
    counts = store.counts()
    assert (counts["transcripts"], counts["segments"], counts["results"], counts["timings"]) == (1, 2, 1, 3)
    segments = sorted(rows(database_url, SegmentRow), key=lambda row: row.index)
    assert [(row.index, row.text, row.avg_logprob) for row in segments] == [
        (0, " What's the weather", -0.21),
        (1, " tomorrow?", -0.4375),
    ]
    assert {row.stage: row.milliseconds for row in rows(database_url, TimingRow)} == record.result.timings_ms
    (result,) = rows(database_url, ResultRow)
    assert (result.intent, result.slots, result.error_code) == ("weather", {"day": "tomorrow", "count": 2}, None)


def test_failure_without_transcript_is_stored(open_store: StoreFactory, database_url: str) -> None:
    store = open_store()
    record = failed(utterance())
    store.save([record])
    counts = store.counts()
    assert (counts["utterances"], counts["transcripts"], counts["segments"], counts["results"]) == (1, 0, 0, 1)
    assert store.answer_of("kitchen", record.utterance.utterance_id).result == record.result
    (result,) = rows(database_url, ResultRow)
    assert (result.error_code, result.error_message) == ("bad_audio", "the audio is not Opus")


def test_batch_with_one_stored_id_saves_the_others(open_store: StoreFactory, database_url: str) -> None:
    store = open_store()
    first = answered(utterance("kitchen"))
    store.save([first])
    others = [answered(utterance("kitchen")), failed(utterance("hall"))]
    store.save([others[0], first, others[1]])
    assert store.counts()["utterances"] == 3
    for record in [first, *others]:
        assert store.answer_of(record.utterance.device_id, record.utterance.utterance_id).result == record.result
    devices = {row.device_id: row for row in rows(database_url, DeviceRow)}
    assert {name: row.utterance_count for name, row in devices.items()} == {"kitchen": 2, "hall": 1}
    assert devices["kitchen"].first_seen_at == first.received_at
    assert devices["kitchen"].last_seen_at == others[0].received_at


def test_two_workers_saving_the_same_batch_at_once(open_store: StoreFactory) -> None:
    records = [answered(utterance(device)) for device in ("kitchen", "hall") for _ in range(10)]
    workers = [open_store(), open_store()]
    start = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def save(store: Store) -> None:
        start.wait()
        try:
            store.save(records)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=save, args=(store,)) for store in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    counts = workers[0].counts()
    assert (counts["devices"], counts["utterances"], counts["results"], counts["segments"]) == (2, 20, 20, 40)


def test_default_settings_make_a_sqlite_file_in_wal_mode(
    tmp_path, monkeypatch: pytest.MonkeyPatch, private_state_root
) -> None:
    monkeypatch.chdir(tmp_path)
    with Store() as store:
        store.save([answered(utterance())])
        assert store.counts()["utterances"] == 1
    # In the worker's state folder, made private, whatever the working directory.
    database = private_state_root / "worker" / "mqvox.sqlite3"
    assert database.is_file() and not (tmp_path / ".run").exists()
    assert stat.S_IMODE(database.parent.stat().st_mode) == 0o700
    engine = create_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        engine.dispose()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("dialect", ["sqlite", "sqlite-folder", "postgresql"])
def test_unreachable_database_is_one_clear_error(dialect: str, tmp_path) -> None:
    if dialect == "sqlite":
        url, named = f"sqlite:///{tmp_path}", str(tmp_path)  # A folder, which SQLite cannot open as a file.
    elif dialect == "sqlite-folder":
        (tmp_path / "file").write_bytes(b"")
        url = f"sqlite:///{tmp_path / 'file' / 'worker' / 'mqvox.sqlite3'}"  # Its folder cannot be made.
        named = str(tmp_path / "file")
    else:
        url, named = f"postgresql+psycopg://mqvox:secret@127.0.0.1:{_closed_port()}/test", "127.0.0.1"
    started = time.monotonic()
    with pytest.raises(StorageUnavailable) as caught:
        Store(StorageSettings(url=url, connect_timeout_s=2))
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert named in message and "unavailable" in message
    assert "secret" not in message
    assert isinstance(caught.value, ConnectionError)


def test_a_result_for_another_utterance_is_refused() -> None:
    record = answered(utterance("kitchen"))
    with pytest.raises(ValueError, match="hall"):
        dataclasses.replace(record, utterance=utterance("hall"))


def consenting(device_id: str = "kitchen", utterance_id: str | None = None) -> Utterance:
    """An utterance of a device whose owner consents to share it for training."""
    return dataclasses.replace(utterance(device_id, utterance_id), share_for_training=True)


def test_a_consenting_utterance_is_kept_with_its_label_as_a_contribution(open_store: StoreFactory) -> None:
    store = open_store(keep_audio=False)  # the contribution keeps its own audio
    record = answered(consenting())
    store.save([record])
    (kept,) = store.contributions()
    spoken, result = record.utterance, record.result
    assert kept == Contribution(
        device_id="kitchen",
        utterance_id=spoken.utterance_id,
        received_at=record.received_at,
        captured_at=spoken.captured_at,
        model_version="1.0.0",
        sample_rate=SAMPLE_RATE,
        duration_s=spoken.duration_s,
        audio=spoken.audio,
        intent="weather",
        slots={"day": "tomorrow", "count": 2},
        confidence=result.confidence,
        transcript=TRANSCRIPT.text,
    )
    assert store.contribution_counts() == {"kitchen": 1}
    (summary,) = store.contribution_summaries()
    assert (summary.count, summary.oldest_received_at, summary.newest_received_at) == (1, *[record.received_at] * 2)


def test_without_consent_or_without_a_label_nothing_is_kept_for_training(open_store: StoreFactory) -> None:
    store = open_store()
    store.save([answered(utterance("kitchen")), failed(consenting("hall"))])
    assert store.counts()["utterances"] == 2
    assert store.counts()["training_contributions"] == 0
    assert store.contributions() == [] and store.contribution_counts() == {}


def test_a_redelivered_contribution_is_kept_once(open_store: StoreFactory) -> None:
    store = open_store()
    record = answered(consenting())
    store.save([record])
    store.save([record, dataclasses.replace(record, received_at=record.received_at + 5)])
    assert [kept.received_at for kept in store.contributions()] == [record.received_at]


def test_contributions_are_ordered_and_chosen_by_device(open_store: StoreFactory) -> None:
    store = open_store()
    early, late = time.time() - 60, time.time()
    records = [
        dataclasses.replace(answered(consenting(device, name)), received_at=at)
        for device, name, at in [
            ("kitchen", "kitchen-late", late),
            ("hall", "hall-early", early),
            ("kitchen", "kitchen-early", early),
        ]
    ]
    store.save(records)
    assert [(kept.received_at, kept.device_id, kept.utterance_id) for kept in store.contributions()] == [
        (early, "hall", "hall-early"),
        (early, "kitchen", "kitchen-early"),
        (late, "kitchen", "kitchen-late"),
    ]
    assert [kept.utterance_id for kept in store.contributions(["kitchen"])] == ["kitchen-early", "kitchen-late"]
    assert store.contributions([]) == []
    assert store.contribution_counts() == {"hall": 1, "kitchen": 2}
    hall, kitchen = store.contribution_summaries()
    assert (kitchen.device_id, kitchen.count, kitchen.oldest_received_at, kitchen.newest_received_at) == (
        "kitchen",
        2,
        early,
        late,
    )
    assert (hall.device_id, hall.count) == ("hall", 1)


def test_expired_contributions_are_deleted_audio_and_all(open_store: StoreFactory, database_url: str) -> None:
    store = open_store(training_retention_days=30)
    now = time.time()
    old, recent = answered(consenting("kitchen")), answered(consenting("kitchen"))
    old = dataclasses.replace(old, received_at=now - 31 * 86400)
    recent = dataclasses.replace(recent, received_at=now - 29 * 86400)
    store.save([old, recent])  # the first save purges already: the old one is gone at once
    assert [kept.utterance_id for kept in store.contributions()] == [recent.utterance.utterance_id]
    assert len(rows(database_url, TrainingContributionRow)) == 1
    # The utterances themselves, and their answers, are the worker's own records: the purge leaves them.
    assert store.counts()["utterances"] == 2
    # Later, when the recent one is 31 days old too:
    assert store.purge_expired_contributions(now=now + 2 * 86400) == 1
    assert store.contributions() == [] and rows(database_url, TrainingContributionRow) == []


def test_saving_purges_at_most_once_a_minute(open_store: StoreFactory) -> None:
    store = open_store(training_retention_days=1)
    store.save([answered(utterance())])  # the first save purges, and the next purge is a minute away
    expired = dataclasses.replace(answered(consenting()), received_at=time.time() - 2 * 86400)
    store.save([expired])
    assert store.contribution_counts() == {"kitchen": 1}  # not yet: the last purge was under a minute ago
    assert store.purge_expired_contributions() == 1


def test_a_retention_of_zero_keeps_no_contribution(open_store: StoreFactory) -> None:
    open_store().save([answered(consenting("hall"))])  # kept by a worker with the default retention
    store = open_store(training_retention_days=0)
    store.save([answered(consenting("kitchen"))])
    assert store.contributions() == []
    assert store.counts()["utterances"] == 2


def test_deleting_a_devices_contributions_leaves_the_others(open_store: StoreFactory) -> None:
    store = open_store()
    store.save([answered(consenting("kitchen")), answered(consenting("kitchen")), answered(consenting("hall"))])
    assert store.delete_contributions("kitchen") == 2
    assert store.delete_contributions("kitchen") == 0
    assert store.contribution_counts() == {"hall": 1}
    assert store.counts()["utterances"] == 3


@pytest.mark.parametrize("days", [-1.0, float("nan"), float("inf")])
def test_a_retention_that_is_not_a_number_of_days_is_refused(days: float) -> None:
    with pytest.raises(ValueError, match="training_retention_days"):
        StorageSettings(training_retention_days=days)


def test_a_database_of_an_earlier_version_gains_the_contributions_table(
    open_store: StoreFactory, database_url: str
) -> None:
    open_store().close()
    engine = create_engine(database_url)
    try:
        TrainingContributionRow.__table__.drop(engine)  # as a database made before contributions existed
    finally:
        engine.dispose()
    store = open_store()
    store.save([answered(consenting())])
    assert store.contribution_counts() == {"kitchen": 1}
