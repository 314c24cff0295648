"""The audio the device listens to: a microphone, a recording, or raw PCM on stdin, as blocks at the device rate.

Every source yields mono float32 blocks in [-1, 1] at ``DEVICE_SAMPLE_RATE``, each ``block_samples`` long
except perhaps the last one of a file or stream. Input at another rate goes through one stateful soxr stream,
so block boundaries leave no trace in the signal. ``sounddevice`` is imported only by :class:`MicrophoneSource`,
so files and stdin work on a machine without PortAudio.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import soundfile
import soxr

from common.recording import DEVICE_SAMPLE_RATE, PCM_SCALE, unreadable
from device.settings import AudioSettings, AudioSourceKind

log = logging.getLogger(__name__)

BLOCK_SAMPLES = 480
"""Samples per block by default: 30 ms at 16 kHz, a frame length webrtcvad accepts."""

MIN_STREAM_RATE = 8000
"""Lowest sample rate (hertz) accepted for raw PCM: below it speech loses the band the model listens to."""

MAX_STREAM_RATE = 192000
"""Highest sample rate (hertz) accepted for raw PCM; anything above is a mistyped argument, not an audio device."""

MIN_READ_S = 0.01
"""Least audio (seconds) read from a file, a stream or the microphone at once, whatever the block size."""

MICROPHONE_QUEUE_BLOCKS = 64
"""Blocks the microphone may hold for a slow reader (about 2 s of 30 ms blocks) before it drops new ones."""

MICROPHONE_POLL_S = 0.1
"""How often (seconds) a reader waiting on the microphone checks whether the source was closed."""

SOURCE_KINDS = ("microphone", "file", "stdin")
"""Kinds :func:`open_source` knows."""


class AudioSourceError(ValueError):
    """An audio source that cannot be opened or read: a bad file, a bad stream setting, no usable microphone."""


class ByteStream(Protocol):
    """A binary stream, as far as :class:`StdinSource` needs one."""

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes; empty at the end of the stream."""
        ...


