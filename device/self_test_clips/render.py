"""Re-render the self-test clips: flite's held-out voices, and seeded noise.

    python device/self_test_clips/render.py        (needs the Debian package flite)

Deterministic: the same flite and numpy give the same files. The commands are said as
samples/render.py says them: the wake phrase, a 0.4 s pause, then the command. What
each clip must give is in suite.toml, which this script does not write.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
SAMPLE_RATE = 16000
LEAD_S, PAUSE_S, TAIL_S = 0.5, 0.4, 0.8
NOISE_S, NOISE_SEED, NOISE_PEAK = 3.0, 6, 0.25

COMMANDS = {
    "hey_jarvis_turn_on_the_lights.flac": ("rms", "turn on the lights"),
    "hey_jarvis_start.flac": ("rms", "start"),
    "hey_jarvis_three.flac": ("rms", "three"),
}
"""Clips that say the wake phrase, then a command: file -> (voice, command)."""
SPEECH = {"negative_speech.flac": ("slt", "the quick brown fox jumps over the lazy dog")}
"""Clips of speech without the wake phrase: file -> (voice, text)."""
NOISE = "negative_noise.flac"
"""Brown noise, the rumble of a machine room, at a fixed seed."""


def speak(voice: str, text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(wav)], check=True)
        samples, rate = soundfile.read(wav, dtype="float32")
    if rate != SAMPLE_RATE:
        sys.exit(f"flite gave {rate} Hz, expected {SAMPLE_RATE}")
    return samples


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def brown_noise(seconds: float) -> np.ndarray:
    walk = np.cumsum(np.random.default_rng(NOISE_SEED).standard_normal(int(seconds * SAMPLE_RATE)))
    walk -= np.linspace(walk[0], walk[-1], walk.size)  # no drift: starts and ends at zero
    return (NOISE_PEAK * walk / np.abs(walk).max()).astype(np.float32)


def write(name: str, audio: np.ndarray) -> None:
    soundfile.write(HERE / name, audio, SAMPLE_RATE, subtype="PCM_16")
    print(f"{name}: {len(audio) / SAMPLE_RATE:.2f} s")


def main() -> None:
    for name, (voice, command) in COMMANDS.items():
        spoken = (speak(voice, "hey jarvis"), silence(PAUSE_S), speak(voice, command))
        write(name, np.concatenate((silence(LEAD_S), *spoken, silence(TAIL_S))))
    for name, (voice, text) in SPEECH.items():
        write(name, np.concatenate((silence(LEAD_S), speak(voice, text), silence(TAIL_S))))
    write(NOISE, brown_noise(NOISE_S))


if __name__ == "__main__":
    main()
