"""python -m firmware_tools: build, sign and roll out device models."""

from __future__ import annotations

import argparse
import os
import sys

from firmware_tools.building import cli as building
from firmware_tools.cli_common import Subcommand
from firmware_tools.learning import cli as learning
from firmware_tools.onboarding import cli as onboarding
from firmware_tools.release import cli as release
from schemas.errors import ProtocolError

DOMAINS = (building, release, learning, onboarding)
"""The sub-packages whose subcommands --help lists, in its order: each registers its own."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with every domain's subcommands (their options are declared when one is used)."""
    parser = argparse.ArgumentParser(prog="python -m firmware_tools", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Subcommand)
    for domain in DOMAINS:
        domain.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported once the arguments are parsed: --help has exited by then, without loading the MQTT client.
    from common.mqtt import BrokerRefused

    try:
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away (| head) is then caught below
        return code
    except BrokenPipeError:
        # The reader has all it wanted; say nothing more, and let the exit's flush find nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ProtocolError, OSError, ValueError, ConnectionError, BrokerRefused) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
