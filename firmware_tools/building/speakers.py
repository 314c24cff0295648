"""New speakers from a rendered clip: WORLD analysis, then pitch and vocal-tract-length changes, then resynthesis.

Few speech engines mean few speakers. Scaling the fundamental frequency moves the
voice's pitch; warping the frequency axis of the spectral envelope moves its
formants, as a shorter or longer vocal tract would.
"""

from __future__ import annotations

import numpy as np
import pyworld

FRAME_PERIOD_MS = 5.0
"""WORLD analysis hop (milliseconds)."""


def transform_speaker(audio: np.ndarray, sample_rate: int, f0_factor: float, formant_factor: float) -> np.ndarray:
    """``audio`` as said by another speaker: pitch times ``f0_factor``, formants times ``formant_factor``."""
    signal = np.ascontiguousarray(audio, dtype=np.float64)
    # dio + stonemask instead of harvest: ten times faster, and good enough on clean TTS.
    coarse_f0, times = pyworld.dio(signal, sample_rate, frame_period=FRAME_PERIOD_MS)
    f0 = pyworld.stonemask(signal, coarse_f0, times, sample_rate)
    envelope = pyworld.cheaptrick(signal, f0, times, sample_rate)
    aperiodicity = pyworld.d4c(signal, f0, times, sample_rate)
    warped = warp_frequency_axis(envelope, formant_factor)
    out = pyworld.synthesize(f0 * f0_factor, warped, aperiodicity, sample_rate, FRAME_PERIOD_MS)
    out = out[: len(audio)]
    peak = float(np.max(np.abs(out))) or 1.0
    return (out * (0.9 / peak)).astype(np.float32)


def warp_frequency_axis(envelope: np.ndarray, factor: float) -> np.ndarray:
    """Each frame's spectrum stretched by ``factor`` (>1 moves formants up), linear interpolation between bins."""
    bins = envelope.shape[1]
    source = np.arange(bins) / factor
    lower = np.clip(np.floor(source).astype(int), 0, bins - 1)
    upper = np.clip(lower + 1, 0, bins - 1)
    weight = np.clip(source - lower, 0.0, 1.0)
    warped = envelope[:, lower] * (1.0 - weight) + envelope[:, upper] * weight
    # Above the stretched top the envelope has no source: hold the last value rather than invent energy.
    warped[:, source > bins - 1] = envelope[:, -1:]
    return np.ascontiguousarray(np.maximum(warped, 1e-16))
