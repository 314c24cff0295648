"""Exponential backoff with jitter, for whatever retries while a peer (broker, database) is away."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffSettings:
    """How long to wait between retries: doubling from ``initial_s`` up to ``max_s``, each wait jittered."""

    initial_s: float = 0.5
    """The first wait (seconds)."""
    max_s: float = 30.0
    """The longest wait (seconds)."""

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < initial_s <= max_s, not {self.initial_s} and {self.max_s}")


class Backoff:
    """The waits of one run of retries; ``reset()`` after a success."""

    def __init__(self, settings: BackoffSettings) -> None:
        self.settings = settings
        self.failures = 0
        """Failures since the last success."""

    def next_delay(self) -> float:
        """Count a failure and return how long (seconds) to wait before the next try.

        Jittered between half and all of the doubled delay, so that devices cut off
        together do not all come back at the same instant.
        """
        ceiling = min(self.settings.initial_s * 2.0**self.failures, self.settings.max_s)
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
