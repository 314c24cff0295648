"""Capturing one utterance after the wake word, with webrtcvad endpointing.

Speech starts after ``speech_onset_ms`` of consecutive voiced audio and ends after
``trailing_silence_ms`` of consecutive unvoiced audio, or at ``max_utterance_s``.
The utterance keeps ``pre_roll_ms`` from before the onset, because webrtcvad calls a
word's soft first consonant unvoiced.

The wake detector fires while the last syllable of the wake phrase may still be
sounding, so a capture that starts at a wake first waits for the phrase's tail to end
(the first pause of ``wake_gap_ms``); neither the onset nor the pre-roll reach back
before that point, which keeps "...vis" out of the command.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import webrtcvad

from common.recording import PCM_SCALE
from device.settings import CaptureSettings

TRAILING_AUDIO_MS = 200
"""Unvoiced audio kept after the last voiced frame: the tail of a word webrtcvad already calls silence."""


class EndReason(StrEnum):
    """Why the capture ended."""

    TRAILING_SILENCE = "trailing_silence"
    """The speaker stopped."""
    MAX_LENGTH = "max_length"
    """The utterance reached the longest allowed."""
    STREAM_END = "stream_end"
    """The audio ended (a file, or stdin closed)."""


@dataclass(frozen=True)
class CapturedUtterance:
    """The audio of one utterance, and where the speech is in it."""

    audio: np.ndarray
    """Mono float32 samples, from the pre-roll to a little after the last voiced frame."""
    start_s: float
    """Stream time (seconds) of ``audio[0]``."""
    offset: int
    """Index of ``audio[0]`` among the samples the capture received."""
    speech_start: int
    """Index in ``audio`` of the first voiced frame."""
    speech_end: int
    """Index in ``audio`` just past the last voiced frame."""
    end_reason: EndReason
    """Why the capture ended."""
    endpointed_at: float
    """``time.perf_counter()`` when the endpointer declared the end: latency is measured from here."""
    sample_rate: int = 16000
    """Rate of ``audio`` (hertz)."""

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def end_s(self) -> float:
        """Stream time (seconds) of the end of the speech."""
        return self.start_s + self.speech_end / self.sample_rate


class NoSpeech:
    """The capture gave up: no speech started within ``speech_timeout_s``."""


NO_SPEECH = NoSpeech()


class UtteranceCapture:
    """Feeds audio through webrtcvad frame by frame until one utterance is complete.

    ``push`` returns None while the utterance goes on, then a CapturedUtterance
    (or NO_SPEECH); audio pushed after that belongs to nobody and is ignored.
    """

    def __init__(
        self,
        settings: CaptureSettings,
        *,
        start_s: float,
        after_wake: bool = True,
        sample_rate: int = 16000,
    ) -> None:
        """``after_wake``: skip the wake phrase's tail and give up after ``speech_timeout_s`` without speech;
        otherwise (a file classified as one utterance) take speech from the first sample and wait forever."""
        self.settings = settings
        self.start_s = start_s
        self.sample_rate = sample_rate
        self._wait_for_speech = after_wake
        self._in_wake_tail = after_wake
        self._wake_gap_frames = -(-settings.wake_gap_ms // settings.vad_frame_ms)
        self._max_wake_tail = sample_rate * settings.max_wake_tail_ms // 1000
        self._floor = 0  # the utterance never starts before this sample (the end of the wake phrase)
        self._vad = webrtcvad.Vad(settings.vad_aggressiveness)
        self._frame = sample_rate * settings.vad_frame_ms // 1000
        self._onset_frames = -(-settings.speech_onset_ms // settings.vad_frame_ms)
        self._trailing_frames = -(-settings.trailing_silence_ms // settings.vad_frame_ms)
        self._pre_roll = sample_rate * settings.pre_roll_ms // 1000
        self._max_samples = int(settings.max_utterance_s * sample_rate)
        self._timeout_samples = int(settings.speech_timeout_s * sample_rate)
        self._buffer = np.zeros(self._timeout_samples + self._max_samples, np.float32)
        self._total = 0  # samples received
        self._analysed = 0  # samples the VAD has seen, whole frames only
        self._voiced_run = 0
        self._unvoiced_run = 0
        self._onset: int | None = None  # sample index of the first voiced frame of the speech
        self._last_voiced_end = 0
        self.done = False

    def push(self, audio: np.ndarray) -> CapturedUtterance | NoSpeech | None:
        """Add audio; the finished utterance (or NO_SPEECH) once the endpointer decides."""
        if self.done or len(audio) == 0:
            return None
        if self._total + len(audio) > len(self._buffer):
            # Only without a speech timeout (a whole file as one utterance) can it outgrow the first size.
            self._buffer = np.concatenate((self._buffer, np.zeros(max(len(self._buffer), len(audio)), np.float32)))
        self._buffer[self._total : self._total + len(audio)] = audio
        self._total += len(audio)
        samples = self._buffer
        while self._analysed + self._frame <= self._total:
            frame = samples[self._analysed : self._analysed + self._frame]
            voiced = self._vad.is_speech(_pcm16(frame), self.sample_rate)
            self._analysed += self._frame
            outcome = self._step(voiced, samples)
            if outcome is not None:
                self.done = True
                return outcome
        return None

    def finish(self, *, whole_if_silent: bool = False) -> CapturedUtterance | None:
        """The stream ended: the utterance so far, or None if no speech had started.

        With ``whole_if_silent``, a capture that never heard speech returns all its
        audio as the utterance instead (a file to classify whatever it holds).
        """
        if self.done:
            return None
        self.done = True
        if self._onset is None:
            if not whole_if_silent or self._total == 0:
                return None
            self._onset, self._last_voiced_end = 0, self._total
        return self._utterance(self._buffer, EndReason.STREAM_END, end=self._total)

    def _step(self, voiced: bool, samples: np.ndarray) -> CapturedUtterance | NoSpeech | None:
        if voiced:
            self._voiced_run += 1
            self._unvoiced_run = 0
            self._last_voiced_end = self._analysed
        else:
            self._voiced_run = 0
            self._unvoiced_run += 1
        if self._in_wake_tail:
            if self._unvoiced_run >= self._wake_gap_frames or self._analysed >= self._max_wake_tail:
                self._in_wake_tail = False
                self._floor = self._analysed - self._unvoiced_run * self._frame
                self._voiced_run = 0
            return None
        if self._onset is None:
            if self._voiced_run >= self._onset_frames:
                self._onset = max(self._floor, self._analysed - self._voiced_run * self._frame)
            elif self._wait_for_speech and self._analysed >= self._timeout_samples:
                return NO_SPEECH
            return None
        if self._unvoiced_run >= self._trailing_frames:
            return self._utterance(samples, EndReason.TRAILING_SILENCE, end=self._analysed)
        if self._analysed - max(self._floor, self._onset - self._pre_roll) >= self._max_samples:
            return self._utterance(samples, EndReason.MAX_LENGTH, end=self._analysed)
        return None

    def _utterance(self, samples: np.ndarray, reason: EndReason, *, end: int) -> CapturedUtterance:
        endpointed_at = time.perf_counter()
        assert self._onset is not None
        first = max(self._floor, self._onset - self._pre_roll)
        speech_end = max(self._last_voiced_end, self._onset + self._frame)
        last = min(end, speech_end + self.sample_rate * TRAILING_AUDIO_MS // 1000)
        return CapturedUtterance(
            audio=samples[first:last].copy(),
            start_s=self.start_s + first / self.sample_rate,
            offset=first,
            speech_start=self._onset - first,
            speech_end=min(speech_end, last) - first,
            end_reason=reason,
            endpointed_at=endpointed_at,
            sample_rate=self.sample_rate,
        )


def _pcm16(frame: np.ndarray) -> bytes:
    return np.clip(np.round(frame * PCM_SCALE), -32768, 32767).astype("<i2").tobytes()
