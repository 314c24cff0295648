"""Device settings from TOML, and the local actions they configure."""

from __future__ import annotations

import ast
import inspect
import itertools
import tomllib
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from common import mqtt
from device import settings as settings_module
from device.actions import ActionRequest, ActionRunner
from device.settings import (
    OUTBOX_FILE,
    ActionSettings,
    AudioSourceKind,
    CloudSettings,
    DenoiseMode,
    DeviceSettings,
    OutboxSettings,
    SettingsError,
    UploadPolicy,
    load_settings,
    settings_from_dict,
)

from . import action_hooks

EXAMPLE = Path(__file__).resolve().parent.parent / "device" / "config.example.toml"
SETTINGS_CLASSES = [
    cls
    for cls in vars(settings_module).values()
    if inspect.isclass(cls) and is_dataclass(cls) and cls.__module__ == settings_module.__name__
] + [mqtt.BrokerSettings, mqtt.TlsSettings]


def _documented_fields(cls: type) -> set[str]:
    """Fields of a dataclass that have a docstring right under them."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {
        statement.target.id
        for statement, following in itertools.pairwise(body)
        if isinstance(statement, ast.AnnAssign)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
        and isinstance(following.value.value, str)
    }


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda cls: cls.__name__)
def test_every_setting_has_a_docstring_and_a_default(cls: type) -> None:
    names = {item.name for item in fields(cls)}
    assert names <= _documented_fields(cls), names - _documented_fields(cls)
    if cls not in (ActionSettings, mqtt.TlsSettings):  # an action needs its command; TLS needs its CA file
        cls()


def test_the_example_config_loads_and_documents_the_defaults() -> None:
    example = load_settings(EXAMPLE)
    defaults = DeviceSettings()
    raw = tomllib.loads(EXAMPLE.read_text())
    # Every value the example writes is the default, but for the device id and the example actions.
    for section, values in raw.items():
        if section in ("device_id", "actions"):
            continue
        if not isinstance(values, dict):
            assert getattr(example, section) == getattr(defaults, section), section
            continue
        for key in values:
            assert getattr(getattr(example, section), key) == getattr(getattr(defaults, section), key), (section, key)
    assert example.device_id == "pi-kitchen-01"
    assert example.actions["digit"].command.startswith("echo digit")
    # Every settings group appears in the example, so a user finds each one there.
    assert {item.name for item in fields(DeviceSettings)} <= set(raw) | {"actions"}


def test_an_empty_config_is_the_defaults(tmp_path: Path, private_state_root: Path) -> None:
    (tmp_path / "empty.toml").write_text("")
    loaded = load_settings(tmp_path / "empty.toml")
    # The outbox is always on, so a config file names its file: in the device's state folder, not beside the config.
    assert loaded.outbox.path == str(private_state_root / "device" / OUTBOX_FILE)
    assert replace(loaded, outbox=OutboxSettings()) == DeviceSettings()
    assert loaded.audio.source == AudioSourceKind.MICROPHONE
    assert loaded.denoise == DenoiseMode.UTTERANCE and loaded.cloud.upload == UploadPolicy.UNCERTAIN
    assert loaded.cloud.share_for_training is False  # no consent unless the owner gives it


def test_sharing_for_training_needs_uploads() -> None:
    shared = settings_from_dict({"cloud": {"share_for_training": True}})
    assert shared.cloud.share_for_training is True and shared.cloud.upload == UploadPolicy.UNCERTAIN
    with pytest.raises(SettingsError, match="no audio leaves the device"):
        CloudSettings(upload=UploadPolicy.NEVER, share_for_training=True)
    assert CloudSettings(upload=UploadPolicy.NEVER).share_for_training is False


def test_relative_paths_are_taken_from_the_config_files_folder(tmp_path: Path) -> None:
    (tmp_path / "device.toml").write_text(
        '[audio]\nsource = "file"\nfiles = ["a.flac"]\n[model]\ndirectory = "models/m"\n'
        '[broker.tls]\nca_file = "ca.pem"\ncert_file = "/etc/mqvox/dev.pem"\n'
    )
    loaded = load_settings(tmp_path / "device.toml")
    assert loaded.audio.files == (str(tmp_path / "a.flac"),)
    assert loaded.model.directory == str(tmp_path / "models" / "m")
    assert loaded.broker.tls.ca_file == str(tmp_path / "ca.pem")
    assert loaded.broker.tls.cert_file == "/etc/mqvox/dev.pem"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device_id = 'a/b'", "'a/b' is not a valid device id"),
        ("device_id = 3", 'field "device_id"'),
        ("denoise = 'sometimes'", "\"denoise\" must be one of 'off', 'utterance', 'always'"),
        ("[cloud]\nupload = 'maybe'", '"cloud.upload" must be one of'),
        ("[capture]\npre_roll = 3", "unknown setting(s) capture.pre_roll"),
        ("[capture]\nvad_frame_ms = 25", "capture.vad_frame_ms must be 10, 20 or 30"),
        ("[capture]\nmax_utterance_s = 60", "capture.max_utterance_s must be between"),
        ("[cloud]\ntimeout_s = '5'", 'field "cloud.timeout_s"'),
        ("[cloud]\nshare_for_training = 'yes'", 'field "cloud.share_for_training"'),
        (
            "[cloud]\nupload = 'never'\nshare_for_training = true",
            'cloud.share_for_training cannot be true with cloud.upload = "never"',
        ),
        ("[broker]\nport = 'x'", 'field "broker.port"'),
        ("[broker.tls]\ncert_file = 'x'", 'missing value for field "broker.tls.ca_file"'),
        ("[audio]\nsource = 'file'", "audio.files must name at least one recording"),
        ("[model]\nwake_threshold = 1.5", "model.wake_threshold must be in (0, 1]"),
        ("[actions.x]\ncommandx = 'e'", "unknown setting(s) actions.x.commandx"),
        ("[actions.x]\ncommand = 'e'\nentry_point = 'a:b'", "actions.x: an action needs exactly one of"),
        ("[actions.x]\nentry_point = 'not an entry point'", "must read 'package.module:function'"),
        ("[actions]\nx = 3", "actions.x must be a table"),
        ("audio = 3", 'field "audio"'),
        ("device_id = ", "is not valid TOML"),
    ],
)
def test_a_broken_config_is_refused_with_the_setting_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "device.toml"
    path.write_text(text)
    with pytest.raises(SettingsError) as refused:
        load_settings(path)
    assert message in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_missing_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config"):
        load_settings(tmp_path / "nope.toml")


def _request(intent: str = "lights_on", slots=None) -> ActionRequest:
    return ActionRequest(intent, slots or {}, "edge", 0.9961, "pi-1", "0123abcd")


def test_a_shell_action_gets_the_intent_and_slots_in_its_environment(tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    runner = ActionRunner({"digit": ActionSettings(command=f"env | grep ^MQVOX_ | sort > {out}")})
    outcome = runner.submit(_request("digit", {"value": 7})).result(timeout=10)
    assert outcome.ok, outcome
    assert out.read_text().splitlines() == [
        "MQVOX_CONFIDENCE=0.9961",
        "MQVOX_DEVICE_ID=pi-1",
        "MQVOX_INTENT=digit",
        'MQVOX_SLOTS={"value": 7}',
        "MQVOX_SLOT_VALUE=7",
        "MQVOX_SOURCE=edge",
        "MQVOX_UTTERANCE_ID=0123abcd",
    ]
    assert runner.submit(_request("lights_off")) is None  # nothing configured for it
    runner.close()


def test_an_entry_point_is_called_and_star_catches_other_intents() -> None:
    action_hooks.CALLS.clear()
    runner = ActionRunner({"*": ActionSettings(entry_point="tests.action_hooks:record")})
    assert runner.submit(_request("digit", {"value": 3})).result(timeout=10).ok
    assert action_hooks.CALLS == [{"intent": "digit", "slots": {"value": 3}}]
    runner.close()


def test_failing_and_hanging_actions_are_counted_and_do_not_stop_the_next() -> None:
    runner = ActionRunner(
        {
            "stop": ActionSettings(command="echo jammed >&2; exit 3"),
            "start": ActionSettings(command="sleep 30", timeout_s=0.3),
            "cancel": ActionSettings(entry_point="tests.action_hooks:explode"),
            "yes": ActionSettings(command="true"),
        }
    )
    outcomes = [runner.submit(_request(intent)).result(timeout=10) for intent in ("stop", "start", "cancel", "yes")]
    assert [outcome.ok for outcome in outcomes] == [False, False, False, True]
    assert outcomes[0].detail == "exit status 3: jammed"
    assert "killed" in outcomes[1].detail and outcomes[1].duration_ms < 5000
    assert outcomes[2].detail == "RuntimeError: relay for cancel is unplugged"
    assert runner.counts == {"actions_failed": 3, "actions_run": 1}
    runner.close()


def test_an_entry_point_that_cannot_be_imported_stops_the_device_at_start() -> None:
    with pytest.raises(SettingsError, match="cannot be loaded"):
        ActionRunner({"yes": ActionSettings(entry_point="tests.action_hooks:missing")})
    with pytest.raises(SettingsError, match="cannot be loaded"):
        ActionRunner({"yes": ActionSettings(entry_point="no_such_package.hooks:run")})


def test_whole_numbers_are_taken_for_seconds_but_strings_are_not() -> None:
    assert settings_from_dict({"cloud": {"timeout_s": 5}}).cloud.timeout_s == 5.0
    with pytest.raises(SettingsError):
        settings_from_dict({"cloud": {"timeout_s": True}})
