"""Local actions: what the device does when it understands an intent, edge or cloud.

Each configured intent runs a shell command or calls a Python entry point, on a
worker thread, so a slow relay never holds up listening. Outcomes are logged and
counted; an action that fails never takes the device down.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from common.logfmt import ContextLogger
from device.settings import ANY_INTENT, ActionSettings, SettingsError
from schemas.result import SlotValue

log = ContextLogger(logging.getLogger(__name__))


@dataclass(frozen=True)
class ActionRequest:
    """An intent to act on, and where it came from."""

    intent: str
    """The intent."""
    slots: Mapping[str, SlotValue]
    """Its slot values."""
    source: str
    """``edge`` or ``cloud``."""
    confidence: float
    """Confidence of the intent."""
    device_id: str
    """This device."""
    utterance_id: str
    """The utterance it answers."""

    def environment(self) -> dict[str, str]:
        """MQVOX_* variables for a shell command."""
        variables = {
            "MQVOX_INTENT": self.intent,
            "MQVOX_SLOTS": json.dumps(dict(self.slots), sort_keys=True),
            "MQVOX_SOURCE": self.source,
            "MQVOX_CONFIDENCE": f"{self.confidence:.4f}",
            "MQVOX_DEVICE_ID": self.device_id,
            "MQVOX_UTTERANCE_ID": self.utterance_id,
        }
        variables |= {f"MQVOX_SLOT_{name.upper()}": str(value) for name, value in self.slots.items()}
        return variables


@dataclass(frozen=True)
class ActionOutcome:
    """How one action went."""

    intent: str
    """The intent acted on."""
    ok: bool
    """True when the command exited 0 or the function returned."""
    detail: str
    """Exit status, or the error."""
    duration_ms: float
    """How long it ran."""


def resolve_entry_point(spec: str) -> Callable[..., object]:
    """The callable named ``package.module:function``; SettingsError if it cannot be imported."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise SettingsError(f"action entry_point {spec!r} cannot be loaded: {error}") from None
    if not callable(function):
        raise SettingsError(f"action entry_point {spec!r} is not callable")
    return function


class ActionRunner:
    """Runs the action configured for each intent, one at a time, in order, on its own thread."""

    def __init__(self, actions: Mapping[str, ActionSettings], count: Callable[[str], None] | None = None) -> None:
        """``count`` is called with ``actions_run`` or ``actions_failed`` after each action; by default the
        runner keeps the counts itself, in :attr:`counts`."""
        self.actions = dict(actions)
        # Entry points are imported now, so a typo stops the device at start, not at the first command.
        self._functions = {
            intent: resolve_entry_point(action.entry_point)
            for intent, action in self.actions.items()
            if action.entry_point is not None
        }
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="actions")
        self.counts: Counter[str] = Counter()
        """``actions_run`` and ``actions_failed``, when no ``count`` was given."""
        self._lock = threading.Lock()
        self._count = count or self._count_here

    def action_for(self, intent: str) -> tuple[str, ActionSettings] | None:
        """The key and action configured for ``intent`` (its own, else the "*" one), or None."""
        for key in (intent, ANY_INTENT):
            if key in self.actions:
                return key, self.actions[key]
        return None

    def submit(self, request: ActionRequest) -> Future[ActionOutcome] | None:
        """Queue the action for ``request.intent``; None when no action is configured for it."""
        found = self.action_for(request.intent)
        if found is None:
            log.about(request).debug("no action for %s", request.intent)
            return None
        return self._executor.submit(self._run, found[0], found[1], request)

    def _run(self, key: str, action: ActionSettings, request: ActionRequest) -> ActionOutcome:
        started = time.perf_counter()
        try:
            if action.command is not None:
                completed = subprocess.run(
                    ["/bin/sh", "-c", action.command],
                    env=os.environ | request.environment(),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=action.timeout_s,
                )
                ok, detail = completed.returncode == 0, f"exit status {completed.returncode}"
                if not ok and completed.stderr:
                    detail += f": {completed.stderr.strip()[-300:]}"
            else:
                self._functions[key](intent=request.intent, slots=dict(request.slots))
                ok, detail = True, "returned"
        except subprocess.TimeoutExpired:
            ok, detail = False, f"still running after {action.timeout_s} s, killed"
        except Exception as error:  # a user's hook: whatever it raises is its failure, not the device's
            ok, detail = False, f"{type(error).__name__}: {error}"
        outcome = ActionOutcome(request.intent, ok, detail, round(1000 * (time.perf_counter() - started), 3))
        self._count("actions_run" if ok else "actions_failed")
        extra = {"intent": request.intent, "detail": detail}
        if ok:
            log.about(request).info("action ran", extra=extra | {"duration_ms": outcome.duration_ms})
        else:
            # The device goes on listening, but what was asked of it was not done: a failure.
            log.about(request).error("action failed", extra=extra)
        return outcome

    def _count_here(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    def close(self, wait: bool = True) -> None:
        """Stop taking actions; with ``wait``, finish those queued."""
        self._executor.shutdown(wait=wait)
