"""The listening pipeline on real recordings through the real model: wake, capture, denoise, decide."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from common.recording import read_recording
from device.capture import NoSpeech
from device.detector import WakeEvent
from device.pipeline import CommandEvent, ListeningPipeline
from device.settings import CaptureSettings, DenoiseMode

from .conftest import COMMAND_START_S, IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE

RATE = 16000


def listen(model, audio: np.ndarray, *, block: int = 480, denoise=DenoiseMode.UTTERANCE, skip_wake=False) -> list:
    pipeline = ListeningPipeline(model, CaptureSettings(), denoise, skip_wake=skip_wake)
    events = []
    for start in range(0, len(audio), block):
        events += pipeline.push(audio[start : start + block])
    return events + pipeline.finish()


def kinds(events: list) -> list[str]:
    return [type(event).__name__ for event in events]


@pytest.mark.parametrize("denoise", list(DenoiseMode))
def test_hey_jarvis_then_lights_on_gives_a_wake_then_an_edge_lights_on(local_model, denoise) -> None:
    events = listen(local_model, read_recording(IN_VOCABULARY_SAMPLE), denoise=denoise)
    assert kinds(events) == ["WakeEvent", "CommandEvent"], events
    wake, command = events
    assert 1.0 < wake.time_s < COMMAND_START_S  # during "jarvis"
    assert wake.score >= local_model.package.detection.wake_threshold
    assert command.local and command.intent == "lights_on" and command.slots == {}
    assert command.decision.confidence >= local_model.package.detection.command_threshold
    # The capture holds the request, not the wake phrase: it starts after the phrase's tail.
    assert command.utterance.start_s >= wake.time_s
    assert 1.0 < command.utterance.duration_s < 2.5
    assert command.time_s > COMMAND_START_S


def test_a_sentence_outside_the_vocabulary_goes_to_the_cloud(local_model) -> None:
    events = listen(local_model, read_recording(OUT_OF_VOCABULARY_SAMPLE))
    assert kinds(events) == ["WakeEvent", "CommandEvent"], events
    command = events[1]
    assert not command.local
    assert command.decision.confidence < local_model.package.detection.command_threshold
    assert command.utterance.duration_s > 2.0  # the whole sentence, for the cloud to transcribe


@pytest.mark.slow
def test_silence_and_noise_give_no_events(local_model) -> None:
    rng = np.random.default_rng(11)
    white = 0.05 * rng.standard_normal(20 * RATE)
    brown = np.cumsum(rng.standard_normal(20 * RATE))
    brown = 0.1 * brown / np.abs(brown).max()
    for audio in (np.zeros(10 * RATE), white, brown):
        for denoise in (DenoiseMode.UTTERANCE, DenoiseMode.ALWAYS):
            assert listen(local_model, audio.astype(np.float32), denoise=denoise) == []


def test_events_do_not_depend_on_the_block_size(local_model) -> None:
    audio = read_recording(IN_VOCABULARY_SAMPLE)
    outcomes = []
    for block in (160, 480, 4001, 16000):
        wake, command = listen(local_model, audio, block=block)
        outcomes.append((wake.time_s, command.intent, command.local))
    assert len(set(outcomes)) == 1, outcomes


def test_a_wake_with_nobody_speaking_after_it_gives_up(local_model) -> None:
    audio = read_recording(IN_VOCABULARY_SAMPLE)[: int(COMMAND_START_S * RATE)]
    events = listen(local_model, np.concatenate((audio, np.zeros(6 * RATE, np.float32))))
    assert kinds(events) == ["WakeEvent", "NoSpeech"], events
    assert isinstance(events[1], NoSpeech)


def test_skip_wake_classifies_each_recording_as_one_utterance(local_model) -> None:
    request = read_recording(IN_VOCABULARY_SAMPLE)[int(COMMAND_START_S * RATE) :]
    (command,) = listen(local_model, request, skip_wake=True)
    assert isinstance(command, CommandEvent)
    assert command.alternatives[0].label == "lights_on"
    # No speech at all still yields its one command event: nothing recognised, so the cloud would be asked.
    (silent,) = listen(local_model, np.zeros(2 * RATE, np.float32), skip_wake=True)
    assert silent.intent is None and not silent.local


def test_two_requests_in_a_row_are_each_heard(local_model) -> None:
    sample = read_recording(IN_VOCABULARY_SAMPLE)
    events = listen(local_model, np.concatenate((sample, sample)))
    assert kinds(events) == ["WakeEvent", "CommandEvent", "WakeEvent", "CommandEvent"], events
    assert all(event.intent == "lights_on" for event in events if isinstance(event, CommandEvent))
    assert [event.time_s for event in events if isinstance(event, WakeEvent)][1] > events[1].time_s


def _with_detection(model, **changes):
    return dataclasses.replace(
        model,
        package=dataclasses.replace(model.package, detection=dataclasses.replace(model.package.detection, **changes)),
    )


def test_the_command_head_verifies_each_first_stage_wake(local_model) -> None:
    assert local_model.head is not None and local_model.package.detection.verify_threshold > 0
    audio = read_recording(IN_VOCABULARY_SAMPLE)
    # A verifier nothing passes (just above 1: a sure head scores exactly 1.0): the first stage fires, the head
    # refuses, nothing is captured.
    runs = local_model.head.runs
    refusing = ListeningPipeline(
        _with_detection(local_model, verify_threshold=math.nextafter(1.0, 2.0)),
        CaptureSettings(),
        DenoiseMode.UTTERANCE,
    )
    events = [event for start in range(0, len(audio), 480) for event in refusing.push(audio[start : start + 480])]
    assert events + refusing.finish() == []
    assert refusing.rejected_wakes == 1 and local_model.head.runs == runs + 1
    # The shipped verifier lets the real wake phrase through.
    shipped = ListeningPipeline(local_model, CaptureSettings(), DenoiseMode.UTTERANCE)
    events = [event for start in range(0, len(audio), 480) for event in shipped.push(audio[start : start + 480])]
    assert kinds(events + shipped.finish()) == ["WakeEvent", "CommandEvent"]
    assert shipped.rejected_wakes == 0


def test_without_a_verifier_every_first_stage_wake_stands(local_model) -> None:
    events = listen(_with_detection(local_model, verify_threshold=0.0), read_recording(IN_VOCABULARY_SAMPLE))
    assert kinds(events) == ["WakeEvent", "CommandEvent"]


def test_a_recording_that_starts_with_the_wake_phrase_is_heard_at_once(local_model) -> None:
    """The stream's history starts as silence: the model runs from the first stride, not once 1.5 s have come."""
    audio = read_recording(IN_VOCABULARY_SAMPLE)[RATE // 2 :]  # "hey jarvis" from the first sample
    events = listen(local_model, audio)
    assert kinds(events) == ["WakeEvent", "CommandEvent"], events
    window_s = local_model.package.frontend.frames * local_model.package.frontend.step_s
    assert events[0].time_s < window_s
    assert events[1].intent == "lights_on"
