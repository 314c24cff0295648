"""The fleet learning loop, end to end: devices hear their users, the cloud labels, the loop retrains and rolls out.

    .venv/bin/python bench/learning_loop.py --fsdd DIR [--rounds 3] [--work-dir .cache/train/default]

What runs, all real: a Mosquitto started from broker_config/, the cloud worker
(``python -m cloud_worker serve``, faster-whisper tiny.en) in its own process with a
fresh SQLite database, simulated devices running the real device runtime and updater
(device/simulated.py) each with its own connection and state folder, and each round of
``firmware_tools/learning/learn.py`` (curate, adapt, package, gate, and the staged rollout with
its abort criteria).

**The users.** Each device is spoken to by its own user:

- three real FSDD speakers (``--users``, default george, jackson and nicolas). The
  starting model is the shipped recipe's head trained **without them** (the rest of its
  training windows as they are), joined to the shipped always-on network, with the
  shipped thresholds and temperature. Each speaker's takes 0-34 of every digit are
  spoken to the device during the loop (a third each round); takes 35-49 only measure it.
- the three held-out synthetic voices (flite and festival ``slt``, flite ``rms``; never in
  any training of the shipped model), each saying every command of the vocabulary.
  They have one rendering per phrase, so their takes are that rendering in different
  rooms and noise (10-20 dB): two draws are spoken during the loop, two others measure.
  Their figures say how a voice is learnt, not how new words of it are.
- one more device whose owner did not consent (``share_for_training`` off), spoken to by
  FSDD's theo (a speaker the starting model trained on): it must contribute nothing.

During the loop, a take is the wake phrase (a render of a training voice that wakes the
starting model), a pause, then the command, then silence: the device wakes, decides,
and asks the cloud when unsure, as in the field; a consenting device also sends a share
of the commands it decided itself (``--training-sample-share``, 0.5) for the cloud to
label (``cloud.training_sample_share``). The bench waits for each take's result on the
broker before the next.

**Measured per round** (round 0 is the starting model): on the users' measurement takes,
through the device's own pipeline with the model the devices run, the share decided
on the device (coverage) and its precision; wrong actions during the loop (a result
acted on whose command is not the one said, edge or cloud); the gate's regression sets
(firmware_tools/learning/gate.py, base against candidate: FSDD speakers who are not users,
held-out synthetic commands and other speech, false wakes on real speech, self-test);
and the wall time of each stage.

Progress goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import numpy as np
from real_voices import one_utterance

from broker_config.broker import Broker
from cloud_worker.storage import StorageSettings, Store
from common.mqtt import BrokerSettings, MqttLink
from device.audio_sources import AudioSource
from device.detector import WakeEvent
from device.local_model import load_local_model, shipped_model_directory
from device.pipeline import ListeningPipeline
from device.settings import CaptureSettings, DenoiseMode, settings_from_dict
from device.simulated import SimulatedDevice
from firmware_tools.building.clips import ClipBank
from firmware_tools.building.command_head import build_examples, train_head
from firmware_tools.building.corruptions import make_noise, mix_at_snr
from firmware_tools.building.fsdd import fsdd_clips
from firmware_tools.building.heldout import HELD_OUT_SPECS, HeldOutSettings, load_or_build
from firmware_tools.building.phrases import WAKE_LABEL, model_labels
from firmware_tools.building.recipe import load_recipe
from firmware_tools.building.train import configure_tensorflow
from firmware_tools.learning.adapt import AdaptSettings, package_adapted
from firmware_tools.learning.fleet_data import CurateSettings
from firmware_tools.learning.gate import GateSettings
from firmware_tools.learning.learn import LearnSettings, publish_and_roll_out, report, run_round
from firmware_tools.release.fleet import FleetWatch
from firmware_tools.release.publish import EVERYONE, Publisher
from firmware_tools.release.registry import ModelRegistry
from firmware_tools.release.rollout import AbortCriteria, RolloutPlan, StagePlan
from schemas.envelope import Envelope
from schemas.result import Result
from schemas.signing import generate_key_pair, load_private_key
from schemas.topics import RESULT, UTTERANCE
from schemas.vocabulary import load_vocabulary

ROOT = Path(__file__).resolve().parent.parent
RATE = 16000
BLOCK = RATE * 30 // 1000
CHANNEL = "stable"
START_VERSION = "1.1.0"
LOOP_TAKES = 35
"""An FSDD user says takes 0-34 of each digit during the loop (a third each round); takes 35-49 only measure."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the users -------------------------------------------------------------------------------------------------


