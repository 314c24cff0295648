"""Audio sources: real recordings through files at other rates, raw PCM through odd reads, clear errors."""

from __future__ import annotations

import io
import itertools
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from common.recording import read_recording
from device.audio_sources import (
    AudioSourceError,
    FileSource,
    StdinSource,
    open_source,
    pick_input_device,
)

from .conftest import IN_VOCABULARY_SAMPLE, REPO

BLOCK_SIZES = (1, 7, 480, 1023)
"""Block sizes every source is read with: one sample, odd, the default, and more than one read's worth."""


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return read_recording(IN_VOCABULARY_SAMPLE)


@pytest.fixture(scope="module")
def pcm(speech: np.ndarray) -> np.ndarray:
    """The speech as 16-bit PCM, with both extremes of the range in it."""
    samples = np.round(speech * 32767).astype(np.int16)
    return np.concatenate((samples, np.array([-32768, 32767, 0, -1], np.int16)))


def read_all(blocks, block_samples: int) -> np.ndarray:
    """All blocks joined, after checking their shape: every one full but the last."""
    blocks = list(blocks)
    assert all(block.dtype == np.float32 and block.ndim == 1 for block in blocks)
    assert all(block.size == block_samples for block in blocks[:-1])
    assert 0 < blocks[-1].size <= block_samples
    return np.concatenate(blocks)


