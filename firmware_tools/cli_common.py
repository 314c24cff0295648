"""What the firmware_tools subcommands share: parsers whose options are declared only when used, and the database,
channel and broker options.

Listing the subcommands (``python -m firmware_tools --help``) builds no subcommand's options: a subcommand's
defaults come from the modules that define them (the broker's from the MQTT link, learn's from the curation
settings), and importing those loads numpy, SQLAlchemy or paho.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.locations import default_database_url

Handler = Callable[[argparse.Namespace], int]
"""What a subcommand runs: its parsed arguments in, the exit status out."""

Declare = Callable[[argparse.ArgumentParser], None]
"""Adds a subcommand's options to its parser."""


class Subcommand(argparse.ArgumentParser):
    """A subcommand's parser whose options are declared by ``options``, called the first time the subcommand
    parses its arguments or shows its help, not when the top-level parser is built."""

    def __init__(self, *args: Any, options: Declare | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._undeclared = options

    def declare_options(self) -> None:
        """Add the subcommand's options now, if they are not there yet."""
        if self._undeclared is not None:
            declare, self._undeclared = self._undeclared, None
            declare(self)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.declare_options()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self.declare_options()
        return super().format_usage()

    def format_help(self) -> str:
        self.declare_options()
        return super().format_help()


def add_subcommand(
    commands: argparse._SubParsersAction,
    name: str,
    run: Handler,
    *,
    help: str,
    description: str,
    options: Declare | None = None,
    **defaults: Any,
) -> None:
    """Register ``name``, which runs ``run`` with the options ``options`` declares (and ``defaults`` set)."""
    parser = commands.add_parser(name, help=help, description=description, options=options)
    parser.set_defaults(run=run, **defaults)


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    """``--database``: the registry's SQLAlchemy URL, the worker's database by default."""
    parser.add_argument(
        "--database",
        default=default_database_url(),
        help="SQLAlchemy URL of the registry, the worker's database (default: the worker's, %(default)s)",
    )


def add_release_arguments(parser: argparse.ArgumentParser, *, key: bool) -> None:
    """The options of every command that talks to the fleet: ``--channel``, ``--database``, the broker's, and with
    ``key`` a required ``--key``."""
    from common.mqtt import add_broker_arguments

    parser.add_argument("--channel", default="stable", help="release channel (default: %(default)s)")
    add_database_argument(parser)
    add_broker_arguments(parser)
    if key:
        parser.add_argument("--key", type=Path, required=True, help="Ed25519 private key PEM (from keygen)")