class User:
    """Who speaks to one device: loop takes (heard during the rounds) and measurement takes (judge only)."""

    def __init__(self, name: str, kind: str, loop: list[tuple[str, np.ndarray]], measure: list[tuple[str, np.ndarray]]):
        self.name, self.kind, self.loop, self.measure = name, kind, loop, measure


def fsdd_user(fsdd_dir: Path, speaker: str, label_of_digit: dict[int, str]) -> User:
    clips = [clip for clip in fsdd_clips(fsdd_dir) if clip.speaker == speaker]
    loop = [(label_of_digit[c.digit], c.read(RATE)) for c in clips if c.take < LOOP_TAKES]
    measure = [(label_of_digit[c.digit], c.read(RATE)) for c in clips if c.take >= LOOP_TAKES]
    return User(f"fsdd:{speaker}", "real", loop, measure)


def synthetic_users(vocabulary, cache_dir: Path) -> list[User]:
    """The held-out voices: each renders every phrase at two or three speeds and pitches. Every variant but the
    last is spoken during the loop, the last only measures; each in two rooms and noises (10-20 dB)."""
    heldout = load_or_build(HeldOutSettings(negative_minutes=1.0), vocabulary, cache_dir)
    specs = HELD_OUT_SPECS
    rng = np.random.default_rng(4242)
    users = []
    for voice in dict.fromkeys((spec.engine, spec.voice) for spec in specs):
        mine = [index for index, spec in enumerate(specs) if (spec.engine, spec.voice) == voice]
        # The held-out commands are every phrase by every voice, phrase by phrase (firmware_tools/building/heldout.py).
        takes = {
            index: [heldout.commands[at] for at in range(index, len(heldout.commands), len(specs))] for index in mine
        }
        loop = [(label, noisy(clip, rng, heldout.babble)) for index in mine[:-1] for label, clip in takes[index]]
        measure = [(label, noisy(clip, rng, heldout.babble)) for label, clip in takes[mine[-1]] for _ in range(2)]
        users.append(User(f"synthetic:{voice[0]}-{voice[1]}", "synthetic", loop, measure))
    return users


def noisy(clip: np.ndarray, rng: np.random.Generator, babble) -> np.ndarray:
    kind = rng.choice(["white", "pink", "brown", "babble"])
    noise = make_noise(str(kind), len(clip), rng, babble_sources=babble)
    return mix_at_snr(clip, noise, float(rng.uniform(10, 20))).astype(np.float32)


# --- the starting model ----------------------------------------------------------------------------------------


def starting_model(args, recipe, vocabulary, users: list[str], out: Path) -> Path:
    """The shipped recipe's head trained without the users' speakers, joined to the shipped always-on network."""
    if (out / "manifest.json").exists() and (out / "head.keras").exists():
        return out
    configure_tensorflow(recipe.train.threads, recipe.seed)
    examples = build_examples(recipe, vocabulary, args.work_dir, args.fsdd, recipe.head)
    keep = ~np.isin(examples.groups, [f"fsdd:{speaker}" for speaker in users])
    log(f"starting head: training on {keep.sum()} windows, without {', '.join(users)}")
    model = train_head(examples, keep, len(model_labels(vocabulary)), recipe.head, recipe.seed)
    kept = replace(examples, embeddings=examples.embeddings[keep], labels=examples.labels[keep])
    package_adapted(shipped_model_directory(), model, kept, out, START_VERSION, recipe, None, recipe.seed)
    return out


