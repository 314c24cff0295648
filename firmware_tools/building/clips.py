"""A bank of rendered clips: int16 samples end to end in one .npy, and one JSON record per clip."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ClipRecord:
    """Where a clip came from and where its samples are."""

    text: str
    """What is said."""
    label: str
    """Class of the clip alone (a vocabulary label, 'wake' or '_unknown_')."""
    engine: str
    """Speech engine."""
    voice: str
    """Engine voice."""
    speed: float
    """Speaking rate asked of the engine."""
    pitch: float
    """Pitch asked of the engine."""
    f0_factor: float
    """WORLD pitch factor applied afterwards (1.0: none)."""
    formant_factor: float
    """WORLD vocal-tract factor applied afterwards (1.0: none)."""
    split: str
    """'train' or 'validation'."""
    start: int = 0
    """First sample in the bank."""
    length: int = 0
    """Samples."""


class ClipBank:
    """Read access to a bank written by :func:`write_bank`."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.samples = np.load(directory / "clips.npy", mmap_mode="r")
        self.records = tuple(ClipRecord(**r) for r in json.loads((directory / "clips.json").read_text()))

    def audio(self, index: int) -> np.ndarray:
        """Clip ``index`` as float32 in [-1, 1]."""
        record = self.records[index]
        return self.samples[record.start : record.start + record.length].astype(np.float32) / 32767.0

    def select(self, *, split: str, labels: Sequence[str] | None = None) -> list[int]:
        """Indices of clips in ``split``, optionally only of ``labels``."""
        wanted = None if labels is None else set(labels)
        return [i for i, r in enumerate(self.records) if r.split == split and (wanted is None or r.label in wanted)]


def write_bank(directory: str | Path, clips: Iterator[tuple[ClipRecord, np.ndarray]]) -> int:
    """Write clips (record, float audio) as a bank; returns how many."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    records, pieces, position = [], [], 0
    for record, audio in clips:
        pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
        records.append(asdict(record) | {"start": position, "length": len(pcm)})
        pieces.append(pcm)
        position += len(pcm)
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.int16)
    np.save(directory / "clips.npy", samples)
    (directory / "clips.json").write_text(json.dumps(records))
    return len(records)
