"""The augment stage: rendered clips become labelled, corrupted model-sized windows.

A window is what the model sees at once (``frontend.frames`` frames). Each is composed
from clips of one split, to teach one lesson:

- ``wake``: the wake phrase ending just before the window ends, sometimes after other speech;
- a command: the command alone, anywhere in the window;
- ``_unknown_``: other words and sentences, a command inside other speech, the wake phrase
  or a command cut short, and speech that follows the wake phrase;
- ``_silence_``: nothing but noise.

Then :class:`~firmware_tools.building.corruptions.Augmenter` corrupts it. Windows are written as int16
(``<work>/augment``); the features stage (``features.py``) reads them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.features import window_samples
from firmware_tools.building.clips import ClipBank
from firmware_tools.building.corruptions import Augmenter
from firmware_tools.building.phrases import CONTEXT_WORDS, SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL, model_labels
from firmware_tools.building.recipe import Recipe
from schemas.vocabulary import Vocabulary

log = logging.getLogger("mqvox.augment")

SAMPLE_RATE = 16000
"""Rate (hertz) of every window."""
CHUNK = 500
"""Windows per task, here and in the features stage; each chunk has its own seed, so results do not depend on
scheduling."""
SPLITS = ("train", "validation")
"""The two sets of windows (``<split>_audio.npy`` and ``<split>_labels.npy``)."""


@dataclass(frozen=True)
class ClipPools:
    """Clip indices of one split, grouped by what they can be used for."""

    wake: tuple[int, ...]
    """The wake phrase."""
    commands: dict[str, tuple[int, ...]]
    """Each command label's clips."""
    multiword_commands: tuple[int, ...]
    """Commands of more than one word (cut short, they are no longer commands)."""
    negatives: tuple[int, ...]
    """Everything else that was said."""
    neighbours: tuple[int, ...]
    """Short negatives, put next to a phrase as context."""
    all_commands: tuple[int, ...] = ()
    """Every command clip, all labels together."""
    after_wake: tuple[int, ...] = ()
    """What may follow the wake phrase in a wake window: negatives, then multi-word commands."""
    after_wake_later: tuple[int, ...] = ()
    """What may be under way well after the wake phrase: negatives, then every command."""


def clip_pools(bank: ClipBank, vocabulary: Vocabulary, split: str) -> ClipPools:
    """Group the clips of ``split``."""
    records = bank.records
    indices = bank.select(split=split)
    commands = {label: tuple(i for i in indices if records[i].label == label) for label in vocabulary.labels}
    missing = [label for label, found in commands.items() if not found]
    if missing or not any(records[i].label == WAKE_LABEL for i in indices):
        raise ValueError(f"the {split} clips miss classes: {missing or [WAKE_LABEL]}; render more")
    negatives = tuple(i for i in indices if records[i].label == UNKNOWN_LABEL)
    short = set(CONTEXT_WORDS)
    multiword = tuple(i for label in commands for i in commands[label] if " " in records[i].text)
    all_commands = tuple(i for label in commands for i in commands[label])
    return ClipPools(
        wake=tuple(i for i in indices if records[i].label == WAKE_LABEL),
        commands=commands,
        multiword_commands=multiword,
        negatives=negatives,
        neighbours=tuple(i for i in negatives if records[i].text in short or records[i].length < 0.6 * SAMPLE_RATE),
        all_commands=all_commands,
        after_wake=negatives + multiword,
        after_wake_later=negatives + all_commands,
    )


