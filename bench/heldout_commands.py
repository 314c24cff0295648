"""How a packaged model classifies the held-out command clips: per voice, open-set and closed-set.

- open set: the best of all classes is the command said (what evaluate's command_top1 counts);
- closed set: the best among the command classes only is the command said, which tells a
  confusion between commands from a command taken for ``_unknown_``.

Each clip is scored clean and at 10 dB SNR (the evaluation's noise). Prints one JSON object.
Run: .venv/bin/python bench/heldout_commands.py [--model device/models/default]
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from device.features import batch_features
from device.inference import TfliteClassifier
from firmware_tools.building.evaluate import command_windows
from firmware_tools.building.heldout import HeldOutSettings, load_or_build
from schemas.model import ModelPackage
from schemas.vocabulary import load_vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("device/models/default"))
    parser.add_argument("--cache", type=Path, default=Path(".cache/heldout"))
    args = parser.parse_args()
    package = ModelPackage.load(args.model)
    model = TfliteClassifier(package.model_path(args.model))
    settings = HeldOutSettings()
    heldout = load_or_build(settings, load_vocabulary(), args.cache)
    labels = list(package.labels)
    commands = [i for i, label in enumerate(labels) if label not in ("_silence_", "_unknown_", "wake")]
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    taken_for = collections.Counter()
    for index, (label, clip) in enumerate(heldout.commands):
        voice = settings.voices[index % len(settings.voices)]
        name = f"{voice.engine}:{voice.voice} speed {voice.speed} pitch {voice.pitch}"
        for condition, snr in (("clean", 200.0), ("10db", 10.0)):
            window = command_windows(package, [clip], snr, rng, heldout.babble)[0]
            scores = model(batch_features(package.frontend, window)[: package.frontend.frames])
            best = labels[int(np.argmax(scores))]
            best_command = labels[commands[int(np.argmax(scores[commands]))]]
            results[name][f"open_{condition}"].append(best == label)
            results[name][f"closed_{condition}"].append(best_command == label)
            if condition == "10db" and best != label:
                taken_for[best] += 1
    per_voice = {name: {k: round(float(np.mean(v)), 4) for k, v in r.items()} for name, r in results.items()}
    overall = {
        key: round(float(np.mean([x for r in results.values() for x in r[key]])), 4)
        for key in ("open_clean", "closed_clean", "open_10db", "closed_10db")
    }
    print(
        json.dumps(
            {
                "model": str(args.model),
                "clips": len(heldout.commands),
                "overall": overall,
                "per_voice": per_voice,
                "errors_at_10db_taken_for": dict(taken_for.most_common(6)),
            }
        )
    )


if __name__ == "__main__":
    main()
