"""The worker's config file: cloud_worker/settings.py through the shared loader (common/config.py), and its CLI."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import typing
from dataclasses import is_dataclass
from pathlib import Path

import pytest

import cloud_worker.__main__ as worker_cli
from cloud_worker.settings import StorageSettings, WorkerSettings, load_worker_settings
from common.config import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "cloud_worker" / "config.example.toml"


def _keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted names of every setting of ``cls``, nested tables (optional ones too) included."""
    names: set[str] = set()
    for name, kind in typing.get_type_hints(cls).items():
        names.add(prefix + name)
        for nested in (kind, *typing.get_args(kind)):
            if is_dataclass(nested):
                names |= _keys(nested, f"{prefix}{name}.")
    return names


def test_the_example_config_loads_to_the_defaults_and_names_every_setting() -> None:
    assert load_worker_settings(EXAMPLE) == WorkerSettings()
    # Each setting is in the example, written or commented out, so a user finds every one there.
    text = EXAMPLE.read_text()
    tables = {"": text}
    for table in re.findall(r"^#? ?\[([a-z_.]+)\]", text, re.MULTILINE):
        start = re.search(rf"^#? ?\[{re.escape(table)}\]", text, re.MULTILINE).end()
        following = re.search(r"^#? ?\[", text[start:], re.MULTILINE)
        tables[table] = text[start : start + following.start() if following else None]
    written = {
        f"{table}.{key}" if table else key
        for table, body in tables.items()
        for key in re.findall(r"^#? ?([a-z_]+) =", body if table else body.split("\n[")[0], re.MULTILINE)
    }
    written |= set(tables) - {""}
    documented = _keys(WorkerSettings)
    assert documented <= written, sorted(documented - written)


def test_an_empty_config_is_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "worker.toml").write_text("")
    assert load_worker_settings(tmp_path / "worker.toml") == WorkerSettings()


