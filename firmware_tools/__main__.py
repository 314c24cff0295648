"""python -m firmware_tools: build, sign and roll out device models."""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ProtocolError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
