"""One round of fleet learning: curate, adapt, package, gate, roll out.

What the cloud answered today, the device decides tomorrow. A round

1. **curates** the consenting devices' utterances the worker kept, with the cloud's
   labels (firmware_tools/learning/fleet_data.py), after deleting what outlived its retention;
2. **adapts** the head of the model the channel runs (firmware_tools/learning/adapt.py);
3. **packages** it as the next version, with a model card that says what fleet data
   went in (counts per device and label, never audio);
4. **gates** it against the running model (firmware_tools/learning/gate.py): it stops there,
   with the reasons, unless every check passes, and nothing is published;
5. with ``auto_rollout``, **publishes it held and rolls it out** through the staged
   rollout and its abort criteria (firmware_tools/release/rollout.py). An aborted rollout
   restores the previous version, as any rollout does.

Every round is recorded in the registry (``learning_rounds``), and :func:`report`
prints and plots them. A per-site or per-device model is a round with
``curate.devices`` set and its own ``channel``: those devices' ``ota.channel``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.worker_database import WorkerDatabase
from device.local_model import load_local_model, shipped_model_directory
from device.speech_embedding import SpeechEmbedding
from firmware_tools.building.command_head import build_examples, clean_fsdd
from firmware_tools.building.phrases import model_labels
from firmware_tools.building.recipe import load_recipe
from firmware_tools.learning.adapt import (
    FLOAT_HEAD_FILE,
    AdaptSettings,
    describe,
    embed_fleet,
    fine_tune,
    float_head_of,
    load_float_head,
    package_adapted,
    rehearsal,
)
from firmware_tools.learning.fleet_data import CurateSettings, curate
from firmware_tools.learning.gate import Gate, GateReport, GateSettings, JudgedSet
from firmware_tools.release.fleet import FleetWatch
from firmware_tools.release.publish import Publisher
from firmware_tools.release.registry import ModelRegistry, RegistryError
from firmware_tools.release.rollout import RolloutPlan, RolloutRunner
from schemas.model import ModelPackage, parse_version
from schemas.vocabulary import load_vocabulary

log = logging.getLogger("mqvox.learn")


class LearnError(ValueError):
    """A round that cannot run; the message says what is missing."""


@dataclass(frozen=True)
class LearnSettings:
    """One channel's fleet learning."""

    channel: str = "stable"
    """The channel whose model is adapted and to which the candidate is offered."""
    recipe: str = "default"
    """Recipe of the channel's model (its head settings, augmenter and seed)."""
    work_dir: Path = Path(".cache/train/default")
    """The recipe's training work folder: the head's training windows, rehearsed in every round."""
    fsdd_dir: Path | None = None
    """The FSDD recordings: its speakers are a regression set, and the training windows are rebuilt from them
    when missing."""
    state_dir: Path = Path(".cache/learn/stable")
    """Where each round's package (and its float head, for the next round) is kept."""
    base_dir: Path | None = None
    """The package of the running model when the state folder has none of it (default: the shipped model)."""
    curate: CurateSettings = field(default_factory=CurateSettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    auto_rollout: bool = False
    """Publish a candidate that passed, held, and roll it out with ``rollout``; otherwise stop after packaging."""
    seed: int = 20261206
    """Seed of the augmentation and the fine-tuning."""


@dataclass(frozen=True)
class RoundOutcome:
    """What one round did."""

    round_id: int
    base_version: str
    version: str
    package_dir: Path
    gate: GateReport
    outcome: str
    """rejected, packaged, completed or aborted."""
    seconds: dict[str, float]
    data: dict

    def to_dict(self) -> dict:
        return {
            "round_id": self.round_id,
            "base_version": self.base_version,
            "version": self.version,
            "package": str(self.package_dir),
            "outcome": self.outcome,
            "gate": self.gate.to_dict(),
            "seconds": self.seconds,
            "data": self.data,
        }


def next_version(registry: ModelRegistry, settings: LearnSettings, base_version: str) -> str:
    """One patch above every version the channel or an earlier round has used."""
    used = [base_version, *(version.version for version in registry.versions(settings.channel))]
    used += [path.name for path in (settings.state_dir / "versions").glob("*.*.*")]
    major, minor, patch = max(parse_version(version) for version in used)
    return f"{major}.{minor}.{patch + 1}"


def base_package(registry: ModelRegistry, settings: LearnSettings) -> tuple[str, Path]:
    """(version, package folder) of the model the channel runs."""
    default_dir = settings.base_dir or shipped_model_directory()
    live = registry.live_version(settings.channel) or ModelPackage.load(default_dir).version
    for folder in (settings.state_dir / "versions" / live, default_dir):
        if (folder / "manifest.json").is_file() and ModelPackage.load(folder).version == live:
            if not ModelPackage.load(folder).detection.head_signature:
                raise LearnError(f"{live} in {folder} has no command head to adapt")
            return live, folder
    raise LearnError(
        f"channel {settings.channel!r} runs {live}, but neither {settings.state_dir / 'versions' / live} nor"
        f" {default_dir} holds its package (give the base package with --base DIR)"
    )


def run_round(
    settings: LearnSettings,
    store: WorkerDatabase,
    registry: ModelRegistry,
    *,
    roll_out: Callable[[Path, str], str] | None = None,
    say: Callable[[str], None] = print,
) -> RoundOutcome:
    """One round. ``roll_out(package_dir, version)`` publishes held and rolls out, returning the rollout's
    state (``completed``, ``partial`` or ``aborted``); it is called only for a candidate that passed, and only with
    ``settings.auto_rollout``."""
    from firmware_tools.building.train import configure_tensorflow

    if settings.fsdd_dir is None:
        raise LearnError("the FSDD recordings are a regression set and part of the rehearsal: give --fsdd DIR")
    recipe = load_recipe(settings.recipe)
    vocabulary = load_vocabulary()
    labels = model_labels(vocabulary)
    configure_tensorflow(recipe.train.threads, settings.seed)
    seconds: dict[str, float] = {}
    started = time.monotonic()

    def lap(stage: str) -> None:
        nonlocal started
        seconds[stage] = round(time.monotonic() - started, 1)
        started = time.monotonic()
        say(f"{stage}: {seconds[stage]} s")

    purged = store.purge_expired_contributions()
    dataset = curate(store.contributions(list(settings.curate.devices) or None), vocabulary, settings.curate)
    training, held_out = dataset.split(False), dataset.split(True)
    say(
        f"curated {len(training)} training and {len(held_out)} held-out utterances from"
        f" {len(dataset.counts())} device(s); left out: {dict(dataset.left_out) or 'none'}"
    )
    if not training:
        raise LearnError("no fleet utterances to learn from: no consenting device has sent any the cloud was sure of")
    lap("curate")

    base_version, base_dir = base_package(registry, settings)
    version = next_version(registry, settings, base_version)
    embedding = SpeechEmbedding(num_threads=recipe.train.threads)
    examples = build_examples(recipe, vocabulary, settings.work_dir, settings.fsdd_dir, recipe.head)
    fleet = embed_fleet(training, labels, recipe.head, settings.adapt.fleet_copies, settings.seed, embedding)
    old = rehearsal(examples, settings.adapt, settings.seed)
    kept = base_dir / FLOAT_HEAD_FILE
    start = load_float_head(kept) if kept.exists() else float_head_of(base_dir, recipe.head)
    model = fine_tune(start, fleet, old, len(labels), settings.adapt, settings.seed)
    lap("train")

    data = {
        "contributions_purged": purged,
        "per_device": dataset.counts(),
        "left_out": dict(dataset.left_out),
        "training_utterances": len(training),
        "held_out_utterances": len(held_out),
        "rehearsal_windows": len(old.labels),
        "fleet_windows": len(fleet.labels),
    }
    fleet_record = {
        "data": data,
        "adapt": describe(settings.adapt),
        "min_cloud_confidence": settings.curate.min_confidence,
    }
    out_dir = settings.state_dir / "versions" / version
    shutil.rmtree(out_dir, ignore_errors=True)
    package_adapted(base_dir, model, old, out_dir, version, recipe, fleet_record, settings.seed)
    lap("package")

    gate = Gate(settings.gate, vocabulary, settings.state_dir, fsdd_set(settings, vocabulary, labels), embedding)
    held_windows = JudgedSet(
        np.stack([embedding(example.window) for example in held_out]).astype(np.float32)
        if held_out
        else np.zeros((0, 16, 96), np.float32),
        [example.label for example in held_out],
    )
    report = gate.judge(load_local_model(base_dir), load_local_model(out_dir), held_windows)
    lap("gate")
    for reason in report.reasons:
        say(f"gate: {reason}")
    outcome = "packaged" if report.passed else "rejected"
    record = {"data": data, "gate": report.to_dict(), "seconds": seconds, "settings": _settings_record(settings)}
    round_id = registry.record_round(settings.channel, base_version, version, report.passed, outcome, record)
    if report.passed and settings.auto_rollout and roll_out is not None:
        outcome = roll_out(out_dir, version)
        lap("rollout")
        registry.set_round_outcome(round_id, outcome, record | {"seconds": seconds})
    elif report.passed:
        say(f"{version} passed the gate; publish it with: python -m firmware_tools publish --model {out_dir}")
    else:
        say(f"{version} stopped by the gate: nothing published, the channel keeps {base_version}")
    return RoundOutcome(round_id, base_version, version, out_dir, report, outcome, seconds, data)


def fsdd_set(settings: LearnSettings, vocabulary, labels: tuple[str, ...]) -> JudgedSet:
    """The FSDD regression set: each clip as recorded, of the speakers the gate names (default: all but those
    kept out of the rehearsal)."""
    clean = clean_fsdd(vocabulary, settings.fsdd_dir, settings.work_dir)
    speakers = {group.split(":", 1)[1] for group in clean.groups}
    wanted = set(settings.gate.fsdd_speakers) or speakers - set(settings.adapt.exclude_fsdd_speakers)
    rows = np.flatnonzero(np.isin(clean.groups, [f"fsdd:{speaker}" for speaker in sorted(wanted)]))
    return JudgedSet(clean.embeddings[rows], [labels[index] for index in clean.labels[rows]])


def _settings_record(settings: LearnSettings) -> dict:
    return json.loads(json.dumps(asdict(settings), default=str))


def publish_and_roll_out(
    publisher: Publisher, registry: ModelRegistry, watch: FleetWatch, plan: RolloutPlan, say: Callable[[str], None]
) -> Callable[[Path, str], str]:
    """What ``run_round`` calls for a candidate that passed: register it, retain its blob with no manifest (held),
    then the staged rollout with its abort criteria; returns the rollout's final state."""

    def roll_out(package_dir: Path, version: str) -> str:
        registered = publisher.register(package_dir, notes="fleet learning round: adapted to the fleet's voices")
        publisher.publish_blob(registered)
        say(f"published {version} held; rolling out")
        runner = RolloutRunner(publisher, registry, watch, version, plan, say=say)
        outcome = runner.run()
        if outcome.restored is not None:
            stuck = runner.wait_for_restore(outcome.restored, plan.stage_timeout_s)
            say(f"restored {outcome.restored}" + (f"; still on {version}: {', '.join(stuck)}" if stuck else ""))
        return str(outcome.state)

    return roll_out


def report(registry: ModelRegistry, channel: str, out_dir: Path) -> dict:
    """Every round of ``channel``: a table on stdout, and PNG plots of the fleet held-out figures and the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = registry.rounds(channel)
    if not rounds:
        raise RegistryError(f"no learning round is recorded on channel {channel!r}")
    rows = []
    for number, row in enumerate(rounds, start=1):
        fleet = row.record["gate"]["figures"].get("fleet_held_out", {})
        rows.append(
            {
                "round": number,
                "version": row.version,
                "base": row.base_version,
                "outcome": row.outcome,
                "held_out_windows": fleet.get("new", {}).get("windows"),
                "decided_base": fleet.get("base", {}).get("decided"),
                "decided_new": fleet.get("new", {}).get("decided"),
                "precision_base": fleet.get("base", {}).get("precision"),
                "precision_new": fleet.get("new", {}).get("precision"),
                "training_utterances": row.record["data"]["training_utterances"],
                "seconds": sum(row.record["seconds"].values()),
            }
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, (quality, data) = plt.subplots(1, 2, figsize=(12, 4.5))
    numbers = [row["round"] for row in rows]
    for key, style in (("decided", "o-"), ("precision", "s--")):
        quality.plot(numbers, [row[f"{key}_base"] for row in rows], style, color="grey", label=f"{key}, base")
        quality.plot(numbers, [row[f"{key}_new"] for row in rows], style, label=f"{key}, candidate")
    quality.set(xlabel="round", ylabel="share", title="Fleet held-out slice (cloud labels)", ylim=(0, 1.02))
    quality.set_xticks(numbers)
    quality.legend(loc="lower right")
    devices = sorted({device for row in rounds for device in row.record["data"]["per_device"]})
    bottom = np.zeros(len(rounds))
    for device in devices:
        counts = np.array(
            [sum(row.record["data"]["per_device"].get(device, {}).get("train", {}).values()) for row in rounds]
        )
        data.bar(numbers, counts, bottom=bottom, label=device)
        bottom += counts
    data.set(xlabel="round", ylabel="training utterances", title="Where the fleet data came from")
    data.set_xticks(numbers)
    data.legend(fontsize="small")
    figure.tight_layout()
    plot = out_dir / f"learning-{channel}.png"
    figure.savefig(plot, dpi=110)
    plt.close(figure)
    return {"channel": channel, "rounds": rows, "plot": str(plot)}
