"""The packages' layout: which package may import which, read from every module's imports (lazy ones included).

schemas/ is the protocol alone; common/ is what every program shares. Programs never import each other:
the device, the cloud worker and the operator tools (firmware_tools) meet only in schemas/ and common/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ("schemas", "common", "device", "cloud_worker", "firmware_tools")
"""The shipped packages whose imports are checked."""

PROJECT = {*PACKAGES, "bench", "tests", "broker_config", "demo"}
"""This project's top-level packages and modules; the standard library and third-party packages are free to all."""

FORBIDDEN: dict[str, set[str]] = {
    "schemas": PROJECT - {"schemas", "common"},
    "common": PROJECT - {"schemas", "common"},
    "device": PROJECT - {"schemas", "common", "device"},
    "cloud_worker": PROJECT - {"schemas", "common", "cloud_worker"},
    "firmware_tools": PROJECT - {"schemas", "common", "device", "firmware_tools", "broker_config"},
}
"""Which of this project's packages each package may not import. Nothing outside firmware_tools imports it; the
operator tools may use the device's code (its front end and model loading) to build and judge models."""


def imports_of(source: str, package: tuple[str, ...]) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in a module of ``package``, relative imports resolved."""
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(alias.name.split(".")[0], node.lineno) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(((package[: len(package) - node.level + 1] or ("",))[0], node.lineno))
            elif node.module:
                found.add((node.module.split(".")[0], node.lineno))
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_what_it_may_not(package: str) -> None:
    assert modules(package)
    crossings = [
        f"{path.relative_to(ROOT)}:{line} imports {imported}"
        for path in modules(package)
        for imported, line in sorted(imports_of(path.read_text(encoding="utf-8"), path.relative_to(ROOT).parent.parts))
        if imported in FORBIDDEN[package]
    ]
    assert not crossings, "\n".join(crossings)


def test_the_check_sees_lazy_and_relative_imports() -> None:
    source = (
        "def later():\n    import cloud_worker.asr\n    from firmware_tools.release import registry\nfrom . import x\n"
    )
    assert imports_of(source, ("device",)) == {("cloud_worker", 2), ("firmware_tools", 3), ("device", 4)}
    assert imports_of("from ..mqtt import x\n", ("common", "sub")) == {("common", 1)}
