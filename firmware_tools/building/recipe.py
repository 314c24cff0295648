"""A training recipe: every setting of every stage, from one TOML file, so a run can be repeated exactly.

``recipes/default.toml`` builds the shipped model; ``recipes/tiny.toml`` runs the whole
pipeline in under two minutes for the test suite.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_tools.building.corruptions import AugmentSettings, SpecAugmentSettings
from schemas.model import Frontend

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""Where the shipped recipes live."""


@dataclass(frozen=True)
class SynthSettings:
    """How much speech to render, with which engines, and how to multiply speakers."""

    engines: tuple[str, ...] = ("espeak", "piper", "flite", "festival")
    """Engines to render with."""
    espeak_renders: int = 60
    """espeak-ng renders per phrase, each a random accent, variant, speed and pitch."""
    espeak_variants: tuple[str, ...] = ()
    """espeak-ng voice variants to draw from; empty means every variant installed."""
    piper_renders: int = 24
    """piper (joe) renders per phrase, each with random length, noise and noise_w scales."""
    flite_renders: int = 12
    """Renders per phrase for each flite training voice (kal, awb), at random speed and pitch."""
    festival_renders: int = 8
    """Renders per phrase for each festival training voice (kal, ked), at random speed."""
    world_variants: dict[str, int] = field(default_factory=lambda: {"espeak": 0, "piper": 4, "flite": 3, "festival": 3})
    """Per engine: extra speakers made from each clip by WORLD pitch and vocal-tract-length transformation."""
    wake_multiplier: int = 3
    """The wake phrase is rendered this many times as often as one command phrase."""
    negative_share: float = 0.2
    """Negative phrases get this share of a positive phrase's renders (at least one per engine voice)."""
    negative_limit: int = 0
    """Render only this many negative phrases, drawn at random (0: all of them)."""
    speed_range: tuple[float, float] = (0.8, 1.25)
    """Speaking rate, relative to each engine's default."""
    pitch_range: tuple[float, float] = (0.75, 1.35)
    """Pitch, relative to each engine's default (espeak and flite)."""
    world_f0_range: tuple[float, float] = (0.65, 1.6)
    """WORLD: factor on the fundamental frequency."""
    world_formant_range: tuple[float, float] = (0.82, 1.22)
    """WORLD: factor on the frequency axis of the spectral envelope (vocal tract length)."""
    validation_share: float = 0.1
    """Share of renders kept apart for validation (early stopping and threshold tuning)."""
    workers: int = 2
    """Processes used for rendering and transformation."""


@dataclass(frozen=True)
class DatasetSettings:
    """How clips become model-sized training windows (the augment stage)."""

    train_examples: int = 64000
    """Training windows."""
    validation_examples: int = 6000
    """Validation windows, from the validation renders only."""
    wake_share: float = 0.15
    """Share of windows holding the wake phrase."""
    unknown_share: float = 0.3
    """Share of windows of other speech: confusables, words, sentences, commands in context or cut short."""
    silence_share: float = 0.07
    """Share of windows of silence or noise only; the rest are commands, shared equally."""
    unknown_kinds: tuple[tuple[str, float], ...] = (
        ("other_speech", 0.45),
        ("command_in_context", 0.2),
        ("wake_cut_short", 0.12),
        ("after_wake", 0.13),
        ("command_cut_short", 0.1),
    )
    """How ``_unknown_`` windows are made, with weights: other speech alone, a command with other words next to it,
    the wake phrase or a multi-word command cut short, and speech that follows the wake phrase."""
    context_probability: float = 0.4
    """Chance that a wake window has other speech before the wake phrase."""
    wake_tail_s: tuple[float, float] = (0.0, 0.3)
    """A wake window ends this long after the wake phrase (what the streaming detector sees as it fires)."""
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    """Noise, reverb, gain, speed, pitch and band limiting."""
    spec_augment: SpecAugmentSettings = field(default_factory=SpecAugmentSettings)
    """Time and frequency masks on training features."""
    spec_augment_probability: float = 0.5
    """Share of training windows that get SpecAugment masks."""
    workers: int = 2
    """Processes used for augmentation and features."""


