"""RNNoise noise suppression, through the library that the pyrnnoise wheel bundles.

RNNoise works at 48 kHz in 10 ms frames; the device works at 16 kHz, so audio is
resampled up and back down with soxr. The C library is called through ctypes
directly: importing the ``pyrnnoise`` package would pull in its file-conversion
helpers (audiolab and PyAV, about 0.3 s and tens of MB), which a device never uses.
So the device installs pyrnnoise without its dependencies (pip ``--no-deps``, from
firmware_tools/onboarding/deploy/requirements-no-deps.txt): the library needs libc alone.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import soxr

from common.recording import PCM_SCALE

RNNOISE_SAMPLE_RATE = 48000
"""The only rate RNNoise works at (hertz)."""

RNNOISE_DELAY_FRAMES = 2
"""RNNoise's output lags its input by two 10 ms frames (its analysis window and lookahead); measured, and held by
tests/test_capture.py. The denoiser removes the lag, so denoised audio lines up with the input."""


class DenoiserUnavailable(RuntimeError):
    """RNNoise cannot be loaded on this device."""


@cache
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("pyrnnoise")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DenoiserUnavailable(
            "RNNoise needs the pyrnnoise wheel's library: pip install --no-deps -r "
            "firmware_tools/onboarding/deploy/requirements-no-deps.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "librnnoise.so"
    try:
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise DenoiserUnavailable(f"cannot load RNNoise from {path}: {error}") from None
    library.rnnoise_create.argtypes = [ctypes.c_void_p]
    library.rnnoise_create.restype = ctypes.c_void_p
    library.rnnoise_destroy.argtypes = [ctypes.c_void_p]
    library.rnnoise_get_frame_size.restype = ctypes.c_int
    float_pointer = ctypes.POINTER(ctypes.c_float)
    library.rnnoise_process_frame.argtypes = [ctypes.c_void_p, float_pointer, float_pointer]
    library.rnnoise_process_frame.restype = ctypes.c_float
    return library


class StreamDenoiser:
    """Denoises a stream at ``sample_rate`` chunk by chunk, with RNNoise's state carried across chunks.

    Output is aligned with the input: sample ``i`` out is sample ``i`` in, denoised.
    It comes out later, though, by RNNoise's lag and the part of a 10 ms frame not
    yet complete; ``flush()`` returns the rest at the end of the stream.
    """

    def __init__(self, sample_rate: int = 16000) -> None:
        self._library = _library()
        self._state = self._library.rnnoise_create(None)
        self._frame = self._library.rnnoise_get_frame_size()
        self._up = soxr.ResampleStream(sample_rate, RNNOISE_SAMPLE_RATE, 1, dtype="float32")
        self._down = soxr.ResampleStream(RNNOISE_SAMPLE_RATE, sample_rate, 1, dtype="float32")
        self._pending = np.zeros(0, np.float32)
        self._lag_to_drop = RNNOISE_DELAY_FRAMES * self._frame
        self.speech_probability = 0.0
        """RNNoise's voice activity estimate for the last frame."""

    def push(self, audio: np.ndarray) -> np.ndarray:
        """Denoise a chunk; returns the denoised audio that is ready (float32, possibly empty)."""
        return self._run(self._up.resample_chunk(np.asarray(audio, np.float32)), last=False)

    def flush(self) -> np.ndarray:
        """The rest of the stream; the denoiser cannot be used afterwards."""
        upsampled = self._up.resample_chunk(np.zeros(0, np.float32), last=True)
        # Silence pushes the last real samples out through RNNoise's lag.
        lag = np.zeros(RNNOISE_DELAY_FRAMES * self._frame, np.float32)
        return self._run(np.concatenate((upsampled, lag)), last=True)

    def _run(self, upsampled: np.ndarray, *, last: bool) -> np.ndarray:
        pending = np.concatenate((self._pending, upsampled)) * np.float32(PCM_SCALE)
        if last and len(pending) % self._frame:
            pending = np.concatenate((pending, np.zeros(self._frame - len(pending) % self._frame, np.float32)))
        count = len(pending) // self._frame
        frames = np.ascontiguousarray(pending[: count * self._frame], np.float32)
        pointer = ctypes.POINTER(ctypes.c_float)
        for index in range(count):
            view = frames[index * self._frame : (index + 1) * self._frame]
            address = view.ctypes.data_as(pointer)
            self.speech_probability = self._library.rnnoise_process_frame(self._state, address, address)
        self._pending = pending[count * self._frame :] / np.float32(PCM_SCALE)
        output = frames / np.float32(PCM_SCALE)
        if self._lag_to_drop:
            dropped = min(self._lag_to_drop, len(output))
            output, self._lag_to_drop = output[dropped:], self._lag_to_drop - dropped
        return self._down.resample_chunk(output, last=last)

    def close(self) -> None:
        if getattr(self, "_state", None) is not None:  # None too when __init__ could not load RNNoise
            self._library.rnnoise_destroy(self._state)
            self._state = None

    def __del__(self) -> None:
        self.close()


def denoise(audio: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """One whole utterance through a fresh RNNoise state; the result has the input's length."""
    denoiser = StreamDenoiser(sample_rate)
    try:
        output = np.concatenate((denoiser.push(audio), denoiser.flush()))
    finally:
        denoiser.close()
    if len(output) >= len(audio):
        return output[: len(audio)]
    return np.concatenate((output, np.zeros(len(audio) - len(output), np.float32)))
