"""The release subcommands: keygen, publish, rollout, status."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from firmware_tools.cli_common import add_release_arguments, add_subcommand


def keygen(args: argparse.Namespace) -> int:
    """Make the fleet's model-signing key pair; the public half is provisioned on every device."""
    from schemas.signing import generate_key_pair

    private, public = args.out_dir / f"{args.name}.key", args.out_dir / f"{args.name}.pub"
    key = generate_key_pair(private, public)
    print(json.dumps({"key_id": key, "private_key": str(private), "public_key": str(public)}))
    return 0


@contextlib.contextmanager
def release_tools(args: argparse.Namespace) -> Iterator[tuple]:
    """The registry, the broker link and the publisher that publish, rollout, status and learn share."""
    from common.database import DatabaseSettings
    from common.mqtt import MqttLink, broker_from_arguments
    from firmware_tools.release.publish import Publisher
    from firmware_tools.release.registry import ModelRegistry
    from schemas.signing import load_private_key

    private_key = load_private_key(args.key) if getattr(args, "key", None) else None
    with (
        ModelRegistry(DatabaseSettings(url=args.database)) as registry,
        MqttLink(f"mqvox-operator-{os.getpid()}", broker_from_arguments(args)) as link,
    ):
        publisher = Publisher(link, registry, args.channel, private_key) if private_key else None
        yield registry, link, publisher


def publish(args: argparse.Namespace) -> int:
    """Register a model package and retain its blob; with --stage, also offer it to that one stage at once."""
    from firmware_tools.release.fleet import FleetWatch
    from firmware_tools.release.publish import EVERYONE
    from firmware_tools.release.rollout import RolloutPlan, StagePlan, check_named_devices

    if args.hold and args.stage:
        raise ValueError("--hold offers the version to no device, --stage to some: give one of them")
    stage_plan = StagePlan.parse(args.stage, 0) if args.stage else None
    with release_tools(args) as (registry, link, publisher):
        if stage_plan is not None and stage_plan.devices:
            watch = FleetWatch(link)
            watch.settle()
            check_named_devices(
                [stage_plan.devices], watch.seen(), args.channel, registry.revoked_devices(), args.allow_unknown
            )
        version = publisher.register(args.model, notes=args.notes, min_device_version=args.min_device_version)
        publisher.publish_blob(version)
        line = {"channel": args.channel, "version": version.version, "sha256": version.package.sha256}
        if stage_plan is None:
            line["held"] = True
            print(
                f"{version.version} is registered and its blob retained; no device is offered it. Roll it out with:"
                f" python -m firmware_tools rollout --channel {args.channel} --version {version.version}"
                " --stage canary:DEVICE --stage fleet:100% --key KEY",
                file=sys.stderr,
            )
        else:
            if failed := registry.failed_reports(args.channel, version.version):
                listed = "; ".join(f"{device}: {reason}" for device, reason in sorted(failed.items())[:5])
                print(
                    f"warning: {len(failed)} device(s) could not apply {version.version} before ({listed})",
                    file=sys.stderr,
                )
            stage = RolloutPlan(stages=(stage_plan,)).cumulative()[0]
            whole_fleet = stage.percent >= 100
            manifest = publisher.publish_manifest(version, EVERYONE if whole_fleet else stage)
            line |= {"stage": manifest.to_dict()["stage"], "key_id": manifest.key_id}
            if whole_fleet:
                # The operator asked for the whole fleet at once, with no rollout to watch it: what they chose live.
                registry.set_live_version(args.channel, version.version)
        print(json.dumps(line))
    return 0


def rollout(args: argparse.Namespace) -> int:
    """Roll a registered version out in stages; exit 1 if the abort criteria halted it."""
    from firmware_tools.release.fleet import FleetWatch
    from firmware_tools.release.registry import RolloutState
    from firmware_tools.release.rollout import AbortCriteria, RolloutPlan, RolloutRunner, StagePlan

    plan = RolloutPlan(
        stages=tuple(StagePlan.parse(text, index) for index, text in enumerate(args.stage)),
        criteria=AbortCriteria(args.max_failure_percent, args.min_reports),
        stage_timeout_s=args.stage_timeout_s,
        soak_s=args.soak_s,
        allow_unknown=args.allow_unknown,
    )
    with release_tools(args) as (registry, link, publisher):
        watch = FleetWatch(link)
        runner = RolloutRunner(publisher, registry, watch, args.version, plan, say=lambda text: print(text, flush=True))
        outcome = runner.run()
        if outcome.restored is not None:
            stuck = runner.wait_for_restore(outcome.restored, args.stage_timeout_s)
            print(
                f"restore: {'every device is off ' + args.version if not stuck else 'still on it: ' + ', '.join(stuck)}"
            )
        print(json.dumps(dataclasses.asdict(outcome) | {"state": str(outcome.state)}))
    return 0 if outcome.state == RolloutState.COMPLETED else 1


