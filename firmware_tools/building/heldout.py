"""The held-out evaluation sets: voices and text the model never trained on, and noise it never heard.

Positives are the vocabulary said by the held-out voices (flite slt and rms, festival
cmu_us_slt_arctic_hts), with and without the wake phrase. Negatives are long read
speech from a different text (the licence texts Debian ships in
/usr/share/common-licenses), commands and confusables said without the wake
phrase, and stretches of noise. Rendered once and cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from firmware_tools.building.corruptions import NOISE_KINDS, make_noise, mix_at_snr
from firmware_tools.building.phrases import CONFUSABLES, WAKE_LABEL, positive_phrases
from firmware_tools.building.synth import trim
from firmware_tools.building.voices import SAMPLE_RATE, VoiceSpec, render, render_festival
from schemas.vocabulary import Vocabulary, normalize

log = logging.getLogger("mqvox.heldout")

HELD_OUT_SPECS = (
    VoiceSpec("flite", "slt", speed=0.9),
    VoiceSpec("flite", "slt", speed=1.1, pitch=1.1),
    VoiceSpec("flite", "slt", speed=1.0, pitch=0.9),
    VoiceSpec("flite", "rms", speed=0.9, pitch=1.1),
    VoiceSpec("flite", "rms", speed=1.1),
    VoiceSpec("flite", "rms", speed=1.0, pitch=0.9),
    VoiceSpec("festival", "cmu_us_slt_arctic_hts", speed=0.9),
    VoiceSpec("festival", "cmu_us_slt_arctic_hts", speed=1.1),
)
"""Every held-out voice, at a few speeds and pitches."""

TEXT_SOURCES = (Path("/usr/share/common-licenses"),)
"""Read speech for the negatives: plain English prose no training phrase was drawn from."""


@dataclass(frozen=True)
class HeldOutSettings:
    """Size of the held-out sets."""

    voices: tuple[VoiceSpec, ...] = HELD_OUT_SPECS
    """Held-out voices used."""
    negative_minutes: float = 40.0
    """Length of the negative stream (minutes), speech and noise."""
    noise_share: float = 0.2
    """Share of the negative stream that is noise without speech."""
    negative_snr_db: tuple[float, float] = (5.0, 20.0)
    """SNR range of the speech in the negative stream."""
    max_phrases: int = 0
    """Use only this many command phrases (0: all); for quick runs."""
    seed: int = 31337
    """Seed of noise and ordering, distinct from every training seed."""

    def key(self) -> str:
        """Cache key of these settings."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class HeldOutSet:
    """Clean held-out clips and the noisy negative stream."""

    commands: list[tuple[str, np.ndarray]] = field(default_factory=list)
    """(label, clip) of each command said alone."""
    wake: list[np.ndarray] = field(default_factory=list)
    """Clips that start with the wake phrase (alone or followed by a command)."""
    out_of_vocabulary: list[np.ndarray] = field(default_factory=list)
    """Short utterances that are no command: confusables and short sentences."""
    negative_stream: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    """Long audio without the wake phrase, noise included."""
    babble: list[np.ndarray] = field(default_factory=list)
    """Held-out speech used to make babble noise."""


def read_prose(limit_words: int) -> list[str]:
    """Sentences of 4 to 30 words from the licence texts, normalised, in a fixed order."""
    sentences: list[str] = []
    for directory in TEXT_SOURCES:
        for path in sorted(directory.glob("*")):
            if path.is_file():
                text = path.read_text(errors="ignore")
                for piece in re.split(r"(?<=[.;:!?])\s+", re.sub(r"\s+", " ", text)):
                    words = normalize(piece).split()
                    if 4 <= len(words) <= 30 and all(w.isalpha() for w in words):
                        sentences.append(" ".join(words))
    unique = list(dict.fromkeys(sentences))
    if not unique:
        raise FileNotFoundError(f"no prose found in {[str(p) for p in TEXT_SOURCES]}")
    chosen, words = [], 0
    for sentence in unique:
        if words >= limit_words:
            break
        chosen.append(sentence)
        words += len(sentence.split())
    return chosen


def _render_all(voices: Sequence[VoiceSpec], texts: Sequence[str]) -> list[np.ndarray]:
    """Each text said by the voice at the same position in the (cycled) voice list."""
    assigned = [voices[i % len(voices)] for i in range(len(texts))]
    out: list[np.ndarray | None] = [None] * len(texts)
    festival = {}
    for i, voice in enumerate(assigned):
        if voice.engine == "festival":
            festival.setdefault(voice, []).append(i)
    for voice, indices in festival.items():
        batch = render_festival(voice, [texts[i] for i in indices], for_evaluation=True)
        for i, audio in zip(indices, batch, strict=True):
            out[i] = audio
    for i in tqdm([i for i, v in enumerate(assigned) if v.engine != "festival"], desc="held-out voices", leave=False):
        out[i] = render(assigned[i], texts[i], for_evaluation=True)
    return [trim(audio) for audio in out]


