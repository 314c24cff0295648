"""python -m device detect and run, as users run them, including what they do with bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from common.recording import read_recording
from device.local_model import ModelUnavailable, load_local_model, shipped_model_directory

from .conftest import COMMAND_START_S, IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

pytestmark = pytest.mark.subprocess

WAKE_KEYS = {"event", "file", "time_s", "score"}
COMMAND_KEYS = {"event", "file", "time_s", "intent", "slots", "confidence", "alternatives", "decision"}


def device(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "device", *args], capture_output=True, text=True, timeout=timeout)


def lines(completed: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in completed.stdout.splitlines()]


def test_detect_prints_a_wake_then_a_command_per_recording() -> None:
    shown = device("detect", str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE), "--json")
    assert shown.returncode == 0, shown.stderr
    wake, command, other_wake, other_command = lines(shown)
    assert set(wake) == WAKE_KEYS and wake["event"] == "wake" and wake["file"] == str(IN_VOCABULARY_SAMPLE)
    assert set(command) == COMMAND_KEYS and command["event"] == "command"
    assert (command["intent"], command["slots"], command["decision"]) == ("lights_on", {}, "edge")
    best = command["alternatives"][0]
    assert best == {"label": "lights_on", "intent": "lights_on", "slots": {}, "score": command["confidence"]}
    assert command["confidence"] >= load_local_model().package.detection.command_threshold
    assert command["time_s"] > wake["time_s"]
    assert other_wake["event"] == "wake" and other_wake["file"] == str(OUT_OF_VOCABULARY_SAMPLE)
    # Outside the vocabulary: not recognised, so intent null and the cloud decides; guesses in alternatives.
    assert (other_command["intent"], other_command["slots"], other_command["decision"]) == (None, {}, "cloud")
    assert len(other_command["alternatives"]) == 3


def test_detect_skip_wake_gives_one_command_event_per_file(tmp_path: Path) -> None:
    request = tmp_path / "lights.wav"
    audio = read_recording(IN_VOCABULARY_SAMPLE)[int(COMMAND_START_S * 16000) :]
    soundfile.write(request, audio, 16000)
    quiet = tmp_path / "quiet.flac"
    soundfile.write(quiet, np.zeros(32000, np.float32), 16000)
    shown = device("detect", "--skip-wake", "--json", str(request), str(quiet))
    assert shown.returncode == 0, shown.stderr
    lights, nothing = lines(shown)
    assert lights["event"] == nothing["event"] == "command"
    assert lights["alternatives"][0]["intent"] == "lights_on"
    assert (nothing["intent"], nothing["decision"]) == (None, "cloud")


@pytest.mark.slow
def test_detect_says_so_when_a_file_yields_nothing(tmp_path: Path) -> None:
    quiet = tmp_path / "quiet.flac"
    soundfile.write(quiet, np.zeros(48000, np.float32), 16000)
    shown = device("detect", "--json", str(quiet), str(IN_VOCABULARY_SAMPLE))
    assert shown.returncode == 0, shown.stderr
    nothing, wake, command = lines(shown)
    assert nothing == {"event": "nothing", "file": str(quiet), "detail": "no wake word heard"}
    assert (wake["event"], command["event"]) == ("wake", "command")
    readable = device("detect", str(quiet))
    assert readable.stdout.strip() == f"{quiet}  nothing: no wake word heard"


def test_detect_without_json_is_readable() -> None:
    shown = device("detect", str(IN_VOCABULARY_SAMPLE))
    assert shown.returncode == 0
    assert "wake" in shown.stdout and "lights_on" in shown.stdout and "-> edge" in shown.stdout


@pytest.mark.slow
def test_detect_text_gives_the_confidence_of_the_class_it_names() -> None:
    """A cloud decision names the device's best guess beside its score, never "None" beside another class's."""
    for sample in (IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE):
        (command,) = [line for line in lines(device("detect", "--json", str(sample))) if line["event"] == "command"]
        text = device("detect", str(sample)).stdout.splitlines()[-1]
        best = command["alternatives"][0]
        assert f"confidence {best['score']:.4f}" in text and "None" not in text
        if command["decision"] == "cloud":
            assert f"not sure, best guess {best['label']}" in text and text.endswith("-> cloud")
        else:
            assert command["intent"] in text and best["intent"] == command["intent"]


def test_detect_reports_unreadable_files_and_goes_on(tmp_path: Path) -> None:
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not a recording")
    shown = device("detect", "--json", str(not_audio), str(tmp_path / "missing.flac"), str(IN_VOCABULARY_SAMPLE))
    assert shown.returncode == 1
    first, second, *rest = lines(shown)
    assert first["event"] == second["event"] == "error"
    assert "cannot read audio file" in first["error"] and "notes.wav" in first["error"]
    assert "no such audio file" in second["error"]
    assert [line["event"] for line in rest] == ["wake", "command"]


def test_detect_resamples_other_rates_and_channels(tmp_path: Path) -> None:
    stereo = tmp_path / "stereo-44k.wav"
    audio = read_recording(IN_VOCABULARY_SAMPLE, 44100)
    soundfile.write(stereo, np.stack((audio, audio), axis=1), 44100)
    wake, command = lines(device("detect", "--json", str(stereo)))
    assert wake["event"] == "wake" and command["intent"] == "lights_on"


def _copied_model(tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(shipped_model_directory(), copy)
    return copy


def _edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for key, value in changes.items():
        if isinstance(value, dict):
            manifest[key] |= value
        else:
            manifest[key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_missing_model_is_refused_clearly(tmp_path: Path) -> None:
    shown = device("detect", "--model", str(tmp_path / "nowhere"), str(IN_VOCABULARY_SAMPLE))
    assert shown.returncode == 2 and shown.stdout == ""
    assert "no model package" in shown.stderr and "manifest.json is missing" in shown.stderr


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("tamper", "does not match its manifest's digest"),
        ("front end", "do not fit the sample rate"),
        ("unknown window", "'kaiser' is not one of"),
        ("labels", "which the vocabulary does not define"),
        ("not json", "model_package"),
        ("input shape", "but its manifest says"),
    ],
)
def test_a_damaged_or_incompatible_model_is_refused(tmp_path: Path, damage: str, message: str) -> None:
    model = _copied_model(tmp_path)
    if damage == "tamper":
        data = bytearray((model / "model.tflite").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (model / "model.tflite").write_bytes(bytes(data))
    elif damage == "front end":
        _edit_manifest(model, frontend={"high_hz": 12000.0})  # valid, but past 8 kHz at 16 kHz: not computable
    elif damage == "unknown window":
        _edit_manifest(model, frontend={"window": "kaiser"})
    elif damage == "labels":
        labels = json.loads((model / "manifest.json").read_text())["labels"]
        _edit_manifest(model, labels=[*labels[:-1], "open_the_pod_bay_doors"])
    elif damage == "not json":
        (model / "manifest.json").write_text("{ not json")
    else:
        _edit_manifest(model, frontend={"frames": 100})
    with pytest.raises(ModelUnavailable) as refused:
        load_local_model(model)
    assert message in str(refused.value)
    shown = device("detect", "--model", str(model), str(IN_VOCABULARY_SAMPLE))
    assert shown.returncode == 2 and message in shown.stderr


def test_run_refuses_a_broken_config_before_connecting(tmp_path: Path) -> None:
    config = tmp_path / "device.toml"
    config.write_text("[capture]\nvad_frame_ms = 25\n")
    shown = device("run", "--config", str(config))
    assert shown.returncode == 2
    assert "capture.vad_frame_ms must be 10, 20 or 30" in shown.stderr and str(config) in shown.stderr


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        ('source = "stdin"\nstdin_sample_rate = 4000', "4000"),
        ('source = "file"\nfiles = ["missing.flac"]', "no such audio file"),
        ('source = "microphone"\ninput_device = "no such microphone"', "no such microphone"),
    ],
)
def test_run_refuses_audio_it_cannot_use(tmp_path: Path, audio: str, message: str) -> None:
    config = tmp_path / "device.toml"
    config.write_text(f"[broker]\nport = 1\n[audio]\n{audio}\n")
    shown = device("run", "--config", str(config))
    assert shown.returncode == 2, shown.stderr
    assert message in shown.stderr
