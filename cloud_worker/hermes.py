"""A final result as the MQTT messages Rhasspy 2.5 published, for flows written against its Hermes topics.

One mqvox result stands for one wake and the utterance after it, so it becomes what a Rhasspy 2.5 site
published for that: ``hermes/hotword/<wakewordId>/detected``, then ``hermes/asr/textCaptured`` (only when the
result has a transcript: an edge result has none), then either ``hermes/intent/<intentName>`` or
``hermes/nlu/intentNotRecognized``. The payloads carry every key Rhasspy's own ``rhasspyhermes`` dataclasses
write, nulls included, in camelCase; tests/test_hermes.py reads them back with those dataclasses.

The mapping, field by field:

- ``siteId`` is the device id, ``sessionId`` the utterance id (Rhasspy's dialogue session is one wake and what
  followed it, as an utterance is here).
- ``hermes/intent/<intentName>`` only for a result the device **acted** on. A result that names an intent the
  device did not act on (a deferred cloud answer, which mqvox never obeys late) is published as
  ``intentNotRecognized``, because Rhasspy flows act on every ``hermes/intent`` message they receive.
- ``input`` is the phrase the command was said with, as Rhasspy's NLU wrote it: slot words replaced by their
  values ("7" for "seven"), and ``rawInput`` the words themselves. The phrase is the transcript when it is one
  of the command's phrases; otherwise (an edge result, or Whisper wrote something else and the phrase scores
  decided) the command's canonical phrase.
- Each slot: ``entity`` and ``slotName`` the slot's name, ``rawValue`` its words, ``value`` ``{"kind":
  "Number", "value": 7}`` for an integer slot and ``{"kind": "Unknown", "value": "..."}`` otherwise, as
  rhasspy-nlu did; ``range`` the slot's characters in ``input`` (``start``, ``end``) and in ``rawInput``
  (``rawStart``, ``rawEnd``). Its ``confidence`` is the result's (Rhasspy wrote 1.0 for every exact match).
- ``intent.confidenceScore`` and textCaptured's ``likelihood`` are the result's confidence: mqvox carries no
  separate transcript likelihood. ``seconds`` is the cloud's recognition time (``timings_ms["asr"]``), or the
  result's total when it has none.
- The wake word id is the vocabulary's wake phrase with ``_`` for spaces (``hey_jarvis``), also the
  ``modelId``; ``modelType`` is ``universal`` (one model for every speaker).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from common.text_matching import normalize_transcript
from schemas.result import Result, SlotValue
from schemas.vocabulary import Command, Vocabulary

_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def hermes_messages(result: Result, vocabulary: Vocabulary) -> list[tuple[str, bytes]]:
    """The (topic, JSON payload) pairs a Rhasspy 2.5 site published for this result, in the order it did."""
    wakeword_id = wake_word_id(vocabulary)
    messages = [(f"hermes/hotword/{wakeword_id}/detected", _hotword_detected(result, wakeword_id))]
    if result.transcript:
        messages.append(("hermes/asr/textCaptured", _text_captured(result, wakeword_id)))
    command = _command_of(result, vocabulary) if result.acted else None
    if command is None:
        messages.append(("hermes/nlu/intentNotRecognized", _intent_not_recognized(result)))
    else:
        messages.append((f"hermes/intent/{command.intent}", _intent(result, command, vocabulary, wakeword_id)))
    return [(topic, json.dumps(payload, ensure_ascii=False).encode("utf-8")) for topic, payload in messages]


def wake_word_id(vocabulary: Vocabulary) -> str:
    """The wake phrase as a topic level: 'hey jarvis' -> 'hey_jarvis'."""
    return _TOPIC_UNSAFE.sub("_", vocabulary.wake_phrase.strip()) or "wake"


def _hotword_detected(result: Result, wakeword_id: str) -> dict[str, Any]:
    return {
        "modelId": wakeword_id,
        "modelVersion": "",
        "modelType": "universal",
        "currentSensitivity": 1.0,
        "siteId": result.device_id,
        "sessionId": result.utterance_id,
        "sendAudioCaptured": None,
        "lang": None,
        "customEntities": None,
    }


def _text_captured(result: Result, wakeword_id: str) -> dict[str, Any]:
    text = result.transcript or ""
    return {
        "text": text,
        "likelihood": result.confidence,
        "seconds": result.timings_ms.get("asr", result.timings_ms["total"]) / 1000.0,
        "siteId": result.device_id,
        "sessionId": result.utterance_id,
        "wakewordId": wakeword_id,
        "asrTokens": [_tokens(text)] if text else None,
        "lang": None,
    }


def _intent_not_recognized(result: Result) -> dict[str, Any]:
    return {
        "input": result.transcript or "",
        "siteId": result.device_id,
        "id": None,
        "customData": None,
        "sessionId": result.utterance_id,
    }


def _intent(result: Result, command: Command, vocabulary: Vocabulary, wakeword_id: str) -> dict[str, Any]:
    raw_input = _spoken_phrase(result, command)
    spans = _slot_spans(command, raw_input, vocabulary)
    # Rhasspy's input has each slot's words replaced by its value; rawInput keeps the words.
    pieces, slots, raw_cursor, length = [], [], 0, 0
    for name, (raw_start, raw_end) in sorted(spans.items(), key=lambda item: item[1]):
        value = command.slots[name]
        pieces.append(raw_input[raw_cursor:raw_start])
        length += raw_start - raw_cursor
        written = str(value)
        slots.append(
            {
                "entity": name,
                "value": _slot_value(value),
                "slotName": name,
                "rawValue": raw_input[raw_start:raw_end],
                "confidence": result.confidence,
                "range": {"start": length, "end": length + len(written), "rawStart": raw_start, "rawEnd": raw_end},
            }
        )
        pieces.append(written)
        length += len(written)
        raw_cursor = raw_end
    text = "".join([*pieces, raw_input[raw_cursor:]])
    return {
        "input": text,
        "intent": {"intentName": command.intent, "confidenceScore": result.confidence},
        "siteId": result.device_id,
        "id": None,
        "slots": slots,
        "sessionId": result.utterance_id,
        "customData": None,
        "asrTokens": [_tokens(text)],
        "asrConfidence": None,
        "rawInput": raw_input,
        "wakewordId": wakeword_id,
        "lang": None,
    }


def _slot_value(value: SlotValue) -> dict[str, Any]:
    """rhasspy-nlu's value of a slot: a number's kind is Number, any other value's Unknown."""
    return {"kind": "Number" if isinstance(value, int) else "Unknown", "value": value}