def build_heldout(settings: HeldOutSettings, vocabulary: Vocabulary) -> HeldOutSet:
    """Render the held-out sets."""
    rng = np.random.default_rng(settings.seed)
    phrases = [p for p in positive_phrases(vocabulary) if p.label != WAKE_LABEL]
    if settings.max_phrases:
        phrases = phrases[: settings.max_phrases]
    heldout = HeldOutSet()
    voices = settings.voices
    # Every command phrase by every held-out voice.
    pairs = [(phrase, voice) for phrase in phrases for voice in voices]
    clips = _render_by_voice([(phrase.text, voice) for phrase, voice in pairs])
    heldout.commands = [(phrase.label, clip) for (phrase, _), clip in zip(pairs, clips, strict=True)]
    wake_texts = [vocabulary.wake_phrase] + [f"{vocabulary.wake_phrase} {p.text}" for p in phrases]
    heldout.wake = _render_by_voice([(t, v) for t in wake_texts for v in voices])
    short_prose = [s for s in read_prose(2000) if len(s.split()) <= 5][:40]
    oov_texts = [t for t in (*CONFUSABLES, *short_prose) if vocabulary.match(t) is None]
    heldout.out_of_vocabulary = _render_all(voices, oov_texts)
    words_per_minute = 150
    speech_minutes = settings.negative_minutes * (1 - settings.noise_share)
    prose = read_prose(int(speech_minutes * words_per_minute))
    extra = [p.text for p in phrases] + list(CONFUSABLES)
    said = _render_all(voices, prose + extra)
    heldout.babble = said[: min(40, len(said))]
    heldout.negative_stream = _negative_stream(settings, said, heldout.babble, rng)
    log.info(
        "held out: %d command clips, %d wake clips, %d out-of-vocabulary, %.1f min negatives",
        len(heldout.commands), len(heldout.wake), len(heldout.out_of_vocabulary),
        len(heldout.negative_stream) / SAMPLE_RATE / 60,
    )  # fmt: skip
    return heldout


def _render_by_voice(pairs: Sequence[tuple[str, VoiceSpec]]) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(pairs)
    by_voice: dict[VoiceSpec, list[int]] = {}
    for i, (_, voice) in enumerate(pairs):
        by_voice.setdefault(voice, []).append(i)
    for voice, indices in by_voice.items():
        clips = _render_all([voice], [pairs[i][0] for i in indices])
        for i, clip in zip(indices, clips, strict=True):
            out[i] = clip
    return out


def _negative_stream(
    settings: HeldOutSettings, said: list[np.ndarray], babble: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """Speech with pauses, each utterance in noise at a random SNR, then stretches of noise alone."""
    pieces = []
    for clip in said:
        pause = np.zeros(round(rng.uniform(0.2, 1.5) * SAMPLE_RATE), np.float32)
        segment = np.concatenate((pause, clip))
        kind = NOISE_KINDS[rng.integers(len(NOISE_KINDS))]
        noise = make_noise(kind, len(segment), rng, babble_sources=babble)
        pieces.append(mix_at_snr(segment, noise, rng.uniform(*settings.negative_snr_db)))
    speech = np.concatenate(pieces)
    noise_seconds = settings.negative_minutes * 60 * settings.noise_share
    target_speech = settings.negative_minutes * 60 - noise_seconds
    if len(speech) < target_speech * SAMPLE_RATE:
        # Not enough prose: repeat it, which still holds no wake phrase.
        repeats = int(np.ceil(target_speech * SAMPLE_RATE / len(speech)))
        speech = np.tile(speech, repeats)
    speech = speech[: round(target_speech * SAMPLE_RATE)]
    noise_parts = []
    for kind in NOISE_KINDS:
        part = make_noise(kind, round(noise_seconds / len(NOISE_KINDS) * SAMPLE_RATE), rng, babble_sources=babble)
        noise_parts.append(part * 10 ** (rng.uniform(-35, -15) / 20))
    stream = np.concatenate((speech, *noise_parts)).astype(np.float32)
    return np.clip(stream, -1.0, 1.0)


def in_noise(audio: np.ndarray, snr_db: float, rng: np.random.Generator, babble: Sequence[np.ndarray]) -> np.ndarray:
    """``audio`` in one of the noise kinds, drawn at random, at ``snr_db``."""
    kind = NOISE_KINDS[rng.integers(len(NOISE_KINDS))]
    noise = make_noise(kind, len(audio), rng, babble_sources=babble)
    return mix_at_snr(audio, noise, snr_db).astype(np.float32)


def load_or_build(settings: HeldOutSettings, vocabulary: Vocabulary, cache_root: Path) -> HeldOutSet:
    """The held-out sets for ``settings``, from the cache when they were rendered before."""
    path = cache_root / f"heldout-{settings.key()}.npz"
    if path.exists():
        data = np.load(path, allow_pickle=False)
        labels = json.loads(str(data["command_labels"]))
        return HeldOutSet(
            commands=list(zip(labels, _split(data, "commands"), strict=True)),
            wake=_split(data, "wake"),
            out_of_vocabulary=_split(data, "oov"),
            negative_stream=data["negative_stream"],
            babble=_split(data, "babble"),
        )
    heldout = build_heldout(settings, vocabulary)
    cache_root.mkdir(parents=True, exist_ok=True)
    labels = [label for label, _ in heldout.commands]
    arrays = {"negative_stream": heldout.negative_stream, "command_labels": json.dumps(labels)}
    for name, clips in (
        ("commands", [c for _, c in heldout.commands]),
        ("wake", heldout.wake),
        ("oov", heldout.out_of_vocabulary),
        ("babble", heldout.babble),
    ):
        arrays[f"{name}_audio"] = np.concatenate(clips)
        arrays[f"{name}_lengths"] = np.array([len(c) for c in clips])
    np.savez(path, **arrays)
    return heldout


def _split(data, name: str) -> list[np.ndarray]:
    lengths = data[f"{name}_lengths"]
    return np.split(data[f"{name}_audio"], np.cumsum(lengths)[:-1])
