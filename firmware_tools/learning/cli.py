"""The fleet learning subcommands: contributions, learn."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from common.locations import Role, default_database_url, state_folder
from firmware_tools.cli_common import add_release_arguments, add_subcommand

LEARN_STAGES = ("canary:10%", "fleet:100%")
"""The rollout stages of ``learn --auto-rollout`` without --stage."""


def contributions(args: argparse.Namespace) -> int:
    """List the training contributions the worker keeps, per device; with --delete, delete one device's."""
    from common.worker_database import WorkerDatabase, WorkerDatabaseSettings

    if args.delete and args.device is None:
        raise ValueError("--delete needs --device ID: it deletes one device's contributions, never everyone's")
    with WorkerDatabase(WorkerDatabaseSettings(url=args.database)) as store:
        if args.delete:
            print(json.dumps({"device_id": args.device, "deleted": store.delete_contributions(args.device)}))
            return 0
        for summary in store.contribution_summaries():
            if args.device is None or summary.device_id == args.device:
                print(json.dumps(dataclasses.asdict(summary)))
        if args.device is not None:
            for contribution in store.contributions([args.device]):
                line = {
                    "utterance_id": contribution.utterance_id,
                    "received_at": contribution.received_at,
                    "model_version": contribution.model_version,
                    "intent": contribution.intent,
                    "slots": contribution.slots,
                    "confidence": contribution.confidence,
                    "transcript": contribution.transcript,
                    "audio_bytes": len(contribution.audio),
                }
                print(json.dumps(line))
    return 0


def learn(args: argparse.Namespace) -> int:
    """One fleet learning round (curate, adapt, package, gate, roll out), or --report of every round."""
    from common.database import DatabaseSettings
    from common.worker_database import WorkerDatabase, WorkerDatabaseSettings
    from firmware_tools.learning.adapt import AdaptSettings
    from firmware_tools.learning.fleet_data import CurateSettings
    from firmware_tools.learning.gate import GateSettings
    from firmware_tools.learning.learn import LearnSettings, publish_and_roll_out, report, run_round
    from firmware_tools.release.registry import ModelRegistry

    if args.report:
        with ModelRegistry(DatabaseSettings(url=args.database)) as registry:
            summary = report(registry, args.channel, args.out)
        for row in summary["rounds"]:
            print(json.dumps(row))
        print(f"plot: {summary['plot']}")
        return 0
    if args.auto_rollout and args.key is None:
        raise ValueError("--auto-rollout publishes and rolls out: give the signing key with --key")
    settings = LearnSettings(
        channel=args.channel,
        recipe=args.recipe,
        work_dir=args.work_dir or Path(".cache/train") / Path(args.recipe).stem,
        fsdd_dir=args.fsdd,
        state_dir=args.state_dir or state_folder(Role.WORKER) / "learn" / args.channel,
        base_dir=args.base,
        curate=CurateSettings(
            min_confidence=args.min_confidence,
            max_per_device_label=args.max_per_device_label,
            held_out_share=args.held_out_share,
            devices=tuple(device for device in (args.devices or "").split(",") if device),
        ),
        adapt=AdaptSettings(epochs=args.epochs),
        gate=GateSettings(false_wake_every=args.false_wake_every),
        auto_rollout=args.auto_rollout,
    )
    with WorkerDatabase(
        WorkerDatabaseSettings(url=args.database, training_retention_days=args.training_retention_days)
    ) as store:
        if not args.auto_rollout:
            with ModelRegistry(DatabaseSettings(url=args.database)) as registry:
                outcome = run_round(settings, store, registry, say=lambda text: print(text, flush=True))
        else:
            from firmware_tools.release.cli import release_tools
            from firmware_tools.release.fleet import FleetWatch
            from firmware_tools.release.rollout import AbortCriteria, RolloutPlan, StagePlan

            plan = RolloutPlan(
                stages=tuple(StagePlan.parse(text, index) for index, text in enumerate(args.stage or LEARN_STAGES)),
                criteria=AbortCriteria(args.max_failure_percent, args.min_reports),
                stage_timeout_s=args.stage_timeout_s,
            )
            with release_tools(args) as (registry, link, publisher):
                say = lambda text: print(text, flush=True)  # noqa: E731
                roll_out = publish_and_roll_out(publisher, registry, FleetWatch(link), plan, say)
                outcome = run_round(settings, store, registry, roll_out=roll_out, say=say)
    print(json.dumps(outcome.to_dict()))
    return 0 if outcome.outcome in ("packaged", "completed") else 1


def _contributions_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", metavar="ID", help="one device id: its contributions one by one")
    parser.add_argument("--delete", action="store_true", help="delete the --device's contributions")
    parser.add_argument(
        "--database",
        metavar="URL",
        default=default_database_url(),
        help="SQLAlchemy URL of the worker's database (default: the worker's, %(default)s)",
    )


