"""make demo: a broker, a cloud worker and a device fed with the recordings in samples/, then a summary.

At this stage the loop is the protocol round trip: the device uploads each recording
as an utterance (Opus in OGG over MQTT 5 request/response), the worker checks and
decodes it and answers on the device's result topic. The worker has no speech
recogniser yet, and its answer says so.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from broker_config.broker import Broker
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.mqtt import BrokerSettings, MqttLink
from schemas.protocol import decode
from schemas.topics import PREFIX

REPO = Path(__file__).resolve().parent
RUN_DIR = REPO / ".run" / "demo"
DEVICE_ID = "demo-pi-1"


def describe(topic: str, envelope: Envelope) -> str:
    try:
        message = decode(topic, envelope)
    except ProtocolError as error:
        return f"{topic}  INVALID: {error}"
    kind = type(message).__name__
    if kind == "Utterance":
        detail = f"{len(message.audio)} bytes of Opus, {message.duration_s:.2f} s, reply to {envelope.response_topic}"
    elif kind == "Result":
        detail = f"source={message.source} intent={message.intent} error={message.error and message.error.code}"
    elif kind == "DeviceStatus":
        detail = f"state={message.state} counters={dict(message.counters)}"
    else:
        detail = json.dumps(message.to_dict())[:120]
    return f"{topic}  {kind}: {detail}"


def main() -> int:
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    samples = sorted((REPO / "samples").glob("*.flac"))
    traffic: list[str] = []
    lock = threading.Lock()

    def observe(topic: str, envelope: Envelope) -> None:
        with lock:
            traffic.append(describe(topic, envelope))

    with Broker(data_dir=RUN_DIR / "broker") as broker:
        print(f"broker     Mosquitto from broker_config/mosquitto.dev.conf on 127.0.0.1:{broker.port}")
        observer = MqttLink("demo-observer", BrokerSettings(port=broker.port))
        observer.subscribe(f"{PREFIX}/#", observe)
        worker = subprocess.Popen(
            [sys.executable, "-m", "cloud_worker", "serve", "--port", str(broker.port), "--worker-id", "demo-worker"],
            stderr=open(RUN_DIR / "worker.log", "w"),  # noqa: SIM115 - closed with the process
        )
        try:
            _wait_for_line(RUN_DIR / "worker.log", '"event": "ready"', worker)
            print("worker     python -m cloud_worker serve (shared subscription $share/mqvox-workers/...)")
            print(f"device     python -m device send {' '.join(f'samples/{s.name}' for s in samples)}\n")
            device = subprocess.run(
                [sys.executable, "-m", "device", "send", *map(str, samples), "--device-id", DEVICE_ID,
                 "--port", str(broker.port), "--timeout", "20"],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
            observer.close()
    answers = [json.loads(line) for line in device.stdout.splitlines()]
    print("traffic seen on mqvox/v1/#:")
    for line in traffic:
        print(f"  {line}")
    print("\nround trips:")
    for answer in answers:
        name = Path(answer["file"]).name
        if "result" in answer:
            result = answer["result"]
            outcome = result["error"]["code"] if result["error"] else f"intent {result['intent']}"
            print(f"  {name}: answered in {answer['round_trip_ms']} ms by the {result['source']}: {outcome}")
        else:
            print(f"  {name}: FAILED: {answer['error']}")
    ok = device.returncode == 0 and len(answers) == len(samples)
    if not ok:
        print(device.stderr, file=sys.stderr)
    print(
        "\nEvery utterance was answered over MQTT 5 request/response. The worker has no speech recogniser yet,"
        "\nso its answer is 'asr_unavailable'; logs are in .run/demo/."
        if ok
        else "\ndemo FAILED"
    )
    return 0 if ok else 1


def _wait_for_line(path: Path, text: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        if process.poll() is not None:
            raise RuntimeError(f"worker exited: {path.read_text()}")
        time.sleep(0.1)
    raise TimeoutError(f"worker not ready after {timeout_s} s: {path.read_text()}")


if __name__ == "__main__":
    sys.exit(main())
