"""The device's retained status: online while connected, offline through a clean stop or the Last Will."""

from __future__ import annotations

import time
from collections import Counter
from importlib.metadata import version

from schemas.status import DeviceState, DeviceStatus, OtaProgress

SOFTWARE_VERSION = version("mqvox")
"""Version of the installed mqvox distribution, reported in every status."""


class Presence:
    """Builds the status messages of one device process."""

    def __init__(self, device_id: str, model_version: str | None, channel: str | None = None) -> None:
        self.device_id = device_id
        self.model_version = model_version
        self.channel = channel
        """The release channel followed for model updates; None when they are off."""
        self.counters: Counter[str] = Counter()
        """Monotonic counters reported in the status (cloud_requests, cloud_results, ...)."""
        self.ota: OtaProgress | None = None
        """The last model update step, reported in every status from then on."""
        self._started = time.monotonic()

    def status(self, state: DeviceState) -> DeviceStatus:
        """The status to publish now."""
        return DeviceStatus(
            device_id=self.device_id,
            state=state,
            software_version=SOFTWARE_VERSION,
            model_version=self.model_version,
            channel=self.channel,
            uptime_s=round(time.monotonic() - self._started, 3),
            counters=dict(self.counters),
            ota=self.ota,
        )

    def last_will(self) -> DeviceStatus:
        """What the broker publishes, retained, if the connection is lost without a clean stop."""
        return self.status(DeviceState.OFFLINE)
