"""Peer wake-word detectors for "hey jarvis", scored on the same audio as our model.

Two published models stand beside ours in the evaluation, which compares recall at equal false accepts per hour and
CPU time per second of audio:

- microWakeWord's ``hey_jarvis`` (int8 streaming TFLite, the ESPHome model) through ``pymicro-wakeword``;
- openWakeWord's ``hey_jarvis`` (mel spectrogram, speech embedding and classifier TFLite models) through
  ``pyopen-wakeword``.

Both packages ship their models and a TFLite C library inside the wheel, so nothing is fetched at run time. Each peer
is fed 16-bit PCM in its own chunk size, the way a live stream reaches it, and reports the probability it would
compare to its threshold at every step, so that the evaluation can sweep thresholds itself.
"""

from __future__ import annotations

import importlib
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from pymicro_wakeword import MicroWakeWord
    from pyopen_wakeword import OpenWakeWord, OpenWakeWordFeatures

SAMPLE_RATE = 16000
"""Rate (hertz) both peers were trained at, and that ``score`` expects."""

_PCM16_FULL_SCALE = 32767.0
"""Multiplier from float samples in [-1, 1] to 16-bit PCM."""

_CONVERSION_BLOCK_S = 10.0
"""Seconds of audio turned into 16-bit PCM at once: a 2 h input never gets a whole int16 copy beside it."""

_WAKE_MODEL = "hey_jarvis"
"""Name of the built-in model both packages ship for our wake phrase."""


@dataclass(frozen=True)
class PeerScores:
    """What a peer made of one stretch of audio."""

    scores: np.ndarray
    """Wake probability in [0, 1] at each step (float32): ``scores[i]`` is what the peer says once it has heard
    ``(i + 1) * step_s`` seconds of the audio, give or take one step."""
    step_s: float
    """Seconds of audio between consecutive scores."""
    cpu_s: float
    """Process CPU seconds spent on feature extraction and inference (model loading excluded)."""


class WakePeer(Protocol):
    """A published wake-word detector that scores audio the way it would run on a live stream."""

    name: str
    """Who made the model and which model it is, e.g. "microWakeWord hey_jarvis"."""

    def score(self, audio: np.ndarray) -> PeerScores:
        """Wake probabilities for ``audio`` (float mono at 16 kHz, in [-1, 1]), from fresh streaming state."""
        ...


class MicroWakeWordPeer:
    """microWakeWord's ``hey_jarvis``, with the TFLite Micro audio front end it was trained on (pymicro-features)."""

    name = "microWakeWord hey_jarvis"

    def __init__(self) -> None:
        self._package = _import_peer_package("pymicro_wakeword", "pymicro-wakeword")
        models_dir = _packaged_models_dir(self._package, f"{_WAKE_MODEL}.tflite", f"{_WAKE_MODEL}.json")
        self.model_path: Path = models_dir / f"{_WAKE_MODEL}.tflite"
        """The model file, inside the installed package."""
        self._detector: MicroWakeWord = self._package.MicroWakeWord.from_builtin(
            self._package.Model.HEY_JARVIS, models_dir=models_dir
        )
        self._front_end_chunk_samples: int = self._package.microwakeword.SAMPLES_PER_CHUNK
        """Samples the front end turns into one feature frame (10 ms), the chunk ESPHome streams."""
        self.step_s: float = self._detector.stride * self._front_end_chunk_samples / SAMPLE_RATE
        """Seconds between inferences: the model takes ``stride`` feature frames per invocation."""

    def score(self, audio: np.ndarray) -> PeerScores:
        """The probability the detector compares to its cutoff: the mean of its last few model outputs.

        That mean (over the model's ``sliding_window_size`` outputs, 0 until the window is full) is what
        pymicro-wakeword and ESPHome threshold, so thresholding these scores reproduces the peer's own detections.
        """
        samples = _checked_audio(audio)
        # The streaming model keeps its state in TFLite variables; reset() reloads the interpreter to clear them.
        self._detector.reset()
        front_end = self._package.MicroWakeWordFeatures()
        scores = array("f")
        feature_frames = 0
        cpu_start_s = time.process_time()
        for chunk in _pcm16_chunks(samples, self._front_end_chunk_samples):
            for feature_frame in front_end.process_streaming(chunk):
                probability = self._detector.process_streaming_prob(feature_frame)
                feature_frames += 1
                # Between inferences the package answers 0.0, which is not a score: keep only the frames that
                # completed a stride and so ran the model.
                if feature_frames % self._detector.stride == 0:
                    if probability is None:
                        raise RuntimeError(f"{self.name}: the TFLite interpreter was closed while scoring")
                    scores.append(probability)
        cpu_s = time.process_time() - cpu_start_s
        return PeerScores(scores=np.frombuffer(scores, dtype=np.float32).copy(), step_s=self.step_s, cpu_s=cpu_s)


