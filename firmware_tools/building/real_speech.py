"""Real recorded English speech from Debian game and education packages: a catalogue of voice lines.

Two measurements need real voices rather than synthetic ones: how often words
outside the vocabulary get an intent, and how often speech wakes the device. The
voice lines of seven Debian data packages provide them (``DEBIAN_SPEECH_PACKAGES``).
``find_voice_lines()`` lists the English speech each installed package holds, plain
files or members of the zip archives (.pk3, .wz) the games ship, and leaves out
music, sound effects, grunts and screams, other languages and synthetic voices.
Byte-identical copies are listed once. Where the package tells the words spoken
(a file name, a sound catalogue), ``VoiceLine.words`` has them; ``VocabularyCheck``
says which of those words are a vocabulary phrase, which a benchmark counts as
positives.

Per package, what is kept and why (checked by running Whisper tiny.en on every
candidate file, and by spectrograms for the doubtful ones):

- ``hedgewars-data``: ``Data/Sounds/voices/<pack>/``, one hedgehog character per pack.
  Packs named ``<name>_<xx>`` are translations (Default_es, Default_pl, Default_ru,
  Default_uk, Russian_pl: Spanish, Polish, Russian, Ukrainian) and are left out;
  "Russian" is English with a Russian accent and is kept. Files are named after the
  game event, not the words (Default/Hello.ogg says "Bye!", Pirate/Brilliant.ogg
  "Shiver me timbers!"), so ``words`` is None. Jump*, Ow*, Ooff*, Laugh, Hmm and
  Poison* are grunts and are left out, as are Data/Sounds/ (effects) and Data/Music/.
- ``ktuberling-data``: ``sounds/en/*.ogg``, one speaker, one object name each:
  ``hat.ogg`` says "hat", ``moon_fallingstar.ogg`` "falling star" (theme prefix
  dropped, compounds split, the package's misspellings corrected).
- ``klettres-data``: ``en/`` (American) and ``en_GB/`` (British), as listed in their
  ``sounds.xml``: letter names and short words. The letter O is written "oh", which
  is how it is said and a vocabulary word (zero). The phoneme sounds "ch" and "th"
  are no words: ``words`` is None.
- ``nexuiz-data`` (``data.pk3``): the tutorial narration, the announcers (the
  "robotic" one is a human voice with effects, credited to Amos Dudley), each
  player model's ``coms/`` radio calls and the CTF and Onslaught announcements.
  ``player/<model>/player/`` (pain, death, jump) and every effect are left out.
- ``openarena-data``: the .pk3 archives of openarena-data and of the
  openarena-081-*/openarena-085-data packages it depends on (apt installs them
  together): the announcer (``sound/feedback``, ``sound/teamplay/voc_*``), each
  player model's ``taunt.wav`` and the "rott" radio voice. ``voices/festivoxmale`` is
  left out: it is named after the FestVox speech synthesiser and credited to no
  voice actor, so it is taken as synthetic.
- ``redeclipse-data``: ``sounds/announcer/`` only. ``sounds/voice/`` is made of
  synthesised tones, not words (Whisper finds no speech in "yes" and "no"); the
  announcer's stingers (multikill*, spree*, breaker, dominating, headshot) hold no
  words either.
- ``warzone2100-data`` (``base.wz``): the announcer, commander, pilot, taunt,
  countdown and tutorial voices of ``audio/`` and the briefings of
  ``sequenceaudio/``. Words come from the comments of ``audio/audio.cfg``
  (``"pcv337.ogg" ... /*Structure Under Attack*/``), and for the countdown and taunts,
  which it leaves uncommented, from their names (``det5min.ogg``: "detonation in five
  minutes"). ``audio/sfx``, ``audio/radclick`` and the laughs are left out. The
  tutorial's script text does not match its recordings, so those keep None; so do the
  commander's digits (``cmndrvoc/7.ogg``), which start with a clipped word before the
  digit.

Where a table below gives words for a game line, they were checked against a
transcript of the file. A line without words may still say a vocabulary word
(hedgewars' Nooo.ogg says "No!"), so lines with ``words`` None suit false-wake
measurements, not out-of-vocabulary rates.

The split (``TRAINING_PACKAGES``, ``EVALUATION_PACKAGES``): ktuberling-data and
klettres-data are single English words said clearly, the closest to commands, so
they are kept for evaluating out-of-vocabulary words. warzone2100-data joins them: it
has the most known phrases (its audio.cfg names almost every line) and long narration
for false wakes, so evaluation gets nearly as much speech as training. hedgewars-data
(ten characters), nexuiz-data, openarena-data and redeclipse-data are for training.
Nothing is shared between the two (checked by content: no file of one split is
byte-identical to a file of the other).

``python -m firmware_tools.building.real_speech list [--root /] [--json]`` prints what is
installed: per package, files, minutes, lines with and without known words, and how
many say a vocabulary phrase.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import sys
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import soundfile

from schemas.vocabulary import Vocabulary, load_vocabulary, normalize

log = logging.getLogger("mqvox.real_speech")

SAMPLE_RATE = 16000
"""Default rate (hertz) of ``VoiceLine.read``: the models' and Whisper's input rate."""

DEBIAN_SPEECH_PACKAGES = (
    "hedgewars-data",
    "klettres-data",
    "ktuberling-data",
    "nexuiz-data",
    "openarena-data",
    "redeclipse-data",
    "warzone2100-data",
)
"""Debian packages whose voice lines are catalogued (``apt-get install`` them; redeclipse-data is 860 MB)."""

TRAINING_PACKAGES = ("hedgewars-data", "nexuiz-data", "openarena-data", "redeclipse-data")
"""Packages whose speech may be trained on (as negatives)."""

EVALUATION_PACKAGES = ("klettres-data", "ktuberling-data", "warzone2100-data")
"""Packages never trained on: out-of-vocabulary and false-wake rates are measured on them."""

_AUDIO = re.compile(r"\.(ogg|wav|flac)$", re.IGNORECASE)


@dataclass(frozen=True)
class VoiceLine:
    """One recorded voice line: a file, or a member of a zip archive, in a Debian package."""

    package: str
    """Debian package it comes with, one of ``DEBIAN_SPEECH_PACKAGES``."""
    path: Path
    """The audio file, or the archive (.pk3, .wz) that holds it."""
    member: str | None
    """Name of the audio inside the archive; None for a plain file."""
    voice: str
    """The character, announcer or folder it belongs to ('hedgewars/Pirate', 'klettres/en_GB'): one speaker
    or a few."""
    words: str | None
    """The English words spoken, normalized (lower case, no punctuation), when the package tells them;
    None when unknown."""
    seconds: float
    """Length (seconds)."""

    @property
    def location(self) -> str:
        """Where it is: the path, with ``!member`` for an archive member."""
        return f"{self.path}!{self.member}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        """The encoded file (OGG, WAV or FLAC)."""
        if self.member is None:
            return self.path.read_bytes()
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(self.member)

    def read(self, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """The audio, mono (channels averaged) float32 in [-1, 1] at ``sample_rate`` hertz."""
        data, rate = soundfile.read(io.BytesIO(self.read_bytes()), dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if rate != sample_rate:
            import soxr  # device and cloud extras

            mono = soxr.resample(mono, rate, sample_rate)
        return np.ascontiguousarray(mono, dtype=np.float32)


class VocabularyCheck:
    """Which words are a vocabulary phrase, decided as the cloud worker's exact match decides.

    Uses ``common.text_matching.IntentMatcher`` (numbers spelled, accents folded, a
    leading wake phrase and polite fillers dropped) and accepts only exact phrases
    (score 1.0), never a fuzzy match: "yes", "two" and "no" are in, "onion" is not.
    Needs num2words (the cloud and train extras).
    """

    def __init__(self, vocabulary: Vocabulary | None = None) -> None:
        from common.text_matching import IntentMatcher  # num2words: the cloud and train extras

        self.vocabulary = vocabulary if vocabulary is not None else load_vocabulary()
        self._matcher = IntentMatcher(self.vocabulary)

    def label(self, words: str | None) -> str | None:
        """The command label ``words`` says exactly ('yes', 'digit[value=2]'), or None."""
        if not words:
            return None
        match = self._matcher.match(words)
        if match.intent is None or match.score < 1.0 or match.phrase is None:
            return None
        command = self.vocabulary.match(match.phrase)
        return command.label if command is not None else None

    def __call__(self, line: VoiceLine) -> bool:
        """Whether the line's known words are a vocabulary phrase (False when its words are unknown)."""
        return self.label(line.words) is not None