class AudioSource(ABC):
    """Mono float32 blocks in [-1, 1] at the device rate; closed by :meth:`close` or by leaving a ``with`` block."""

    sample_rate: int = DEVICE_SAMPLE_RATE
    """Rate (hertz) of every block a source yields, whatever the rate of its input."""

    @abstractmethod
    def blocks(self) -> Iterator[np.ndarray]:
        """The audio, block by block, until the input ends or the source is closed."""

    @abstractmethod
    def close(self) -> None:
        """Release what the source holds; a reader of :meth:`blocks` stops at its next block."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def open_source(
    kind: str,
    *,
    path: str | Path | None = None,
    device: int | str | None = None,
    stdin: ByteStream | None = None,
    stdin_sample_rate: int = DEVICE_SAMPLE_RATE,
    block_samples: int = BLOCK_SAMPLES,
) -> AudioSource:
    """The source of ``kind`` ("microphone", "file" or "stdin"), from the settings that kind uses."""
    if kind == "microphone":
        return MicrophoneSource(device, block_samples=block_samples)
    if kind == "file":
        if path is None:
            raise AudioSourceError("a file source needs a path")
        return FileSource(path, block_samples=block_samples)
    if kind == "stdin":
        return StdinSource(stdin, sample_rate=stdin_sample_rate, block_samples=block_samples)
    raise AudioSourceError(f"unknown audio source {kind!r} (one of {', '.join(SOURCE_KINDS)})")


class FileSource(AudioSource):
    """A recording (WAV, FLAC, OGG: what libsndfile reads), streamed block by block, never read whole."""

    def __init__(self, path: str | Path, block_samples: int = BLOCK_SAMPLES) -> None:
        self.path = Path(path)
        """The recording."""
        self.block_samples = _checked_block_samples(block_samples)
        """Samples per block yielded."""
        try:
            self._file = soundfile.SoundFile(self.path)
        except (soundfile.LibsndfileError, OSError) as error:
            raise AudioSourceError(unreadable(self.path, error)) from None
        if self._file.frames == 0:
            self._file.close()
            raise AudioSourceError(f"audio file {self.path} holds no samples")

    @property
    def duration_s(self) -> float:
        """Length of the recording (seconds), from its header."""
        return self._file.frames / self._file.samplerate

    def blocks(self) -> Iterator[np.ndarray]:
        """The recording from its start; AudioSourceError at the first NaN or infinite sample."""
        return _at_device_rate(self._mono_chunks(), self._file.samplerate, self.block_samples)

    def close(self) -> None:
        self._file.close()

    def _mono_chunks(self) -> Iterator[np.ndarray]:
        """The file's samples at its own rate, channels averaged, about one block's worth at a time."""
        rate = self._file.samplerate
        read_samples = _input_samples(self.block_samples, rate)
        read_total = 0
        if not self._file.closed:
            self._file.seek(0)
        while not self._file.closed:
            try:
                frames = self._file.read(read_samples, dtype="float32", always_2d=True)
            except soundfile.LibsndfileError as error:
                raise AudioSourceError(f"cannot read audio file {self.path}: {error.error_string}") from None
            if frames.shape[0] == 0:
                break
            mono = frames.mean(axis=1, dtype=np.float32)
            finite = np.isfinite(mono)
            if not finite.all():
                at_s = (read_total + int(np.argmin(finite))) / rate
                raise AudioSourceError(f"audio file {self.path} holds NaN or infinite samples (at {at_s:.3f} s)")
            read_total += mono.size
            yield mono
        if read_total == 0 and not self._file.closed:
            # The header announced samples that are not there: a truncated file.
            raise AudioSourceError(f"audio file {self.path} holds no samples")


class StdinSource(AudioSource):
    """Raw signed 16-bit little-endian mono PCM from a binary stream (by default this process's stdin).

    A stream that ends in the middle of a sample loses that last byte with a logged warning rather than an
    error: the audio before it is sound, and the usual cause is a recorder stopped mid-write.
    """

    def __init__(
        self,
        stream: ByteStream | None = None,
        sample_rate: int = DEVICE_SAMPLE_RATE,
        block_samples: int = BLOCK_SAMPLES,
    ) -> None:
        self.stream: ByteStream = sys.stdin.buffer if stream is None else stream
        """Where the PCM bytes come from; the caller owns it, so :meth:`close` leaves it open."""
        self.input_rate = _checked_stream_rate(sample_rate)
        """Rate (hertz) of the PCM in the stream; blocks come out at ``sample_rate`` all the same."""
        self.block_samples = _checked_block_samples(block_samples)
        """Samples per block yielded."""
        self._closed = False

    def blocks(self) -> Iterator[np.ndarray]:
        """The stream's audio until it ends or the source is closed."""
        return _at_device_rate(self._pcm_chunks(), self.input_rate, self.block_samples)

    def close(self) -> None:
        self._closed = True

    def _pcm_chunks(self) -> Iterator[np.ndarray]:
        """Float samples at the stream's rate, whatever byte counts its reads return."""
        read_bytes = 2 * _input_samples(self.block_samples, self.input_rate)
        carried = b""
        while not self._closed:
            data = self.stream.read(read_bytes)
            if not data:
                break
            data = carried + data
            whole = len(data) - len(data) % 2
            carried = data[whole:]
            if whole:
                yield np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / np.float32(PCM_SCALE)
        if carried:
            log.warning("stdin ended mid-sample: dropped its last byte")


class MicrophoneSource(AudioSource):
    """An input device through PortAudio (``sounddevice``), at 16 kHz if it offers it, else resampled.

    The PortAudio callback only copies each block into a bounded queue and never waits: when the reader falls
    behind, new blocks are dropped and counted rather than stalling the audio thread.
    """

    def __init__(
        self,
        device: int | str | None = None,
        block_samples: int = BLOCK_SAMPLES,
        queue_blocks: int = MICROPHONE_QUEUE_BLOCKS,
    ) -> None:
        self.block_samples = _checked_block_samples(block_samples)
        """Samples per block yielded."""
        if isinstance(queue_blocks, bool) or not isinstance(queue_blocks, int) or queue_blocks < 1:
            raise AudioSourceError(f"queue_blocks must be a positive integer, not {queue_blocks!r}")
        self.dropped_blocks = 0
        """Blocks lost because the queue was full: the reader was too slow."""
        self.input_overflows = 0
        """Callbacks in which PortAudio reported an input overflow: audio lost before it reached the queue."""
        self._queue: queue.Queue[np.ndarray] = queue.Queue(maxsize=queue_blocks)
        self._closed = False
        sounddevice = _import_sounddevice()
        self._sounddevice = sounddevice
        try:
            devices = list(sounddevice.query_devices())
            default_input = sounddevice.default.device[0]
        except sounddevice.PortAudioError as error:
            raise AudioSourceError(f"cannot list audio devices: {error}") from None
        chosen = pick_input_device(devices, device, default_input)
        self.device_name: str = chosen["name"]
        """Name of the input device in use."""
        self.input_rate = self._best_rate(sounddevice, chosen)
        """Rate (hertz) the device is opened at; blocks come out at ``sample_rate`` all the same."""
        try:
            self._stream = sounddevice.InputStream(
                device=chosen["index"],
                channels=1,
                samplerate=self.input_rate,
                dtype="float32",
                blocksize=_input_samples(self.block_samples, self.input_rate),
                callback=self._on_audio,
            )
        except (sounddevice.PortAudioError, ValueError) as error:
            raise AudioSourceError(f"cannot open microphone {self.device_name!r}: {error}") from None

    def blocks(self) -> Iterator[np.ndarray]:
        """The microphone's audio, starting now, until the source is closed."""
        if not self._stream.active:
            try:
                self._stream.start()
            except self._sounddevice.PortAudioError as error:
                raise AudioSourceError(f"cannot start microphone {self.device_name!r}: {error}") from None
        return _at_device_rate(self._queued_chunks(), self.input_rate, self.block_samples)

    def close(self) -> None:
        self._closed = True
        self._stream.close(ignore_errors=True)

    @staticmethod
    def _best_rate(sounddevice: Any, chosen: Mapping[str, Any]) -> int:
        """16 kHz if the device takes it, so nothing needs resampling; else the device's default rate."""
        try:
            sounddevice.check_input_settings(
                device=chosen["index"], channels=1, dtype="float32", samplerate=DEVICE_SAMPLE_RATE
            )
        except (sounddevice.PortAudioError, ValueError):
            return int(chosen["default_samplerate"])
        return DEVICE_SAMPLE_RATE

    def _on_audio(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        """PortAudio's callback, on its audio thread: copy the block and return at once."""
        if status.input_overflow:
            self.input_overflows += 1
        try:
            self._queue.put_nowait(indata[:, 0].copy())
        except queue.Full:
            self.dropped_blocks += 1

    def _queued_chunks(self) -> Iterator[np.ndarray]:
        """Blocks from the callback at the device's rate, with a warning whenever some were lost."""
        lost_reported = 0
        while not self._closed:
            try:
                chunk = self._queue.get(timeout=MICROPHONE_POLL_S)
            except queue.Empty:
                if not self._closed and not self._stream.active:
                    raise AudioSourceError(f"microphone {self.device_name!r} stopped delivering audio") from None
                continue
            lost = self.dropped_blocks + self.input_overflows
            if lost > lost_reported:
                log.warning(
                    "microphone lost audio: %d blocks dropped, %d input overflows",
                    self.dropped_blocks,
                    self.input_overflows,
                )
                lost_reported = lost
            yield chunk


def pick_input_device(
    devices: Sequence[Mapping[str, Any]], wanted: int | str | None, default_input: int = -1
) -> Mapping[str, Any]:
    """The input device among ``devices`` (as ``sounddevice.query_devices`` lists them) that ``wanted`` names.

    ``wanted`` is an index, a case-insensitive part of a name (an exact name wins over parts), or None for
    ``default_input``. No match, or a part matching several inputs, raises AudioSourceError listing the inputs.
    """
    inputs = [device for device in devices if device["max_input_channels"] > 0]
    if not inputs:
        asked = f" (asked for {wanted!r})" if wanted is not None else ""
        raise AudioSourceError(f"no audio input devices found{asked}: is a microphone connected?")
    if wanted is None:
        matches = [device for device in inputs if device["index"] == default_input]
        what = "no default input device"
    elif isinstance(wanted, int) and not isinstance(wanted, bool):
        matches = [device for device in inputs if device["index"] == wanted]
        what = f"no input device with index {wanted}"
    elif isinstance(wanted, str):
        needle = wanted.casefold()
        matches = [device for device in inputs if device["name"].casefold() == needle] or [
            device for device in inputs if needle in device["name"].casefold()
        ]
        what = f"{len(matches)} input devices match {wanted!r}" if matches else f"no input device matches {wanted!r}"
    else:
        raise AudioSourceError(f"an input device is an index or a name, not {wanted!r}")
    if len(matches) != 1:
        listing = "; ".join(f"{device['index']}: {device['name']}" for device in inputs)
        raise AudioSourceError(f"{what}; available inputs: {listing}")
    return matches[0]


def _import_sounddevice() -> Any:
    """The sounddevice module, or AudioSourceError saying what to install."""
    try:
        import sounddevice  # only the microphone needs PortAudio
    except ImportError:
        raise AudioSourceError("the microphone needs sounddevice: pip install 'mqvox[device]'") from None
    except OSError as error:
        # sounddevice raises OSError when the PortAudio library itself is missing.
        raise AudioSourceError(f"the microphone needs PortAudio ({error}): install libportaudio2") from None
    return sounddevice


def _at_device_rate(chunks: Iterable[np.ndarray], input_rate: int, block_samples: int) -> Iterator[np.ndarray]:
    """Mono float32 ``chunks`` at ``input_rate``, resampled and cut into blocks of ``block_samples``."""
    resampler = None
    if input_rate != DEVICE_SAMPLE_RATE:
        resampler = soxr.ResampleStream(input_rate, DEVICE_SAMPLE_RATE, 1, dtype="float32")
    pending = np.zeros(0, np.float32)
    for chunk in chunks:
        if resampler is not None:
            chunk = resampler.resample_chunk(chunk)
        pending = np.concatenate((pending, chunk))
        whole = pending.size - pending.size % block_samples
        yield from _clipped(pending[:whole]).reshape(-1, block_samples)
        pending = pending[whole:]
    if resampler is not None:
        pending = np.concatenate((pending, resampler.resample_chunk(np.zeros(0, np.float32), last=True)))
    whole = pending.size - pending.size % block_samples
    yield from _clipped(pending[:whole]).reshape(-1, block_samples)
    if pending.size > whole:
        yield _clipped(pending[whole:])


def _clipped(samples: np.ndarray) -> np.ndarray:
    """``samples`` limited to [-1, 1], since resampling full-scale audio overshoots a little."""
    return np.clip(samples, -1.0, 1.0)


def _input_samples(block_samples: int, input_rate: int) -> int:
    """Input samples to read at once: about one output block, so reads keep pace with blocks, and no fewer than
    ``MIN_READ_S`` worth, so tiny blocks do not cost one read or one audio callback per sample."""
    block_s = block_samples / DEVICE_SAMPLE_RATE
    return math.ceil(max(block_s, MIN_READ_S) * input_rate)


def _checked_block_samples(block_samples: int) -> int:
    if isinstance(block_samples, bool) or not isinstance(block_samples, int) or block_samples < 1:
        raise AudioSourceError(f"block_samples must be a positive integer, not {block_samples!r}")
    return block_samples


def _checked_stream_rate(sample_rate: int) -> int:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise AudioSourceError(f"stdin sample rate must be an integer number of hertz, not {sample_rate!r}")
    if not MIN_STREAM_RATE <= sample_rate <= MAX_STREAM_RATE:
        raise AudioSourceError(f"stdin sample rate {sample_rate} Hz is outside {MIN_STREAM_RATE}..{MAX_STREAM_RATE} Hz")
    return sample_rate


class PlaylistSource(AudioSource):
    """Recordings played one after another as one stream, with silence between them.

    The silence lets an utterance at the end of one file end (trailing silence) before
    the next file starts, as it would between two people speaking to the device.
    """

    def __init__(self, paths: Sequence[str | Path], block_samples: int = BLOCK_SAMPLES, gap_s: float = 1.0) -> None:
        if not paths:
            raise AudioSourceError("a playlist needs at least one recording")
        # Opened now, so a bad file is reported before the device connects.
        self.files = [FileSource(path, block_samples) for path in paths]
        """The recordings, in order."""
        self.block_samples = block_samples
        self.gap_s = gap_s
        """Silence (seconds) after each recording."""
        self._closed = False

    def blocks(self) -> Iterator[np.ndarray]:
        silence = np.zeros(self.block_samples, np.float32)
        for source in self.files:
            for block in source.blocks():
                if self._closed:
                    return
                yield block
            for _ in range(math.ceil(self.gap_s * self.sample_rate / self.block_samples)):
                if self._closed:
                    return
                yield silence

    def close(self) -> None:
        self._closed = True
        for source in self.files:
            source.close()


def open_configured_source(audio: AudioSettings, *, stdin: ByteStream | None = None) -> AudioSource:
    """The source a device config asks for (``[audio]``); file sources play all their files in order."""
    block_samples = DEVICE_SAMPLE_RATE * audio.block_ms // 1000
    if audio.source == AudioSourceKind.FILE:
        return PlaylistSource(audio.files, block_samples)
    return open_source(
        str(audio.source),
        device=audio.input_device,
        stdin=stdin,
        stdin_sample_rate=audio.stdin_sample_rate,
        block_samples=block_samples,
    )
