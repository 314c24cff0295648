"""python -m firmware_tools: build, sign and roll out device models."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from common.locations import Role, default_database_url, state_folder
from common.mqtt import PublishRefused
from schemas.errors import ProtocolError
from schemas.vocabulary import load_vocabulary


def vocab(args: argparse.Namespace) -> int:
    """Print what a device model is trained to recognise, from the vocabulary file."""
    vocabulary = load_vocabulary(args.vocabulary)
    if args.json:
        print(
            json.dumps(
                {
                    "wake_phrase": vocabulary.wake_phrase,
                    "commands": [
                        {"label": c.label, "intent": c.intent, "slots": dict(c.slots), "phrases": list(c.phrases)}
                        for c in vocabulary.commands
                    ],
                }
            )
        )
        return 0
    print(f"wake phrase: {vocabulary.wake_phrase}")
    width = max(len(label) for label in vocabulary.labels)
    for command in vocabulary.commands:
        print(f"{command.label:<{width}}  {' | '.join(command.phrases)}")
    return 0


def stages(args: argparse.Namespace) -> int:
    """Run training stages of a recipe (all of them by default), printing seconds per stage as JSON."""
    from firmware_tools.building.pipeline import DEFAULT_WORK_ROOT, STAGES, StageContext, run_stages
    from firmware_tools.building.recipe import load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    recipe = load_recipe(args.recipe)
    context = StageContext(
        recipe=recipe,
        vocabulary=load_vocabulary(args.vocabulary),
        work_dir=(args.work_dir or DEFAULT_WORK_ROOT / recipe.name).resolve(),
        out_dir=(args.out or Path(f"device/models/{recipe.name}")).resolve(),
        fsdd_dir=args.fsdd.resolve() if args.fsdd is not None else None,
        always_on=args.always_on.resolve() if getattr(args, "always_on", None) is not None else None,
    )
    names = args.stages or list(STAGES)
    if "head" in names and context.fsdd_dir is None:
        raise ValueError("the head stage trains on real speech: give the FSDD recordings with --fsdd DIR")
    print(json.dumps({"recipe": recipe.name, "seconds": run_stages(context, names)}))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a packaged model, and the peers, on the held-out sets; print the headline figures as JSON."""
    from firmware_tools.building.evaluate import evaluate as run_evaluation
    from firmware_tools.building.heldout import HeldOutSettings
    from firmware_tools.building.peers import load_peers
    from firmware_tools.building.pipeline import DEFAULT_WORK_ROOT
    from firmware_tools.building.recipe import load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    settings = HeldOutSettings(negative_minutes=args.negative_minutes, max_phrases=args.max_phrases)
    float_model = args.float_model or DEFAULT_WORK_ROOT / args.model.name / "quantize" / "model_float.tflite"
    report = run_evaluation(
        args.model,
        load_vocabulary(args.vocabulary),
        settings,
        cache_root=args.cache,
        float_model=float_model,
        peers=None if args.no_peers else load_peers(),
        recipe=load_recipe(args.recipe),
    )
    headline = (
        "wake_recall_at_0p5_fa_per_hour",
        "wake_recall_at_1_fa_per_hour",
        "command_top1",
        "local_precision",
        "local_coverage",
        "cpu_ms_per_audio_s",
        "peers",
    )
    print(json.dumps({key: report[key] for key in headline}))
    return 0


def keygen(args: argparse.Namespace) -> int:
    """Make the fleet's model-signing key pair; the public half is provisioned on every device."""
    from schemas.signing import generate_key_pair

    private, public = args.out_dir / f"{args.name}.key", args.out_dir / f"{args.name}.pub"
    key = generate_key_pair(private, public)
    print(json.dumps({"key_id": key, "private_key": str(private), "public_key": str(public)}))
    return 0


