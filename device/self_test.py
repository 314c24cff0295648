"""The self-test a device runs on a candidate model before it trusts it: real clips through the real pipeline.

A model can pass every check of its package (signature, digest, front end, shapes,
labels) and still hear nothing. The self-test plays a few clips that ship with the
device (``device/self_test_clips/``) through the listening pipeline, as ``python -m
device detect`` does: each command clip must wake the model and be taken for its
command (the best class is enough, since thresholds may differ between versions), and
each negative clip must not wake it.
"""

from __future__ import annotations

import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import soundfile

from common.recording import RecordingError, read_recording
from device.detector import WakeEvent
from device.local_model import LocalModel
from device.pipeline import CommandEvent, ListeningPipeline
from device.settings import AudioSettings, CaptureSettings, DenoiseMode

SUITE_FILE = "suite.toml"
"""The suite's description, in its directory."""
MAX_REASON_CHARS = 900
"""A report's reason is shorter than this, so it fits in a status message's reason (1024)."""

_CLIP_KEYS = {"file", "says", "command", "negative"}


class SelfTestUnavailable(RuntimeError):
    """No usable self-test suite: missing, malformed, or naming a clip that is not there."""


def shipped_suite_directory() -> Path:
    """The suite that ships with mqvox (device/self_test_clips)."""
    return Path(str(resources.files("device").joinpath("self_test_clips")))


@dataclass(frozen=True)
class SelfTestClip:
    """One recording and what the model must make of it."""

    file: Path
    """The FLAC clip (absolute path)."""
    expected_label: str | None
    """The command label it must be recognised as; None for a negative clip, which must not wake the device."""
    says: str
    """What is said, for messages."""

    @property
    def name(self) -> str:
        """The clip as failures name it: file name and what it says."""
        return f"{self.file.name} ({self.says!r})"


