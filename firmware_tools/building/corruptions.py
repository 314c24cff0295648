"""Corruptions of training audio: noise, reverb, speed, pitch, band limit, gain, and SpecAugment of features.

The augment stage (``augment.py``) applies them to its windows through ``Augmenter``, as a recipe's
``AugmentSettings`` says; the features stage applies ``spec_augment``.

Audio is 16 kHz mono float in [-1, 1]. Every random choice comes from the ``numpy.random.Generator``
passed in, so a seed reproduces a run. Everything is vectorised numpy/scipy; a 1.5 s clip takes a
few milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from numbers import Real
from typing import Any, Self

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view
from scipy.signal import butter, fftconvolve, firwin, get_window, kaiserord, lfilter, resample_poly

SAMPLE_RATE = 16000
"""Sample rate (hertz) of every clip the pipeline handles."""

NOISE_KINDS = ("white", "pink", "brown", "babble", "hum")
"""Background noises make_noise can synthesise."""

_COLOURED_NOISE_FLOOR_HZ = 20.0
"""Below this frequency (hertz) pink and brown noise stay flat, so inaudible rumble cannot take most of their energy."""

_HUM_TABLE_SIZE = 1024
"""Points per period of the wavetable hum is read from; interpolating it is exact to about -80 dB."""

_LEVEL_FRAME_SAMPLES = 160
"""Frame (samples; 10 ms at 16 kHz) over which mix_at_snr decides whether speech is active."""

_ACTIVE_SPEECH_FLOOR_DB = -50.0
"""Frames this far (dB) below the loudest frame count as silence when measuring the speech level."""

_SILENT_SPEECH_REFERENCE_RMS = 0.1
"""Speech level (RMS, -20 dBFS, typical close-talk speech) assumed when mixing noise into a silent clip."""

_EARLY_REFLECTIONS_S = 0.05
"""Early reflections of a room impulse response arrive within this time (seconds) of the direct path."""

_DIRECT_TO_REVERBERANT_DB = (-3.0, 9.0)
"""Range (dB) of the energy ratio of the direct path to the reverberant tail: far to near talkers."""

_BAND_LIMIT_STOPBAND_DB = 60.0
"""Attenuation (dB) of band_limit at and above its cutoff."""

_BAND_LIMIT_PASSBAND_FRACTION = 0.8
"""band_limit passes frequencies up to this fraction of its cutoff unchanged; the rest is its transition band."""

_MAX_RESAMPLING_DENOMINATOR = 64
"""Largest up/down factor change_speed uses; the speed factor is rounded to a fraction within 1/64**2 of it."""

_STRETCH_FRAME = 512
"""Frame length (samples; 32 ms) of the phase vocoder that stretches pitch-shifted audio back to length."""

_STRETCH_HOP = _STRETCH_FRAME // 4
"""Hop (samples) of that phase vocoder; four frames overlap at every sample."""


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio)))) if audio.size else 0.0


def _unit_rms(audio: np.ndarray) -> np.ndarray:
    level = _rms(audio)
    return audio / level if level > 0 else audio


def _as_mono(audio: np.ndarray, name: str = "audio") -> np.ndarray:
    samples = np.asarray(audio, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"{name} must be mono (one dimension), got shape {samples.shape}")
    return samples


# --- noise -------------------------------------------------------------------------------------------------------


def make_noise(
    kind: str, num_samples: int, rng: np.random.Generator, babble_sources: Sequence[np.ndarray] = ()
) -> np.ndarray:
    """Unit-RMS background noise of ``kind`` (one of NOISE_KINDS), ``num_samples`` long at SAMPLE_RATE.

    white: Gaussian. pink, brown: white noise shaped in the frequency domain to a power spectrum of 1/f and
    1/f**2 (flat below 20 Hz). babble: 3 to 6 clips chosen from ``babble_sources`` (speech from other clips),
    each looped from a random offset, brought to unit RMS and summed; pink noise when none has sound.
    hum: machine or fan hum, a 45-65 Hz (mains, motor) or 90-130 Hz fundamental with decaying harmonics and a
    slight frequency wobble, over low-passed broadband fan noise whose amplitude swells slowly.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; known kinds: {', '.join(NOISE_KINDS)}")
    if num_samples < 0:
        raise ValueError(f"num_samples must not be negative, got {num_samples}")
    if num_samples == 0:
        return np.zeros(0)
    if kind == "white":
        return _unit_rms(rng.standard_normal(num_samples))
    if kind == "pink":
        return _coloured_noise(num_samples, rng, exponent=1.0)
    if kind == "brown":
        return _coloured_noise(num_samples, rng, exponent=2.0)
    if kind == "babble":
        return _babble(num_samples, rng, babble_sources)
    return _hum(num_samples, rng)


