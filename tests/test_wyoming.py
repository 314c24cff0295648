"""The Wyoming speech-to-text server (cloud_worker/wyoming_stt.py), served in-process on a free port and talked to
with the wyoming package's own client, as Home Assistant's integration does: describe, real recordings, and
streams that break the rules."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import pytest
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info

from cloud_worker.__main__ import main
from cloud_worker.asr import AsrSettings
from cloud_worker.settings import WyomingSettings
from cloud_worker.wyoming_stt import SpeechToText, SpeechToTextServer, describe
from common.recording import PCM_SCALE, read_recording
from common.text_matching import normalize_transcript

from .conftest import IN_VOCABULARY_SAMPLE

FIVE = Path(__file__).parent / "data" / "fsdd" / "5_yweweler_45.flac"
"""A real spoken digit, recorded at 8 kHz (tests/data/fsdd/README.md)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serving(transcriber, scenario: Callable[[int], Awaitable[None]], **settings) -> None:
    """Run ``scenario(port)`` against a server started for it, in one event loop, and stop the server after."""
    wyoming = WyomingSettings(port=free_port(), **settings)
    service = SpeechToText(wyoming, transcriber, None, describe(AsrSettings()))

    async def run() -> None:
        server = SpeechToTextServer(service)
        await server.start()
        try:
            await asyncio.wait_for(scenario(wyoming.port), timeout=60)
        finally:
            await server.stop()

    asyncio.run(run())


def pcm16(samples: np.ndarray, channels: int = 1) -> bytes:
    """Float samples as interleaved 16-bit PCM, the same signal in every channel."""
    ints = np.clip(np.round(samples * PCM_SCALE), -32768, 32767).astype("<i2")
    return np.repeat(ints, channels).tobytes()


async def ask(port: int, events: list[Event]) -> Event | None:
    """Send ``events`` on one connection and read the answer (None when the server closed it without one)."""
    async with AsyncTcpClient("127.0.0.1", port, read_timeout=30) as client:
        for event in events:
            await client.write_event(event)
        return await client.read_event()


def request(samples: np.ndarray, rate: int, channels: int = 1, chunk_s: float = 0.1) -> list[Event]:
    """What Home Assistant sends for one utterance: transcribe, then the audio in chunks."""
    audio = pcm16(samples, channels)
    step = int(chunk_s * rate) * 2 * channels
    chunks = [
        AudioChunk(rate=rate, width=2, channels=channels, audio=audio[start : start + step]).event()
        for start in range(0, len(audio), step)
    ]
    return [
        Transcribe(language="en").event(),
        AudioStart(rate=rate, width=2, channels=channels).event(),
        *chunks,
        AudioStop().event(),
    ]


def test_describe_then_real_recordings_get_their_transcripts(transcriber) -> None:
    results = {}

    async def scenario(port: int) -> None:
        results["info"] = await ask(port, [Describe().event()])
        # The flite sample as it is (16 kHz mono), and a real FSDD digit at its own 8 kHz, in stereo.
        results["lights"] = await ask(port, request(read_recording(IN_VOCABULARY_SAMPLE, 16000), 16000))
        results["five"] = await ask(port, request(read_recording(FIVE, 8000), 8000, channels=2))

    serving(transcriber, scenario)
    info_event = results["info"]
    assert Info.is_type(info_event.type)
    (program,) = Info.from_event(info_event).asr
    assert program.name == "mqvox" and program.installed
    (model,) = program.models
    assert (model.name, model.languages, model.attribution.name) == ("tiny.en", ["en"], "OpenAI")
    assert model.version
    for name, expected in (("lights", "turn on the lights"), ("five", "five")):
        answer = results[name]
        assert Transcript.is_type(answer.type), answer
        transcript = Transcript.from_event(answer)
        assert expected in normalize_transcript(transcript.text), (name, transcript.text)
        assert transcript.language == "en"


async def raw(port: int, data: bytes) -> Event | None:
    """Send bytes as they are and read the answer; the server must then close the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(async_read_event(reader), timeout=30)
    closed = await asyncio.wait_for(reader.read(), timeout=30)
    writer.close()
    assert closed == b"", closed
    return answer


def test_bad_streams_get_an_error_and_the_server_keeps_serving() -> None:
    second = np.zeros(16000, dtype=np.float32) + 0.1
    results = {}

    async def scenario(port: int) -> None:
        chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm16(second)).event()
        results["no start"] = await ask(port, [chunk, AudioStop().event()])
        results["too long"] = await ask(port, request(np.tile(second, 3), 16000)[:-1])
        results["odd bytes"] = await ask(
            port,
            [
                AudioStart(rate=16000, width=2, channels=2).event(),
                AudioChunk(rate=16000, width=2, channels=2, audio=b"\x00" * 6).event(),
            ],
        )
        results["bad rate"] = await ask(port, [AudioStart(rate=0, width=2, channels=1).event()])
        results["other language"] = await ask(port, [Transcribe(language="de").event()])
        results["not json"] = await raw(port, b"{not json\n")
        results["no type"] = await raw(port, b'{"data": {}}\n')
        huge = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}, "payload_length": 1 << 30}
        results["huge payload"] = await raw(port, json.dumps(huge).encode() + b"\n")
        results["after"] = await ask(port, [Describe().event()])

    # No transcriber: every stream here is refused before it could be transcribed.
    serving(None, scenario, max_audio_s=2.0)
    expected = {
        "no start": "bad_audio",
        "too long": "audio_too_long",
        "odd bytes": "bad_audio",
        "bad rate": "bad_audio",
        "other language": "mismatch",
        "not json": "invalid_json",
        "no type": "missing_property",
        "huge payload": "payload_too_large",
    }
    for name, code in expected.items():
        answer = results[name]
        assert Error.is_type(answer.type), (name, answer)
        assert Error.from_event(answer).code == code, (name, Error.from_event(answer))
    assert Info.is_type(results["after"].type)


@pytest.mark.parametrize(
    "options", [["--port", "70000"], ["--max-audio-s", "0"], ["--max-audio-s", "60"]], ids=["port", "none", "long"]
)
def test_bad_settings_are_refused_with_exit_2(options: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wyoming", *options]) == 2
    assert capsys.readouterr().err.startswith("error: ")
