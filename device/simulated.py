"""Simulated devices: the real device runtime, updater included, listening to generated silence.

For fleet drills (bench/rollout_drill.py) and tests: many devices in one process, each
with its own MQTT connection, state folder and model, doing exactly what ``python -m
device run`` does, minus the microphone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from device.audio_sources import AudioSource
from device.ota import open_starting_model
from device.runtime import DeviceRuntime
from device.settings import DeviceSettings


class SilenceSource(AudioSource):
    """Blocks of silence, one every ``interval_s``, until closed: a quiet room, slowed down to spare the CPU."""

    def __init__(self, block_ms: int = 30, interval_s: float = 0.3) -> None:
        self.block = np.zeros(self.sample_rate * block_ms // 1000, np.float32)
        self.interval_s = interval_s
        self._closed = threading.Event()

    def blocks(self) -> Iterator[np.ndarray]:
        while not self._closed.wait(self.interval_s):
            yield self.block

    def close(self) -> None:
        self._closed.set()


class SimulatedDevice:
    """One device runtime on a thread of its own; ``stop()`` stops it cleanly (offline status, no Last Will)."""

    def __init__(self, settings: DeviceSettings, *, interval_s: float = 0.3, source: AudioSource | None = None) -> None:
        """``source`` is what the device hears; by default a quiet room (a silent block every ``interval_s``)."""
        starting = open_starting_model(settings)
        self.settings = settings
        self.runtime = DeviceRuntime(settings, starting.model, starting)
        self.source = source or SilenceSource(settings.audio.block_ms, interval_s)
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"device-{settings.device_id}", daemon=True)

    @property
    def device_id(self) -> str:
        return self.settings.device_id

    def start(self) -> SimulatedDevice:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.runtime.run(self.source)
        except BaseException as error:  # kept for the drill or test to report
            self.failure = error

    def stop(self, timeout_s: float = 30.0) -> None:
        self.runtime.stop()
        self._thread.join(timeout_s)
