"""`edge-recorder analyze`: the simulated line's audio in, its calls' facts out as JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


def write_wav(path: Path, pcm: np.ndarray, rate: int = 8000, width: int = 2,
              channels: int = 1) -> None:
    if width == 1:
        data = ((pcm.astype(np.int32) >> 8) + 128).astype(np.uint8).tobytes()
    elif width == 3:
        wide = pcm.astype(np.int32) << 8
        data = np.stack([wide & 0xFF, (wide >> 8) & 0xFF, (wide >> 16) & 0xFF],
                        axis=1).astype(np.uint8).tobytes()
    else:
        data = pcm.astype(np.int16).tobytes()
    if channels == 2:
        frame = len(data) // len(pcm)
        arr = np.frombuffer(data, np.uint8).reshape(-1, frame)
        data = np.concatenate([arr, arr], axis=1).tobytes()
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(data)


def events(result: subprocess.CompletedProcess[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def outbound(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list]:
    pcm, _events, truth = render(load_scenario(REPO / "examples" / "scenarios" / "outbound.toml"))
    path = tmp_path_factory.mktemp("analyze") / "outbound.wav"
    write_wav(path, pcm)
    return path, pcm, truth


def test_outbound_call_digits_tones_voice_answer(outbound: tuple[Path, np.ndarray, list]) -> None:
    path, _pcm, (truth,) = outbound
    found = events(cli("analyze", str(path), "--country", "DE", "--json"))
    digits = [e for e in found if e["event"] == "dtmf"]
    assert "".join(e["digit"] for e in digits) == truth.dialed
    for event, sample in zip(digits, truth.digit_samples, strict=True):
        assert event["t"] == pytest.approx(sample / 8000, abs=0.03)
    tones = [e["tone"] for e in found if e["event"] == "tone"]
    assert "dial" in tones and "ringback" in tones and "busy" in tones
    assert any(e["event"] == "voice" for e in found)
    (answer,) = [e for e in found if e["event"] == "answer"]
    assert answer["t"] == pytest.approx(truth.far_speech_sample / 8000, abs=0.5)
    assert all(set(e) >= {"event", "t"} for e in found)


@pytest.mark.parametrize("scenario", ["inbound-us-bell202", "inbound-uk-dtas",
                                      "inbound-nl-dtmf", "inbound"])
def test_caller_id_in_every_standard(tmp_path: Path, scenario: str) -> None:
    parsed = load_scenario(REPO / "examples" / "scenarios" / f"{scenario}.toml")
    pcm, _events, truths = render(parsed)
    path = tmp_path / "line.wav"
    write_wav(path, pcm)
    found = events(cli("analyze", str(path), "--country", parsed.country, "--json"))
    cids = [e for e in found if e["event"] == "caller_id"]
    expected = [t for t in truths if t.cid != "none"]
    assert [c["number"] for c in cids] == [t.caller for t in expected]
    for cid, truth in zip(cids, expected, strict=True):
        assert cid["name"] == truth.caller_name
        assert cid["standard"] == {"bell202_sdmf": "bell202", "v23_dtas": "v23"}.get(
            truth.cid, truth.cid)


@pytest.mark.parametrize(("width", "channels"), [(1, 1), (3, 1), (4, 1), (2, 2)])
def test_other_widths_and_channels_are_converted(tmp_path: Path, outbound: tuple,
                                                 width: int, channels: int) -> None:
    _path, pcm, (truth,) = outbound
    path = tmp_path / "x.wav"
    write_wav(path, pcm, width=min(width, 3) if width != 4 else 2, channels=channels)
    if width == 4:  # 32-bit: write directly
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(4)
            wav.setframerate(8000)
            wav.writeframes((pcm.astype(np.int32) << 16).tobytes())
    found = events(cli("analyze", str(path), "--json"))
    digits = "".join(e["digit"] for e in found if e["event"] == "dtmf")
    assert digits == truth.dialed


def test_readable_timeline(outbound: tuple[Path, np.ndarray, list]) -> None:
    path, _pcm, (truth,) = outbound
    result = cli("analyze", str(path), "--country", "DE")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert sum("DTMF" in line for line in lines) == len(truth.dialed)
    assert any("ANSWER" in line for line in lines) and any("TONE" in line for line in lines)


def test_bad_inputs_are_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    fast = tmp_path / "fast.wav"
    write_wav(fast, np.zeros(16000, np.int16), rate=16000)
    for args, needle in ((["analyze", str(text)], "not a PCM WAV"),
                         (["analyze", str(fast)], "sample rate 16000 Hz"),
                         (["analyze", str(tmp_path / "none.wav")], "no such file"),
                         (["analyze", str(fast), "--country", "XX"], "unknown country")):
        result = cli(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and needle in result.stderr, result.stderr
