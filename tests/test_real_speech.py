"""firmware_tools.building.real_speech on a small tree laid out like the Debian packages, with real espeak-ng speech.

Nothing here needs the Debian packages themselves: the tree under tmp_path mimics
their layouts (plain files, a sound catalogue, zip archives) with a few rendered words.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from firmware_tools.building.real_speech import (
    DEBIAN_SPEECH_PACKAGES,
    EVALUATION_PACKAGES,
    TRAINING_PACKAGES,
    VocabularyCheck,
    find_voice_lines,
    is_installed,
    split_of,
)

REPO = Path(__file__).resolve().parent.parent

KLETTRES_XML = """<!-- KLettres -->
<klettres>
  <language code="en">
    <alphabet>
      <sound name="O" file="en/alpha/O.ogg" />
    </alphabet>
    <syllables>
      <sound name="NO" file="en/syllab/no.ogg" />
      <sound name="CH" file="en/syllab/ch.ogg" />
      <sound name="GONE" file="en/syllab/gone.ogg" />
    </syllables>
  </language>
</klettres>
"""

AUDIO_CFG = """audio_module
{
    audio   "pcv431.ogg"    oneshot 100 1800  /*No*/
    audio   "pcv463.ogg"    oneshot 100 1800  /*10 Minutes Remaining*/
    audio   "col011a.ogg"   oneshot 100 1800  /*Cleanse & Destroy*/
    audio   "rocket.ogg"    oneshot 100 1800
}
"""


def _speak(words: str, directory: Path) -> tuple[np.ndarray, int]:
    """``words`` said by espeak-ng: float32 samples and their rate."""
    wav = directory / f"espeak-{abs(hash(words))}.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), words], check=True, capture_output=True)
    data, rate = soundfile.read(wav, dtype="float32")
    return data, rate


def _encode(data: np.ndarray, rate: int, kind: str) -> bytes:
    buffer = io.BytesIO()
    if kind == "ogg":
        soundfile.write(buffer, data, rate, format="OGG", subtype="VORBIS")
    else:
        soundfile.write(buffer, data, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with hedgewars, ktuberling, klettres, warzone2100 and openarena laid out as Debian installs them."""
    root = tmp_path_factory.mktemp("root")
    scratch = tmp_path_factory.mktemp("espeak")
    said = {words: _speak(words, scratch) for words in ("hello", "hat", "falling star", "oh", "no", "two", "yes")}

    gains = iter(np.linspace(0.9, 0.5, 40))  # every file different bytes, unless written twice on purpose

    def ogg(words: str, stereo: bool = False) -> bytes:
        data, rate = said[words]
        data = data * next(gains)
        return _encode(np.stack([data, data * 0.5], axis=1) if stereo else data, rate, "ogg")

    def wav(words: str) -> bytes:
        data, rate = said[words]
        return _encode(data * next(gains), rate, "wav")

    voices = root / "usr/share/games/hedgewars/Data/Sounds/voices"
    hello = ogg("hello")
    _put(voices / "Default/Hello.ogg", hello)
    _put(voices / "Classic/Hello.ogg", hello)  # the same bytes: listed once
    _put(voices / "Default/Ow1.ogg", ogg("no"))  # a grunt by name
    _put(voices / "Default_uk/Hello.ogg", ogg("yes"))  # a translation
    _put(root / "usr/share/games/hedgewars/Data/Music/main.ogg", ogg("hello"))

    _put(root / "usr/share/ktuberling/sounds/en/hat.ogg", ogg("hat", stereo=True))
    _put(root / "usr/share/ktuberling/sounds/en/moon_fallingstar.ogg", ogg("falling star"))
    _put(root / "usr/share/ktuberling/sounds/fr/chapeau.ogg", ogg("hat"))

    klettres = root / "usr/share/klettres"
    _put(klettres / "en/sounds.xml", KLETTRES_XML.encode())
    _put(klettres / "en/alpha/O.ogg", ogg("oh"))
    _put(klettres / "en/syllab/no.ogg", ogg("no"))
    _put(klettres / "en/syllab/ch.ogg", ogg("hat"))
    _put(klettres / "fr/alpha/O.ogg", ogg("oh"))

    warzone = root / "usr/share/games/warzone2100/base.wz"
    warzone.parent.mkdir(parents=True)
    with zipfile.ZipFile(warzone, "w") as archive:
        archive.writestr("audio/audio.cfg", AUDIO_CFG)
        archive.writestr("audio/memressp/tutorial/pcv431.ogg", ogg("no"))
        archive.writestr("audio/memressp/missmesg/pcv463.ogg", ogg("two"))
        archive.writestr("audio/coltive/col011a.ogg", ogg("hat"))
        archive.writestr("audio/sfx/weapons/rocket.ogg", ogg("yes"))
        archive.writestr("audio/tutorial/tut1.ogg", ogg("falling star"))
        archive.writestr("texpages/page.png", b"not audio")

    openarena = root / "usr/share/games/openarena/baseoa/pak6-misc.pk3"
    openarena.parent.mkdir(parents=True)
    with zipfile.ZipFile(openarena, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("sound/feedback/two.wav", wav("two"))
        archive.writestr("sound/feedback/hit.wav", wav("hello"))
        archive.writestr("sound/voices/festivoxmale/yes.ogg", ogg("yes"))
        archive.writestr("sound/voices/rott/yes.ogg", wav("yes"))
        archive.writestr("sound/player/sarge/taunt.wav", wav("hello"))
        archive.writestr("sound/player/sarge/pain25_1.wav", wav("no"))
    return root


def _by_location(lines) -> dict[str, object]:
    return {line.location.split("/usr/share/", 1)[1]: line for line in lines}


def test_catalogue_keeps_english_speech_with_words_and_drops_the_rest(tree: Path) -> None:
    lines = find_voice_lines(root=tree)
    found = _by_location(lines)
    assert set(found) == {
        "games/hedgewars/Data/Sounds/voices/Classic/Hello.ogg",
        "ktuberling/sounds/en/hat.ogg",
        "ktuberling/sounds/en/moon_fallingstar.ogg",
        "klettres/en/alpha/O.ogg",
        "klettres/en/syllab/no.ogg",
        "klettres/en/syllab/ch.ogg",
        "games/warzone2100/base.wz!audio/memressp/tutorial/pcv431.ogg",
        "games/warzone2100/base.wz!audio/memressp/missmesg/pcv463.ogg",
        "games/warzone2100/base.wz!audio/coltive/col011a.ogg",
        "games/warzone2100/base.wz!audio/tutorial/tut1.ogg",
        "games/openarena/baseoa/pak6-misc.pk3!sound/feedback/two.wav",
        "games/openarena/baseoa/pak6-misc.pk3!sound/voices/rott/yes.ogg",
        "games/openarena/baseoa/pak6-misc.pk3!sound/player/sarge/taunt.wav",
    }
    words = {location: line.words for location, line in found.items()}
    assert words["ktuberling/sounds/en/hat.ogg"] == "hat"
    assert words["ktuberling/sounds/en/moon_fallingstar.ogg"] == "falling star"
    assert words["klettres/en/alpha/O.ogg"] == "oh"
    assert words["klettres/en/syllab/no.ogg"] == "no"
    assert words["klettres/en/syllab/ch.ogg"] is None
    assert words["games/hedgewars/Data/Sounds/voices/Classic/Hello.ogg"] is None
    assert words["games/warzone2100/base.wz!audio/memressp/tutorial/pcv431.ogg"] == "no"
    assert words["games/warzone2100/base.wz!audio/memressp/missmesg/pcv463.ogg"] == "ten minutes remaining"
    assert words["games/warzone2100/base.wz!audio/coltive/col011a.ogg"] == "cleanse and destroy"
    assert words["games/warzone2100/base.wz!audio/tutorial/tut1.ogg"] is None
    assert words["games/openarena/baseoa/pak6-misc.pk3!sound/feedback/two.wav"] == "two"
    assert words["games/openarena/baseoa/pak6-misc.pk3!sound/player/sarge/taunt.wav"] is None
    assert found["klettres/en/alpha/O.ogg"].voice == "klettres/en"
    assert found["games/hedgewars/Data/Sounds/voices/Classic/Hello.ogg"].voice == "hedgewars/Classic"
    # Deterministic: sorted by package, path and member, the same on a second run.
    assert lines == sorted(lines, key=lambda line: (line.package, str(line.path), line.member or ""))
    assert lines == find_voice_lines(root=tree)


def test_vocabulary_phrases_are_flagged(tree: Path) -> None:
    check = VocabularyCheck()
    flagged = {line.words: check.label(line.words) for line in find_voice_lines(root=tree) if check(line)}
    assert flagged == {"oh": "digit[value=0]", "no": "no", "two": "digit[value=2]", "yes": "yes"}
    assert check.label("hat") is None
    assert check.label("turn on the lights") == "lights_on"
    assert check.label("go forwards") is None  # fuzzy matches do not count
    assert check.label(None) is None


def test_reading_gives_mono_float32_at_the_asked_rate(tree: Path) -> None:
    found = _by_location(find_voice_lines(root=tree))
    for location in ("ktuberling/sounds/en/hat.ogg", "games/openarena/baseoa/pak6-misc.pk3!sound/feedback/two.wav"):
        line = found[location]
        audio = line.read(16000)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) - line.seconds * 16000) <= 2
        assert 0.05 < np.abs(audio).max() <= 1.0
        assert len(line.read(22050)) == pytest.approx(line.seconds * 22050, abs=2)
    # espeak-ng renders at 22050 Hz, so the duration is the rendered one.
    data, rate = soundfile.read(io.BytesIO(found["ktuberling/sounds/en/hat.ogg"].read_bytes()))
    assert found["ktuberling/sounds/en/hat.ogg"].seconds == pytest.approx(len(data) / rate, abs=1e-3)


