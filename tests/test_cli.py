"""The entry points, run as a user runs them: python -m device, cloud_worker, firmware_tools."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from cloud_worker.storage import StorageSettings, Store, StoredUtterance
from schemas.protocol import decode
from schemas.result import Result, Source
from schemas.status import DeviceState
from schemas.topics import STATUS

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, Inbox, make_utterance

pytestmark = pytest.mark.subprocess


def python_m(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("package", "subcommands"),
    [
        ("device", ["send", "detect", "run"]),
        ("cloud_worker", ["serve", "retire", "transcribe", "wyoming", "ha-bridge"]),
        (
            "firmware_tools",
            [
                "vocab",
                "keygen",
                "publish",
                "rollout",
                "status",
                "contributions",
                "learn",
                "provision",
                "bundle",
                "flash",
            ],
        ),
        ("broker_config", ["start"]),
    ],
)
@pytest.mark.slow
def test_entry_points_have_help(package: str, subcommands: list[str]) -> None:
    shown = python_m(package, "--help")
    assert shown.returncode == 0
    for subcommand in subcommands:
        assert subcommand in shown.stdout
        assert python_m(package, subcommand, "--help").returncode == 0
    assert python_m(package).returncode == 2  # a subcommand is required


HEAVY_PACKAGES = {"numpy", "scipy", "tensorflow", "sqlalchemy", "paho"}
"""What listing firmware_tools' subcommands once loaded (scipy alone took about a second): help needs none of it."""


@pytest.mark.parametrize(
    "command",
    [(), ("vocab",), ("train-all",), ("evaluate",), ("keygen",), ("contributions",), ("bundle",), ("flash",)],
)
def test_firmware_tools_help_imports_nothing_heavy(command: tuple[str, ...]) -> None:
    shown = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "firmware_tools", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    # -X importtime writes "import time: self | cumulative | module" to stderr for each module imported.
    imported = {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in shown.stderr.splitlines() if line.startswith("import ")
    }
    assert "firmware_tools" in imported
    assert imported.isdisjoint(HEAVY_PACKAGES), sorted(imported & HEAVY_PACKAGES)


@pytest.mark.slow
def test_firmware_tools_vocab_lists_labels_and_phrases() -> None:
    listed = python_m("firmware_tools", "vocab", "--json")
    assert listed.returncode == 0
    vocabulary = json.loads(listed.stdout)
    assert vocabulary["wake_phrase"] == "hey jarvis"
    assert {"label": "digit[value=0]", "intent": "digit", "slots": {"value": 0}, "phrases": ["zero", "oh"]} in (
        vocabulary["commands"]
    )


@pytest.mark.slow
def test_firmware_tools_vocab_refuses_a_broken_file(tmp_path) -> None:
    broken = tmp_path / "v.toml"
    broken.write_text("version = 2\n")
    refused = python_m("firmware_tools", "vocab", "--vocabulary", str(broken))
    assert refused.returncode == 2 and "invalid vocabulary" in refused.stderr


@pytest.mark.slow
def test_device_send_round_trips_through_a_running_worker(broker, links, device_id: str, tmp_path) -> None:
    statuses = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), statuses)
    database = f"sqlite:///{tmp_path / 'worker.sqlite3'}"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud_worker",
            "serve",
            "--port",
            str(broker.port),
            "--group",
            f"cli-{device_id}",
            "--database",
            database,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert '"event": "ready"' in worker.stderr.readline() + worker.stderr.readline()
        sent = python_m(
            "device", "send", str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE),
            "--device-id", device_id, "--port", str(broker.port), "--timeout", "20",
        )  # fmt: skip
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 0
    lines = [json.loads(line) for line in sent.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE)]
    for line in lines:
        assert line["result"]["utterance_id"] == line["utterance_id"]
        assert line["result"]["source"] == "cloud" and line["result"]["error"] is None
    assert [line["result"]["intent"] for line in lines] == ["lights_on", None]
    assert "weather be like tomorrow" in lines[1]["result"]["transcript"].lower()
    assert sent.returncode == 0
    assert decode(*statuses.get()).state == DeviceState.ONLINE
    offline = decode(*statuses.get())
    assert offline.state == DeviceState.OFFLINE and offline.counters == {"cloud_requests": 2, "cloud_results": 2}