@contextlib.contextmanager
def _release_tools(args: argparse.Namespace) -> Iterator[tuple]:
    """The registry, the broker link and the publisher that publish, rollout and status share."""
    from cloud_worker.storage import StorageSettings
    from common.mqtt import MqttLink, broker_from_arguments
    from firmware_tools.release.publish import Publisher
    from firmware_tools.release.registry import ModelRegistry
    from schemas.signing import load_private_key

    private_key = load_private_key(args.key) if getattr(args, "key", None) else None
    with (
        ModelRegistry(StorageSettings(url=args.database)) as registry,
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
    with _release_tools(args) as (registry, link, publisher):
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
    with _release_tools(args) as (registry, link, publisher):
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

    with _release_tools(args) as (registry, link, _publisher):
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


def contributions(args: argparse.Namespace) -> int:
    """List the training contributions the worker keeps, per device; with --delete, delete one device's."""
    from cloud_worker.storage import StorageSettings, Store

    if args.delete and args.device is None:
        raise ValueError("--delete needs --device ID: it deletes one device's contributions, never everyone's")
    with Store(StorageSettings(url=args.database)) as store:
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


LEARN_STAGES = ("canary:10%", "fleet:100%")
"""The rollout stages of ``learn --auto-rollout`` without --stage."""


def learn(args: argparse.Namespace) -> int:
    """One fleet learning round (curate, adapt, package, gate, roll out), or --report of every round."""
    from cloud_worker.storage import StorageSettings, Store
    from firmware_tools.learning.adapt import AdaptSettings
    from firmware_tools.learning.fleet_data import CurateSettings
    from firmware_tools.learning.gate import GateSettings
    from firmware_tools.learning.learn import LearnSettings, publish_and_roll_out, report, run_round
    from firmware_tools.release.registry import ModelRegistry

    if args.report:
        with ModelRegistry(StorageSettings(url=args.database)) as registry:
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
    with Store(StorageSettings(url=args.database, training_retention_days=args.training_retention_days)) as store:
        if not args.auto_rollout:
            with ModelRegistry(StorageSettings(url=args.database)) as registry:
                outcome = run_round(settings, store, registry, say=lambda text: print(text, flush=True))
        else:
            from firmware_tools.release.fleet import FleetWatch
            from firmware_tools.release.rollout import AbortCriteria, RolloutPlan, StagePlan

            plan = RolloutPlan(
                stages=tuple(StagePlan.parse(text, index) for index, text in enumerate(args.stage or LEARN_STAGES)),
                criteria=AbortCriteria(args.max_failure_percent, args.min_reports),
                stage_timeout_s=args.stage_timeout_s,
            )
            with _release_tools(args) as (registry, link, publisher):
                say = lambda text: print(text, flush=True)  # noqa: E731
                roll_out = publish_and_roll_out(publisher, registry, FleetWatch(link), plan, say)
                outcome = run_round(settings, store, registry, roll_out=roll_out, say=say)
    print(json.dumps(outcome.to_dict()))
    return 0 if outcome.outcome in ("packaged", "completed") else 1


def provision(args: argparse.Namespace) -> int:
    """Create or update the fleet folder: CA, client certificates, ACL, CRL, device configs."""
    from broker_config.acl import Role
    from firmware_tools.onboarding.provision import Fleet, ProvisionSettings, parse_clients

    settings = ProvisionSettings(
        broker_names=tuple(args.broker_host) if args.broker_host else None,
        broker_port=args.broker_port,
        client_days=args.days,
        ca_days=args.ca_days,
        crl_days=args.crl_days,
    )
    clients = [client for role in Role for client in parse_clients(role, getattr(args, role.value))]
    fleet = Fleet(args.fleet_dir, settings)
    outcome = fleet.provision(
        clients,
        reissue=args.reissue or [],
        revoke=args.revoke or [],
        channel=args.channel,
        signing_key=args.signing_key,
    )
    if args.revoke:
        from cloud_worker.storage import StorageSettings
        from firmware_tools.release.registry import ModelRegistry

        # Its retained status may say "online" for ever: the ACL now refuses its offline status and Last Will.
        with ModelRegistry(StorageSettings(url=args.database)) as registry:
            for name in args.revoke:
                registry.revoke_device(name)
    print(json.dumps(dataclasses.asdict(outcome)))
    return 0


def bundle(args: argparse.Namespace) -> int:
    """Write one provisioned device's bundle."""
    import tempfile

    from firmware_tools.onboarding.bundle import build_wheel, write_bundle
    from firmware_tools.onboarding.provision import Fleet

    fleet = Fleet.open(args.fleet_dir)
    with tempfile.TemporaryDirectory(prefix="mqvox-wheel-") as scratch:
        wheel = args.wheel or build_wheel(Path(scratch))
        extra = sorted(args.wheels.glob("*.whl")) if args.wheels else []
        info = write_bundle(fleet, args.device, args.out, model_dir=args.model, wheel=wheel, extra_wheels=extra)
    print(json.dumps({"bundle": str(args.out)} | dataclasses.asdict(info)))
    return 0


def flash(args: argparse.Namespace) -> int:
    """Install a bundle into a mounted root filesystem and enable its unit."""
    from firmware_tools.onboarding.bundle import OpenedBundle
    from firmware_tools.onboarding.flash import flash as flash_bundle

    with OpenedBundle(args.bundle) as folder:
        outcome = flash_bundle(folder, args.rootfs)
    print(json.dumps(dataclasses.asdict(outcome)))
    return 0


def _add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database",
        default=default_database_url(),
        help="SQLAlchemy URL of the registry, the worker's database (default: the worker's, %(default)s)",
    )