def _coloured_noise(num_samples: int, rng: np.random.Generator, exponent: float) -> np.ndarray:
    """Unit-RMS noise whose power spectrum falls as 1/f**exponent above _COLOURED_NOISE_FLOOR_HZ."""
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    frequencies = np.fft.rfftfreq(num_samples, d=1.0 / SAMPLE_RATE)
    # Amplitude goes as the square root of power, hence exponent / 2.
    spectrum *= np.maximum(frequencies, _COLOURED_NOISE_FLOOR_HZ) ** (-exponent / 2.0)
    spectrum[0] = 0.0  # no DC offset
    return _unit_rms(np.fft.irfft(spectrum, n=num_samples))


def _babble(num_samples: int, rng: np.random.Generator, sources: Sequence[np.ndarray]) -> np.ndarray:
    """Several talkers at once: 3 to 6 source clips, each looped from a random offset and brought to unit RMS.

    Only the chosen clips are read, and only the part used, so a pool of thousands of clips costs nothing extra.
    """
    if not sources:
        return _coloured_noise(num_samples, rng, exponent=1.0)
    talkers = int(rng.integers(3, 7))
    chosen = rng.choice(len(sources), size=talkers, replace=len(sources) < talkers)
    positions = np.arange(num_samples)
    mixture = np.zeros(num_samples)
    for index in chosen:  # a handful of talkers, each one vectorised
        clip = np.asarray(sources[index])
        if clip.ndim != 1:
            raise ValueError(f"babble source {index} must be mono (one dimension), got shape {clip.shape}")
        if clip.size:
            mixture += _unit_rms(clip[(positions + int(rng.integers(clip.size))) % clip.size].astype(np.float64))
    if not mixture.any():  # every chosen source was silent
        return _coloured_noise(num_samples, rng, exponent=1.0)
    return _unit_rms(mixture)