# -- per-package rules --------------------------------------------------------------------------

_Candidate = tuple[Path, str | None, str, str | None]
"""(path, member, voice, words) of a line before it is checked and measured."""


def _archives(root: Path, pattern: str) -> list[Path]:
    return sorted(path for path in root.glob(pattern) if path.is_file())


def _members(archive: Path) -> list[str]:
    try:
        with zipfile.ZipFile(archive) as opened:
            return sorted(name for name in opened.namelist() if _AUDIO.search(name))
    except (OSError, zipfile.BadZipFile) as error:
        log.warning("skipping unreadable archive %s: %s", archive, error)
        return []


_HEDGEWARS_VOICES = "usr/share/games/hedgewars/Data/Sounds/voices"
_HEDGEWARS_TRANSLATION = re.compile(r".+_[a-z]{2}")
_HEDGEWARS_NON_VERBAL = re.compile(r"(Jump|Ow|Ooff)[0-9]*|Laugh|Hmm|Poison[A-Za-z]*")


def _hedgewars(root: Path) -> Iterator[_Candidate]:
    """Every English character pack; words unknown (files are named after events)."""
    for pack in sorted(path for path in (root / _HEDGEWARS_VOICES).iterdir() if path.is_dir()):
        if _HEDGEWARS_TRANSLATION.fullmatch(pack.name):
            continue
        for file in sorted(pack.iterdir()):
            if _AUDIO.search(file.name) and not _HEDGEWARS_NON_VERBAL.fullmatch(file.stem):
                yield file, None, f"hedgewars/{pack.name}", None


