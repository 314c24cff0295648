"""Calibrated confidence and the intent decision, on phrase scores (the recogniser's part is in test_asr.py)."""

from __future__ import annotations

import json
import math
import random

import pytest

from cloud_worker.calibration import OTHER, Calibration, Sample, act_floor, fit, reliability
from cloud_worker.intents import IntentDecider
from cloud_worker.transcript import PhraseScores, Transcript
from schemas.vocabulary import load_vocabulary

VOCABULARY = load_vocabulary()


def heard(commands: dict[str, float], other: float, text: str = "") -> Transcript:
    return Transcript(text, (), "test", PhraseScores(commands, other, None))


def test_the_posterior_sums_to_one_and_follows_the_scores() -> None:
    calibration = Calibration(temperature=1.0, other_bias=0.0)
    posterior = calibration.posterior(
        PhraseScores({"stop": math.log(0.6), "start": math.log(0.2)}, math.log(0.2), None)
    )
    assert sum(posterior.values()) == pytest.approx(1.0)
    assert posterior["stop"] == pytest.approx(0.6) and posterior[OTHER] == pytest.approx(0.2)


def test_the_bias_and_temperature_move_the_posterior() -> None:
    scores = PhraseScores({"stop": -1.0}, -1.0, None)
    assert Calibration(1.0, 0.0).posterior(scores)["stop"] == pytest.approx(0.5)
    assert Calibration(1.0, -2.0).posterior(scores)["stop"] > 0.85
    sharper = Calibration(0.5, 0.0).posterior(PhraseScores({"stop": -1.0}, -2.0, None))["stop"]
    assert sharper > Calibration(1.0, 0.0).posterior(PhraseScores({"stop": -1.0}, -2.0, None))["stop"]


def test_nothing_scored_is_something_else_for_sure() -> None:
    assert Calibration(1.0, 0.0).posterior(PhraseScores({}, 0.0, None)) == {OTHER: 1.0}
    assert Calibration(1.0, 0.0).posterior(PhraseScores({}, -math.inf, None)) == {OTHER: 1.0}


def test_the_decider_names_a_likely_command_with_its_slots() -> None:
    decider = IntentDecider(VOCABULARY, Calibration(1.0, 0.0))
    match = decider.decide(heard({"digit[value=7]": -0.1, "digit[value=1]": -4.0}, -5.0, "Seven."))
    assert (match.intent, dict(match.slots)) == ("digit", {"value": 7})
    assert 0.9 < match.score < 1.0 and match.phrase == "seven"


def test_the_decider_names_no_intent_when_something_else_is_likelier() -> None:
    decider = IntentDecider(VOCABULARY, Calibration(1.0, 0.0))
    match = decider.decide(heard({"digit[value=3]": -3.0}, -0.2, "Tree."))
    assert match.intent is None and match.slots == {}
    assert match.score > 0.9  # how sure it is that no command was said


def test_the_decider_names_no_intent_under_the_answer_floor() -> None:
    decider = IntentDecider(VOCABULARY, Calibration(1.0, 0.0))
    match = decider.decide(heard({"stop": -1.0, "start": -1.1}, -1.2))
    assert match.intent is None
    assert match.score == pytest.approx(math.exp(-1.2) / (math.exp(-1.0) + math.exp(-1.1) + math.exp(-1.2)), abs=1e-3)


def test_a_transcript_without_scores_gets_no_intent() -> None:
    match = IntentDecider(VOCABULARY, Calibration(1.0, 0.0)).decide(Transcript("Stop.", (), "stored"))
    assert match.intent is None and match.score == 0.0


def test_fit_finds_a_bias_that_separates_commands_from_other_speech() -> None:
    """Commands whose phrase scores sit under "something else" need a negative bias; the fit finds it."""
    rng = random.Random(3)
    samples = []
    for _ in range(200):
        samples.append(Sample(PhraseScores({"stop": -2.0 + rng.gauss(0, 0.3), "start": -6.0}, -1.0, None), "stop"))
        samples.append(Sample(PhraseScores({"stop": -6.0 + rng.gauss(0, 0.3), "start": -7.0}, -0.5, None), OTHER))
    calibration = fit(samples, fitted_on="test")
    assert calibration.other_bias < -1.0
    posterior = calibration.posterior(samples[0].scores)
    assert max(posterior, key=posterior.get) == "stop"
    assert max(calibration.posterior(samples[1].scores).items(), key=lambda e: e[1])[0] == OTHER
    assert calibration.fitted_on == "test"


def test_fit_needs_commands() -> None:
    with pytest.raises(ValueError, match="recordings of commands"):
        fit([Sample(PhraseScores({}, 0.0, None), OTHER)])


def test_the_act_floor_is_the_least_confidence_that_keeps_the_precision() -> None:
    predictions = [(0.99, True)] * 300 + [(0.95, False)] + [(0.9, True)] * 100 + [(0.6, False)] * 5
    assert act_floor(predictions, 0.995) == 0.9
    assert act_floor(predictions, 0.999) == 0.99
    assert act_floor([(0.7, False)], 0.995) is None


def test_a_reliability_table_bins_by_confidence() -> None:
    table = reliability([(0.95, True), (0.92, False), (0.55, True)], bins=10)
    assert [row["count"] for row in table] == [1, 2]
    assert table[1]["right"] == 0.5 and table[1]["mean_confidence"] == pytest.approx(0.935)


def test_the_shipped_calibration_loads_and_says_what_it_was_fitted_on() -> None:
    shipped = Calibration.load()
    assert "FSDD" in shipped.fitted_on and "held out" in shipped.fitted_on
    assert shipped.answer_floor <= shipped.act_floor <= 1.0


def test_a_device_acts_from_the_shipped_calibrations_floor() -> None:
    """The device's default floor is the calibration's act_floor rounded up to two decimals, never under it."""
    from device.settings import CLOUD_MIN_CONFIDENCE

    assert math.ceil(Calibration.load().act_floor * 100) / 100 == CLOUD_MIN_CONFIDENCE


@pytest.mark.parametrize(
    ("content", "problem"),
    [("{", "Expecting"), ('{"temperature": 1.0}', "other_bias"), ('{"temperature": 0.0, "other_bias": 0}', "temp")],
)
def test_a_bad_calibration_file_is_refused_naming_it(tmp_path, content: str, problem: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as raised:
        Calibration.load(path)
    assert str(path) in str(raised.value)


def test_a_calibration_survives_saving(tmp_path) -> None:
    calibration = Calibration(0.8, -3.5, act_floor=0.97, fitted_on="x")
    calibration.save(tmp_path / "c.json")
    assert Calibration.load(tmp_path / "c.json") == calibration
    assert json.loads((tmp_path / "c.json").read_text())["other_bias"] == -3.5
