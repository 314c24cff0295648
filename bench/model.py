"""What the shipped device model costs on this machine, against the peer wake word models in the same run.

- inference: one int8 window through LiteRT (one thread), median microseconds, against the
  target of 200 us;
- always-on path: CPU milliseconds per second of audio for streaming features in 100 ms
  chunks plus the model every stride, against microWakeWord and openWakeWord (hey_jarvis)
  scoring the same audio; reported as ratios;
- size: bytes of the always-on int8 network against the 100 KB budget, and of the whole file (the command
  head beside it runs only after a wake).

Prints one JSON object; every figure is a median over repeats (the machine is shared).
Run: .venv/bin/python bench/model.py [--repeats N] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import numpy as np

from common.recording import read_recording
from device.inference import TfliteClassifier
from firmware_tools.building.evaluate import always_on_cpu
from firmware_tools.building.peers import load_peers
from schemas.model import ModelPackage

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "device" / "models" / "default"
SAMPLES = sorted((ROOT / "samples").glob("*.flac"))


def test_audio(seconds: float) -> np.ndarray:
    """The committed recordings, in light noise, repeated to ``seconds``."""
    rng = np.random.default_rng(0)
    speech = np.concatenate([np.concatenate((read_recording(p), np.zeros(16000, np.float32))) for p in SAMPLES])
    audio = np.tile(speech, int(np.ceil(seconds * 16000 / len(speech))))[: round(seconds * 16000)]
    return (audio + rng.standard_normal(len(audio)).astype(np.float32) * 0.003).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    package = ModelPackage.load(MODEL_DIR)
    model = TfliteClassifier(package.model_path(MODEL_DIR))
    audio = test_audio(args.seconds)
    # The same measurement evaluate reports: the always-on path in 100 ms chunks, and single-window inference.
    runs = [always_on_cpu(model, package, audio) for _ in range(args.repeats)]
    ours = statistics.median(run["cpu_ms_per_audio_s"] for run in runs)
    inference = [run["inference_us_per_window_median"] for run in runs]
    peers = {}
    for name, peer in load_peers().items():
        per_second = [1000 * peer.score(audio).cpu_s / args.seconds for _ in range(args.repeats)]
        peers[name] = {
            "cpu_ms_per_audio_s": round(statistics.median(per_second), 3),
            "mqvox_to_peer_cpu_ratio": round(ours / statistics.median(per_second), 3),
        }
    int8_bytes = sum(p.stat().st_size for p in MODEL_DIR.glob("*.tflite"))
    training = json.loads((MODEL_DIR / "training.json").read_text())
    # The budget is the always-on network's; the command head in the same file runs only after a wake.
    always_on_bytes = training.get("always_on_size_bytes", int8_bytes)
    print(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version()},
                "repeats": args.repeats,
                "audio_s": args.seconds,
                "inference_us_per_window_median": round(statistics.median(inference), 1),
                "inference_target_us": 200,
                "inference_to_target_ratio": round(statistics.median(inference) / 200, 3),
                "always_on_cpu_ms_per_audio_s": round(ours, 3),
                "peers": peers,
                "int8_models_bytes": int8_bytes,
                "always_on_bytes": always_on_bytes,
                "head_bytes": (training.get("head") or {}).get("size_bytes"),
                "size_to_budget_ratio": round(always_on_bytes / 100_000, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
