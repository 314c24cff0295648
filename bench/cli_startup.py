"""How long each mqvox program takes to start: ``--help`` and the imports behind it, in fresh processes.

    .venv/bin/python bench/cli_startup.py [--runs 7]

For each program (``python -m device``, ``cloud_worker``, ``firmware_tools``, ``broker_config``) it
runs ``--help`` ``--runs`` times and times the whole process, start to exit; it does the same for a
bare ``python -c pass``, the floor every program pays, so the figures read as ratios to it on the
same machine in the same run. It also runs ``-X importtime`` once per program and lists the five
imports that cost most. The last stdout line is one JSON object: per program the median,
minimum and maximum seconds, the median as a ratio to the bare interpreter's, and its heaviest
imports. The machine is shared and noisy: read the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROGRAMS = ("device", "cloud_worker", "firmware_tools", "broker_config")


def timed_runs(command: list[str], runs: int) -> list[float]:
    """Wall seconds of ``runs`` fresh processes of ``command``; a failing one is an error, not a figure."""
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
    return seconds


def heaviest_imports(program: str, count: int = 5) -> list[dict[str, object]]:
    """The ``count`` top-level imports with the largest cumulative time under ``-X importtime``."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", program, "--help"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in done.stderr.splitlines():
        # "import time: self [us] | cumulative | imported package"; nesting shows as indentation of the name.
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _self, cumulative, name = line.removeprefix("import time:").split("|")
        if name.startswith("  "):
            continue
        rows.append({"module": name.strip(), "cumulative_s": round(int(cumulative) / 1e6, 3)})
    return sorted(rows, key=lambda row: row["cumulative_s"], reverse=True)[:count]


def summary(seconds: list[float], floor_s: float | None) -> dict[str, object]:
    median = statistics.median(seconds)
    figures: dict[str, object] = {
        "median_s": round(median, 3),
        "min_s": round(min(seconds), 3),
        "max_s": round(max(seconds), 3),
    }
    if floor_s:
        figures["ratio_to_bare_python"] = round(median / floor_s, 2)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="fresh processes per program (default: %(default)s)")
    options = parser.parse_args(argv)
    if options.runs < 1:
        parser.error("--runs must be at least 1")

    bare = timed_runs([sys.executable, "-c", "pass"], options.runs)
    floor_s = statistics.median(bare)
    report: dict[str, object] = {"runs": options.runs, "bare_python": summary(bare, None)}
    for program in PROGRAMS:
        seconds = timed_runs([sys.executable, "-m", program, "--help"], options.runs)
        report[program] = summary(seconds, floor_s) | {"heaviest_imports": heaviest_imports(program)}
        print(f"{program}: median {report[program]['median_s']} s", file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