@pytest.mark.slow
def test_device_send_without_a_worker_times_out_clearly(broker, device_id: str) -> None:
    sent = python_m(
        "device", "send", str(IN_VOCABULARY_SAMPLE), "--device-id", device_id,
        "--port", str(broker.port), "--timeout", "1",
    )  # fmt: skip
    assert sent.returncode == 1
    assert "no answer from the cloud within 1.0 s" in json.loads(sent.stdout)["error"]


@pytest.mark.parametrize("device_id", ["pi/1", "pi+1", "pi#", "pï"])
def test_device_send_refuses_unsafe_device_ids(broker, device_id: str) -> None:
    sent = python_m("device", "send", str(IN_VOCABULARY_SAMPLE), "--device-id", device_id, "--port", str(broker.port))
    assert sent.returncode == 2 and "not a valid device id" in sent.stderr


def test_device_send_reports_unreadable_files_and_carries_on(broker, tmp_path, device_id: str) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio")
    sent = python_m("device", "send", str(junk), "--device-id", device_id, "--port", str(broker.port), "--timeout", "1")
    assert sent.returncode == 1 and "cannot read audio file" in json.loads(sent.stdout)["error"]


@pytest.mark.slow
def test_clients_report_an_absent_broker() -> None:
    from broker_config.broker import free_port

    sent = python_m("device", "send", str(IN_VOCABULARY_SAMPLE), "--device-id", "pi-1", "--port", str(free_port()))
    assert sent.returncode == 2 and "cannot reach MQTT broker" in sent.stderr
    served = python_m("cloud_worker", "serve", "--port", str(free_port()))
    assert served.returncode == 2 and "cannot reach MQTT broker" in served.stderr


@pytest.mark.slow
def test_transcribe_prints_one_json_line_per_file(tmp_path) -> None:
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really")
    done = python_m(
        "cloud_worker", "transcribe", str(IN_VOCABULARY_SAMPLE), str(broken), str(OUT_OF_VOCABULARY_SAMPLE), "--json"
    )
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    by_file = {line["file"]: line for line in lines}
    assert len(lines) == 3 and done.returncode == 1  # one file could not be read
    command = by_file[str(IN_VOCABULARY_SAMPLE)]
    assert set(command) == {"file", "transcript", "intent", "slots", "confidence"}
    assert (command["intent"], command["slots"]) == ("lights_on", {}) and 0 < command["confidence"] <= 1
    question = by_file[str(OUT_OF_VOCABULARY_SAMPLE)]
    assert question["intent"] is None and "weather be like tomorrow" in question["transcript"].lower()
    assert "cannot read audio file" in by_file[str(broken)]["error"]


def test_transcribe_refuses_a_missing_model_directory(tmp_path) -> None:
    done = python_m("cloud_worker", "transcribe", str(IN_VOCABULARY_SAMPLE), "--model-dir", str(tmp_path))
    assert done.returncode == 2 and "not a CTranslate2 Whisper model directory" in done.stderr


@pytest.mark.slow
def test_firmware_tools_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path) -> None:
    done = python_m("firmware_tools", "keygen", "--out-dir", str(tmp_path / "keys"))
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout)
    assert len(line["key_id"]) == 16
    assert (tmp_path / "keys" / "signing.key").stat().st_mode & 0o777 == 0o600
    private = (tmp_path / "keys" / "signing.key").read_bytes()
    again = python_m("firmware_tools", "keygen", "--out-dir", str(tmp_path / "keys"))
    assert again.returncode == 2 and "refusing to overwrite a key" in again.stderr
    assert (tmp_path / "keys" / "signing.key").read_bytes() == private


