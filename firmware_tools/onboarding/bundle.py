"""A device bundle: one device's wheels, model, config, certificates, systemd unit and install script.

``python -m firmware_tools bundle`` writes it as a folder or a .tar.gz; ``flash`` installs it
into a root filesystem (firmware_tools/onboarding/flash.py). Layout:

- ``bundle.json``: device id, software version, wheel and model files, when it was built.
- ``wheels/``: the mqvox wheel, and any dependency wheels given with ``--wheels``.
- ``model/``: the factory model package (model.tflite, manifest.json, ...).
- ``etc/``: the device's /etc/mqvox: device.toml, ca.pem, cert.pem, key.pem, signing.pub.
- ``mqvox-device.service`` and ``install.sh``: from firmware_tools/onboarding/deploy/.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from broker_config.acl import Role
from common.mqtt import TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE
from firmware_tools.onboarding.provision import DEVICE_CONFIG_FILE, SIGNING_KEY_FILE, Fleet, device_config_text
from schemas.model import MODEL_FILE, ModelPackage
from schemas.signing import write_private_file

BUNDLE_FILE = "bundle.json"
UNIT_NAME = "mqvox-device.service"
INSTALL_SCRIPT = "install.sh"

INSTALL_PREFIX = "/opt/mqvox"
"""Where the wheels, the factory model, install.sh and the venv go on the device."""
CONFIG_DIR = "/etc/mqvox"
"""The device's config, CA, certificate, key and model-signing key."""
STATE_DIR = "/var/lib/mqvox/state"
"""The [ota] state folder, inside the unit's StateDirectory."""
SERVICE_USER = "mqvox"
"""The unit's User and Group; the only reader of the private key."""

SOURCE_TREE = Path(__file__).resolve().parents[2]
"""The mqvox checkout this module runs from, when it does: the wheel is built from it."""


class BundleError(ValueError):
    """A bundle that cannot be built or read."""


@dataclass(frozen=True)
class BundleInfo:
    """bundle.json."""

    device_id: str
    software_version: str
    """The mqvox version of the wheel."""
    wheels: list[str]
    """File names in wheels/, the mqvox wheel first."""
    model_version: str
    """Version of the factory model in model/."""
    created_at: str

    @classmethod
    def read(cls, folder: Path) -> BundleInfo:
        try:
            return cls(**json.loads((folder / BUNDLE_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as error:
            raise BundleError(f"{folder} is not an mqvox bundle: {error}") from None


def deploy_file(name: str) -> bytes:
    """A file of firmware_tools/onboarding/deploy/ (the systemd unit, install.sh)."""
    return resources.files("firmware_tools.onboarding").joinpath("deploy", name).read_bytes()


BUILD_LEFTOVERS = (".git", ".venv", ".run", ".cache", ".hypothesis", "build", "*.egg-info", "__pycache__", ".*_cache")
"""Never copied into a wheel build: setuptools would reuse a stale build/ and package removed modules."""


def build_wheel(out_dir: Path, source: Path = SOURCE_TREE) -> Path:
    """Build the mqvox wheel from a copy of a source checkout into ``out_dir``, with the installed build tools."""
    if not (source / "pyproject.toml").exists():
        raise BundleError(f"no mqvox source tree at {source}: give a built wheel with --wheel")
    with tempfile.TemporaryDirectory(prefix="mqvox-source-") as scratch:
        copy = Path(scratch) / "mqvox"
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
        return _pip_wheel(copy, out_dir)


def _pip_wheel(source: Path, out_dir: Path) -> Path:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"),
            "-w",
            str(out_dir),
            str(source),
        ],
        capture_output=True,
        text=True,
    )
    built = sorted(out_dir.glob("mqvox-*.whl"))
    if result.returncode != 0 or not built:
        raise BundleError(f"building the mqvox wheel failed: {result.stderr.strip()[-2000:]}")
    return built[-1]


def write_bundle(
    fleet: Fleet,
    device_id: str,
    out: Path,
    *,
    model_dir: Path,
    wheel: Path,
    extra_wheels: list[Path] = (),
) -> BundleInfo:
    """Write the bundle of a provisioned device to ``out``: a folder, or a .tar.gz when its name says so."""
    record = fleet.inventory.clients.get(device_id)
    if record is None or record.role is not Role.DEVICE:
        raise BundleError(f"{device_id} is not a provisioned device of {fleet.folder}")
    if not (model_dir / MODEL_FILE).exists():
        raise BundleError(f"{model_dir} is not a model package (no {MODEL_FILE})")
    model_version = ModelPackage.load(model_dir).version  # validated against its schema, as the device will
    software_version = wheel.name.split("-")[1]
    with tempfile.TemporaryDirectory(prefix="mqvox-bundle-") as scratch:
        folder = Path(scratch) / f"mqvox-{device_id}"
        (folder / "wheels").mkdir(parents=True)
        for source in (wheel, *extra_wheels):
            shutil.copy2(source, folder / "wheels" / source.name)
        shutil.copytree(model_dir, folder / "model")
        etc = folder / "etc"
        client = fleet.client_dir(device_id)
        shutil.copytree(client, etc)
        (etc / DEVICE_CONFIG_FILE).write_text(
            device_config_text(
                device_id,
                broker_host=fleet.inventory.broker_names[0],
                broker_port=fleet.inventory.broker_port,
                channel=record.channel,
                model_dir=f"{INSTALL_PREFIX}/model",
                state_dir=STATE_DIR,
            ),
            encoding="utf-8",
        )
        for name in (TLS_CA_FILE, TLS_CERT_FILE, TLS_KEY_FILE, SIGNING_KEY_FILE):
            if not (etc / name).exists():
                raise BundleError(f"{client} has no {name}: re-run provision for {device_id}")
        (folder / UNIT_NAME).write_bytes(deploy_file(UNIT_NAME))
        (folder / INSTALL_SCRIPT).write_bytes(deploy_file(INSTALL_SCRIPT))
        (folder / INSTALL_SCRIPT).chmod(0o755)
        info = BundleInfo(
            device_id=device_id,
            software_version=software_version,
            wheels=[wheel.name, *(extra.name for extra in extra_wheels)],
            model_version=model_version,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        (folder / BUNDLE_FILE).write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
        if out.name.endswith(".tar.gz"):
            packed = io.BytesIO()
            with tarfile.open(fileobj=packed, mode="w:gz") as archive:
                archive.add(folder, arcname=folder.name)
            # It holds the device's private key: readable by its owner only, like the key itself.
            write_private_file(out, packed.getvalue(), replace=True)
        else:
            if out.exists():
                raise BundleError(f"{out} exists already")
            shutil.copytree(folder, out)
    return info


class OpenedBundle:
    """A bundle folder, or a .tar.gz unpacked into a temporary one. A context manager."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._scratch: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if self.path.is_dir():
            BundleInfo.read(self.path)
            return self.path
        self._scratch = tempfile.TemporaryDirectory(prefix="mqvox-flash-")
        try:
            with tarfile.open(self.path, "r:gz") as archive:
                # 'data' refuses absolute paths, links out of the tree and device files.
                archive.extractall(self._scratch.name, filter="data")
            folders = [entry for entry in Path(self._scratch.name).iterdir() if entry.is_dir()]
            if len(folders) != 1:
                raise BundleError("it should hold one bundle folder")
            BundleInfo.read(folders[0])
        except (OSError, tarfile.TarError, BundleError) as error:
            self._scratch.cleanup()
            self._scratch = None
            raise BundleError(f"{self.path} is not an mqvox bundle: {error}") from None
        return folders[0]

    def __exit__(self, *exc: object) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