_KTUBERLING_SOUNDS = "usr/share/ktuberling/sounds/en"
_KTUBERLING_THEME = re.compile(r"(egypt|moon|pizzeria|tv)_")
_KTUBERLING_WORDS = {
    "fallingstar": "falling star",
    "palmtree": "palm tree",
    "broccolli": "broccoli",
    "brocolli": "broccoli",
    "sphynx": "sphinx",
}
"""Object names the file names run together or misspell."""


def _ktuberling(root: Path) -> Iterator[_Candidate]:
    """The English object names: the file name without its theme prefix."""
    for file in sorted((root / _KTUBERLING_SOUNDS).iterdir()):
        if _AUDIO.search(file.name):
            name = _KTUBERLING_THEME.sub("", file.stem, count=1)
            yield file, None, "ktuberling/en", normalize(_KTUBERLING_WORDS.get(name, name).replace("_", " "))


_KLETTRES = "usr/share/klettres"
_KLETTRES_LANGUAGES = ("en", "en_GB")
_KLETTRES_NOT_WORDS = frozenset({"ch", "th"})
_LETTER_WORDS = {"o": "oh"}
"""Letter names written as the word they sound like, where that word matters to the vocabulary."""


def _klettres(root: Path) -> Iterator[_Candidate]:
    """The English letters and syllables listed in each language's sounds.xml."""
    base = root / _KLETTRES
    for language in _KLETTRES_LANGUAGES:
        catalogue = base / language / "sounds.xml"
        if not catalogue.is_file():
            continue
        try:
            tree = ElementTree.parse(catalogue)
        except ElementTree.ParseError as error:
            log.warning("skipping unreadable %s: %s", catalogue, error)
            continue
        for section in ("alphabet", "syllables"):
            for sound in tree.iterfind(f".//{section}/sound"):
                name, file = sound.get("name", "").lower(), sound.get("file", "")
                path = base / file
                if not name or not _AUDIO.search(file) or not path.is_file():
                    continue
                words: str | None = name
                if section == "alphabet":
                    words = _LETTER_WORDS.get(name, name)
                elif name in _KLETTRES_NOT_WORDS:
                    words = None
                yield path, None, f"klettres/{language}", words


