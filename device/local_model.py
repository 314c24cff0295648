"""The model a device runs: its package, a loaded classifier, and what each label means in the vocabulary.

Loading checks everything a device can check before it trusts a model: the manifest
against its schema, the file against its digest, the front end against what this
device computes, and every command label against the vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from device.command_head import CommandHead
from device.detector import NON_COMMAND_LABELS, CommandDecision, decide_command, utterance_window
from device.features import UnsupportedFrontend, check_frontend
from device.inference import ModelLoadError, TfliteClassifier
from device.settings import ModelSettings
from device.speech_embedding import EMBEDDING_SIZE, SpeechEmbedding
from schemas.errors import ProtocolError
from schemas.model import ModelPackage
from schemas.result import SlotValue
from schemas.vocabulary import Command, Vocabulary, load_vocabulary


class ModelUnavailable(RuntimeError):
    """No usable model: missing, damaged, or incompatible with this device or its vocabulary."""


def shipped_model_directory() -> Path:
    """The model package that ships with mqvox (device/models/default)."""
    return Path(str(resources.files("device").joinpath("models", "default")))


@dataclass(frozen=True)
class LabelMeaning:
    """What a model class stands for."""

    label: str
    """The class name in the manifest."""
    intent: str | None
    """Its intent, or None for the wake, silence and unknown classes."""
    slots: Mapping[str, SlotValue]
    """Slot values the class fixes."""


@dataclass(frozen=True)
class LocalModel:
    """A model package loaded and checked, ready to score windows."""

    package: ModelPackage
    """Manifest: version, front end, labels and detection settings (with any configured overrides)."""
    classifier: TfliteClassifier
    """The loaded .tflite model."""
    meanings: Mapping[str, LabelMeaning]
    """Every label of the model, mapped to its intent and slots."""
    directory: Path
    """Where the package was loaded from."""
    head: CommandHead | None = None
    """The command head on the speech embedding, when the package has one: it decides commands and verifies wakes."""

    @property
    def version(self) -> str:
        return self.package.version

    def meaning(self, label: str) -> LabelMeaning:
        return self.meanings[label]

    def decide(self, audio: np.ndarray, start: int, end: int) -> CommandDecision:
        """The command of the utterance [start, end) (samples of ``audio``): by the head when there is one."""
        if self.head is not None:
            return self.head.decide(self.package, audio, start, end)
        return decide_command(self.classifier, self.package, utterance_window(self.package, audio, start, end))


def load_local_model(
    directory: str | Path | None = None,
    vocabulary: Vocabulary | None = None,
    *,
    wake_threshold: float | None = None,
    command_threshold: float | None = None,
    num_threads: int = 1,
) -> LocalModel:
    """Load and check a model package; raise ModelUnavailable with the reason otherwise.

    ``wake_threshold`` and ``command_threshold`` replace the values tuned with the
    model when given (a device config may be stricter or looser than the manifest).
    """
    directory = Path(directory) if directory is not None else shipped_model_directory()
    if not (directory / "manifest.json").is_file():
        raise ModelUnavailable(f"no model package in {directory}: manifest.json is missing")
    try:
        package = ModelPackage.load(directory)
        model_path = package.model_path(directory)
        check_frontend(package.frontend)
        classifier = TfliteClassifier(model_path, num_threads=num_threads)
        head_classifier = embedding = None
        if package.detection.head_signature:
            head_classifier = TfliteClassifier(model_path, num_threads, signature=package.detection.head_signature)
            if head_classifier.num_labels != len(package.labels):
                scored = head_classifier.num_labels
                raise ModelLoadError(f"its command head scores {scored} classes, not the {len(package.labels)} labels")
            if head_classifier.input_shape[1:] != (EMBEDDING_SIZE,):
                shape = head_classifier.input_shape
                raise ModelLoadError(f"its command head reads {shape}, not embeddings of {EMBEDDING_SIZE} numbers")
            embedding = SpeechEmbedding(num_threads=num_threads)
    except (ProtocolError, UnsupportedFrontend, ModelLoadError, OSError) as error:
        raise ModelUnavailable(f"cannot use the model in {directory}: {error}") from None
    expected_input = (package.frontend.frames, package.frontend.num_features)
    if classifier.input_shape != expected_input or classifier.num_labels != len(package.labels):
        raise ModelUnavailable(
            f"the model in {directory} takes {classifier.input_shape} and scores {classifier.num_labels} classes,"
            f" but its manifest says {expected_input} and {len(package.labels)} labels"
        )
    meanings = _meanings(package, vocabulary or load_vocabulary(), directory)
    detection = package.detection
    if wake_threshold is not None:
        detection = replace(detection, wake_threshold=wake_threshold)
    if command_threshold is not None:
        detection = replace(detection, command_threshold=command_threshold)
    package = replace(package, detection=detection)
    head = CommandHead(head_classifier, embedding) if head_classifier is not None else None
    return LocalModel(package, classifier, meanings, directory, head)


def load_configured_model(settings: ModelSettings, directory: str | Path | None = None) -> LocalModel:
    """The model of ``directory`` (default: the configured one) with the configured vocabulary and thresholds."""
    vocabulary = load_vocabulary(settings.vocabulary) if settings.vocabulary is not None else None
    return load_local_model(
        directory if directory is not None else settings.directory,
        vocabulary,
        wake_threshold=settings.wake_threshold,
        command_threshold=settings.command_threshold,
        num_threads=settings.num_threads,
    )


def _meanings(package: ModelPackage, vocabulary: Vocabulary, directory: Path) -> dict[str, LabelMeaning]:
    commands: dict[str, Command] = {command.label: command for command in vocabulary.commands}
    meanings = {}
    for label in package.labels:
        if label in NON_COMMAND_LABELS or label == package.detection.wake_label:
            meanings[label] = LabelMeaning(label, None, {})
        elif label in commands:
            meanings[label] = LabelMeaning(label, commands[label].intent, dict(commands[label].slots))
        else:
            raise ModelUnavailable(
                f"the model in {directory} has the label {label!r}, which the vocabulary does not define"
                " (was it trained on another vocabulary?)"
            )
    if package.detection.wake_label not in package.labels:
        raise ModelUnavailable(f"the model in {directory} has no wake label {package.detection.wake_label!r}")
    return meanings
