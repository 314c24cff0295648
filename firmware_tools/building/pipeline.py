"""The training pipeline's stages in order, each runnable on its own against a work directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI lists the stages without loading what runs them
    from firmware_tools.building.recipe import Recipe
    from schemas.vocabulary import Vocabulary

log = logging.getLogger("mqvox.pipeline")

DEFAULT_WORK_ROOT = Path(".cache/train")
"""Where rendered clips, windows, features and checkpoints are cached (never committed)."""


@dataclass(frozen=True)
class StageContext:
    """What every stage needs."""

    recipe: Recipe
    """The recipe being built."""
    vocabulary: Vocabulary
    """What the model listens for."""
    work_dir: Path
    """Cache of this recipe's intermediate results."""
    out_dir: Path
    """Where the package stage writes the model."""
    fsdd_dir: Path | None = None
    """FSDD's recordings (a data directory), real speech for the command head."""
    always_on: Path | None = None
    """An int8 always-on network to package instead of the one the train stage made (None: that one)."""


def _synth(context: StageContext) -> None:
    from firmware_tools.building.synth import run_synth

    run_synth(context.recipe, context.vocabulary, context.work_dir)


def _augment(context: StageContext) -> None:
    from firmware_tools.building.augment import run_augment

    run_augment(context.recipe, context.vocabulary, context.work_dir)


def _features(context: StageContext) -> None:
    from firmware_tools.building.features import run_features

    run_features(context.recipe, context.work_dir)


def _train(context: StageContext) -> None:
    from firmware_tools.building.train import run_train

    run_train(context.recipe, context.work_dir)


def _quantize(context: StageContext) -> None:
    from firmware_tools.building.quantize import run_quantize

    run_quantize(context.recipe, context.work_dir)


def _head(context: StageContext) -> None:
    from firmware_tools.building.command_head import run_head

    assert context.fsdd_dir is not None, "the CLI asks for --fsdd before the head stage"
    run_head(context.recipe, context.vocabulary, context.work_dir, context.fsdd_dir)


def _package(context: StageContext) -> None:
    from firmware_tools.building.package import run_package

    run_package(context.recipe, context.work_dir, context.out_dir, always_on=context.always_on)


STAGES: dict[str, Callable[[StageContext], None]] = {
    "synth": _synth,
    "augment": _augment,
    "features": _features,
    "train": _train,
    "quantize": _quantize,
    "head": _head,
    "package": _package,
}
"""Every stage, in pipeline order; each reads what the previous one wrote in the work directory."""


def run_stages(context: StageContext, names: list[str]) -> dict[str, float]:
    """Run the named stages in pipeline order; returns seconds per stage."""
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s): {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    seconds = {}
    for name in [stage for stage in STAGES if stage in names]:
        started = time.monotonic()
        log.info("stage %s: %s -> %s", name, context.recipe.name, context.work_dir)
        STAGES[name](context)
        seconds[name] = round(time.monotonic() - started, 1)
        log.info("stage %s done in %.1f s", name, seconds[name])
    return seconds
