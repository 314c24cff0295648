"""The device runs on what its install brings: the base dependencies, the ``device`` extra, and the packages installed
without their dependencies (firmware_tools/onboarding/deploy/requirements-no-deps.txt).

This venv has everything installed, so a fresh interpreter is made to see only the device install: an import finder
refuses every other top-level module, as a device's venv would not have it. It runs ``python -m device detect`` on the
samples with RNNoise on every chunk, then imports every module of the device package (the ``run`` path's too).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from .conftest import IN_VOCABULARY_SAMPLE, OUT_OF_VOCABULARY_SAMPLE, REPO

NO_DEPS_REQUIREMENTS = REPO / "firmware_tools/onboarding/deploy/requirements-no-deps.txt"

DEVICE_PACKAGES = {"device", "common", "schemas"}
"""The project's packages that the device runs; it never imports the worker's, the tools' or the broker's."""

NEVER_IMPORTED = {"scipy", "python_speech_features", "pyrnnoise", "audiolab", "av", "matplotlib"}
"""Installed for training, or declared by pyrnnoise, whose library alone the device loads."""

AS_INSTALLED = """
import importlib.abc, json, pkgutil, runpy, sys
installed = set(json.loads(sys.argv.pop(1))) | set(sys.modules) | set(sys.stdlib_module_names)
refused = set()

class DeviceInstall(importlib.abc.MetaPathFinder):
    # Finds what its finder finds, except a module that is not in the device install: as if it were absent.

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if "." not in name and name not in installed:
            refused.add(name)
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        return getattr(self.finder, "find_distributions", lambda *_, **__: ())(*args, **kwargs)

    def invalidate_caches(self):
        getattr(self.finder, "invalidate_caches", lambda: None)()

sys.meta_path[:] = [DeviceInstall(finder) for finder in sys.meta_path]
sys.argv = ["device", "detect", "--json", "--denoise", "always", *sys.argv[1:]]
try:
    runpy.run_module("device", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    assert not stop.code, stop.code
import device
for module in pkgutil.walk_packages(device.__path__, "device."):
    importlib.import_module(module.name)
print(json.dumps({"imported": sorted({name.partition(".")[0] for name in sys.modules}), "refused": sorted(refused)}))
"""


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def with_dependencies(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, with those they depend on (as installed here)."""
    found: set[str] = set()
    pending = [Requirement(line) for line in requirements]
    while pending:
        requirement = pending.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = normalized(requirement.name)
        if name not in found:
            found.add(name)
            pending.extend(Requirement(line) for line in importlib.metadata.requires(name) or [])
    return found


def device_install() -> set[str]:
    """The distributions that a device install brings: what install.sh, the Dockerfile and make setup install."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    no_deps = [
        line.strip()
        for line in NO_DEPS_REQUIREMENTS.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    with_device = with_dependencies([*project["dependencies"], *project["optional-dependencies"]["device"]])
    return with_device | {normalized(Requirement(line).name) for line in no_deps}


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_device_runs_on_what_its_install_brings() -> None:
    installed = device_install()
    modules = {
        module
        for module, names in importlib.metadata.packages_distributions().items()
        if {normalized(name) for name in names} & installed
    }
    shown = subprocess.run(
        [
            *(sys.executable, "-c", AS_INSTALLED, json.dumps(sorted(modules | DEVICE_PACKAGES))),
            *(str(IN_VOCABULARY_SAMPLE), str(OUT_OF_VOCABULARY_SAMPLE)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert shown.returncode == 0, shown.stderr
    *lines, last = shown.stdout.splitlines()
    # The pipeline ran, RNNoise included: the first sample is a command it knows, the second one it asks about.
    assert [(event["event"], event.get("decision")) for event in map(json.loads, lines)] == [
        ("wake", None),
        ("command", "edge"),
        ("wake", None),
        ("command", "cloud"),
    ]
    outcome = json.loads(last)
    imported, refused = set(outcome["imported"]), set(outcome["refused"])
    assert imported >= DEVICE_PACKAGES
    assert imported & NEVER_IMPORTED == set()
    # What it tried beyond its install, and did without (optional imports of its dependencies, e.g. jsonschema's idna).
    assert refused & (NEVER_IMPORTED | {"cloud_worker", "firmware_tools", "broker_config"}) == set(), refused