def status(args: argparse.Namespace) -> int:
    """Print each device's state, model and last update step, with the channel's latest rollout."""
    from firmware_tools.release.fleet import FleetWatch, format_table, not_an_operator, status_rows, statuses_hidden
    from firmware_tools.release.rollout import RolloutPlan, StagePlan

    with release_tools(args) as (registry, link, _publisher):
        watch = FleetWatch(link)
        watch.settle(quiet_s=args.quiet_s)
        # An empty fleet and one the ACL hides look alike from here; only the broker can tell them apart.
        hidden = not watch.seen() and statuses_hidden(link)
        rollout_record = registry.latest_rollout(args.channel)
        live = registry.live_version(args.channel)
        revoked = registry.revoked_devices()
    if hidden:
        print(f"error: received no device status: {not_an_operator(args.tls)}", file=sys.stderr)
        return 2
    stages = []
    if rollout_record is not None:
        plan = rollout_record.plan
        stages = RolloutPlan(stages=tuple(StagePlan(**stage) for stage in plan["stages"])).cumulative()
    statuses = watch.snapshot()
    if not args.all_channels:
        statuses = {device: status for device, status in statuses.items() if status.channel == args.channel}
    if args.device:
        statuses = {device: status for device, status in statuses.items() if fnmatch.fnmatch(device, args.device)}
    rows = status_rows(statuses, stages, revoked)
    if args.json:
        print(json.dumps({"channel": args.channel, "live_version": live, "devices": rows}))
        return 0
    print(f"channel {args.channel}: live version {live or '-'}")
    if rollout_record is not None:
        print(
            f"latest rollout {rollout_record.rollout_id}: {rollout_record.previous_version or '-'} ->"
            f" {rollout_record.version}, {rollout_record.state} at stage {rollout_record.stage_index + 1}"
            + (f": {rollout_record.reason}" if rollout_record.reason else "")
        )
    print(format_table(rows))
    return 0


def _keygen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", type=Path, default=Path("keys"), help="folder for the key files")
    parser.add_argument("--name", default="signing", help="file name stem (default: %(default)s)")


def _publish_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model package directory")
    add_release_arguments(parser, key=True)
    parser.add_argument("--notes", default="", help="release notes carried in the manifest (default: none)")
    parser.add_argument(
        "--min-device-version", default="0.1.0", help="oldest device software that can run it (default: %(default)s)"
    )
    parser.add_argument(
        "--stage",
        metavar="[NAME:]SPEC",
        help="offer it at once to these devices (dev-1,dev-2) or this share of the fleet (25%%, 100%% for all)",
    )
    parser.add_argument(
        "--allow-unknown", action="store_true", help="accept --stage devices that have never published a status"
    )
    parser.add_argument(
        "--hold",
        action="store_true",
        help="offer it to no device: what publish does without --stage (kept for scripts)",
    )


def _rollout_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", required=True, help="a version registered by publish")
    add_release_arguments(parser, key=True)
    parser.add_argument(
        "--stage",
        action="append",
        required=True,
        metavar="[NAME:]SPEC",
        help="a stage, in order: devices (canary:dev-1,dev-2) or a share of the fleet (early:25%%); repeat",
    )
    parser.add_argument(
        "--max-failure-percent", type=float, default=20.0, help="halt at this failure share (default: %(default)s)"
    )
    parser.add_argument(
        "--min-reports", type=int, default=3, help="...once this many devices reported (default: %(default)s)"
    )
    parser.add_argument(
        "--stage-timeout-s", type=float, default=600.0, help="halt if a stage waits longer (default: %(default)s)"
    )
    parser.add_argument(
        "--soak-s", type=float, default=0.0, help="watch a finished stage this long before the next (default: 0)"
    )
    parser.add_argument(
        "--allow-unknown",
        action="store_true",
        help="accept stages naming devices that have never published a status (default: refuse, a typo most often)",
    )


def _status_options(parser: argparse.ArgumentParser) -> None:
    add_release_arguments(parser, key=False)
    parser.add_argument("--device", help="only devices whose id matches this shell pattern")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--all-channels", action="store_true", help="every device, not only those following --channel")
    parser.add_argument("--quiet-s", type=float, default=0.5, help="statuses are all in after this long without one")


def register(commands: argparse._SubParsersAction) -> None:
    """Add keygen, publish, rollout and status."""
    add_subcommand(
        commands,
        "keygen",
        keygen,
        help="make the Ed25519 key pair that signs model manifests",
        description="Write NAME.key (private, mode 0600, never overwritten) and NAME.pub (for the devices' "
        "[ota] public_key) into --out-dir, and print the key id that manifests carry.",
        options=_keygen_options,
    )
    add_subcommand(
        commands,
        "publish",
        publish,
        help="register a model version and retain its blob; it goes to devices only through rollout or --stage",
        description="Register the package in --model (model.tflite + manifest.json) in the database and publish "
        "the model retained on models/<channel>/blobs/<version>. No device is offered it: roll it out with "
        "rollout, which watches the devices and halts on failures. --stage offers it at once to one stage "
        "(fleet:100%% for every device: the version is then recorded live), with a signed manifest retained on "
        "models/<channel>/manifest, and no watching.",
        options=_publish_options,
    )
    add_subcommand(
        commands,
        "rollout",
        rollout,
        help="roll a published version out in stages, halting and restoring the previous one on failures",
        description="Offer --version stage by stage. A stage is done when every online device of --channel "
        "in it has reported applied, rejected or rolled_back for the version. When at least --min-reports "
        "devices have reported and --max-failure-percent of them failed, or a stage times out, the rollout "
        "halts: the previous live version is re-published to everyone as a signed rollback, and the failed "
        "version's blob is cleared. On success, every blob but those of the new and the previous version is "
        "cleared. Exit 0 when completed, 1 when halted.",
        options=_rollout_options,
    )
    add_subcommand(
        commands,
        "status",
        status,
        help="print each device's state, model version and last update step",
        description="Read the retained status of every device following --channel from the broker and print one "
        "row per device: online "
        "or offline, the model it runs, its stage in the channel's latest rollout, and its last update step "
        "with the reason. Exit status 2 when the broker cannot be reached, or when its ACL hides the statuses from "
        "this client (a certificate that is not an operator's).",
        options=_status_options,
    )
