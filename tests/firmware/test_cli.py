"""The command line: happy paths through the real entry point, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
import wave
from pathlib import Path

import pytest

from firmware.agecrypt import Identity
from firmware.recfile import RecordingWriter

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120, check=False)


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def recording(tmp_path: Path) -> tuple[Path, Path]:
    """A short finished recording and the identity file that opens it."""
    import numpy as np

    identity = Identity.generate()
    key = tmp_path / "central.key"
    assert cli("keygen", "-o", str(key)).returncode == 0
    identity = Identity.parse(key.read_text().splitlines()[-1])
    path = tmp_path / "r.rec"
    t = np.arange(8000 * 3) / 8000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    with RecordingWriter(path, recipients=[identity.recipient],
                         header={"recording_id": "r"}) as writer:
        for start in range(0, len(pcm), 160):
            writer.write_audio(start, pcm[start:start + 160])
        writer.close("hangup")
    return path, key


def test_keygen_prints_recipient_and_refuses_overwrite(tmp_path: Path) -> None:
    key = tmp_path / "k"
    made = cli("keygen", "-o", str(key))
    assert made.returncode == 0 and made.stdout.startswith("age1")
    assert key.stat().st_mode & 0o777 == 0o600
    one_line_error(cli("keygen", "-o", str(key)), "refusing to overwrite")


def test_decrypt_to_wav_that_sox_opens(recording: tuple[Path, Path], tmp_path: Path) -> None:
    path, key = recording
    out = tmp_path / "out.wav"
    result = cli("decrypt", "--identity", str(key), str(path), "-o", str(out))
    assert result.returncode == 0, result.stderr
    with wave.open(str(out)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (8000, 2, 1)
        assert wav.getnframes() == 8000 * 3
    info = subprocess.run(["sox", "--i", "-D", str(out)], capture_output=True, text=True,
                          check=True)
    assert float(info.stdout) == pytest.approx(3.0)


def test_export_age_opens_with_age_cli(recording: tuple[Path, Path], tmp_path: Path) -> None:
    path, key = recording
    out = tmp_path / "out.age"
    assert cli("export-age", "--identity", str(key), str(path), "-o", str(out)).returncode == 0
    plain = subprocess.run(["age", "-d", "-i", str(key), str(out)], capture_output=True,
                           check=True).stdout
    assert plain[:4] == b"RIFF" and plain[8:12] == b"WAVE"
    assert len(plain) == 44 + 8000 * 3 * 2


def test_wrong_identity_and_damaged_files(recording: tuple[Path, Path], tmp_path: Path) -> None:
    path, _key = recording
    other = tmp_path / "other.key"
    cli("keygen", "-o", str(other))
    one_line_error(cli("decrypt", "--identity", str(other), str(path), "-o", str(tmp_path / "x")),
                   "no identity")
    junk = tmp_path / "junk.rec"
    junk.write_bytes(b"this is not a recording\n" * 10)
    one_line_error(cli("decrypt", "--identity", str(other), str(junk), "-o", str(tmp_path / "x")),
                   "junk.rec")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("AGE-SECRET-KEY-1NOTAKEY\n")
    one_line_error(cli("decrypt", "--identity", str(bad_key), str(path), "-o", str(tmp_path / "x")),
                   "bad.key")


@pytest.mark.parametrize("args", [
    [], ["frobnicate"], ["decrypt"], ["decrypt", "--identity", "/nonexistent", "x", "-o", "y"],
    ["demo", "--speed", "fast"], ["audit", "verify"], ["recordings", "list", "--limit", "many"],
    ["config", "check"],
])
def test_usage_errors_are_one_line(args: list[str]) -> None:
    result = cli(*args)
    one_line_error(result)
    assert result.returncode == 2


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    one_line_error(cli("recordings", "list", "--config", str(tmp_path / "none.toml")),
                   "none.toml", "cannot read")
    one_line_error(cli("run", "--config", str(tmp_path / "none.toml")), "cannot read")


def test_sim_render_writes_the_line(tmp_path: Path) -> None:
    out = tmp_path / "line.wav"
    events = tmp_path / "events.jsonl"
    result = cli("sim", "render", str(REPO / "examples" / "scenarios" / "inbound.toml"),
                 "-o", str(out), "--events", str(events))
    assert result.returncode == 0, result.stderr
    lines = events.read_text().splitlines()
    assert any('"ring_on"' in line for line in lines) and any('"hook_off"' in line for line in lines)
    with wave.open(str(out)) as wav:
        assert wav.getnframes() > 8000 * 12
    bad = tmp_path / "bad.toml"
    bad.write_text('country = "DE"\n[[calls]]\ndirection = "sideways"\n')
    one_line_error(cli("sim", "render", str(bad), "-o", str(out)), "bad.toml", "direction")