@pytest.mark.slow
def test_firmware_tools_publish_refuses_a_bad_key_and_an_absent_broker(broker, tmp_path) -> None:
    (tmp_path / "bad.key").write_text("not a key")
    bad_key = python_m(
        "firmware_tools", "publish", "--model", "device/models/default", "--key", str(tmp_path / "bad.key"),
        "--port", str(broker.port), "--database", f"sqlite:///{tmp_path}/registry.sqlite3",
    )  # fmt: skip
    assert bad_key.returncode == 2 and "cannot read the signing key" in bad_key.stderr
    python_m("firmware_tools", "keygen", "--out-dir", str(tmp_path))
    no_broker = python_m(
        "firmware_tools", "status", "--port", "1", "--database", f"sqlite:///{tmp_path}/registry.sqlite3"
    )
    assert no_broker.returncode == 2 and "cannot reach MQTT broker" in no_broker.stderr


def _shared(store: Store, *device_ids: str) -> list[StoredUtterance]:
    """Save one answered utterance of each device, shared for training; the records saved."""
    records = []
    for device_id in device_ids:
        utterance = make_utterance(device_id, share_for_training=True)
        answer = Result(
            device_id=device_id,
            utterance_id=utterance.utterance_id,
            source=Source.CLOUD,
            transcript="Turn on the lights.",
            intent="lights_on",
            slots={},
            confidence=0.97,
            timings_ms={"total": 10.0},
        )
        records.append(StoredUtterance(utterance, time.time(), None, answer))
    store.save(records)
    return records