_NEXUIZ_ARCHIVES = "usr/share/games/nexuiz/data/*.pk3"
_NEXUIZ_SPEECH = re.compile(r"sound/(tutorial/.+|announcer/[^/]+/.+|player/[^/]+/coms/.+)")
_NEXUIZ_SPEECH_NAMES = frozenset(
    {
        "sound/ctf/blue_capture.wav",
        "sound/ctf/blue_dropped.wav",
        "sound/ctf/blue_returned.wav",
        "sound/ctf/blue_taken.wav",
        "sound/ctf/bluecapture.ogg",
        "sound/ctf/capture.ogg",
        "sound/ctf/red_capture.wav",
        "sound/ctf/red_dropped.wav",
        "sound/ctf/red_returned.wav",
        "sound/ctf/red_taken.wav",
        "sound/ctf/redcapture.ogg",
        "sound/ctf/return.wav",
        "sound/ctf/take.wav",
        "sound/onslaught/controlpoint_build.ogg",
        "sound/onslaught/controlpoint_built.ogg",
        "sound/onslaught/controlpoint_underattack.ogg",
        "sound/onslaught/generator_decay.ogg",
        "sound/onslaught/generator_underattack.ogg",
    }
)
"""Announcements among the effects of sound/ctf and sound/onslaught."""
_PLAYER_NON_VERBAL = re.compile(r"(death|drown|fall|falling|gasp|jump|pain)_?[0-9]*(_[0-9]+)?", re.IGNORECASE)
_COUNTDOWN = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_NEXUIZ_WORDS = {
    **{f"sound/announcer/robotic/{n}.ogg": word for n, word in enumerate(_COUNTDOWN, start=1)},
    "sound/announcer/robotic/1fragleft.ogg": "one frag left",
    "sound/announcer/robotic/2fragsleft.ogg": "two frags left",
    "sound/announcer/robotic/3fragsleft.ogg": "three frags left",
    "sound/announcer/robotic/begin.ogg": "begin",
    "sound/announcer/robotic/prepareforbattle.ogg": "prepare for battle",
    "sound/announcer/robotic/terminated.ogg": "terminated",
    "sound/announcer/robotic/blueteamtakeslead.ogg": "blue team takes the lead",
    "sound/announcer/robotic/redteamtakeslead.ogg": "red team takes the lead",
    "sound/announcer/robotic/leadgained.ogg": "you have gained the lead",
    "sound/announcer/male/amazing.ogg": "amazing",
    "sound/announcer/male/awesome.ogg": "awesome",
    "sound/announcer/male/impressive.ogg": "impressive",
    "sound/announcer/male/headshot.ogg": "headshot",
    "sound/announcer/male/airshot.ogg": "air shot",
    "sound/ctf/blue_capture.wav": "blue scores",
    "sound/ctf/bluecapture.ogg": "blue scores",
    "sound/ctf/red_capture.wav": "red scores",
    "sound/ctf/redcapture.ogg": "red scores",
    "sound/ctf/blue_dropped.wav": "blue flag dropped",
    "sound/ctf/red_dropped.wav": "red flag dropped",
    "sound/ctf/blue_returned.wav": "blue flag returned",
    "sound/ctf/red_returned.wav": "red flag returned",
    "sound/ctf/blue_taken.wav": "blue flag taken",
    "sound/ctf/red_taken.wav": "red flag taken",
    "sound/onslaught/controlpoint_built.ogg": "control point built",
    "sound/onslaught/controlpoint_underattack.ogg": "control point under attack",
    "sound/onslaught/generator_underattack.ogg": "the generator is under attack",
    "sound/tutorial/misc-did_yoda_show_you_that.ogg": "did yoda show you that",
    "sound/tutorial/misc-excellent.ogg": "excellent",
    "sound/tutorial/misc-good_work.ogg": "good work",
    "sound/tutorial/misc-nice.ogg": "nice",
    "sound/tutorial/misc-very_impressive.ogg": "very impressive",
}
"""Words of the Nexuiz lines whose names say them (countdown digits, announcements)."""


def _nexuiz(root: Path) -> Iterator[_Candidate]:
    """Tutorial, announcers, radio calls and announcements in data.pk3."""
    for archive in _archives(root, _NEXUIZ_ARCHIVES):
        for member in _members(archive):
            parts = member.split("/")
            if _NEXUIZ_SPEECH.fullmatch(member) or member in _NEXUIZ_SPEECH_NAMES:
                if parts[1] == "player":
                    voice = f"nexuiz/{parts[2]}"
                elif parts[1] == "announcer":
                    voice = f"nexuiz/announcer-{parts[2]}"
                else:
                    voice = f"nexuiz/{parts[1]}"
                yield archive, member, voice, _NEXUIZ_WORDS.get(member)
            elif (
                # sound/player/torus/ keeps its radio calls beside its grunts, without a coms/ folder.
                len(parts) == 4
                and parts[:2] == ["sound", "player"]
                and not _PLAYER_NON_VERBAL.fullmatch(Path(parts[3]).stem)
            ):
                yield archive, member, f"nexuiz/{parts[2]}", None