def _add_release_arguments(parser: argparse.ArgumentParser, *, key: bool) -> None:
    from common.mqtt import add_broker_arguments

    parser.add_argument("--channel", default="stable", help="release channel (default: %(default)s)")
    _add_database_argument(parser)
    add_broker_arguments(parser)
    if key:
        parser.add_argument("--key", type=Path, required=True, help="Ed25519 private key PEM (from keygen)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firmware_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    vocabulary = commands.add_parser(
        "vocab",
        help="show the wake phrase, command labels and phrases of a vocabulary",
        description="Load and check a vocabulary file (default: the one shipped in schemas/) and list the "
        "command labels a model is trained on, with every phrase of each.",
    )
    vocabulary.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
    vocabulary.add_argument("--json", action="store_true", help="print one JSON document")
    vocabulary.set_defaults(run=vocab)
    from firmware_tools.building.pipeline import STAGES

    for name, help_text in (
        ("synth", "render every phrase with every training engine and voice, and multiply speakers"),
        ("augment", "compose labelled model-sized windows from the clips and corrupt them"),
        ("features", "compute the front end's features of every window, with SpecAugment"),
        ("train", "fit the network"),
        ("quantize", "convert to full-int8 TFLite with a representative dataset"),
        ("head", "train the command head and wake verifier on the speech embedding, real and synthetic speech"),
        ("package", "tune thresholds on validation and write model, manifest and training report"),
        ("train-all", "run every stage above in order (what make train does)"),
    ):
        stage = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        stage.add_argument("--recipe", default="default", help="recipe name or TOML file (default: default)")
        stage.add_argument("--work-dir", type=Path, help="cache of intermediate results (default: .cache/train/NAME)")
        stage.add_argument("--out", type=Path, help="package directory (default: device/models/NAME)")
        stage.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
        stage.add_argument(
            "--fsdd", type=Path, help="FSDD recordings, real digits the head trains on (needed by head and train-all)"
        )
        if name in ("package", "train-all"):
            stage.add_argument(
                "--always-on",
                type=Path,
                help="an int8 always-on .tflite (single network) to package instead of the one trained in this run",
            )
        stage.set_defaults(run=stages, stages=None if name == "train-all" else [name])
    assert set(STAGES) <= set(commands.choices)
    evaluation = commands.add_parser(
        "evaluate",
        help="measure a packaged model and the peer wake word models on held-out voices, speech and noise",
        description="Render (once, then cached) the held-out sets: the vocabulary said by voices never trained on, "
        "in noise at 10 and 5 dB SNR, and a long negative stream of read speech and noise. Measure wake recall at "
        "0.5 and 1 false accepts per hour, command top-1 per class, local-decision precision and coverage, and CPU; "
        "run microWakeWord and openWakeWord on the same audio. Writes evaluation.json, confusion_matrix.png and "
        "det_curve.png into the model directory.",
    )
    evaluation.add_argument("--model", type=Path, default=Path("device/models/default"), help="package directory")
    evaluation.add_argument("--recipe", default="default", help="recipe that built the model (for the model card)")
    evaluation.add_argument("--negative-minutes", type=float, default=40.0, help="length of the negative stream")
    evaluation.add_argument("--max-phrases", type=int, default=0, help="only this many command phrases (0: all)")
    evaluation.add_argument("--no-peers", action="store_true", help="skip microWakeWord and openWakeWord")
    evaluation.add_argument("--float-model", type=Path, help="float .tflite to compare int8 accuracy against")
    evaluation.add_argument("--cache", type=Path, default=Path(".cache/heldout"), help="held-out audio cache")
    evaluation.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
    evaluation.set_defaults(run=evaluate)

    keys = commands.add_parser(
        "keygen",
        help="make the Ed25519 key pair that signs model manifests",
        description="Write NAME.key (private, mode 0600, never overwritten) and NAME.pub (for the devices' "
        "[ota] public_key) into --out-dir, and print the key id that manifests carry.",
    )
    keys.add_argument("--out-dir", type=Path, default=Path("keys"), help="folder for the key files")
    keys.add_argument("--name", default="signing", help="file name stem (default: %(default)s)")
    keys.set_defaults(run=keygen)

    publisher = commands.add_parser(
        "publish",
        help="register a model version and retain its blob; it goes to devices only through rollout or --stage",
        description="Register the package in --model (model.tflite + manifest.json) in the database and publish "
        "the model retained on models/<channel>/blobs/<version>. No device is offered it: roll it out with "
        "rollout, which watches the devices and halts on failures. --stage offers it at once to one stage "
        "(fleet:100%% for every device: the version is then recorded live), with a signed manifest retained on "
        "models/<channel>/manifest, and no watching.",
    )
    publisher.add_argument("--model", type=Path, required=True, help="model package directory")
    _add_release_arguments(publisher, key=True)
    publisher.add_argument("--notes", default="", help="release notes carried in the manifest (default: none)")
    publisher.add_argument(
        "--min-device-version", default="0.1.0", help="oldest device software that can run it (default: %(default)s)"
    )
    publisher.add_argument(
        "--stage",
        metavar="[NAME:]SPEC",
        help="offer it at once to these devices (dev-1,dev-2) or this share of the fleet (25%%, 100%% for all)",
    )
    publisher.add_argument(
        "--allow-unknown", action="store_true", help="accept --stage devices that have never published a status"
    )
    publisher.add_argument(
        "--hold",
        action="store_true",
        help="offer it to no device: what publish does without --stage (kept for scripts)",
    )
    publisher.set_defaults(run=publish)

    roller = commands.add_parser(
        "rollout",
        help="roll a published version out in stages, halting and restoring the previous one on failures",
        description="Offer --version stage by stage. A stage is done when every online device of --channel "
        "in it has reported applied, rejected or rolled_back for the version. When at least --min-reports "
        "devices have reported and --max-failure-percent of them failed, or a stage times out, the rollout "
        "halts: the previous live version is re-published to everyone as a signed rollback, and the failed "
        "version's blob is cleared. On success, every blob but those of the new and the previous version is "
        "cleared. Exit 0 when completed, 1 when halted.",
    )
    roller.add_argument("--version", required=True, help="a version registered by publish")
    _add_release_arguments(roller, key=True)
    roller.add_argument(
        "--stage",
        action="append",
        required=True,
        metavar="[NAME:]SPEC",
        help="a stage, in order: devices (canary:dev-1,dev-2) or a share of the fleet (early:25%%); repeat",
    )
    roller.add_argument(
        "--max-failure-percent", type=float, default=20.0, help="halt at this failure share (default: %(default)s)"
    )
    roller.add_argument(
        "--min-reports", type=int, default=3, help="...once this many devices reported (default: %(default)s)"
    )
    roller.add_argument(
        "--stage-timeout-s", type=float, default=600.0, help="halt if a stage waits longer (default: %(default)s)"
    )
    roller.add_argument(
        "--soak-s", type=float, default=0.0, help="watch a finished stage this long before the next (default: 0)"
    )
    roller.add_argument(
        "--allow-unknown",
        action="store_true",
        help="accept stages naming devices that have never published a status (default: refuse, a typo most often)",
    )
    roller.set_defaults(run=rollout)

    watcher = commands.add_parser(
        "status",
        help="print each device's state, model version and last update step",
        description="Read the retained status of every device following --channel from the broker and print one "
        "row per device: online "
        "or offline, the model it runs, its stage in the channel's latest rollout, and its last update step "
        "with the reason. Exit status 2 when the broker cannot be reached, or when its ACL hides the statuses from "
        "this client (a certificate that is not an operator's).",
    )
    _add_release_arguments(watcher, key=False)
    watcher.add_argument("--device", help="only devices whose id matches this shell pattern")
    watcher.add_argument("--json", action="store_true", help="print one JSON document")
    watcher.add_argument("--all-channels", action="store_true", help="every device, not only those following --channel")
    watcher.add_argument("--quiet-s", type=float, default=0.5, help="statuses are all in after this long without one")
    watcher.set_defaults(run=status)

    from cloud_worker.storage import StorageSettings

    contributor = commands.add_parser(
        "contributions",
        help="list the utterances devices shared for training, or delete one device's",
        description="Read the training contributions the cloud worker keeps (utterances of devices whose "
        "cloud.share_for_training is true, with the cloud's answers, for the worker's --training-retention-days) "
        "and print one JSON line per device: device_id, count, oldest_received_at, newest_received_at (Unix "
        "seconds). With --device, that device's line, then one line per contribution: utterance_id, received_at, "
        "model_version, intent, slots, confidence, transcript and audio_bytes (never the audio). --device ID "
        "--delete deletes that device's contributions, audio and all (its owner withdrew consent), and prints how "
        "many.",
    )
    contributor.add_argument("--device", metavar="ID", help="one device id: its contributions one by one")
    contributor.add_argument("--delete", action="store_true", help="delete the --device's contributions")
    contributor.add_argument(
        "--database",
        metavar="URL",
        default=default_database_url(),
        help="SQLAlchemy URL of the worker's database (default: the worker's, %(default)s)",
    )
    contributor.set_defaults(run=contributions)

    from firmware_tools.learning.fleet_data import CurateSettings

    learner = commands.add_parser(
        "learn",
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
    )
    _add_release_arguments(learner, key=False)
    learner.add_argument("--key", type=Path, help="Ed25519 private key PEM (from keygen), for --auto-rollout")
    learner.add_argument("--report", action="store_true", help="print and plot every round of --channel")
    learner.add_argument(
        "--out", type=Path, default=Path("."), help="folder of the --report plot (default: %(default)s)"
    )
    learner.add_argument("--fsdd", type=Path, help="the FSDD recordings (a regression set and rehearsal data)")
    learner.add_argument("--recipe", default="default", help="recipe of the channel's model (default: %(default)s)")
    learner.add_argument("--work-dir", type=Path, help="the recipe's training folder (default: .cache/train/RECIPE)")
    learner.add_argument(
        "--state-dir",
        type=Path,
        help=f"where round packages are kept (default: {state_folder(Role.WORKER) / 'learn'}/CHANNEL)",
    )
    learner.add_argument("--base", type=Path, help="package of the running model (default: the shipped one)")
    learner.add_argument("--devices", help="comma-separated devices to learn from (a per-site model); default all")
    learner.add_argument(
        "--min-confidence",
        type=float,
        default=CurateSettings.min_confidence,
        help="cloud answers less sure than this are left out (default: %(default)s, the device's act floor)",
    )
    learner.add_argument(
        "--max-per-device-label",
        type=int,
        default=CurateSettings.max_per_device_label,
        help="most training utterances of one label from one device (default: %(default)s)",
    )
    learner.add_argument(
        "--held-out-share",
        type=float,
        default=CurateSettings.held_out_share,
        help="share of each device's utterances kept to judge, never trained on (default: %(default)s)",
    )
    learner.add_argument("--epochs", type=int, default=4, help="fine-tuning passes (default: %(default)s)")
    learner.add_argument(
        "--false-wake-every", type=int, default=1, help="every n-th false-wake recording (default: %(default)s)"
    )
    learner.add_argument(
        "--training-retention-days",
        type=float,
        default=StorageSettings.training_retention_days,
        help="contributions older than this are deleted before curating: the worker's setting (default: %(default)s)",
    )
    learner.add_argument("--auto-rollout", action="store_true", help="publish held and roll out if it passes")
    learner.add_argument(
        "--stage",
        action="append",
        default=None,
        metavar="[NAME:]SPEC",
        help="rollout stage; repeat (default: " + " then ".join(LEARN_STAGES).replace("%", "%%") + ")",
    )
    learner.add_argument(
        "--max-failure-percent", type=float, default=20.0, help="rollout abort criterion (default: %(default)s)"
    )
    learner.add_argument("--min-reports", type=int, default=1, help="rollout abort criterion (default: %(default)s)")
    learner.add_argument(
        "--stage-timeout-s", type=float, default=600.0, help="rollout stage timeout (default: %(default)s)"
    )
    learner.set_defaults(run=learn)

    from firmware_tools.onboarding.provision import DEFAULT_BROKER_NAMES, TLS_PORT, ProvisionSettings

    provisioner = commands.add_parser(
        "provision",
        help="create the fleet CA, client certificates, the broker's ACL and CRL, and device configs",
        description="Create or update a fleet folder. The first run creates the CA and the broker's certificate. "
        "Each --device, --worker, --operator and --consumer gets a key and a certificate whose CN is its name; "
        "one already provisioned keeps them and has its other files refreshed. A device's folder "
        "(clients/<id>/) also gets device.toml, which connects with TLS, and the model-signing public key: it "
        "is the device's /etc/mqvox. --reissue gives a client a new key and certificate and revokes the old "
        "one; --revoke revokes a client's certificate and removes it from the ACL. The ACL and the CRL in "
        "broker/ are rewritten on every run: copy broker/ to the broker and send it SIGHUP.",
    )
    provisioner.add_argument("--fleet-dir", type=Path, required=True, help="the fleet folder (created if missing)")
    for role, what in (
        ("device", "a device id"),
        ("worker", "a cloud worker"),
        ("operator", "an operator (firmware_tools publish, rollout, status)"),
        ("consumer", "an application that reads results"),
    ):
        provisioner.add_argument(f"--{role}", action="append", metavar="NAME", help=f"provision {what}; repeat")
    provisioner.add_argument("--reissue", action="append", metavar="NAME", help="new key and certificate; repeat")
    provisioner.add_argument(
        "--revoke",
        action="append",
        metavar="NAME",
        help="revoke and remove, and record it in --database so that rollouts and status leave it out; repeat",
    )
    _add_database_argument(provisioner)
    provisioner.add_argument("--signing-key", type=Path, help="model-signing public key (keygen's .pub), kept")
    provisioner.add_argument("--channel", default="stable", help="model channel of the devices named (default: stable)")
    provisioner.add_argument(
        "--broker-host",
        action="append",
        help="a DNS name or IP address of the broker, for its certificate; devices connect to the first; repeat "
        f"(default: the folder's, or {', '.join(DEFAULT_BROKER_NAMES)} for a new one)",
    )
    provisioner.add_argument("--broker-port", type=int, help=f"port devices connect to (default: {TLS_PORT})")
    provisioner.add_argument("--days", type=int, default=ProvisionSettings.client_days, help="certificate validity")
    provisioner.add_argument("--ca-days", type=int, default=ProvisionSettings.ca_days, help="CA validity, at creation")
    provisioner.add_argument("--crl-days", type=int, default=ProvisionSettings.crl_days, help="CRL next update")
    provisioner.set_defaults(run=provision)

    bundler = commands.add_parser(
        "bundle",
        help="build one device's bundle: wheels, model, config, certificates, systemd unit, install script",
        description="Write the bundle of a device provisioned in --fleet-dir to --out (a folder, or a .tar.gz). "
        "The mqvox wheel is built from this source tree unless --wheel is given; wheels in --wheels (for "
        "example aarch64 dependency wheels from `pip download`) are added, so a device can install offline.",
    )
    bundler.add_argument("--fleet-dir", type=Path, required=True, help="the fleet folder of provision")
    bundler.add_argument("--device", required=True, help="a provisioned device id")
    bundler.add_argument("--out", type=Path, required=True, help="bundle folder, or a file ending in .tar.gz")
    bundler.add_argument("--model", type=Path, default=Path(__file__).resolve().parent.parent / "device/models/default")
    bundler.add_argument("--wheel", type=Path, help="a built mqvox wheel (default: build one from this source tree)")
    bundler.add_argument("--wheels", type=Path, help="folder of dependency wheels to ship too")
    bundler.set_defaults(run=bundle)

    flasher = commands.add_parser(
        "flash",
        help="install a bundle into a mounted root filesystem and enable its systemd unit",
        description="Write the bundle into --rootfs (for example a mounted Raspberry Pi OS SD card): /opt/mqvox, "
        "/etc/mqvox (the private key owned by the mqvox user, mode 0400), the unit in /etc/systemd/system, "
        "enabled through a multi-user.target.wants symlink. Adds the mqvox system user to the image if needed. "
        "Runs nothing inside the image; needs root.",
    )
    flasher.add_argument("--bundle", type=Path, required=True, help="bundle folder or .tar.gz")
    flasher.add_argument("--rootfs", type=Path, required=True, help="the mounted root filesystem")
    flasher.set_defaults(run=flash)
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (| head) is then caught below
        return code
    except BrokenPipeError:
        # The reader has all it wanted; say nothing more, and let the exit's flush find nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ProtocolError, OSError, ValueError, ConnectionError, PublishRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
