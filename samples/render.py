"""Re-render the sample recordings: flite's held-out voice rms, the wake phrase, a pause, then the request.

    python samples/render.py        (needs the Debian package flite)

Deterministic: the same flite gives the same files. The pause between the wake phrase
and the request is how people speak to a wake word device; without it the two run
together and the wake model (trained on the phrase alone) scores lower.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
VOICE = "rms"
SAMPLE_RATE = 16000
LEAD_S, PAUSE_S, TAIL_S = 0.5, 0.4, 1.0

SAMPLES = {
    "hey_jarvis_turn_on_the_lights.flac": "turn on the lights",
    "hey_jarvis_weather_tomorrow.flac": "what will the weather be like tomorrow",
}


def speak(text: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        wav = Path(folder) / "speech.wav"
        subprocess.run(["flite", "-voice", VOICE, "-t", text, "-o", str(wav)], check=True)
        samples, rate = soundfile.read(wav, dtype="float32")
    if rate != SAMPLE_RATE:
        sys.exit(f"flite gave {rate} Hz, expected {SAMPLE_RATE}")
    return samples


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def main() -> None:
    wake = speak("hey jarvis")
    for name, request in SAMPLES.items():
        audio = np.concatenate((silence(LEAD_S), wake, silence(PAUSE_S), speak(request), silence(TAIL_S)))
        soundfile.write(HERE / name, audio, SAMPLE_RATE, subtype="PCM_16")
        print(f"{name}: {len(audio) / SAMPLE_RATE:.2f} s")


if __name__ == "__main__":
    main()
