"""Adapting the command head to the fleet's voices, without forgetting what it knew; and packaging the result.

What is trained, and why (the model of issue 19, device/models/default):

- the speech embedding (Google's, 2.4 MB) is frozen: it is not part of the over-the-air
  blob, and it was trained on far more speech than any fleet will send;
- the always-on network is unchanged: it only has to wake, and a first stage that
  changes with every round would need its wake threshold tuned again on audio the
  fleet does not send (the cloud never hears the wake phrase);
- the head, every layer of each of its networks, is fine-tuned from its current weights
  for a few epochs at a low learning rate on the fleet's examples together with the
  head's original training windows (rehearsal), so it gains the fleet's voices and
  keeps the other speakers, commands and negatives. The head is also the wake verifier:
  it is fine-tuned with it, on the original wake windows, and the fleet's examples
  teach it more that is not the wake phrase.

The fleet's examples are embedded as heard and, as copies, through the head's own
augmenter (room, noise, band limit), and weigh ``fleet_weight`` times a training
window each. Temperature and thresholds are the base model's: the gate
(firmware_tools/learning/gate.py) checks that they still hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from device.speech_embedding import SpeechEmbedding
from firmware_tools.building.command_head import Examples, averaged, build_member, class_weights, quantize_head
from firmware_tools.building.corruptions import Augmenter
from firmware_tools.building.model_card import write_model_card
from firmware_tools.building.recipe import HeadSettings, Recipe
from firmware_tools.building.tflite_merge import always_on_part, merge_models
from firmware_tools.learning.fleet_data import FleetExample
from schemas.model import MODEL_FILE, ModelPackage

log = logging.getLogger("mqvox.adapt")

FLOAT_HEAD_FILE = "head.keras"
"""A round's float head, kept beside its package (never sent to devices), so the next round fine-tunes it rather
than its int8 quantization."""


@dataclass(frozen=True)
class AdaptSettings:
    """How the head is fine-tuned on the fleet's examples."""

    epochs: int = 4
    """Passes over the fleet's examples and the rehearsal windows."""
    learning_rate: float = 1e-4
    """Adam's step size: a tenth of the first training's, so the head moves toward the fleet without forgetting
    (a trial on the bench's first-round data, FSDD speakers who are not users: 2e-4 lowered their share decided
    by 1.0 point, 1e-4 by 0.2, for the same gain on the users)."""
    fleet_copies: int = 3
    """Windows per fleet example: one as heard, the others through the head's augmenter."""
    fleet_weight: float = 4.0
    """Weight of one fleet window against one rehearsal window (the fleet sends a few hundred, training had
    tens of thousands)."""
    rehearsal_windows: int = 0
    """Rehearsal windows drawn from the head's training windows; 0 takes them all."""
    exclude_fsdd_speakers: tuple[str, ...] = ()
    """FSDD speakers left out of the rehearsal (a bench whose users are FSDD speakers the starting model never
    heard: rehearsing them would teach it their measurement takes)."""

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.fleet_copies < 1 or self.learning_rate <= 0 or self.fleet_weight <= 0:
            raise ValueError(f"adapt settings must be positive: {self}")


def embed_fleet(
    examples: tuple[FleetExample, ...],
    labels: tuple[str, ...],
    head: HeadSettings,
    copies: int,
    seed: int,
    embedding: SpeechEmbedding | None = None,
) -> Examples:
    """The fleet's windows embedded: each as heard, then ``copies - 1`` augmented copies."""
    embedding = embedding or SpeechEmbedding()
    augment = Augmenter(head.augment, np.random.default_rng(seed))
    windows, classes, groups = [], [], []
    for example in examples:
        for copy in range(copies):
            heard = example.window if copy == 0 else augment(example.window)
            windows.append(embedding(heard))
            classes.append(labels.index(example.label))
            groups.append(f"fleet:{example.device_id}")
    if not windows:
        return Examples(np.zeros((0, 16, 96), np.float32), np.zeros(0, int), np.zeros(0, str))
    return Examples(np.stack(windows).astype(np.float32), np.array(classes), np.array(groups))


def rehearsal(examples: Examples, settings: AdaptSettings, seed: int) -> Examples:
    """The head's training windows to rehearse: all, or a draw; never the excluded FSDD speakers."""
    excluded = {f"fsdd:{speaker}" for speaker in settings.exclude_fsdd_speakers}
    keep = np.flatnonzero(~np.isin(examples.groups, list(excluded)))
    if settings.rehearsal_windows and len(keep) > settings.rehearsal_windows:
        keep = np.sort(np.random.default_rng(seed).choice(keep, settings.rehearsal_windows, replace=False))
    return Examples(examples.embeddings[keep], examples.labels[keep], examples.groups[keep])