class OpenWakeWordPeer:
    """openWakeWord's ``hey_jarvis`` classifier, on its shared mel spectrogram and speech embedding models."""

    name = "openWakeWord hey_jarvis"

    def __init__(self) -> None:
        self._package = _import_peer_package("pyopen_wakeword", "pyopen-wakeword")
        models_dir = _packaged_models_dir(
            self._package, f"{_WAKE_MODEL}.tflite", "melspectrogram.tflite", "embedding_model.tflite"
        )
        self.model_path: Path = models_dir / f"{_WAKE_MODEL}.tflite"
        """The classifier file, inside the installed package (its two feature models sit beside it)."""
        self._classifier: OpenWakeWord = self._package.OpenWakeWord.from_builtin(
            self._package.Model.HEY_JARVIS, models_dir=models_dir
        )
        self._features: OpenWakeWordFeatures = self._package.OpenWakeWordFeatures.from_builtin(models_dir=models_dir)
        self._chunk_samples: int = self._package.openwakeword.SAMPLES_PER_CHUNK
        """Samples per streamed chunk (80 ms): each yields one embedding, and so one classifier output."""
        self.step_s: float = self._chunk_samples / SAMPLE_RATE
        """Seconds between classifier outputs."""
        self._primed_state = self._primed_stream_state()
        """Streaming state once the start-up silence is heard, restored before each ``score``."""

    def score(self, audio: np.ndarray) -> PeerScores:
        """The classifier's output for each 80 ms chunk, over the last 16 embeddings (about 2 s of audio)."""
        samples = _checked_audio(audio)
        self._primed_state.restore(self._features, self._classifier)
        scores = array("f")
        cpu_start_s = time.process_time()
        for chunk in _pcm16_chunks(samples, self._chunk_samples):
            for embedding in self._features.process_streaming(chunk):
                scores.extend(self._classifier.process_streaming(embedding))
        cpu_s = time.process_time() - cpu_start_s
        return PeerScores(scores=np.frombuffer(scores, dtype=np.float32).copy(), step_s=self.step_s, cpu_s=cpu_s)

    def _primed_stream_state(self) -> _OpenWakeWordStreamState:
        """The state a fresh stream reaches before its first real chunk, computed once.

        Fresh state holds 8 s of zeros that the features treat as not yet heard, so a stream's first chunk runs
        about 100 mel, 90 embedding and 75 classifier invocations over that made-up past (some 0.4 s of CPU) before
        the one that covers it. Hearing one chunk of zeros does that work and leaves the buffers exactly as they
        would be (they hold only zeros, and each later chunk yields one score), so each ``score`` starts from this
        state: its first score is for its own first chunk, and its CPU time is that of its own audio, as on a
        stream that has been running.
        """
        self._features.reset()
        self._classifier.reset()
        for embedding in self._features.process_streaming(bytes(self._chunk_samples * np.dtype(np.int16).itemsize)):
            for _probability in self._classifier.process_streaming(embedding):
                pass
        return _OpenWakeWordStreamState.capture(self._features, self._classifier)


