"""Python entry points that tests configure as device actions."""

from __future__ import annotations

CALLS: list[dict] = []
"""Every call of :func:`record`, in order."""


def record(*, intent: str, slots: dict) -> None:
    CALLS.append({"intent": intent, "slots": slots})


def explode(*, intent: str, slots: dict) -> None:
    raise RuntimeError(f"relay for {intent} is unplugged")
