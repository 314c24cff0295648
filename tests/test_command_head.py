"""How the command head is calibrated and how its training windows are cut (firmware_tools/building/command_head.py)."""

from __future__ import annotations

import numpy as np
import pytest

from firmware_tools.building.command_head import (
    SAMPLE_RATE,
    WINDOW_SAMPLES,
    fit_temperature,
    place,
    softmax,
    threshold_for_precision,
)


def test_the_threshold_is_the_lowest_that_keeps_the_decisions_above_it_precise_enough() -> None:
    confidence = np.array([0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.80, 0.70])
    right = np.array([True, True, True, False, True, True, False, False])
    # From the top: 1/1, 2/2, 3/3, 3/4, 4/5, 5/6, 5/7, 5/8.
    assert threshold_for_precision(confidence, right, 0.8) == 0.90
    assert threshold_for_precision(confidence, right, 0.99) == 0.97
    assert threshold_for_precision(confidence, np.zeros(8, bool), 0.5) == 1.0


def test_the_fitted_temperature_recovers_the_one_the_answers_were_drawn_with() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 10))
    for temperature in (0.7, 2.5):
        probabilities = softmax(logits / temperature)
        truth = np.array([rng.choice(10, p=p) for p in probabilities])
        assert fit_temperature(logits, truth) == pytest.approx(temperature, rel=0.1)


def test_a_window_holds_the_clip_centred_or_ending_where_a_trigger_sees_it() -> None:
    rng = np.random.default_rng(1)
    clip = np.ones(SAMPLE_RATE // 2, np.float32)
    for _ in range(20):
        centred = place(clip, rng, at_end=None, jitter_s=0.3)
        where = np.flatnonzero(centred)
        assert len(centred) == WINDOW_SAMPLES and len(where) == len(clip)
        assert abs((where[0] + where[-1]) / 2 - WINDOW_SAMPLES / 2) <= 0.3 * SAMPLE_RATE + 1
        ending = np.flatnonzero(place(clip, rng, at_end=(0.0, 0.35), jitter_s=0.0))
        assert WINDOW_SAMPLES - 0.35 * SAMPLE_RATE - 1 <= ending[-1] < WINDOW_SAMPLES
    # A clip longer than the window keeps its middle when centred, its end when ending the window.
    long = np.arange(3 * WINDOW_SAMPLES, dtype=np.float32)
    assert place(long, rng, at_end=None, jitter_s=0.0)[0] == WINDOW_SAMPLES
    assert place(long, rng, at_end=(0.0, 0.0), jitter_s=0.0)[-1] == long[-1]
