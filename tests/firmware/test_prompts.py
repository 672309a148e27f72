"""Prompt audio: the espeak-ng build, the loader's checks and fallbacks, the warning beep,
and the chime that must not sound like a DTMF digit or a call-progress tone anywhere."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest

from drivers.dsp.dtmf import COL_HZ, ROW_HZ, DtmfDetector
from drivers.dsp.tones import ToneDetector
from drivers.toneplan import countries, tone_plan
from firmware.policyfile import parse_policy
from firmware.policystore import BUILTIN_PATH
from firmware.promptbuild import (
    active_level_dbfs,
    build_prompts,
    load_texts,
    main,
    parse_texts,
    resample,
)
from firmware.prompts import (
    CHIME_NOTES_HZ,
    MANIFEST_NAME,
    PROMPT_NAMES,
    TEXTS_PATH,
    PromptError,
    PromptSet,
    beep_tone,
    chime,
    default_directories,
    fallback_chain,
    pcm_sha256,
    read_prompt_wav,
)
from firmware.recfile import wav_bytes

REPO = Path(__file__).resolve().parents[2]
RATE = 8000
ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed")

GERMAN = """
[languages.de]
voice = "de"
notice = "Dieses Gespräch wird zur Qualitätssicherung und zu Schulungszwecken aufgezeichnet."
consent = "Nur mit Ihrer Zustimmung. Drücken Sie die 1."
"""


def write_wav(path: Path, pcm: np.ndarray, *, rate: int = RATE, channels: int = 1,
              width: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(pcm.tobytes())
    return path


def texts_file(tmp_path: Path, text: str, name: str = "texts.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def feed(detector: DtmfDetector | ToneDetector, pcm: np.ndarray) -> list[object]:
    events: list[object] = []
    for start in range(0, len(pcm), 160):
        events += detector.feed(start, pcm[start:start + 160])
    return events


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def peak_hz(pcm: np.ndarray) -> float:
    padded = np.zeros(RATE * 8)
    padded[:len(pcm)] = pcm  # zero-padding: bins 0.125 Hz apart
    spectrum = np.abs(np.fft.rfft(padded))
    return float(np.fft.rfftfreq(len(padded), 1 / RATE)[spectrum.argmax()])


# --- the texts ------------------------------------------------------------------------------
def test_every_policy_language_has_both_prompt_texts() -> None:
    policy = parse_policy(BUILTIN_PATH.read_bytes(), "policy.toml")
    languages = {code for rule in policy.rules() for code in rule.languages}
    texts = load_texts(TEXTS_PATH)
    assert languages <= set(texts)
    for language in languages:
        for name in PROMPT_NAMES:
            assert texts[language].text(name).strip()
    assert "1" in texts["de"].consent and "1" in texts["en"].consent


@pytest.mark.parametrize(("body", "needle"), [
    ("[languages.de]\nnotice = 'x'\n", "languages.de.consent: required key is missing"),
    ("[languages.de]\nnotice = 'x'\nconsent = 'y'\ncolour = 'z'\n", "languages.de.colour: unknown key"),
    ("[languages.DE]\nnotice = 'x'\nconsent = 'y'\n", "languages.DE: not a language code"),
    ("[languages.de]\nnotice = ' '\nconsent = 'y'\n", "languages.de.notice: empty text"),
    ("[languages.de]\nvoice = '-w'\nnotice = 'x'\nconsent = 'y'\n", "languages.de.voice:"),
    ("[languages.de]\nnotice = 'x'\nconsent = 3\n", "languages.de.consent: expected `str`"),
    ("[other]\n", "t.toml: other: unknown key"),
    ("languages = 1\n", "t.toml: languages: required table"),
    ("[languages.de\n", "t.toml: not valid TOML"),
])
def test_bad_texts_file_is_one_line_naming_the_key(body: str, needle: str) -> None:
    with pytest.raises(PromptError) as err:
        parse_texts(body.encode(), "t.toml")
    assert needle in str(err.value) and "\n" not in str(err.value)


# --- the build ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    if ESPEAK is None:
        pytest.skip("espeak-ng is not installed")
    out = tmp_path_factory.mktemp("prompts")
    return out, build_prompts(out)


def test_build_writes_every_voiced_language_in_line_format(
        built: tuple[Path, list[Path]]) -> None:
    out, paths = built
    texts = load_texts(TEXTS_PATH)
    voiced = {code for code, entry in texts.items() if entry.voice is not None}
    assert {"gl", "zu"} <= set(texts) - voiced  # no espeak-ng voice: skipped
    expected = {out / code / f"{name}.wav" for code in voiced for name in PROMPT_NAMES}
    assert set(paths) == expected
    assert set(out.glob("*/*.wav")) == expected
    for path in paths:
        with wave.open(str(path), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (RATE, 1, 2)
            assert wav.getcomptype() == "NONE"
        pcm = read_prompt_wav(path)
        assert 1.5 < len(pcm) / RATE < 20.0, path  # one or a few spoken sentences
        assert abs(active_level_dbfs(pcm.astype(float)) + 16.0) < 1.0, path
        assert 20000 < np.abs(pcm).max() <= 29300, path  # speech, peaks limited near -1 dBFS


def test_speech_differs_between_languages(built: tuple[Path, list[Path]]) -> None:
    out, paths = built
    hashes = {pcm_sha256(read_prompt_wav(path)) for path in paths}
    assert len(hashes) == len(paths)  # nb and nn share a voice, not a text
    german = read_prompt_wav(out / "de" / "notice.wav")
    english = read_prompt_wav(out / "en" / "notice.wav")
    assert abs(len(german) - len(english)) > RATE // 2  # not the same words at all


def test_sha256_is_of_the_played_samples_and_stable(built: tuple[Path, list[Path]],
                                                    tmp_path: Path) -> None:
    out, _ = built
    path = out / "de" / "notice.wav"
    with wave.open(str(path), "rb") as wav:
        frames = wav.readframes(wav.getnframes())
    first = PromptSet.load([out]).get("notice", "de")
    second = PromptSet.load([out]).get("notice", "de")
    assert first.sha256 == second.sha256 == pcm_sha256(first.pcm)
    assert first.sha256 == hashlib.sha256(frames).hexdigest()
    assert first.source == "espeak-ng" and first.language == "de"
    manifest = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["prompts"]["de/notice.wav"]["sha256"] == first.sha256
    again = build_prompts(tmp_path, texts_file(tmp_path, GERMAN))  # same voice and text
    assert read_prompt_wav(again[0]).tobytes() == first.pcm.tobytes()


@needs_espeak
def test_build_without_sox_resamples_in_numpy(built: tuple[Path, list[Path]], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "espeak-ng").symlink_to(ESPEAK)
    monkeypatch.setenv("PATH", str(tools))  # espeak-ng only: no sox
    paths = build_prompts(tmp_path / "out", texts_file(tmp_path, GERMAN))
    mine = read_prompt_wav(paths[0]).astype(float)
    with_sox = read_prompt_wav(built[0] / "de" / "notice.wav").astype(float)
    assert len(mine) == len(with_sox)
    assert np.dot(mine, with_sox) / np.sqrt(np.dot(mine, mine) * np.dot(with_sox, with_sox)) > 0.99


def test_resampler_keeps_the_phone_band_and_stops_aliases() -> None:
    rate_in = 22050  # espeak-ng's output rate
    t = np.arange(rate_in * 2) / rate_in

    def gain_db(freq_hz: float) -> float:
        out = resample(10000.0 * np.sin(2 * np.pi * freq_hz * t), rate_in)[800:-800]
        return float(20 * np.log10(np.sqrt(2 * np.mean(out**2)) / 10000.0))

    assert len(resample(np.zeros(rate_in), rate_in)) == RATE
    for freq_hz in (300.0, 1000.0, 3400.0):
        assert abs(gain_db(freq_hz)) < 0.1
    for freq_hz in (4200.0, 4600.0, 6000.0, 9000.0):  # would fold into 0..4 kHz
        assert gain_db(freq_hz) < -70.0
    tone = resample(10000.0 * np.sin(2 * np.pi * 1000.0 * t), rate_in)
    assert abs(peak_hz(tone) - 1000.0) < 1.0


@needs_espeak
def test_missing_voice_is_skipped_and_the_rest_built(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    texts = texts_file(tmp_path, GERMAN + """
[languages.xx]
voice = "no-such-voice"
notice = "x"
consent = "y"
""")
    with caplog.at_level(logging.WARNING):
        paths = build_prompts(tmp_path / "out", texts)
    assert [p.relative_to(tmp_path / "out").as_posix() for p in paths] == [
        "de/notice.wav", "de/consent.wav"]
    assert "no voice 'no-such-voice'" in caplog.text
    assert not (tmp_path / "out" / "xx").exists()


def test_missing_espeak_builds_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert build_prompts(tmp_path / "out", texts_file(tmp_path, GERMAN)) == []
    assert "espeak-ng is not installed" in caplog.text


@needs_espeak
def test_rebuild_removes_prompts_no_longer_built_and_keeps_other_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    english = '[languages.en]\nvoice = "en-us"\nnotice = "Recorded."\nconsent = "Press 1."\n'
    build_prompts(out, texts_file(tmp_path, GERMAN + english))
    mine = write_wav(out / "de" / "greeting.wav", beep_tone(500, 0.2))
    build_prompts(out, texts_file(tmp_path, english, "en.toml"))
    assert not (out / "de" / "notice.wav").exists()  # its wording is no longer in the texts
    assert mine.exists() and (out / "en" / "notice.wav").exists()


# --- the loader -----------------------------------------------------------------------------
@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """A site folder (recorded) and a built folder, each prompt a distinct beep."""
    site, built = tmp_path / "site", tmp_path / "built"
    write_wav(site / "de" / "notice.wav", beep_tone(500, 0.2))
    write_wav(built / "de" / "notice.wav", beep_tone(510, 0.2))
    write_wav(built / "pt" / "notice.wav", beep_tone(520, 0.2))
    write_wav(built / "en" / "notice.wav", beep_tone(530, 0.2))
    write_wav(built / "en" / "consent.wav", beep_tone(540, 0.2))
    manifest = {"prompts": {rel: {"sha256": pcm_sha256(read_prompt_wav(built / rel))}
                            for rel in ("de/notice.wav", "pt/notice.wav", "en/notice.wav",
                                        "en/consent.wav")}}
    (built / MANIFEST_NAME).write_text(json.dumps(manifest), encoding="utf-8")
    return site, built


def test_fallback_order_exact_base_english_tone(dirs: tuple[Path, Path]) -> None:
    site, built = dirs
    prompts = PromptSet.load([site, built])
    assert len(prompts) == 4  # the site's de/notice hides the built one
    cases = {("notice", "de"): (500, "de", "recorded"),
             ("notice", "pt-BR"): (520, "pt", "espeak-ng"),
             ("notice", "pt"): (520, "pt", "espeak-ng"),
             ("consent", "pt-BR"): (540, "en", "espeak-ng"),
             ("notice", "ja"): (530, "en", "espeak-ng")}
    for (name, language), (freq_hz, spoken, source) in cases.items():
        prompt = prompts.get(name, language)
        assert abs(peak_hz(prompt.pcm) - freq_hz) < 1.0, (name, language)
        assert (prompt.name, prompt.language, prompt.source) == (name, spoken, source)
    write_wav(site / "pt-BR" / "notice.wav", beep_tone(550, 0.2))
    assert PromptSet.load([site, built]).get("notice", "pt-BR").language == "pt-BR"


def test_no_prompt_at_all_gives_the_chime_and_never_raises(tmp_path: Path) -> None:
    prompts = PromptSet.load([tmp_path / "missing"])
    for name, language in (("notice", "de"), ("consent", "pt-BR"), ("unknown", ""),
                           ("notice", "not a language")):
        prompt = prompts.get(name, language)
        assert (prompt.name, prompt.source, prompt.language) == (name, "tone", "")
        assert np.array_equal(prompt.pcm, chime()) and prompt.sha256 == pcm_sha256(chime())
    with pytest.raises(ValueError):
        prompt.pcm[0] = 1  # what is played cannot change after its hash was taken


def test_load_limited_to_languages_and_their_fallbacks(dirs: tuple[Path, Path]) -> None:
    prompts = PromptSet.load(list(dirs), languages=["pt-BR"])
    assert {(name, lang) for name, lang, _ in prompts.available()} == {
        ("notice", "pt"), ("consent", "en")}  # only what get() can return
    assert fallback_chain("pt-BR") == ["pt-BR", "pt", "en"]
    assert fallback_chain("en") == ["en"]


def test_default_directories_put_the_site_first(tmp_path: Path) -> None:
    site, built = default_directories(tmp_path)
    assert site == tmp_path / "prompts"
    assert built == REPO / "firmware" / "data" / "prompts"


def _float_wav(path: Path) -> Path:
    data = np.zeros(800, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, RATE, RATE * 4, 4, 32)  # format tag 3: IEEE float
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


@pytest.mark.parametrize(("make", "needle"), [
    (lambda p: write_wav(p, beep_tone(500, 0.2), rate=16000), "16000 Hz; prompts must be 8000 Hz"),
    (lambda p: write_wav(p, np.repeat(beep_tone(500, 0.2), 2), channels=2),
     "2 channels; prompts must be mono"),
    (lambda p: write_wav(p, np.full(1600, 128, dtype=np.uint8), width=1),
     "8-bit samples; prompts must be 16-bit"),
    (lambda p: p.write_bytes(wav_bytes(beep_tone(500, 0.2))[:-100]), "truncated"),
    (lambda p: p.write_bytes(wav_bytes(beep_tone(500, 0.2))[:30]), "truncated"),
    (lambda p: write_wav(p, silence(31.0)), "31.0 s long; a prompt may last at most 30 s"),
    (lambda p: write_wav(p, silence(0.0)), "no audio"),
    (_float_wav, "not a PCM WAV file (unknown format: 3)"),
    (lambda p: p.write_text("hello"), "not a WAV file"),
    (lambda p: p.write_bytes(b""), "not a WAV file"),
])
def test_bad_installed_wav_fails_at_load_naming_the_file(dirs: tuple[Path, Path], make: object,
                                                         needle: str) -> None:
    site, built = dirs
    path = site / "fr" / "consent.wav"
    path.parent.mkdir(parents=True)
    make(path)  # type: ignore[operator]
    with pytest.raises(PromptError) as err:
        PromptSet.load([site, built])
    message = str(err.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message
    PromptSet.load([site, built], languages=["de"])  # not asked for: not read


def test_longest_allowed_prompt_loads(tmp_path: Path) -> None:
    write_wav(tmp_path / "de" / "notice.wav", silence(30.0))
    assert PromptSet.load([tmp_path]).get("notice", "de").duration_s == 30.0


# --- tones ----------------------------------------------------------------------------------
def test_recorder_warning_beep_is_1400_hz_for_half_a_second() -> None:
    beep = beep_tone(1400.0, 0.5)  # 47 CFR 64.501, FS-1037C "recorder warning tone"
    assert beep.dtype == np.int16 and beep.ndim == 1
    assert abs(len(beep) / RATE - 0.5) <= 0.001
    assert abs(peak_hz(beep) - 1400.0) <= 5.0
    assert abs(20 * np.log10(np.abs(beep).max() / 32767) + 12.0) < 0.1  # default -12 dBFS
    assert abs(int(beep[0])) < 100 and abs(int(beep[-1])) < 100  # ramped: no click
    ramp = np.abs(beep[:40]).astype(float)
    assert ramp[:20].max() < ramp[20:].max()
    for args in ((0.0, 0.5), (4000.0, 0.5), (1400.0, 0.0), (1400.0, 31.0)):
        with pytest.raises(ValueError):
            beep_tone(*args)
    with pytest.raises(ValueError):
        beep_tone(1400.0, 0.5, level_dbfs=3.0)


def _chime_train() -> np.ndarray:
    """The chime five times, a second apart: also a cadence, as if played on a loop."""
    return np.concatenate([silence(1.0), *[np.concatenate([chime(), silence(1.0)])] * 5])


def test_chime_is_two_notes_one_after_the_other() -> None:
    pcm = chime()
    assert abs(len(pcm) / RATE - 0.6) <= 0.001 and pcm.dtype == np.int16
    half = len(pcm) // 2
    assert abs(peak_hz(pcm[:half]) - CHIME_NOTES_HZ[0]) < 2.0
    assert abs(peak_hz(pcm[half:]) - CHIME_NOTES_HZ[1]) < 2.0


def test_chime_notes_are_far_from_every_signalling_frequency() -> None:
    signals = [*ROW_HZ, *COL_HZ]
    for country in countries():
        plan = tone_plan(country)
        for spec in (plan.dial, plan.busy, plan.ringback, plan.congestion):
            am = [spec.freqs_hz[0] - spec.am_hz, spec.freqs_hz[0] + spec.am_hz] if spec.am_hz else []
            signals += [*spec.freqs_hz, *am]
    for note in CHIME_NOTES_HZ:
        assert min(abs(note - f) / f for f in signals) > 0.05


def test_chime_is_no_dtmf_digit() -> None:
    assert feed(DtmfDetector(), _chime_train()) == []
    digit = (beep_tone(697, 0.1, -10).astype(np.int32) + beep_tone(1209, 0.1, -10)).astype(np.int16)
    found = feed(DtmfDetector(), np.concatenate([silence(0.5), digit, silence(0.5)]))
    assert [event.digit for event in found] == ["1"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("country", countries())
def test_chime_is_no_call_progress_tone(country: str) -> None:
    detector = ToneDetector(country)
    assert feed(detector, _chime_train()) + detector.flush() == []


def test_tone_detector_check_can_fail() -> None:
    busy = (beep_tone(480, 0.5, -15).astype(np.int32) + beep_tone(620, 0.5, -15)).astype(np.int16)
    train = np.concatenate([silence(1.0), *[np.concatenate([busy, silence(0.5)])] * 4])
    detector = ToneDetector("US")
    tones = feed(detector, train) + detector.flush()
    assert [event.tone for event in tones] == ["busy"]  # type: ignore[attr-defined]


# --- command line ---------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "firmware.promptbuild", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@needs_espeak
def test_cli_build(tmp_path: Path) -> None:
    done = run_cli("build", str(tmp_path / "out"), "--texts", str(texts_file(tmp_path, GERMAN)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'out'}: 2 prompt file(s) written\n"
    assert (tmp_path / "out" / "de" / "consent.wav").exists()


@pytest.mark.parametrize(("args", "code", "needle"), [
    ((), 2, "required"),
    (("build",), 2, "OUTDIR"),
    (("build", "x", "--texts", "/no/such.toml"), 2, "/no/such.toml: no such file"),
    (("frobnicate",), 2, "invalid choice"),
])
def test_cli_usage_errors(args: tuple[str, ...], code: int, needle: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == code
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_failures_are_one_line(tmp_path: Path) -> None:
    bad = texts_file(tmp_path, "[languages.de]\nnotice = 'x'\n")
    done = run_cli("build", str(tmp_path / "out"), "--texts", str(bad))
    assert done.returncode == 1
    assert done.stderr == f"prompts: error: {bad}: languages.de.consent: required key is missing\n"
    if ESPEAK is not None:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        done = run_cli("build", str(blocker), "--texts", str(texts_file(tmp_path, GERMAN)))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("prompts: error: ") and done.stderr.count("\n") == 1


def test_cli_check_lists_what_the_appliance_would_play(dirs: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    site, built = dirs
    assert main(["check", str(site), str(built)]) == 0
    lines = capsys.readouterr().out.splitlines()
    sha = pcm_sha256(beep_tone(500, 0.2))
    assert f"de/notice: recorded, 0.2 s, sha256 {sha}" in lines
    assert len(lines) == 4 and sum("espeak-ng" in line for line in lines) == 3
    write_wav(site / "de" / "consent.wav", beep_tone(500, 0.2), rate=44100)
    assert main(["check", str(site), str(built)]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"prompts: error: {site / 'de' / 'consent.wav'}: 44100 Hz; prompts must be 8000 Hz"
