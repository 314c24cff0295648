"""Staged rollouts: offer a version to a few devices, then more, and halt and restore at the first sign of trouble.

Stages are cumulative: each one's manifest names every device of the stages before it
and the largest percentage so far, so nobody who updated early is left out later
(percentages pick devices by a stable hash of the id: see schemas.model.fleet_bucket).

A stage is done when every online device of the channel in it has reported a final step for the
version (``applied``, ``rejected`` or ``rolled_back``), or already runs it. After every
report the abort criteria are checked over all reports of the rollout: once there are
at least ``min_reports``, a failure share (rejected or rolled back) at or over
``max_failure_percent`` halts the rollout, and so does a stage in which every report so far
is a failure, however few. So does a stage whose devices do not all report within its timeout:
a rollout that cannot tell whether devices are fine does not go on. Halting re-publishes the
previous version as a signed rollback manifest to everyone and clears the failed version's blob.

The rollout *completes*, and the version becomes the channel's live one, only when every online
device it reached applied it. When the stages ran to the end but some devices could not apply it,
it ends *partial*: the live version stays what it was and no blob is cleared.

Revoked devices (ModelRegistry.revoke_device) are left out: their retained status may say
"online" for ever, since the ACL refuses their offline status and Last Will.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from device.local_model import shipped_model_directory
from firmware_tools.release.fleet import FleetWatch, SeenStatus
from firmware_tools.release.publish import EVERYONE, Publisher
from firmware_tools.release.registry import FAILED_STEPS, ModelRegistry, RolloutState
from schemas.model import ModelPackage, RolloutStage
from schemas.status import DeviceState, DeviceStatus, OtaState
from schemas.topics import check_identifier

log = logging.getLogger("mqvox.rollout")

FINAL_STEPS = (OtaState.APPLIED, OtaState.REJECTED, OtaState.ROLLED_BACK)
"""Update steps after which a device has nothing more to say about a version."""

_STAGE = re.compile(r"^(?:(?P<name>[A-Za-z0-9_-]{1,64}):)?(?P<spec>.+)$")


def factory_version() -> str:
    """The version of the model that ships with the device software, what a fleet starts from and a rollback most
    often restores: its blob is never cleared."""
    return ModelPackage.load(shipped_model_directory()).version


class PlanError(ValueError):
    """A rollout plan that cannot be run; the message says which part."""


@dataclass(frozen=True)
class StagePlan:
    """One stage as given on the command line: ``[NAME:]dev-1,dev-2`` or ``[NAME:]25%``."""

    name: str
    """Stage name, shown in status tables."""
    devices: tuple[str, ...] = ()
    """Devices added by name."""
    percent: float = 0.0
    """Share of the fleet (0-100) this stage reaches, by stable hash."""

    @classmethod
    def parse(cls, text: str, index: int) -> StagePlan:
        found = _STAGE.fullmatch(text.strip())
        if not found:
            raise PlanError(f"stage {text!r}: expected [NAME:]DEVICE,DEVICE or [NAME:]PERCENT%")
        spec = found["spec"]
        name = found["name"] or f"stage-{index + 1}"
        if spec.endswith("%"):
            try:
                percent = float(spec[:-1])
            except ValueError:
                raise PlanError(f"stage {text!r}: {spec!r} is not a percentage") from None
            if not 0 < percent <= 100:
                raise PlanError(f"stage {text!r}: the percentage must be over 0 and at most 100")
            return cls(name, (), percent)
        if spec.strip().replace(".", "", 1).isdigit():
            raise PlanError(
                f"stage {text!r}: {spec!r} is a bare number; write {spec}% for a share of the fleet, or name devices"
            )
        devices = tuple(device.strip() for device in spec.split(",") if device.strip())
        try:
            for device in devices:
                check_identifier("device_id", device)
        except ValueError as error:
            raise PlanError(f"stage {text!r}: {error}") from None
        if not devices:
            raise PlanError(f"stage {text!r} names no device")
        return cls(name, devices, 0.0)


@dataclass(frozen=True)
class AbortCriteria:
    """When a rollout halts."""

    max_failure_percent: float = 20.0
    """Halt when this share (0-100) of the reports so far are failures..."""
    min_reports: int = 3
    """...once at least this many devices have reported a final step."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_failure_percent <= 100:
            raise PlanError(f"max_failure_percent must be within 0-100, not {self.max_failure_percent}")
        if self.min_reports < 1:
            raise PlanError(f"min_reports must be at least 1, not {self.min_reports}")

    def tripped(self, failures: int, reports: int) -> bool:
        return reports >= self.min_reports and 100 * failures >= self.max_failure_percent * reports


