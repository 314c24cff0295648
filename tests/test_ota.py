"""Model updates on a device, against a real Mosquitto: signed manifests, stages, checks, self-test, replays.

Each test has a channel of its own, so retained manifests never leak between tests.
Devices are the real runtime (device/simulated.py) with their own state folder.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from pathlib import Path

import pytest

from cloud_worker.storage import StorageSettings
from common.logfmt import JsonLineFormatter
from device.installed_models import InstalledModels
from device.local_model import load_local_model, shipped_model_directory
from device.simulated import SimulatedDevice
from firmware_tools.release.drill import copy_package
from firmware_tools.release.publish import EVERYONE, Publisher
from firmware_tools.release.registry import ModelRegistry
from schemas.envelope import Envelope
from schemas.model import ModelBlob, ModelPackage, RolloutStage, fleet_bucket
from schemas.protocol import decode
from schemas.signing import load_private_key, sign_manifest
from schemas.status import OtaState
from schemas.topics import MODEL_BLOB, STATUS
from tests.conftest import FACTORY_VERSION, Inbox, ota_device_settings, wait_until

_channels = itertools.count()


@pytest.fixture
def channel() -> str:
    return f"ch-{os.getpid()}-{next(_channels)}"


@pytest.fixture
def operator(broker_settings, links, keys, channel, tmp_path):
    """A publisher for this test's channel, with a registry of its own."""
    registry = ModelRegistry(StorageSettings(url=f"sqlite:///{tmp_path}/registry.sqlite3"))
    yield Publisher(links(), registry, channel, load_private_key(keys["fleet.key"]))
    registry.close()


@pytest.fixture
def fleet(broker_settings, keys, channel, tmp_path):
    """Starts simulated devices on this test's channel; stops them all after the test."""
    started: list[SimulatedDevice] = []

    def start(device_id: str, **ota) -> SimulatedDevice:
        settings = ota_device_settings(
            broker_settings, device_id, channel, tmp_path / device_id, keys["fleet.pub"], **ota
        )
        device = SimulatedDevice(settings, interval_s=0.05).start()
        started.append(device)
        assert wait_until(lambda: device.runtime._updater.following.is_set(), 10), device.failure
        return device

    yield start
    for device in started:
        device.stop()
        assert device.failure is None, device.failure


def watch_status(links, device_id: str) -> Inbox:
    inbox = Inbox()
    links().subscribe(STATUS.topic(device_id=device_id), inbox)
    return inbox


def update_steps(inbox: Inbox, until: set[OtaState], timeout_s: float = 20.0) -> list[tuple[str, str, str | None]]:
    """(state, version, reason) of each new update step the device publishes, up to one in ``until``."""
    steps: list[tuple[str, str, str | None]] = []
    while True:
        topic, envelope = inbox.get(timeout_s)
        status = decode(topic, envelope)
        if status is None or status.ota is None:
            continue
        step = (str(status.ota.state), status.ota.version, status.ota.reason)
        if not steps or steps[-1] != step:
            steps.append(step)
        if status.ota.state in until:
            return steps


FINAL = {OtaState.APPLIED, OtaState.REJECTED, OtaState.ROLLED_BACK}


def test_a_device_started_after_the_publication_gets_the_retained_manifest_and_updates(
    operator, fleet, links, packages
):
    operator.publish_manifest(operator.register(packages["1.2.0"]), EVERYONE)
    inbox = watch_status(links, "late-1")
    device = fleet("late-1")
    assert [step[:2] for step in update_steps(inbox, FINAL)] == [
        ("downloading", "1.2.0"),
        ("verified", "1.2.0"),
        ("applied", "1.2.0"),
    ]
    assert wait_until(lambda: device.runtime.model.version == "1.2.0", 5)  # the listening pipeline switched
    assert device.runtime.presence.model_version == "1.2.0"
    installed = InstalledModels(device.settings.ota.state_dir, shipped_model_directory(), FACTORY_VERSION)
    assert installed.active.version == "1.2.0" and installed.previous.version == FACTORY_VERSION
    assert load_local_model(installed.active.directory).version == "1.2.0"


