"""The listening pipeline: audio in, wake and command events out. No broker, no side effects.

Always on: (RNNoise, in mode ``always``) → streaming features → wake model on a
stride. After a wake: webrtcvad capture → RNNoise (mode ``utterance``, run while the
user speaks so the endpoint does not wait for it) → the command model on a window
centred on the speech → the edge/cloud decision. ``python -m device detect`` and the
online runtime both drive this class, so offline results are the device's results.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from device.capture import NO_SPEECH, CapturedUtterance, NoSpeech, UtteranceCapture
from device.denoise import StreamDenoiser
from device.detector import CommandDecision, WakeDetector, WakeEvent
from device.local_model import LocalModel
from device.settings import CaptureSettings, DenoiseMode
from schemas.result import SlotValue

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alternative:
    """One of the command model's best classes."""

    label: str
    """Model class."""
    intent: str | None
    """Its intent; None for silence, unknown speech and the wake phrase."""
    slots: Mapping[str, SlotValue]
    """Slot values the class fixes."""
    score: float
    """Model score in [0, 1]."""


@dataclass(frozen=True)
class CommandEvent:
    """An utterance after the wake word, classified and decided."""

    utterance: CapturedUtterance
    """The captured audio as heard (not denoised): what would be uploaded."""
    decision: CommandDecision
    """The model's best class and whether the device decides on its own."""
    intent: str | None
    """Intent of the best class; None when it is not a command."""
    slots: Mapping[str, SlotValue]
    """Slot values of the best class."""
    alternatives: tuple[Alternative, ...]
    """The best three classes, best first."""
    timings_ms: Mapping[str, float]
    """From the endpoint: ``denoise`` (finishing RNNoise), ``inference`` (features and model), ``decide`` (both)."""

    @property
    def local(self) -> bool:
        """True when the device is sure: an edge result; otherwise the cloud is asked."""
        return self.decision.local

    @property
    def time_s(self) -> float:
        """Stream time (seconds) of the end of the speech."""
        return self.utterance.end_s


class CommandStage:
    """One utterance: capture, denoising as it arrives, then the command model at the endpoint."""

    def __init__(
        self,
        model: LocalModel,
        settings: CaptureSettings,
        *,
        denoise: bool,
        start_s: float,
        after_wake: bool = True,
    ) -> None:
        self.model = model
        sample_rate = model.package.frontend.sample_rate
        self.capture = UtteranceCapture(settings, start_s=start_s, after_wake=after_wake, sample_rate=sample_rate)
        self._denoiser = StreamDenoiser(sample_rate) if denoise else None
        self._denoised: list[np.ndarray] = []

    def push(self, audio: np.ndarray) -> CommandEvent | NoSpeech | None:
        if self._denoiser is not None:
            self._denoised.append(self._denoiser.push(audio))
        outcome = self.capture.push(audio)
        if isinstance(outcome, CapturedUtterance):
            return self._decide(outcome)
        if outcome is NO_SPEECH:
            self.close()
        return outcome

    def finish(self, *, whole_if_silent: bool = False) -> CommandEvent | None:
        """The stream ended: decide on what was captured, if anything."""
        captured = self.capture.finish(whole_if_silent=whole_if_silent)
        if captured is None:
            self.close()
            return None
        return self._decide(captured)

    def _decide(self, captured: CapturedUtterance) -> CommandEvent:
        audio = captured.audio
        if self._denoiser is not None:
            self._denoised.append(self._denoiser.flush())
            self.close()
            denoised = np.concatenate(self._denoised)[captured.offset : captured.offset + len(audio)]
            audio = np.pad(denoised, (0, len(audio) - len(denoised)))
        denoised_at = time.perf_counter()
        decision = self.model.decide(audio, captured.speech_start, captured.speech_end)
        decided_at = time.perf_counter()
        meaning = self.model.meaning(decision.alternatives[0][0])
        alternatives = tuple(
            Alternative(label, self.model.meaning(label).intent, self.model.meaning(label).slots, score)
            for label, score in decision.alternatives
        )
        return CommandEvent(
            utterance=captured,
            decision=decision,
            intent=meaning.intent if decision.label is not None else None,
            slots=meaning.slots if decision.label is not None else {},
            alternatives=alternatives,
            timings_ms={
                "denoise": round(1000 * (denoised_at - captured.endpointed_at), 3),
                "inference": round(1000 * (decided_at - denoised_at), 3),
                "decide": round(1000 * (decided_at - captured.endpointed_at), 3),
            },
        )

    def close(self) -> None:
        if self._denoiser is not None:
            self._denoiser.close()


