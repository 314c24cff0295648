"""Install a device bundle into a mounted root filesystem (a Raspberry Pi OS SD card, a controller image).

No code runs inside the image: the files are written, the service user is added to
its /etc/passwd, /etc/group, /etc/shadow and /etc/gshadow, and the unit is enabled the way
``systemctl enable`` would, with a symlink in multi-user.target.wants. At first boot
the unit's install.sh makes the venv from the bundle's wheels.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from common.mqtt import TLS_KEY_FILE
from firmware_tools.onboarding.bundle import (
    CONFIG_DIR,
    INSTALL_PREFIX,
    INSTALL_SCRIPT,
    SERVICE_USER,
    STATE_DIR,
    UNIT_NAME,
    BundleError,
    BundleInfo,
)

UNIT_DIR = "/etc/systemd/system"
WANTS_DIR = f"{UNIT_DIR}/multi-user.target.wants"
SYSTEM_IDS = range(100, 1000)
"""Debian's range for system users and groups (SYS_UID_MIN to SYS_UID_MAX of /etc/login.defs)."""


@dataclass(frozen=True)
class FlashOutcome:
    """What flash wrote; printed as JSON by the command."""

    rootfs: str
    device_id: str
    uid: int
    gid: int
    user_created: bool
    files: list[str]
    """Every path written, relative to the root filesystem."""


def _inside(rootfs: Path, path: str) -> Path:
    return rootfs / path.lstrip("/")


def _entries(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split(":") for line in path.read_text(encoding="utf-8").splitlines() if line and ":" in line]


def _ensure_service_user(rootfs: Path) -> tuple[int, int, bool]:
    """The service user's uid and gid in the image, adding it (and its group) if it is not there."""
    passwd, group, shadow, gshadow = (
        _inside(rootfs, f"/etc/{name}") for name in ("passwd", "group", "shadow", "gshadow")
    )
    if not passwd.exists() or not group.exists():
        raise BundleError(f"{rootfs} does not look like a root filesystem: it has no etc/passwd and etc/group")
    users, groups = _entries(passwd), _entries(group)
    for user in users:
        if user[0] == SERVICE_USER:
            return int(user[2]), int(user[3]), False
    taken = {int(entry[2]) for entry in users + groups if len(entry) > 2 and entry[2].isdigit()}
    free = next((number for number in reversed(SYSTEM_IDS) if number not in taken), None)
    if free is None:
        raise BundleError(f"no free system uid/gid in {rootfs}/etc/passwd")
    existing_group = next((entry for entry in groups if entry[0] == SERVICE_USER), None)
    gid = int(existing_group[2]) if existing_group else free
    if existing_group is None:
        _append_line(group, f"{SERVICE_USER}:x:{gid}:")
        if gshadow.exists():
            _append_line(gshadow, f"{SERVICE_USER}:!::")
    _append_line(passwd, f"{SERVICE_USER}:x:{free}:{gid}:mqvox voice device:/var/lib/mqvox:/usr/sbin/nologin")
    if shadow.exists():
        # '!' locks the password: the account only runs the service.
        _append_line(shadow, f"{SERVICE_USER}:!:::::::")
    return free, gid, True


def _append_line(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        text += "\n"
    mode = path.stat().st_mode
    path.write_text(text + line + "\n", encoding="utf-8")
    path.chmod(mode)


def flash(bundle: Path, rootfs: Path) -> FlashOutcome:
    """Write an unpacked bundle folder into ``rootfs`` and enable its unit. Files there before are replaced."""
    info = BundleInfo.read(bundle)
    if os.geteuid() != 0:
        raise BundleError("flash needs root (sudo): the image's files must belong to its root and its service user")
    rootfs = Path(rootfs)
    if not rootfs.is_dir():
        raise BundleError(f"{rootfs} is not a folder")
    uid, gid, created = _ensure_service_user(rootfs)
    written: list[str] = []

    def put(source: Path, target: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
        destination = _inside(rootfs, target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        # Into a temporary name with its final mode and owner, then renamed: the key is
        # never readable by anyone else, not even for a moment.
        temporary = destination.with_name(f".{destination.name}.flash")
        shutil.copyfile(source, temporary)
        os.chown(temporary, *owner)
        temporary.chmod(mode)
        os.replace(temporary, destination)
        written.append(target)

    def folder(target: str, mode: int, owner: tuple[int, int] = (0, 0)) -> None:
        path = _inside(rootfs, target)
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, *owner)
        path.chmod(mode)

    folder(INSTALL_PREFIX, 0o755)
    folder(f"{INSTALL_PREFIX}/wheels", 0o755)
    for old in _inside(rootfs, f"{INSTALL_PREFIX}/wheels").glob("*.whl"):
        old.unlink()  # a wheel of an older bundle would be installed instead of this one's
    for name in info.wheels:
        put(bundle / "wheels" / name, f"{INSTALL_PREFIX}/wheels/{name}", 0o644)
    shutil.rmtree(_inside(rootfs, f"{INSTALL_PREFIX}/model"), ignore_errors=True)
    folder(f"{INSTALL_PREFIX}/model", 0o755)
    for source in sorted((bundle / "model").rglob("*")):
        if source.is_file():
            relative = source.relative_to(bundle / "model").as_posix()
            put(source, f"{INSTALL_PREFIX}/model/{relative}", 0o644)
    put(bundle / INSTALL_SCRIPT, f"{INSTALL_PREFIX}/{INSTALL_SCRIPT}", 0o755)
    put(bundle / "bundle.json", f"{INSTALL_PREFIX}/bundle.json", 0o644)

    # /etc/mqvox: readable by the service's group only; the key by the service user only.
    folder(CONFIG_DIR, 0o750, (0, gid))
    for source in sorted((bundle / "etc").iterdir()):
        if source.name == TLS_KEY_FILE:
            put(source, f"{CONFIG_DIR}/{source.name}", 0o400, (uid, gid))
        else:
            put(source, f"{CONFIG_DIR}/{source.name}", 0o644)
    state_root = str(Path(STATE_DIR).parent)
    folder(state_root, 0o750, (uid, gid))

    put(bundle / UNIT_NAME, f"{UNIT_DIR}/{UNIT_NAME}", 0o644)
    wants = _inside(rootfs, WANTS_DIR)
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / UNIT_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    # What `systemctl enable` makes: an absolute link, valid once the image is booted.
    link.symlink_to(f"{UNIT_DIR}/{UNIT_NAME}")
    written.append(f"{WANTS_DIR}/{UNIT_NAME}")
    return FlashOutcome(
        rootfs=str(rootfs), device_id=info.device_id, uid=uid, gid=gid, user_created=created, files=written
    )