def test_devices_outside_the_stage_do_not_update(operator, fleet, links, packages):
    inside, outside = watch_status(links, "stage-in"), watch_status(links, "stage-out")
    devices = {name: fleet(name) for name in ("stage-in", "stage-out")}
    operator.publish_manifest(operator.register(packages["1.2.0"]), RolloutStage("canary", ("stage-in",), 0.0))
    assert update_steps(inside, FINAL)[-1][:2] == ("applied", "1.2.0")
    assert wait_until(lambda: devices["stage-out"].runtime.presence.counters["ota_not_in_stage"] == 1, 5)
    assert devices["stage-out"].runtime.model.version == FACTORY_VERSION
    assert devices["stage-out"].runtime.presence.ota is None
    while True:  # nothing but its plain online status
        try:
            topic, envelope = outside.get(0.5)
        except Exception:
            break
        assert decode(topic, envelope).ota is None


def test_percentage_stages_pick_the_same_devices_on_both_sides_and_grow_monotonically():
    devices = [f"pi-{number:03d}" for number in range(400)]
    chosen = {percent: {d for d in devices if RolloutStage("s", (), percent).includes(d)} for percent in (10, 50, 100)}
    assert chosen[10] <= chosen[50] <= chosen[100] == set(devices)
    assert 20 <= len(chosen[10]) <= 60 and 160 <= len(chosen[50]) <= 240
    assert all(fleet_bucket(device) == fleet_bucket(device) for device in devices)
    assert not RolloutStage("none", (), 0.0).includes("pi-001")


