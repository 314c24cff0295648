"""From text to a vocabulary command: exact phrases first, then a fuzzy word-level match.

``IntentMatcher`` reads text that comes without audio: the training tools use it to
know exactly which voice lines say a command (firmware_tools/building/real_speech.py),
and bench/real_commands.py compares it with the cloud's decision. On audio the cloud
decides otherwise (cloud_worker/intents.py): matching text made commands of near
misses ("Right." became 8, "Tree." 3).

Whisper writes numbers as digits ("Go forward 10.", "7", "3rd", "1,000") while the
vocabulary spells them ("seven"), so transcripts and phrases are both normalized
with numbers spelled out before they are compared. Needs num2words (the cloud and
train extras); the device never imports this module.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Self

from num2words import num2words

from schemas.result import SlotValue
from schemas.vocabulary import Command, Vocabulary, normalize

DEFAULT_THRESHOLD = 0.8
"""Least similarity in [0, 1] a fuzzy match needs (one wrong word in five, or one letter in a short word)."""
DEFAULT_MARGIN = 0.05
"""Two different commands whose similarities are closer than this make a fuzzy match ambiguous."""
MAX_FUZZY_CHARS = 200
"""Transcripts longer than this (characters, after normalizing and stripping) get no fuzzy match.

Commands are a few words; this bounds the work on any input, however long.
"""
MAX_SPELLED_DIGITS = 15
"""Longer runs of digits, and runs with a leading zero ("007"), are spelled digit by digit."""
FILLERS = (("please",), ("can", "you"), ("could", "you"), ("would", "you"), ("now",), ("ok",), ("okay",))
"""Polite words dropped at either edge of a transcript, as word sequences."""

# Substituted words less alike than this (difflib ratio of their letters) count as wholly different.
_WORD_FLOOR = 0.5
# "1,000" or "12", then an optional decimal part and ordinal suffix ("3rd").
_NUMBER = re.compile(r"([0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.([0-9]+))?(?:(st|nd|rd|th)(?![a-z]))?")
_DIGIT_WORDS = tuple(num2words(digit) for digit in range(10))
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'"})


def spell_numbers(text: str) -> str:
    """``text`` with every number in digits spelled in English words: "10" -> "ten", "3rd" -> "third".

    Thousands separators are read ("1,000" -> "one thousand"), decimals say "point"
    and their digits one by one, and a sign is left as it is (it is punctuation).
    """
    return _NUMBER.sub(_spell, text)


def _spell(number: re.Match[str]) -> str:
    whole, decimals, ordinal = number.groups()
    digits = whole.replace(",", "")
    if len(digits) > MAX_SPELLED_DIGITS or (len(digits) > 1 and digits[0] == "0"):
        words = " ".join(_DIGIT_WORDS[int(digit)] for digit in digits)
    else:
        words = num2words(int(digits), to="ordinal" if ordinal and not decimals else "cardinal")
    if decimals:
        words += " point " + " ".join(_DIGIT_WORDS[int(digit)] for digit in decimals)
    return f" {words} "


def normalize_transcript(text: str) -> str:
    """How transcripts and phrases are compared: numbers spelled, accents dropped, then ``vocabulary.normalize``.

    "Go forward 10." -> "go forward ten"; "Twenty-one" and "21" -> "twenty one".
    """
    decomposed = unicodedata.normalize("NFKD", text)
    folded = "".join(char for char in decomposed if not unicodedata.combining(char)).casefold()
    return normalize(spell_numbers(folded.translate(_APOSTROPHES)))


@dataclass(frozen=True)
class IntentMatch:
    """What a transcript means in the vocabulary, and how sure the match is."""

    intent: str | None
    """Intent name, or None when the transcript is outside the vocabulary or ambiguous."""
    slots: Mapping[str, SlotValue]
    """Slot values of the matched command (integer slots as ints); empty without an intent."""
    score: float
    """How well the transcript matched, in [0, 1]: 1.0 for an exact phrase, 0.0 without an intent."""
    phrase: str | None
    """The vocabulary phrase matched (normalized), or None without an intent."""
    text: str
    """The normalized transcript, wake phrase and fillers included."""

    @classmethod
    def nothing(cls, text: str) -> Self:
        """No intent: outside the vocabulary, ambiguous, or empty."""
        return cls(intent=None, slots={}, score=0.0, phrase=None, text=text)

    def confidence(self, transcript_confidence: float) -> float:
        """A result's confidence: how sure the words are times how well they match the intent; without an
        intent, how sure the words are. Rounded, in [0, 1]."""
        combined = transcript_confidence * self.score if self.intent is not None else transcript_confidence
        return round(min(max(combined, 0.0), 1.0), 4)


class IntentMatcher:
    """Maps transcripts onto a vocabulary's commands. ``match()`` never raises.

    ``threshold`` is the least fuzzy similarity accepted, ``margin`` how close two
    different commands may score before the match is ambiguous.
    """

    def __init__(
        self, vocabulary: Vocabulary, threshold: float = DEFAULT_THRESHOLD, margin: float = DEFAULT_MARGIN
    ) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        if margin < 0.0:
            raise ValueError(f"margin must not be negative, not {margin}")
        self.vocabulary = vocabulary
        self.threshold = threshold
        self.margin = margin
        self._wake = tuple(normalize_transcript(vocabulary.wake_phrase).split())
        self._phrases: dict[str, list[Command]] = {}
        for command in vocabulary.commands:
            for phrase in command.phrases:
                self._phrases.setdefault(normalize_transcript(phrase), []).append(command)

    def match(self, transcript: str) -> IntentMatch:
        """The command ``transcript`` says: an exact phrase (score 1.0), else the best fuzzy match, else none."""
        text = normalize_transcript(transcript)
        core = self._strip(text.split())
        for candidate in dict.fromkeys((text, core)):
            if candidate in self._phrases:
                return self._decide([(1.0, candidate, command) for command in self._phrases[candidate]], text)
        if not core or len(core) > MAX_FUZZY_CHARS:
            return IntentMatch.nothing(text)
        words = tuple(core.split())
        scored = []
        for phrase, commands in self._phrases.items():
            score = _similarity(words, tuple(phrase.split()), self.threshold - self.margin)
            scored.extend((score, phrase, command) for command in commands)
        return self._decide(scored, text)

    def _decide(self, scored: list[tuple[float, str, Command]], text: str) -> IntentMatch:
        """The best command when it reaches the threshold and no other command comes within the margin."""
        best: dict[str, tuple[float, str, Command]] = {}
        for score, phrase, command in scored:
            if command.label not in best or score > best[command.label][0]:
                best[command.label] = (score, phrase, command)
        ranked = sorted(best.values(), key=lambda entry: entry[0], reverse=True)
        if not ranked or ranked[0][0] < self.threshold:
            return IntentMatch.nothing(text)
        if len(ranked) > 1 and ranked[0][0] - ranked[1][0] < self.margin:
            return IntentMatch.nothing(text)
        score, phrase, command = ranked[0]
        return IntentMatch(intent=command.intent, slots=dict(command.slots), score=score, phrase=phrase, text=text)

    def _strip(self, words: list[str]) -> str:
        """The words without a leading wake phrase (or its last word) and without fillers at either edge."""
        start, end = 0, len(words)
        leading = [prefix for prefix in (self._wake, self._wake[-1:]) if prefix]
        changed = True
        while changed and start < end:
            changed = False
            for prefix in (*leading, *FILLERS):
                if start + len(prefix) <= end and tuple(words[start : start + len(prefix)]) == prefix:
                    start += len(prefix)
                    changed = True
            for suffix in FILLERS:
                if end - len(suffix) >= start and tuple(words[end - len(suffix) : end]) == suffix:
                    end -= len(suffix)
                    changed = True
        return " ".join(words[start:end])


def _similarity(said: tuple[str, ...], phrase: tuple[str, ...], floor: float) -> float:
    """1 - word edit distance / longer length, where a substitution costs 1 - how alike the two words are.

    Returns 0.0 at once when the lengths alone keep it below ``floor`` (it is at most shorter / longer).
    """
    if min(len(said), len(phrase)) < floor * max(len(said), len(phrase)):
        return 0.0
    previous = [float(j) for j in range(len(phrase) + 1)]
    for i, word in enumerate(said, 1):
        current = [float(i)]
        for j, other in enumerate(phrase, 1):
            current.append(
                min(previous[j] + 1.0, current[j - 1] + 1.0, previous[j - 1] + 1.0 - _word_similarity(word, other))
            )
        previous = current
    return max(0.0, 1.0 - previous[-1] / max(len(said), len(phrase)))


@lru_cache(maxsize=4096)
def _word_similarity(word: str, other: str) -> float:
    """How alike two words' letters are in [0, 1] (difflib ratio), 0.0 below ``_WORD_FLOOR``."""
    if word == other:
        return 1.0
    ratio = SequenceMatcher(None, word, other).ratio()
    return ratio if ratio >= _WORD_FLOOR else 0.0
