"""Calibrated confidence: from phrase scores (cloud_worker/asr.py) to the probability of each answer.

Whisper's scores are log-likelihoods: each command's phrases, and "something else".
They become probabilities by a softmax with two fitted numbers:

    P(command c) ∝ exp(score_c / temperature)
    P(nothing in the vocabulary) ∝ exp((other + other_bias) / temperature)

``temperature`` widens or sharpens the distribution; ``other_bias`` weighs "something
else" against the phrases, whose scores are exact paths while "something else" is only
estimated. Both are fitted by maximum likelihood on real speech: commands said by real
speakers (FSDD digits) and real words and phrases outside the vocabulary. A calibration
fitted on some speakers is evaluated on others (bench/cloud.py rotates the folds); the
shipped one (calibration.json beside this module) was fitted on all of them.

Among answers of confidence p, about a share p is right: that is what "calibrated" means
here, and bench/cloud.py measures how near it holds on speakers the fit never saw.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import numpy as np

from cloud_worker.transcript import PhraseScores

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
"""The calibration the worker uses by default."""
OTHER = "_other_"
"""The label of "nothing in the vocabulary" among a posterior's keys and a sample's truth."""


@dataclass(frozen=True)
class Calibration:
    """The two fitted numbers, what they were fitted on, and the device floor they imply."""

    temperature: float
    """Divides every score before the softmax; above 1 the probabilities are flatter."""
    other_bias: float
    """Added to the score of "something else" (natural log)."""
    answer_floor: float = 0.5
    """The worker names an intent only when its probability is at least this: more likely right than not."""
    act_floor: float = 0.99
    """Least confidence at which acted-on cloud answers were right at least 99.5 % of the time on held-out real
    speakers (bench/cloud.py): the default for a device's ``cloud.min_confidence``."""
    fitted_on: str = ""
    """What the fit saw, in words (data sets, speakers, counts)."""

    def __post_init__(self) -> None:
        if not 0.05 <= self.temperature <= 20:
            raise ValueError(f"temperature must be between 0.05 and 20, not {self.temperature}")
        if not math.isfinite(self.other_bias) or abs(self.other_bias) > 50:
            raise ValueError(f"other_bias must be finite and within ±50, not {self.other_bias}")
        for name in ("answer_floor", "act_floor"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")

    def posterior(self, scores: PhraseScores) -> dict[str, float]:
        """The probability of each scored command (by label) and of ``OTHER``; they sum to 1."""
        labels = [*scores.commands, OTHER]
        logits = np.array([*scores.commands.values(), scores.other + self.other_bias], dtype=np.float64)
        logits /= self.temperature
        if not np.isfinite(logits).any():
            return {OTHER: 1.0}
        logits -= logits[np.isfinite(logits)].max()
        weights = np.where(np.isfinite(logits), np.exp(logits), 0.0)
        return dict(zip(labels, (weights / weights.sum()).tolist(), strict=True))

    @classmethod
    def load(cls, path: str | Path | None = None) -> Self:
        """A calibration from its JSON file (default: the shipped one); ValueError naming the file if it is bad."""
        where = Path(path) if path is not None else CALIBRATION_FILE
        try:
            data = json.loads(where.read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as error:  # ValueError: bad JSON, or a number out of range
            raise ValueError(f"cannot read the calibration {where}: {error}") from error

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class Sample:
    """One recording's phrase scores and the truth: a command label, or ``OTHER``."""

    scores: PhraseScores
    truth: str


def negative_log_likelihood(samples: Sequence[Sample], temperature: float, other_bias: float) -> float:
    """Mean -log P(truth) under a calibration; a truth that was not even scored counts as P = 1e-6."""
    calibration = Calibration(temperature, other_bias)
    total = 0.0
    for sample in samples:
        probability = calibration.posterior(sample.scores).get(sample.truth, 0.0)
        total -= math.log(max(probability, 1e-6))
    return total / max(len(samples), 1)


def fit(samples: Sequence[Sample], *, fitted_on: str = "") -> Calibration:
    """The temperature and bias of least negative log-likelihood, by a coarse then a fine grid search.

    Positives and negatives are weighted equally as groups, so that the bias does not follow whichever is more
    numerous in the data at hand.
    """
    positives = [sample for sample in samples if sample.truth != OTHER]
    negatives = [sample for sample in samples if sample.truth == OTHER]
    if not positives:
        raise ValueError("a calibration needs recordings of commands")

    def loss(temperature: float, bias: float) -> float:
        value = negative_log_likelihood(positives, temperature, bias)
        if negatives:
            value = (value + negative_log_likelihood(negatives, temperature, bias)) / 2
        return value

    best = min(((t, b) for t in np.geomspace(0.25, 4.0, 9) for b in np.linspace(-8, 8, 17)), key=lambda tb: loss(*tb))
    temperatures = np.geomspace(best[0] / 1.4, best[0] * 1.4, 7)
    biases = np.linspace(best[1] - 1.0, best[1] + 1.0, 9)
    temperature, bias = min(((t, b) for t in temperatures for b in biases), key=lambda tb: loss(*tb))
    return Calibration(round(float(temperature), 4), round(float(bias), 4), fitted_on=fitted_on)


def act_floor(predictions: Sequence[tuple[float, bool]], precision: float = 0.995) -> float | None:
    """The least confidence at which answers at or above it are right at least ``precision`` of the time.

    ``predictions`` are (confidence, right) of the answers that named an intent, on held-out data; None when no
    floor reaches that precision.
    """
    ordered = sorted(predictions, key=lambda pair: -pair[0])
    right = 0
    floor = None
    for count, (confidence, correct) in enumerate(ordered, 1):
        right += correct
        if right / count >= precision and (count == len(ordered) or ordered[count][0] < confidence):
            floor = confidence
    return floor


def reliability(predictions: Sequence[tuple[float, bool]], bins: int = 10) -> list[Mapping[str, float]]:
    """Answers binned by confidence: each bin's count, mean confidence and share right (a reliability table)."""
    table = []
    edges = np.linspace(0.0, 1.0, bins + 1)
    for low, high in itertools.pairwise(edges):
        inside = [(c, r) for c, r in predictions if low <= c < high or (high == 1.0 and c == 1.0)]
        if inside:
            table.append(
                {
                    "from": round(float(low), 2),
                    "to": round(float(high), 2),
                    "count": len(inside),
                    "mean_confidence": round(float(np.mean([c for c, _ in inside])), 4),
                    "right": round(float(np.mean([r for _, r in inside])), 4),
                }
            )
    return table