@dataclass(frozen=True)
class _OpenWakeWordStreamState:
    """Everything pyopen-wakeword keeps between chunks (the attributes its ``reset`` methods set); models hold none."""

    audio: np.ndarray
    """Last 10 s of 16-bit-scaled samples the mel spectrogram reads from."""
    new_audio_samples: int
    """How many of those samples no mel spectrogram has covered yet."""
    mels: np.ndarray
    """Last 10 s of mel frames the embedding model reads from."""
    new_mels: int
    """How many of those frames no embedding has covered yet."""
    embeddings: np.ndarray
    """Last 10 s of embeddings the classifier reads from."""
    new_embeddings: int
    """How many of those embeddings no classifier output has covered yet."""

    @classmethod
    def capture(cls, features: OpenWakeWordFeatures, classifier: OpenWakeWord) -> _OpenWakeWordStreamState:
        return cls(
            audio=features.audio.copy(),
            new_audio_samples=features.new_audio_samples,
            mels=features.mels.copy(),
            new_mels=features.new_mels,
            embeddings=classifier.embeddings.copy(),
            new_embeddings=classifier.new_embeddings,
        )

    def restore(self, features: OpenWakeWordFeatures, classifier: OpenWakeWord) -> None:
        # Copies: the package shifts these buffers in place as it streams.
        features.audio = self.audio.copy()
        features.new_audio_samples = self.new_audio_samples
        features.mels = self.mels.copy()
        features.new_mels = self.new_mels
        classifier.embeddings = self.embeddings.copy()
        classifier.new_embeddings = self.new_embeddings


def load_peers() -> dict[str, WakePeer]:
    """Both peers, models loaded, keyed "microwakeword" and "openwakeword".

    Raises RuntimeError naming the package to install when one is missing (both are pinned in mqvox[train]).
    """
    return {"microwakeword": MicroWakeWordPeer(), "openwakeword": OpenWakeWordPeer()}


def _import_peer_package(module_name: str, distribution_name: str) -> ModuleType:
    """The peer's package, imported here so that mqvox runs without it until a peer is asked for."""
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise RuntimeError(
            f"the wake-word peer needs the package {distribution_name}, which is not installed: "
            f"pip install -e '.[train]' (it pins {distribution_name})"
        ) from error


def _packaged_models_dir(package: ModuleType, *file_names: str) -> Path:
    """The package's own models folder, after checking it holds ``file_names``: models never come from elsewhere."""
    models_dir = Path(package.__file__ or "").resolve().parent / "models"
    missing = [name for name in file_names if not (models_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"{package.__name__} is installed without its bundled models {missing} in {models_dir}")
    return models_dir


def _checked_audio(audio: np.ndarray) -> np.ndarray:
    """``audio`` as a 1-D float array, without copying it (a 2 h input is large)."""
    samples = np.asarray(audio)
    if samples.ndim != 1 or not np.issubdtype(samples.dtype, np.floating):
        raise ValueError(f"expected mono float samples at {SAMPLE_RATE} Hz, not {samples.dtype} {samples.shape}")
    return samples


def _pcm16_chunks(samples: np.ndarray, chunk_samples: int) -> Iterator[bytes]:
    """``samples`` as 16-bit PCM, ``chunk_samples`` at a time; a last chunk shorter than that is left out.

    Conversion happens a block of whole chunks at a time, so the int16 copy stays small whatever the input length.
    """
    whole_chunks_samples = samples.size - samples.size % chunk_samples
    block_samples = chunk_samples * max(1, int(_CONVERSION_BLOCK_S * SAMPLE_RATE) // chunk_samples)
    chunk_bytes = chunk_samples * np.dtype(np.int16).itemsize
    for block_start in range(0, whole_chunks_samples, block_samples):
        block = samples[block_start : min(block_start + block_samples, whole_chunks_samples)]
        pcm = np.clip(np.rint(block * _PCM16_FULL_SCALE), -32768, 32767).astype(np.int16).tobytes()
        for offset in range(0, len(pcm), chunk_bytes):
            yield pcm[offset : offset + chunk_bytes]
