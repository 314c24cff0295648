"""The quantize stage: full-integer int8 TFLite (int8 input and output) from the trained Keras model.

The representative dataset is a seeded sample of training windows of every class,
so the activation ranges cover speech, noise and silence alike.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from firmware_tools.building.recipe import Recipe
from firmware_tools.building.train import configure_tensorflow, load_split

log = logging.getLogger("mqvox.quantize")

REPRESENTATIVE_WINDOWS = 500
"""Training windows used to calibrate activation ranges."""


def run_quantize(recipe: Recipe, work_dir: Path) -> Path:
    """Convert ``<work>/train/model.keras``; writes ``<work>/quantize/model.tflite`` (and the float model beside it)."""
    configure_tensorflow(recipe.train.threads, recipe.seed)
    import tensorflow as tf

    out = work_dir / "quantize"
    out.mkdir(parents=True, exist_ok=True)
    model = tf.keras.models.load_model(work_dir / "train" / "model.keras")
    features, _ = load_split(work_dir, "train")
    rng = np.random.default_rng(recipe.seed)
    sample = features[rng.choice(len(features), size=min(REPRESENTATIVE_WINDOWS, len(features)), replace=False)]

    def representative():
        for window in sample:
            yield [window[np.newaxis].astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    (out / "model_float.tflite").write_bytes(converter.convert())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    quantized = converter.convert()
    (out / "model.tflite").write_bytes(quantized)
    log.info("int8 model: %d bytes", len(quantized))
    return out
