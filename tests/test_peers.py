"""The peer wake-word detectors load from their installed packages and hear "hey jarvis" in our own recordings."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from common.recording import read_recording
from firmware_tools.building.peers import (
    SAMPLE_RATE,
    MicroWakeWordPeer,
    OpenWakeWordPeer,
    PeerScores,
    WakePeer,
    load_peers,
)

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

PEER_KEYS = ["microwakeword", "openwakeword"]

EXPECTED_STEP_S = {"microwakeword": 0.03, "openwakeword": 0.08}
"""Seconds between scores: 3 feature frames of 10 ms per microWakeWord inference, one 80 ms chunk per openWakeWord."""

DETECTION_THRESHOLD = 0.5
"""A score above this counts as hearing the wake phrase (openWakeWord's default threshold)."""

WAKE_PHRASE_END_S = 0.9
"""Where "hey jarvis" has ended in the weather sample: its energy falls to silence at 0.85-0.95 s."""


def _with_silence(samples: np.ndarray, silence_s: float = 1.0) -> np.ndarray:
    silence = np.zeros(int(silence_s * SAMPLE_RATE), dtype=np.float32)
    return np.concatenate([silence, samples, silence])


@pytest.fixture(scope="module")
def peers() -> dict[str, WakePeer]:
    return load_peers()


@pytest.fixture(scope="module")
def wake_phrase_audio() -> np.ndarray:
    return _with_silence(read_recording(IN_VOCABULARY_SAMPLE))


@pytest.fixture(scope="module")
def audio_without_wake_phrase() -> dict[str, np.ndarray]:
    weather = read_recording(OUT_OF_VOCABULARY_SAMPLE)
    white_noise = np.random.default_rng(20240601).standard_normal(10 * SAMPLE_RATE) * 0.01
    return {
        "speech after the wake phrase": _with_silence(weather[int(WAKE_PHRASE_END_S * SAMPLE_RATE) :]),
        "10 s of white noise": white_noise.astype(np.float32),
    }


def _assert_one_score_per_step(result: PeerScores, audio: np.ndarray, key: str) -> None:
    assert result.step_s == pytest.approx(EXPECTED_STEP_S[key])
    assert result.scores.dtype == np.float32
    assert abs(result.scores.size - audio.size / SAMPLE_RATE / result.step_s) <= 2
    assert np.all((result.scores >= 0.0) & (result.scores <= 1.0))
    assert result.cpu_s > 0.0


def test_load_peers_gives_both_models_from_their_packages(peers: dict[str, WakePeer]) -> None:
    assert sorted(peers) == PEER_KEYS
    micro, open_ = peers["microwakeword"], peers["openwakeword"]
    assert isinstance(micro, MicroWakeWordPeer)
    assert isinstance(open_, OpenWakeWordPeer)
    for peer, package in [(micro, "pymicro_wakeword"), (open_, "pyopen_wakeword")]:
        assert "hey_jarvis" in peer.name
        assert peer.model_path.is_file()
        assert peer.model_path.parts[-3:] == (package, "models", "hey_jarvis.tflite")


@pytest.mark.parametrize("key", PEER_KEYS)
def test_the_wake_phrase_scores_high(peers: dict[str, WakePeer], wake_phrase_audio: np.ndarray, key: str) -> None:
    result = peers[key].score(wake_phrase_audio)
    _assert_one_score_per_step(result, wake_phrase_audio, key)
    assert result.scores.max() > DETECTION_THRESHOLD
    # The peak comes once the phrase has been heard: after the leading second of silence, before the trailing one.
    peak_s = (int(result.scores.argmax()) + 1) * result.step_s
    assert 1.0 < peak_s < wake_phrase_audio.size / SAMPLE_RATE - 1.0


@pytest.mark.parametrize("key", PEER_KEYS)
def test_audio_without_the_wake_phrase_scores_low(
    peers: dict[str, WakePeer], audio_without_wake_phrase: dict[str, np.ndarray], key: str
) -> None:
    for what, audio in audio_without_wake_phrase.items():
        result = peers[key].score(audio)
        _assert_one_score_per_step(result, audio, key)
        assert result.scores.max() < DETECTION_THRESHOLD, what


@pytest.mark.parametrize("key", PEER_KEYS)
def test_each_call_starts_from_fresh_state(peers: dict[str, WakePeer], wake_phrase_audio: np.ndarray, key: str) -> None:
    first = peers[key].score(wake_phrase_audio)
    again = peers[key].score(wake_phrase_audio)
    np.testing.assert_array_equal(first.scores, again.scores)


@pytest.mark.parametrize("key", PEER_KEYS)
@pytest.mark.slow
def test_long_float64_audio_is_scored_in_chunks(peers: dict[str, WakePeer], key: str) -> None:
    # 20 s crosses the 10 s conversion blocks and openWakeWord's 10 s buffers; float64 is converted block by block.
    audio = np.random.default_rng(7).uniform(-0.01, 0.01, 20 * SAMPLE_RATE)
    result = peers[key].score(audio)
    _assert_one_score_per_step(result, audio, key)


@pytest.mark.parametrize("key", PEER_KEYS)
def test_audio_that_is_not_mono_float_is_refused(peers: dict[str, WakePeer], key: str) -> None:
    with pytest.raises(ValueError, match="mono float"):
        peers[key].score(np.zeros((SAMPLE_RATE, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="mono float"):
        peers[key].score(np.zeros(SAMPLE_RATE, dtype=np.int16))


@pytest.mark.parametrize(
    ("module_name", "distribution_name"),
    [("pymicro_wakeword", "pymicro-wakeword"), ("pyopen_wakeword", "pyopen-wakeword")],
)
def test_a_missing_peer_package_is_named(
    monkeypatch: pytest.MonkeyPatch, module_name: str, distribution_name: str
) -> None:
    # None in sys.modules makes the import itself fail, as it does when the package is not installed.
    monkeypatch.setitem(sys.modules, module_name, None)
    with pytest.raises(RuntimeError, match=distribution_name):
        load_peers()