@dataclass(frozen=True)
class RolloutPlan:
    """The stages, the abort criteria and the patience of one rollout."""

    stages: tuple[StagePlan, ...]
    """Stages, in order; each adds devices to the ones before."""
    criteria: AbortCriteria = AbortCriteria()
    """When to halt."""
    stage_timeout_s: float = 600.0
    """How long a stage may wait for its devices' reports before the rollout halts."""
    soak_s: float = 0.0
    """How long to keep watching a finished stage for late failures before the next one."""
    progress_s: float = 10.0
    """While a stage waits, how often (seconds) to say which devices it waits for."""
    allow_unknown: bool = False
    """Accept stages naming devices that have never published a status (a typo, most often)."""

    def __post_init__(self) -> None:
        if not self.stages:
            raise PlanError("a rollout needs at least one stage")
        if self.stage_timeout_s <= 0 or self.soak_s < 0 or self.progress_s <= 0:
            raise PlanError("stage_timeout_s and progress_s must be positive and soak_s not negative")

    def cumulative(self) -> list[RolloutStage]:
        """The stage each manifest carries: every device named so far, the largest percentage so far."""
        devices: list[str] = []
        percent = 0.0
        stages = []
        for stage in self.stages:
            devices += [device for device in stage.devices if device not in devices]
            percent = max(percent, stage.percent)
            stages.append(RolloutStage(stage.name, tuple(devices), percent))
        return stages

    def to_dict(self) -> dict:
        return asdict(self)

    def check_devices(self, seen: dict[str, SeenStatus], channel: str, revoked: set[str]) -> None:
        """PlanError if a stage names a revoked device, one following another channel, or (unless
        ``allow_unknown``) one that never published a status."""
        check_named_devices([stage.devices for stage in self.stages], seen, channel, revoked, self.allow_unknown)


def check_named_devices(
    named: list[tuple[str, ...]], seen: dict[str, SeenStatus], channel: str, revoked: set[str], allow_unknown: bool
) -> None:
    """PlanError if any device named for ``channel`` is revoked, follows another channel, or is unknown."""
    devices = [device for group in named for device in group]
    if bad := sorted({device for device in devices if device in revoked}):
        raise PlanError(f"revoked device(s) named: {', '.join(bad)}")
    if bad := sorted({device for device in devices if device in seen and seen[device].status.channel != channel}):
        others = ", ".join(f"{device} ({seen[device].status.channel})" for device in bad)
        raise PlanError(f"device(s) following another channel than {channel}: {others}")
    if not allow_unknown and (bad := sorted({device for device in devices if device not in seen})):
        raise PlanError(
            f"no status was ever published by {', '.join(bad)}: check the name, or pass --allow-unknown"
            " to offer the version to a device that has not connected yet"
        )


@dataclass(frozen=True)
class RolloutOutcome:
    """How a rollout ended."""

    rollout_id: int
    state: RolloutState
    stage: int
    """The last stage whose manifest was published, counted from 1 as the messages and status count them."""
    reports: int
    """Devices that reported a final step for the version."""
    failures: int
    """Of those, how many rejected it or rolled it back."""
    reason: str | None
    """Why it halted or ended partial; None when it completed."""
    restored: str | None
    """The version re-published after a halt, if any."""


