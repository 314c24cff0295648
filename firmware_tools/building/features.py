"""The features stage: the front end's features of every window the augment stage wrote, with SpecAugment.

Features are written as float16 (``<work>/features``), with SpecAugment on a share of the
training windows.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device.features import batch_features
from firmware_tools.building.augment import CHUNK, SPLITS
from firmware_tools.building.corruptions import spec_augment
from firmware_tools.building.recipe import Recipe


def _features_chunk(arguments: tuple[Recipe, str, int, int, bool]) -> np.ndarray:
    recipe, audio_path, start, stop, masked = arguments
    audio = np.load(audio_path, mmap_mode="r")[start:stop]
    features = np.stack([batch_features(recipe.frontend, row.astype(np.float32) / 32767.0) for row in audio])
    if masked:
        rng = np.random.default_rng([recipe.seed, 7, start])
        settings = recipe.dataset
        for row in range(len(features)):
            if rng.random() < settings.spec_augment_probability:
                features[row] = spec_augment(features[row], rng, settings.spec_augment)
    return features.astype(np.float16)


def run_features(recipe: Recipe, work_dir: Path) -> Path:
    """Features of every window; SpecAugment on a share of the training ones. Returns ``<work>/features``."""
    source = work_dir / "augment"
    out = work_dir / "features"
    out.mkdir(parents=True, exist_ok=True)
    frontend = recipe.frontend
    for split in SPLITS:
        audio_path = source / f"{split}_audio.npy"
        total = np.load(audio_path, mmap_mode="r").shape[0]
        features = np.lib.format.open_memmap(
            out / f"{split}_features.npy",
            mode="w+",
            dtype=np.float16,
            shape=(total, frontend.frames, frontend.num_features),
        )
        tasks = [
            (recipe, str(audio_path), start, min(total, start + CHUNK), split == "train")
            for start in range(0, total, CHUNK)
        ]
        with ProcessPoolExecutor(max_workers=max(1, recipe.dataset.workers)) as pool:
            for task, chunk in zip(
                tasks, tqdm(pool.map(_features_chunk, tasks), total=len(tasks), desc=f"features {split}"), strict=True
            ):
                features[task[2] : task[3]] = chunk
        features.flush()
        del features
        np.save(out / f"{split}_labels.npy", np.load(source / f"{split}_labels.npy"))
    (out / "labels.json").write_text((source / "labels.json").read_text())
    return out
