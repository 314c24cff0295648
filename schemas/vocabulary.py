"""The vocabulary: wake phrase, intents, their phrases and slot values, from vocabulary.toml.

Training, the device's labels and the cloud's intent mapping all come from here.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from schemas.errors import ErrorCode, ProtocolError
from schemas.result import SlotValue
from schemas.validation import validate

_SLOT = re.compile(r"\{([a-z][a-z0-9_]*)\}")
_NOT_WORD = re.compile(r"[^a-z0-9' ]+")


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: how phrases are compared."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


@dataclass(frozen=True)
class Command:
    """One thing the device can recognise: an intent with fixed slot values, and every way to say it."""

    intent: str
    """Intent name."""
    slots: Mapping[str, SlotValue]
    """Slot values this command fixes (empty for intents without slots)."""
    phrases: tuple[str, ...]
    """Every phrase that says it; the first is canonical."""

    @property
    def label(self) -> str:
        """Stable class name for models: ``lights_on``, ``digit[value=7]``."""
        if not self.slots:
            return self.intent
        return f"{self.intent}[{','.join(f'{k}={v}' for k, v in sorted(self.slots.items()))}]"


@dataclass(frozen=True)
class Vocabulary:
    """What mqvox listens for."""

    wake_phrase: str
    """The wake phrase, e.g. 'hey jarvis'."""
    commands: tuple[Command, ...]
    """Every command, in file order, slot values expanded."""

    @property
    def intents(self) -> tuple[str, ...]:
        """Intent names, in file order."""
        return tuple(dict.fromkeys(command.intent for command in self.commands))

    @property
    def labels(self) -> tuple[str, ...]:
        """Command labels, in file order: the classes a command model is trained on."""
        return tuple(command.label for command in self.commands)

    def __post_init__(self) -> None:
        by_phrase = {phrase: command for command in self.commands for phrase in command.phrases}
        object.__setattr__(self, "_by_phrase", by_phrase)

    def match(self, text: str) -> Command | None:
        """The command whose phrase is exactly ``text`` once normalized, or None."""
        return self._by_phrase.get(normalize(text))

    def command_for(self, intent: str, slots: Mapping[str, SlotValue]) -> Command | None:
        """The command of ``intent`` with exactly these slot values (a result's or an answer's), or None."""
        return next(
            (command for command in self.commands if command.intent == intent and dict(command.slots) == dict(slots)),
            None,
        )


DEFAULT_PATH = "vocabulary.toml"


def vocabulary_sha256(path: str | Path | None = None) -> str:
    """SHA-256 of a vocabulary file (default: the shipped one), recorded with every model trained on it."""
    data = Path(path).read_bytes() if path else resources.files("schemas").joinpath(DEFAULT_PATH).read_bytes()
    return hashlib.sha256(data).hexdigest()


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Read and check a vocabulary file; the default is the one shipped in this package.

    Raises ProtocolError for a file that breaks json/vocabulary.schema.json, refers
    to an undefined slot, or gives one phrase to two commands.
    """
    if path is None:
        text = resources.files("schemas").joinpath(DEFAULT_PATH).read_text(encoding="utf-8")
        where = f"schemas/{DEFAULT_PATH}"
    else:
        text = Path(path).read_text(encoding="utf-8")
        where = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ProtocolError(ErrorCode.SCHEMA_VIOLATION, f"vocabulary {where}", str(error)) from None
    validate("vocabulary", data)
    commands: list[Command] = []
    for intent, spec in data["intents"].items():
        commands.extend(_expand(intent, spec, where))
    seen: dict[str, str] = {}
    for command in commands:
        for phrase in command.phrases:
            if phrase in seen and seen[phrase] != command.label:
                raise ProtocolError(
                    ErrorCode.SCHEMA_VIOLATION,
                    f"vocabulary {where}",
                    f"phrase {phrase!r} belongs to both {seen[phrase]} and {command.label}",
                )
            seen[phrase] = command.label
    return Vocabulary(wake_phrase=data["wake"]["phrase"], commands=tuple(commands))


def _expand(intent: str, spec: Mapping, where: str) -> list[Command]:
    """The commands of one intent: one per combination of slot values used by its phrases."""
    slots = spec.get("slots", {})
    used = sorted({name for phrase in spec["phrases"] for name in _SLOT.findall(phrase)})
    for name in used:
        if name not in slots:
            raise ProtocolError(
                ErrorCode.SCHEMA_VIOLATION, f"vocabulary {where}", f"intent {intent} uses undefined slot {{{name}}}"
            )
    choices = []
    for name in used:
        kind = slots[name]["type"]
        values = []
        for raw, words in slots[name]["values"].items():
            if kind == "integer" and not re.fullmatch(r"-?[0-9]+", raw):
                raise ProtocolError(
                    ErrorCode.SCHEMA_VIOLATION, f"vocabulary {where}", f"slot {name} value {raw!r} is not an integer"
                )
            values.append((int(raw) if kind == "integer" else raw, tuple(words)))
        choices.append(values)
    commands = []
    for combination in itertools.product(*choices):
        bound = dict(zip(used, combination, strict=True))
        phrases: list[str] = []
        for template in spec["phrases"]:
            word_lists = [bound[name][1] if name in bound else () for name in _SLOT.findall(template)]
            for words in itertools.product(*word_lists):
                filled = template
                for name, word in zip(_SLOT.findall(template), words, strict=True):
                    filled = filled.replace("{" + name + "}", word, 1)
                phrases.append(normalize(filled))
        commands.append(
            Command(intent=intent, slots={name: value for name, (value, _) in bound.items()}, phrases=tuple(phrases))
        )
    return commands