def fine_tune(model, fleet: Examples, old: Examples, num_labels: int, settings: AdaptSettings, seed: int):
    """Each network of the head fine-tuned on fleet and rehearsal windows together; their average as before."""
    import tensorflow as tf

    embeddings = np.concatenate([old.embeddings, fleet.embeddings])
    classes = np.concatenate([old.labels, fleet.labels])
    # Classes balanced as in the first training, then the fleet's windows weigh more.
    weights = class_weights(classes, num_labels)[classes] * np.concatenate(
        [np.ones(len(old.labels)), np.full(len(fleet.labels), settings.fleet_weight)]
    )
    members = [layer for layer in model.layers if isinstance(layer, tf.keras.Model)] or [model]
    tuned = []
    for index, member in enumerate(members):
        tf.keras.utils.set_random_seed(seed + 1000 * index)
        member.compile(
            optimizer=tf.keras.optimizers.Adam(settings.learning_rate),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        member.fit(embeddings, classes, sample_weight=weights, epochs=settings.epochs, batch_size=64, verbose=0)
        tuned.append(member)
    return averaged(tuned)


def load_float_head(path: Path):
    """The float head an earlier round kept beside its package (FLOAT_HEAD_FILE)."""
    import tensorflow as tf

    return tf.keras.models.load_model(path, compile=False)


def float_head_of(package_dir: Path, settings: HeadSettings):
    """The package's own int8 head as a float Keras head, every weight dequantized: its networks exactly, to int8
    precision. A released package carries only the int8 file; this is what a round fine-tunes when no float head
    was kept beside it (a float head trained again from the recipe is another head: TensorFlow on CPU is not
    bit-reproducible from one machine to the next)."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    package = ModelPackage.load(package_dir)
    model = flatbuffer_utils.read_model(str(package.model_path(package_dir)))
    (signature,) = [s for s in model.signatureDefs if s.signatureKey.decode() == package.detection.head_signature]
    graph = model.subgraphs[signature.subgraphIndex]

    def weights(index: int) -> np.ndarray:
        tensor = graph.tensors[index]
        raw = np.asarray(model.buffers[tensor.buffer].data, np.uint8)
        values = raw.view(np.int8 if tensor.type == schema.TensorType.INT8 else np.int32).reshape(tensor.shape)
        scale = np.asarray(tensor.quantization.scale, np.float64)
        zero = np.asarray(tensor.quantization.zeroPoint, np.float64)
        axis = tensor.quantization.quantizedDimension
        shape = [1] * values.ndim
        if scale.size > 1:
            shape[axis] = scale.size
        return ((values - zero.reshape(shape)) * scale.reshape(shape)).astype(np.float32)

    convolution, dense = schema.BuiltinOperator.CONV_2D, schema.BuiltinOperator.FULLY_CONNECTED
    members, layers_so_far = [], []
    for operator in graph.operators:
        code = model.operatorCodes[operator.opcodeIndex]
        kind = max(code.builtinCode, code.deprecatedBuiltinCode)
        if kind == convolution:
            kernel = weights(operator.inputs[1])  # [out, 1, 3, in] -> Conv1D's [3, in, out]
            layers_so_far += [kernel[:, 0].transpose(1, 2, 0), weights(operator.inputs[2])]
        elif kind == dense:
            layers_so_far += [weights(operator.inputs[1]).T, weights(operator.inputs[2])]
            members.append(layers_so_far)
            layers_so_far = []
    networks = []
    for member_weights in members:
        # The layers' widths are the package's own, whatever the recipe's settings say now.
        network = build_member(len(package.labels), replace(settings, filters=member_weights[0].shape[-1]))
        network.set_weights(member_weights)
        networks.append(network)
    return averaged(networks)


def package_adapted(
    base_dir: Path,
    head_model,
    representative: Examples,
    out_dir: Path,
    version: str,
    recipe: Recipe,
    fleet_record: dict | None,
    seed: int,
) -> Path:
    """The base package with the adapted head joined to its always-on network, as ``version``.

    Manifest and detection settings are the base's (a new version, digest and size); ``training.json`` and the
    model card gain this round's record: how it was trained and what fleet data went in (counts, never audio).
    The float head is kept beside it (FLOAT_HEAD_FILE) for the next round.
    """
    base = ModelPackage.load(base_dir)
    model_bytes = merge_models(
        always_on_part(base.model_path(base_dir).read_bytes()), quantize_head(head_model, representative, seed)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MODEL_FILE).write_bytes(model_bytes)
    package = replace(
        base,
        version=version,
        sha256=hashlib.sha256(model_bytes).hexdigest(),
        size_bytes=len(model_bytes),
        created_at=round(time.time(), 3),
    )
    (out_dir / "manifest.json").write_text(package.to_json())
    training = json.loads((base_dir / "training.json").read_text())
    if fleet_record is not None:
        training["fleet"] = [*training.get("fleet", []), fleet_record | {"version": version, "base": base.version}]
    training["size_bytes"] = len(model_bytes)
    (out_dir / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    head_model.save(out_dir / FLOAT_HEAD_FILE)
    write_model_card(out_dir, recipe)
    return out_dir


def describe(settings: AdaptSettings) -> dict:
    """What the round trained and how, for training.json and the model card."""
    return {
        "trained": "every layer of each network of the command head (and so the wake verifier), from the base's "
        "float weights; the speech embedding and the always-on network unchanged",
        "settings": asdict(settings),
    }
