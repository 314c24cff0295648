"""The Free Spoken Digit Dataset: real recordings of the ten digits, read from a data directory.

FSDD (CC BY-SA 4.0) holds 6 speakers x 10 digits x 50 takes as
``{digit}_{speaker}_{take}.flac`` (or .wav), recorded at 8 kHz. mqvox never ships or
requires it: training and benches take its directory as an option. A model trained
on it is an adaptation of it, so its model card carries the licence.

Every figure measured on FSDD is on speakers the model did not train on: folds leave
whole speakers out (:func:`speaker_folds`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.recording import read_recording

LICENCE = "CC BY-SA 4.0"
"""FSDD's licence; a model trained on it is shared alike."""
_NAME = re.compile(r"(?P<digit>[0-9])_(?P<speaker>[a-z]+)_(?P<take>[0-9]+)\.(flac|wav)")


@dataclass(frozen=True)
class FsddClip:
    """One recording: who said which digit, and where it is."""

    path: Path
    digit: int
    speaker: str
    take: int

    def read(self, sample_rate: int = 16000) -> np.ndarray:
        """Mono float32 samples at ``sample_rate``."""
        return read_recording(self.path, sample_rate)


def fsdd_clips(directory: str | Path, takes: int = 50) -> list[FsddClip]:
    """The clips of the first ``takes`` takes, in take order (so a shorter run spans every speaker).

    Raises FileNotFoundError when the directory holds none.
    """
    directory = Path(directory)
    found = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        name = _NAME.fullmatch(path.name)
        if name is not None and int(name["take"]) < takes:
            found.append(FsddClip(path, int(name["digit"]), name["speaker"], int(name["take"])))
    if not found:
        raise FileNotFoundError(f"no FSDD clips ({{digit}}_{{speaker}}_{{take}}.flac) in {directory}")
    return sorted(found, key=lambda clip: (clip.take, clip.path.name))


def speaker_folds(speakers: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """Leave-one-speaker-out folds: each fold is the speakers held out, every speaker exactly once."""
    return [(speaker,) for speaker in sorted(set(speakers))]