@dataclass(frozen=True)
class SelfTestSuite:
    """The clips of a self-test; at least one of them a command, or a model that hears nothing would pass."""

    clips: tuple[SelfTestClip, ...]
    """Command and negative clips, run in this order."""

    def __post_init__(self) -> None:
        if not any(clip.expected_label is not None for clip in self.clips):
            raise SelfTestUnavailable("a self-test suite needs at least one command clip")

    @classmethod
    def load(cls, directory: str | Path | None = None) -> SelfTestSuite:
        """Read ``suite.toml`` in ``directory`` (default: the shipped suite) and check that every clip is there."""
        directory = Path(directory) if directory is not None else shipped_suite_directory()
        path = directory / SUITE_FILE
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SelfTestUnavailable(f"no self-test suite in {directory}: {SUITE_FILE} is missing") from None
        except OSError as error:
            raise SelfTestUnavailable(f"cannot read self-test suite {path}: {error.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise SelfTestUnavailable(f"self-test suite {path} is not valid TOML: {error}") from None
        clips = data.get("clip")
        unknown = set(data) - {"clip"}
        if unknown or not isinstance(clips, list) or not clips:
            raise SelfTestUnavailable(
                f"self-test suite {path} must hold [[clip]] tables and nothing else"
                + (f" (unknown: {', '.join(sorted(unknown))})" if unknown else "")
            )
        resolved = directory.resolve()
        loaded = tuple(_clip(resolved, table, f"{path}, clip {number}") for number, table in enumerate(clips, 1))
        try:
            return cls(loaded)
        except SelfTestUnavailable as error:
            raise SelfTestUnavailable(f"self-test suite {path}: {error}") from None


def _clip(directory: Path, table: Any, where: str) -> SelfTestClip:
    if not isinstance(table, dict):
        raise SelfTestUnavailable(f"{where} must be a table, not {table!r}")
    unknown = set(table) - _CLIP_KEYS
    if unknown:
        raise SelfTestUnavailable(f"{where} has unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("file", "says"):
        if not isinstance(table.get(key), str) or not table[key]:
            raise SelfTestUnavailable(f"{where} needs {key!r}, a non-empty string")
    command, negative = table.get("command"), table.get("negative", False)
    if command is not None and (not isinstance(command, str) or not command):
        raise SelfTestUnavailable(f"{where}: 'command' must be a model label, not {command!r}")
    if not isinstance(negative, bool):
        raise SelfTestUnavailable(f"{where}: 'negative' must be true or false, not {negative!r}")
    if (command is None) != negative:
        raise SelfTestUnavailable(f"{where} needs exactly one of 'command' (a model label) or 'negative = true'")
    file = (directory / table["file"]).resolve()
    if not file.is_file():
        raise SelfTestUnavailable(f"{where}: the clip {table['file']} is missing")
    try:
        soundfile.info(str(file))
    except (soundfile.LibsndfileError, OSError) as error:
        raise SelfTestUnavailable(f"{where}: the clip {table['file']} is not readable audio ({error})") from None
    return SelfTestClip(file, None if negative else command, table["says"])


@dataclass(frozen=True)
class SelfTestReport:
    """What a model made of a suite."""

    failures: tuple[str, ...]
    """One readable line per failed clip: the clip, what it says, and what went wrong."""
    clips: int
    """Clips run."""
    seconds: float
    """Wall time of the whole self-test (seconds)."""

    @property
    def passed(self) -> bool:
        """True when every clip passed."""
        return not self.failures

    def reason(self) -> str:
        """One line for logs and status messages, shorter than MAX_REASON_CHARS."""
        if self.passed:
            return f"self-test passed on {self.clips} clips"
        text = f"self-test failed on {len(self.failures)} of {self.clips} clips: " + "; ".join(self.failures)
        return text if len(text) < MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 4] + "..."


def run_self_test(
    model: LocalModel, capture: CaptureSettings, denoise: DenoiseMode, suite: SelfTestSuite | None = None
) -> SelfTestReport:
    """Play every clip of ``suite`` (default: the shipped one) to ``model``, each through a fresh pipeline.

    An error raised while the model runs fails that clip, with its message: a broken
    model gives a report, not a crash. A clip that cannot be read raises SelfTestUnavailable.
    """
    suite = suite if suite is not None else SelfTestSuite.load()
    started = time.perf_counter()
    failures = []
    for clip in suite.clips:
        try:
            failure = _failure(model, capture, denoise, clip)
        except RecordingError as error:
            raise SelfTestUnavailable(f"self-test clip {clip.file}: {error}") from None
        except Exception as error:  # whatever a broken model raises; KeyboardInterrupt and SystemExit go through
            failure = f"the model failed: {type(error).__name__}: {error}"
        if failure is not None:
            failures.append(f"{clip.name}: {failure}")
    return SelfTestReport(tuple(failures), len(suite.clips), round(time.perf_counter() - started, 3))


def _failure(model: LocalModel, capture: CaptureSettings, denoise: DenoiseMode, clip: SelfTestClip) -> str | None:
    """What went wrong with ``clip``, or None when it passed."""
    if clip.expected_label is not None and clip.expected_label not in model.package.labels:
        return f"expected {clip.expected_label}, a label the model does not have"
    sample_rate = model.package.frontend.sample_rate
    audio = read_recording(clip.file, sample_rate)
    block = sample_rate * AudioSettings().block_ms // 1000  # the blocks a device reads by default
    pipeline = ListeningPipeline(model, capture, denoise)
    events, best_wake = [], 0.0
    for start in range(0, len(audio), block):
        events += pipeline.push(audio[start : start + block])
        best_wake = max(best_wake, pipeline.detector.last_score)
    events += pipeline.finish()
    wakes = [event for event in events if isinstance(event, WakeEvent)]
    if clip.expected_label is None:
        return f"woke the device (score {wakes[0].score:.3f})" if wakes else None
    if not wakes:
        threshold = model.package.detection.wake_threshold
        return f"no wake (best wake score {best_wake:.3f}, threshold {threshold:.3f})"
    bests = [event.alternatives[0] for event in events if isinstance(event, CommandEvent)]
    if any(best.label == clip.expected_label for best in bests):
        return None
    if not bests:
        return f"woke (score {wakes[0].score:.3f}) but captured no command"
    return f"recognised as {bests[0].label} ({bests[0].score:.3f}), expected {clip.expected_label}"
