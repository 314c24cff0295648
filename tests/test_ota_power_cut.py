"""A device process killed (SIGKILL, as a power cut) at each step of a model update still works after restart.

The real ``python -m device run`` on stdin, with the failpoint variable naming the step
at which it kills itself. After the kill it is started again without the failpoint: it
must come online with a model that loads, finish the update from the retained
manifest, and recognise a command with the new model.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

from cloud_worker.storage import StorageSettings
from device.installed_models import InstalledModels
from device.local_model import load_local_model, shipped_model_directory
from device.ota import FAILPOINT_VARIABLE, FAILPOINTS
from firmware_tools.release.publish import EVERYONE, Publisher
from firmware_tools.release.registry import ModelRegistry
from schemas.protocol import decode
from schemas.signing import load_private_key
from schemas.status import DeviceState
from schemas.topics import RESULT, STATUS
from tests.conftest import IN_VOCABULARY_SAMPLE, Inbox
from tests.test_device_runtime import _pcm

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def start_device(config, failpoint: str | None) -> subprocess.Popen:
    environment = {key: value for key, value in os.environ.items() if key != FAILPOINT_VARIABLE}
    if failpoint is not None:
        environment[FAILPOINT_VARIABLE] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "device", "run", "--config", str(config)],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )


def next_status(statuses: Inbox, timeout_s: float = 30.0):
    return decode(*statuses.get(timeout_s=timeout_s))


@pytest.mark.parametrize("step", FAILPOINTS)
def test_a_device_killed_at_each_step_of_an_update_works_after_restart(
    step,
    broker_settings,
    links,
    keys,
    packages,
    tmp_path,
):
    channel, device_id = f"cut-{os.getpid()}-{step}", f"cut-{os.getpid()}-{step}"
    state_dir = tmp_path / "state"
    config = tmp_path / "device.toml"
    config.write_text(
        f'device_id = "{device_id}"\n[broker]\nport = {broker_settings.port}\nkeepalive_s = 1\n'
        '[audio]\nsource = "stdin"\n'
        f'[ota]\npublic_key = "{keys["fleet.pub"]}"\nchannel = "{channel}"\nstate_dir = "{state_dir}"\n'
    )
    statuses, results = Inbox(), Inbox()
    observer = links()
    observer.subscribe(STATUS.topic(device_id=device_id), statuses)
    observer.subscribe(RESULT.topic(device_id=device_id), results)
    with ModelRegistry(StorageSettings(url=f"sqlite:///{tmp_path}/registry.sqlite3")) as registry:
        publisher = Publisher(links(), registry, channel, load_private_key(keys["fleet.key"]))
        publisher.publish_manifest(publisher.register(packages["1.2.0"]), EVERYONE)

    device = start_device(config, step)
    try:
        assert device.wait(timeout=60) == -signal.SIGKILL, device.stderr.read().decode()[-2000:]
    finally:
        device.kill()
    # Whatever the step, the state folder leads to a model that loads (checked on a copy: the restart recovers).
    copy = shutil.copytree(state_dir, tmp_path / "copy")
    installed = InstalledModels(copy, shipped_model_directory(), "1.1.0")
    installed.recover(max_attempts=2)
    assert load_local_model(installed.active.directory).version == ("1.2.0" if step == "committed" else "1.1.0")

    device = start_device(config, None)
    try:
        status = next_status(statuses)
        while status.state != DeviceState.ONLINE or status.model_version != "1.2.0":
            status = next_status(statuses)
        device.stdin.write(_pcm(IN_VOCABULARY_SAMPLE))
        device.stdin.flush()
        result = decode(*results.get(timeout_s=30))
        assert result.intent == "lights_on"
    finally:
        device.kill()
        device.wait()
    journal = InstalledModels(state_dir, shipped_model_directory(), "1.1.0").journal
    assert journal.trial is None and journal.active.version == "1.2.0"
    assert sorted(folder.name for folder in (state_dir / "models").iterdir()) == ["1.2.0"]
