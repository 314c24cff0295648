"""The synth stage, the first: every phrase, positive and negative, rendered by every training engine and voice.

Writes a :mod:`clip bank <firmware_tools.building.clips>` to ``<work>/synth``. The held-out voices
are never used here (:func:`firmware_tools.building.voices.render` refuses them).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from firmware_tools.building.clips import ClipRecord, write_bank
from firmware_tools.building.phrases import WAKE_LABEL, Phrase, negative_phrases, positive_phrases
from firmware_tools.building.recipe import Recipe
from firmware_tools.building.speakers import transform_speaker
from firmware_tools.building.voices import (
    ESPEAK_ACCENTS,
    FESTIVAL_TRAINING_VOICES,
    FLITE_TRAINING_VOICES,
    SAMPLE_RATE,
    VoiceSpec,
    espeak_variants,
    render,
    render_festival,
)
from schemas.vocabulary import Vocabulary

log = logging.getLogger("mqvox.synth")

TRIM_THRESHOLD_DB = -40.0
"""Leading and trailing audio quieter than this, relative to the clip's peak, is cut."""
TRIM_MARGIN_S = 0.03
"""Audio kept either side of the speech when trimming (seconds)."""


@dataclass(frozen=True)
class RenderJob:
    """One clip to render."""

    phrase: Phrase
    """What to say."""
    voice: VoiceSpec
    """Who says it."""
    split: str
    """'train' or 'validation'."""


def plan_renders(recipe: Recipe, vocabulary: Vocabulary) -> list[RenderJob]:
    """Every render of the recipe, in a fixed order, with random prosody drawn from the recipe's seed."""
    settings = recipe.synth
    rng = np.random.default_rng(recipe.seed)
    variants = settings.espeak_variants or espeak_variants()
    jobs: list[RenderJob] = []

    def uniform(bounds: tuple[float, float]) -> float:
        return round(float(rng.uniform(*bounds)), 3)

    phrases = [(phrase, True) for phrase in positive_phrases(vocabulary)]
    negatives = negative_phrases()
    if settings.negative_limit:
        chosen = rng.choice(len(negatives), size=min(settings.negative_limit, len(negatives)), replace=False)
        negatives = tuple(negatives[i] for i in sorted(chosen))
    phrases += [(phrase, False) for phrase in negatives]
    for phrase, positive in phrases:
        multiplier = settings.wake_multiplier if phrase.label == WAKE_LABEL else 1

        def count(renders: int, positive: bool = positive, multiplier: int = multiplier) -> int:
            return renders * multiplier if positive else max(1, round(renders * settings.negative_share))

        voices: list[VoiceSpec] = []
        if "espeak" in settings.engines:
            for _ in range(count(settings.espeak_renders)):
                accent = ESPEAK_ACCENTS[rng.integers(len(ESPEAK_ACCENTS))]
                variant = variants[rng.integers(len(variants))]
                speed, pitch = uniform(settings.speed_range), uniform(settings.pitch_range)
                voice = VoiceSpec("espeak", f"{accent}+{variant}", speed=speed, pitch=pitch)
                voices.append(voice)
        if "piper" in settings.engines:
            for _ in range(count(settings.piper_renders)):
                voice = VoiceSpec(
                    "piper",
                    "joe",
                    speed=uniform(settings.speed_range),
                    noise_scale=uniform((0.4, 1.0)),
                    noise_w_scale=uniform((0.5, 1.1)),
                )
                voices.append(voice)
        if "flite" in settings.engines:
            for name in FLITE_TRAINING_VOICES:
                for _ in range(count(settings.flite_renders)):
                    voice = VoiceSpec(
                        "flite", name, speed=uniform(settings.speed_range), pitch=uniform(settings.pitch_range)
                    )
                    voices.append(voice)
        if "festival" in settings.engines:
            for name in FESTIVAL_TRAINING_VOICES:
                for _ in range(count(settings.festival_renders)):
                    # festival batches by voice and speed, so speeds come from a small set.
                    speed = round(float(rng.choice(np.linspace(*settings.speed_range, 5))), 3)
                    voices.append(VoiceSpec("festival", name, speed=speed))
        # Every phrase keeps renders on both sides (when it has two), so validation covers every class.
        held = max(1, round(len(voices) * settings.validation_share)) if len(voices) > 1 else 0
        validation = set(rng.permutation(len(voices))[:held].tolist())
        jobs += [RenderJob(phrase, v, "validation" if i in validation else "train") for i, v in enumerate(voices)]
    return jobs