class WindowComposer:
    """Builds one labelled, augmented window at a time from a split's clips."""

    def __init__(self, recipe: Recipe, bank: ClipBank, pools: ClipPools, labels: Sequence[str], seed: int) -> None:
        self.recipe = recipe
        self.bank = bank
        self.pools = pools
        self.labels = tuple(labels)
        self.length = window_samples(recipe.frontend)
        self.rng = np.random.default_rng(seed)
        settings = recipe.dataset
        commands = [label for label in self.labels if label not in (SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL)]
        rest = 1.0 - settings.wake_share - settings.unknown_share - settings.silence_share
        self.class_weights = np.array(
            [settings.silence_share, settings.unknown_share, settings.wake_share]
            + [rest / len(commands)] * len(commands)
        )
        babble = [bank.audio(i) for i in self.rng.choice(pools.negatives, size=min(64, len(pools.negatives)))]
        self.augmenter = Augmenter(settings.augment, self.rng, babble_sources=babble)

    def compose(self) -> tuple[np.ndarray, int]:
        """One window (float32) and its class index."""
        label = int(self.rng.choice(len(self.labels), p=self.class_weights / self.class_weights.sum()))
        name = self.labels[label]
        if name == SILENCE_LABEL:
            canvas = np.zeros(self.length, np.float32)
        elif name == WAKE_LABEL:
            canvas = self._wake()
        elif name == UNKNOWN_LABEL:
            canvas = self._unknown()
        else:
            canvas = self._alone(self._pick(self.pools.commands[name]))
        return self.augmenter(canvas), label

    def _pick(self, pool: Sequence[int]) -> np.ndarray:
        return self.bank.audio(int(pool[self.rng.integers(len(pool))]))

    def _seconds(self, bounds: tuple[float, float]) -> int:
        return round(self.rng.uniform(*bounds) * SAMPLE_RATE)

    def _alone(self, clip: np.ndarray) -> np.ndarray:
        """The clip anywhere in the window; a clip longer than the window is cropped at random."""
        canvas = np.zeros(self.length, np.float32)
        if len(clip) >= self.length:
            start = self.rng.integers(len(clip) - self.length + 1)
            return clip[start : start + self.length].copy()
        offset = self.rng.integers(self.length - len(clip) + 1)
        canvas[offset : offset + len(clip)] = clip
        return canvas

    def _ending_at(self, clip: np.ndarray, end: int, canvas: np.ndarray) -> int:
        """Place ``clip`` so it ends at sample ``end``; returns where it starts (may be before the window)."""
        start = end - len(clip)
        place(clip, start, canvas)
        return start

    def _starting_at(self, clip: np.ndarray, start: int, canvas: np.ndarray) -> None:
        place(clip, start, canvas)

    def _wake(self) -> np.ndarray:
        canvas = np.zeros(self.length, np.float32)
        wake = self._pick(self.pools.wake)[: self.length]
        end = self.length - self._seconds(self.recipe.dataset.wake_tail_s)
        start = self._ending_at(wake, end, canvas)
        if self.rng.random() < self.recipe.dataset.context_probability and start > 0:
            self._ending_at(self._pick(self.pools.negatives), start - self._seconds((0.05, 0.3)), canvas)
        if self.rng.random() < 0.5:
            following = self._pick(self.pools.after_wake)
            self._starting_at(following, end + self._seconds((0.05, 0.2)), canvas)
        return canvas

    def _unknown(self) -> np.ndarray:
        kinds, weights = zip(*self.recipe.dataset.unknown_kinds, strict=True)
        kind = kinds[self.rng.choice(len(kinds), p=np.array(weights) / sum(weights))]
        if kind == "other_speech":
            return self._alone(self._pick(self.pools.negatives))
        if kind == "command_cut_short":
            command = self._pick(self.pools.multiword_commands)
            return self._alone(command[: round(len(command) * self.rng.uniform(0.35, 0.65))])
        canvas = np.zeros(self.length, np.float32)
        if kind == "wake_cut_short":
            wake = self._pick(self.pools.wake)
            cut = wake[: round(len(wake) * self.rng.uniform(0.3, 0.65))]
            self._ending_at(cut, self.length - self._seconds((0.0, 0.5)), canvas)
            return canvas
        if kind == "after_wake":
            # The wake phrase ended a while ago and a command or other speech is under way.
            wake = self._pick(self.pools.wake)
            wake_end = self.length - self._seconds((0.55, 1.2))
            self._ending_at(wake, wake_end, canvas)
            following = self._pick(self.pools.after_wake_later)
            self._starting_at(following, wake_end + self._seconds((0.05, 0.3)), canvas)
            return canvas
        # command_in_context: a command with other words before, after, or both.
        command = self._pick(self.pools.all_commands)
        before, after = self.rng.random() < 0.6, False
        after = not before or self.rng.random() < 0.4
        gap = self._seconds((0.03, 0.25))
        room = self.length - len(command)
        offset = int(self.rng.integers(max(1, room + 1))) if room > 0 else 0
        command = command[: self.length]
        canvas[offset : offset + len(command)] = command
        if before:
            self._ending_at(self._pick(self.pools.neighbours), max(1, offset - gap), canvas)
        if after:
            self._starting_at(self._pick(self.pools.neighbours), offset + len(command) + gap, canvas)
        return canvas


