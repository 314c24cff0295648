"""A device's retained status: online or offline, what it runs, and how an update went."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self

from schemas.message import JsonMessage
from schemas.topics import STATUS


class DeviceState(StrEnum):
    ONLINE = "online"
    """Connected."""
    OFFLINE = "offline"
    """Stopped cleanly, or its connection was lost (published by the broker as the Last Will)."""


class OtaState(StrEnum):
    """Steps of a model update, as reported by the device."""

    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    APPLIED = "applied"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class OtaProgress:
    """The last step of a model update."""

    state: OtaState
    """Which step."""
    version: str
    """The model version the step is about."""
    reason: str | None = None
    """Why it was rejected or rolled back; None otherwise."""


@dataclass(frozen=True)
class DeviceStatus(JsonMessage):
    """Retained on the device's status topic; its Last Will is the same with state offline."""

    spec = STATUS

    device_id: str
    """The device."""
    state: DeviceState
    """Online or offline."""
    software_version: str
    """Version of the mqvox device software."""
    model_version: str | None
    """Version of the model it runs; None before it has one."""
    channel: str | None = None
    """The release channel whose manifest it follows; None when its model updates are off."""
    uptime_s: float = 0.0
    """Seconds since the device process started."""
    counters: Mapping[str, int] = field(default_factory=dict)
    """Monotonic counters since start (wakes, edge_results, cloud_requests, ...)."""
    ota: OtaProgress | None = None
    """Last model update step since start, if any."""
    sent_at: float = field(default_factory=time.time)
    """Unix time (seconds) of publication."""

    def topic(self) -> str:
        return STATUS.topic(device_id=self.device_id)

    def to_dict(self) -> dict[str, Any]:
        ota = self.ota
        # Without updates the channel is left out, as older devices leave it out.
        channel = {"channel": self.channel} if self.channel is not None else {}
        return {
            "device_id": self.device_id,
            "state": str(self.state),
            "software_version": self.software_version,
            "model_version": self.model_version,
            **channel,
            "uptime_s": self.uptime_s,
            "counters": dict(self.counters),
            "ota": {"state": str(ota.state), "version": ota.version, "reason": ota.reason} if ota else None,
            "sent_at": self.sent_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        ota = data["ota"]
        return cls(
            device_id=data["device_id"],
            state=DeviceState(data["state"]),
            software_version=data["software_version"],
            model_version=data["model_version"],
            channel=data.get("channel"),
            uptime_s=data["uptime_s"],
            counters=data["counters"],
            ota=OtaProgress(OtaState(ota["state"]), ota["version"], ota["reason"]) if ota else None,
            sent_at=data["sent_at"],
        )
