"""Settings of a cloud worker, grouped by concern."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from schemas.mqtt import BrokerSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker joins the fleet."""

    broker: BrokerSettings = field(default_factory=BrokerSettings)
    """Where the broker is."""
    group: str = "mqvox-workers"
    """MQTT 5 shared subscription group: workers of one group split the utterances between them."""
    worker_id: str = field(default_factory=_default_worker_id)
    """This worker's name, in its MQTT client id and in error reports."""
    duration_tolerance_s: float = 0.1
    """How far (seconds) the decoded audio's length may be from the duration the device announced."""