class ListeningPipeline:
    """Push audio blocks; get the events they complete.

    With ``skip_wake`` the wake stage is left out and the whole stream is one
    utterance (``python -m device detect --skip-wake``): :meth:`finish` always
    yields exactly one CommandEvent, even for a stream without speech.
    """

    def __init__(
        self, model: LocalModel, capture: CaptureSettings, denoise: DenoiseMode, *, skip_wake: bool = False
    ) -> None:
        self.model = model
        self.capture_settings = capture
        self.denoise = denoise
        self.skip_wake = skip_wake
        self.sample_rate = model.package.frontend.sample_rate
        self.detector = WakeDetector(model.classifier, model.package)
        self._stream_denoiser = StreamDenoiser(self.sample_rate) if denoise == DenoiseMode.ALWAYS else None
        self._samples = 0
        # The last blocks, so that a capture starts at the wake's own sample even though the detector reports
        # the wake up to a stride (and a block) later.
        self._recent: deque[np.ndarray] = deque()
        self._recent_samples = 0
        # 1 s is well over a stride plus a block; a wake verifier also needs its window before the wake.
        self._history_samples = self.sample_rate + (model.head.window_samples if model.head is not None else 0)
        self.rejected_wakes = 0
        """First-stage wakes that the command head did not confirm."""
        self._stage: CommandStage | None = self._new_stage(0.0) if skip_wake else None

    def _new_stage(self, start_s: float) -> CommandStage:
        return CommandStage(
            self.model,
            self.capture_settings,
            # A command head reads the utterance as heard: the speech embedding was trained on noisy speech, and
            # RNNoise's artefacts cost it accuracy (a held-out FSDD speaker: 99.3 % top-1 as heard, 96.0 % denoised).
            denoise=self.denoise == DenoiseMode.UTTERANCE and self.model.head is None,
            start_s=start_s,
            after_wake=not self.skip_wake,
        )

    @property
    def capturing(self) -> bool:
        """True between a wake and the end of its utterance."""
        return self._stage is not None

    def push(self, block: np.ndarray) -> list[WakeEvent | NoSpeech | CommandEvent]:
        """Add audio (float32 mono at the model's rate); the events it completes, in order."""
        audio = self._stream_denoiser.push(block) if self._stream_denoiser is not None else block
        return self._process(audio)

    def _process(self, audio: np.ndarray) -> list[WakeEvent | NoSpeech | CommandEvent]:
        self._samples += len(audio)
        if self.skip_wake:
            return self._feed(audio) if self._stage is not None else []
        self._remember(audio)
        events: list[WakeEvent | NoSpeech | CommandEvent] = []
        capturing_before = self._stage is not None
        # The detector hears everything, capture or not, so a wake right after a command is not missed;
        # wakes during a capture are part of that utterance and are not reported.
        for wake in self.detector.push(audio):
            if self._stage is None and self._confirmed(wake):
                events.append(wake)
                self._stage = self._new_stage(wake.time_s)
                events += self._feed(self._since(round(wake.time_s * self.sample_rate)))
        if capturing_before and self._stage is not None:
            events += self._feed(audio)
        return events

    def _confirmed(self, wake: WakeEvent) -> bool:
        """Whether the head, when the package has a verifier, hears the wake phrase in the audio up to the wake."""
        head, threshold = self.model.head, self.model.package.detection.verify_threshold
        if head is None or threshold <= 0:
            return True
        verified = head.wake_score(self.model.package, self._until(round(wake.time_s * self.sample_rate)))
        if verified >= threshold:
            return True
        self.rejected_wakes += 1
        # Routine: the first stage is tuned to miss few wakes, so the verifier turns some down.
        detail = f"verifier {verified:.2f}, under {threshold:.2f}"
        log.debug("wake not confirmed", extra={"time_s": wake.time_s, "score": wake.score, "detail": detail})
        return False

    def _remember(self, audio: np.ndarray) -> None:
        self._recent.append(audio)
        self._recent_samples += len(audio)
        while self._recent_samples - len(self._recent[0]) >= self._history_samples:
            self._recent_samples -= len(self._recent.popleft())

    def _history_index(self, sample: int) -> tuple[np.ndarray, int]:
        """The remembered audio, and where stream sample ``sample`` falls in it (0 if it is older)."""
        history = np.concatenate(self._recent)
        return history, max(0, len(history) - (self._samples - sample))

    def _since(self, sample: int) -> np.ndarray:
        """The stream's audio from ``sample`` to now (from as far back as the history reaches)."""
        history, index = self._history_index(sample)
        return history[index:]

    def _until(self, sample: int) -> np.ndarray:
        """The remembered audio up to stream sample ``sample``."""
        history, index = self._history_index(sample)
        return history[:index]

    def _feed(self, audio: np.ndarray) -> list[NoSpeech | CommandEvent]:
        assert self._stage is not None
        outcome = self._stage.push(audio)
        if outcome is None:
            return []
        self._stage = None
        return [outcome]

    def finish(self) -> list[WakeEvent | NoSpeech | CommandEvent]:
        """The stream ended: decide on an utterance still being captured."""
        events: list[WakeEvent | NoSpeech | CommandEvent] = []
        if self._stream_denoiser is not None:
            events += self._process(self._stream_denoiser.flush())
        stage, self._stage = self._stage, None
        if stage is not None and (event := stage.finish(whole_if_silent=self.skip_wake)) is not None:
            events.append(event)
        return events