_OPENARENA_ARCHIVES = "usr/share/games/openarena/*/*.pk3"
_OPENARENA_SYNTHETIC_VOICES = frozenset({"festivoxmale"})
_OPENARENA_WORDS = {
    "1_frag": "one frag remaining",
    "2_frags": "two frags remaining",
    "3_frags": "three frags remaining",
    "1_minute": "one minute warning",
    "5_minute": "five minute warning",
    "accuracy": "accuracy",
    "assist": "assist",
    "blueleads": "blue leads",
    "redleads": "red leads",
    "defense": "defense",
    "denied": "denied",
    "excellent": "excellent",
    "excellent_a": "excellent",
    "fight": "fight",
    "fight2": "fight",
    "frags": "frags",
    "gauntlet": "gauntlet",
    "humiliation": "humiliation",
    "impressive": "impressive",
    "impressive_a": "impressive",
    "perfect": "perfect",
    "one": "one",
    "two": "two",
    "three": "three",
    "prepare": "prepare to fight",
    "lostlead": "you have lost the lead",
    "takenlead": "you have taken the lead",
    "tiedlead": "you are tied for the lead",
    "teamstied": "teams are tied",
    "sudden_death": "sudden death",
    "vote_failed": "vote failed",
    "vote_now": "vote now",
    "vote_passed": "vote passed",
    "youwin": "you have won the match",
    "voc_youwin": "you have won the match",
    "youlose": "you have lost the match",
    "voc_youlose": "you have lost the match",
    "voc_holyshit": "holy shit",
    "voc_base_attack": "your base is under attack",
    "voc_blue_returned": "blue flag returned",
    "voc_red_returned": "red flag returned",
    "voc_blue_scores": "blue scores",
    "voc_red_scores": "red scores",
    "voc_enemy_1flag": "the enemy has the flag",
    "voc_enemy_flag": "the enemy has your flag",
    "voc_team_1flag": "your team has the flag",
    "voc_team_flag": "your team has the enemy flag",
    "voc_you_flag": "you have the flag",
    # The "rott" radio voice (missionpack).
    "affirmative": "affirmative",
    "baseunderattack": "our base is under attack",
    "camphere": "camp here",
    "coverme": "cover me",
    "defendthebase": "defend the base",
    "dontwannabeleader": "i don't want to be the leader anymore",
    "followingcarrier": "following the carrier",
    "followme": "follow me",
    "getflag": "get our flag",
    "getsomeskulls": "get some skulls",
    "getthatflag": "get that flag",
    "gettheflag": "get the flag",
    "gettingourflag": "getting our flag",
    "gofortheflag": "go for the flag",
    "goingonpatrol": "going on patrol",
    "haveflag": "i have the flag",
    "haveourflag": "they have our flag",
    "illcoverbase": "i'll cover our base",
    "imcampinghere": "i'm camping here",
    "imfollowing": "i'm following",
    "imgoingin": "i'm going in",
    "imtheleader": "i'm the leader",
    "inposition": "i'm in position",
    "iwanttopatrol": "i want to patrol",
    "justroaming": "just roaming around",
    "keepupcarrier": "keep up with the carrier",
    "negative": "negative",
    "no": "no",
    "ok": "okay",
    "rogerthat": "roger that",
    "wanttoattack": "i want to attack",
    "wanttodefend": "i want to defend",
    "wanttoroam": "i want to roam around",
    "whereareyou": "where are you",
    "whoisleader": "who's our leader",
    "yes": "yes",
    "youreonoffense": "you're on offense",
}
"""Words of the announcer and radio lines, by file stem."""


def _openarena(root: Path) -> Iterator[_Candidate]:
    """Announcer, team announcements, player taunts and the radio voice of every .pk3."""
    for archive in _archives(root, _OPENARENA_ARCHIVES):
        for member in _members(archive):
            parts, stem = member.split("/"), Path(member).stem
            if parts[0] != "sound" or len(parts) < 3:
                continue
            announcer = (
                (parts[1] == "feedback" and not stem.startswith("hit"))
                or (parts[1] == "teamplay" and stem.startswith("voc_"))
                or parts[1:3] == ["player", "announcer"]
            )
            if announcer:
                yield archive, member, "openarena/announcer", _OPENARENA_WORDS.get(stem)
            elif parts[1] == "player" and len(parts) == 4 and stem.lower() == "taunt":
                yield archive, member, f"openarena/{parts[2]}", None
            elif parts[1] == "voices" and len(parts) == 4 and parts[2] not in _OPENARENA_SYNTHETIC_VOICES:
                yield archive, member, f"openarena/{parts[2]}", _OPENARENA_WORDS.get(stem)


_REDECLIPSE_ANNOUNCER = "usr/share/games/redeclipse/data/sounds/announcer"
_REDECLIPSE_STINGERS = re.compile(r"multikill[0-9]*|spree[a-z]*|breaker|dominating|headshot")
_REDECLIPSE_WORDS = {"youwin": "you win", "youlose": "you lose", "firstblood": "first blood", "overtime": "overtime"}


def _redeclipse(root: Path) -> Iterator[_Candidate]:
    """The announcer's spoken lines."""
    for file in sorted((root / _REDECLIPSE_ANNOUNCER).iterdir()):
        if _AUDIO.search(file.name) and not _REDECLIPSE_STINGERS.fullmatch(file.stem):
            yield file, None, "redeclipse/announcer", _REDECLIPSE_WORDS.get(file.stem)


