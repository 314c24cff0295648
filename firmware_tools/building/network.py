"""The network: a small DS-CNN over one window of log mel features (Keras, training only).

Depthwise-separable convolutions keep the multiply count low enough to run the model
every 100 ms on a Raspberry Pi, and every layer converts to int8 TFLite kernels.
"""

from __future__ import annotations

from typing import Any

from firmware_tools.building.recipe import ModelSettings
from schemas.model import Frontend


def build_network(settings: ModelSettings, frontend: Frontend, num_labels: int, mean: float, std: float) -> Any:
    """A Keras model: features [batch, frames, num_features] -> class probabilities [batch, num_labels].

    ``mean`` and ``std`` of the training features are folded into the model, so the
    device feeds raw features and the int8 input scale covers their real range.
    """
    import tensorflow as tf

    layers = tf.keras.layers
    features = layers.Input((frontend.frames, frontend.num_features), name="features")
    x = features
    if settings.window_mean_normalization:
        # Built from stock layers (mean over time, repeated, subtracted) so it converts to int8 TFLite kernels.
        mean = layers.RepeatVector(frontend.frames)(layers.GlobalAveragePooling1D()(x))
        x = layers.Subtract()([x, mean])
        mean, std = 0.0, std
    x = layers.Reshape((frontend.frames, frontend.num_features, 1))(x)
    x = layers.Rescaling(scale=1.0 / std, offset=-mean / std)(x)
    x = layers.Conv2D(
        settings.first_filters, settings.first_kernel, strides=settings.first_stride, padding="same", use_bias=False
    )(x)
    x = layers.BatchNormalization()(x)
    x = layers.ReLU()(x)
    for filters, time_stride, frequency_stride in settings.blocks:
        x = layers.DepthwiseConv2D(3, strides=(time_stride, frequency_stride), padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(filters, 1, use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(settings.dropout)(x)
    logits = layers.Dense(num_labels, name="logits")(x)
    probabilities = layers.Softmax(name="probabilities")(logits)
    return tf.keras.Model(features, probabilities, name="mqvox_dscnn")
