"""A pretrained speech embedding: Google's mel spectrogram and embedding TFLite models, as openWakeWord packages them.

The two models (``device/models/speech_embedding/``, Apache-2.0, see its NOTICE.md)
were trained by Google on a large amount of real speech. They turn 16 kHz audio into
one 96-number embedding per 80 ms, each summarising the 775 ms before it. The
command and wake-verifier heads of a model package are trained on these embeddings,
which is why they hold on real voices that the heads never heard.

They cost far more than the always-on wake model, so the device runs them only on
an utterance after a wake, or on the second before a first-stage trigger.

Only these two files of openWakeWord are used. Its wake-word classifiers are licensed
for non-commercial use: mqvox neither ships them nor learns from their outputs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

from common.recording import PCM_SCALE
from device.inference import ModelLoadError, interpreter_class

SAMPLE_RATE = 16000
"""The rate (hertz) the models take."""
MEL_STEP_SAMPLES = 160
"""One mel frame per 10 ms."""
MEL_BINS = 32
"""Mel bands per frame."""
EMBEDDING_FRAMES = 76
"""Mel frames one embedding summarises (775 ms)."""
EMBEDDING_STEP_FRAMES = 8
"""Mel frames between two embeddings (80 ms)."""
EMBEDDING_SIZE = 96
"""Numbers per embedding."""
MEL_CONTEXT_SAMPLES = 480
"""Audio the mel model consumes beyond its frames (a 25 ms window over a 10 ms hop, less one hop)."""

MODEL_FILES = {
    "melspectrogram.tflite": "96fa0adccb6e8cf95cb14465409a1a2898ee4a96a85bb9ed3c7eb0e68bf163e8",
    "embedding_model.tflite": "c0aea21eb84a4ce90a08c870da41b7a7173b45269e6a3207c71d67c40f3a59d8",
}
"""The two files and their SHA-256, as pyopen-wakeword 1.1.0 ships them: a head trained on them needs exactly these."""

EMBEDDING_ID = hashlib.sha256("".join(sorted(MODEL_FILES.values())).encode()).hexdigest()[:16]
"""Short identity of the embedding, written into a model package whose heads were trained on it."""


def embedding_directory() -> Path:
    """Where the device keeps the two models."""
    return Path(str(resources.files("device").joinpath("models", "speech_embedding")))


def samples_for(embeddings: int) -> int:
    """Audio (samples) that yields ``embeddings`` embeddings."""
    frames = EMBEDDING_FRAMES + (embeddings - 1) * EMBEDDING_STEP_FRAMES
    return frames * MEL_STEP_SAMPLES + MEL_CONTEXT_SAMPLES


@dataclass
class _Runner:
    interpreter: object
    input_index: int
    output_index: int
    shape: tuple[int, ...] = ()

    def run(self, tensor: np.ndarray) -> np.ndarray:
        if tensor.shape != self.shape:
            # Both models take any length along their first axis; resizing costs an allocation, so it is done
            # only when the shape changes (a device always asks for the same length).
            self.interpreter.resize_tensor_input(self.input_index, tensor.shape, strict=False)
            self.interpreter.allocate_tensors()
            self.shape = tensor.shape
        self.interpreter.set_tensor(self.input_index, tensor)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index)


class SpeechEmbedding:
    """Audio in, embeddings out, through LiteRT. Not thread-safe: one per thread."""

    def __init__(self, directory: str | Path | None = None, num_threads: int = 1) -> None:
        directory = Path(directory) if directory is not None else embedding_directory()
        runners = []
        for name, digest in MODEL_FILES.items():
            path = directory / name
            try:
                data = path.read_bytes()
            except OSError as error:
                raise ModelLoadError(f"speech embedding: cannot read {path}: {error.strerror}") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise ModelLoadError(f"speech embedding: {path} is not the file the heads were trained on")
            try:
                # Tensors are allocated on the first run, at the length asked for: the mel model's stored input
                # shape (one sample) is too short to prepare.
                interpreter = interpreter_class()(model_content=data, num_threads=num_threads)
            except (ValueError, RuntimeError) as error:
                raise ModelLoadError(f"speech embedding: cannot load {path}: {error}") from None
            (source,) = interpreter.get_input_details()
            (output,) = interpreter.get_output_details()
            runners.append(_Runner(interpreter, source["index"], output["index"]))
        self._mel, self._embedding = runners
        try:
            self(np.zeros(samples_for(1), np.float32))  # allocates both models: a file that cannot run fails here
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"speech embedding: cannot run the models in {directory}: {error}") from None

    def mel(self, audio: np.ndarray) -> np.ndarray:
        """Mel frames [frames, 32] of float audio in [-1, 1] at 16 kHz, scaled as the embedding expects."""
        if len(audio) < MEL_CONTEXT_SAMPLES + MEL_STEP_SAMPLES:
            return np.zeros((0, MEL_BINS), np.float32)
        pcm = (np.asarray(audio, np.float32) * PCM_SCALE)[np.newaxis]
        frames = self._mel.run(pcm).reshape(-1, MEL_BINS)
        # The embedding model was trained on log-mel values brought to about [0, 4] this way.
        return frames / 10.0 + 2.0

    def embeddings_of_mel(self, mel: np.ndarray) -> np.ndarray:
        """Embeddings [n, 96], one per 8 mel frames once 76 have arrived."""
        count = (len(mel) - EMBEDDING_FRAMES) // EMBEDDING_STEP_FRAMES + 1
        if count <= 0:
            return np.zeros((0, EMBEDDING_SIZE), np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(mel, (EMBEDDING_FRAMES, MEL_BINS))[
            ::EMBEDDING_STEP_FRAMES, 0
        ][:count]
        batch = np.ascontiguousarray(windows[..., np.newaxis], dtype=np.float32)
        return self._embedding.run(batch).reshape(count, EMBEDDING_SIZE)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        """Embeddings [n, 96] of float audio in [-1, 1] at 16 kHz."""
        return self.embeddings_of_mel(self.mel(audio))


@cache
def shared_embedding() -> SpeechEmbedding:
    """One embedding per process for code that runs on one thread (training, benches)."""
    return SpeechEmbedding()
