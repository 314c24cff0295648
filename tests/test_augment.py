"""Training-clip augmentation: each corruption measured against the physics it claims, and the stage as a whole."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
from scipy.signal import welch

from common.recording import read_recording
from firmware_tools.building.corruptions import (
    NOISE_KINDS,
    SAMPLE_RATE,
    Augmenter,
    AugmentSettings,
    SpecAugmentSettings,
    band_limit,
    change_gain,
    change_speed,
    make_noise,
    mix_at_snr,
    reverberate,
    room_impulse_response,
    shift_pitch,
    spec_augment,
    time_shift,
)

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

OCTAVE_BANDS_HZ = [(125.0 * 2**k, 250.0 * 2**k) for k in range(5)]  # 125 Hz to 4 kHz


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_recording(IN_VOCABULARY_SAMPLE, SAMPLE_RATE)


@pytest.fixture(scope="module")
def clip(speech: np.ndarray) -> np.ndarray:
    """A 1.5 s training clip of real speech, as the pipeline feeds the augmenter."""
    return speech[: int(1.5 * SAMPLE_RATE)].astype(np.float32)


def tone(frequency_hz: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * frequency_hz * np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE)


def dominant_frequency(audio: np.ndarray) -> float:
    """Frequency (hertz) of the strongest spectral line, to about 0.1 Hz."""
    size = 1 << 18
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size), n=size))
    return float(np.argmax(spectrum)) * SAMPLE_RATE / size


def psd(audio: np.ndarray, segment: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    return welch(audio, fs=SAMPLE_RATE, nperseg=segment)


def octave_slope_db(audio: np.ndarray) -> float:
    """Least-squares slope (dB per octave) of the mean power spectral density over octave bands, 125 Hz-4 kHz."""
    frequencies, power = psd(audio)
    levels = [10 * np.log10(power[(frequencies >= low) & (frequencies < high)].mean()) for low, high in OCTAVE_BANDS_HZ]
    return float(np.polyfit(np.arange(len(levels)), levels, 1)[0])


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio))))


# --- noise ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISE_KINDS)
def test_every_noise_kind_is_unit_rms_of_the_asked_length_and_reproducible(kind: str) -> None:
    noise = make_noise(kind, 24000, np.random.default_rng(3))
    assert noise.shape == (24000,)
    assert np.all(np.isfinite(noise))
    assert rms(noise) == pytest.approx(1.0, rel=1e-6)
    assert np.array_equal(noise, make_noise(kind, 24000, np.random.default_rng(3)))
    assert not np.array_equal(noise, make_noise(kind, 24000, np.random.default_rng(4)))


@pytest.mark.parametrize(("kind", "slope_db_per_octave"), [("white", 0.0), ("pink", -3.0), ("brown", -6.0)])
def test_coloured_noise_has_its_spectral_tilt(kind: str, slope_db_per_octave: float) -> None:
    noise = make_noise(kind, 4 * SAMPLE_RATE, np.random.default_rng(7))
    assert octave_slope_db(noise) == pytest.approx(slope_db_per_octave, abs=0.75)


@pytest.mark.parametrize("seed", range(6))
def test_hum_sits_below_1_khz_and_peaks_at_a_mains_or_motor_fundamental(seed: int) -> None:
    hum = make_noise("hum", 3 * SAMPLE_RATE, np.random.default_rng(seed))
    frequencies, power = psd(hum, segment=8192)
    assert power[frequencies < 1000].sum() / power.sum() > 0.9
    peak_hz = frequencies[np.argmax(power)]
    assert 43 <= peak_hz <= 67 or 88 <= peak_hz <= 132
    # Harmonics: the second one stands far above the broadband fan noise next to it.
    second = np.argmin(np.abs(frequencies - 2 * peak_hz))
    beside = (np.abs(frequencies - 2.5 * peak_hz) < 5) | (np.abs(frequencies - 1.5 * peak_hz) < 5)
    assert power[second - 1 : second + 2].max() > 10 * power[beside].mean()


def test_babble_is_made_of_the_given_sources() -> None:
    sources = [tone(frequency, 0.7) for frequency in (300.0, 700.0, 1100.0, 1900.0)]
    babble = make_noise("babble", 2 * SAMPLE_RATE, np.random.default_rng(5), babble_sources=sources)
    frequencies, power = psd(babble)
    near_a_source = np.min(np.abs(frequencies[:, None] - np.array([300.0, 700.0, 1100.0, 1900.0])), axis=1) < 20
    assert power[near_a_source].sum() / power.sum() > 0.95
    # Several talkers at once: at least three of the four sources are audible.
    levels = [power[np.abs(frequencies - f) < 20].sum() for f in (300.0, 700.0, 1100.0, 1900.0)]
    assert sum(level > 0.05 * power.sum() for level in levels) >= 3


def test_babble_without_sources_is_pink_noise() -> None:
    babble = make_noise("babble", 16000, np.random.default_rng(9))
    assert np.array_equal(babble, make_noise("pink", 16000, np.random.default_rng(9)))
    silent_sources = make_noise("babble", 4 * SAMPLE_RATE, np.random.default_rng(9), babble_sources=[np.zeros(1000)])
    assert rms(silent_sources) == pytest.approx(1.0)
    assert octave_slope_db(silent_sources) == pytest.approx(-3.0, abs=0.75)


def test_unknown_noise_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="rain"):
        make_noise("rain", 100, np.random.default_rng(0))


# --- mixing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 20.0])
def test_snr_is_measured_on_the_active_speech_not_the_silence_around_it(snr_db: float) -> None:
    burst = tone(440.0, 0.5, amplitude=0.3)
    speech = np.concatenate([np.zeros(12345), burst, np.zeros(SAMPLE_RATE)])
    # A -80 dBFS recording floor in the pauses: quiet, but not digital silence, as in real clips.
    speech += 1e-4 * np.random.default_rng(0).standard_normal(speech.size)
    burst = speech[12345 : 12345 + burst.size]
    noise = make_noise("white", 5000, np.random.default_rng(1))  # shorter than the speech: looped
    mixed = mix_at_snr(speech, noise, snr_db)
    assert mixed.shape == speech.shape
    added = mixed - speech
    measured = 20 * np.log10(rms(burst) / rms(added))
    assert measured == pytest.approx(snr_db, abs=0.5)
    assert np.allclose(added[5000:10000], added[:5000])  # looped, not zero-padded


def test_noise_into_silence_lands_at_a_sensible_level() -> None:
    mixed = mix_at_snr(np.zeros(8000), make_noise("pink", 8000, np.random.default_rng(2)), 10.0)
    assert np.all(np.isfinite(mixed))
    assert 20 * np.log10(rms(mixed)) == pytest.approx(-30.0, abs=0.01)  # as if speech were at -20 dBFS
    speech = tone(300.0, 0.5)
    assert np.array_equal(mix_at_snr(speech, np.zeros(100), 0.0), speech)


# --- room ----------------------------------------------------------------------------------------------------------


def measured_rt60_s(rir: np.ndarray) -> float:
    """Reverberation time from the Schroeder decay curve of the tail (after 50 ms), fitted from -5 to -25 dB."""
    tail = rir[int(0.05 * SAMPLE_RATE) :]
    decay = np.cumsum(np.square(tail)[::-1])[::-1]
    decay_db = 10 * np.log10(decay / decay[0])
    fitted = np.flatnonzero((decay_db <= -5) & (decay_db >= -25))
    slope_db_per_s = np.polyfit(fitted / SAMPLE_RATE, decay_db[fitted], 1)[0]
    return float(-60.0 / slope_db_per_s)


@pytest.mark.parametrize("rt60_s", [0.15, 0.4, 0.8])
def test_room_impulse_response_decays_at_its_rt60(rt60_s: float) -> None:
    rng = np.random.default_rng(11)
    for _ in range(3):
        rir = room_impulse_response(rng, rt60_s)
        assert rir[0] == 1.0
        assert np.all(np.abs(rir[1:]) < 1.0)
        assert measured_rt60_s(rir) == pytest.approx(rt60_s, rel=0.25)


def test_room_impulse_response_has_sparse_early_reflections() -> None:
    rng = np.random.default_rng(12)
    for _ in range(10):
        early = np.abs(room_impulse_response(rng, 0.5)[1 : int(0.05 * SAMPLE_RATE)])
        assert not early[: int(0.002 * SAMPLE_RATE) - 1].any()  # nothing arrives within 2 ms of the direct path
        # Reflections stand out of the diffuse tail: a few samples far above its typical level.
        assert 3 <= np.count_nonzero(early > 0.15) <= 9
        assert np.median(early) < 0.05


def test_reverberation_keeps_length_alignment_and_peak() -> None:
    click = np.zeros(8000)
    click[3000] = 0.8
    rir = room_impulse_response(np.random.default_rng(13), 0.3)
    wet = reverberate(click, rir)
    assert wet.shape == click.shape
    assert np.argmax(np.abs(wet)) == 3000  # the direct path is not delayed
    assert np.max(np.abs(wet)) == pytest.approx(0.8)
    assert np.allclose(reverberate(click, np.concatenate([np.zeros(100), rir])), wet)  # a delayed RIR is re-aligned
    assert rms(wet[3100:]) > 0.001  # and there is a tail


# --- level, time, pitch --------------------------------------------------------------------------------------------


def test_gain_scales_and_clips() -> None:
    quiet = tone(200.0, 0.1, amplitude=0.1)
    assert np.allclose(change_gain(quiet, 20 * np.log10(2)), 2 * quiet)
    loud = change_gain(quiet, 40.0)
    assert loud.max() == 1.0
    assert loud.min() == -1.0


def test_time_shift_moves_later_for_positive_shifts_and_fills_with_zeros() -> None:
    audio = np.arange(1.0, 11.0)
    assert time_shift(audio, 3).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert time_shift(audio, -2).tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 0, 0]
    assert time_shift(audio, 0).tolist() == audio.tolist()
    assert not time_shift(audio, 10).any()


def test_speed_changes_tempo_and_pitch_together() -> None:
    faster = change_speed(tone(440.0, 1.0), 1.25)
    assert faster.size == pytest.approx(0.8 * SAMPLE_RATE, abs=2)
    assert dominant_frequency(faster) == pytest.approx(550.0, rel=0.002)
    slower = change_speed(tone(440.0, 1.0), 0.9)
    assert slower.size == pytest.approx(SAMPLE_RATE / 0.9, abs=2)
    assert dominant_frequency(slower) == pytest.approx(440.0 * 0.9, rel=0.002)


@pytest.mark.parametrize(("semitones", "frequency_hz"), [(12.0, 880.0), (-12.0, 220.0), (2.0, 440.0 * 2 ** (2 / 12))])
def test_pitch_shift_changes_frequency_not_duration(semitones: float, frequency_hz: float) -> None:
    source = tone(440.0, 1.0)
    shifted = shift_pitch(source, semitones)
    assert shifted.size == pytest.approx(source.size, rel=0.01)
    assert dominant_frequency(shifted) == pytest.approx(frequency_hz, rel=0.003)
    # A steady tone stays a steady tone of the same level, not a warbling or fading one.
    middle = shifted[2000:-2000]
    assert rms(middle) == pytest.approx(rms(source), rel=0.1)
    thirds = [rms(part) for part in np.array_split(middle, 3)]
    assert max(thirds) / min(thirds) < 1.1


def test_pitch_shift_keeps_speech_where_it_was(speech: np.ndarray) -> None:
    shifted = shift_pitch(speech, 2.0)
    assert shifted.size == speech.size
    envelope = [rms(part) for part in np.array_split(speech, 40)]
    shifted_envelope = [rms(part) for part in np.array_split(shifted, 40)]
    assert np.corrcoef(envelope, shifted_envelope)[0, 1] > 0.9


# --- channel -------------------------------------------------------------------------------------------------------


def test_band_limit_removes_the_top_and_keeps_the_rest() -> None:
    noise = make_noise("white", 4 * SAMPLE_RATE, np.random.default_rng(21))
    limited = band_limit(noise, 4000.0)
    assert limited.shape == noise.shape
    frequencies, before = psd(noise, segment=2048)
    _, after = psd(limited, segment=2048)
    change_db = 10 * np.log10(after / before)
    assert np.all(np.abs(change_db[frequencies < 3000]) < 1.0)
    assert np.all(change_db[frequencies > 4200] < -30.0)
    # Zero delay: a tone in the passband comes out in phase.
    low = tone(1000.0, 0.5)
    assert np.corrcoef(band_limit(low)[500:-500], low[500:-500])[0, 1] > 0.999


def test_band_limit_refuses_a_cutoff_it_cannot_have() -> None:
    for cutoff_hz in (0.0, 8000.0, 12000.0):
        with pytest.raises(ValueError, match="cutoff_hz"):
            band_limit(np.zeros(100), cutoff_hz)


# --- features ------------------------------------------------------------------------------------------------------


def masked_runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a boolean vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def test_spec_augment_masks_the_configured_spans_with_bin_means() -> None:
    features = np.random.default_rng(30).normal(size=(98, 40)).astype(np.float32)
    original = features.copy()
    settings = SpecAugmentSettings(time_masks=1, max_time_width=10, frequency_masks=1, max_frequency_width=5)
    for seed in range(20):
        masked = spec_augment(features, np.random.default_rng(seed), settings)
        assert np.array_equal(features, original)  # the input is untouched
        assert masked.shape == features.shape
        assert masked.dtype == features.dtype
        means = features.mean(axis=0)
        masked_frames = np.all(masked == means, axis=1)
        masked_bins = np.all(masked == means, axis=0)
        [time_width] = masked_runs(masked_frames)
        [frequency_width] = masked_runs(masked_bins)
        assert 1 <= time_width <= 10
        assert 1 <= frequency_width <= 5
        untouched = ~masked_frames[:, None] & ~masked_bins[None, :]
        assert np.array_equal(masked[untouched], features[untouched])


def test_spec_augment_mask_counts_and_widths_bound_what_is_masked() -> None:
    features = np.random.default_rng(31).normal(size=(98, 40))
    settings = SpecAugmentSettings(time_masks=3, max_time_width=4, frequency_masks=0, max_frequency_width=5)
    for seed in range(20):
        masked = spec_augment(features, np.random.default_rng(seed), settings)
        masked_frames = np.all(masked == features.mean(axis=0), axis=1)
        assert 1 <= masked_frames.sum() <= 3 * 4
        assert 1 <= len(masked_runs(masked_frames)) <= 3
        assert not np.all(masked == features.mean(axis=0), axis=0).any()  # no frequency masks asked for
    again = spec_augment(features, np.random.default_rng(5), settings)
    assert np.array_equal(again, spec_augment(features, np.random.default_rng(5), settings))


# --- the stage -----------------------------------------------------------------------------------------------------

EVERYTHING = AugmentSettings(
    noise_probability=1.0,
    reverb_probability=1.0,
    speed_probability=1.0,
    pitch_probability=1.0,
    band_limit_probability=1.0,
)


@pytest.mark.parametrize("settings", [AugmentSettings(), EVERYTHING], ids=["defaults", "every-stage"])
def test_augmented_clips_are_float32_of_the_same_length_within_full_scale(
    settings: AugmentSettings, clip: np.ndarray, speech: np.ndarray
) -> None:
    babble = [speech, read_recording(OUT_OF_VOCABULARY_SAMPLE, SAMPLE_RATE)]
    augmenter = Augmenter(settings, np.random.default_rng(40), babble_sources=babble)
    loud_with_nan = np.clip(4 * clip, -1, 1)
    loud_with_nan[100] = np.nan
    for audio in (clip, np.zeros_like(clip), loud_with_nan, clip[:3000]):
        for _ in range(5):
            out = augmenter(audio)
            assert out.dtype == np.float32
            assert out.shape == audio.shape
            assert np.all(np.isfinite(out))
            assert np.max(np.abs(out)) <= 1.0


def test_the_same_seed_gives_the_same_clips(clip: np.ndarray, speech: np.ndarray) -> None:
    def run(seed: int) -> list[np.ndarray]:
        augmenter = Augmenter(EVERYTHING, np.random.default_rng(seed), babble_sources=[speech])
        return [augmenter(clip) for _ in range(4)]

    first, again, other = run(50), run(50), run(51)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert not np.array_equal(first[0], first[1])  # each call draws anew


def test_speed_change_keeps_the_content_centred() -> None:
    only_speed = AugmentSettings(
        noise_probability=0.0,
        reverb_probability=0.0,
        pitch_probability=0.0,
        band_limit_probability=0.0,
        speed_probability=1.0,
        speed_range=(0.8, 1.25),
        gain_db_range=(0.0, 0.0),
    )
    augmenter = Augmenter(only_speed, np.random.default_rng(60))
    burst = np.zeros(24000, dtype=np.float32)
    burst[11000:13000] = tone(500.0, 2000 / SAMPLE_RATE)
    for _ in range(5):
        out = augmenter(burst)
        energy = np.square(out.astype(np.float64))
        centre = np.sum(np.arange(out.size) * energy) / energy.sum()
        assert centre == pytest.approx(12000, abs=30)


def test_nothing_asked_for_changes_nothing_but_the_gain(clip: np.ndarray) -> None:
    nothing = AugmentSettings(
        noise_probability=0.0,
        reverb_probability=0.0,
        speed_probability=0.0,
        pitch_probability=0.0,
        band_limit_probability=0.0,
        gain_db_range=(-6.0, -6.0),
    )
    out = Augmenter(nothing, np.random.default_rng(0))(clip)
    assert np.allclose(out, clip * 10 ** (-6 / 20), atol=1e-6)


def test_describe_says_what_is_applied_for_the_model_card(speech: np.ndarray) -> None:
    without_babble = Augmenter(AugmentSettings(), np.random.default_rng(0)).describe()
    json.dumps(without_babble)
    assert without_babble["order"] == ["speed", "pitch", "reverb", "noise", "band_limit", "gain"]
    kinds = without_babble["noise"]["kinds"]
    assert "babble" not in kinds  # synthesised as pink, and reported so
    assert sum(kinds.values()) == pytest.approx(1.0)
    assert kinds["pink"] == pytest.approx(5 / 10)
    assert without_babble["reverb"]["rt60_s_range"] == [0.15, 0.8]
    with_babble = Augmenter(AugmentSettings(), np.random.default_rng(0), babble_sources=[speech]).describe()
    assert with_babble["noise"]["kinds"]["babble"] == pytest.approx(3 / 10)
    assert with_babble["noise"]["babble_sources"] == 1


# --- settings ------------------------------------------------------------------------------------------------------


def test_settings_load_from_a_toml_table() -> None:
    table = tomllib.loads(
        """
        [augment]
        noise_probability = 0.5
        snr_db_range = [5, 15]
        noise_kinds = { hum = 2.0, pink = 1 }
        band_limit_hz = 3400
        """
    )["augment"]
    settings = AugmentSettings.from_dict(table)
    assert settings.noise_probability == 0.5
    assert settings.snr_db_range == (5.0, 15.0)
    assert settings.noise_kinds == (("hum", 2.0), ("pink", 1.0))
    assert settings.band_limit_hz == 3400.0
    assert settings.rt60_s_range == AugmentSettings().rt60_s_range
    hash(settings)  # lists and tables became tuples
    spec = SpecAugmentSettings.from_dict({"time_masks": 1})
    assert spec == SpecAugmentSettings(time_masks=1)


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"noise_probabilty": 0.5}, "noise_probabilty"),
        ({"reverb_probability": 1.5}, "reverb_probability"),
        ({"snr_db_range": [20, 0]}, "snr_db_range"),
        ({"speed_range": [0, 1.1]}, "speed_range"),
        ({"gain_db_range": ["-3", 3]}, "gain_db_range"),
        ({"noise_kinds": {"rain": 1.0}}, "rain"),
        ({"noise_kinds": {"pink": -1.0}}, "noise_kinds"),
        ({"band_limit_hz": 9000}, "band_limit_hz"),
    ],
)
def test_bad_settings_are_refused_by_name(table: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        AugmentSettings.from_dict(table)


def test_unknown_spec_augment_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"setting\(s\): time_mask;"):
        SpecAugmentSettings.from_dict({"time_mask": 2})
    with pytest.raises(ValueError, match="max_time_width"):
        SpecAugmentSettings(max_time_width=-1)