@dataclass(frozen=True)
class ModelSettings:
    """A DS-CNN: one strided convolution, then depthwise-separable blocks, global average pooling, softmax."""

    first_filters: int = 32
    """Filters of the first convolution."""
    first_kernel: tuple[int, int] = (5, 3)
    """Kernel (time, frequency) of the first convolution."""
    first_stride: tuple[int, int] = (2, 2)
    """Stride (time, frequency) of the first convolution."""
    blocks: tuple[tuple[int, int, int], ...] = ((48, 2, 2), (64, 1, 1), (96, 2, 2), (96, 1, 1), (128, 2, 1))
    """Depthwise-separable blocks: (filters, time stride, frequency stride)."""
    dropout: float = 0.2
    """Dropout before the classifier."""
    window_mean_normalization: bool = False
    """Subtract each filter's mean over the window from the features (cepstral mean normalisation in the
    log-mel domain), so a voice's or microphone's spectral tilt matters less."""


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation."""

    epochs: int = 20
    """Passes over the training windows."""
    batch_size: int = 128
    """Windows per step."""
    learning_rate: float = 0.003
    """Peak learning rate (cosine decay to zero)."""
    threads: int = 2
    """TensorFlow threads."""


@dataclass(frozen=True)
class DetectionTuning:
    """How the shipped thresholds are chosen on the validation windows."""

    local_precision_target: float = 0.995
    """The command threshold is the lowest whose local decisions reach this precision on validation."""
    wake_false_accept_quantile: float = 0.999
    """The wake threshold sits at this quantile of the wake score on validation windows that hold no wake."""
    stride_frames: int = 10
    """Frames between runs of the model on the always-on path."""
    smoothing_windows: int = 2
    """Runs averaged into the wake score."""
    refractory_s: float = 2.0
    """Quiet time after a wake (seconds)."""


@dataclass(frozen=True)
class HeadSettings:
    """The command head on the speech embedding (firmware_tools/building/command_head.py)."""

    fsdd_copies: int = 3
    """Augmented windows per FSDD clip."""
    synthetic_per_label: int = 250
    """Synthetic clips per label, drawn from the bank's training split (four times as many of other speech)."""
    real_other_windows: int = 4000
    """Windows cut from the training packages' voice lines (firmware_tools/building/real_speech.py), labelled as other
    speech; 0 leaves real other speech out (the tiny recipe, which must run without those packages)."""
    silence_windows: int = 1500
    """Windows of noise or silence only."""
    augment: AugmentSettings = field(
        default_factory=lambda: AugmentSettings(
            noise_probability=0.7,
            snr_db_range=(5.0, 30.0),
            reverb_probability=0.3,
            speed_probability=0.3,
            speed_range=(0.9, 1.1),
            pitch_probability=0.0,
            band_limit_probability=0.6,
        )
    )
    """What every window but the first copy of each FSDD clip goes through. Band limiting is frequent: FSDD was
    recorded at 8 kHz, so without it the synthetic digits teach cues above 4 kHz ("six" by its /s/) that real
    8 kHz speech lacks (measured: a held-out speaker's "six" taken for "three" and "two")."""
    centre_jitter_s: float = 0.3
    """A command's centre lands this far either side of the window's centre, at most (seconds)."""
    wake_tail_s: tuple[float, float] = (0.0, 0.35)
    """A wake window ends this long after the phrase, as a first-stage trigger sees it (seconds)."""
    filters: int = 64
    """Channels of each of the two convolutions over time."""
    input_dropout: float = 0.3
    """Dropout on the embeddings, in training."""
    dropout: float = 0.3
    """Dropout before the output layer."""
    members: int = 3
    """Networks trained from different seeds whose logits the head averages."""
    epochs: int = 15
    """Passes over the training windows."""
    batch_size: int = 64
    """Windows per step."""
    precision_target: float = 0.995
    """The command threshold is the lowest that keeps the held-out decisions at least this precise."""


@dataclass(frozen=True)
class Recipe:
    """Everything a training run depends on."""

    name: str
    """Name of the recipe, also the name of its cache directory."""
    version: str
    """Version given to the model it builds."""
    seed: int
    """Seed of every random choice, so a run is reproducible."""
    frontend: Frontend
    """Feature front end, written into the model's manifest."""
    synth: SynthSettings = field(default_factory=SynthSettings)
    """The synth stage."""
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    """The augment and features stages (the recipe's ``[dataset]`` table)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    """Network."""
    train: TrainSettings = field(default_factory=TrainSettings)
    """The train stage."""
    detection: DetectionTuning = field(default_factory=DetectionTuning)
    """Thresholds written into the manifest."""
    head: HeadSettings = field(default_factory=HeadSettings)
    """The command head and wake verifier."""


class RecipeError(ValueError):
    """A recipe file with an unknown key or a value of the wrong shape."""


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe; a bare name (``default``, ``tiny``) means a shipped one."""
    path = Path(path)
    if not path.suffix and not path.exists():
        path = RECIPES_DIR / f"{path}.toml"
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    return _build(Recipe, data, str(path))


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    """A dataclass from a TOML table: nested tables become nested dataclasses, arrays become tuples."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise RecipeError(f"{where}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, f"{where}.{name}") for name, value in table.items()}
    try:
        return cls(**values)
    except TypeError as error:
        raise RecipeError(f"{where}: {error}") from None


def _convert(hint: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a table")
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected an array")
        arguments = typing.get_args(hint)
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(_convert(arguments[0], item, where) for item in value)
        return tuple(_convert(argument, item, where) for argument, item in zip(arguments, value, strict=True))
    if origin in (dict, types.UnionType):
        return value
    if hint is float and isinstance(value, int):
        return float(value)
    return value
