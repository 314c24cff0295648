"""The feature front end: log mel filterbank energies, in one batch or streaming chunk by chunk.

Training computes :func:`batch_features` over whole clips with python_speech_features;
the device computes :class:`StreamingFrontend` as audio arrives. Both read their
parameters from the model's :class:`~schemas.model.Frontend`, so the manifest is the
only place they are written, and tests hold the two equal.

The device side does not import python_speech_features: importing it imports
scipy.fftpack (for a DCT that log filterbanks never use), which costs 28 MB of
resident memory on a device whose budget is 100 MB. The three pieces the stream
needs (the mel filterbank, the power spectrum, half-up rounding) are written here
in numpy, the same formulas; tests/test_features.py holds them equal to the library's.
"""

from __future__ import annotations

import decimal
from functools import cache

import numpy as np

from common.recording import PCM_SCALE
from schemas.model import Frontend

WINDOWS = {"hamming": np.hamming, "hann": np.hanning, "rectangular": np.ones}
"""Analysis windows a front end may name."""

SUPPORTED_KINDS = ("logfbank",)
"""Feature kinds this device computes; a model asking for another is refused."""


class UnsupportedFrontend(ValueError):
    """A model whose front end this device cannot compute."""


def check_frontend(frontend: Frontend) -> None:
    """Raise UnsupportedFrontend unless this module computes exactly what ``frontend`` asks for."""
    if frontend.kind not in SUPPORTED_KINDS:
        raise UnsupportedFrontend(f"front end kind {frontend.kind!r} is not supported (only {SUPPORTED_KINDS})")
    if frontend.window not in WINDOWS:
        raise UnsupportedFrontend(f"analysis window {frontend.window!r} is not supported (only {tuple(WINDOWS)})")
    if frontend.num_features != frontend.num_filters:
        raise UnsupportedFrontend("logfbank gives one feature per filter: num_features must equal num_filters")
    if frontend.high_hz > frontend.sample_rate / 2 or frontend.low_hz >= frontend.high_hz:
        raise UnsupportedFrontend(f"filter edges {frontend.low_hz}-{frontend.high_hz} Hz do not fit the sample rate")
    if frame_length(frontend) > frontend.fft_size:
        raise UnsupportedFrontend("the analysis window is longer than the FFT")


def _round_half_up(number: float) -> int:
    # As python_speech_features.sigproc.round_half_up: 0.5 rounds up, not to even.
    return int(decimal.Decimal(number).quantize(decimal.Decimal("1"), rounding=decimal.ROUND_HALF_UP))


def frame_length(frontend: Frontend) -> int:
    """Samples in one analysis window."""
    return _round_half_up(frontend.window_s * frontend.sample_rate)


def frame_step(frontend: Frontend) -> int:
    """Samples between the starts of consecutive windows."""
    return _round_half_up(frontend.step_s * frontend.sample_rate)


