"""The pretrained speech embedding the command head reads: the right files, the right shapes, refused when altered."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.recording import read_recording
from device.inference import ModelLoadError
from device.speech_embedding import (
    EMBEDDING_SIZE,
    MEL_BINS,
    SpeechEmbedding,
    embedding_directory,
    samples_for,
    shared_embedding,
)

FSDD = Path(__file__).parent / "data" / "fsdd"


def test_embeddings_come_one_per_80_ms_once_775_ms_are_heard() -> None:
    embed = shared_embedding()
    for count in (1, 2, 16):
        assert embed(np.zeros(samples_for(count), np.float32)).shape == (count, EMBEDDING_SIZE)
    # Eight mel frames (80 ms) short of three embeddings gives two.
    assert embed(np.zeros(samples_for(3) - 8 * 160, np.float32)).shape == (2, EMBEDDING_SIZE)
    assert embed(np.zeros(100, np.float32)).shape == (0, EMBEDDING_SIZE)


def test_mel_frames_follow_the_loudness_of_the_speech() -> None:
    speech = read_recording(next(FSDD.glob("*.flac")), 16000)
    embed = shared_embedding()
    mel = embed.mel(speech)
    assert mel.shape[1] == MEL_BINS
    assert len(mel) == pytest.approx(len(speech) / 160, abs=4)
    quiet = embed.mel(speech * 0.01)
    assert np.isfinite(mel).all() and np.isfinite(quiet).all()
    # 40 dB quieter: log-mel power in dB/10 falls by about 4 wherever the speech is well above the floor.
    loud = mel > np.percentile(mel, 75)
    assert float(np.median(mel[loud] - quiet[loud])) == pytest.approx(4.0, abs=0.5)


def test_an_altered_model_file_is_refused_by_name(tmp_path: Path) -> None:
    copy = tmp_path / "embedding"
    shutil.copytree(embedding_directory(), copy)
    data = bytearray((copy / "embedding_model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "embedding_model.tflite").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=r"embedding_model\.tflite is not the file the heads were trained on"):
        SpeechEmbedding(copy)
    (copy / "melspectrogram.tflite").unlink()
    with pytest.raises(ModelLoadError, match="cannot read"):
        SpeechEmbedding(copy)