def _hum(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Machine or fan hum: harmonics of a wobbling low fundamental over slowly swelling low-passed noise."""
    # The slow modulations are computed in float32, whose sines numpy vectorises: several times faster than float64.
    seconds = (np.arange(num_samples) / SAMPLE_RATE).astype(np.float32)
    fundamental_hz = rng.uniform(45.0, 65.0) if rng.random() < 0.5 else rng.uniform(90.0, 130.0)
    # Motors and mains drift a little: up to 1 % of the frequency, a few times a second at most.
    wobble = 1.0 + rng.uniform(0.002, 0.01) * np.sin(2 * np.pi * rng.uniform(0.1, 1.0) * seconds + rng.uniform(0, 7))
    turns = np.cumsum(fundamental_hz / SAMPLE_RATE * wobble, dtype=np.float64)
    harmonics = np.arange(1, int(rng.integers(3, 9)) + 1)
    harmonics = harmonics[harmonics * fundamental_hz * 1.02 < SAMPLE_RATE / 2]
    # Each harmonic weaker than the one below, so the fundamental is always the spectral peak.
    amplitudes = rng.uniform(0.4, 0.8) ** (harmonics - 1) * rng.uniform(0.5, 1.0, harmonics.size)
    amplitudes[0] = 1.0
    offsets = rng.uniform(0.0, 2 * np.pi, harmonics.size)
    # Wavetable: one period of the harmonic waveform, read at the wobbling phase, costs one interpolation
    # instead of one sine per harmonic and sample.
    table_phase = np.linspace(0.0, 2 * np.pi, _HUM_TABLE_SIZE + 1)
    table = amplitudes @ np.sin(np.outer(harmonics, table_phase) + offsets[:, None])
    # Linear interpolation by hand: the table is uniform, so no search as in np.interp is needed.
    position = (turns - np.floor(turns)) * _HUM_TABLE_SIZE
    below = position.astype(np.intp)
    tones = table[below] + (position - below) * np.diff(table)[below]
    fan_b, fan_a = _fan_lowpass(int(rng.integers(200, 801)))
    fan = lfilter(fan_b, fan_a, rng.standard_normal(num_samples))
    fan *= 1.0 + rng.uniform(0.1, 0.4) * np.sin(2 * np.pi * rng.uniform(0.5, 4.0) * seconds + rng.uniform(0, 7))
    fan_level = 10.0 ** (rng.uniform(-20.0, -6.0) / 20.0)
    return _unit_rms(_unit_rms(tones) + fan_level * _unit_rms(fan))


@lru_cache(maxsize=601)  # one per whole hertz from 200 to 800
def _fan_lowpass(cutoff_hz: int) -> tuple[np.ndarray, np.ndarray]:
    """Second-order Butterworth low-pass (b, a) at ``cutoff_hz``; cached, as designing one costs more than using it."""
    return butter(2, cutoff_hz, fs=SAMPLE_RATE)


def _active_rms(speech: np.ndarray) -> float:
    """RMS over the 10 ms frames within _ACTIVE_SPEECH_FLOOR_DB of the loudest: the level of the speech itself."""
    frame_count = -(-speech.size // _LEVEL_FRAME_SAMPLES)
    padded = np.zeros(frame_count * _LEVEL_FRAME_SAMPLES)
    padded[: speech.size] = speech
    energies = np.square(padded).reshape(frame_count, _LEVEL_FRAME_SAMPLES).sum(axis=1)
    lengths = np.full(frame_count, _LEVEL_FRAME_SAMPLES)
    lengths[-1] = speech.size - (frame_count - 1) * _LEVEL_FRAME_SAMPLES
    powers = energies / lengths
    if powers.max() <= 0:
        return 0.0
    active = powers >= powers.max() * 10.0 ** (_ACTIVE_SPEECH_FLOOR_DB / 10.0)
    return float(np.sqrt(energies[active].sum() / lengths[active].sum()))


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``speech`` plus ``noise`` scaled so that active-speech RMS over noise RMS is ``snr_db`` (dB).

    The speech level counts only 10 ms frames within 50 dB of the loudest frame, so silence around a
    word does not lower it. The noise is looped or cropped to the length of the speech. A silent clip
    gets the noise as if the speech were at -20 dBFS RMS. The sum is not clipped.
    """
    speech = _as_mono(speech, "speech")
    noise = _as_mono(noise, "noise")
    if speech.size == 0:
        return speech.copy()
    if noise.size == 0:
        raise ValueError("noise is empty")
    noise = np.resize(noise, speech.size)  # np.resize repeats the array: loops short noise
    noise_rms = _rms(noise)
    if noise_rms == 0:
        return speech.copy()
    speech_rms = _active_rms(speech) or _SILENT_SPEECH_REFERENCE_RMS
    return speech + noise * (speech_rms / (noise_rms * 10.0 ** (snr_db / 20.0)))


# --- room --------------------------------------------------------------------------------------------------------


def room_impulse_response(rng: np.random.Generator, rt60_s: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A synthetic room impulse response with reverberation time ``rt60_s`` (seconds, decay by 60 dB).

    The direct path, of amplitude 1, is sample 0. Then 3 to 7 sparse early reflections (amplitude 0.2 to
    0.7, either sign) within 50 ms, and a Gaussian noise tail that builds up over a few milliseconds and
    decays exponentially, at -3 to +9 dB direct-to-reverberant energy ratio. It lasts ``rt60_s``, at least 50 ms.
    """
    if not rt60_s > 0:
        raise ValueError(f"rt60_s must be positive, got {rt60_s}")
    length = math.ceil(max(rt60_s, _EARLY_REFLECTIONS_S) * sample_rate) + 1
    seconds = np.arange(length) / sample_rate
    onset_s = rng.uniform(0.002, 0.01)
    build_up = np.clip((seconds - onset_s) / 0.005, 0.0, 1.0)
    # Energy falls by 60 dB in rt60_s, so amplitude by 10**-3: exp(-3 ln 10 t / rt60).
    tail = rng.standard_normal(length) * build_up * np.exp(-3.0 * np.log(10.0) * seconds / rt60_s)
    direct_to_reverberant_db = rng.uniform(*_DIRECT_TO_REVERBERANT_DB)
    rir = tail * np.sqrt(10.0 ** (-direct_to_reverberant_db / 10.0) / np.sum(np.square(tail)))
    reflection_count = int(rng.integers(3, 8))
    delays = rng.integers(int(0.002 * sample_rate), int(_EARLY_REFLECTIONS_S * sample_rate), reflection_count)
    gains = rng.uniform(0.2, 0.7, reflection_count) * rng.choice((-1.0, 1.0), reflection_count)
    np.add.at(rir, delays, gains)
    rir[0] = 1.0
    return rir


def reverberate(audio: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``audio`` convolved with ``rir``: same length, aligned so the direct path (the RIR's peak) is not delayed.

    The result is rescaled to the peak of the input, so it clips no more than the input did.
    """
    audio = _as_mono(audio)
    rir = _as_mono(rir, "rir")
    if audio.size == 0 or rir.size == 0:
        return audio.copy()
    direct = int(np.argmax(np.abs(rir)))
    wet = fftconvolve(audio, rir)[direct : direct + audio.size]
    wet_peak = np.max(np.abs(wet))
    return wet * (np.max(np.abs(audio)) / wet_peak) if wet_peak > 0 else wet


# --- level and time ----------------------------------------------------------------------------------------------


def change_gain(audio: np.ndarray, gain_db: float) -> np.ndarray:
    """``audio`` amplified by ``gain_db`` (dB) and clipped to [-1, 1], as an overdriven input would."""
    return np.clip(_as_mono(audio) * 10.0 ** (gain_db / 20.0), -1.0, 1.0)


def time_shift(audio: np.ndarray, shift_samples: int) -> np.ndarray:
    """``audio`` moved ``shift_samples`` later (earlier if negative), same length, zeros where nothing was."""
    audio = _as_mono(audio)
    shifted = np.zeros_like(audio)
    if abs(shift_samples) >= audio.size:
        return shifted
    if shift_samples >= 0:
        shifted[shift_samples:] = audio[: audio.size - shift_samples]
    else:
        shifted[:shift_samples] = audio[-shift_samples:]
    return shifted


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """``audio`` played ``factor`` times faster, tempo and pitch together: 1.1 is 10 % shorter and higher.

    Resamples by the fraction nearest ``factor`` with both terms at most 64.
    """
    if not factor > 0:
        raise ValueError(f"speed factor must be positive, got {factor}")
    audio = _as_mono(audio)
    ratio = Fraction(factor).limit_denominator(_MAX_RESAMPLING_DENOMINATOR)
    if ratio.numerator == 0:
        raise ValueError(f"speed factor {factor} is too small")
    if ratio == 1 or audio.size == 0:
        return audio.copy()
    return resample_poly(audio, up=ratio.denominator, down=ratio.numerator)


def _fit_length(audio: np.ndarray, length: int) -> np.ndarray:
    """``audio`` cropped or zero-padded to ``length``, evenly at both ends so the content stays centred."""
    if audio.size >= length:
        start = (audio.size - length) // 2
        return audio[start : start + length]
    before = (length - audio.size) // 2
    return np.pad(audio, (before, length - audio.size - before))


def shift_pitch(audio: np.ndarray, semitones: float) -> np.ndarray:
    """``audio`` ``semitones`` higher (lower if negative) at the same duration.

    Resamples (which changes pitch and duration together), then stretches back to the input length with a
    phase vocoder with identity phase locking, which keeps voices less phasey than a plain one.
    """
    audio = _as_mono(audio)
    if semitones == 0 or audio.size == 0:
        return audio.copy()
    return _time_stretch(change_speed(audio, 2.0 ** (semitones / 12.0)), audio.size)


@lru_cache(maxsize=1)
def _stretch_window() -> np.ndarray:
    return get_window("hann", _STRETCH_FRAME).astype(np.float32)


def _overlap_add(frames: np.ndarray) -> np.ndarray:
    """Sum of ``frames`` [count, _STRETCH_FRAME] placed _STRETCH_HOP apart, without a per-frame loop."""
    overlap = _STRETCH_FRAME // _STRETCH_HOP
    blocks = frames.reshape(frames.shape[0], overlap, _STRETCH_HOP)
    summed = np.zeros((frames.shape[0] + overlap - 1, _STRETCH_HOP))
    for part in range(overlap):  # four slices, each over every frame at once
        summed[part : part + frames.shape[0]] += blocks[:, part]
    return summed.ravel()


def _time_stretch(audio: np.ndarray, length: int) -> np.ndarray:
    """``audio`` stretched or squeezed in time to exactly ``length`` samples, pitch unchanged (phase vocoder).

    Phases are carried as unit phasors, so the per-hop phase advance needs no angle() or wrapping, and the
    arithmetic is float32: this is augmentation, and it halves the memory traffic.
    """
    window = _stretch_window()
    half = _STRETCH_FRAME // 2
    padded = np.pad(audio.astype(np.float32), (half, half + _STRETCH_FRAME))
    spectra = scipy.fft.rfft(sliding_window_view(padded, _STRETCH_FRAME)[::_STRETCH_HOP] * window, axis=1)
    magnitudes = np.abs(spectra)
    # Silent bins have no phase; giving them phasor 1 keeps the running product below from collapsing to 0.
    phasors = np.divide(spectra, magnitudes, out=np.ones_like(spectra), where=magnitudes > 0)
    synthesis_frames = -(-length // _STRETCH_HOP) + 2
    # Fractional analysis frame read for each synthesis frame; both sides step by the same hop.
    position = np.minimum(np.arange(synthesis_frames) * (audio.size / length), spectra.shape[0] - 1.001)
    earlier = position.astype(int)
    fraction = (position - earlier).astype(np.float32)[:, None]
    magnitude = (1.0 - fraction) * magnitudes[earlier] + fraction * magnitudes[earlier + 1]
    # Each synthesis frame turns every bin by the phase it turned through between two analysis frames.
    turns = phasors[earlier[:-1] + 1] * np.conj(phasors[earlier[:-1]])
    running = np.cumprod(np.concatenate([phasors[:1], turns]), axis=0)
    locked = _lock_phases_to_peaks(magnitude, running, phasors[earlier])
    frames = scipy.fft.irfft(magnitude * locked, n=_STRETCH_FRAME, axis=1) * window
    norm = _overlap_add(np.broadcast_to(window**2, frames.shape))
    stretched = _overlap_add(frames) / np.maximum(norm, 1e-3)
    return stretched[half : half + length].astype(np.float64)  # synthesis_frames covers it with frames to spare


def _lock_phases_to_peaks(magnitude: np.ndarray, running: np.ndarray, analysis: np.ndarray) -> np.ndarray:
    """Identity phase locking: each bin keeps the analysis phase offset it had from its nearest spectral peak.

    ``running`` and ``analysis`` are unit phasors [frames, bins]; returns the phasors to synthesise with.
    """
    bins = magnitude.shape[1]
    index = np.arange(bins, dtype=np.int16)  # bin numbers fit in 16 bits, and the passes below run faster on them
    peaks = np.zeros(magnitude.shape, dtype=bool)
    peaks[:, 1:-1] = (magnitude[:, 1:-1] > magnitude[:, :-2]) & (magnitude[:, 1:-1] >= magnitude[:, 2:])
    left = np.maximum.accumulate(np.where(peaks, index, np.int16(-bins)), axis=1)
    right = np.minimum.accumulate(np.where(peaks, index, np.int16(2 * bins))[:, ::-1], axis=1)[:, ::-1]
    nearest = np.where(index - left <= right - index, left, right)
    nearest = np.where((nearest < 0) | (nearest >= bins), index, nearest)  # frames without a peak stay as they are
    # Flat indices: np.take on them is several times faster than take_along_axis.
    nearest = (nearest + bins * np.arange(magnitude.shape[0])[:, None]).ravel()
    peak_rotation = np.take(running, nearest) * np.conj(np.take(analysis, nearest))
    return peak_rotation.reshape(analysis.shape) * analysis


# --- channel -----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=16)
def _lowpass_taps(cutoff_hz: float, sample_rate: int) -> np.ndarray:
    """Linear-phase FIR, flat to 0.8 of the cutoff and _BAND_LIMIT_STOPBAND_DB down from the cutoff up."""
    transition_hz = (1.0 - _BAND_LIMIT_PASSBAND_FRACTION) * cutoff_hz
    taps, beta = kaiserord(_BAND_LIMIT_STOPBAND_DB, transition_hz / (sample_rate / 2))
    taps |= 1  # odd length: a whole-sample delay that mode="same" removes exactly
    return firwin(taps, cutoff_hz - transition_hz / 2, window=("kaiser", beta), fs=sample_rate)


def band_limit(audio: np.ndarray, cutoff_hz: float = 4000.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``audio`` through a cheap microphone or telephone line: nothing above ``cutoff_hz`` (hertz), same length.

    A zero-delay FIR low-pass, flat below 0.8 of ``cutoff_hz`` and at least 60 dB down from ``cutoff_hz`` up.
    """
    if not 0 < cutoff_hz < sample_rate / 2:
        raise ValueError(f"cutoff_hz must be between 0 and {sample_rate / 2:g} Hz, got {cutoff_hz}")
    audio = _as_mono(audio)
    if audio.size == 0:
        return audio.copy()
    return fftconvolve(audio, _lowpass_taps(float(cutoff_hz), sample_rate), mode="same")


# --- features ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecAugmentSettings:
    """SpecAugment masks over a feature matrix [frames, bins]; each mask is 1 to its maximum width wide."""

    time_masks: int = 2
    """Number of time masks (each hides consecutive frames, across every bin)."""
    max_time_width: int = 10
    """Widest time mask (frames; 10 ms each with the usual hop)."""
    frequency_masks: int = 2
    """Number of frequency masks (each hides consecutive bins, across every frame)."""
    max_frequency_width: int = 5
    """Widest frequency mask (feature bins)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"spec augment setting {field.name} must be a whole number >= 0, got {value!r}")

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> Self:
        """Settings from a TOML table; keys are the field names, missing ones keep their defaults."""
        _refuse_unknown_keys(cls, table, "spec augment")
        return cls(**table)


def _random_spans(rng: np.random.Generator, length: int, count: int, max_width: int) -> np.ndarray:
    """Boolean mask [length] covering ``count`` spans, each 1 to ``max_width`` long at a random start."""
    if count == 0 or max_width == 0 or length == 0:
        return np.zeros(length, dtype=bool)
    widths = rng.integers(1, min(max_width, length) + 1, size=count)
    starts = rng.integers(0, length - widths + 1)
    positions = np.arange(length)
    return ((positions >= starts[:, None]) & (positions < (starts + widths)[:, None])).any(axis=0)


def spec_augment(features: np.ndarray, rng: np.random.Generator, settings: SpecAugmentSettings) -> np.ndarray:
    """A copy of ``features`` [frames, bins] with SpecAugment time and frequency masks; the input is untouched.

    Masked cells are set to the mean of their bin over the input's frames, not its minimum: the SpecAugment
    choice (zero after per-bin normalisation), so a mask hides information without looking like silence.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be [frames, bins], got shape {features.shape}")
    masked = features.copy()
    if features.size == 0:
        return masked
    bin_means = features.mean(axis=0)
    masked_frames = _random_spans(rng, features.shape[0], settings.time_masks, settings.max_time_width)
    masked_bins = _random_spans(rng, features.shape[1], settings.frequency_masks, settings.max_frequency_width)
    masked[masked_frames, :] = bin_means
    masked[:, masked_bins] = bin_means[masked_bins]
    return masked


# --- the stage ---------------------------------------------------------------------------------------------------


def _refuse_unknown_keys(cls: type, table: Mapping[str, Any], what: str) -> None:
    known = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} setting(s): {', '.join(unknown)}; known: {', '.join(known)}")


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"augment setting {name} must be a probability from 0 to 1, got {value!r}")
    return float(value)


def _range(name: str, value: Any, *, positive: bool = False) -> tuple[float, float]:
    bounds = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else []
    if len(bounds) != 2 or any(isinstance(bound, bool) or not isinstance(bound, Real) for bound in bounds):
        raise ValueError(f"augment setting {name} must be a [low, high] pair of numbers, got {value!r}")
    low, high = float(bounds[0]), float(bounds[1])
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"augment setting {name} must be finite with low <= high, got {value!r}")
    if positive and low <= 0:
        raise ValueError(f"augment setting {name} must be above 0, got {value!r}")
    return low, high


def _weights(value: Any) -> tuple[tuple[str, float], ...]:
    pairs = list(value.items()) if isinstance(value, Mapping) else list(value)
    try:
        weights = tuple((str(kind), float(weight)) for kind, weight in pairs)
    except (TypeError, ValueError):
        raise ValueError(f"augment setting noise_kinds must map kinds to weights, got {value!r}") from None
    kinds = [kind for kind, _ in weights]
    for kind in kinds:
        if kind not in NOISE_KINDS:
            raise ValueError(f"augment setting noise_kinds: unknown kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"augment setting noise_kinds names a kind twice: {kinds}")
    if any(not weight >= 0 for _, weight in weights) or sum(weight for _, weight in weights) <= 0:
        raise ValueError(f"augment setting noise_kinds needs weights >= 0 with a positive sum, got {value!r}")
    return weights


@dataclass(frozen=True)
class AugmentSettings:
    """Which corruptions a training clip gets, how often and how strongly; ranges are drawn from uniformly."""

    noise_probability: float = 0.9
    """Chance (0 to 1) that a clip gets background noise."""
    snr_db_range: tuple[float, float] = (0.0, 20.0)
    """Signal-to-noise ratio (dB; active speech RMS over noise RMS) of the added noise."""
    noise_kinds: tuple[tuple[str, float], ...] = (
        ("white", 1.0),
        ("pink", 2.0),
        ("brown", 1.0),
        ("babble", 3.0),
        ("hum", 3.0),
    )
    """Relative weight (unitless, need not sum to 1) of each noise kind, as (kind, weight) pairs from NOISE_KINDS.
    From TOML a table ``{ pink = 2.0, hum = 3.0 }`` does. Babble is pink noise when the Augmenter has no sources."""
    reverb_probability: float = 0.4
    """Chance (0 to 1) that a clip is played in a synthetic room."""
    rt60_s_range: tuple[float, float] = (0.15, 0.8)
    """Reverberation time (seconds, decay by 60 dB) of that room: a furnished room to a hall or workshop."""
    gain_db_range: tuple[float, float] = (-12.0, 6.0)
    """Gain (dB) applied to every clip last; above 0 dB a loud clip clips at full scale, as an overdriven mic does."""
    speed_probability: float = 0.3
    """Chance (0 to 1) that a clip is sped up or slowed down, tempo and pitch together."""
    speed_range: tuple[float, float] = (0.9, 1.1)
    """Speed factor (unitless; 1.1 plays 10 % faster)."""
    pitch_probability: float = 0.2
    """Chance (0 to 1) that a clip's pitch is shifted at the same duration."""
    pitch_semitones_range: tuple[float, float] = (-2.0, 2.0)
    """Pitch shift (semitones; 12 is an octave)."""
    band_limit_probability: float = 0.15
    """Chance (0 to 1) that a clip goes through a cheap microphone or telephone band limit."""
    band_limit_hz: float = 4000.0
    """Cutoff (hertz) of that band limit: nothing above it survives."""

    def __post_init__(self) -> None:
        # Coerce TOML lists and tables to the tuples the fields declare, so settings stay hashable.
        coerce = {
            "snr_db_range": _range("snr_db_range", self.snr_db_range),
            "noise_kinds": _weights(self.noise_kinds),
            "rt60_s_range": _range("rt60_s_range", self.rt60_s_range, positive=True),
            "gain_db_range": _range("gain_db_range", self.gain_db_range),
            "speed_range": _range("speed_range", self.speed_range, positive=True),
            "pitch_semitones_range": _range("pitch_semitones_range", self.pitch_semitones_range),
        }
        for name in ("noise", "reverb", "speed", "pitch", "band_limit"):
            coerce[f"{name}_probability"] = _probability(f"{name}_probability", getattr(self, f"{name}_probability"))
        value = self.band_limit_hz
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value < SAMPLE_RATE / 2:
            raise ValueError(
                f"augment setting band_limit_hz must be between 0 and {SAMPLE_RATE // 2} Hz, got {value!r}"
            )
        coerce["band_limit_hz"] = float(value)
        for name, coerced in coerce.items():
            object.__setattr__(self, name, coerced)

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> Self:
        """Settings from a TOML table (e.g. ``[augment]``); keys are the field names, missing ones keep defaults.

        Unknown keys and out-of-range values raise ValueError naming the key.
        """
        _refuse_unknown_keys(cls, table, "augment")
        return cls(**table)


class Augmenter:
    """Corrupts one training clip at a time, in the order sound meets them on its way to the model.

    The talker (speed, pitch) -> the room (reverb) -> other sound sources (noise) -> the microphone
    (band limit) -> the input gain. Returns float32 of the input's length, within [-1, 1].
    """

    STAGES = ("speed", "pitch", "reverb", "noise", "band_limit", "gain")
    """Stage names, in the order they are applied."""

    def __init__(
        self, settings: AugmentSettings, rng: np.random.Generator, babble_sources: Sequence[np.ndarray] = ()
    ) -> None:
        self.settings = settings
        self._rng = rng
        # Kept as given, not copied: a pool of thousands of clips should not be duplicated in float64.
        sources = [np.asarray(source) for source in babble_sources]
        for index, source in enumerate(sources):
            if source.ndim != 1:
                raise ValueError(f"babble source {index} must be mono (one dimension), got shape {source.shape}")
        self._babble_sources = tuple(source for source in sources if source.size and np.any(source))
        kinds, weights = zip(*settings.noise_kinds, strict=True)
        self._noise_kinds: tuple[str, ...] = kinds
        self._noise_weights = np.asarray(weights) / np.sum(weights)

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        samples = np.clip(np.nan_to_num(_as_mono(audio), nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
        length = samples.size
        if length == 0:
            return samples.astype(np.float32)
        rng, settings = self._rng, self.settings
        if rng.random() < settings.speed_probability:
            samples = _fit_length(change_speed(samples, rng.uniform(*settings.speed_range)), length)
        if rng.random() < settings.pitch_probability:
            samples = shift_pitch(samples, rng.uniform(*settings.pitch_semitones_range))
        if rng.random() < settings.reverb_probability:
            samples = reverberate(samples, room_impulse_response(rng, rng.uniform(*settings.rt60_s_range)))
        if rng.random() < settings.noise_probability:
            kind = self._noise_kinds[rng.choice(len(self._noise_kinds), p=self._noise_weights)]
            noise = make_noise(kind, length, rng, self._babble_sources)
            samples = mix_at_snr(samples, noise, rng.uniform(*settings.snr_db_range))
        if rng.random() < settings.band_limit_probability:
            samples = band_limit(samples, settings.band_limit_hz)
        # Noise can push the sum past full scale; bring it back first so only a positive gain clips.
        peak = np.max(np.abs(samples))
        if peak > 1.0:
            samples = samples / peak
        return change_gain(samples, rng.uniform(*settings.gain_db_range)).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        """What this augmenter applies, for the model card: order, probabilities, ranges, noise kinds."""
        settings = self.settings
        kind_probability = dict.fromkeys(self._noise_kinds, 0.0)
        for kind, weight in zip(self._noise_kinds, self._noise_weights, strict=True):
            # Without sources babble is synthesised as pink noise; report what the model actually heard.
            effective = "pink" if kind == "babble" and not self._babble_sources else kind
            kind_probability[effective] = kind_probability.get(effective, 0.0) + float(weight)
        return {
            "sample_rate_hz": SAMPLE_RATE,
            "order": list(self.STAGES),
            "speed": {
                "probability": settings.speed_probability,
                "factor_range": list(settings.speed_range),
                "method": "resampling, tempo and pitch together; cropped or zero-padded back, centred",
            },
            "pitch": {
                "probability": settings.pitch_probability,
                "semitones_range": list(settings.pitch_semitones_range),
                "method": "resampling, then phase-vocoder time stretch back to the same duration",
            },
            "reverb": {
                "probability": settings.reverb_probability,
                "rt60_s_range": list(settings.rt60_s_range),
                "direct_to_reverberant_db_range": list(_DIRECT_TO_REVERBERANT_DB),
                "method": "synthetic room impulse response: direct path, early reflections within 50 ms, "
                "exponential noise tail",
            },
            "noise": {
                "probability": settings.noise_probability,
                "snr_db_range": list(settings.snr_db_range),
                "snr_reference": "active speech RMS (10 ms frames within 50 dB of the loudest)",
                "kinds": {kind: p for kind, p in kind_probability.items() if p > 0},
                "babble_sources": len(self._babble_sources),
            },
            "band_limit": {
                "probability": settings.band_limit_probability,
                "cutoff_hz": settings.band_limit_hz,
            },
            "gain": {
                "probability": 1.0,
                "gain_db_range": list(settings.gain_db_range),
                "clipped_to": [-1.0, 1.0],
            },
        }
