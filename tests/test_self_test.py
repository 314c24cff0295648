"""The self-test a device runs on a candidate model: shipped clips, shipped model, drill packages, bad suites."""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from pathlib import Path

import pytest
import soundfile

from device.local_model import load_local_model, shipped_model_directory
from device.self_test import (
    MAX_REASON_CHARS,
    SelfTestReport,
    SelfTestSuite,
    SelfTestUnavailable,
    run_self_test,
    shipped_suite_directory,
)
from device.settings import CaptureSettings, DenoiseMode
from firmware_tools.release.drill import break_package, copy_package
from schemas.model import ModelPackage

from .conftest import IN_VOCABULARY_SAMPLE

LIGHTS = "hey_jarvis_turn_on_the_lights.flac"
START = "hey_jarvis_start.flac"


def suite_in(folder: Path, toml: str, *clips: Path) -> Path:
    """A suite directory in ``folder`` with ``suite.toml`` and copies of ``clips``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "suite.toml").write_text(toml)
    for clip in clips:
        shutil.copy(clip, folder)
    return folder


def clip_table(file: str, says: str, expect: str | None) -> str:
    last = f'command = "{expect}"' if expect is not None else "negative = true"
    return f'[[clip]]\nfile = "{file}"\nsays = "{says}"\n{last}\n\n'


def test_the_shipped_suite_holds_small_commands_and_negatives() -> None:
    suite = SelfTestSuite.load()
    assert [clip.expected_label for clip in suite.clips] == ["lights_on", "start", "digit[value=3]", None, None]
    for clip in suite.clips:
        assert clip.file.is_absolute() and clip.file.parent == shipped_suite_directory().resolve()
        info = soundfile.info(str(clip.file))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), clip
    assert sum(clip.file.stat().st_size for clip in suite.clips) < 250_000


@pytest.mark.parametrize("denoise", [DenoiseMode.UTTERANCE, DenoiseMode.OFF])
def test_the_shipped_model_passes_the_shipped_suite(local_model, denoise: DenoiseMode) -> None:
    report = run_self_test(local_model, CaptureSettings(), denoise)
    assert report.passed, report.reason()
    assert report.clips == 5 and report.failures == ()
    assert report.reason() == "self-test passed on 5 clips"
    assert report.seconds < 5.0


def test_a_broken_package_loads_like_the_original_but_fails_every_command(tmp_path: Path) -> None:
    shipped = ModelPackage.load(shipped_model_directory())
    model = load_local_model(break_package(shipped_model_directory(), tmp_path / "broken", "1.0.1"))
    # Digest, front end, shapes and labels all pass: only the weights are wrong.
    assert model.version == "1.0.1" and model.package.labels == shipped.labels
    assert model.package.frontend == shipped.frontend and model.package.detection == shipped.detection
    original = shipped.model_path(shipped_model_directory()).read_bytes()
    broken = model.package.model_path(tmp_path / "broken").read_bytes()
    assert broken != original and sorted(broken) == sorted(original)  # the same bytes, some moved
    report = run_self_test(model, CaptureSettings(), DenoiseMode.UTTERANCE)
    assert not report.passed and report.clips == 5
    commands = [clip for clip in SelfTestSuite.load().clips if clip.expected_label is not None]
    assert len(report.failures) == len(commands)
    for clip, failure in zip(commands, report.failures, strict=True):
        assert failure.startswith(f"{clip.name}: no wake (best wake score "), failure
    reason = report.reason()
    assert reason.startswith(f"self-test failed on 3 of 5 clips: {LIGHTS} ('hey jarvis, turn on the lights'): no wake")
    assert len(reason) < MAX_REASON_CHARS


def test_a_copied_package_passes_under_its_new_version(tmp_path: Path) -> None:
    out = copy_package(shipped_model_directory(), tmp_path / "copy", "1.1.0")
    assert out == tmp_path / "copy"
    model = load_local_model(out)
    shipped = ModelPackage.load(shipped_model_directory())
    assert model.version == "1.1.0"
    assert model.package.sha256 == shipped.sha256
    assert (out / "model.tflite").read_bytes() == (shipped_model_directory() / "model.tflite").read_bytes()
    assert abs(model.package.created_at - time.time()) < 60
    assert run_self_test(model, CaptureSettings(), DenoiseMode.OFF).passed


@pytest.mark.parametrize("build", [copy_package, break_package])
def test_drills_refuse_a_missing_package_and_a_bad_version(build, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no model package in .*nothing: manifest.json is missing"):
        build(tmp_path / "nothing", tmp_path / "out", "1.0.1")
    with pytest.raises(ValueError, match=r"a package version reads MAJOR.MINOR.PATCH, not 'next'"):
        build(shipped_model_directory(), tmp_path / "out", "next")
    assert not (tmp_path / "out").exists()


def test_a_negative_clip_that_wakes_the_model_is_reported(local_model, tmp_path: Path) -> None:
    shipped = shipped_suite_directory()
    toml = clip_table(START, "hey jarvis, start", "start") + clip_table(LIGHTS, "hey jarvis, lights on", None)
    suite = SelfTestSuite.load(suite_in(tmp_path, toml, shipped / START, IN_VOCABULARY_SAMPLE))
    report = run_self_test(local_model, CaptureSettings(), DenoiseMode.UTTERANCE, suite)
    assert report.failures == (f"{LIGHTS} ('hey jarvis, lights on'): woke the device (score 0.996)",)
    assert report.reason() == f"self-test failed on 1 of 2 clips: {report.failures[0]}"


@pytest.mark.parametrize(
    "expect, failure",
    [
        ("lights_off", r"recognised as lights_on \(0\.9\d\d\), expected lights_off"),
        ("digit[value=10]", r"expected digit\[value=10\], a label the model does not have"),
    ],
)
def test_a_command_taken_for_another_is_reported(local_model, tmp_path: Path, expect: str, failure: str) -> None:
    toml = clip_table(LIGHTS, "hey jarvis, turn on the lights", expect)
    suite = SelfTestSuite.load(suite_in(tmp_path, toml, IN_VOCABULARY_SAMPLE))
    report = run_self_test(local_model, CaptureSettings(), DenoiseMode.OFF, suite)
    (reported,) = report.failures
    assert re.fullmatch(re.escape(f"{LIGHTS} ('hey jarvis, turn on the lights'): ") + failure, reported), reported


def test_a_model_that_raises_gives_a_report_not_a_crash(local_model) -> None:
    # A real model whose manifest promises windows of another length: the classifier refuses every window.
    package = local_model.package
    wrong = dataclasses.replace(package, frontend=dataclasses.replace(package.frontend, frames=100))
    report = run_self_test(dataclasses.replace(local_model, package=wrong), CaptureSettings(), DenoiseMode.OFF)
    assert len(report.failures) == report.clips == 5
    for failure in report.failures:
        assert "the model failed: ValueError: window shape (100, 40) does not match the model's (150, 40)" in failure


@pytest.mark.parametrize(
    "toml, error",
    [
        ("[[clip]\nfile = ", r"suite.toml is not valid TOML"),
        ("version = 1\n", r"must hold \[\[clip\]\] tables and nothing else \(unknown: version\)"),
        (clip_table(START, "start", "start").replace("command", "label"), r"clip 1 has unknown key\(s\) label"),
        (clip_table(START, "start", "start").replace('says = "start"\n', ""), r"clip 1 needs 'says'"),
        (
            clip_table(START, "start", "start") + "negative = true\n",
            r"clip 1 needs exactly one of 'command' \(a model label\) or 'negative = true'",
        ),
        (clip_table(START, "start", None), r"needs at least one command clip"),
        (clip_table("nowhere.flac", "start", "start"), r"clip 1: the clip nowhere.flac is missing"),
        (clip_table("suite.toml", "start", "start"), r"clip 1: the clip suite.toml is not readable audio"),
    ],
)
def test_a_broken_suite_is_refused_with_the_reason(tmp_path: Path, toml: str, error: str) -> None:
    with pytest.raises(SelfTestUnavailable, match=error):
        SelfTestSuite.load(suite_in(tmp_path, toml, shipped_suite_directory() / START))


def test_a_suite_with_a_missing_clip_or_no_suite_file_is_refused(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    shutil.copytree(shipped_suite_directory(), suite)
    (suite / "hey_jarvis_three.flac").unlink()
    with pytest.raises(SelfTestUnavailable, match=r"clip 3: the clip hey_jarvis_three.flac is missing"):
        SelfTestSuite.load(suite)
    (suite / "suite.toml").unlink()
    with pytest.raises(SelfTestUnavailable, match=r"no self-test suite in .*suite: suite.toml is missing"):
        SelfTestSuite.load(suite)


def test_a_long_reason_is_cut_short() -> None:
    report = SelfTestReport(tuple(f"clip{n}.flac: " + "x" * 400 for n in range(5)), clips=5, seconds=0.1)
    reason = report.reason()
    assert reason.startswith("self-test failed on 5 of 5 clips: clip0.flac: ")
    assert len(reason) < MAX_REASON_CHARS and reason.endswith("...")
