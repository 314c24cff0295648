"""Recorded audio from a file (WAV, FLAC, OGG), as mono float samples at the rate the device works at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile
import soxr

DEVICE_SAMPLE_RATE = 16000
"""Rate (hertz) the device's front end and uploads use."""

PCM_SCALE = 32768.0
"""Full scale of signed 16-bit PCM: float samples in [-1, 1] times this are PCM units."""


class RecordingError(ValueError):
    """A file that cannot be used as speech input."""


def unreadable(path: str | Path, error: Exception) -> str:
    """Why a recording cannot be opened, in words: libsndfile says only "System error" for a missing file and
    "Format not recognised" for an empty one."""
    path = Path(path)
    if not path.exists():
        return f"no such audio file: {path}"
    if not path.is_file():
        return f"{path} is not a file"
    if path.stat().st_size == 0:
        return f"audio file {path} is empty (0 bytes)"
    reason = (error.error_string if isinstance(error, soundfile.LibsndfileError) else str(error)).rstrip(".")
    return f"cannot read audio file {path}: {reason} (WAV, FLAC or OGG are read)"


def read_recording(path: str | Path, sample_rate: int = DEVICE_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate``: channels averaged, resampled if needed."""
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, OSError) as error:
        raise RecordingError(unreadable(path, error)) from None
    mono = samples.mean(axis=1)
    if mono.size == 0:
        raise RecordingError(f"{path} holds no audio")
    if not np.all(np.isfinite(mono)):
        raise RecordingError(f"{path} holds NaN or infinite samples")
    if rate != sample_rate:
        # soxr, as the streaming sources in audio_sources.py use, so a file reads the same either way.
        mono = soxr.resample(mono, rate, sample_rate)
    return mono
