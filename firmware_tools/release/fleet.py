"""The fleet as the broker sees it: each device's retained status, watched live, and printed as a table."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence, Set
from dataclasses import dataclass

from common.mqtt import MqttLink, NotAuthorized, TlsSettings
from schemas.envelope import Envelope
from schemas.errors import ProtocolError
from schemas.model import RolloutStage
from schemas.protocol import decode
from schemas.status import DeviceStatus
from schemas.topics import PREFIX, STATUS

log = logging.getLogger("mqvox.fleet")

ACCESS_PROBE_TOPIC = PREFIX + "/models/access-probe"
"""Under the model topics, which operators alone may publish to, and read by no mqvox client: ``statuses_hidden``
publishes an empty, non-retained message there."""


@dataclass(frozen=True)
class SeenStatus:
    """A device's latest status and when it arrived."""

    status: DeviceStatus
    """The status as published."""
    arrived_at: float
    """Unix time it arrived, on this machine's clock: devices' clocks may drift."""


class FleetWatch:
    """Every device's latest status: the retained ones at once, then each new one as it is published."""

    def __init__(self, link: MqttLink) -> None:
        self._seen: dict[str, SeenStatus] = {}
        self._lock = threading.Lock()
        self._last_change = time.monotonic()
        link.subscribe(STATUS.filter(), self._on_status, qos=STATUS.qos)

    def _on_status(self, topic: str, envelope: Envelope) -> None:
        try:
            status = decode(topic, envelope)
        except ProtocolError as error:
            log.warning("ignored an invalid status on %s: %s", topic, error)
            return
        if status is None:
            return
        assert isinstance(status, DeviceStatus)
        with self._lock:
            self._seen[status.device_id] = SeenStatus(status, time.time())
            self._last_change = time.monotonic()

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 5.0) -> None:
        """Wait until no status has arrived for ``quiet_s``: the retained ones are all in."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - self._last_change
            if quiet >= quiet_s:
                return
            time.sleep(min(quiet_s - quiet, 0.1) + 0.01)

    def snapshot(self) -> dict[str, DeviceStatus]:
        """The latest status of each device, by device id."""
        return {device: seen.status for device, seen in self.seen().items()}

    def seen(self) -> dict[str, SeenStatus]:
        """The latest status of each device with its arrival time, by device id: one consistent view."""
        with self._lock:
            return dict(self._seen)


def statuses_hidden(link: MqttLink) -> bool:
    """Whether the broker's ACL keeps the devices' statuses from this link's client (one that is not an operator).

    Mosquitto 2 grants every subscription and filters at delivery, so such a client sees an empty fleet, not a
    refusal. The roles of broker_config/acl.py give the statuses to operators alone, and operators alone may publish
    under the model topics: the broker's answer to an empty message on ACCESS_PROBE_TOPIC tells an operator from any
    other client. A broker without an ACL (the development broker) accepts it.
    """
    probe = Envelope(payload=b"", content_type="application/octet-stream")
    try:
        link.publish(ACCESS_PROBE_TOPIC, probe, qos=1, retain=False)
    except NotAuthorized:
        return True
    return False


def not_an_operator(tls_folder: str | None) -> str:
    """Why a client refused an operator's rights (``statuses_hidden``) sees no status, naming its certificate's CN."""
    client = "this client"
    if tls_folder is not None:
        client = f"{TlsSettings.from_folder(tls_folder).identity()!r} (the certificate of {tls_folder})"
    return (
        f"the broker refused {client} an operator's rights (a publish to {ACCESS_PROBE_TOPIC}: Not authorized), "
        "and its ACL shows the devices' statuses to operators alone: pass --tls with an operator's client folder "
        "(firmware_tools provision --operator NAME)"
    )


def stage_of(device_id: str, stages: Sequence[RolloutStage]) -> str:
    """The name of the first stage (of cumulative stages) that includes the device, or '-'."""
    for stage in stages:
        if stage.includes(device_id):
            return stage.name
    return "-"


def status_rows(
    statuses: dict[str, DeviceStatus], stages: Sequence[RolloutStage] = (), revoked: Set[str] = frozenset()
) -> list[dict[str, str]]:
    """One row per device, sorted by id: what ``status`` prints. A revoked device's state is ``revoked``: its
    retained status may say online for ever, since the ACL refuses its offline status and Last Will."""
    rows = []
    for device_id in sorted(statuses):
        status = statuses[device_id]
        ota = status.ota
        rows.append(
            {
                "device": device_id,
                "state": "revoked" if device_id in revoked else str(status.state),
                "model": status.model_version or "-",
                "stage": stage_of(device_id, stages),
                "update": f"{ota.state} {ota.version}" if ota else "-",
                "reason": (ota.reason or "") if ota else "",
            }
        )
    return rows


def format_table(rows: list[dict[str, str]], max_reason: int = 70) -> str:
    """A plain text table with a header; long reasons are cut to ``max_reason`` characters."""
    if not rows:
        return "(no device has published a status)"
    columns = list(rows[0])
    cells = [
        [row[column] if column != "reason" else _cut(row[column], max_reason) for column in columns] for row in rows
    ]
    widths = [max(len(column), *(len(line[index]) for line in cells)) for index, column in enumerate(columns)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    return "\n".join(lines)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
