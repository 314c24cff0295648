"""Opus in OGG on the wire: real speech round-trips, and bad audio gets a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from common.opus import MAX_UTTERANCE_S, decode_opus, encode_opus
from common.recording import RecordingError, read_recording
from schemas.errors import ErrorCode, ProtocolError

from .conftest import IN_VOCABULARY_SAMPLE


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_recording(IN_VOCABULARY_SAMPLE, 16000)


def test_real_speech_round_trips_through_opus(speech: np.ndarray) -> None:
    encoded = encode_opus(speech, 16000)
    assert encoded.startswith(b"OggS")
    assert len(encoded) < speech.size * 2 / 4  # well under a quarter of 16-bit PCM
    decoded = decode_opus(encoded, expected_rate=16000)
    assert abs(decoded.size - speech.size) <= 16000 * 0.01
    # Lossy, but the same signal: strongly correlated and of similar energy.
    n = min(decoded.size, speech.size)
    assert np.corrcoef(decoded[:n], speech[:n])[0, 1] > 0.9
    assert np.std(decoded) == pytest.approx(np.std(speech), rel=0.2)


def test_the_announced_sample_rate_must_be_the_real_one(speech: np.ndarray) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_opus(encode_opus(speech, 16000), expected_rate=48000)
    assert refused.value.code == ErrorCode.MISMATCH


@pytest.mark.parametrize("payload", [b"", b"OggS" + bytes(200), b"RIFF....WAVEfmt ", bytes(range(256)) * 4])
def test_corrupt_audio_is_refused(payload: bytes) -> None:
    with pytest.raises(ProtocolError) as refused:
        decode_opus(payload, expected_rate=16000)
    assert refused.value.code == ErrorCode.BAD_AUDIO


def test_truncated_opus_is_refused_or_shorter(speech: np.ndarray) -> None:
    encoded = encode_opus(speech, 16000)
    try:
        decoded = decode_opus(encoded[: len(encoded) // 3], expected_rate=16000)
    except ProtocolError as error:
        assert error.code == ErrorCode.BAD_AUDIO
    else:
        assert decoded.size < speech.size * 0.6


def test_other_formats_in_ogg_are_refused(tmp_path, speech: np.ndarray) -> None:
    vorbis = tmp_path / "speech.ogg"
    soundfile.write(vorbis, speech, 16000, format="OGG", subtype="VORBIS")
    with pytest.raises(ProtocolError) as refused:
        decode_opus(vorbis.read_bytes(), expected_rate=16000)
    assert "OGG/VORBIS" in str(refused.value)


def test_audio_over_the_limit_is_refused_both_ways(tmp_path) -> None:
    too_long = np.zeros(int((MAX_UTTERANCE_S + 1) * 16000), dtype=np.float32)
    with pytest.raises(ProtocolError) as refused:
        encode_opus(too_long, 16000)
    assert refused.value.code == ErrorCode.AUDIO_TOO_LONG
    # A peer that does not apply the limit: the receiver refuses it anyway.
    path = tmp_path / "long.ogg"
    soundfile.write(path, too_long, 16000, format="OGG", subtype="OPUS")
    with pytest.raises(ProtocolError) as refused:
        decode_opus(path.read_bytes(), expected_rate=16000)
    assert refused.value.code == ErrorCode.AUDIO_TOO_LONG


@pytest.mark.parametrize(
    ("samples", "rate", "complaint"),
    [
        (np.array([0.0, np.nan, 0.1], dtype=np.float32), 16000, "NaN"),
        (np.array([0.0, np.inf], dtype=np.float32), 16000, "NaN or infinity"),
        (np.zeros(0, dtype=np.float32), 16000, "non-empty"),
        (np.zeros((2, 100), dtype=np.float32), 16000, "mono"),
        (np.zeros(100, dtype=np.float32), 44100, "44100"),
    ],
)
def test_bad_samples_are_refused_before_encoding(samples: np.ndarray, rate: int, complaint: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        encode_opus(samples, rate)
    assert complaint in str(refused.value)


def test_recordings_at_other_rates_and_channels_are_converted(tmp_path, speech: np.ndarray) -> None:
    from scipy.signal import resample_poly

    stereo_44k = np.stack([resample_poly(speech, 441, 160)] * 2, axis=1)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo_44k, 44100)
    converted = read_recording(path, 16000)
    assert abs(converted.size - speech.size) <= 2
    n = min(converted.size, speech.size)
    assert np.corrcoef(converted[:n], speech[:n])[0, 1] > 0.99


def test_unreadable_recordings_are_refused(tmp_path) -> None:
    path = tmp_path / "not_audio.wav"
    path.write_bytes(b"hello")
    with pytest.raises(RecordingError):
        read_recording(path)
    with pytest.raises(RecordingError):
        read_recording(tmp_path / "missing.flac")
