"""Recorded audio from a file (WAV, FLAC, OGG), as mono float samples at the rate the device works at."""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
import soundfile

DEVICE_SAMPLE_RATE = 16000
"""Rate (hertz) the device's front end and uploads use."""


class RecordingError(ValueError):
    """A file that cannot be used as speech input."""


def read_recording(path: str | Path, sample_rate: int = DEVICE_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples of ``path`` at ``sample_rate``: channels averaged, resampled if needed."""
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, OSError) as error:
        raise RecordingError(f"cannot read audio file {path}: {error}") from None
    mono = samples.mean(axis=1)
    if mono.size == 0:
        raise RecordingError(f"{path} holds no audio")
    if not np.all(np.isfinite(mono)):
        raise RecordingError(f"{path} holds NaN or infinite samples")
    if rate != sample_rate:
        from scipy.signal import resample_poly  # only when a file is not at the device rate

        divisor = gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // divisor, rate // divisor).astype(np.float32)
    return mono
