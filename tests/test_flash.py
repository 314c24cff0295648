"""Device bundles and flash: a provisioned device's bundle, flashed into a Raspberry Pi OS root, checked by systemd.

Everything runs for real: the wheel is built with pip, the bundle and flash commands run as a user
runs them, systemd-analyze verifies the flashed unit, and install.sh makes its venv. The tests run
as root (flash gives the key to the image's service user).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from broker_config.acl import Role
from device.local_model import shipped_model_directory
from device.settings import load_settings
from firmware_tools.onboarding.bundle import (
    BUNDLE_FILE,
    CONFIG_DIR,
    INSTALL_PREFIX,
    INSTALL_SCRIPT,
    SERVICE_USER,
    STATE_DIR,
    UNIT_NAME,
    BundleError,
    BundleInfo,
    OpenedBundle,
    build_wheel,
    deploy_file,
    write_bundle,
)
from firmware_tools.onboarding.provision import Fleet, ProvisionSettings, parse_clients
from schemas.model import MODEL_FILE

from .conftest import REPO

pytestmark = pytest.mark.subprocess

UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
WANTS_LINK = f"etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
BROKER_HOST = "broker.fleet.example"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
"""The mqvox version, which the wheel and bundle.json carry."""
ETC_FILES = ["ca.pem", "cert.pem", "device.toml", "key.pem", "signing.pub"]
"""A device's /etc/mqvox, and a bundle's etc/."""

# The accounts of a Raspberry Pi OS (bookworm) image, trimmed: the top of the system range is taken.
PI_PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
messagebus:x:100:106::/nonexistent:/usr/sbin/nologin
systemd-network:x:998:998:systemd Network Management:/:/usr/sbin/nologin
systemd-timesync:x:997:997:systemd Time Synchronization:/:/usr/sbin/nologin
pi:x:1000:1000:,,,:/home/pi:/bin/bash
"""
PI_GROUP = """\
root:x:0:
daemon:x:1:
audio:x:29:pi
shadow:x:42:
messagebus:x:106:
systemd-journal:x:999:
systemd-network:x:998:
systemd-timesync:x:997:
pi:x:1000:"""  # no final newline: flash must not glue its line onto the last one
PI_SHADOW = """\
root:*:19500:0:99999:7:::
daemon:*:19500:0:99999:7:::
messagebus:!:19500::::::
systemd-network:!*:19500::::::
systemd-timesync:!*:19500::::::
pi:$y$j9T$abc$def:19500:0:99999:7:::
"""
SHADOW_GID = 42


