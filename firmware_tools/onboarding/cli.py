"""The fleet onboarding subcommands: provision, bundle, flash."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from firmware_tools.cli_common import add_database_argument, add_subcommand


def provision(args: argparse.Namespace) -> int:
    """Create or update the fleet folder: CA, client certificates, ACL, CRL, device configs."""
    from broker_config.acl import Role
    from firmware_tools.onboarding.provision import Fleet, ProvisionSettings, parse_clients

    settings = ProvisionSettings(
        broker_names=tuple(args.broker_host) if args.broker_host else None,
        broker_port=args.broker_port,
        client_days=args.days,
        ca_days=args.ca_days,
        crl_days=args.crl_days,
    )
    clients = [client for role in Role for client in parse_clients(role, getattr(args, role.value))]
    fleet = Fleet(args.fleet_dir, settings)
    outcome = fleet.provision(
        clients,
        reissue=args.reissue or [],
        revoke=args.revoke or [],
        channel=args.channel,
        signing_key=args.signing_key,
    )
    if args.revoke:
        from common.database import DatabaseSettings
        from firmware_tools.release.registry import ModelRegistry

        # Its retained status may say "online" for ever: the ACL now refuses its offline status and Last Will.
        with ModelRegistry(DatabaseSettings(url=args.database)) as registry:
            for name in args.revoke:
                registry.revoke_device(name)
    print(json.dumps(dataclasses.asdict(outcome)))
    return 0


def bundle(args: argparse.Namespace) -> int:
    """Write one provisioned device's bundle."""
    import tempfile

    from firmware_tools.onboarding.bundle import build_wheel, write_bundle
    from firmware_tools.onboarding.provision import Fleet

    fleet = Fleet.open(args.fleet_dir)
    with tempfile.TemporaryDirectory(prefix="mqvox-wheel-") as scratch:
        wheel = args.wheel or build_wheel(Path(scratch))
        extra = sorted(args.wheels.glob("*.whl")) if args.wheels else []
        info = write_bundle(fleet, args.device, args.out, model_dir=args.model, wheel=wheel, extra_wheels=extra)
    print(json.dumps({"bundle": str(args.out)} | dataclasses.asdict(info)))
    return 0


def flash(args: argparse.Namespace) -> int:
    """Install a bundle into a mounted root filesystem and enable its unit."""
    from firmware_tools.onboarding.bundle import OpenedBundle
    from firmware_tools.onboarding.flash import flash as flash_bundle

    with OpenedBundle(args.bundle) as folder:
        outcome = flash_bundle(folder, args.rootfs)
    print(json.dumps(dataclasses.asdict(outcome)))
    return 0


def _provision_options(parser: argparse.ArgumentParser) -> None:
    from firmware_tools.onboarding.provision import DEFAULT_BROKER_NAMES, TLS_PORT, ProvisionSettings

    parser.add_argument("--fleet-dir", type=Path, required=True, help="the fleet folder (created if missing)")
    for role, what in (
        ("device", "a device id"),
        ("worker", "a cloud worker"),
        ("operator", "an operator (firmware_tools publish, rollout, status)"),
        ("consumer", "an application that reads results"),
        ("bridge", "the Home Assistant bridge (python -m cloud_worker ha-bridge)"),
        ("homeassistant", "Home Assistant's MQTT client (reads what the bridge announces)"),
    ):
        parser.add_argument(f"--{role}", action="append", metavar="NAME", help=f"provision {what}; repeat")
    parser.add_argument("--reissue", action="append", metavar="NAME", help="new key and certificate; repeat")
    parser.add_argument(
        "--revoke",
        action="append",
        metavar="NAME",
        help="revoke and remove, and record it in --database so that rollouts and status leave it out; repeat",
    )
    add_database_argument(parser)
    parser.add_argument("--signing-key", type=Path, help="model-signing public key (keygen's .pub), kept")
    parser.add_argument("--channel", default="stable", help="model channel of the devices named (default: stable)")
    parser.add_argument(
        "--broker-host",
        action="append",
        help="a DNS name or IP address of the broker, for its certificate; devices connect to the first; repeat "
        f"(default: the folder's, or {', '.join(DEFAULT_BROKER_NAMES)} for a new one)",
    )
    parser.add_argument("--broker-port", type=int, help=f"port devices connect to (default: {TLS_PORT})")
    parser.add_argument("--days", type=int, default=ProvisionSettings.client_days, help="certificate validity")
    parser.add_argument("--ca-days", type=int, default=ProvisionSettings.ca_days, help="CA validity, at creation")
    parser.add_argument("--crl-days", type=int, default=ProvisionSettings.crl_days, help="CRL next update")


def _bundle_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fleet-dir", type=Path, required=True, help="the fleet folder of provision")
    parser.add_argument("--device", required=True, help="a provisioned device id")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder, or a file ending in .tar.gz")
    parser.add_argument("--model", type=Path, default=Path(__file__).resolve().parents[2] / "device/models/default")
    parser.add_argument("--wheel", type=Path, help="a built mqvox wheel (default: build one from this source tree)")
    parser.add_argument("--wheels", type=Path, help="folder of dependency wheels to ship too")


def _flash_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder or .tar.gz")
    parser.add_argument("--rootfs", type=Path, required=True, help="the mounted root filesystem")


def register(commands: argparse._SubParsersAction) -> None:
    """Add provision, bundle and flash."""
    add_subcommand(
        commands,
        "provision",
        provision,
        help="create the fleet CA, client certificates, the broker's ACL and CRL, and device configs",
        description="Create or update a fleet folder. The first run creates the CA and the broker's certificate. "
        "Each --device, --worker, --operator, --consumer, --bridge and --homeassistant gets a key and a "
        "certificate whose CN is its name; one already provisioned keeps them and has its other files "
        "refreshed. A device's folder (clients/<id>/) also gets device.toml, which connects with TLS, and the "
        "model-signing public key: it is the device's /etc/mqvox. --reissue gives a client a new key and "
        "certificate and revokes the old one; --revoke revokes a client's certificate and removes it from the "
        "ACL. The ACL and the CRL in broker/ are rewritten on every run: copy broker/ to the broker and send "
        "it SIGHUP.",
        options=_provision_options,
    )
    add_subcommand(
        commands,
        "bundle",
        bundle,
        help="build one device's bundle: wheels, model, config, certificates, systemd unit, install script",
        description="Write the bundle of a device provisioned in --fleet-dir to --out (a folder, or a .tar.gz). "
        "The mqvox wheel is built from this source tree unless --wheel is given; wheels in --wheels (for "
        "example aarch64 dependency wheels from `pip download`) are added, so a device can install offline.",
        options=_bundle_options,
    )
    add_subcommand(
        commands,
        "flash",
        flash,
        help="install a bundle into a mounted root filesystem and enable its systemd unit",
        description="Write the bundle into --rootfs (for example a mounted Raspberry Pi OS SD card): /opt/mqvox, "
        "/etc/mqvox (the private key owned by the mqvox user, mode 0400), the unit in /etc/systemd/system, "
        "enabled through a multi-user.target.wants symlink. Adds the mqvox system user to the image if needed. "
        "Runs nothing inside the image; needs root.",
        options=_flash_options,
    )
