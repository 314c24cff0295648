"""Rollout drill: 20 simulated devices, a good model rolled out in 3 stages, then a broken one halted.

    .venv/bin/python bench/rollout_drill.py [--devices 20]

Starts its own Mosquitto (broker_config/), a registry in a fresh SQLite file, and the
devices (the real device runtime and updater, on generated silence, each with its own
connection and state folder: device/simulated.py). Everything an operator does goes
through the real command line, ``python -m firmware_tools``:

1. ``keygen``; ``publish`` the shipped model (1.1.0) to everyone (it is what the devices run);
2. ``publish`` (which holds) 1.2.0 (the shipped weights, a new version) and ``rollout`` it:
   canary (2 named devices), 25 % of the fleet, then 100 %;
3. ``publish`` 1.3.0, whose weights are deliberately scrambled
   (firmware_tools/release/drill.py), and ``rollout`` it the same way: every device that gets it
   fails its self-test and rolls back, the abort criteria halt the rollout, and 1.2.0
   is re-published as a rollback;
4. ``status``: the per-device table.

Each command's output is printed as it ran; the last line is one JSON object with the
outcomes, wall times and the fleet's final versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from broker_config.broker import Broker
from device.local_model import shipped_model_directory
from device.settings import settings_from_dict
from device.simulated import SimulatedDevice
from firmware_tools.release.drill import break_package, copy_package
from schemas.model import RolloutStage

STAGES = ("canary:pi-01,pi-02", "early:25%", "fleet:100%")
CRITERIA = ("--max-failure-percent", "20", "--min-reports", "3", "--stage-timeout-s", "120")


def firmware_tools(*arguments: str, broker: Broker | None, database: str = "") -> tuple[int, str, float]:
    """Run ``python -m firmware_tools`` as an operator would; print and return its exit code and output."""
    command = [sys.executable, "-m", "firmware_tools", *arguments]
    if broker is not None:
        command += ["--port", str(broker.port), "--database", database]
    print(f"$ python -m firmware_tools {' '.join(arguments)}", flush=True)
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    print(done.stdout + done.stderr, end="", flush=True)
    print(f"(exit {done.returncode}, {seconds:.1f} s)\n", flush=True)
    return done.returncode, done.stdout, seconds


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20, help="simulated devices (default: %(default)s)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mqvox-drill-"))
    names = [f"pi-{number:02d}" for number in range(1, args.devices + 1)]
    summary: dict = {"devices": len(names), "stages": list(STAGES)}
    with Broker(data_dir=work / "broker") as broker:
        database = f"sqlite:///{work}/registry.sqlite3"
        firmware_tools("keygen", "--out-dir", str(work / "keys"), broker=None)
        key_args = ("--key", str(work / "keys" / "signing.key"))
        on_broker = {"broker": broker, "database": database}
        shipped = shipped_model_directory()
        good = copy_package(shipped, work / "models" / "1.2.0", "1.2.0")
        broken = break_package(shipped, work / "models" / "1.3.0", "1.3.0")
        devices = []
        for name in names:
            settings = settings_from_dict(
                {
                    "device_id": name,
                    "broker": {"port": broker.port},
                    "ota": {"public_key": str(work / "keys" / "signing.pub"), "state_dir": str(work / name)},
                }
            )
            devices.append(SimulatedDevice(settings, interval_s=0.3).start())
        early = [name for name in names if RolloutStage("early", (), 25.0).includes(name)]
        summary["in_25_percent_by_hash"] = early
        try:
            firmware_tools("publish", "--model", str(shipped), "--stage", "fleet:100%", *key_args, **on_broker)
            for label, package in (("good", good), ("broken", broken)):
                firmware_tools("publish", "--model", str(package), *key_args, **on_broker)
                version = json.loads((package / "manifest.json").read_text())["version"]
                stage_args = [argument for stage in STAGES for argument in ("--stage", stage)]
                code, output, seconds = firmware_tools(
                    "rollout", "--version", version, *stage_args, *CRITERIA, *key_args, **on_broker
                )
                summary[f"{label}_rollout"] = {"version": version, "exit": code, "seconds": round(seconds, 1)} | (
                    last_json(output)
                )
            firmware_tools("status", **on_broker)
            summary["final_model_versions"] = dict(Counter(device.runtime.presence.model_version for device in devices))
            summary["device_failures"] = [str(device.failure) for device in devices if device.failure]
        finally:
            for device in devices:
                device.stop()
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