class TrickleReader:
    """A stream whose reads return 1 to 7 bytes, whatever is asked: a pipe under load."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0
        self.sizes = itertools.cycle((1, 4, 7, 2, 3, 6, 5))

    def read(self, size: int, /) -> bytes:
        chunk = self.data[self.position : self.position + min(size, next(self.sizes))]
        self.position += len(chunk)
        return chunk


@pytest.mark.parametrize("block_samples", BLOCK_SIZES)
def test_a_recording_at_the_device_rate_is_read_unchanged(speech: np.ndarray, block_samples: int) -> None:
    with FileSource(IN_VOCABULARY_SAMPLE, block_samples=block_samples) as source:
        assert source.sample_rate == 16000
        assert source.duration_s == pytest.approx(speech.size / 16000)
        assert np.array_equal(read_all(source.blocks(), block_samples), speech)


@pytest.mark.parametrize(
    ("file_format", "rate", "channels"),
    [("WAV", 44100, 2), ("OGG", 8000, 1), ("FLAC", 48000, 1)],
)
@pytest.mark.parametrize("block_samples", BLOCK_SIZES)
def test_recordings_at_other_rates_are_resampled_as_read_recording_does(
    tmp_path: Path, speech: np.ndarray, file_format: str, rate: int, channels: int, block_samples: int
) -> None:
    at_rate = soxr.resample(speech, 16000, rate)
    # Channels that differ, so that averaging them is what is checked.
    recording = np.stack([at_rate, 0.5 * at_rate], axis=1)[:, :channels]
    path = tmp_path / f"speech_{rate}.{file_format.lower()}"
    soundfile.write(path, recording, rate, format=file_format)

    with FileSource(path, block_samples=block_samples) as source:
        assert source.duration_s == pytest.approx(speech.size / 16000, abs=0.01)
        streamed = read_all(source.blocks(), block_samples)
    whole = read_recording(path)
    assert abs(streamed.size - whole.size) <= 2
    assert abs(streamed.size - speech.size) <= 2
    n = min(streamed.size, whole.size, speech.size)
    assert np.max(np.abs(streamed[:n] - whole[:n])) < 1e-4
    # The 8 kHz Vorbis file lost everything above 4 kHz, and some more to the codec.
    assert np.corrcoef(streamed[:n], speech[:n])[0, 1] > (0.9 if rate == 8000 else 0.99)


def test_a_recording_can_be_read_again_and_closing_stops_a_reader() -> None:
    source = FileSource(IN_VOCABULARY_SAMPLE, block_samples=480)
    first = read_all(source.blocks(), 480)
    assert np.array_equal(read_all(source.blocks(), 480), first)
    reader = source.blocks()
    next(reader)
    source.close()
    assert list(reader) == []


@pytest.mark.parametrize("block_samples", BLOCK_SIZES)
def test_stdin_at_the_device_rate_is_exactly_the_pcm(pcm: np.ndarray, block_samples: int) -> None:
    expected = pcm / np.float32(32768)
    for stream in (io.BytesIO(pcm.astype("<i2").tobytes()), TrickleReader(pcm.astype("<i2").tobytes())):
        source = StdinSource(stream, block_samples=block_samples)
        assert np.array_equal(read_all(source.blocks(), block_samples), expected)


def test_stdin_at_48_khz_is_resampled_to_a_third(speech: np.ndarray) -> None:
    at_48k = np.round(soxr.resample(speech, 16000, 48000) * 32767).astype("<i2")
    source = StdinSource(TrickleReader(at_48k.tobytes()), sample_rate=48000, block_samples=480)
    streamed = read_all(source.blocks(), 480)
    assert abs(streamed.size - at_48k.size / 3) <= 2
    n = min(streamed.size, speech.size)
    assert np.corrcoef(streamed[:n], speech[:n])[0, 1] > 0.99


def test_stdin_ending_mid_sample_drops_the_byte_with_a_warning(
    pcm: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    source = StdinSource(io.BytesIO(pcm.astype("<i2").tobytes() + b"\x7f"))
    with caplog.at_level(logging.WARNING, logger="device.audio_sources"):
        streamed = read_all(source.blocks(), 480)
    assert np.array_equal(streamed, pcm / np.float32(32768))
    assert "mid-sample" in caplog.text


@pytest.mark.parametrize("rate", [0, -16000, 4000, 1_000_000, 16000.0, "16000", True])
def test_a_bad_stdin_sample_rate_is_refused(rate: object) -> None:
    with pytest.raises(AudioSourceError, match="stdin sample rate"):
        StdinSource(io.BytesIO(b""), sample_rate=rate)  # type: ignore[arg-type]


def test_unusable_files_are_refused_with_the_file_and_the_reason(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all\n")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    silent = tmp_path / "no_samples.wav"
    soundfile.write(silent, np.zeros(0, np.float32), 16000)
    cases = [
        (text, "cannot read audio file", "Format not recognised (WAV, FLAC or OGG are read)"),
        (empty, "is empty (0 bytes)", "empty.wav"),  # not libsndfile's "Format not recognised"
        (tmp_path / "missing.flac", "no such audio file", "missing.flac"),  # not libsndfile's "System error"
        (tmp_path, "is not a file", str(tmp_path)),
        (silent, "holds no samples", "no_samples.wav"),
    ]
    for path, reason, detail in cases:
        with pytest.raises(AudioSourceError) as refused:
            FileSource(path)
        assert str(path) in str(refused.value)
        assert reason in str(refused.value)
        assert detail in str(refused.value)


def test_non_finite_samples_are_refused_where_they_are(tmp_path: Path) -> None:
    samples = np.zeros(16000 * 2, np.float32)
    samples[16000 + 5] = np.inf
    path = tmp_path / "broken.wav"
    soundfile.write(path, samples, 16000, subtype="FLOAT")
    with FileSource(path) as source, pytest.raises(AudioSourceError) as refused:
        list(source.blocks())
    assert "broken.wav holds NaN or infinite samples (at 1.000 s)" in str(refused.value)


@pytest.mark.parametrize("block_samples", [0, -480, 1.5, True])
def test_a_bad_block_size_is_refused(block_samples: object) -> None:
    with pytest.raises(AudioSourceError, match="block_samples"):
        FileSource(IN_VOCABULARY_SAMPLE, block_samples=block_samples)  # type: ignore[arg-type]


def test_open_source_builds_each_kind_from_settings(pcm: np.ndarray) -> None:
    with open_source("file", path=IN_VOCABULARY_SAMPLE, block_samples=160) as source:
        assert isinstance(source, FileSource)
        assert source.block_samples == 160
    stdin = io.BytesIO(pcm.astype("<i2").tobytes())
    with open_source("stdin", stdin=stdin, stdin_sample_rate=8000) as source:
        assert isinstance(source, StdinSource)
        assert source.input_rate == 8000
        assert source.sample_rate == 16000
    with pytest.raises(AudioSourceError, match="needs a path"):
        open_source("file")
    with pytest.raises(AudioSourceError, match="microphone, file, stdin"):
        open_source("radio")


def test_an_unknown_microphone_is_refused_with_the_inputs_there_are() -> None:
    with pytest.raises(AudioSourceError) as refused:
        open_source("microphone", device="no such microphone 7f3a")
    message = str(refused.value)
    assert "available inputs" in message or "no audio input devices" in message


DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC3246 Analog (hw:0,0)", "max_input_channels": 2},
    {"index": 1, "name": "HDMI 0", "max_input_channels": 0},
    {"index": 2, "name": "USB PnP Sound Device: Audio (hw:1,0)", "max_input_channels": 1},
    {"index": 3, "name": "pulse", "max_input_channels": 32},
    {"index": 4, "name": "pulse monitor", "max_input_channels": 2},
]
"""An input list as sounddevice.query_devices gives it on a Pi-like machine."""


def test_an_input_is_picked_by_index_name_part_or_default() -> None:
    assert pick_input_device(DEVICES, 2)["index"] == 2
    assert pick_input_device(DEVICES, "usb pnp")["index"] == 2
    assert pick_input_device(DEVICES, "PULSE")["index"] == 3  # the exact name wins over "pulse monitor"
    assert pick_input_device(DEVICES, None, default_input=0)["index"] == 0


@pytest.mark.parametrize(
    ("wanted", "complaint"),
    [
        ("hdmi", "no input device matches 'hdmi'"),
        (1, "no input device with index 1"),
        ("(hw:", "2 input devices match '(hw:'"),
        (None, "no default input device"),
    ],
)
def test_a_missing_or_ambiguous_input_is_refused_with_the_list(wanted: int | str | None, complaint: str) -> None:
    with pytest.raises(AudioSourceError) as refused:
        pick_input_device(DEVICES, wanted)
    assert complaint in str(refused.value)
    assert "available inputs: 0: HDA Intel" in str(refused.value)
    assert "HDMI" not in str(refused.value).split("available inputs")[1]


def test_no_inputs_at_all_says_so() -> None:
    with pytest.raises(AudioSourceError, match="no audio input devices"):
        pick_input_device(DEVICES[1:2], None)


@pytest.mark.subprocess
def test_files_and_stdin_never_import_sounddevice() -> None:
    program = (
        "import io, sys\n"
        "from device.audio_sources import FileSource, StdinSource\n"
        f"blocks = list(FileSource({str(IN_VOCABULARY_SAMPLE)!r}).blocks())\n"
        "blocks += list(StdinSource(io.BytesIO(bytes(960)), sample_rate=48000).blocks())\n"
        "assert blocks and 'sounddevice' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", program], cwd=REPO, check=True, timeout=60)
