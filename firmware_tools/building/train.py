"""The train stage: fit the network on the feature windows; keep the epoch with the best validation accuracy.

Writes ``<work>/train/model.keras`` and ``history.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from firmware_tools.building.network import build_network
from firmware_tools.building.recipe import Recipe

log = logging.getLogger("mqvox.train")


def load_split(work_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32, read into memory) and labels of one split."""
    features = np.load(work_dir / "features" / f"{split}_features.npy").astype(np.float32)
    labels = np.load(work_dir / "features" / f"{split}_labels.npy").astype(np.int32)
    return features, labels


def configure_tensorflow(threads: int, seed: int) -> None:
    """Deterministic, quiet TensorFlow on ``threads`` CPU threads."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if tf.config.threading.get_intra_op_parallelism_threads() != threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already ran in this process (a fleet round after a training run)
            log.warning("TensorFlow already runs in this process: its thread counts stay as they are")
    tf.keras.utils.set_random_seed(seed)


def run_train(recipe: Recipe, work_dir: Path) -> Path:
    """Train; returns ``<work>/train``."""
    configure_tensorflow(recipe.train.threads, recipe.seed)
    import tensorflow as tf

    out = work_dir / "train"
    out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((work_dir / "features" / "labels.json").read_text())
    train_x, train_y = load_split(work_dir, "train")
    validation_x, validation_y = load_split(work_dir, "validation")
    mean, std = float(train_x.mean()), float(train_x.std()) or 1.0
    model = build_network(recipe.model, recipe.frontend, len(labels), mean, std)
    settings = recipe.train
    steps = settings.epochs * int(np.ceil(len(train_x) / settings.batch_size))
    schedule = tf.keras.optimizers.schedules.CosineDecay(settings.learning_rate, decay_steps=steps)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(schedule),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    best = out / "model.keras"
    started = time.monotonic()
    history = model.fit(
        train_x,
        train_y,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        validation_data=(validation_x, validation_y),
        shuffle=True,
        verbose=2,
        callbacks=[tf.keras.callbacks.ModelCheckpoint(best, monitor="val_accuracy", save_best_only=True)],
    )
    record = {
        "seconds": round(time.monotonic() - started, 1),
        "parameters": int(model.count_params()),
        "feature_mean": mean,
        "feature_std": std,
        "history": {key: [round(float(v), 5) for v in values] for key, values in history.history.items()},
    }
    (out / "history.json").write_text(json.dumps(record, indent=2))
    log.info(
        "trained %d parameters in %.0f s; best validation accuracy %.4f",
        record["parameters"],
        record["seconds"],
        max(history.history["val_accuracy"]),
    )
    return out
