"""The model-building subcommands: vocab, each training stage and train-all, evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from firmware_tools.cli_common import add_subcommand

STAGE_HELP = (
    ("synth", "render every phrase with every training engine and voice, and multiply speakers"),
    ("augment", "compose labelled model-sized windows from the clips and corrupt them"),
    ("features", "compute the front end's features of every window, with SpecAugment"),
    ("train", "fit the network"),
    ("quantize", "convert to full-int8 TFLite with a representative dataset"),
    ("head", "train the command head and wake verifier on the speech embedding, real and synthetic speech"),
    ("package", "tune thresholds on validation and write model, manifest and training report"),
    ("train-all", "run every stage above in order (what make train does)"),
)
"""Each stage's subcommand with its help, in pipeline order, then the one that runs them all."""


def vocab(args: argparse.Namespace) -> int:
    """Print what a device model is trained to recognise, from the vocabulary file."""
    from schemas.vocabulary import load_vocabulary

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
    from schemas.vocabulary import load_vocabulary

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
    from firmware_tools.building.evaluate import FALSE_ACCEPT_RATES, recall_key
    from firmware_tools.building.evaluate import evaluate as run_evaluation
    from firmware_tools.building.heldout import HeldOutSettings
    from firmware_tools.building.peers import load_peers
    from firmware_tools.building.pipeline import DEFAULT_WORK_ROOT
    from firmware_tools.building.recipe import load_recipe
    from schemas.vocabulary import load_vocabulary

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
        *(f"wake_{recall_key(rate)}" for rate in FALSE_ACCEPT_RATES),
        "command_top1",
        "local_precision",
        "local_coverage",
        "cpu_ms_per_audio_s",
        "peers",
    )
    print(json.dumps({key: report[key] for key in headline}))
    return 0


def _vocab_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _stage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="default", help="recipe name or TOML file (default: default)")
    parser.add_argument("--work-dir", type=Path, help="cache of intermediate results (default: .cache/train/NAME)")
    parser.add_argument("--out", type=Path, help="package directory (default: device/models/NAME)")
    parser.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
    parser.add_argument(
        "--fsdd", type=Path, help="FSDD recordings, real digits the head trains on (needed by head and train-all)"
    )


def _packaging_stage_options(parser: argparse.ArgumentParser) -> None:
    _stage_options(parser)
    parser.add_argument(
        "--always-on",
        type=Path,
        help="an int8 always-on .tflite (single network) to package instead of the one trained in this run",
    )


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=Path("device/models/default"), help="package directory")
    parser.add_argument("--recipe", default="default", help="recipe that built the model (for the model card)")
    parser.add_argument("--negative-minutes", type=float, default=40.0, help="length of the negative stream")
    parser.add_argument("--max-phrases", type=int, default=0, help="only this many command phrases (0: all)")
    parser.add_argument("--no-peers", action="store_true", help="skip microWakeWord and openWakeWord")
    parser.add_argument("--float-model", type=Path, help="float .tflite to compare int8 accuracy against")
    parser.add_argument("--cache", type=Path, default=Path(".cache/heldout"), help="held-out audio cache")
    parser.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")


def register(commands: argparse._SubParsersAction) -> None:
    """Add vocab, a subcommand per training stage, train-all and evaluate."""
    from firmware_tools.building.pipeline import STAGES

    add_subcommand(
        commands,
        "vocab",
        vocab,
        help="show the wake phrase, command labels and phrases of a vocabulary",
        description="Load and check a vocabulary file (default: the one shipped in schemas/) and list the "
        "command labels a model is trained on, with every phrase of each.",
        options=_vocab_options,
    )
    for name, help_text in STAGE_HELP:
        add_subcommand(
            commands,
            name,
            stages,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            options=_packaging_stage_options if name in ("package", "train-all") else _stage_options,
            stages=None if name == "train-all" else [name],
        )
    assert set(STAGES) <= set(commands.choices)
    add_subcommand(
        commands,
        "evaluate",
        evaluate,
        help="measure a packaged model and the peer wake word models on held-out voices, speech and noise",
        description="Render (once, then cached) the held-out sets: the vocabulary said by voices never trained on, "
        "in noise at 10 and 5 dB SNR, and a long negative stream of read speech and noise. Measure wake recall at "
        "0.5 and 1 false accepts per hour, command top-1 per class, local-decision precision and coverage, and CPU; "
        "run microWakeWord and openWakeWord on the same audio. Writes evaluation.json, confusion_matrix.png and "
        "det_curve.png into the model directory.",
        options=_evaluate_options,
    )