def _tokens(text: str) -> list[dict[str, Any]]:
    """Rhasspy's asrTokens of one transcription: each space-separated word with its character range."""
    tokens, start = [], 0
    for word in text.split(" "):
        if word:
            tokens.append(
                {"value": word, "confidence": 1.0, "rangeStart": start, "rangeEnd": start + len(word), "time": None}
            )
        start += len(word) + 1
    return tokens


def _command_of(result: Result, vocabulary: Vocabulary) -> Command | None:
    """The vocabulary command the result names (intent and slot values), or None."""
    return None if result.intent is None else vocabulary.command_for(result.intent, result.slots)


def _spoken_phrase(result: Result, command: Command) -> str:
    """The transcript when it says one of the command's phrases, else the command's canonical phrase."""
    heard = normalize_transcript(result.transcript) if result.transcript else ""
    return heard if heard in command.phrases else command.phrases[0]


def _slot_spans(command: Command, phrase: str, vocabulary: Vocabulary) -> dict[str, tuple[int, int]]:
    """Where each slot's words are in ``phrase`` (character start and end), found by comparing the phrase with
    those of the commands that differ from this one in that slot alone: what they do not share is the slot.

    A slot with a single value, which nothing differs from, spans the whole phrase.
    """
    words = phrase.split(" ")
    spans = {}
    for name in command.slots:
        others = [
            other.phrases
            for other in vocabulary.commands
            if other.intent == command.intent and _differs_only_in(other.slots, command.slots, name)
        ]
        first, last = 0, len(words)
        for candidate in (phrase.split(" ") for phrases in others for phrase in phrases):
            # The alignment that leaves the fewest words different is the phrase written from the same template;
            # at least one word is the slot's.
            prefix = min(_shared_prefix(words, candidate), len(words) - 1)
            suffix = min(_shared_prefix(words[::-1], candidate[::-1]), len(words) - 1 - prefix)
            if len(words) - prefix - suffix < last - first:
                first, last = prefix, len(words) - suffix
        start = sum(len(word) + 1 for word in words[:first])
        spans[name] = (start, start + len(" ".join(words[first:last])))
    return spans


def _differs_only_in(slots: Mapping[str, SlotValue], others: Mapping[str, SlotValue], name: str) -> bool:
    return (
        slots.keys() == others.keys()
        and slots[name] != others[name]
        and all(slots[key] == others[key] for key in slots if key != name)
    )


def _shared_prefix(first: list[str], second: list[str]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        count += 1
    return count
