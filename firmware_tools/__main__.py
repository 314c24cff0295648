"""python -m firmware_tools: build, sign and roll out device models."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

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
    from firmware_tools.pipeline import DEFAULT_WORK_ROOT, STAGES, StageContext, run_stages
    from firmware_tools.recipe import load_recipe

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    recipe = load_recipe(args.recipe)
    context = StageContext(
        recipe=recipe,
        vocabulary=load_vocabulary(args.vocabulary),
        work_dir=(args.work_dir or DEFAULT_WORK_ROOT / recipe.name).resolve(),
        out_dir=(args.out or Path(f"device/models/{recipe.name}")).resolve(),
    )
    names = args.stages or list(STAGES)
    print(json.dumps({"recipe": recipe.name, "seconds": run_stages(context, names)}))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Evaluate a packaged model, and the peers, on the held-out sets; print the headline figures as JSON."""
    from firmware_tools.evaluate import evaluate as run_evaluation
    from firmware_tools.heldout import HeldOutSettings
    from firmware_tools.peers import load_peers
    from firmware_tools.pipeline import DEFAULT_WORK_ROOT
    from firmware_tools.recipe import load_recipe

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
    from firmware_tools.pipeline import STAGES

    for name, help_text in (
        ("synth", "render every phrase with every training engine and voice, and multiply speakers"),
        ("augment", "compose labelled model-sized windows from the clips and corrupt them"),
        ("features", "compute the front end's features of every window, with SpecAugment"),
        ("train", "fit the network"),
        ("quantize", "convert to full-int8 TFLite with a representative dataset"),
        ("package", "tune thresholds on validation and write model, manifest and training report"),
        ("train-all", "run every stage above in order (what make train does)"),
    ):
        stage = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        stage.add_argument("--recipe", default="default", help="recipe name or TOML file (default: default)")
        stage.add_argument("--work-dir", type=Path, help="cache of intermediate results (default: .cache/train/NAME)")
        stage.add_argument("--out", type=Path, help="package directory (default: device/models/NAME)")
        stage.add_argument("--vocabulary", type=Path, help="vocabulary TOML (default: schemas/vocabulary.toml)")
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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ProtocolError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
