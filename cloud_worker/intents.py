"""From what Whisper heard to an intent and its slots.

The cloud decides by ``IntentDecider``: each vocabulary phrase scored against the audio
(cloud_worker/asr.py), turned into calibrated probabilities (cloud_worker/calibration.py).
Matching the text of a transcript (``common.text_matching.IntentMatcher``: exact
vocabulary phrases first, then a fuzzy word-level match) is not used on audio: it made
commands of near misses ("Right." became 8, "Tree." 3).
"""

from __future__ import annotations

from cloud_worker.calibration import OTHER, Calibration
from cloud_worker.transcript import Transcript
from common.text_matching import IntentMatch, normalize_transcript
from schemas.vocabulary import Vocabulary


class IntentDecider:
    """An intent and a calibrated confidence from a transcript's phrase scores. ``decide()`` never raises.

    The answer names the likeliest command when its probability reaches the calibration's ``answer_floor``;
    otherwise no intent. Its ``score`` is the probability that the answer is right: of the command it names,
    or, without an intent, that no command of the vocabulary was said.
    """

    def __init__(self, vocabulary: Vocabulary, calibration: Calibration) -> None:
        self.vocabulary = vocabulary
        self.calibration = calibration
        self._commands = {command.label: command for command in vocabulary.commands}

    def decide(self, transcript: Transcript) -> IntentMatch:
        text = normalize_transcript(transcript.text)
        if transcript.phrases is None:
            return IntentMatch.nothing(text)
        posterior = self.calibration.posterior(transcript.phrases)
        label, probability = max(posterior.items(), key=lambda entry: entry[1])
        command = self._commands.get(label)
        if command is None or probability < self.calibration.answer_floor:
            return IntentMatch(intent=None, slots={}, score=round(posterior.get(OTHER, 0.0), 4), phrase=None, text=text)
        return IntentMatch(
            intent=command.intent,
            slots=dict(command.slots),
            score=round(probability, 4),
            phrase=command.phrases[0],
            text=text,
        )