def test_every_setting_can_be_set_and_paths_are_taken_from_the_files_folder(tmp_path: Path) -> None:
    (tmp_path / "worker.toml").write_text(
        'worker_id = "w-7"\nvocabulary = "vocab.toml"\nmetrics_port = 0\n'
        '[asr]\nmodel_dir = "models/small"\ncpu_threads = 3\nbeam_size = 2\nmax_scored = 12\n'
        '[storage]\nurl = "sqlite:///x.sqlite3"\nkeep_audio = false\ntraining_retention_days = 7\n'
        '[broker]\nport = 8883\n[broker.tls]\nca_file = "ca.pem"\ncert_file = "/etc/mqvox/w.pem"\n'
        "[storage_retry]\ninitial_s = 1\n"
    )
    loaded = load_worker_settings(tmp_path / "worker.toml")
    assert loaded.worker_id == "w-7" and loaded.metrics_port == 0
    assert loaded.vocabulary == str(tmp_path / "vocab.toml")
    assert loaded.asr.model_dir == str(tmp_path / "models" / "small")
    assert (loaded.asr.cpu_threads, loaded.asr.beam_size, loaded.asr.max_scored) == (3, 2, 12)
    assert loaded.storage == StorageSettings(url="sqlite:///x.sqlite3", keep_audio=False, training_retention_days=7.0)
    assert loaded.broker.port == 8883
    assert loaded.broker.tls.ca_file == str(tmp_path / "ca.pem")
    assert loaded.broker.tls.cert_file == "/etc/mqvox/w.pem"
    assert loaded.storage_retry.initial_s == 1.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("group = ", "is not valid TOML"),
        ("[asr]\nbeam = 2", "unknown setting(s) asr.beam"),
        ("metrics = 9000", "unknown setting(s) metrics"),
        ("[storage]\nkeep_audio = 'no'", 'field "storage.keep_audio"'),
        ("[batching]\nmax_batch = '8'", 'field "batching.max_batch"'),
        ("[batching]\nmax_batch = true", 'field "batching.max_batch"'),
        ("[broker]\nport = 1883.5", 'field "broker.port"'),
        ("[limits]\nmax_audio_s = 'long'", 'field "limits.max_audio_s"'),
        ("asr = 3", 'field "asr"'),
        ("[batching]\nmax_batch = 0", "batching: max_batch must be at least 1, not 0"),
        ("[limits]\nmax_audio_s = 21", "limits: max_audio_s must be in (0, 20], not 21"),
        ("[storage]\ntraining_retention_days = -1", "storage: training_retention_days must be a number of days"),
        ("[broker.tls]\ncert_file = 'x'", 'missing value for field "broker.tls.ca_file"'),
    ],
)
def test_a_broken_config_is_refused_with_the_key_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_worker_settings(path)
    assert message in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_missing_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_worker_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage\nurl = 1", "is not valid TOML"),
        ("[storage]\nurll = 'sqlite://'", "unknown setting(s) storage.urll"),
        ("session_expiry_s = '1h'", 'field "session_expiry_s"'),
    ],
)
@pytest.mark.parametrize("command", ["serve", "retire", "transcribe"])
def test_the_cli_refuses_a_bad_config_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, text: str, message: str
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    extra = {"serve": [], "retire": ["--worker-id", "w"], "transcribe": ["a.wav"]}[command]
    assert worker_cli.main([command, "--config", str(path), *extra]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and str(path) in err


@pytest.mark.subprocess
def test_a_bad_config_gives_no_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("[asr]\nbeam_size = 'wide'\n")
    done = subprocess.run(
        [sys.executable, "-m", "cloud_worker", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and 'field "asr.beam_size"' in done.stderr
    assert "Traceback" not in done.stderr


def _serve_settings(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> WorkerSettings:
    """The settings ``serve`` would run with, without running it."""
    ran: list[argparse.Namespace] = []
    monkeypatch.setattr(worker_cli, "serve", lambda args: ran.append(args) or 0)
    assert worker_cli.main(argv) == 0
    return worker_cli.settings_of(ran[0])


def test_flags_override_the_config_file_and_the_file_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "worker.toml"
    path.write_text(
        'group = "night-shift"\nworker_id = "w-1"\n'
        "[broker]\nport = 8883\nkeepalive_s = 12\n"
        "[batching]\nmax_batch = 4\nwindow_ms = 20\n"
        "[asr]\nbeam_size = 3\nprune_nats = 7.5\n"
        '[storage]\nurl = "sqlite:///from-file.sqlite3"\nkeep_audio = false\n'
    )
    from_file = _serve_settings(monkeypatch, ["serve", "--config", str(path)])
    assert from_file == load_worker_settings(path)
    overridden = _serve_settings(
        monkeypatch,
        ["serve", "--config", str(path), "--port", "1884", "--max-batch", "2", "--beam-size", "1", "--group", "day"],
    )
    assert (overridden.broker.port, overridden.batching.max_batch, overridden.asr.beam_size) == (1884, 2, 1)
    assert overridden.group == "day"
    # What no flag names stays as the file says, settings no flag reaches included.
    assert overridden.broker.keepalive_s == 12 and overridden.asr.prune_nats == 7.5
    assert overridden.batching.window_ms == 20.0 and overridden.worker_id == "w-1"
    assert overridden.storage == from_file.storage
    # Without a file, the flags apply to the defaults.
    plain = _serve_settings(monkeypatch, ["serve", "--max-batch", "2"])
    assert plain.batching.max_batch == 2 and plain.broker == WorkerSettings().broker


def test_help_shows_the_config_files_values_as_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "worker.toml"
    path.write_text("[batching]\nmax_batch = 5\n")
    with pytest.raises(SystemExit) as done:
        worker_cli.main(["serve", "--config", str(path), "--help"])
    assert done.value.code == 0
    assert re.search(r"--max-batch MAX_BATCH\s+default: 5", capsys.readouterr().out)