def place(clip: np.ndarray, start: int, canvas: np.ndarray) -> None:
    """Write ``clip`` into ``canvas`` from sample ``start``; what falls outside the canvas is dropped."""
    first, last = max(0, start), min(len(canvas), start + len(clip))
    if last > first:
        canvas[first:last] = clip[first - start : last - start]


@cache
def _open_bank(directory: str) -> ClipBank:
    return ClipBank(directory)


def _build_chunk(arguments: tuple[Recipe, Vocabulary, str, str, int, int]) -> tuple[np.ndarray, np.ndarray]:
    recipe, vocabulary, bank_dir, split, chunk, count = arguments
    bank = _open_bank(bank_dir)
    pools = clip_pools(bank, vocabulary, split)
    seed = [recipe.seed, SPLITS.index(split), chunk]
    composer = WindowComposer(
        recipe, bank, pools, model_labels(vocabulary), int(np.random.SeedSequence(seed).generate_state(1)[0])
    )
    audio = np.zeros((count, composer.length), np.int16)
    labels = np.zeros(count, np.int16)
    for row in range(count):
        window, label = composer.compose()
        audio[row] = np.clip(np.round(window * 32767.0), -32768, 32767)
        labels[row] = label
    return audio, labels


def run_augment(recipe: Recipe, vocabulary: Vocabulary, work_dir: Path) -> Path:
    """Build the training and validation windows; returns ``<work>/augment``."""
    out = work_dir / "augment"
    out.mkdir(parents=True, exist_ok=True)
    bank_dir = str(work_dir / "synth")
    for split, total in (("train", recipe.dataset.train_examples), ("validation", recipe.dataset.validation_examples)):
        tasks = [
            (recipe, vocabulary, bank_dir, split, chunk, min(CHUNK, total - start))
            for chunk, start in enumerate(range(0, total, CHUNK))
        ]
        audio = np.lib.format.open_memmap(
            out / f"{split}_audio.npy", mode="w+", dtype=np.int16, shape=(total, window_samples(recipe.frontend))
        )
        labels = np.zeros(total, np.int16)
        with ProcessPoolExecutor(max_workers=max(1, recipe.dataset.workers)) as pool:
            progress = tqdm(pool.map(_build_chunk, tasks), total=len(tasks), desc=f"augment {split}")
            for (chunk_audio, chunk_labels), start in zip(progress, range(0, total, CHUNK), strict=True):
                audio[start : start + len(chunk_labels)] = chunk_audio
                labels[start : start + len(chunk_labels)] = chunk_labels
        audio.flush()
        del audio
        np.save(out / f"{split}_labels.npy", labels)
    (out / "labels.json").write_text(json.dumps(list(model_labels(vocabulary))))
    log.info(
        "wrote %d training and %d validation windows to %s",
        recipe.dataset.train_examples,
        recipe.dataset.validation_examples,
        out,
    )
    return out
