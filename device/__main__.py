"""python -m device: the mqvox device."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from common.logfmt import LOG_FORMATS, LOG_LEVELS, configure_logging, log_level
from common.mqtt import BrokerUnavailable, MqttLink, add_broker_arguments, broker_from_arguments
from common.recording import DEVICE_SAMPLE_RATE, RecordingError, read_recording
from device.audio_sources import AudioSourceError, FileSource, open_configured_source
from device.capture import NoSpeech
from device.cloud_answer import cloud_result
from device.cloud_client import CloudClient
from device.detector import WakeEvent
from device.local_model import ModelUnavailable, load_configured_model
from device.pipeline import CommandEvent, ListeningPipeline
from device.presence import Presence
from device.self_test import SelfTestUnavailable
from device.settings import DenoiseMode, DeviceSettings, SettingsError, load_settings
from schemas.errors import ErrorCode, ProtocolError
from schemas.result import ErrorInfo, Result, Source
from schemas.signing import SignatureError
from schemas.status import DeviceState
from schemas.topics import check_identifier
from schemas.utterance import UploadReason, Utterance

log = logging.getLogger("device")


def send(args: argparse.Namespace) -> int:
    """Upload each file as an utterance, wait for the cloud's reply, publish and print one result per file.

    ``send`` acts on nothing, so no confidence floor applies: each result carries the cloud's intent as heard,
    with ``acted`` false (or a cloud_timeout error when no reply came).
    """
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
                utterance = Utterance.from_samples(
                    device_id,
                    read_recording(path, DEVICE_SAMPLE_RATE),
                    DEVICE_SAMPLE_RATE,
                    hypotheses=(),
                    model_version=None,
                    reason=UploadReason.FORCED,
                )
            except (RecordingError, ProtocolError) as error:
                failures += 1
                print(json.dumps(line | {"error": str(error)}), flush=True)
                continue
            started = time.monotonic()
            presence.counters["cloud_requests"] += 1
            reply = cloud.ask(utterance, timeout_s=args.timeout)
            round_trip_ms = round(1000 * (time.monotonic() - started))
            line |= {"utterance_id": utterance.utterance_id, "round_trip_ms": round_trip_ms}
            if reply is None:
                failures += 1
                presence.counters["cloud_timeouts"] += 1
                line["error"] = f"no answer from the cloud within {args.timeout} s"
                timeout = ErrorInfo(ErrorCode.CLOUD_TIMEOUT, line["error"])
                timings = {"total": round_trip_ms}
                result = Result.failure(device_id, utterance.utterance_id, Source.EDGE, timeout, timings)
            else:
                presence.counters["cloud_results"] += 1
                result = cloud_result(reply, min_confidence=0.0, may_act=False, total_ms=round_trip_ms)
                line["result"] = result.to_dict()
            link.send(result)
            print(json.dumps(line), flush=True)
        cloud.close()
        link.send(presence.status(DeviceState.OFFLINE))
    return 1 if failures else 0


def _settings(args: argparse.Namespace) -> DeviceSettings:
    return load_settings(args.config) if args.config is not None else DeviceSettings()


def event_line(path: Path, event: WakeEvent | CommandEvent) -> dict:
    """The JSON line ``detect`` prints for one event.

    A command the device is not sure of (decision ``cloud``) has intent null: the
    device did not recognise it, and its guesses are in ``alternatives``.
    """
    if isinstance(event, WakeEvent):
        return {"event": "wake", "file": str(path), "time_s": event.time_s, "score": event.score}
    return {
        "event": "command",
        "file": str(path),
        "time_s": round(event.time_s, 3),
        "intent": event.intent if event.local else None,
        "slots": dict(event.slots) if event.local else {},
        "confidence": event.decision.confidence,
        "alternatives": [
            {"label": best.label, "intent": best.intent, "slots": dict(best.slots), "score": best.score}
            for best in event.alternatives
        ],
        "decision": "edge" if event.local else "cloud",
    }


def detect(args: argparse.Namespace) -> int:
    """Run the device pipeline over each file with no broker; print one line per wake and command."""
    settings = _settings(args)
    if args.model is not None:
        settings = replace(settings, model=replace(settings.model, directory=str(args.model)))
    denoise = DenoiseMode(args.denoise) if args.denoise is not None else settings.denoise
    model = load_configured_model(settings.model)
    block_samples = model.package.frontend.sample_rate * settings.audio.block_ms // 1000
    failures = 0
    for path in args.files:
        pipeline = ListeningPipeline(model, settings.capture, denoise, skip_wake=args.skip_wake)
        events: list = []
        try:
            with FileSource(path, block_samples) as source:
                for block in source.blocks():
                    events += pipeline.push(block)
        except AudioSourceError as error:
            failures += 1
            _print(args, {"event": "error", "file": str(path), "error": str(error)})
            continue
        events += pipeline.finish()
        shown = [event for event in events if not isinstance(event, NoSpeech)]
        for event in shown:
            _print(args, event_line(path, event))
        if not shown:
            # Said plainly, so that a file that yields nothing is not mistaken for one that was skipped.
            detail = "a wake word, then no speech" if events else "no wake word heard"
            _print(args, {"event": "nothing", "file": str(path), "detail": detail})
    return 1 if failures else 0


def _print(args: argparse.Namespace, line: dict) -> None:
    if args.json:
        print(json.dumps(line), flush=True)
    elif line["event"] == "wake":
        print(f"{line['file']}  {line['time_s']:7.2f} s  wake      score {line['score']:.4f}", flush=True)
    elif line["event"] == "command":
        slots = f" {line['slots']}" if line["slots"] else ""
        # The confidence printed is always that of the class named beside it: the intent when the device
        # decides, otherwise its best guess, which is what the cloud is asked about.
        best = line["alternatives"][0]
        said = f"{line['intent']}{slots}" if line["intent"] is not None else f"not sure, best guess {best['label']}"
        print(
            f"{line['file']}  {line['time_s']:7.2f} s  command   {said}  confidence {best['score']:.4f}"
            f"  -> {line['decision']}",
            flush=True,
        )
    elif line["event"] == "nothing":
        print(f"{line['file']}  nothing: {line['detail']}", flush=True)
    else:
        print(f"{line['file']}  error: {line['error']}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the device online, as configured, until its audio ends or it is told to stop."""
    # Only the online path needs MQTT, the actions and the updater.
    from device.ota import open_starting_model
    from device.runtime import DeviceRuntime

    settings = load_settings(args.config)
    starting = open_starting_model(settings)
    source = open_configured_source(settings.audio, stdin=sys.stdin.buffer)
    runtime = DeviceRuntime(settings, starting.model, starting)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: runtime.stop())
    runtime.run(source)
    return 0