def _hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    return 2595 * np.log10(1 + np.asarray(hz) / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700 * (10 ** (mel / 2595.0) - 1)


@cache
def mel_filterbank(frontend: Frontend) -> np.ndarray:
    """Triangular mel filters, [num_filters, fft_size // 2 + 1], as python_speech_features.get_filterbanks."""
    points = np.linspace(_hz_to_mel(frontend.low_hz), _hz_to_mel(frontend.high_hz), frontend.num_filters + 2)
    bins = np.floor((frontend.fft_size + 1) * _mel_to_hz(points) / frontend.sample_rate)
    filters = np.zeros((frontend.num_filters, frontend.fft_size // 2 + 1))
    for index in range(frontend.num_filters):
        left, centre, right = bins[index : index + 3]
        rising = np.arange(int(left), int(centre))
        falling = np.arange(int(centre), int(right))
        filters[index, rising] = (rising - left) / (centre - left)
        filters[index, falling] = (right - falling) / (right - centre)
    filters.flags.writeable = False
    return filters


def power_spectrum(frames: np.ndarray, fft_size: int) -> np.ndarray:
    """Power spectrum of each row, as python_speech_features.sigproc.powspec."""
    return np.square(np.abs(np.fft.rfft(frames, fft_size))) / fft_size


def window_samples(frontend: Frontend) -> int:
    """Samples that give exactly ``frontend.frames`` frames: one model input window."""
    return frame_length(frontend) + (frontend.frames - 1) * frame_step(frontend)


def complete_frames(frontend: Frontend, num_samples: int) -> int:
    """Frames whose whole window lies inside ``num_samples`` samples."""
    length = frame_length(frontend)
    return 0 if num_samples < length else 1 + (num_samples - length) // frame_step(frontend)


def batch_features(frontend: Frontend, audio: np.ndarray) -> np.ndarray:
    """Features of a whole clip, [complete frames, num_features] float32 (python_speech_features.fbank)."""
    import python_speech_features  # training only: see the module's docstring

    check_frontend(frontend)
    count = complete_frames(frontend, len(audio))
    if count == 0:
        return np.zeros((0, frontend.num_features), np.float32)
    energies, _ = python_speech_features.fbank(
        np.asarray(audio, np.float64) * PCM_SCALE,
        samplerate=frontend.sample_rate,
        winlen=frontend.window_s,
        winstep=frontend.step_s,
        nfilt=frontend.num_filters,
        nfft=frontend.fft_size,
        lowfreq=frontend.low_hz,
        highfreq=frontend.high_hz,
        preemph=frontend.preemphasis,
        winfunc=WINDOWS[frontend.window],
    )
    # fbank zero-pads a last, partial window; the device never sees one, so neither does training.
    return _log(frontend, energies[:count])


def _log(frontend: Frontend, energies: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(energies, frontend.energy_floor)).astype(np.float32)


class StreamingFrontend:
    """Features computed incrementally: each pushed chunk yields the frames it completes, nothing is recomputed.

    Carries over only the pre-emphasis memory (one sample) and the samples of
    windows not yet complete (less than one window), so its cost per second of
    audio is the same whatever the chunk size.
    """

    def __init__(self, frontend: Frontend) -> None:
        check_frontend(frontend)
        self.frontend = frontend
        self._length = frame_length(frontend)
        self._step = frame_step(frontend)
        self._window = WINDOWS[frontend.window](self._length)
        self._filterbank = mel_filterbank(frontend).T
        self.reset()

    def reset(self) -> None:
        """Forget all audio, as at the start of a new stream."""
        self._pending = np.zeros(0, np.float64)
        self._previous_sample: float | None = None
        self.frames_emitted = 0

    def push(self, audio: np.ndarray) -> np.ndarray:
        """Add samples (float in [-1, 1]); return the newly completed frames, [n, num_features] float32."""
        # Scaled to PCM units (as in training), so energies do not depend on the sample dtype.
        samples = np.asarray(audio, np.float64) * PCM_SCALE
        if samples.size == 0:
            return np.zeros((0, self.frontend.num_features), np.float32)
        emphasised = np.empty_like(samples)
        coefficient = self.frontend.preemphasis
        # The first sample of the stream passes unchanged, as in sigproc.preemphasis.
        if self._previous_sample is None:
            emphasised[0] = samples[0]
        else:
            emphasised[0] = samples[0] - coefficient * self._previous_sample
        emphasised[1:] = samples[1:] - coefficient * samples[:-1]
        self._previous_sample = float(samples[-1])
        pending = np.concatenate((self._pending, emphasised))
        count = 0 if len(pending) < self._length else 1 + (len(pending) - self._length) // self._step
        if count == 0:
            self._pending = pending
            return np.zeros((0, self.frontend.num_features), np.float32)
        windows = np.lib.stride_tricks.sliding_window_view(pending, self._length)[:: self._step][:count]
        power = power_spectrum(windows * self._window, self.frontend.fft_size)
        self._pending = pending[count * self._step :]
        self.frames_emitted += count
        return _log(self.frontend, power @ self._filterbank)


def window_features(frontend: Frontend, audio: np.ndarray) -> np.ndarray:
    """Features of one stretch of audio, computed as the device streams them (no python_speech_features)."""
    return StreamingFrontend(frontend).push(audio)
