"""make demo: a broker, a cloud worker and a device fed with the recordings in samples/, then a summary.

The device (python -m device run) listens to the recordings as one stream: it wakes
on "hey jarvis", decides "turn on the lights" on its own (an edge result, then its
local action), and sends the sentence it does not know to the cloud as Opus over
MQTT 5 request/response. The worker transcribes it with Whisper (tiny.en), finds it
outside the vocabulary, stores it, and replies with the transcript on the device's
reply topic; the device then publishes the utterance's one result on its result topic,
with nothing acted on. The summary ends with what the worker's database holds.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from broker_config.broker import Broker
from cloud_worker.storage import StorageSettings, Store
from common.mqtt import BrokerSettings, MqttLink
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.protocol import decode
from schemas.topics import PREFIX

REPO = Path(__file__).resolve().parent
RUN_DIR = REPO / ".run" / "demo"
DEVICE_ID = "demo-pi-1"
DATABASE = f"sqlite:///{RUN_DIR / 'worker.sqlite3'}"


def describe(topic: str, envelope: Envelope) -> str:
    try:
        message = decode(topic, envelope)
    except ProtocolError as error:
        return f"{topic}  INVALID: {error}"
    kind = type(message).__name__
    if kind == "Utterance":
        detail = f"{len(message.audio)} bytes of Opus, {message.duration_s:.2f} s, reply to {envelope.response_topic}"
    elif kind in ("CloudReply", "Result"):
        detail = f"intent={message.intent} error={message.error and message.error.code}"
        if kind == "Result":
            detail = f"source={message.source} {detail} acted={message.acted}"
        if message.transcript is not None:
            detail += f" transcript={message.transcript!r} confidence={message.confidence:.2f}"
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
            [
                sys.executable,
                "-m",
                "cloud_worker",
                "serve",
                "--port",
                str(broker.port),
                "--worker-id",
                "demo-worker",
                "--database",
                DATABASE,
            ],
            stderr=open(RUN_DIR / "worker.log", "w"),  # noqa: SIM115 - closed with the process
        )
        config = RUN_DIR / "device.toml"
        config.write_text(
            f'device_id = "{DEVICE_ID}"\n'
            f"[broker]\nport = {broker.port}\n"
            f'[audio]\nsource = "file"\nfiles = {json.dumps([str(s) for s in samples])}\n'
            "[cloud]\ntimeout_s = 20\n"
            f'[ota]\nstate_dir = "{RUN_DIR / "state"}"\n'  # the outbox here, not in the user's state folder
            f'[actions."*"]\ncommand = \'echo "$MQVOX_SOURCE action: $MQVOX_INTENT" >> {RUN_DIR / "actions.log"}\'\n'
        )
        try:
            _wait_for_line(RUN_DIR / "worker.log", '"event": "ready"', worker)
            print(
                "worker     python -m cloud_worker serve (Whisper tiny.en, shared subscription $share/mqvox-workers/)"
            )
            print(f"device     python -m device run --config {config.relative_to(REPO)}")
            print(f"           listening to {', '.join(f'samples/{s.name}' for s in samples)}\n")
            device = subprocess.run(
                [sys.executable, "-m", "device", "--log-level", "INFO", "run", "--config", str(config)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            (RUN_DIR / "device.log").write_text(device.stderr)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
            observer.close()
    print("traffic seen on mqvox/v1/#:")
    for line in traffic:
        print(f"  {line}")
    # The device's own lines (`device run` logs one per wake, decision, cloud answer and action), without what the
    # TFLite runtime prints.
    logged = [line for line in device.stderr.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    print("\nwhat the device did (its log):", *(f"  {line}" for line in logged), sep="\n")
    actions = (RUN_DIR / "actions.log").read_text().splitlines() if (RUN_DIR / "actions.log").exists() else []
    print("\nlocal actions run:", *(f"  {action}" for action in actions), sep="\n")
    with Store(StorageSettings(url=DATABASE)) as store:
        rows = store.counts()
    print("\nthe worker's database (.run/demo/worker.sqlite3):")
    print("  " + ", ".join(f"{table} {count}" for table, count in rows.items()))
    results = [line for line in traffic if "Result:" in line]
    edge = any("source=edge intent=lights_on error=None acted=True" in line for line in results)
    replies = [index for index, line in enumerate(traffic) if "CloudReply:" in line and "transcript=" in line]
    cloud = [index for index, line in enumerate(traffic) if "Result: source=cloud" in line and "transcript=" in line]
    # The worker's reply, then the device's result of that utterance.
    cloud = len(replies) == len(cloud) == 1 and replies[0] < cloud[0]
    ok = device.returncode == 0 and edge and cloud and rows["transcripts"] == 1
    if not ok:
        print(device.stderr, file=sys.stderr)
    print(
        "\nThe device decided 'turn on the lights' on its own (no audio left it) and asked the cloud about the"
        "\nsentence outside its vocabulary. The worker transcribed it, found no intent in the vocabulary,"
        "\nstored it and replied to the device with the transcript, which the device published as the"
        "\nsentence's result, acting on nothing; logs are in .run/demo/."
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
