"""Real read speech with reference transcripts, for the cloud worker's word error rate (bench/cloud.py).

Both sources are recordings of people reading, none synthetic, taken from Debian packages at pinned
versions: ``apt-get download NAME=VERSION`` into .cache/bench/read_speech/, unpacked there with ``dpkg -x``.

- asterisk: the English prompts of the Asterisk PBX read by voice actor Allison Smith
  (asterisk-core-sounds-en-wav, 8 kHz mono WAV, resampled to 16 kHz with soxr), their texts from
  core-sounds-en.txt in asterisk-core-sounds-en. Kept: texts without digits, ``*#@/[]()<>``, "...",
  web addresses or the word "asterisk" (they are read out in words the text does not hold), 2 to 15 s long.
- librivox: five sentences of Sense and Sensibility read for LibriVox (16 kHz), with their
  transcripts, from pocketsphinx-testdata.

Licences: the Asterisk core sounds are CC-BY-SA 3.0 (Digium); LibriVox recordings are in the public domain.
Run alone, it fetches the corpus and prints its manifest as one JSON object.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import soxr

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench" / "read_speech"
SAMPLE_RATE = 16000
"""The rate (hertz) every clip is given at: Whisper's."""

PACKAGES = {
    "asterisk-core-sounds-en-wav": "1.6.1-1",
    "asterisk-core-sounds-en": "1.6.1-1",
    "pocketsphinx-testdata": "0.8+5prealpha+1-15",
}
"""Debian (bookworm) package -> version."""
PINNED_SHA256 = {
    "asterisk-core-sounds-en-wav": "2be3ea287d83299d143815fa804f11179a75b7affd4a758b98b55f5afc18a35d",
    "asterisk-core-sounds-en": "973e797d28e37fa6ca3c0a9d6fa717e77cf1268ae916bf09fd3503113cdffa50",
    "pocketsphinx-testdata": "eaeb7a01d54f20b799d1a81ef110ec544b2cb47ea006614078220737a33019f0",
}
"""The .debs this bench was first run with; a mismatch is reported, not refused."""

ASTERISK_SOUNDS = Path("usr/share/asterisk/sounds/en_US_f_Allison")
ASTERISK_TEXTS = Path("usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
LIBRIVOX = Path("usr/share/pocketsphinx/test/data/librivox")
UNREADABLE = re.compile(r"\d|[*#@/\[\]()<>]|\.\.\.|www|\.org|\.com|asterisk", re.IGNORECASE)
"""Texts whose recording says something else than their letters (numbers, symbols, addresses)."""
MIN_S, MAX_S = 2.0, 15.0
"""Clip lengths kept (seconds)."""
STAMP = ".extracted"


@dataclass(frozen=True)
class Clip:
    """One recorded sentence and what was read."""

    source: str
    """'asterisk' or 'librivox'."""
    name: str
    """The recording's name in its package."""
    text: str
    """The reference transcript, as the package gives it."""
    samples: np.ndarray
    """Mono float32 at 16 kHz."""

    @property
    def duration_s(self) -> float:
        return self.samples.size / SAMPLE_RATE


def _deb(folder: Path, package: str) -> Path | None:
    found = sorted(folder.glob(f"{package}_*.deb"))
    return found[0] if found else None


def _download(folder: Path, log) -> None:
    wanted = [f"{name}={version}" for name, version in PACKAGES.items() if _deb(folder, name) is None]
    if not wanted:
        return
    command = ["apt-get", "download", "-q", *wanted]
    log(f"read speech: {' '.join(command)}")
    if subprocess.run(command, cwd=folder, capture_output=True, text=True).returncode != 0:
        log("read speech: download failed, updating the package lists once (apt-get update -q)")
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def fetch(folder: Path = CACHE, log=lambda message: None) -> dict[str, dict[str, str]]:
    """Download and unpack the packages unless done before; each package's version, .deb and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / STAMP
    expected = json.dumps(PACKAGES, sort_keys=True)
    if not (stamp.is_file() and stamp.read_text() == expected):
        _download(folder, log)
        for package in PACKAGES:
            subprocess.run(["dpkg", "-x", str(_deb(folder, package)), str(folder / "root")], check=True)
        stamp.write_text(expected)
    debs = {}
    for package, version in PACKAGES.items():
        path = _deb(folder, package)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
        debs[package] = {
            "version": version,
            "deb": path.name if path is not None else None,
            "sha256": digest,
            "as_pinned": digest == PINNED_SHA256[package],
        }
    return debs


def _asterisk(root: Path) -> list[Clip]:
    texts: dict[str, str] = {}
    with gzip.open(root / ASTERISK_TEXTS, "rt", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            line = line.strip()
            if not line or line.startswith(";") or ":" not in line:
                continue
            name, text = line.split(":", 1)
            texts[name.strip()] = text.strip()
    sounds = root / ASTERISK_SOUNDS
    clips = []
    for path in sorted(sounds.rglob("*.wav")):
        name = path.relative_to(sounds).with_suffix("").as_posix()
        text = texts.get(name)
        if not text or UNREADABLE.search(text):
            continue
        if not MIN_S <= soundfile.info(path).duration <= MAX_S:
            continue
        clips.append(Clip("asterisk", name, text, _read(path)))
    return clips


def _librivox(root: Path) -> list[Clip]:
    clips = []
    for line in (root / LIBRIVOX / "transcription").read_text().splitlines():
        found = re.fullmatch(r"\s*<s>(.*)</s>\s*\((\S+)\)\s*", line)
        if found is None:
            continue
        text, name = found.group(1).strip(), found.group(2)
        path = root / LIBRIVOX / f"{name}.wav"
        if path.is_file() and MIN_S <= soundfile.info(path).duration <= MAX_S:
            clips.append(Clip("librivox", name, text, _read(path)))
    return sorted(clips, key=lambda clip: clip.name)


def _read(path: Path) -> np.ndarray:
    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE)
    return np.ascontiguousarray(mono, dtype=np.float32)


def load_corpus(folder: Path = CACHE, log=lambda message: None) -> tuple[list[Clip], dict[str, dict[str, str]]]:
    """Every clip, Asterisk then LibriVox, each sorted by name; and the packages they came from."""
    debs = fetch(folder, log)
    root = folder / "root"
    return _asterisk(root) + _librivox(root), debs


def main() -> None:
    clips, debs = load_corpus(log=lambda message: print(message, file=sys.stderr, flush=True))
    sources = sorted({clip.source for clip in clips})
    manifest = {
        "bench": "read_speech",
        "n_utterances": len(clips),
        "audio_s": round(sum(clip.duration_s for clip in clips), 1),
        "per_source": {
            source: {
                "n": sum(clip.source == source for clip in clips),
                "audio_s": round(sum(clip.duration_s for clip in clips if clip.source == source), 1),
            }
            for source in sources
        },
        "packages": debs,
    }
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