def trim(audio: np.ndarray) -> np.ndarray:
    """``audio`` without the leading and trailing near-silence engines add."""
    frame = SAMPLE_RATE // 100
    usable = len(audio) // frame * frame
    if usable == 0:
        return audio
    energy = np.sqrt(np.mean(audio[:usable].reshape(-1, frame) ** 2, axis=1) + 1e-12)
    loud = np.flatnonzero(20 * np.log10(energy / energy.max()) > TRIM_THRESHOLD_DB)
    margin = round(TRIM_MARGIN_S * SAMPLE_RATE)
    start = max(0, loud[0] * frame - margin)
    end = min(len(audio), (loud[-1] + 1) * frame + margin)
    return audio[start:end]


def _render_one(job: RenderJob) -> np.ndarray:
    return trim(render(job.voice, job.phrase.text))


def _transform(arguments: tuple[np.ndarray, float, float]) -> np.ndarray:
    audio, f0_factor, formant_factor = arguments
    return trim(transform_speaker(audio, SAMPLE_RATE, f0_factor, formant_factor))


def run_synth(recipe: Recipe, vocabulary: Vocabulary, work_dir: Path) -> Path:
    """Render, multiply speakers, and write the bank; returns its directory."""
    settings = recipe.synth
    jobs = plan_renders(recipe, vocabulary)
    rendered: dict[int, np.ndarray] = {}
    subprocess_jobs = [i for i, job in enumerate(jobs) if job.voice.engine in ("espeak", "flite")]
    with ThreadPoolExecutor(max_workers=max(1, settings.workers) * 2) as pool:
        results = pool.map(lambda i: _render_one(jobs[i]), subprocess_jobs)
        progress = tqdm(results, total=len(subprocess_jobs), desc="espeak+flite")
        for i, audio in zip(subprocess_jobs, progress, strict=True):
            rendered[i] = audio
    festival_groups: dict[tuple[str, float], list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        if job.voice.engine == "festival":
            festival_groups[(job.voice.voice, job.voice.speed)].append(i)
    with tqdm(total=sum(len(g) for g in festival_groups.values()), desc="festival") as bar:
        for indices in festival_groups.values():
            texts = [jobs[i].phrase.text for i in indices]
            for i, audio in zip(indices, render_festival(jobs[indices[0]].voice, texts), strict=True):
                rendered[i] = trim(audio)
                bar.update()
    for i in tqdm([i for i, job in enumerate(jobs) if job.voice.engine == "piper"], desc="piper"):
        rendered[i] = _render_one(jobs[i])

    rng = np.random.default_rng(recipe.seed + 1)
    derived: list[tuple[int, float, float]] = []
    for i, job in enumerate(jobs):
        for _ in range(settings.world_variants.get(job.voice.engine, 0)):
            f0_factor = round(float(np.exp(rng.uniform(*np.log(settings.world_f0_range)))), 3)
            formant_factor = round(float(np.exp(rng.uniform(*np.log(settings.world_formant_range)))), 3)
            derived.append((i, f0_factor, formant_factor))
    with ProcessPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        transformed = list(
            tqdm(
                pool.map(_transform, ((rendered[i], f0, formant) for i, f0, formant in derived), chunksize=16),
                total=len(derived),
                desc="WORLD speakers",
            )
        )

    def clips() -> Iterator[tuple[ClipRecord, np.ndarray]]:
        for i, job in enumerate(jobs):
            yield _record(job, 1.0, 1.0), rendered[i]
        for (i, f0_factor, formant_factor), audio in zip(derived, transformed, strict=True):
            yield _record(jobs[i], f0_factor, formant_factor), audio

    out = work_dir / "synth"
    count = write_bank(out, clips())
    log.info("wrote %d clips (%d rendered, %d WORLD speakers) to %s", count, len(jobs), len(derived), out)
    return out


def _record(job: RenderJob, f0_factor: float, formant_factor: float) -> ClipRecord:
    voice = job.voice
    return ClipRecord(
        text=job.phrase.text,
        label=job.phrase.label,
        engine=voice.engine,
        voice=voice.voice,
        speed=voice.speed,
        pitch=voice.pitch,
        f0_factor=f0_factor,
        formant_factor=formant_factor,
        split=job.split,
    )


def describe_voices(jobs: list[RenderJob]) -> dict[str, int]:
    """Renders per engine:voice family, for the model card."""
    counts: dict[str, int] = defaultdict(int)
    for job in jobs:
        name = job.voice.voice.split("+")[0] if job.voice.engine == "espeak" else job.voice.voice
        counts[f"{job.voice.engine}:{name}"] += 1
    return dict(sorted(counts.items()))
