"""Staged rollouts over a fleet of simulated devices on a real Mosquitto: stages, abort criteria, restore, cleanup."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cloud_worker.storage import StorageSettings
from device.local_model import shipped_model_directory
from device.simulated import SimulatedDevice
from firmware_tools.release.fleet import FleetWatch, format_table, status_rows
from firmware_tools.release.publish import EVERYONE, Publisher
from firmware_tools.release.registry import ModelRegistry, RegistryError, RolloutState
from firmware_tools.release.rollout import (
    AbortCriteria,
    PlanError,
    RolloutPlan,
    RolloutRunner,
    StagePlan,
    factory_version,
)
from schemas.model import RolloutStage
from schemas.signing import load_private_key
from schemas.status import DeviceState, DeviceStatus
from schemas.topics import MANIFEST, MODEL_BLOB
from tests.conftest import FACTORY_VERSION, REPO, Inbox, ota_device_settings, wait_until

PICKY_SUITE = REPO / "tests" / "data" / "picky_self_test"


@pytest.fixture
def rollout_env(broker_settings, links, keys, tmp_path):
    """A channel, a registry in PostgreSQL-compatible SQLite, a publisher and a fleet watch."""
    channel = f"roll-{os.getpid()}-{tmp_path.name[-8:]}".replace("_", "-")
    registry = ModelRegistry(StorageSettings(url=f"sqlite:///{tmp_path}/registry.sqlite3"))
    link = links()
    publisher = Publisher(link, registry, channel, load_private_key(keys["fleet.key"]))
    yield channel, registry, publisher, FleetWatch(link)
    registry.close()


def start_fleet(broker_settings, keys, channel, tmp_path, names, **ota):
    devices = {}
    for name in names:
        settings = ota_device_settings(broker_settings, name, channel, tmp_path / name, keys["fleet.pub"], **ota)
        devices[name] = SimulatedDevice(settings, interval_s=0.2).start()
    return devices


def stop_fleet(devices) -> None:
    for device in devices.values():
        device.stop()
        assert device.failure is None, device.failure


def test_stage_specs_parse_and_accumulate():
    plan = RolloutPlan(
        stages=(StagePlan.parse("canary:a,b", 0), StagePlan.parse("25%", 1), StagePlan.parse("all:100%", 2))
    )
    assert [stage.name for stage in plan.stages] == ["canary", "stage-2", "all"]
    assert plan.cumulative() == [
        RolloutStage("canary", ("a", "b"), 0.0),
        RolloutStage("stage-2", ("a", "b"), 25.0),
        RolloutStage("all", ("a", "b"), 100.0),
    ]
    for bad in ("x:", "0%", "150%", "x:a/b", "lots%", "c:+"):
        with pytest.raises(PlanError):
            StagePlan.parse(bad, 0)
    for typo in ("fleet:150", "25", "early:12.5"):  # a percentage without its %, not a device named "150"
        with pytest.raises(PlanError, match="bare number"):
            StagePlan.parse(typo, 0)
    with pytest.raises(PlanError):
        RolloutPlan(stages=())
    with pytest.raises(PlanError, match="progress_s"):
        RolloutPlan(stages=plan.stages, progress_s=0)
    assert AbortCriteria(20, 3).tripped(1, 3) and not AbortCriteria(20, 3).tripped(1, 2)
    assert factory_version() == FACTORY_VERSION  # whose blob no rollout clears
    assert not AbortCriteria(50, 2).tripped(1, 3)


def test_a_published_version_never_changes(rollout_env, packages):
    _channel, _registry, publisher, _watch = rollout_env
    publisher.register(packages["1.2.0"])
    publisher.register(packages["1.2.0"])  # the same model again is fine
    with pytest.raises(RegistryError, match="registered already with another model"):
        publisher.register(packages["broken-1.2.0"])


@pytest.mark.slow
def test_a_rollout_goes_stage_by_stage_and_a_broken_one_halts_and_restores_the_fleet(
    rollout_env,
    broker_settings,
    links,
    keys,
    packages,
    tmp_path,
):
    channel, registry, publisher, watch = rollout_env
    names = [f"{channel}-d{number}" for number in range(8)]
    # The last three run 1.2.0 from the factory and have a self-test no model passes: hardware where
    # the next model will fail. The others start on the shipped 1.1.0.
    picky = names[5:]
    devices = start_fleet(broker_settings, keys, channel, tmp_path, names[:5])
    for name in picky:
        settings = ota_device_settings(
            broker_settings, name, channel, tmp_path / name, keys["fleet.pub"], self_test=str(PICKY_SUITE)
        )
        settings = dataclasses.replace(
            settings, model=dataclasses.replace(settings.model, directory=str(packages["1.2.0"]))
        )
        devices[name] = SimulatedDevice(settings, interval_s=0.2).start()
    try:
        live = publisher.register(shipped_model_directory())
        publisher.publish_manifest(live, EVERYONE)
        registry.set_live_version(channel, live.version)
        assert wait_until(lambda: set(names) <= set(watch.snapshot()), 15)
        say: list[str] = []
        plan = RolloutPlan(
            stages=(StagePlan.parse(f"canary:{names[0]},{names[1]}", 0), StagePlan.parse("all:100%", 1)),
            criteria=AbortCriteria(max_failure_percent=25, min_reports=2),
            stage_timeout_s=60,
        )
        # 1.2.0 goes to everyone; the picky devices run it already and count as done.
        publisher.register(packages["1.2.0"])
        good = RolloutRunner(publisher, registry, watch, "1.2.0", plan, say=say.append).run()
        assert good.state == RolloutState.COMPLETED, say
        assert good.reports == 5 and good.failures == 0
        assert all(devices[name].runtime.presence.model_version == "1.2.0" for name in names)
        assert registry.live_version(channel) == "1.2.0"
        # 1.3.0 passes the canary, then fails on the picky devices: halted, and 1.2.0 restored everywhere.
        publisher.register(packages["1.3.0"])
        bad_runner = RolloutRunner(publisher, registry, watch, "1.3.0", plan, say=say.append)
        bad = bad_runner.run()
        assert bad.state == RolloutState.ABORTED and bad.restored == "1.2.0", say
        assert bad.stage == 2 and bad.failures >= 1
        assert "failed to apply 1.3.0" in bad.reason
        assert bad_runner.wait_for_restore("1.2.0", 30) == []
        assert all(devices[name].runtime.presence.model_version == "1.2.0" for name in names)
        assert registry.live_version(channel) == "1.2.0"
        record = registry.latest_rollout(channel)
        assert record.state == RolloutState.ABORTED and record.reason == bad.reason
        reports = registry.reports(record.rollout_id)
        # The halt comes with the first failures over the criteria: not every picky device may have reported.
        assert {reports[name].state for name in picky if name in reports} == {"rolled_back"}
        assert {reports[name].state for name in names[:2]} == {"applied"}
        # The halted version's blob is gone from the broker; 1.2.0's is still there.
        blobs = Inbox()
        links().subscribe(MODEL_BLOB.filter().replace("+", channel, 1), blobs)
        retained = set()
        try:
            while True:
                topic, _envelope = blobs.get(1.0)
                retained.add(topic.rsplit("/", 1)[1])
        except Exception:
            pass
        assert retained == {"1.1.0", "1.2.0"}
        # The status table shows every device, its model, its stage and its last update step.
        rows = {row["device"]: row for row in status_rows(watch.snapshot(), plan.cumulative())}
        assert rows[names[0]]["stage"] == "canary" and rows[names[4]]["stage"] == "all"
        assert rows[names[0]]["update"] == "rolled_back 1.2.0"
        failed = [rows[name] for name in picky if rows[name]["update"] == "rolled_back 1.3.0"]
        assert failed and all(row["reason"].startswith("self-test failed") for row in failed)
        assert names[7] in format_table(list(rows.values()))
    finally:
        stop_fleet(devices)


def picky_device(broker_settings, keys, channel, tmp_path, name):
    """A device on the shipped model whose self-test no model passes: hardware on which every update fails."""
    settings = ota_device_settings(
        broker_settings, name, channel, tmp_path / name, keys["fleet.pub"], self_test=str(PICKY_SUITE)
    )
    return SimulatedDevice(settings, interval_s=0.2).start()


def test_a_fleet_smaller_than_min_reports_that_refuses_a_version_halts_it(
    rollout_env, broker_settings, keys, packages, tmp_path
):
    # Issue 21: two devices, both failing their self-test, and --min-reports 3: the rollout said "completed",
    # and the registry recorded the refused version live.
    channel, registry, publisher, watch = rollout_env
    names = [f"{channel}-p{number}" for number in range(2)]
    devices = {name: picky_device(broker_settings, keys, channel, tmp_path, name) for name in names}
    try:
        live = publisher.register(shipped_model_directory())
        publisher.publish_manifest(live, EVERYONE)
        registry.set_live_version(channel, live.version)
        assert wait_until(lambda: set(names) <= set(watch.snapshot()), 15)
        publisher.register(packages["1.2.0"])
        plan = RolloutPlan(
            stages=(StagePlan.parse("fleet:100%", 0),),
            criteria=AbortCriteria(20, 3),
            stage_timeout_s=60,
            progress_s=0.01,  # the first poll after the offer (every 0.1 s) says it: the devices take longer
        )
        say: list[str] = []
        outcome = RolloutRunner(publisher, registry, watch, "1.2.0", plan, say=say.append).run()
        assert outcome.state == RolloutState.ABORTED, say
        assert outcome.reason.startswith("every report so far is a failure")
        # While the devices tried the version, the rollout said whom it waited for.
        assert any(
            line.startswith("  stage fleet: waiting for ") and "s left before it halts" in line for line in say
        ), say
        assert registry.live_version(channel) == FACTORY_VERSION
        assert all(device.runtime.presence.model_version == FACTORY_VERSION for device in devices.values())
        assert registry.version(channel, FACTORY_VERSION).blob_retained
    finally:
        stop_fleet(devices)


@pytest.mark.slow
def test_a_rollout_some_devices_refuse_ends_partial_and_the_live_version_stays(
    rollout_env, broker_settings, keys, packages, tmp_path
):
    # Issue 21: "completed" meant every stage ran within the abort criteria, refusing devices or not, and the
    # registry then recorded the version live. Completed now means every device it reached applied it.
    channel, registry, publisher, watch = rollout_env
    good, refusing = f"{channel}-good", f"{channel}-refusing"
    devices = start_fleet(broker_settings, keys, channel, tmp_path, [good])
    devices[refusing] = picky_device(broker_settings, keys, channel, tmp_path, refusing)
    try:
        factory = publisher.register(shipped_model_directory())
        publisher.publish_manifest(factory, EVERYONE)
        registry.set_live_version(channel, FACTORY_VERSION)
        assert wait_until(lambda: {good, refusing} <= set(watch.snapshot()), 15)
        publisher.register(packages["1.2.0"])
        plan = RolloutPlan(
            stages=(StagePlan.parse(f"canary:{good}", 0), StagePlan.parse("fleet:100%", 1)),
            criteria=AbortCriteria(max_failure_percent=60, min_reports=1),  # 1 failure in 2 does not halt it
            stage_timeout_s=60,
        )
        say: list[str] = []
        outcome = RolloutRunner(publisher, registry, watch, "1.2.0", plan, say=say.append).run()
        assert outcome.state == RolloutState.PARTIAL and (outcome.reports, outcome.failures) == (2, 1), say
        assert outcome.reason.startswith(f"1 of 2 device(s) could not apply 1.2.0: {refusing} rolled_back")
        assert registry.live_version(channel) == FACTORY_VERSION
        assert registry.latest_rollout(channel).state == RolloutState.PARTIAL
        assert devices[good].runtime.presence.model_version == "1.2.0"
        assert devices[refusing].runtime.presence.model_version == FACTORY_VERSION
        assert (
            registry.version(channel, FACTORY_VERSION).blob_retained
            and registry.version(channel, "1.2.0").blob_retained
        )
        assert any(line.startswith("partial: ") and f"live version stays {FACTORY_VERSION}" in line for line in say)
        assert registry.failed_reports(channel, "1.2.0").keys() == {refusing}
    finally:
        stop_fleet(devices)


@pytest.mark.slow
def test_a_completed_rollout_keeps_the_blob_of_a_version_an_offline_device_runs(
    rollout_env, broker_settings, keys, packages, tmp_path
):
    # Issue 21: the registry said 1.3.0 was live while the devices ran 1.1.0; the next good rollout cleared
    # every blob but the new and the "previous" version's, the one the devices ran among them.
    channel, registry, publisher, watch = rollout_env
    good, away = f"{channel}-good", f"{channel}-away"
    devices = start_fleet(broker_settings, keys, channel, tmp_path, [good, away])
    try:
        factory = publisher.register(shipped_model_directory())
        publisher.publish_manifest(factory, EVERYONE)
        assert wait_until(lambda: {good, away} <= set(watch.snapshot()), 15)
        devices.pop(away).stop()  # offline, its retained status says it runs the factory model
        assert wait_until(lambda: str(watch.snapshot()[away].state) == "offline", 15)
        publisher.publish_blob(publisher.register(packages["1.3.0"]))
        registry.set_live_version(channel, "1.3.0")  # recorded live, run by no device
        publisher.register(packages["1.2.0"])
        plan = RolloutPlan(stages=(StagePlan.parse("fleet:100%", 0),), stage_timeout_s=60)
        say: list[str] = []
        outcome = RolloutRunner(publisher, registry, watch, "1.2.0", plan, say=say.append).run()
        assert outcome.state == RolloutState.COMPLETED and outcome.failures == 0, say
        assert registry.live_version(channel) == "1.2.0"
        assert registry.version(channel, FACTORY_VERSION).blob_retained  # the offline device runs it
    finally:
        stop_fleet(devices)


def test_stages_naming_unknown_revoked_or_foreign_devices_are_refused(rollout_env, links):
    channel, _registry, _publisher, watch = rollout_env
    here, elsewhere = f"{channel}-here", f"{channel}-elsewhere"
    for device, its_channel in ((here, channel), (elsewhere, "other")):
        links().send(DeviceStatus(device, DeviceState.ONLINE, "0.1.0", FACTORY_VERSION, its_channel))
    assert wait_until(lambda: {here, elsewhere} <= set(watch.snapshot()), 15)
    seen = watch.seen()

    def check(spec: str, revoked=frozenset(), allow_unknown=False) -> None:
        plan = RolloutPlan(stages=(StagePlan.parse(spec, 0),), allow_unknown=allow_unknown)
        plan.check_devices(seen, channel, set(revoked))

    check(f"canary:{here}")
    with pytest.raises(PlanError, match=f"no status was ever published by {channel}-hree: check the name"):
        check(f"canary:{here},{channel}-hree")
    check(f"canary:{channel}-new", allow_unknown=True)
    with pytest.raises(PlanError, match=f"revoked device\\(s\\) named: {here}"):
        check(f"canary:{here}", revoked={here})
    with pytest.raises(PlanError, match=f"following another channel than {channel}: {elsewhere} \\(other\\)"):
        check(f"canary:{elsewhere}")
    check("fleet:100%", revoked={here})  # a share names no device


def test_a_rollout_leaves_out_a_revoked_device_whose_status_still_says_online(
    rollout_env, broker_settings, links, keys, packages, tmp_path
):
    # Issue 21: the ACL refuses a revoked device's offline status and Last Will, so its retained status says
    # "online" for ever; the rollout waited for it and rolled the fleet back.
    channel, registry, publisher, watch = rollout_env
    good, revoked = f"{channel}-good", f"{channel}-revoked"
    devices = start_fleet(broker_settings, keys, channel, tmp_path, [good])
    links().send(DeviceStatus(revoked, DeviceState.ONLINE, "0.1.0", FACTORY_VERSION, channel))
    try:
        publisher.publish_manifest(publisher.register(shipped_model_directory()), EVERYONE)
        registry.set_live_version(channel, FACTORY_VERSION)
        assert wait_until(lambda: {good, revoked} <= set(watch.snapshot()), 15)
        publisher.register(packages["1.2.0"])
        registry.revoke_device(revoked)
        registry.revoke_device(revoked)  # twice is fine
        plan = RolloutPlan(stages=(StagePlan.parse("fleet:100%", 0),), stage_timeout_s=20)
        say: list[str] = []
        outcome = RolloutRunner(publisher, registry, watch, "1.2.0", plan, say=say.append).run()
        assert outcome.state == RolloutState.COMPLETED and outcome.reports == 1, say
        assert "offered to 1 online device(s)" in say[1]
        rows = {row["device"]: row for row in status_rows(watch.snapshot(), revoked=registry.revoked_devices())}
        assert (rows[revoked]["state"], rows[good]["state"]) == ("revoked", "online")
    finally:
        stop_fleet(devices)


def firmware_tools(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "firmware_tools", *args], capture_output=True, text=True, timeout=120)


def retained_manifest(links, channel: str):
    """The manifest retained for the channel, or None when none comes within a second."""
    inbox = Inbox()
    links().subscribe(MANIFEST.topic(channel=channel), inbox)
    try:
        return inbox.get(1.0)[1]
    except Exception:
        return None


@pytest.mark.slow
@pytest.mark.subprocess
def test_publish_holds_unless_given_a_stage_and_warns_about_a_version_devices_refused(
    rollout_env, broker_settings, links, keys, packages, tmp_path
):
    # Issue 21: publish without --hold went straight to every device, even with a version every device had
    # refused, without a word. Publishing now holds; going live takes a rollout or an explicit --stage.
    channel, registry, _publisher, _watch = rollout_env
    common = [
        "--channel", channel, "--key", str(keys["fleet.key"]), "--port", str(broker_settings.port),
        "--database", f"sqlite:///{tmp_path}/registry.sqlite3",
    ]  # fmt: skip
    held = firmware_tools("publish", "--model", str(packages["1.2.0"]), *common)
    assert held.returncode == 0, held.stderr
    assert json.loads(held.stdout)["held"] is True
    assert f"rollout --channel {channel} --version 1.2.0" in held.stderr
    assert registry.version(channel, "1.2.0").blob_retained and registry.live_version(channel) is None
    assert retained_manifest(links, channel) is None
    # A rollout in which a device rolled 1.3.0 back, recorded; publishing 1.3.0 to everyone says so.
    rollout = registry.start_rollout(channel, "1.3.0", None, {"stages": []})
    registry.record_report(rollout.rollout_id, f"{channel}-d1", "rolled_back", "1.3.0", "self-test failed", 1.0)
    registry.finish_rollout(rollout.rollout_id, RolloutState.ABORTED, "failures")
    both = firmware_tools("publish", "--model", str(packages["1.3.0"]), "--hold", "--stage", "fleet:100%", *common)
    assert both.returncode == 2 and "give one of them" in both.stderr
    unknown = firmware_tools("publish", "--model", str(packages["1.3.0"]), "--stage", "canary:nobody", *common)
    assert unknown.returncode == 2 and "no status was ever published by nobody" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    everyone = firmware_tools("publish", "--model", str(packages["1.3.0"]), "--stage", "fleet:100%", *common)
    assert everyone.returncode == 0, everyone.stderr
    assert f"warning: 1 device(s) could not apply 1.3.0 before ({channel}-d1: self-test failed)" in everyone.stderr
    assert registry.live_version(channel) == "1.3.0"
    manifest = retained_manifest(links, channel)
    assert manifest is not None and json.loads(manifest.payload)["version"] == "1.3.0"


@pytest.mark.slow
@pytest.mark.subprocess
def test_provision_revoke_records_the_device_as_revoked_in_the_registry(rollout_env, keys, tmp_path):
    _channel, registry, _publisher, _watch = rollout_env
    fleet = ["--fleet-dir", str(tmp_path / "fleet"), "--database", f"sqlite:///{tmp_path}/registry.sqlite3"]
    made = firmware_tools(
        "provision", *fleet, "--device", "pi-01", "--device", "pi-02", "--signing-key", str(keys["fleet.pub"])
    )
    assert made.returncode == 0, made.stderr
    assert registry.revoked_devices() == set()
    revoked = firmware_tools("provision", *fleet, "--revoke", "pi-02")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["revoked"] == ["pi-02"]
    assert registry.revoked_devices() == {"pi-02"}


@pytest.mark.slow
@pytest.mark.subprocess
def test_firmware_tools_status_prints_the_table(rollout_env, broker_settings, keys, tmp_path):
    channel, registry, publisher, _watch = rollout_env
    devices = start_fleet(broker_settings, keys, channel, tmp_path, [f"{channel}-s0"])
    try:
        publisher.publish_manifest(publisher.register(shipped_model_directory()), EVERYONE)
        registry.set_live_version(channel, FACTORY_VERSION)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "firmware_tools",
                "status",
                "--channel",
                channel,
                "--port",
                str(broker_settings.port),
                "--database",
                f"sqlite:///{tmp_path}/registry.sqlite3",
                "--device",
                f"{channel}-*",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0] == f"channel {channel}: live version {FACTORY_VERSION}"
        assert lines[1].split() == ["device", "state", "model", "stage", "update", "reason"]
        assert lines[3].split()[:3] == [f"{channel}-s0", "online", FACTORY_VERSION]
    finally:
        stop_fleet(devices)


def test_the_registry_keeps_versions_channels_and_rollouts_in_either_database(database_url, packages):
    from schemas.model import ModelPackage

    with ModelRegistry(StorageSettings(url=database_url)) as registry:
        package = ModelPackage.load(packages["1.2.0"])
        model = package.model_path(packages["1.2.0"]).read_bytes()
        registry.register("stable", package, model, min_device_version="0.1.0", notes="n", key_id="0" * 16)
        stored = registry.version("stable", "1.2.0")
        assert stored.model == model and stored.package == package and not stored.blob_retained
        registry.set_blob_retained("stable", "1.2.0", True)
        assert registry.version("stable", "1.2.0").blob_retained
        with pytest.raises(RegistryError, match=r"no model 9\.9\.9"):
            registry.version("stable", "9.9.9")
        assert registry.live_version("stable") is None
        registry.set_live_version("stable", "1.2.0")
        assert registry.live_version("stable") == "1.2.0"
        rollout = registry.start_rollout("stable", "1.3.0", "1.2.0", {"stages": []})
        with pytest.raises(RegistryError, match="still running"):
            registry.start_rollout("stable", "1.3.0", "1.2.0", {"stages": []})
        registry.record_report(rollout.rollout_id, "pi-01", "applied", "1.3.0", None, 1.0)
        registry.record_report(rollout.rollout_id, "pi-01", "rolled_back", "1.3.0", "self-test", 2.0)
        registry.enter_stage(rollout.rollout_id, 1)
        registry.finish_rollout(rollout.rollout_id, RolloutState.ABORTED, "too many failures")
        latest = registry.latest_rollout("stable")
        assert (latest.state, latest.stage_index, latest.reason) == (RolloutState.ABORTED, 1, "too many failures")
        assert registry.reports(rollout.rollout_id)["pi-01"].state == "rolled_back"
        # Fleet learning rounds (firmware_tools/learning/learn.py) live beside them.
        first = registry.record_round("stable", "1.2.0", "1.2.1", True, "packaged", {"data": {"n": 3}})
        registry.record_round("stable", "1.2.1", "1.2.2", False, "rejected", {"data": {"n": 5}})
        registry.set_round_outcome(first, "completed", {"data": {"n": 3}, "seconds": {"rollout": 2.0}})
        rounds = registry.rounds("stable")
        assert [(row.version, row.passed, row.outcome) for row in rounds] == [
            ("1.2.1", True, "completed"),
            ("1.2.2", False, "rejected"),
        ]
        assert rounds[0].record["seconds"] == {"rollout": 2.0} and registry.rounds("other") == []
        # Failure reports of a version, for publish's warning; revoked devices, for rollouts and status.
        assert registry.failed_reports("stable", "1.3.0") == {"pi-01": "self-test"}
        assert registry.failed_reports("stable", "1.2.0") == {} and registry.failed_reports("other", "1.3.0") == {}
        registry.revoke_device("pi-02")
        assert registry.revoked_devices() == {"pi-02"}
        assert set(registry.counts()) == {
            "model_versions",
            "channels",
            "rollouts",
            "rollout_reports",
            "learning_rounds",
            "revoked_devices",
        }