def python_m(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


@dataclasses.dataclass(frozen=True)
class Shipped:
    """The module's fleet folder, its one built wheel and the pi-01 bundle the CLI wrote."""

    fleet_dir: Path
    wheel: Path
    bundle: Path


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> Shipped:
    folder = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(folder / "fleet", ProvisionSettings(broker_names=(BROKER_HOST,)))
    fleet.provision(
        parse_clients(Role.DEVICE, ["pi-01", "pi-02"]) + parse_clients(Role.WORKER, ["worker-1"]),
        signing_key=keys["fleet.pub"],
    )
    (folder / "wheels").mkdir()
    wheel = build_wheel(folder / "wheels")  # about 3 s: once for the module
    bundle = folder / "mqvox-pi-01.tar.gz"
    done = python_m(
        "firmware_tools", "bundle", "--fleet-dir", str(fleet.folder), "--device", "pi-01",
        "--out", str(bundle), "--wheel", str(wheel),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["bundle"] == str(bundle)
    return Shipped(fleet.folder, wheel, bundle)


def make_pi_root(root: Path) -> Path:
    """An empty Raspberry Pi OS root: only its account files, shadow readable by the shadow group."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text(PI_PASSWD)
    (etc / "group").write_text(PI_GROUP)
    (etc / "shadow").write_text(PI_SHADOW)
    (etc / "gshadow").write_text("".join(f"{line.split(':')[0]}:*::\n" for line in PI_GROUP.splitlines()))
    for name in ("shadow", "gshadow"):
        os.chown(etc / name, 0, SHADOW_GID)
        (etc / name).chmod(0o640)
    return root


def flash_cli(bundle: Path, root: Path, **options) -> subprocess.CompletedProcess:
    return python_m("firmware_tools", "flash", "--bundle", str(bundle), "--rootfs", str(root), **options)


def flashed(shipped: Shipped, root: Path) -> dict:
    """Flash the module's bundle into a fresh Pi root; flash's JSON outcome."""
    done = flash_cli(shipped.bundle, make_pi_root(root))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def entries(path: Path) -> list[list[str]]:
    """The colon-separated lines of an account file."""
    return [line.split(":") for line in path.read_text().splitlines()]


def account(root: Path, file: str, name: str) -> list[str]:
    (found,) = [entry for entry in entries(root / "etc" / file) if entry[0] == name]
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def owner(path: Path) -> tuple[int, int]:
    status = path.lstat()
    return status.st_uid, status.st_gid


def inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


@pytest.mark.slow
def test_flash_installs_the_bundle_into_a_pi_root(shipped: Shipped, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    outcome = flashed(shipped, root)

    # The service user, appended to the image's own account files (never the host's).
    user = account(root, "passwd", SERVICE_USER)
    uid, gid = int(user[2]), int(user[3])
    assert (outcome["device_id"], outcome["uid"], outcome["gid"], outcome["user_created"]) == ("pi-01", uid, gid, True)
    before_users = [entry for entry in entries(root / "etc" / "passwd") if entry[0] != SERVICE_USER]
    before_groups = [entry for entry in entries(root / "etc" / "group") if entry[0] != SERVICE_USER]
    assert [":".join(entry) for entry in before_users] == PI_PASSWD.splitlines()
    assert [":".join(entry) for entry in before_groups] == PI_GROUP.splitlines()
    assert 100 <= uid <= 999 and uid not in {int(entry[2]) for entry in before_users}
    assert 100 <= gid <= 999 and gid not in {int(entry[2]) for entry in before_groups}
    assert user == [SERVICE_USER, "x", str(uid), str(gid), user[4], "/var/lib/mqvox", "/usr/sbin/nologin"]
    assert account(root, "group", SERVICE_USER) == [SERVICE_USER, "x", str(gid), ""]
    shadow = account(root, "shadow", SERVICE_USER)
    assert len(shadow) == 9 and shadow[1] == "!"  # a locked password: the account only runs the service
    assert (mode(root / "etc/shadow"), owner(root / "etc/shadow")) == (0o640, (0, SHADOW_GID))
    assert account(root, "gshadow", SERVICE_USER) == [SERVICE_USER, "!", "", ""]  # grpck wants both files
    assert (mode(root / "etc/gshadow"), owner(root / "etc/gshadow")) == (0o640, (0, SHADOW_GID))
    assert mode(root / "etc/passwd") == 0o644

    # The files, where the unit and device.toml look for them.
    wheel = inside(root, f"{INSTALL_PREFIX}/wheels/{shipped.wheel.name}")
    model = inside(root, f"{INSTALL_PREFIX}/model")
    etc = inside(root, CONFIG_DIR)
    unit = inside(root, UNIT_PATH)
    install = inside(root, f"{INSTALL_PREFIX}/{INSTALL_SCRIPT}")
    assert wheel.read_bytes() == shipped.wheel.read_bytes()
    for name in (MODEL_FILE, "manifest.json"):
        assert (model / name).read_bytes() == (shipped_model_directory() / name).read_bytes()
    assert sorted(path.name for path in etc.iterdir()) == ETC_FILES
    assert unit.read_bytes() == deploy_file(UNIT_NAME)
    assert install.read_bytes() == deploy_file(INSTALL_SCRIPT)
    assert json.loads(inside(root, f"{INSTALL_PREFIX}/bundle.json").read_text())["device_id"] == "pi-01"

    # The key: pi-01's own, readable by the service user only.
    key = etc / "key.pem"
    assert key.read_bytes() == (shipped.fleet_dir / "clients/pi-01/key.pem").read_bytes()
    assert key.read_bytes() != (shipped.fleet_dir / "clients/pi-02/key.pem").read_bytes()
    assert (mode(key), owner(key)) == (0o400, (uid, gid))
    assert (mode(etc), owner(etc)) == (0o750, (0, gid))
    assert (mode(install), owner(install)) == (0o755, (0, 0))
    everything_else = [
        path
        for top in (inside(root, INSTALL_PREFIX), etc)
        for path in top.rglob("*")
        if path.is_file() and path not in (key, install)
    ] + [unit]
    assert len(everything_else) >= 10
    for path in everything_else:
        assert (mode(path), owner(path)) == (0o644, (0, 0)), path
    for folder in (INSTALL_PREFIX, f"{INSTALL_PREFIX}/wheels", f"{INSTALL_PREFIX}/model"):
        assert (mode(inside(root, folder)), owner(inside(root, folder))) == (0o755, (0, 0))
    state = inside(root, str(Path(STATE_DIR).parent))
    assert (mode(state), owner(state)) == (0o750, (uid, gid))

    # Enabled as `systemctl enable` does it: an absolute link, valid once the image is booted.
    link = root / WANTS_LINK
    assert link.is_symlink() and os.readlink(link) == UNIT_PATH
    assert inside(root, os.readlink(link)).read_bytes() == unit.read_bytes()
    assert sorted(outcome["files"]) == sorted(
        "/" + path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if (path.is_file() or path.is_symlink()) and path.parent != root / "etc"
    )

    # The config the device reads: TLS files beside it, the model and state where the unit has them.
    settings = load_settings(etc / "device.toml")
    assert settings.device_id == "pi-01"
    assert (settings.broker.host, settings.broker.port) == (BROKER_HOST, 8883)
    tls = settings.broker.tls
    assert (tls.ca_file, tls.cert_file, tls.key_file) == tuple(
        str((etc / name).resolve()) for name in ("ca.pem", "cert.pem", "key.pem")
    )
    assert settings.ota.public_key == str((etc / "signing.pub").resolve())
    assert settings.ota.channel == "stable"
    assert settings.model.directory == f"{INSTALL_PREFIX}/model" == "/opt/mqvox/model"
    assert settings.ota.state_dir == STATE_DIR == "/var/lib/mqvox/state"


@pytest.mark.slow
def test_flashing_twice_changes_nothing_but_the_files(shipped: Shipped, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    first = flashed(shipped, root)
    accounts = {name: (root / "etc" / name).read_text() for name in ("passwd", "group", "shadow")}
    # A wheel of an older bundle would be installed instead of this one's: flash removes it.
    stale = inside(root, f"{INSTALL_PREFIX}/wheels/mqvox-0.0.1-py3-none-any.whl")
    stale.write_bytes(b"an older wheel")
    (inside(root, f"{INSTALL_PREFIX}/model") / "old-model.bin").write_bytes(b"an older model's file")

    again = flash_cli(shipped.bundle, root)

    assert again.returncode == 0, again.stderr
    second = json.loads(again.stdout)
    assert (second["uid"], second["gid"], second["user_created"]) == (first["uid"], first["gid"], False)
    assert second["files"] == first["files"]
    assert {name: (root / "etc" / name).read_text() for name in accounts} == accounts
    for name in ("passwd", "group", "shadow"):
        assert [entry[0] for entry in entries(root / "etc" / name)].count(SERVICE_USER) == 1
    assert [path.name for path in (root / WANTS_LINK).parent.iterdir()] == [UNIT_NAME]
    assert os.readlink(root / WANTS_LINK) == UNIT_PATH
    assert not stale.exists()
    assert not (inside(root, f"{INSTALL_PREFIX}/model") / "old-model.bin").exists()
    leftovers = [path for path in root.rglob(".*") if path.name.endswith(".flash")]
    assert leftovers == []
    key = inside(root, f"{CONFIG_DIR}/key.pem")
    assert (mode(key), owner(key)) == (0o400, (first["uid"], first["gid"]))


def test_flash_keeps_a_service_user_the_image_has(shipped: Shipped, tmp_path: Path) -> None:
    root = make_pi_root(tmp_path / "rootfs")
    with (root / "etc/passwd").open("a") as passwd:
        passwd.write(f"{SERVICE_USER}:x:990:991::/var/lib/mqvox:/usr/sbin/nologin\n")
    with (root / "etc/group").open("a") as group:
        group.write(f"\n{SERVICE_USER}:x:991:\n")
    accounts = {name: (root / "etc" / name).read_text() for name in ("passwd", "group", "shadow")}

    done = flash_cli(shipped.bundle, root)

    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert (outcome["uid"], outcome["gid"], outcome["user_created"]) == (990, 991, False)
    assert {name: (root / "etc" / name).read_text() for name in accounts} == accounts
    assert owner(inside(root, f"{CONFIG_DIR}/key.pem")) == (990, 991)


def test_flash_refuses_a_folder_that_is_not_a_root_filesystem(shipped: Shipped, tmp_path: Path) -> None:
    root = tmp_path / "not-a-root"
    (root / "etc").mkdir(parents=True)

    done = flash_cli(shipped.bundle, root)

    assert done.returncode == 2
    assert "does not look like a root filesystem" in done.stderr and "etc/passwd" in done.stderr
    assert done.stdout == ""
    assert [path.name for path in root.iterdir()] == ["etc"] and not any((root / "etc").iterdir())


def test_flash_refuses_a_tarball_that_is_not_a_bundle(shipped: Shipped, tmp_path: Path) -> None:
    root = make_pi_root(tmp_path / "rootfs")
    accounts = {name: (root / "etc" / name).read_text() for name in ("passwd", "group", "shadow")}
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not a tarball at all")
    folder = tmp_path / "mqvox-pi-01"
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "device.toml").write_text('device_id = "pi-01"\n')
    no_bundle_json = tmp_path / "no-bundle-json.tar.gz"
    with tarfile.open(no_bundle_json, "w:gz") as archive:
        archive.add(folder, arcname=folder.name)
    scratch = tmp_path / "tmp"
    scratch.mkdir()

    unpacked = flash_cli(garbage, root, env=os.environ | {"TMPDIR": str(scratch)})
    assert unpacked.returncode == 2 and unpacked.stdout == ""
    assert unpacked.stderr.startswith(f"error: {garbage} is not an mqvox bundle")
    read = flash_cli(no_bundle_json, root, env=os.environ | {"TMPDIR": str(scratch)})
    assert read.returncode == 2 and read.stdout == ""
    assert read.stderr.startswith("error: ") and "is not an mqvox bundle" in read.stderr and BUNDLE_FILE in read.stderr

    assert sorted(path.name for path in root.iterdir()) == ["etc"]
    assert {name: (root / "etc" / name).read_text() for name in accounts} == accounts
    assert list(scratch.iterdir()) == []  # the unpacked tarball is gone too


def systemd_verify(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", UNIT_PATH], capture_output=True, text=True, timeout=60
    )


def test_systemd_verifies_the_flashed_unit(shipped: Shipped, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    flashed(shipped, root)
    # What a booted Pi has beside the flashed files: systemd's own units (multi-user.target,
    # network-online.target, sound.target), and the venv that install.sh makes at first boot.
    # verify checks that ExecStart is executable, so this interpreter's real binary stands in
    # for the venv's python.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    python = inside(root, f"{INSTALL_PREFIX}/venv/bin/python")
    python.parent.mkdir(parents=True)
    shutil.copy2(os.path.realpath(sys.executable), python)
    assert os.access(python, os.X_OK)

    verified = systemd_verify(root)

    output = verified.stdout + verified.stderr
    assert verified.returncode == 0, output
    assert [line for line in output.splitlines() if UNIT_NAME in line] == []

    # The check can fail: a misspelt ExecStart, and a venv that is not there.
    misspelt = tmp_path / "misspelt"
    shutil.copytree(root, misspelt, symlinks=True)
    unit = inside(misspelt, UNIT_PATH)
    assert "\nExecStart=" in unit.read_text()
    unit.write_text(unit.read_text().replace("\nExecStart=", "\nExecStartt="))
    refused = systemd_verify(misspelt)
    assert refused.returncode != 0 and "ExecStartt" in refused.stdout + refused.stderr

    no_venv = tmp_path / "no-venv"
    shutil.copytree(root, no_venv, symlinks=True)
    shutil.rmtree(inside(no_venv, f"{INSTALL_PREFIX}/venv"))
    refused = systemd_verify(no_venv)
    assert refused.returncode != 0 and "/opt/mqvox/venv/bin/python" in refused.stdout + refused.stderr


def run_install(script: Path, prefix: Path, path: str) -> tuple[subprocess.CompletedProcess, float]:
    environment = os.environ | {
        "MQVOX_PREFIX": str(prefix),
        "MQVOX_PIP_ARGS": "--no-index --no-deps",  # the flashed wheels only: never the network
        "PATH": path,
    }
    started = time.monotonic()
    done = subprocess.run(
        ["sh", str(script)], capture_output=True, text=True, timeout=300, env=environment, cwd=script.parent
    )
    return done, time.monotonic() - started


def stand_in_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel with the name, version and dependencies of a real one, and an empty package."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{dist_info}/METADATA": "".join(
            [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
        ),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{dist_info}/RECORD", "".join(f"{path},,\n" for path in [*files, f"{dist_info}/RECORD"]))
    return wheel


@pytest.mark.slow
def test_install_script_makes_the_venv_once(shipped: Shipped, tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    flashed(shipped, root)
    prefix = inside(root, INSTALL_PREFIX)
    script = prefix / INSTALL_SCRIPT
    # An offline device's wheels folder holds the dependencies too: here only what install.sh installs without the
    # dependencies it declares (pyrnnoise), with none of those.
    (no_deps,) = [line for line in deploy_file("requirements-no-deps.txt").decode().splitlines() if "==" in line]
    no_deps_name, no_deps_version = no_deps.split("==")
    stand_in_wheel(prefix / "wheels", no_deps_name, no_deps_version, ["audiolab>=0.5.2", "matplotlib"])
    # install.sh runs the system's python3: here, the interpreter this test's venv was made from,
    # so the venv it makes runs the Python the wheel was built with.
    system_bin = tmp_path / "system-bin"
    system_bin.mkdir()
    (system_bin / "python3").symlink_to(os.path.realpath(sys.executable))
    path = f"{system_bin}{os.pathsep}{os.environ['PATH']}"

    first, _ = run_install(script, prefix, path)

    output = first.stdout + first.stderr
    assert first.returncode == 0, output
    assert "apt-get" not in output  # python3-venv and libportaudio2 are there: nothing to install
    assert f"installing {shipped.wheel.name} into {prefix / 'venv'}" in first.stdout
    assert f"Successfully installed mqvox-{VERSION}" in first.stdout
    venv = prefix / "venv"
    digest = hashlib.sha256(shipped.wheel.read_bytes()).hexdigest()
    assert (venv / ".mqvox-wheel").read_text() == f"{digest} {shipped.wheel.name}\n"
    shown = subprocess.run(
        [str(venv / "bin/python"), "-m", "pip", "show", "-f", "mqvox"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"Version: {VERSION}" in shown.stdout and f"Location: {venv}" in shown.stdout
    assert "firmware_tools/onboarding/deploy/install.sh" in shown.stdout  # the wheel carries its package data
    (site_packages,) = venv.glob("lib/python*/site-packages")
    assert (site_packages / f"mqvox-{VERSION}.dist-info").is_dir()
    assert (site_packages / "firmware_tools/onboarding/flash.py").is_file()
    assert (site_packages / f"{no_deps_name}-{no_deps_version}.dist-info").is_dir()
    assert not list(site_packages.glob("audiolab*")) and not list(site_packages.glob("matplotlib*"))

    stamp_time = (venv / ".mqvox-wheel").stat().st_mtime_ns
    second, second_s = run_install(script, prefix, path)

    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
    assert second_s < 2  # the stamp matches: no venv, no pip
    assert (venv / ".mqvox-wheel").stat().st_mtime_ns == stamp_time

    # A rebuilt wheel with the same version (so the same file name) is installed at the next start.
    rebuilt = prefix / "wheels" / shipped.wheel.name
    with zipfile.ZipFile(rebuilt, "a") as wheel:
        wheel.writestr(f"mqvox-{VERSION}.dist-info/REBUILT", "a later build of the same version\n")
    third, _ = run_install(script, prefix, path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert (site_packages / f"mqvox-{VERSION}.dist-info" / "REBUILT").is_file()
    assert (venv / ".mqvox-wheel").read_text().split()[0] == hashlib.sha256(rebuilt.read_bytes()).hexdigest()

    # Without a wheel it says so rather than making an empty venv.
    empty = tmp_path / "empty-prefix"
    (empty / "wheels").mkdir(parents=True)
    missing, _ = run_install(script, empty, path)
    assert missing.returncode == 1 and f"no mqvox wheel in {empty / 'wheels'}" in missing.stderr
    assert not (empty / "venv").exists()


def test_a_folder_bundle_has_the_documented_layout(shipped: Shipped, tmp_path: Path) -> None:
    fleet = Fleet.open(shipped.fleet_dir)
    extra = tmp_path / "dependency-1.0-py3-none-any.whl"
    extra.write_bytes(b"a dependency wheel")
    out = tmp_path / "bundles" / "pi-02"
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)

    info = write_bundle(
        fleet, "pi-02", out, model_dir=shipped_model_directory(), wheel=shipped.wheel, extra_wheels=[extra]
    )

    assert sorted(path.name for path in out.iterdir()) == sorted(
        [BUNDLE_FILE, "wheels", "model", "etc", UNIT_NAME, INSTALL_SCRIPT]
    )
    assert sorted(path.name for path in (out / "wheels").iterdir()) == sorted([shipped.wheel.name, extra.name])
    assert (out / "wheels" / shipped.wheel.name).read_bytes() == shipped.wheel.read_bytes()
    shipped_model = shipped_model_directory()
    assert sorted(path.name for path in (out / "model").iterdir()) == sorted(
        path.name for path in shipped_model.iterdir()
    )
    assert (out / "model" / MODEL_FILE).read_bytes() == (shipped_model / MODEL_FILE).read_bytes()
    assert sorted(path.name for path in (out / "etc").iterdir()) == ETC_FILES
    client = shipped.fleet_dir / "clients" / "pi-02"
    for name in ("ca.pem", "cert.pem", "key.pem", "signing.pub"):
        assert (out / "etc" / name).read_bytes() == (client / name).read_bytes()
    assert mode(out / "etc" / "key.pem") == 0o600
    assert (out / UNIT_NAME).read_bytes() == deploy_file(UNIT_NAME)
    assert (out / INSTALL_SCRIPT).read_bytes() == deploy_file(INSTALL_SCRIPT)
    assert mode(out / INSTALL_SCRIPT) == 0o755

    # The bundle's device.toml, unlike the fleet folder's, points at the installed model and state.
    settings = load_settings(out / "etc" / "device.toml")
    assert settings.device_id == "pi-02"
    assert (settings.model.directory, settings.ota.state_dir) == (f"{INSTALL_PREFIX}/model", STATE_DIR)
    assert load_settings(client / "device.toml").model.directory is None

    written = json.loads((out / BUNDLE_FILE).read_text())
    assert set(written) == {"device_id", "software_version", "wheels", "model_version", "created_at"}
    assert written == dataclasses.asdict(info)
    assert (info.device_id, info.software_version) == ("pi-02", VERSION)
    assert info.wheels == [shipped.wheel.name, extra.name]  # the mqvox wheel first
    assert info.model_version == json.loads((shipped_model / "manifest.json").read_text())["version"]
    created = dt.datetime.fromisoformat(info.created_at)
    assert created.utcoffset() == dt.timedelta(0) and before <= created <= dt.datetime.now(dt.UTC)
    assert BundleInfo.read(out) == info
    with OpenedBundle(out) as opened:
        assert opened == out

    with pytest.raises(BundleError, match="exists already"):
        write_bundle(fleet, "pi-02", out, model_dir=shipped_model, wheel=shipped.wheel)


def test_the_cli_tarball_holds_one_bundle_folder(shipped: Shipped) -> None:
    assert stat.S_IMODE(shipped.bundle.stat().st_mode) == 0o600  # it holds the device's private key
    with tarfile.open(shipped.bundle, "r:gz") as archive:
        members = {member.name: member for member in archive.getmembers()}
    assert {name.split("/")[0] for name in members} == {"mqvox-pi-01"}
    assert members["mqvox-pi-01/etc/key.pem"].mode & 0o777 == 0o600
    assert members["mqvox-pi-01/install.sh"].mode & 0o777 == 0o755
    assert f"mqvox-pi-01/wheels/{shipped.wheel.name}" in members
    with OpenedBundle(shipped.bundle) as folder:
        assert BundleInfo.read(folder).device_id == "pi-01"
        unpacked = folder
    assert not unpacked.exists()


@pytest.mark.parametrize(
    ("device", "why"),
    [("pi-03", "not a provisioned device"), ("worker-1", "not a provisioned device")],
)
def test_write_bundle_refuses_what_is_not_a_provisioned_device(
    shipped: Shipped, tmp_path: Path, device: str, why: str
) -> None:
    fleet = Fleet.open(shipped.fleet_dir)
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match=why):
        write_bundle(fleet, device, out, model_dir=shipped_model_directory(), wheel=shipped.wheel)
    assert not out.exists()


def test_write_bundle_refuses_a_folder_without_a_model(shipped: Shipped, tmp_path: Path) -> None:
    out = tmp_path / "bundle.tar.gz"
    with pytest.raises(BundleError, match="is not a model package"):
        write_bundle(Fleet.open(shipped.fleet_dir), "pi-01", out, model_dir=tmp_path, wheel=shipped.wheel)
    assert not out.exists()
