"""Where the programs keep their state (common/locations.py): one root, a folder per role, never the working folder.

Every check runs the programs as processes, with the environment variables a user, systemd
or a container sets.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.protocol import decode
from schemas.topics import REPLY

from .conftest import REPO, Inbox, make_utterance

pytestmark = pytest.mark.subprocess

LOCATION_VARIABLES = ("STATE_DIRECTORY", "MQVOX_STATE_DIR", "XDG_STATE_HOME", "HOME")

SHOW_LOCATIONS = (
    "from common.locations import Role, default_database_url, state_folder;"
    "print(state_folder(Role.DEVICE)); print(default_database_url())"
)


MAKE_WORKER_FOLDER = "from common.locations import Role, make_state_folder; print(make_state_folder(Role.WORKER, 'x'))"


def with_locations(locations: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``locations`` as its only location variables."""
    kept = {name: value for name, value in os.environ.items() if name not in LOCATION_VARIABLES}
    # COLUMNS: argparse then wraps no default in --help, so it reads as one string.
    return kept | {"PYTHONPATH": str(REPO), "COLUMNS": "1000"} | locations


def run(command: list[str], locations: dict[str, str], cwd: Path, **options) -> subprocess.CompletedProcess:
    """``command`` in ``cwd``, with ``locations`` as its only location variables."""
    env = with_locations(locations)
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, **options)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("given", "root"),
    [
        ({"STATE_DIRECTORY": "unit", "MQVOX_STATE_DIR": "chosen", "XDG_STATE_HOME": "xdg"}, "unit"),
        ({"STATE_DIRECTORY": "unit:unit-logs", "MQVOX_STATE_DIR": "chosen"}, "unit"),  # several StateDirectory=
        ({"MQVOX_STATE_DIR": "chosen", "XDG_STATE_HOME": "xdg"}, "chosen"),
        ({"XDG_STATE_HOME": "xdg"}, "xdg/mqvox"),
        ({}, "home/.local/state/mqvox"),
        ({"STATE_DIRECTORY": "", "MQVOX_STATE_DIR": ""}, "home/.local/state/mqvox"),  # set but empty: unset
    ],
)
def test_the_state_root_is_the_units_then_mqvoxs_then_xdgs_then_the_homes(
    tmp_path: Path, given: dict[str, str], root: str
) -> None:
    environment = {name: str(tmp_path / value) if value else "" for name, value in given.items()}
    shown = run([sys.executable, "-c", SHOW_LOCATIONS], environment | {"HOME": str(tmp_path / "home")}, tmp_path)
    assert shown.returncode == 0, shown.stderr
    device, database = shown.stdout.splitlines()
    assert device == str(tmp_path / root / "device")
    assert database == f"sqlite:///{tmp_path / root / 'worker' / 'mqvox.sqlite3'}"
    assert list(tmp_path.iterdir()) == []  # resolving makes nothing


def test_a_relative_xdg_state_home_is_ignored_and_a_relative_mqvox_state_dir_made_absolute(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path / "home")}
    ignored = run([sys.executable, "-c", SHOW_LOCATIONS], home | {"XDG_STATE_HOME": "xdg"}, tmp_path)
    assert ignored.stdout.splitlines()[0] == str(tmp_path / "home" / ".local" / "state" / "mqvox" / "device")
    absolute = run([sys.executable, "-c", SHOW_LOCATIONS], home | {"MQVOX_STATE_DIR": "here"}, tmp_path)
    assert absolute.stdout.splitlines()[0] == str(tmp_path / "here" / "device")


def _help_default(package: str, *command: str, environment: dict[str, str], cwd: Path) -> str:
    shown = run([sys.executable, "-m", package, *command, "--help"], environment, cwd)
    assert shown.returncode == 0, shown.stderr
    (url,) = re.findall(r"(sqlite:///\S+?)\)", shown.stdout)
    return url


@pytest.mark.slow
def test_every_tool_shows_the_same_default_database_wherever_it_runs(tmp_path: Path) -> None:
    environment = {"HOME": str(tmp_path / "home")}
    (tmp_path / "a").mkdir()
    expected = f"sqlite:///{tmp_path / 'home' / '.local' / 'state' / 'mqvox' / 'worker' / 'mqvox.sqlite3'}"
    shown = {
        _help_default("cloud_worker", "serve", environment=environment, cwd=tmp_path / "a"),
        *(
            _help_default("firmware_tools", command, environment=environment, cwd=tmp_path)
            for command in ("publish", "rollout", "status", "contributions", "learn")
        ),
    }
    assert shown == {expected}
    under_systemd = {"STATE_DIRECTORY": "/var/lib/mqvox"} | environment
    assert _help_default("firmware_tools", "publish", environment=under_systemd, cwd=tmp_path) == (
        "sqlite:////var/lib/mqvox/worker/mqvox.sqlite3"
    )


