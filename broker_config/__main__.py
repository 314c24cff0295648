"""python -m broker_config start|stop: a Mosquitto from broker_config/, dev or production config, on loopback or LAN."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from broker_config.broker import (
    CONFIGS,
    LOOPBACK,
    Broker,
    BrokerStartError,
    check_bind_address,
    exposure_warning,
    stop_recorded,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m broker_config", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start Mosquitto in the background and print its port as JSON")
    start.add_argument("--port", type=int, default=0, help="TCP port (default: 0, a free one)")
    start.add_argument(
        "--bind",
        metavar="ADDRESS",
        default=LOOPBACK,
        help="listen on this IP address of this machine, for devices on its network; the dev config is then open "
        "to anyone there, unauthenticated and unencrypted (default: %(default)s)",
    )
    start.add_argument("--data-dir", type=Path, default=Path(".run/broker"), help="config, persistence and log")
    start.add_argument("--config", choices=sorted(CONFIGS), default="dev", help="which config (default: dev)")
    start.add_argument("--tls-dir", type=Path, help="prod: a fleet's broker/ folder (firmware_tools provision)")
    stop = commands.add_parser("stop", help="stop the broker started with the same --data-dir")
    stop.add_argument("--data-dir", type=Path, default=Path(".run/broker"))
    args = parser.parse_args(argv)

    if args.command == "start":
        try:
            check_bind_address(args.bind)
        except ValueError as error:
            print(f"error: --bind: {error}", file=sys.stderr)
            return 2
        if (args.data_dir / "broker.json").exists():
            print(f"a broker is already recorded in {args.data_dir}; stop it first", file=sys.stderr)
            return 1
        try:
            broker = Broker(
                data_dir=args.data_dir,
                port=args.port,
                config=CONFIGS[args.config],
                tls_dir=args.tls_dir,
                bind=args.bind,
            ).start()
        except (BrokerStartError, ValueError) as error:
            print(error, file=sys.stderr)
            return 1
        warning = exposure_warning(broker.config, broker.bind, broker.port)
        if warning is not None:
            print(warning, file=sys.stderr)
        # Left running on purpose: `stop` ends it through the state file.
        print(
            json.dumps(
                {"host": broker.bind, "port": broker.port, "pid": broker.process.pid, "data_dir": str(broker.data_dir)}
            )
        )
        return 0
    pid = stop_recorded(args.data_dir)
    print(json.dumps({"stopped": pid}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
