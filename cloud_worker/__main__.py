"""python -m cloud_worker: the mqvox cloud worker."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from cloud_worker.service import UtteranceService
from cloud_worker.settings import WorkerSettings
from schemas.logfmt import configure_logging
from schemas.mqtt import BrokerUnavailable, add_broker_arguments, broker_from_arguments

log = logging.getLogger("cloud_worker")


def serve(args: argparse.Namespace) -> int:
    """Run the utterance service until SIGINT or SIGTERM."""
    named = {"worker_id": args.worker_id} if args.worker_id else {}
    settings = WorkerSettings(broker=broker_from_arguments(args), group=args.group, **named)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    service = UtteranceService(settings).start()
    log.info("ready")
    stopping.wait()
    service.stop()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud_worker", description="The mqvox cloud worker.")
    parser.add_argument("--log-level", default="INFO", help="log level (logs are JSON lines on stderr)")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser(
        "serve",
        help="answer utterances from the broker until stopped",
        description="Subscribe to every device's utterances through an MQTT 5 shared subscription, check each "
        "one (schema, topic, audio) and answer on its Response Topic; refused input is also reported on the "
        "error topic. Stops on SIGINT or SIGTERM.",
    )
    add_broker_arguments(server)
    server.add_argument("--group", default="mqvox-workers", help="shared subscription group")
    server.add_argument("--worker-id", help="this worker's name (default: host-pid)")
    server.set_defaults(run=serve)
    args = parser.parse_args(argv)
    configure_logging("cloud_worker", args.log_level)
    try:
        return args.run(args)
    except BrokerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
