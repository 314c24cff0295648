"""Audio on the wire: mono Opus in an OGG container, through libsndfile (soundfile).

Opus is lossy and band-limited to the rate it was encoded at; 16 kHz mono speech at
libsndfile's default quality costs a few kB per second.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile

from schemas.errors import ErrorCode, ProtocolError

OPUS_SAMPLE_RATES = (8000, 12000, 16000, 24000, 48000)
"""Rates Opus encodes natively; json/utterance.schema.json allows the same."""

MAX_UTTERANCE_S = 20.0
"""Longest utterance (seconds) the protocol carries; json/utterance.schema.json says the same."""


def encode_opus(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] -> Opus in OGG bytes."""
    if sample_rate not in OPUS_SAMPLE_RATES:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO, "audio", f"sample rate {sample_rate} Hz is not one of Opus's {OPUS_SAMPLE_RATES}"
        )
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "audio", f"expected non-empty mono samples, got shape {samples.shape}")
    if not np.all(np.isfinite(samples)):
        raise ProtocolError(ErrorCode.BAD_AUDIO, "audio", "samples contain NaN or infinity")
    if samples.size / sample_rate > MAX_UTTERANCE_S:
        raise ProtocolError(
            ErrorCode.AUDIO_TOO_LONG, "audio", f"{samples.size / sample_rate:.1f} s is over {MAX_UTTERANCE_S:.0f} s"
        )
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), sample_rate, format="OGG", subtype="OPUS")
    return buffer.getvalue()


def decode_opus(data: bytes, *, expected_rate: int, max_s: float = MAX_UTTERANCE_S) -> np.ndarray:
    """Opus in OGG bytes -> mono float32 samples at ``expected_rate``.

    Refuses, with ProtocolError, anything that is not mono Opus at the rate the
    metadata announced, that is empty, or that is longer than ``max_s`` seconds, so a
    hostile payload never costs more than ``max_s`` of decoding.
    """
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as sound:
            if sound.format != "OGG" or sound.subtype != "OPUS":
                raise ProtocolError(
                    ErrorCode.BAD_AUDIO, "audio", f"expected OGG/OPUS, got {sound.format}/{sound.subtype}"
                )
            if sound.channels != 1:
                raise ProtocolError(ErrorCode.BAD_AUDIO, "audio", f"expected mono, got {sound.channels} channels")
            if sound.samplerate != expected_rate:
                raise ProtocolError(
                    ErrorCode.MISMATCH,
                    "audio",
                    f"sample rate is {sound.samplerate} Hz, metadata says {expected_rate} Hz",
                )
            limit = int(max_s * expected_rate)
            # Read one sample past the limit rather than trusting the header's frame count.
            samples = sound.read(limit + 1, dtype="float32")
    except soundfile.LibsndfileError as error:
        # error_string is libsndfile's reason without the file object's repr.
        raise ProtocolError(ErrorCode.BAD_AUDIO, "audio", f"cannot decode: {error.error_string}") from None
    if samples.size == 0:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "audio", "no samples")
    if samples.size > limit:
        raise ProtocolError(ErrorCode.AUDIO_TOO_LONG, "audio", f"longer than {max_s:g} s")
    return samples
