"""`edge-recorder analyze FILE.wav`: what the line detectors hear in a recording.

Reads a WAV file (8 kHz mono 16-bit; other sample widths and channel counts are
converted, other rates are refused with the sox command that converts them), feeds it
through the same :class:`drivers.dsp.analyzer.LineAnalyzer` the call engine runs live, and
prints one line per event.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from drivers.dsp.events import Answer, CallerId, DetectorEvent, DtmfDigit, Tone, Voice

SAMPLE_RATE = 8000
CHUNK_SAMPLES = 8000 * 10


class AnalyzeError(Exception):
    """The input cannot be analysed (one-line message naming the file)."""


def read_wav(path: Path) -> Iterator[np.ndarray]:
    """Yield int16 mono chunks of an 8 kHz WAV file of any PCM width and channel count."""
    try:
        wav = wave.open(str(path), "rb")  # noqa: SIM115 - closed by the with below
    except (wave.Error, EOFError) as exc:
        raise AnalyzeError(f"{path}: not a PCM WAV file ({exc})") from None
    with wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        if rate != SAMPLE_RATE:
            raise AnalyzeError(f"{path}: sample rate {rate} Hz, need 8000 Hz; convert with "
                               f"`sox {path} -r 8000 -c 1 -b 16 out.wav`")
        if width not in (1, 2, 3, 4):
            raise AnalyzeError(f"{path}: {width * 8}-bit samples are not supported")
        while frames := wav.readframes(CHUNK_SAMPLES):
            yield _to_int16(frames, width, channels)


def _to_int16(frames: bytes, width: int, channels: int) -> np.ndarray:
    if width == 1:  # WAV 8-bit is unsigned
        pcm = (np.frombuffer(frames, np.uint8).astype(np.int32) - 128) << 8
    elif width == 3:
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3).astype(np.int32)
        pcm = (raw[:, 0] << 8 | raw[:, 1] << 16 | raw[:, 2] << 24) >> 16
    else:
        dtype = np.int16 if width == 2 else np.int32
        pcm = np.frombuffer(frames, dtype).astype(np.int32)
        if width == 4:
            pcm >>= 16
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    return np.clip(pcm, -32768, 32767).astype(np.int16)


def event_record(event: DetectorEvent) -> dict[str, Any]:
    """The JSON object of one event (the keys documented in the CLI help must stay)."""
    t = round(event.sample / SAMPLE_RATE, 3)
    if isinstance(event, DtmfDigit):
        record: dict[str, Any] = {"event": "dtmf", "t": t, "digit": event.digit}
        if event.end_sample is not None:
            record["end"] = round(event.end_sample / SAMPLE_RATE, 3)
        return record
    if isinstance(event, CallerId):
        return {"event": "caller_id", "t": t, "number": event.number, "name": event.name,
                "standard": event.standard, "absence": event.absence, "when": event.when}
    if isinstance(event, Tone):
        return {"event": "tone", "t": t, "end": round(event.end_sample / SAMPLE_RATE, 3),
                "tone": event.tone}
    if isinstance(event, Voice):
        end = None if event.end_sample is None else round(event.end_sample / SAMPLE_RATE, 3)
        return {"event": "voice", "t": t, "end": end}
    if isinstance(event, Answer):
        return {"event": "answer", "t": t}
    raise TypeError(f"unknown event {event!r}")


def _timeline_line(record: dict[str, Any]) -> str:
    t = record["t"]
    stamp = f"{int(t // 60):3d}:{t % 60:06.3f}"
    kind = record["event"]
    if kind == "dtmf":
        return f"{stamp}  DTMF      {record['digit']}"
    if kind == "caller_id":
        who = record["number"] or f"withheld ({record['absence']})"
        name = f"  {record['name']}" if record["name"] else ""
        return f"{stamp}  CALLER ID {who}{name}  [{record['standard']}]"
    if kind == "tone":
        return f"{stamp}  TONE      {record['tone']} until {record['end']:.3f} s"
    if kind == "voice":
        end = "..." if record["end"] is None else f"until {record['end']:.3f} s"
        return f"{stamp}  VOICE     {end}"
    return f"{stamp}  ANSWER"


def analyze_file(path: Path, analyzer: Any, out: TextIO, *, as_json: bool) -> int:
    """Feed ``path`` through ``analyzer``; write events; return how many."""
    sample = 0
    count = 0
    for chunk in read_wav(path):
        for event in analyzer.feed(sample, chunk):
            record = event_record(event)
            out.write((json.dumps(record) if as_json else _timeline_line(record)) + "\n")
            count += 1
        sample += len(chunk)
    for event in getattr(analyzer, "finish", lambda s: [])(sample):
        record = event_record(event)
        out.write((json.dumps(record) if as_json else _timeline_line(record)) + "\n")
        count += 1
    return count