def test_a_tampered_blob_is_rejected_and_the_old_model_keeps_running(operator, fleet, links, packages, channel):
    version = operator.register(packages["1.2.0"])
    operator.publish_blob(version)
    tampered = bytearray(version.model)
    tampered[len(tampered) // 2] ^= 0xFF  # one flipped byte; the blob's own metadata is made to match it
    forged = ModelBlob(channel, "1.2.0", bytes(tampered))
    operator.link.publish(forged.topic(), forged.to_wire(), qos=MODEL_BLOB.qos, retain=True)
    inbox = watch_status(links, "tamper-1")
    device = fleet("tamper-1")
    operator.publish_manifest(version, EVERYONE)
    steps = update_steps(inbox, FINAL)
    assert steps[-1][:2] == ("rejected", "1.2.0")
    assert "does not match the signed manifest" in steps[-1][2]
    assert device.runtime.model.version == FACTORY_VERSION
    assert not (Path(device.settings.ota.state_dir) / "models" / "1.2.0").exists()


def test_a_manifest_signed_with_another_key_is_rejected(operator, fleet, links, packages, keys):
    inbox = watch_status(links, "wrong-key-1")
    device = fleet("wrong-key-1")
    stranger = Publisher(operator.link, operator.registry, operator.channel, load_private_key(keys["other.key"]))
    stranger.publish_manifest(stranger.register(packages["1.2.0"]), EVERYONE)
    steps = update_steps(inbox, FINAL)
    assert steps == [("rejected", "1.2.0", steps[0][2])]
    assert steps[0][2].startswith("signature: signed by key") and "trusts only key" in steps[0][2]
    assert device.runtime.model.version == FACTORY_VERSION


def test_a_manifest_changed_after_signing_is_rejected(operator, fleet, links, packages):
    inbox = watch_status(links, "altered-1")
    device = fleet("altered-1")
    version = operator.register(packages["1.2.0"])
    operator.publish_blob(version)
    signed = operator.publish_manifest(version, RolloutStage("nobody", (), 0.0))
    widened = dataclasses.replace(signed, stage=EVERYONE, created_at=signed.created_at + 1)
    operator.link.send(widened)
    steps = update_steps(inbox, FINAL)
    assert steps[-1][:2] == ("rejected", "1.2.0") and "signature does not match" in steps[-1][2]
    assert device.runtime.model.version == FACTORY_VERSION


def test_a_model_for_another_front_end_is_rejected_before_download(operator, fleet, links, packages, tmp_path):
    other = copy_package(packages["1.2.0"], tmp_path / "8khz", "1.2.0")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["frontend"]["sample_rate"] = 8000
    (other / "manifest.json").write_text(json.dumps(manifest))
    inbox = watch_status(links, "frontend-1")
    device = fleet("frontend-1")
    operator.publish_manifest(operator.register(other), EVERYONE)
    steps = update_steps(inbox, FINAL)
    assert steps == [("rejected", "1.2.0", steps[0][2])]  # no download was started
    assert steps[0][2].startswith("front end:") and "8000" in steps[0][2]
    assert device.runtime.model.version == FACTORY_VERSION


@pytest.mark.slow
def test_a_model_that_fails_its_self_test_is_rolled_back_and_never_tried_again(
    operator, fleet, links, packages, caplog
):
    caplog.set_level(logging.INFO, logger="device.ota")
    inbox = watch_status(links, "selftest-1")
    device = fleet("selftest-1")
    broken = operator.register(packages["broken-1.2.0"])
    operator.publish_manifest(broken, EVERYONE)
    steps = update_steps(inbox, FINAL)
    assert [step[:2] for step in steps] == [
        ("downloading", "1.2.0"),
        ("verified", "1.2.0"),
        ("rolled_back", "1.2.0"),
    ]
    reason = steps[-1][2]
    assert reason.startswith("self-test failed on 3 of 5 clips") and reason.endswith(f"{FACTORY_VERSION} kept")
    # A refused update is a warning, seen at the device's default log level, not an info line.
    (failed,) = [record for record in caplog.records if record.getMessage().startswith("self-test failed")]
    assert failed.levelno == logging.WARNING
    # Its line names the device and the version refused, which the message does not.
    logged = json.loads(JsonLineFormatter("device").format(failed))
    assert (logged["device_id"], logged["version"]) == ("selftest-1", "1.2.0")
    assert device.runtime.model.version == FACTORY_VERSION
    installed = InstalledModels(device.settings.ota.state_dir, shipped_model_directory(), FACTORY_VERSION)
    assert installed.active == installed.factory and installed.journal.trial is None
    # The next stage offers the same model again: the device does not try it again.
    operator.publish_manifest(broken, RolloutStage("later", ("selftest-1",), 100.0))
    inbox.expect_nothing(1.0)
    assert device.runtime.presence.counters["ota_applied"] == 0


@pytest.mark.slow
def test_replays_are_ignored_and_only_a_rollback_manifest_downgrades(operator, fleet, links, packages):
    inbox = watch_status(links, "replay-1")
    device = fleet("replay-1")
    old = operator.publish_manifest(operator.register(packages["1.2.0"]), EVERYONE)
    assert update_steps(inbox, FINAL)[-1][:2] == ("applied", "1.2.0")
    operator.publish_manifest(operator.register(packages["1.3.0"]), EVERYONE)
    assert update_steps(inbox, FINAL)[-1][:2] == ("applied", "1.3.0")
    counters = device.runtime.presence.counters
    # The captured 1.2.0 manifest, replayed as it was signed: older than the last one accepted.
    operator.link.send(old)
    assert wait_until(lambda: counters["ota_replays_ignored"] == 1, 5)
    # A freshly signed manifest of the older version, without the rollback flag: still no downgrade.
    operator.publish_manifest(operator.registry.version(operator.channel, "1.2.0"), EVERYONE)
    assert wait_until(lambda: counters["ota_replays_ignored"] == 2, 5)
    assert device.runtime.presence.model_version == "1.3.0"
    # An explicit rollback takes it back, from the model it kept.
    operator.publish_manifest(operator.registry.version(operator.channel, "1.2.0"), EVERYONE, rollback=True)
    steps = update_steps(inbox, FINAL)
    assert steps[-1] == ("rolled_back", "1.2.0", "rollback from 1.3.0 by the operator")
    assert wait_until(lambda: device.runtime.model.version == "1.2.0", 5)


def test_an_update_interrupted_during_its_trial_goes_back_at_start_and_is_given_up_after_max_attempts(tmp_path):
    shipped = shipped_model_directory()
    package = ModelPackage.load(shipped)
    candidate = dataclasses.replace(package, version="1.2.0")
    model = package.model_path(shipped).read_bytes()
    for attempt in (1, 2):
        installed = InstalledModels(tmp_path, shipped, FACTORY_VERSION)
        placed = installed.install(candidate, model)
        installed.begin_trial(placed, candidate.sha256, rollback=False)
        # The process dies here; the next start finds the trial open.
        restarted = InstalledModels(tmp_path, shipped, FACTORY_VERSION)
        assert restarted.active.version == "1.2.0" and restarted.journal.trial.attempts == attempt
        pending = restarted.recover(max_attempts=2)
        assert restarted.active == restarted.factory
        assert pending["state"] == "rolled_back" and pending["version"] == "1.2.0"
        assert f"({attempt} time(s))" in pending["reason"]
    assert restarted.refused_reason("1.2.0", candidate.sha256).endswith("not tried again")


def test_half_written_model_folders_are_removed_at_start(tmp_path):
    shipped = shipped_model_directory()
    installed = InstalledModels(tmp_path, shipped, FACTORY_VERSION)
    (tmp_path / "models" / "1.2.0.partial").mkdir()
    (tmp_path / "models" / "1.2.0.partial" / "model.tflite").write_bytes(b"half")
    installed.recover(max_attempts=2)
    assert not (tmp_path / "models" / "1.2.0.partial").exists()
    assert installed.active == installed.factory


def test_garbage_on_the_manifest_topic_is_counted_and_ignored(operator, fleet, links):
    device = fleet("garbage-1")
    topic = f"mqvox/v1/models/{operator.channel}/manifest"
    counters = device.runtime.presence.counters
    # One at a time: the updater skips a manifest that a newer one has replaced before it got to it.
    operator.link.publish(topic, Envelope(b"{not json", "application/json"), qos=1, retain=True)
    assert wait_until(lambda: counters["ota_invalid_manifests"] == 1, 5)
    operator.link.publish(topic, Envelope(b'{"version": "9.9.9"}', "application/json"), qos=1, retain=True)
    assert wait_until(lambda: counters["ota_invalid_manifests"] == 2, 5)
    assert device.runtime.model.version == FACTORY_VERSION and device.runtime.presence.ota is None


def test_a_model_for_newer_device_software_is_rejected(operator, fleet, links, packages):
    inbox = watch_status(links, "too-new-1")
    fleet("too-new-1")
    version = operator.register(packages["1.2.0"], min_device_version="99.0.0")
    operator.publish_manifest(version, EVERYONE)
    steps = update_steps(inbox, FINAL)
    assert steps == [("rejected", "1.2.0", steps[0][2])]
    assert steps[0][2].startswith("needs device software 99.0.0 or newer")


@pytest.mark.slow
def test_a_manifest_whose_blob_never_comes_is_rejected_and_tried_again_later(operator, fleet, links, packages):
    inbox = watch_status(links, "no-blob-1")
    device = fleet("no-blob-1", download_timeout_s=1.0)
    version = operator.register(packages["1.2.0"])
    signed = operator.publish_manifest(version, RolloutStage("nobody", (), 0.0))  # the blob is retained with it
    operator.clear_blob("1.2.0")
    operator.link.send(resigned(operator, signed, stage=EVERYONE))  # offered to everyone, but the blob is gone
    steps = update_steps(inbox, FINAL)
    assert steps[-1][0] == "rejected" and steps[-1][2].startswith("no model on") and "within 1 s" in steps[-1][2]
    # Not refused for good: a later stage, with the blob back, updates the device.
    operator.publish_manifest(version, EVERYONE)
    assert update_steps(inbox, FINAL)[-1][:2] == ("applied", "1.2.0")
    assert device.runtime.presence.model_version == "1.2.0"


def resigned(operator, manifest, **changes):
    """``manifest`` with ``changes``, signed again by the operator's key, one second newer."""
    changed = dataclasses.replace(manifest, created_at=manifest.created_at + 1, **changes)
    return sign_manifest(changed, operator.private_key)


def test_a_device_behind_a_rollback_manifest_moves_up_to_it(operator, fleet, links, packages):
    inbox = watch_status(links, "behind-1")
    device = fleet("behind-1")
    # The device missed 1.2.0; the channel's manifest is now a rollback to 1.2.0 (after a halted 1.3.0).
    operator.publish_manifest(operator.register(packages["1.2.0"]), EVERYONE, rollback=True)
    assert update_steps(inbox, FINAL)[-1] == ("applied", "1.2.0", None)
    assert device.runtime.presence.model_version == "1.2.0"