@pytest.mark.slow
def test_firmware_tools_contributions_lists_each_device_and_deletes_one(tmp_path) -> None:
    # No --database: the worker's default database, in the state folder both use (tests/test_locations.py).
    with Store(StorageSettings()) as store:
        kitchen, _, hall = _shared(store, "pi-kitchen", "pi-kitchen", "pi-hall")

    def contributions(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "firmware_tools", "contributions", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    listed = contributions()
    assert listed.returncode == 0, listed.stderr
    devices = {line["device_id"]: line for line in map(json.loads, listed.stdout.splitlines())}
    assert {device: line["count"] for device, line in devices.items()} == {"pi-hall": 1, "pi-kitchen": 2}
    assert devices["pi-hall"]["oldest_received_at"] == devices["pi-hall"]["newest_received_at"] == hall.received_at
    one = contributions("--device", "pi-kitchen")
    summary, *lines = map(json.loads, one.stdout.splitlines())
    assert (summary["device_id"], summary["count"]) == ("pi-kitchen", 2)
    assert lines[0] == {
        "utterance_id": kitchen.utterance.utterance_id,
        "received_at": kitchen.received_at,
        "model_version": "1.1.0",
        "intent": "lights_on",
        "slots": {},
        "confidence": 0.97,
        "transcript": "Turn on the lights.",
        "audio_bytes": len(kitchen.utterance.audio),  # its size, never the audio
    }
    assert len(lines) == 2
    deleted = contributions("--device", "pi-kitchen", "--delete")
    assert deleted.returncode == 0 and json.loads(deleted.stdout) == {"device_id": "pi-kitchen", "deleted": 2}
    left = [json.loads(line) for line in contributions().stdout.splitlines()]
    assert [(line["device_id"], line["count"]) for line in left] == [("pi-hall", 1)]


@pytest.mark.slow
def test_firmware_tools_contributions_refuses_to_delete_everyones_and_reports_a_bad_database(tmp_path) -> None:
    database = f"sqlite:///{tmp_path / 'worker.sqlite3'}"
    with Store(StorageSettings(url=database)) as store:
        _shared(store, "pi-kitchen")
    everyone = python_m("firmware_tools", "contributions", "--delete", "--database", database)
    assert everyone.returncode == 2 and "--delete needs --device" in everyone.stderr
    assert "Traceback" not in everyone.stderr and everyone.stdout == ""
    with Store(StorageSettings(url=database)) as store:
        assert store.contribution_counts() == {"pi-kitchen": 1}
    unreachable = python_m("firmware_tools", "contributions", "--database", f"sqlite:///{tmp_path}")
    assert unreachable.returncode == 2 and "is unavailable" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


@pytest.mark.slow
def test_firmware_tools_learn_says_what_is_missing_with_exit_2(tmp_path) -> None:
    database = f"sqlite:///{tmp_path / 'worker.sqlite3'}"
    unsigned = python_m("firmware_tools", "learn", "--auto-rollout", "--database", database)
    assert unsigned.returncode == 2 and "--auto-rollout publishes and rolls out" in unsigned.stderr
    no_fsdd = python_m("firmware_tools", "learn", "--database", database, "--state-dir", str(tmp_path / "learn"))
    assert no_fsdd.returncode == 2 and "give --fsdd DIR" in no_fsdd.stderr
    nothing = python_m(
        "firmware_tools", "learn", "--database", database, "--state-dir", str(tmp_path / "learn"), "--fsdd",
        str(tmp_path), timeout=120,
    )  # fmt: skip
    assert nothing.returncode == 2 and "no fleet utterances to learn from" in nothing.stderr
    no_rounds = python_m("firmware_tools", "learn", "--report", "--database", database, "--out", str(tmp_path))
    assert no_rounds.returncode == 2 and "no learning round is recorded" in no_rounds.stderr
    for done in (unsigned, no_fsdd, nothing, no_rounds):
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("package", ["device", "cloud_worker"])
def test_an_unknown_log_level_is_named_with_exit_2(package: str) -> None:
    done = python_m(package, "--log-level", "foo", "--help")
    assert done.returncode == 2
    assert "unknown log level 'foo': one of debug, info, warning, error, critical" in done.stderr
    assert "Traceback" not in done.stderr
    assert python_m(package, "--log-level", "Debug", "--help").returncode == 0


@pytest.mark.parametrize(
    ("url", "reason"),
    [("foo://bar", "database foo://bar: unknown kind of database"), ("not a url", "'not a url' is not a database URL")],
)
def test_a_database_url_that_is_no_database_is_named_with_exit_2(url: str, reason: str) -> None:
    for command in (("cloud_worker", "serve", "--port", "1"), ("firmware_tools", "status", "--port", "1")):
        done = python_m(*command, "--database", url)
        assert done.returncode == 2, done.stderr
        assert reason in done.stderr and "use sqlite:///PATH or postgresql+psycopg://" in done.stderr
        assert "Traceback" not in done.stderr and "NoSuchModuleError" not in done.stderr


def test_transcribe_says_which_file_is_missing_or_empty(tmp_path) -> None:
    (tmp_path / "empty.wav").write_bytes(b"")
    for name, reason in (("missing.wav", "no such audio file"), ("empty.wav", "is empty (0 bytes)")):
        done = python_m("cloud_worker", "transcribe", str(tmp_path / name), timeout=120)
        assert done.returncode == 2, done.stderr
        assert reason in done.stdout + done.stderr
        assert "System error" not in done.stdout + done.stderr and "Format not recognised" not in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_firmware_tools_output_to_a_reader_that_went_away_ends_quietly() -> None:
    # `python -m firmware_tools vocab | head -1`: the reader closes the pipe before the output is flushed.
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "firmware_tools", "vocab"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader_gone.stdout.close()
    stderr = reader_gone.stderr.read().decode()
    assert reader_gone.wait(60) == 0
    assert "Broken pipe" not in stderr and "BrokenPipeError" not in stderr and stderr == ""


@pytest.mark.slow
def test_a_stage_that_is_a_bare_number_is_refused_before_anything_is_published(tmp_path) -> None:
    done = python_m(
        "firmware_tools", "rollout", "--version", "1.2.0", "--stage", "fleet:150", "--key", str(tmp_path / "k"),
        "--database", f"sqlite:///{tmp_path / 'r.sqlite3'}", "--port", "1",
    )  # fmt: skip
    assert done.returncode == 2
    assert "'150' is a bare number; write 150% for a share of the fleet, or name devices" in done.stderr
    assert "Traceback" not in done.stderr
    help_text = python_m("firmware_tools", "rollout", "--help").stdout
    for default in ("(default: 20.0)", "(default: 3)", "(default: 600.0)", "(default: 0)"):
        assert default in help_text


def test_device_run_refuses_a_missing_signing_key_before_connecting(tmp_path) -> None:
    config = tmp_path / "device.toml"
    config.write_text('[audio]\nsource = "stdin"\n[broker]\nport = 1\n[ota]\npublic_key = "missing.pub"\n')
    done = python_m("device", "run", "--config", str(config))
    assert done.returncode == 2 and "cannot read the public key" in done.stderr