def _add_log_options(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """``--log-level`` and ``--log-format``, before the command or, for ``run``, after it too."""
    # After the command, an option left out must not overwrite the one given before it: no default there.
    unset = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument(
        "--log-level",
        type=log_level,
        help=f"{', '.join(LOG_LEVELS)} (default: info for run, one line per event; warning for the others)",
        **unset,
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        help="logs on stderr as short lines for a person, or one JSON object per line with the device and "
        "utterance ids (default: text)",
        **({"default": "text"} | unset),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device", description="The mqvox device.")
    _add_log_options(parser)
    commands = parser.add_subparsers(dest="command", required=True)

    sender = commands.add_parser(
        "send",
        help="upload recordings to the cloud as utterances and print its answers",
        description="Upload each recording (WAV, FLAC or OGG; resampled to 16 kHz mono) as an utterance, "
        "over MQTT 5 request/response, and print one JSON line per file with its result: the cloud's reply as "
        "heard (send acts on nothing, so acted is false and no confidence floor applies), also published on the "
        "device's result topic. Announces the device online (retained status, with an offline Last Will) while "
        "it runs.",
    )
    sender.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sender.add_argument("--device-id", required=True, help="this device's id (letters, digits, '_', '-', '.')")
    add_broker_arguments(sender)
    sender.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each answer")
    sender.set_defaults(run=send)

    detector = commands.add_parser(
        "detect",
        help="run the device pipeline over recordings, offline, and print its wake and command events",
        description="Run the same pipeline as the device (streaming features, wake model, VAD capture, RNNoise, "
        "command model, edge/cloud decision) over each recording, with no broker. Prints one line per event; "
        "with --json: {event: wake, file, time_s, score} and {event: command, file, time_s, intent, slots, "
        "confidence, alternatives, decision} where decision is edge or cloud.",
    )
    detector.add_argument("files", nargs="+", type=Path, metavar="FILE")
    detector.add_argument(
        "--skip-wake",
        action="store_true",
        help="no wake stage: each file is one utterance for the command model (one command event per file)",
    )
    detector.add_argument("--json", action="store_true", help="one JSON object per line")
    detector.add_argument("--config", type=Path, help="device config TOML (capture, denoise, model settings)")
    detector.add_argument("--model", type=Path, help="model package directory (default: the shipped model)")
    detector.add_argument("--denoise", choices=[str(mode) for mode in DenoiseMode], help="override the RNNoise mode")
    detector.set_defaults(run=detect)

    runner = commands.add_parser(
        "run",
        help="run the device online: listen, wake, decide, publish results, ask the cloud when unsure",
        description="Run the device as configured (see device/config.example.toml) until its audio ends "
        "or it receives SIGTERM/SIGINT. Logs one line on stderr per wake, decision, cloud answer and action, "
        "each with its utterance id; --log-level warning keeps only what went wrong, --log-format json gives "
        "JSON lines.",
    )
    runner.add_argument("--config", type=Path, required=True, help="device config TOML")
    _add_log_options(runner, after_command=True)
    runner.set_defaults(run=run)

    args = parser.parse_args(argv)
    # Running, a device says what it hears and does; the one-shot commands print their own results on stdout.
    level = args.log_level or ("INFO" if args.command == "run" else "WARNING")
    configure_logging("device", level, args.log_format)
    try:
        return args.run(args)
    except (
        BrokerUnavailable,
        ProtocolError,
        SettingsError,
        ModelUnavailable,
        AudioSourceError,
        SignatureError,
        SelfTestUnavailable,
    ) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
