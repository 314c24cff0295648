"""Where each mqvox program keeps its state when its own settings name no place.

Every program on a machine shares one root, the first that is set of:

1. ``$STATE_DIRECTORY``: systemd sets it for a unit with ``StateDirectory=mqvox`` (``/var/lib/mqvox``);
2. ``$MQVOX_STATE_DIR``;
3. ``$XDG_STATE_HOME/mqvox``, and ``~/.local/state/mqvox`` without it.

Each role has a folder of its own under the root (``Role``). The operator tools
(``python -m firmware_tools``) use the worker's: the model registry is a set of tables in
the worker's database, so ``cloud_worker serve`` and ``firmware_tools publish`` on one
machine share one registry with no flag. Nothing depends on the current folder.

A folder is made with mode 0700 when first used (it holds people's voices); one that
cannot be made or written is a ``StateLocationError`` naming it and what to change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

STATE_DIR_VARIABLE = "MQVOX_STATE_DIR"
"""The environment variable that moves every role's default folder."""

DATABASE_FILE = "mqvox.sqlite3"
"""The worker's SQLite database, in the worker's folder: utterances, their audio and answers, training
contributions, and the model registry of the operator tools."""

PRIVATE_FOLDER_MODE = 0o700
"""Mode of the folders made here: only their owner reads them."""


class StateLocationError(OSError):
    """A state folder that cannot be made or written; the message names it and the setting to change."""


class Role(StrEnum):
    """A program's role, and its folder under the root."""

    DEVICE = "device"
    """``python -m device run``: installed models, the update journal, the outbox."""
    WORKER = "worker"
    """``python -m cloud_worker serve`` and the operator tools: the database (``mqvox.sqlite3``) and ``learn``'s
    round packages (``learn/<channel>``)."""


@dataclass(frozen=True)
class StateRoot:
    """The folder every role's folder is in, and the setting it came from."""

    path: Path
    """An absolute folder; it may not exist yet."""
    setting: str
    """What chose it, as a reader would change it: an environment variable, or the home folder's default."""


def state_root() -> StateRoot:
    """The root of the state folders, by the first of STATE_DIRECTORY, MQVOX_STATE_DIR and XDG_STATE_HOME set."""
    systemd = os.environ.get("STATE_DIRECTORY", "")
    if systemd:
        # With several StateDirectory= names systemd lists them all, ':'-separated; mqvox's is the first.
        return StateRoot(Path(systemd.split(":")[0]), "the unit's StateDirectory= (STATE_DIRECTORY)")
    chosen = os.environ.get(STATE_DIR_VARIABLE, "")
    if chosen:
        return StateRoot(Path(chosen).expanduser().absolute(), STATE_DIR_VARIABLE)
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG base directory specification says to ignore a relative path.
    if xdg and Path(xdg).is_absolute():
        return StateRoot(Path(xdg) / "mqvox", f"XDG_STATE_HOME or {STATE_DIR_VARIABLE}")
    try:
        home = Path.home()
    except RuntimeError:
        raise StateLocationError(f"no home folder to keep state in: set {STATE_DIR_VARIABLE}") from None
    return StateRoot(home / ".local" / "state" / "mqvox", STATE_DIR_VARIABLE)


def state_folder(role: Role) -> Path:
    """The role's default folder; nothing is made (``make_private_folder`` makes it when it is used)."""
    return state_root().path / role


def default_database_url() -> str:
    """SQLAlchemy URL of the database the worker and the operator tools share unless told otherwise."""
    return f"sqlite:///{state_folder(Role.WORKER) / DATABASE_FILE}"


def make_private_folder(folder: str | Path, remedy: str) -> Path:
    """Make ``folder`` and any missing parent with mode 0700, and check that it can be written.

    An existing folder keeps its mode. ``remedy`` says what to change, in the error about
    a folder that cannot be made or written.
    """
    folder = Path(folder)
    lineage = [folder, *folder.parents]
    existing = next((index for index, path in enumerate(lineage) if path.is_dir()), len(lineage))
    try:
        for path in reversed(lineage[:existing]):
            if path.exists() or path.is_symlink():
                raise StateLocationError(f"cannot make the folder {folder} ({path} is not a folder): {remedy}")
            path.mkdir(mode=PRIVATE_FOLDER_MODE, exist_ok=True)
    except OSError as error:
        raise StateLocationError(f"cannot make the folder {folder} ({error.strerror or error}): {remedy}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StateLocationError(f"cannot write in the folder {folder} (permission denied): {remedy}")
    return folder


def make_state_folder(role: Role, own_setting: str) -> Path:
    """The role's default folder, made when missing; ``own_setting`` names the role's setting for another place."""
    root = state_root()
    return make_private_folder(
        root.path / role, f"choose another {own_setting}, or set {root.setting} to a writable folder"
    )