def test_packages_not_installed_give_nothing(tree: Path, tmp_path: Path) -> None:
    assert is_installed("ktuberling-data", tree)
    assert not is_installed("nexuiz-data", tree) and not is_installed("redeclipse-data", tree)
    assert find_voice_lines(["nexuiz-data", "redeclipse-data"], root=tree) == []
    assert find_voice_lines(root=tmp_path) == []
    only = find_voice_lines(["klettres-data"], root=tree)
    assert {line.package for line in only} == {"klettres-data"} and len(only) == 3
    with pytest.raises(ValueError, match="unknown package"):
        find_voice_lines(["no-such-package"], root=tree)


def test_default_split_keeps_evaluation_apart() -> None:
    assert set(TRAINING_PACKAGES) | set(EVALUATION_PACKAGES) == set(DEBIAN_SPEECH_PACKAGES)
    assert not set(TRAINING_PACKAGES) & set(EVALUATION_PACKAGES)
    assert {"ktuberling-data", "klettres-data"} <= set(EVALUATION_PACKAGES)
    assert split_of("hedgewars-data") == "training" and split_of("klettres-data") == "evaluation"


@pytest.mark.subprocess
def test_command_line_lists_counts_and_missing_packages(tree: Path) -> None:
    command = [sys.executable, "-m", "firmware_tools.building.real_speech", "list", "--root", str(tree)]
    done = subprocess.run([*command, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    report = {summary["package"]: summary for summary in json.loads(done.stdout)["packages"]}
    assert report["klettres-data"]["files"] == 3
    assert report["klettres-data"]["with_words"] == 2
    assert report["klettres-data"]["in_vocabulary"] == 2
    assert report["nexuiz-data"]["installed"] is False and report["nexuiz-data"]["files"] == 0
    text = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "nexuiz-data: not installed" in text and "apt-get install nexuiz-data" in text
    assert "Traceback" not in text
    assert next(line for line in text.splitlines() if line.startswith("warzone2100-data")).split()[2] == "4"