@pytest.mark.slow
def test_what_the_worker_stores_the_operator_tools_read_with_no_flag_from_another_folder(
    broker, links, device_id: str, tmp_path: Path, private_state_root: Path
) -> None:
    worker_folder, operator_folder = tmp_path / "worker-runs-here", tmp_path / "operator-runs-here"
    worker_folder.mkdir()
    operator_folder.mkdir()
    environment = {"XDG_STATE_HOME": str(private_state_root.parent)}
    replies = Inbox()
    links().subscribe(REPLY.topic(device_id=device_id), replies)
    names = ["--group", f"locations-{device_id}", "--worker-id", f"locations-{device_id}"]
    worker = subprocess.Popen(
        [sys.executable, "-m", "cloud_worker", "serve", "--port", str(broker.port), *names],
        cwd=worker_folder,
        env=with_locations(environment),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = [worker.stderr.readline() for _ in range(2)]
        assert any('"ready"' in line for line in started), started
        links().send(make_utterance(device_id, share_for_training=True))
        assert decode(*replies.get(60)).intent == "lights_on"  # answered only once stored
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    listed = run([sys.executable, "-m", "firmware_tools", "contributions"], environment, operator_folder)
    assert listed.returncode == 0, listed.stderr
    counts = {line["device_id"]: line["count"] for line in map(json.loads, listed.stdout.splitlines())}
    assert counts == {device_id: 1}
    database = private_state_root / "worker" / "mqvox.sqlite3"
    assert database.is_file() and mode(database.parent) == 0o700
    assert list(worker_folder.iterdir()) == [] and list(operator_folder.iterdir()) == []


@pytest.mark.slow
def test_device_run_keeps_its_state_in_the_devices_folder_not_beside_its_config(
    broker, keys: dict[str, Path], device_id: str, tmp_path: Path
) -> None:
    root = tmp_path / "fresh" / "mqvox"  # not there yet: made, private, on first use
    configs = []
    for folder in ("etc-mqvox", "elsewhere"):
        (tmp_path / folder).mkdir()
        config = tmp_path / folder / "device.toml"
        config.write_text(
            f'device_id = "{device_id}"\n[broker]\nport = {broker.port}\n[audio]\nsource = "stdin"\n'
            f'[ota]\npublic_key = "{keys["fleet.pub"]}"\n'
        )
        configs.append(config)
    for config in configs:
        done = run(
            [sys.executable, "-m", "device", "run", "--config", str(config)],
            {"MQVOX_STATE_DIR": str(root)},
            tmp_path,
            input="",
        )
        assert done.returncode == 0, done.stderr
        assert sorted(path.name for path in config.parent.iterdir()) == ["device.toml"]  # no state/ beside it
    state = root / "device"
    assert (state / "outbox.sqlite3").is_file()
    assert mode(root) == mode(state) == mode(root.parent) == 0o700
    shown = run(
        [sys.executable, "-c", f"from device.settings import load_settings; print(load_settings({str(configs[0])!r}))"],
        {"MQVOX_STATE_DIR": str(root)},
        tmp_path,
    )
    assert f"state_dir='{state}'" in shown.stdout and f"path='{state / 'outbox.sqlite3'}'" in shown.stdout


def test_an_existing_state_folder_keeps_its_mode(tmp_path: Path) -> None:
    root = tmp_path / "var-lib-mqvox"
    root.mkdir(mode=0o750)
    root.chmod(0o750)  # as StateDirectoryMode=0750 makes it
    made = run(
        [sys.executable, "-c", MAKE_WORKER_FOLDER],
        {"STATE_DIRECTORY": str(root)},
        tmp_path,
    )
    assert made.stdout.strip() == str(root / "worker")
    assert (mode(root), mode(root / "worker")) == (0o750, 0o700)


@pytest.mark.slow
def test_an_unusable_state_folder_is_one_clear_error_naming_it_and_the_setting(tmp_path: Path) -> None:
    # A root under a file: unusable for root too, as the suite runs in CI (a read-only folder would not be).
    (tmp_path / "a-file").write_text("")
    root, reason = tmp_path / "a-file" / "mqvox", f"{tmp_path / 'a-file'} is not a folder"
    config = tmp_path / "device.toml"
    config.write_text('[broker]\nport = 1\n[audio]\nsource = "stdin"\n')
    commands = {
        "device": ["device", "run", "--config", str(config)],
        "worker": ["cloud_worker", "serve", "--port", "1"],
        "operator": ["firmware_tools", "contributions"],
    }
    settings = {"device": f"ota.state_dir in {config}", "worker": "--database", "operator": "--database"}
    for role, command in commands.items():
        done = run([sys.executable, "-m", *command], {"MQVOX_STATE_DIR": str(root)}, tmp_path, input="")
        assert done.returncode == 2, (role, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        folder = root / ("device" if role == "device" else "worker")
        assert f"cannot make the folder {folder} ({reason})" in done.stderr
        assert f"choose another {settings[role]}, or set MQVOX_STATE_DIR to a writable folder" in done.stderr