_WARZONE_ARCHIVES = "usr/share/games/warzone2100/*.wz"
_WARZONE_CATALOGUE = "audio/audio.cfg"
_WARZONE_NOT_SPEECH = re.compile(
    r"audio/(sfx|radclick)/.*|audio/multi/(?!lasstrk\.ogg$).*|audio/nexus/laugh[0-9]*\.ogg"
    r"|audio/taunts/[^/]+/haha[a-z]*[0-9]*\.ogg|sequenceaudio/(factory|nexend)\.ogg"
)
_WARZONE_ENTRY = re.compile(r'audio\s+"([^"]+)"[^\n]*?/\*([^*]*)\*/')
_TEENS = ("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_SMALL_NUMBERS = ("zero", *_COUNTDOWN, *_TEENS)
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def _spell(number: re.Match[str]) -> str:
    return _spell_number(int(number.group(0)))


def _spell_number(value: int) -> str:
    """0 to 99 in English words; larger numbers digit by digit."""
    if value < 20:
        return _SMALL_NUMBERS[value]
    if value < 100:
        tens, ones = divmod(value, 10)
        return _TENS[tens] + (f" {_SMALL_NUMBERS[ones]}" if ones else "")
    return " ".join(_SMALL_NUMBERS[int(digit)] for digit in str(value))


_WARZONE_WORDS = {
    **{f"{n}min.ogg": f"missile launch in {_spell_number(n)} minutes" for n in (2, 3, 4, 5, 10, 20, 30, 40, 50, 60)},
    **{f"det{n}min.ogg": f"detonation in {_spell_number(n)} minutes" for n in (2, 3, 4, 5, 10, 20, 30, 40, 50, 60)},
    "1min.ogg": "missile launch in one minute",
    "det1min.ogg": "detonation in one minute",
    "mlaunch.ogg": "missile launched",
    "fdetseq.ogg": "final detonation sequence initiated",
    "10to1.ogg": "ten nine eight seven six five four three two one",
    **{
        f"{stem}{n}.ogg": words
        for n in (1, 2, 3)
        for stem, words in (
            ("tkethat", "take that"),
            ("hadenuf", "had enough"),
            ("nedpowr", "i need power"),
            ("cmgetit", "come and get it"),
            ("trdofrd", "trade offered"),
            ("surprse", "surprise"),
            ("tme2die", "time to die"),
            ("gmeover", "game over man"),
        )
    },
}
"""Words of the countdown and taunt lines, which audio.cfg leaves without a comment."""


def _warzone_words(catalogue: str) -> dict[str, str]:
    """File name -> words from the comments of audio.cfg ('10 Minutes Remaining' -> 'ten minutes remaining')."""
    words = {}
    for name, comment in _WARZONE_ENTRY.findall(catalogue):
        text = normalize(re.sub(r"[0-9]+", _spell, comment.replace("&", " and ")))
        if text:
            words[name.lower()] = text
    return words


def _warzone(root: Path) -> Iterator[_Candidate]:
    """Every voice of audio/ and sequenceaudio/ in the .wz archives, words from audio/audio.cfg."""
    for archive in _archives(root, _WARZONE_ARCHIVES):
        members = _members(archive)
        words = dict(_WARZONE_WORDS)
        try:
            with zipfile.ZipFile(archive) as opened:
                if _WARZONE_CATALOGUE in opened.namelist():
                    words |= _warzone_words(opened.read(_WARZONE_CATALOGUE).decode("utf-8", "replace"))
        except (OSError, zipfile.BadZipFile):
            pass
        for member in members:
            if not member.startswith(("audio/", "sequenceaudio/")) or _WARZONE_NOT_SPEECH.fullmatch(member):
                continue
            folder = member.split("/")[1] if member.startswith("audio/") else "briefing"
            yield archive, member, f"warzone2100/{folder}", words.get(Path(member).name.lower())


@dataclass(frozen=True)
class _Layout:
    marker: str
    """Relative path (a glob) that exists when the package is installed."""
    scan: Callable[[Path], Iterator[_Candidate]]


_LAYOUTS: dict[str, _Layout] = {
    "hedgewars-data": _Layout(_HEDGEWARS_VOICES, _hedgewars),
    "klettres-data": _Layout(f"{_KLETTRES}/en*/sounds.xml", _klettres),
    "ktuberling-data": _Layout(_KTUBERLING_SOUNDS, _ktuberling),
    "nexuiz-data": _Layout(_NEXUIZ_ARCHIVES, _nexuiz),
    "openarena-data": _Layout(_OPENARENA_ARCHIVES, _openarena),
    "redeclipse-data": _Layout(_REDECLIPSE_ANNOUNCER, _redeclipse),
    "warzone2100-data": _Layout(_WARZONE_ARCHIVES, _warzone),
}


def _check_packages(packages: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(packages))
    unknown = [package for package in chosen if package not in _LAYOUTS]
    if unknown:
        raise ValueError(f"unknown package(s) {', '.join(unknown)}; known: {', '.join(DEBIAN_SPEECH_PACKAGES)}")
    return chosen


def is_installed(package: str, root: str | Path = "/") -> bool:
    """Whether ``package``'s voice files are under ``root`` (the place the catalogue looks for them)."""
    _check_packages([package])
    return next(Path(root).glob(_LAYOUTS[package].marker), None) is not None


def expected_path(package: str) -> str:
    """Where, relative to the root, ``package``'s voice files are looked for (a glob)."""
    _check_packages([package])
    return _LAYOUTS[package].marker


def split_of(package: str) -> str:
    """'training' or 'evaluation': which default split ``package`` belongs to."""
    _check_packages([package])
    return "evaluation" if package in EVALUATION_PACKAGES else "training"


def find_voice_lines(packages: Iterable[str] = DEBIAN_SPEECH_PACKAGES, root: str | Path = "/") -> list[VoiceLine]:
    """The English voice lines of ``packages`` installed under ``root``, sorted by package, path and member.

    Packages that are not installed give nothing (see ``is_installed``); unreadable
    files are skipped with a warning. A recording found several times (the same
    bytes) is listed once: the first copy with known words, else the first copy.
    Raises ValueError for a package this module does not know.
    """
    chosen = _check_packages(packages)
    base = Path(root)
    candidates: list[tuple[str, _Candidate]] = []
    for package in chosen:
        if not is_installed(package, base):
            log.info("%s is not installed under %s", package, base)
            continue
        candidates.extend((package, found) for found in _LAYOUTS[package].scan(base))
    candidates = sorted(set(candidates), key=lambda item: (item[0], str(item[1][0]), item[1][1] or ""))

    chosen_by_digest: dict[str, VoiceLine] = {}
    order: list[str] = []
    open_archives: dict[Path, zipfile.ZipFile] = {}
    try:
        for package, (path, member, voice, words) in candidates:
            try:
                if member is None:
                    data = path.read_bytes()
                else:
                    if path not in open_archives:
                        open_archives[path] = zipfile.ZipFile(path)
                    data = open_archives[path].read(member)
                info = soundfile.info(io.BytesIO(data))
            except (OSError, RuntimeError, KeyError, zipfile.BadZipFile, soundfile.LibsndfileError) as error:
                log.warning("skipping unreadable %s%s: %s", path, f"!{member}" if member else "", error)
                continue
            if info.frames <= 0:
                continue
            line = VoiceLine(package, path, member, voice, words, round(info.frames / info.samplerate, 4))
            digest = hashlib.sha256(data).hexdigest()
            if digest not in chosen_by_digest:
                chosen_by_digest[digest] = line
                order.append(digest)
            elif chosen_by_digest[digest].words is None and words is not None:
                chosen_by_digest[digest] = line
    finally:
        for archive in open_archives.values():
            archive.close()
    lines = [chosen_by_digest[digest] for digest in order]
    return sorted(lines, key=lambda line: (line.package, str(line.path), line.member or ""))


# -- summary and command line -------------------------------------------------------------------


@dataclass(frozen=True)
class PackageSummary:
    """What one package offers."""

    package: str
    """Debian package name."""
    split: str
    """'training' or 'evaluation' (the default split)."""
    installed: bool
    """Whether its voice files were found under the root."""
    files: int
    """English voice lines."""
    seconds: float
    """Their total length (seconds)."""
    with_words: int
    """Lines whose words are known."""
    in_vocabulary: int | None
    """Lines whose words are a vocabulary phrase; None when the check could not run (no cloud extra)."""
    voices: int
    """Distinct characters, announcers or folders."""
    examples: tuple[str, ...]
    """A few known words, for a glance."""


def summarize(
    lines: Sequence[VoiceLine],
    packages: Iterable[str] = DEBIAN_SPEECH_PACKAGES,
    root: str | Path = "/",
    check: VocabularyCheck | None = None,
) -> list[PackageSummary]:
    """One summary per package of ``packages``, from lines found by ``find_voice_lines``."""
    summaries = []
    for package in _check_packages(packages):
        own = [line for line in lines if line.package == package]
        known = [line.words for line in own if line.words]
        summaries.append(
            PackageSummary(
                package=package,
                split=split_of(package),
                installed=is_installed(package, root),
                files=len(own),
                seconds=round(sum(line.seconds for line in own), 2),
                with_words=len(known),
                in_vocabulary=None if check is None else sum(1 for line in own if check(line)),
                voices=len({line.voice for line in own}),
                examples=_examples(known),
            )
        )
    return summaries


def _examples(words: Sequence[str], count: int = 5) -> tuple[str, ...]:
    """Up to ``count`` distinct words, spread over their sorted list."""
    distinct = sorted(set(words))
    step = max(1, len(distinct) // count)
    return tuple(distinct[::step][:count])


def _list(args: argparse.Namespace) -> int:
    packages = args.packages or DEBIAN_SPEECH_PACKAGES
    try:
        check: VocabularyCheck | None = VocabularyCheck()
    except ImportError as error:
        print(f"in-vocabulary counts unavailable ({error}; pip install 'mqvox[cloud]')", file=sys.stderr)
        check = None
    lines = find_voice_lines(packages, args.root)
    summaries = summarize(lines, packages, args.root, check)
    totals = {
        split: round(sum(s.seconds for s in summaries if s.split == split) / 3600, 4)
        for split in ("training", "evaluation")
    }
    if args.json:
        report = {
            "root": str(args.root),
            "packages": [asdict(summary) for summary in summaries],
            "hours": totals,
        }
        if args.lines:
            report["lines"] = [
                {**asdict(line), "path": str(line.path), "vocabulary": check.label(line.words) if check else None}
                for line in lines
            ]
        print(json.dumps(report, indent=2))
        return 0
    if args.lines:
        for line in lines:
            label = check.label(line.words) if check else None
            print(f"{line.package}\t{line.seconds:.2f}\t{line.words or '-'}\t{label or '-'}\t{line.location}")
    header = f"{'package':<18} {'split':<10} {'files':>5} {'minutes':>7} {'words':>5} {'unknown':>7} {'in vocab':>8}"
    print(header)
    for summary in summaries:
        if not summary.installed:
            print(
                f"{summary.package}: not installed (nothing at {Path(args.root) / expected_path(summary.package)};"
                f" apt-get install {summary.package})"
            )
            continue
        in_vocabulary = "n/a" if summary.in_vocabulary is None else str(summary.in_vocabulary)
        print(
            f"{summary.package:<18} {summary.split:<10} {summary.files:>5} {summary.seconds / 60:>7.1f}"
            f" {summary.with_words:>5} {summary.files - summary.with_words:>7} {in_vocabulary:>8}"
            + (f"  e.g. {', '.join(summary.examples)}" if summary.examples else "")
        )
    print(f"hours of English speech: training {totals['training']:.2f}, evaluation {totals['evaluation']:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m firmware_tools.building.real_speech``."""
    parser = argparse.ArgumentParser(
        prog="python -m firmware_tools.building.real_speech",
        description="Real English speech in Debian game and education packages.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="count the voice lines of each package installed")
    listing.add_argument("--root", default="/", help="where the packages are installed (default /)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.add_argument("--lines", action="store_true", help="every line too (words, command label, location)")
    listing.add_argument(
        "--package",
        dest="packages",
        action="append",
        choices=DEBIAN_SPEECH_PACKAGES,
        help="only this package (repeatable; default all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    return _list(args)


if __name__ == "__main__":
    sys.exit(main())


EVALUATION_RECORDINGS = (
    ("asterisk", Path("/usr/share/asterisk/sounds/en_US_f_Allison"), "*.wav"),
    ("pocketsphinx", Path("/usr/share/pocketsphinx/test/data"), "*.wav"),
    ("codec2", Path("/usr/share/codec2/raw"), "*.raw"),
)
"""Real speech kept for evaluation only (never trained on), besides the evaluation packages' voice lines: where
Debian installs it (asterisk-core-sounds-en-wav, pocketsphinx-testdata, codec2-examples)."""
CODEC2_NOT_SPEECH = ("sine", "test", "700d")
"""codec2-examples' raw files that hold modem frames or tones, not speech (by name prefix)."""
CODEC2_RATE = 8000
"""codec2-examples' .raw files are headerless 16-bit mono at 8 kHz."""


def evaluation_speech(every: int = 1, sample_rate: int = 16000) -> Iterator[tuple[str, np.ndarray]]:
    """(source, mono audio at ``sample_rate``) of every ``every``-th evaluation-only real recording installed here.

    None of it says the wake phrase: what wakes a device on it is a false wake.
    """
    import soxr

    lines = find_voice_lines(packages=EVALUATION_PACKAGES)
    for line in lines[::every]:
        yield line.package, line.read(sample_rate)
    for source, folder, pattern in EVALUATION_RECORDINGS:
        paths = sorted(folder.rglob(pattern)) if folder.is_dir() else []
        for path in paths[::every]:
            if path.suffix == ".raw":
                if path.name.startswith(CODEC2_NOT_SPEECH):
                    continue
                mono, rate = np.fromfile(path, "<i2").astype(np.float32) / 32768.0, CODEC2_RATE
            else:
                try:
                    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
                except (RuntimeError, soundfile.LibsndfileError):
                    continue
                mono = samples.mean(axis=1)
            if rate != sample_rate:
                mono = soxr.resample(mono, rate, sample_rate)
            yield source, np.ascontiguousarray(mono, np.float32)
