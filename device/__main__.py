"""python -m device: the mqvox device."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from device.cloud_client import CloudClient
from device.presence import Presence
from device.recording import DEVICE_SAMPLE_RATE, RecordingError, read_recording
from schemas.audio import encode_opus
from schemas.errors import ProtocolError
from schemas.logfmt import configure_logging
from schemas.mqtt import BrokerUnavailable, MqttLink, add_broker_arguments, broker_from_arguments
from schemas.status import DeviceState
from schemas.topics import check_identifier
from schemas.utterance import UploadReason, Utterance, new_utterance_id

log = logging.getLogger("device")


def send(args: argparse.Namespace) -> int:
    """Upload each file as an utterance, wait for the cloud's answer, print one JSON line per file."""
    device_id = check_identifier("device_id", args.device_id)
    presence = Presence(device_id, model_version=None)
    broker = broker_from_arguments(args)
    failures = 0
    with MqttLink(device_id, broker, will=presence.last_will()) as link:
        link.send(presence.status(DeviceState.ONLINE))
        cloud = CloudClient(link, device_id)
        for path in args.files:
            line: dict = {"file": str(path)}
            try:
                samples = read_recording(path, DEVICE_SAMPLE_RATE)
                utterance = Utterance(
                    device_id=device_id,
                    utterance_id=new_utterance_id(),
                    sample_rate=DEVICE_SAMPLE_RATE,
                    duration_s=round(samples.size / DEVICE_SAMPLE_RATE, 3),
                    hypotheses=(),
                    model_version=None,
                    reason=UploadReason.FORCED,
                    audio=encode_opus(samples, DEVICE_SAMPLE_RATE),
                )
            except (RecordingError, ProtocolError) as error:
                failures += 1
                print(json.dumps(line | {"error": str(error)}), flush=True)
                continue
            started = time.monotonic()
            presence.counters["cloud_requests"] += 1
            result = cloud.ask(utterance, timeout_s=args.timeout)
            line |= {
                "utterance_id": utterance.utterance_id,
                "round_trip_ms": round(1000 * (time.monotonic() - started)),
            }
            if result is None:
                failures += 1
                presence.counters["cloud_timeouts"] += 1
                line["error"] = f"no answer from the cloud within {args.timeout} s"
            else:
                presence.counters["cloud_results"] += 1
                line["result"] = result.to_dict()
            print(json.dumps(line), flush=True)
        link.send(presence.status(DeviceState.OFFLINE))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device", description="The mqvox device.")
    parser.add_argument("--log-level", default="WARNING", help="log level (logs are JSON lines on stderr)")
    commands = parser.add_subparsers(dest="command", required=True)

    sender = commands.add_parser(
        "send",
        help="upload recordings to the cloud as utterances and print its answers",
        description="Upload each recording (WAV, FLAC or OGG; resampled to 16 kHz mono) as an utterance, "
        "over MQTT 5 request/response, and print one JSON line per file with the cloud's result. "
        "Announces the device online (retained status, with an offline Last Will) while it runs.",
    )
    sender.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sender.add_argument("--device-id", required=True, help="this device's id (letters, digits, '_', '-', '.')")
    add_broker_arguments(sender)
    sender.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    sender.set_defaults(run=send)

    args = parser.parse_args(argv)
    configure_logging("device", args.log_level)
    try:
        return args.run(args)
    except (BrokerUnavailable, ProtocolError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