class RolloutRunner:
    """Runs one rollout of a registered version, watching the fleet's statuses on the same broker."""

    def __init__(
        self,
        publisher: Publisher,
        registry: ModelRegistry,
        watch: FleetWatch,
        version: str,
        plan: RolloutPlan,
        *,
        say: Callable[[str], None] = print,
        poll_s: float = 0.1,
    ) -> None:
        self.publisher = publisher
        self.registry = registry
        self.watch = watch
        self.channel = publisher.channel
        self.version = version
        self.plan = plan
        self.say = say
        self.poll_s = poll_s
        self._recorded: dict[str, tuple[str, str]] = {}
        self.revoked: set[str] = set()
        """Devices the registry records as revoked, read when the rollout starts: never waited for."""

    def run(self) -> RolloutOutcome:
        target = self.registry.version(self.channel, self.version)
        previous = self.registry.live_version(self.channel)
        if previous == self.version:
            raise PlanError(f"{self.channel} {self.version} is live already")
        self.watch.settle()  # the retained statuses are in before the rollout's clock starts
        self.revoked = self.registry.revoked_devices()
        self.plan.check_devices(self.watch.seen(), self.channel, self.revoked)
        rollout = self.registry.start_rollout(self.channel, self.version, previous, self.plan.to_dict())
        self.say(f"rollout {rollout.rollout_id}: {self.channel} {previous or '(none)'} -> {self.version}")
        stage_index = 0
        for stage_index, stage in enumerate(self.plan.cumulative()):
            self.registry.enter_stage(rollout.rollout_id, stage_index)
            self.publisher.publish_manifest(target, stage)
            fleet = self._channel_fleet()
            expected = self._expected(fleet, stage)
            offline = sorted(set(stage.devices) - expected)
            self.say(
                f"stage {stage_index + 1} ({stage.name}): offered to {len(expected)} online device(s)"
                + (f"; named but offline: {', '.join(offline)} (they fetch it when they connect)" if offline else "")
            )
            halted = self._watch_stage(rollout.rollout_id, rollout.started_at, stage)
            if halted is not None:
                return self._halt(rollout.rollout_id, rollout.started_at, stage_index, previous, halted)
        final = self._final_reports(self._channel_fleet(), rollout.started_at)
        failures, reports = self._tally(final)
        stage = stage_index + 1
        if failures:
            return self._partial(rollout.rollout_id, stage, previous, final)
        self.registry.set_live_version(self.channel, self.version)
        self.registry.finish_rollout(rollout.rollout_id, RolloutState.COMPLETED)
        # Never the blob of a version a device of the channel runs (one that refused this one, say): a device that
        # restarts or falls back would find no model to fetch.
        in_use = {seen.status.model_version for seen in self._channel_fleet().values() if seen.status.model_version}
        keep = {self.version, factory_version(), *in_use} | ({previous} if previous else set())
        cleared = self.publisher.clear_superseded(keep)
        self.say(
            f"completed: {reports} report(s), every one applied; {self.version} is live"
            + (f"; cleared blobs {', '.join(cleared)}" if cleared else "")
        )
        return RolloutOutcome(rollout.rollout_id, RolloutState.COMPLETED, stage, reports, 0, None, None)

    def _partial(
        self, rollout_id: int, stage: int, previous: str | None, final: dict[str, DeviceStatus]
    ) -> RolloutOutcome:
        """The stages ran to the end, but not every device could apply the version: it does not go live."""
        failed = {device: status.ota for device, status in final.items() if status.ota.state in FAILED_STEPS}
        reason = f"{len(failed)} of {len(final)} device(s) could not apply {self.version}: " + "; ".join(
            f"{device} {ota.state}" + (f" ({ota.reason})" if ota.reason else "")
            for device, ota in sorted(failed.items())[:5]
        )
        self.registry.finish_rollout(rollout_id, RolloutState.PARTIAL, reason)
        self.say(
            f"partial: {reason}. The live version stays {previous or '(none)'}; the devices that applied"
            f" {self.version} keep it, and no blob is cleared. Fix or retire the failing devices and run the"
            " rollout again, or roll back by rolling out the previous version."
        )
        return RolloutOutcome(rollout_id, RolloutState.PARTIAL, stage, len(final), len(failed), reason, None)

    def _watch_stage(self, rollout_id: int, started_at: float, stage: RolloutStage) -> str | None:
        """Wait for the stage's devices; the reason to halt, or None when the stage is done."""
        deadline = time.monotonic() + self.plan.stage_timeout_s
        next_progress = time.monotonic() + self.plan.progress_s
        soak_until: float | None = None
        while True:
            fleet = self._channel_fleet()
            reports = self._final_reports(fleet, started_at)
            self._record(rollout_id, reports)
            failures, reported = self._tally(reports)
            if self.plan.criteria.tripped(failures, reported):
                return (
                    f"{failures} of {reported} device(s) failed to apply {self.version}"
                    f" ({100 * failures / reported:.0f}% >= {self.plan.criteria.max_failure_percent:g}%)"
                )
            if reported and failures == reported:
                # Whatever min_reports says: a fleet smaller than it would otherwise "complete" with every device
                # refusing the version, and the registry would record it live.
                return (
                    f"every report so far is a failure: {failures} of {reported} device(s) could not apply"
                    f" {self.version}"
                )
            waiting = self._expected(fleet, stage) - self._settled(fleet, reports)
            now = time.monotonic()
            if not waiting:
                soak_until = soak_until or now + self.plan.soak_s
                if now >= soak_until:
                    return None
            elif now >= deadline:
                return (
                    f"stage {stage.name}: {len(waiting)} device(s) did not report within"
                    f" {self.plan.stage_timeout_s:g} s ({', '.join(sorted(waiting)[:5])})"
                )
            elif now >= next_progress:
                # A rollout waiting in silence looks hung; say for whom, and how long it may still wait.
                next_progress = now + self.plan.progress_s
                more = f" and {len(waiting) - 5} more" if len(waiting) > 5 else ""
                self.say(
                    f"  stage {stage.name}: waiting for {', '.join(sorted(waiting)[:5])}{more}"
                    f" ({deadline - now:.0f} s left before it halts)"
                )
            time.sleep(self.poll_s)

    def _halt(
        self, rollout_id: int, started_at: float, stage_index: int, previous: str | None, reason: str
    ) -> RolloutOutcome:
        self.say(f"halted at stage {stage_index + 1}: {reason}")
        self.registry.finish_rollout(rollout_id, RolloutState.ABORTED, reason)
        if previous is not None:
            self.publisher.publish_manifest(self.registry.version(self.channel, previous), EVERYONE, rollback=True)
            self.say(f"re-published {previous} as a rollback to every device")
        else:
            self.publisher.clear_manifest()
            self.say("no earlier version to restore: the manifest is cleared, devices keep what they run")
        if self.version != factory_version():
            self.publisher.clear_blob(self.version)
        failures, reports = self._tally(self._final_reports(self._channel_fleet(), started_at))
        return RolloutOutcome(rollout_id, RolloutState.ABORTED, stage_index + 1, reports, failures, reason, previous)

    def wait_for_restore(self, restored: str, timeout_s: float) -> list[str]:
        """After a halt, wait until no online device runs the halted version; the ones that still do."""
        deadline = time.monotonic() + timeout_s
        while True:
            stuck = sorted(
                device
                for device, seen in self._channel_fleet().items()
                if seen.status.state == DeviceState.ONLINE and seen.status.model_version == self.version
            )
            if not stuck or time.monotonic() >= deadline:
                return stuck
            time.sleep(self.poll_s)

    def _channel_fleet(self) -> dict[str, SeenStatus]:
        """The latest status of every device following this rollout's channel, revoked ones left out: one view
        for each poll."""
        return {
            device: seen
            for device, seen in self.watch.seen().items()
            if seen.status.channel == self.channel and device not in self.revoked
        }

    @staticmethod
    def _expected(fleet: dict[str, SeenStatus], stage: RolloutStage) -> set[str]:
        """Online devices of the stage."""
        return {
            device
            for device, seen in fleet.items()
            if seen.status.state == DeviceState.ONLINE and stage.includes(device)
        }

    def _final_reports(self, fleet: dict[str, SeenStatus], started_at: float) -> dict[str, DeviceStatus]:
        """Devices whose latest status, received during this rollout, is a final step for the version."""
        return {
            device: seen.status
            for device, seen in fleet.items()
            if seen.status.ota is not None
            and seen.status.ota.version == self.version
            and seen.status.ota.state in FINAL_STEPS
            and seen.arrived_at >= started_at
        }

    def _settled(self, fleet: dict[str, SeenStatus], reports: dict[str, DeviceStatus]) -> set[str]:
        """Devices with nothing more to say: a final report, or the version running already."""
        running = {device for device, seen in fleet.items() if seen.status.model_version == self.version}
        return set(reports) | running

    @staticmethod
    def _tally(reports: dict[str, DeviceStatus]) -> tuple[int, int]:
        """(failures, reports)."""
        return sum(1 for status in reports.values() if status.ota.state in FAILED_STEPS), len(reports)

    def _record(self, rollout_id: int, reports: dict[str, DeviceStatus]) -> None:
        for device, status in reports.items():
            ota = status.ota
            assert ota is not None
            if self._recorded.get(device) != (str(ota.state), ota.version):
                self._recorded[device] = (str(ota.state), ota.version)
                self.registry.record_report(rollout_id, device, str(ota.state), ota.version, ota.reason, status.sent_at)
                self.say(f"  {device}: {ota.state} {ota.version}" + (f" ({ota.reason})" if ota.reason else ""))
