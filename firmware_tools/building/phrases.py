"""What training says: the vocabulary's phrases, and the negatives a model must learn to reject.

The positives come from the vocabulary file only. The negatives are written here:
phrases that sound like the wake phrase or a command, everyday words, and
sentences. Evaluation reads other text (see :mod:`firmware_tools.building.heldout`).
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas.vocabulary import Vocabulary

WAKE_LABEL = "wake"
"""Model class of the wake phrase."""
UNKNOWN_LABEL = "_unknown_"
"""Model class of speech that is neither the wake phrase nor exactly one command."""
SILENCE_LABEL = "_silence_"
"""Model class of silence and noise without speech."""


@dataclass(frozen=True)
class Phrase:
    """A text to render, and the class a clip of it alone belongs to."""

    text: str
    """What is said."""
    label: str
    """Class of a clip holding exactly this phrase."""


def model_labels(vocabulary: Vocabulary) -> tuple[str, ...]:
    """Output classes of the model, in output order."""
    return (SILENCE_LABEL, UNKNOWN_LABEL, WAKE_LABEL, *vocabulary.labels)


def positive_phrases(vocabulary: Vocabulary) -> tuple[Phrase, ...]:
    """The wake phrase and every phrase of every command."""
    wake = Phrase(vocabulary.wake_phrase, WAKE_LABEL)
    return (wake, *(Phrase(text, command.label) for command in vocabulary.commands for text in command.phrases))


CONFUSABLES = (
    # Near the wake phrase.
    "hey travis", "hey jarvas", "hey java", "hey harvest", "hey marvin", "hey darvis", "a jar", "hey jar",
    "jarvis", "hey", "hey there", "hey jack", "hey davis", "hey service", "say jarvis", "hey garlic",
    # Near commands, or containing them.
    "lights out", "lights", "light on", "flights on", "nights off", "go", "one more", "someone", "none",
    "tonight", "too", "for", "ate", "forty", "sixteen", "seventy", "nineteen", "eleven", "twenty", "hundred",
    "start over", "stop it", "go left", "go right", "turn it on", "turn on", "turn around", "step back",
    "go faster", "slow motion", "speed dial", "yes please", "no thanks", "oh no", "cancelled", "cancer",
    "forward", "backward", "left", "right", "turn", "speed", "slow", "yesterday", "nobody", "upstairs",
    "stopped", "starting", "stock", "star", "yeah", "nope", "the lights", "all lights", "lights on high",
)  # fmt: skip

EVERYDAY_WORDS = (
    "hello", "thanks", "okay", "maybe", "water", "kitchen", "window", "door", "garage", "music", "volume",
    "weather", "tomorrow", "today", "morning", "evening", "coffee", "dinner", "table", "chair", "printer",
    "machine", "conveyor", "pressure", "valve", "pump", "motor", "sensor", "alarm", "battery", "charger",
    "message", "phone", "camera", "picture", "station", "system", "program", "number", "letter", "paper",
    "yellow", "green", "blue", "purple", "orange", "banana", "apple", "pizza", "chicken", "garden", "flower",
    "river", "mountain", "ocean", "summer", "winter", "autumn", "holiday", "birthday", "party", "family",
    "friend", "teacher", "doctor", "engineer", "manager", "question", "answer", "problem", "solution",
    "quickly", "slowly", "always", "never", "sometimes", "really", "actually", "probably", "certainly",
    "because", "although", "between", "against", "without", "around", "through", "before", "after",
    "open", "close", "play", "pause", "repeat", "louder", "quieter", "brighter", "darker", "warmer",
    "colder", "higher", "lower", "bigger", "smaller", "happy", "tired", "hungry", "ready", "finished",
    "remember", "forget", "listen", "watch", "wait", "hurry", "follow", "explain", "calculate", "measure",
)  # fmt: skip

SENTENCES = (
    "what is the weather like tomorrow",
    "open the garage door please",
    "set a timer for ten minutes",
    "play some music in the kitchen",
    "how much pressure is in the tank",
    "remind me to call my mother",
    "the conveyor belt has stopped again",
    "can you turn the volume down a little",
    "i would like a cup of coffee",
    "check the temperature of the second oven",
    "where did i leave my keys",
    "the printer on the third floor is broken",
    "we need more paper in the office",
    "what time does the shift end today",
    "please send the report to the manager",
    "it looks like rain this afternoon",
    "the meeting was moved to thursday",
    "lock the front door before you leave",
    "how many parts did we make this morning",
    "close the window in the bedroom",
    "the battery is almost empty",
    "i think the pump needs maintenance",
    "tell me a joke about robots",
    "is the dishwasher finished yet",
    "my flight leaves early on monday",
    "the children are playing in the garden",
    "read me the latest news headlines",
    "add milk and bread to the shopping list",
    "the alarm went off in the warehouse",
    "how far is it to the nearest station",
    "dim the lamp in the living room",
    "switch the fan to its highest setting",
    "who won the football game last night",
    "the valve on line four is leaking",
    "start the washing machine at midnight",
    "turn the heating up by two degrees",
    "what is on my calendar for today",
    "order a new filter for the air purifier",
    "the delivery truck is waiting outside",
    "record the output of machine number six",
)

CONTEXT_WORDS = ("please", "now", "okay", "and", "then", "so", "um", "uh", "the", "now please", "right now", "again")
"""Short neighbours put before or after a phrase, so a command inside other speech is not taken for the command."""


def negative_phrases() -> tuple[Phrase, ...]:
    """Every negative text, each labelled unknown."""
    texts = dict.fromkeys((*CONFUSABLES, *EVERYDAY_WORDS, *SENTENCES, *CONTEXT_WORDS))
    return tuple(Phrase(text, UNKNOWN_LABEL) for text in texts)
