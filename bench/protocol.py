"""What the protocol layer costs, each figure against a peer measured in the same run.

- validation: Result.to_wire() + from_wire() (schema-checked both ways) against bare
  json.dumps + json.loads of the same document;
- opus: encoding real speech to Opus in OGG, as a real-time factor, and its size
  against 16-bit PCM;
- round trip: device -> worker -> device (the utterance, then the worker's reply on the
  device's reply topic) through a real Mosquitto (decode, checks, answer) against a bare
  MQTT 5 echo of the same payload between the same two hosts.

Prints one JSON object; every time is a median over repeats (the machine is shared).
Run: .venv/bin/python bench/protocol.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

from broker_config.broker import Broker
from cloud_worker.service import UtteranceService
from cloud_worker.settings import WorkerSettings
from common.mqtt import BrokerSettings, MqttLink
from common.opus import encode_opus
from common.recording import read_recording
from device.cloud_client import CloudClient
from schemas.envelope import Envelope
from schemas.result import Result, Source
from schemas.utterance import UploadReason, Utterance, new_utterance_id

SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "hey_jarvis_turn_on_the_lights.flac"


def median_us(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def bench_validation(repeats: int) -> dict:
    result = Result(
        device_id="pi-kitchen-01",
        utterance_id=new_utterance_id(),
        source=Source.CLOUD,
        transcript="turn on the lights",
        intent="lights_on",
        slots={},
        confidence=0.93,
        timings_ms={"queue": 3.1, "decode": 2.4, "asr": 180.5, "total": 190.2},
    )
    document = result.to_dict()
    checked = median_us(lambda: Result.from_wire(result.to_wire()), repeats)
    bare = median_us(lambda: json.loads(json.dumps(document)), repeats)
    return {"checked_us": round(checked, 1), "bare_json_us": round(bare, 1), "ratio": round(checked / bare, 1)}


def bench_opus(repeats: int) -> dict:
    speech = read_recording(SAMPLE, 16000)
    seconds = speech.size / 16000
    encode_us = median_us(lambda: encode_opus(speech, 16000), repeats)
    encoded = encode_opus(speech, 16000)
    return {
        "audio_s": round(seconds, 2),
        "encode_ms": round(encode_us / 1000, 2),
        "real_time_factor": round(encode_us / 1e6 / seconds, 4),
        "bytes": len(encoded),
        "size_vs_pcm16": round(len(encoded) / (speech.size * 2), 3),
    }


def bench_round_trip(repeats: int) -> dict:
    speech = read_recording(SAMPLE, 16000)
    audio = encode_opus(speech, 16000)
    with tempfile.TemporaryDirectory() as data_dir, Broker(data_dir=Path(data_dir)) as broker:
        settings = BrokerSettings(port=broker.port)
        service = UtteranceService(WorkerSettings(broker=settings, group="bench", worker_id="bench")).start()
        device = MqttLink("bench-device", settings)
        cloud = CloudClient(device, "bench-device")
        protocol_times = []
        for _ in range(repeats):
            utterance = Utterance(
                device_id="bench-device",
                utterance_id=new_utterance_id(),
                sample_rate=16000,
                duration_s=round(speech.size / 16000, 3),
                hypotheses=(),
                model_version=None,
                reason=UploadReason.FORCED,
                audio=audio,
            )
            started = time.perf_counter()
            assert cloud.ask(utterance, timeout_s=10) is not None
            protocol_times.append(time.perf_counter() - started)
        cloud.close()
        service.stop()

        # Peer: the same payload echoed by a bare MQTT 5 client, no checks, no decoding.
        echo = MqttLink("bench-echo", settings)
        arrived = threading.Event()

        def reply(topic: str, envelope: Envelope) -> None:
            # Off paho's network thread, as the worker does: publish() waits for its PUBACK there.
            threading.Thread(
                target=echo.publish, args=("bench/pong", envelope), kwargs={"qos": 1, "retain": False}
            ).start()

        def pong(topic: str, envelope: Envelope) -> None:
            arrived.set()

        echo.subscribe("bench/ping", reply)
        device.subscribe("bench/pong", pong)
        bare_times = []
        for _ in range(repeats):
            arrived.clear()
            started = time.perf_counter()
            device.publish("bench/ping", Envelope(audio, "application/octet-stream"), qos=1, retain=False)
            assert arrived.wait(10)
            bare_times.append(time.perf_counter() - started)
        echo.close()
        device.close()
    protocol_ms = statistics.median(protocol_times) * 1000
    bare_ms = statistics.median(bare_times) * 1000
    return {
        "payload_bytes": len(audio),
        "protocol_ms": round(protocol_ms, 2),
        "bare_echo_ms": round(bare_ms, 2),
        "ratio": round(protocol_ms / bare_ms, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="repeats per figure (medians are reported)")
    args = parser.parse_args()
    report = {
        "bench": "protocol",
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine()},
        "repeats": args.repeats,
        "validation": bench_validation(args.repeats),
        "opus": bench_opus(max(10, args.repeats // 10)),
        "round_trip": bench_round_trip(max(20, args.repeats // 4)),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