def waking_phrases(work_dir: Path, model_dir: Path, count: int = 24) -> list[np.ndarray]:
    """Training voices' renders of the wake phrase that wake the starting model (first stage and verifier)."""
    bank = ClipBank(work_dir / "synth")
    model = load_local_model(model_dir)
    rng = np.random.default_rng(5)
    chosen = []
    for index in rng.permutation(bank.select(split="train", labels=[WAKE_LABEL])):
        clip = bank.audio(index)
        pipeline = ListeningPipeline(model, CaptureSettings(), DenoiseMode.UTTERANCE)
        audio = np.concatenate([np.zeros(RATE // 2, np.float32), clip, np.zeros(RATE, np.float32)])
        events = [e for start in range(0, len(audio), BLOCK) for e in pipeline.push(audio[start : start + BLOCK])]
        if any(isinstance(event, WakeEvent) for event in events):
            chosen.append(clip)
        if len(chosen) == count:
            break
    return chosen


# --- the devices hearing their users ---------------------------------------------------------------------------


class Observer:
    """Every result and utterance the devices publish, by device, as the broker delivers them."""

    def __init__(self, port: int) -> None:
        self.results: dict[str, list[Result]] = {}
        self.utterances: Counter = Counter()
        self._changed = threading.Condition()
        self.link = MqttLink(f"bench-observer-{os.getpid()}", BrokerSettings(port=port))

    def start(self) -> Observer:
        self.link.__enter__()
        self.link.subscribe(RESULT.filter(), self._on_result)
        self.link.subscribe(UTTERANCE.filter(), self._on_utterance)
        return self

    def _on_result(self, topic: str, envelope: Envelope) -> None:
        result = Result.from_wire(envelope)
        with self._changed:
            self.results.setdefault(result.device_id, []).append(result)
            self._changed.notify_all()

    def _on_utterance(self, topic: str, envelope: Envelope) -> None:
        with self._changed:
            self.utterances[topic.split("/")[-2]] += 1
            self._changed.notify_all()

    def wait_result(self, device_id: str, before: int, utterances_before: int, quiet_s: float, cloud_s: float):
        """The device's next result: waits ``quiet_s``, or ``cloud_s`` once it has asked the cloud."""
        started = time.monotonic()
        with self._changed:
            while True:
                got = self.results.get(device_id, [])
                if len(got) > before:
                    return got[before]
                limit = cloud_s if self.utterances[device_id] > utterances_before else quiet_s
                left = started + limit - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def close(self) -> None:
        self.link.__exit__(None, None, None)


class UserSource(AudioSource):
    """A quiet room with one user who, when given takes, says each one and waits for the device's answer."""

    def __init__(self, device_id: str, observer: Observer, phrases: list[np.ndarray], seed: int) -> None:
        self.device_id = device_id
        self.observer = observer
        self.phrases = phrases
        self.rng = np.random.default_rng(seed)
        self.takes: queue.Queue = queue.Queue()
        self.answers: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._waiter = futures.ThreadPoolExecutor(1, thread_name_prefix=f"user-{device_id}")
        self.silence = np.zeros(BLOCK, np.float32)

    def blocks(self) -> Iterator[np.ndarray]:
        while not self._closed.is_set():
            try:
                label, command = self.takes.get(timeout=0.2)
            except queue.Empty:
                yield self.silence
                continue
            wake = self.phrases[self.rng.integers(len(self.phrases))]
            gap = np.zeros(int(RATE * self.rng.uniform(0.2, 0.4)), np.float32)
            take = np.concatenate([np.zeros(RATE // 2, np.float32), wake, gap, command, np.zeros(RATE, np.float32)])
            before = len(self.observer.results.get(self.device_id, []))
            asked_before = self.observer.utterances[self.device_id]
            for start in range(0, len(take), BLOCK):
                yield take[start : start + BLOCK]
            answer = self._waiter.submit(self.observer.wait_result, self.device_id, before, asked_before, 1.5, 25.0)
            while not answer.done():  # the room stays quiet while the user waits
                futures.wait([answer], timeout=0.03)
                yield self.silence
            self.answers.put((label, answer.result()))

    def close(self) -> None:
        self._closed.set()
        self._waiter.shutdown(wait=False)


def hear(devices: list[tuple[SimulatedDevice, UserSource, User]], round_index: int, rounds: int) -> dict:
    """Each user says this round's share of their loop takes to their device; the results, judged."""
    vocabulary = load_vocabulary()
    label_of = {(c.intent, json.dumps(dict(c.slots), sort_keys=True)): c.label for c in vocabulary.commands}
    expected = {}
    for _device, source, user in devices:
        share = user.loop[round_index::rounds]
        expected[source.device_id] = len(share)
        for take in share:
            source.takes.put(take)
    outcome: dict = {}
    for device, source, user in devices:
        tally = Counter()
        for _ in range(expected[source.device_id]):
            label, result = source.answers.get(timeout=600)
            tally["takes"] += 1
            if result is None:
                tally["no_result"] += 1
                continue
            tally[f"source_{result.source}"] += 1
            said = label_of.get((result.intent, json.dumps(dict(result.slots), sort_keys=True)))
            if result.acted:
                tally["acted"] += 1
                tally["wrong_actions"] += said != label
        outcome[device.device_id] = {"user": user.name} | dict(tally)
    return outcome


def measure(model_dir: Path, users: list[User]) -> dict:
    """Coverage and precision on each user's measurement takes, through the device's pipeline."""
    model = load_local_model(model_dir)
    figures = {}
    totals = Counter()
    for user in users:
        decided = right = 0
        for label, audio in user.measure:
            event = one_utterance(model, audio)
            if event.local:
                decided += 1
                right += event.decision.label == label
        count = len(user.measure)
        figures[user.name] = {
            "takes": count,
            "coverage": round(decided / count, 4),
            "precision": round(right / decided, 4) if decided else None,
        }
        totals["takes"] += count
        totals["decided"] += decided
        totals["right"] += right
        totals[f"{user.kind}_takes"] += count
        totals[f"{user.kind}_decided"] += decided
        totals[f"{user.kind}_right"] += right
    figures["all_users"] = {
        "takes": totals["takes"],
        "coverage": round(totals["decided"] / totals["takes"], 4),
        "precision": round(totals["right"] / totals["decided"], 4) if totals["decided"] else None,
    }
    for kind in ("real", "synthetic"):
        if totals[f"{kind}_takes"]:
            decided = totals[f"{kind}_decided"]
            figures[f"{kind}_users"] = {
                "takes": totals[f"{kind}_takes"],
                "coverage": round(decided / totals[f"{kind}_takes"], 4),
                "precision": round(totals[f"{kind}_right"] / decided, 4) if decided else None,
            }
    return figures


# --- the loop --------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fsdd", type=Path, required=True, help="the FSDD recordings")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".cache/train/default", help="training work folder")
    parser.add_argument("--rounds", type=int, default=3, help="learning rounds (default: %(default)s)")
    parser.add_argument("--users", default="george,jackson,nicolas", help="FSDD speakers who are users")
    parser.add_argument("--bystander", default="theo", help="FSDD speaker of the device that does not consent")
    parser.add_argument("--no-synthetic", action="store_true", help="leave the held-out synthetic users out")
    parser.add_argument(
        "--training-sample-share",
        type=float,
        default=0.5,
        help="share of the commands a consenting device decides itself that it sends to be labelled (default: 0.5)",
    )
    parser.add_argument("--false-wake-every", type=int, default=1, help="every n-th false-wake recording in the gate")
    args = parser.parse_args()
    bench_started = time.monotonic()
    recipe = load_recipe("default")
    vocabulary = load_vocabulary()
    speakers = [speaker for speaker in args.users.split(",") if speaker]
    cache = ROOT / ".cache/learning_loop"
    start_dir = starting_model(args, recipe, vocabulary, speakers, cache / f"start-{'-'.join(speakers)}")
    setup_seconds = {"starting_model": round(time.monotonic() - bench_started, 1)}
    label_of_digit = {int(c.slots["value"]): c.label for c in vocabulary.commands if c.intent == "digit"}
    users = [fsdd_user(args.fsdd, speaker, label_of_digit) for speaker in speakers]
    if not args.no_synthetic:
        users += synthetic_users(vocabulary, ROOT / ".cache/heldout")
    bystander = fsdd_user(args.fsdd, args.bystander, label_of_digit)
    phrases = waking_phrases(args.work_dir, start_dir)
    log(f"{len(phrases)} wake renders of training voices wake the starting model")
    work = Path(tempfile.mkdtemp(prefix="mqvox-learning-"))
    generate_key_pair(work / "signing.key", work / "signing.pub")
    database = f"sqlite:///{work}/mqvox.sqlite3"
    summary: dict = {
        "measured_on": "users' measurement takes, never spoken to the devices nor trained on; real users are FSDD "
        "speakers the starting model never trained on, synthetic users the held-out voices",
        "users": {user.name: {"loop_takes": len(user.loop), "measurement_takes": len(user.measure)} for user in users},
        "starting_model": "the default recipe's head trained without " + ", ".join(speakers),
        "rounds": [],
    }
    with Broker(data_dir=work / "broker") as broker:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud_worker",
                "--log-level",
                "WARNING",
                "serve",
                "--port",
                str(broker.port),
                "--database",
                database,
            ],
            cwd=ROOT,
        )
        observer = Observer(broker.port).start()
        devices = []
        try:
            with (
                ModelRegistry(StorageSettings(url=database)) as registry,
                Store(StorageSettings(url=database)) as store,
                MqttLink(f"bench-operator-{os.getpid()}", BrokerSettings(port=broker.port)) as link,
            ):
                publisher = Publisher(link, registry, CHANNEL, load_private_key(work / "signing.key"))
                start = publisher.register(start_dir, notes="the bench's starting model")
                publisher.publish_manifest(start, EVERYONE)
                registry.set_live_version(CHANNEL, START_VERSION)
                everyone = [(user, True) for user in users] + [(bystander, False)]
                for index, (user, consent) in enumerate(everyone):
                    name = f"home-{index + 1:02d}"
                    settings = settings_from_dict(
                        {
                            "device_id": name,
                            "broker": {"port": broker.port},
                            "model": {"directory": str(start_dir)},
                            "cloud": {
                                "share_for_training": consent,
                                "training_sample_share": args.training_sample_share if consent else 0.0,
                                "timeout_s": 30.0,
                            },
                            "ota": {"public_key": str(work / "signing.pub"), "state_dir": str(work / name)},
                        }
                    )
                    source = UserSource(name, observer, phrases, seed=index)
                    devices.append((SimulatedDevice(settings, source=source).start(), source, user))
                watch = FleetWatch(link)
                plan = RolloutPlan(
                    stages=(StagePlan.parse("canary:home-01", 0), StagePlan.parse("fleet:100%", 1)),
                    criteria=AbortCriteria(20.0, 1),
                    stage_timeout_s=180.0,
                )
                roll_out = publish_and_roll_out(publisher, registry, watch, plan, say=log)
                learn = LearnSettings(
                    channel=CHANNEL,
                    work_dir=args.work_dir,
                    fsdd_dir=args.fsdd,
                    state_dir=work / "learn",
                    base_dir=start_dir,
                    curate=CurateSettings(),
                    adapt=AdaptSettings(exclude_fsdd_speakers=(*speakers,)),
                    gate=GateSettings(false_wake_every=args.false_wake_every, heldout_cache=ROOT / ".cache/heldout"),
                    auto_rollout=True,
                )
                live_dir = start_dir
                summary["rounds"].append({"round": 0, "version": START_VERSION, "users": measure(live_dir, users)})
                log(f"round 0: {json.dumps(summary['rounds'][-1]['users']['all_users'])}")
                for round_index in range(args.rounds):
                    started = time.monotonic()
                    heard = hear(devices, round_index, args.rounds)
                    hearing_s = round(time.monotonic() - started, 1)
                    log(f"round {round_index + 1}: heard in {hearing_s} s: {json.dumps(heard)}")
                    outcome = run_round(learn, store, registry, roll_out=roll_out, say=log)
                    versions = Counter(device.runtime.presence.model_version for device, _s, _u in devices)
                    live = registry.live_version(CHANNEL)
                    live_dir = start_dir if live == START_VERSION else learn.state_dir / "versions" / live
                    entry = {
                        "round": round_index + 1,
                        "candidate": outcome.version,
                        "outcome": outcome.outcome,
                        "live_version": live,
                        "device_versions": dict(versions),
                        "heard": heard,
                        "seconds": {"hearing": hearing_s} | outcome.seconds,
                        "round_seconds_without_hearing": round(sum(outcome.seconds.values()), 1),
                        "gate": outcome.gate.to_dict(),
                        "data": outcome.data,
                        "users": measure(live_dir, users),
                    }
                    summary["rounds"].append(entry)
                    log(f"round {round_index + 1}: {outcome.outcome}, users {json.dumps(entry['users']['all_users'])}")
                summary["report"] = report(registry, CHANNEL, cache)
                counts = store.contribution_counts()
                bystander_device = devices[-1][0].device_id
                summary["contributions_per_device"] = counts
                summary["bystander"] = {
                    "device": bystander_device,
                    "consented": False,
                    "contributions": counts.get(bystander_device, 0),
                }
        finally:
            for device, source, _user in devices:
                source.close()
                device.stop()
            observer.close()
            worker.terminate()
            worker.wait(30)
    first, last = summary["rounds"][0]["users"]["all_users"], summary["rounds"][-1]["users"]["all_users"]
    summary["targets"] = {
        "coverage_after": last["coverage"],
        "coverage_round_0": first["coverage"],
        "precision_after": last["precision"],
        "coverage_target_met": last["coverage"] >= 0.9 or last["coverage"] >= 2 * first["coverage"],
        "precision_target_met": (last["precision"] or 0) >= 0.995,
        "bystander_contributed_nothing": summary["bystander"]["contributions"] == 0,
    }
    summary["setup_seconds"] = setup_seconds
    summary["total_seconds"] = round(time.monotonic() - bench_started, 1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