def _learn_options(parser: argparse.ArgumentParser) -> None:
    # The curation and retention defaults are the settings' own; their modules load numpy and SQLAlchemy, so
    # they are read here, when learn parses, never when the subcommands are listed.
    from common.worker_database import WorkerDatabaseSettings
    from firmware_tools.learning.fleet_data import CurateSettings

    add_release_arguments(parser, key=False)
    parser.add_argument("--key", type=Path, help="Ed25519 private key PEM (from keygen), for --auto-rollout")
    parser.add_argument("--report", action="store_true", help="print and plot every round of --channel")
    parser.add_argument(
        "--out", type=Path, default=Path("."), help="folder of the --report plot (default: %(default)s)"
    )
    parser.add_argument("--fsdd", type=Path, help="the FSDD recordings (a regression set and rehearsal data)")
    parser.add_argument("--recipe", default="default", help="recipe of the channel's model (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, help="the recipe's training folder (default: .cache/train/RECIPE)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        help=f"where round packages are kept (default: {state_folder(Role.WORKER) / 'learn'}/CHANNEL)",
    )
    parser.add_argument("--base", type=Path, help="package of the running model (default: the shipped one)")
    parser.add_argument("--devices", help="comma-separated devices to learn from (a per-site model); default all")
    parser.add_argument(
        "--min-confidence",
        type=float,
        default=CurateSettings.min_confidence,
        help="cloud answers less sure than this are left out (default: %(default)s, the device's act floor)",
    )
    parser.add_argument(
        "--max-per-device-label",
        type=int,
        default=CurateSettings.max_per_device_label,
        help="most training utterances of one label from one device (default: %(default)s)",
    )
    parser.add_argument(
        "--held-out-share",
        type=float,
        default=CurateSettings.held_out_share,
        help="share of each device's utterances kept to judge, never trained on (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning passes (default: %(default)s)")
    parser.add_argument(
        "--false-wake-every", type=int, default=1, help="every n-th false-wake recording (default: %(default)s)"
    )
    parser.add_argument(
        "--training-retention-days",
        type=float,
        default=WorkerDatabaseSettings.training_retention_days,
        help="contributions older than this are deleted before curating: the worker's setting (default: %(default)s)",
    )
    parser.add_argument("--auto-rollout", action="store_true", help="publish held and roll out if it passes")
    parser.add_argument(
        "--stage",
        action="append",
        default=None,
        metavar="[NAME:]SPEC",
        help="rollout stage; repeat (default: " + " then ".join(LEARN_STAGES).replace("%", "%%") + ")",
    )
    parser.add_argument(
        "--max-failure-percent", type=float, default=20.0, help="rollout abort criterion (default: %(default)s)"
    )
    parser.add_argument("--min-reports", type=int, default=1, help="rollout abort criterion (default: %(default)s)")
    parser.add_argument(
        "--stage-timeout-s", type=float, default=600.0, help="rollout stage timeout (default: %(default)s)"
    )


def register(commands: argparse._SubParsersAction) -> None:
    """Add contributions and learn."""
    add_subcommand(
        commands,
        "contributions",
        contributions,
        help="list the utterances devices shared for training, or delete one device's",
        description="Read the training contributions the cloud worker keeps (utterances of devices whose "
        "cloud.share_for_training is true, with the cloud's answers, for the worker's --training-retention-days) "
        "and print one JSON line per device: device_id, count, oldest_received_at, newest_received_at (Unix "
        "seconds). With --device, that device's line, then one line per contribution: utterance_id, received_at, "
        "model_version, intent, slots, confidence, transcript and audio_bytes (never the audio). --device ID "
        "--delete deletes that device's contributions, audio and all (its owner withdrew consent), and prints how "
        "many.",
        options=_contributions_options,
    )
    add_subcommand(
        commands,
        "learn",
        learn,
        help="one fleet learning round: curate the fleet's shared utterances, adapt the head, gate, roll out",
        description="Build a dataset from the utterances consenting devices shared (cloud labels at "
        "--min-confidence or above, at most --max-per-device-label per device and label, a held-out slice per "
        "device), fine-tune the command head of the model --channel runs on it together with its original "
        "training windows, package it as the next version with a model card of the fleet data, and gate it: "
        "better than the running model on the fleet's held-out slice at 99.5%% precision, no regression on FSDD, "
        "the held-out synthetic voices or false wakes on real speech, and the self-test. A candidate that fails "
        "is never published (exit 1). One that passes is published held and rolled out with --auto-rollout "
        "(exit 1 if the rollout halts); without it the publish command is printed. --report prints every round "
        "and writes a PNG of coverage, precision and data per round.",
        options=_learn_options,
    )
