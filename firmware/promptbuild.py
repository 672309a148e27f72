"""Building the default prompts: espeak-ng speaks the texts of firmware/data/prompts.toml,
sox (or a windowed-sinc resampler) converts them to the line's 8 kHz, and they are levelled
and written where :mod:`firmware.prompts` finds them. A build-time tool: the daemon never
imports it (`python -m firmware.promptbuild build OUTDIR`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import wave
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
import numpy as np

from firmware.config import convert_checked
from firmware.fsutil import atomic_write, make_dirs
from firmware.prompts import (
    ACTIVE_GATE_DB,
    FULL_SCALE,
    LANGUAGE_RE,
    LIMITER_WINDOW,
    MANIFEST_NAME,
    MAX_PROMPT_S,
    PEAK_LIMIT_DBFS,
    PROMPT_LEVEL_DBFS,
    PROMPT_NAMES,
    RESAMPLE_ATTENUATION_DB,
    RESAMPLE_CHUNK,
    RESAMPLE_PASS,
    SPEECH_WPM,
    TEXTS_PATH,
    TOOL_TIMEOUT_S,
    TRIM_GATE_DB,
    TRIM_MARGIN_S,
    PromptError,
    PromptSet,
    _read_manifest,
    _to_int16,
    pcm_sha256,
)
from firmware.recfile import SAMPLE_RATE, wav_bytes

log = logging.getLogger(__name__)


# --- signal processing for the build ------------------------------------------------------
def _kaiser(u: np.ndarray, beta: float) -> np.ndarray:
    """Kaiser window at positions ``u`` in [-1, 1]."""
    return np.i0(beta * np.sqrt(np.clip(1.0 - u * u, 0.0, None))) / np.i0(beta)


def resample(x: np.ndarray, rate_in_hz: int, rate_out_hz: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of ``x`` (float) by windowed-sinc interpolation.

    Output sample n sits at input position n * p / q (``Fraction(rate_in, rate_out)``);
    its fractional part takes only q values, so the q kernels are computed once.
    """
    nyquist_hz = min(rate_in_hz, rate_out_hz) / 2.0
    transition_hz = (1.0 - RESAMPLE_PASS) * nyquist_hz
    cutoff = (RESAMPLE_PASS + 1.0) / 2.0 * nyquist_hz / rate_in_hz  # cycles per input sample
    beta = 0.1102 * (RESAMPLE_ATTENUATION_DB - 8.7)
    taps = (RESAMPLE_ATTENUATION_DB - 8.0) / (2.285 * 2.0 * np.pi * transition_hz / rate_in_hz)
    half = math.ceil(taps / 2.0)
    step = Fraction(rate_in_hz, rate_out_hz)
    offsets = np.arange(-half + 1, half + 1)
    dist = np.arange(step.denominator)[:, None] / step.denominator - offsets[None, :]
    kernels = 2.0 * cutoff * np.sinc(2.0 * cutoff * dist) * _kaiser(dist / half, beta)
    padded = np.pad(np.asarray(x, dtype=np.float64), (half, half + 1))
    n_out = len(x) * rate_out_hz // rate_in_hz
    out = np.empty(n_out)
    for start in range(0, n_out, RESAMPLE_CHUNK):
        num = np.arange(start, min(start + RESAMPLE_CHUNK, n_out)) * step.numerator
        base, phase = np.divmod(num, step.denominator)
        window = padded[base[:, None] + offsets[None, :] + half]
        out[start:start + len(num)] = np.einsum("ij,ij->i", window, kernels[phase])
    return out


def _trim(x: np.ndarray) -> np.ndarray:
    """Cut leading and trailing silence, keeping TRIM_MARGIN_S of it."""
    loud = np.flatnonzero(np.abs(x) >= np.abs(x).max() * 10.0 ** (-TRIM_GATE_DB / 20.0))
    margin = round(TRIM_MARGIN_S * SAMPLE_RATE)
    return x[max(loud[0] - margin, 0):loud[-1] + margin + 1]


def active_level_dbfs(x: np.ndarray) -> float:
    """Active speech level: RMS of the 20 ms frames within ACTIVE_GATE_DB of the loudest
    one, in dB relative to a full-scale sine."""
    frame = SAMPLE_RATE // 50
    n = max(len(x) // frame, 1)
    power = np.mean(np.reshape(np.resize(x, n * frame), (n, frame)) ** 2, axis=1)
    active = power[power >= power.max() * 10.0 ** (-ACTIVE_GATE_DB / 10.0)]
    return 10.0 * math.log10(max(float(active.mean()), 1e-12) * 2.0 / FULL_SCALE**2)


def _limit(x: np.ndarray, ceiling: float) -> np.ndarray:
    """Peak limiter: the gain is the sliding minimum of what each sample needs, smoothed by
    a moving average of the same width, so it never exceeds the need at any sample."""
    need = np.minimum(1.0, ceiling / np.maximum(np.abs(x), 1e-9))
    if need.min() >= 1.0:
        return x
    half = LIMITER_WINDOW // 2
    window = np.lib.stride_tricks.sliding_window_view
    floor = window(np.pad(need, half, constant_values=1.0), LIMITER_WINDOW).min(axis=1)
    gain = window(np.pad(floor, half, mode="edge"), LIMITER_WINDOW).mean(axis=1)
    return x * gain


def normalise(x: np.ndarray) -> np.ndarray:
    """Speech (float, 8 kHz, int16 scale) trimmed, at PROMPT_LEVEL_DBFS active level with
    peaks limited to PEAK_LIMIT_DBFS, as int16."""
    x = np.asarray(x, dtype=np.float64)
    if not len(x) or not np.any(np.abs(x) >= 1.0):
        raise ValueError("the audio is silent")
    x = _trim(x)
    gain_db = PROMPT_LEVEL_DBFS - active_level_dbfs(x)
    ceiling = FULL_SCALE * 10.0 ** (PEAK_LIMIT_DBFS / 20.0)
    return _to_int16(_limit(x * 10.0 ** (gain_db / 20.0), ceiling))


# --- the texts ----------------------------------------------------------------------------
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
# An espeak-ng voice or language name ("de", "en-us", "gmw/lb"); never an option.
VoiceName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9/_-]{0,63}$")]


class Spoken(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What espeak-ng reads instead of the written text (e.g. kana for Japanese kanji)."""

    notice: Text | None = None
    consent: Text | None = None


class PromptTexts(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One language of prompts.toml."""

    voice: VoiceName | None = None
    notice: Text
    consent: Text
    speak: Spoken = msgspec.field(default_factory=Spoken)

    def text(self, name: str) -> str:
        return str(getattr(self, name))

    def spoken(self, name: str) -> str:
        return str(getattr(self.speak, name) or getattr(self, name))


def parse_texts(data: bytes, source: str) -> dict[str, PromptTexts]:
    """Validate a prompt texts file (``[languages.<code>]`` tables); errors name ``source``."""
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise PromptError(f"{source}: not valid TOML: {exc}") from None
    tables = raw.pop("languages", None)
    if raw:
        raise PromptError(f"{source}: {sorted(raw)[0]}: unknown key")
    if not isinstance(tables, dict) or not tables:
        raise PromptError(f"{source}: languages: required table is missing or empty")
    return {code: _parse_language(code, table, source) for code, table in tables.items()}


def _parse_language(code: str, table: Any, source: str) -> PromptTexts:
    where = f"{source}: languages.{code}"
    if not LANGUAGE_RE.match(code):
        raise PromptError(f"{where}: not a language code (like de, pt-BR)")
    texts = convert_checked(table, PromptTexts, source, error=PromptError,
                            prefix=f"languages.{code}")
    for key, value in (("notice", texts.notice), ("consent", texts.consent),
                       ("speak.notice", texts.speak.notice),
                       ("speak.consent", texts.speak.consent)):
        if value is not None and not value.strip():
            raise PromptError(f"{where}.{key}: empty text")
    return texts


def load_texts(path: Path) -> dict[str, PromptTexts]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_texts(data, str(path))


# --- the build ----------------------------------------------------------------------------
def _run(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(argv, capture_output=True, timeout=TOOL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise PromptError(f"{Path(argv[0]).name}: no result after {TOOL_TIMEOUT_S:g} s") from None


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else "no message"


_OTHER_LANGUAGE_RE = re.compile(r"\(([^\s()]+) \d+\)")  # "(en 2)" in espeak-ng --voices


class _Tools:
    """The external programs of the build (espeak-ng required, sox optional)."""

    def __init__(self, espeak: str, sox: str | None, work_dir: Path) -> None:
        self.espeak, self.sox, self.work_dir = espeak, sox, work_dir

    @functools.cached_property
    def voices(self) -> frozenset[str]:
        """What ``-v`` accepts, exactly: languages, voice files and their other languages
        (``espeak-ng --voices``). espeak-ng itself matches a voice loosely ("no-such" is
        Norwegian), so a misspelt voice is caught here."""
        done = _run([self.espeak, "--voices"])
        names: set[str] = set()
        for line in done.stdout.decode("utf-8", "replace").splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 5:
                names.update((fields[1].lower(), fields[4].lower()))
                names.update(code.lower() for code in _OTHER_LANGUAGE_RE.findall(line))
        return frozenset(names)

    def synthesize(self, voice: str, text: str) -> np.ndarray | None:
        """Speech at 8 kHz (float, int16 scale); None when the voice does not exist."""
        if voice.lower() not in self.voices:
            return None
        wav = self.work_dir / "espeak.wav"
        done = _run([self.espeak, "-v", voice, "-s", str(SPEECH_WPM), "-w", str(wav), "--",
                     text])
        if done.returncode != 0:
            if b"does not exist" in done.stderr:
                return None
            raise PromptError(f"espeak-ng -v {voice}: failed: {_last_line(done.stderr)}")
        return self._to_line_rate(wav)

    def _to_line_rate(self, wav: Path) -> np.ndarray:
        if self.sox is None:
            return _resample_wav(wav)
        done = _run([self.sox, "-q", str(wav), "-t", "raw", "-e", "floating-point", "-b", "32",
                     "-L", "-c", "1", "-r", str(SAMPLE_RATE), "-"])
        if done.returncode != 0:
            raise PromptError(f"sox {wav.name}: failed: {_last_line(done.stderr)}")
        return np.frombuffer(done.stdout, dtype="<f4").astype(np.float64) * 32768.0

    def version(self) -> str:
        done = _run([self.espeak, "--version"])
        return done.stdout.decode("utf-8", "replace").split("Data at")[0].strip()


def _resample_wav(path: Path) -> np.ndarray:
    """A 16-bit WAV file (espeak-ng's output) as 8 kHz mono float, in numpy."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise PromptError(f"{path}: {8 * wav.getsampwidth()}-bit samples; expected 16")
        rate_hz, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    mono = pcm.reshape(-1, channels).mean(axis=1)
    return resample(mono, rate_hz) if rate_hz != SAMPLE_RATE else mono


def _build_language(tools: _Tools, out_dir: Path, language: str, texts: PromptTexts,
                    source: str) -> dict[str, dict[str, str]]:
    """Synthesize and write every prompt of one language; its manifest entries."""
    entries: dict[str, dict[str, str]] = {}
    if texts.voice is None:
        log.warning("prompts: %s: no espeak-ng voice in %s; not built", language, source)
        return entries
    for name in PROMPT_NAMES:
        speech = tools.synthesize(texts.voice, texts.spoken(name))
        if speech is None:
            log.warning("prompts: %s: espeak-ng has no voice %r; not built",
                        language, texts.voice)
            return {}
        try:
            pcm = normalise(speech)
        except ValueError as exc:
            raise PromptError(f"{source}: languages.{language}.{name}: {exc}") from None
        if len(pcm) > MAX_PROMPT_S * SAMPLE_RATE:
            raise PromptError(f"{source}: languages.{language}.{name}: spoken it lasts "
                              f"{len(pcm) / SAMPLE_RATE:.1f} s; at most {MAX_PROMPT_S:g} s")
        path = out_dir / language / f"{name}.wav"
        make_dirs(path.parent)
        atomic_write(path, wav_bytes(pcm))
        entries[f"{language}/{name}.wav"] = {"sha256": pcm_sha256(pcm), "voice": texts.voice,
                                             "text": texts.text(name)}
    return entries


def _remove_stale(out_dir: Path, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
    """Delete files an earlier build wrote that this one did not (a text or voice removed):
    an outdated wording must not stay in service."""
    for rel in sorted(set(old) - set(new)):
        path = out_dir / rel
        if path.parent.parent == out_dir and path.suffix == ".wav":
            path.unlink(missing_ok=True)
            log.info("prompts: removed %s (no longer built)", path)


def build_prompts(out_dir: Path, texts_file: Path | None = None) -> list[Path]:
    """Synthesize every prompt of ``texts_file`` (default firmware/data/prompts.toml) into
    ``out_dir/<language>/<name>.wav`` with espeak-ng; returns the files written.

    Languages without a voice are skipped with a warning (the appliance falls back); so is
    everything when espeak-ng is not installed. sox converts to 8 kHz when present, else
    :func:`resample` does. ``out_dir/manifest.json`` lists what was built.
    """
    source = texts_file or TEXTS_PATH
    texts = load_texts(source)
    make_dirs(out_dir)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        log.warning("prompts: espeak-ng is not installed; no prompts built (calls get the chime)")
        return []
    old = _read_manifest(out_dir)
    built: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="edge-prompts-") as tmp:
        tools = _Tools(espeak, shutil.which("sox"), Path(tmp))
        for language, entry in texts.items():
            built.update(_build_language(tools, out_dir, language, entry, str(source)))
        manifest = {"generator": tools.version(), "texts": str(source), "prompts": built}
    _remove_stale(out_dir, old, built)
    atomic_write(out_dir / MANIFEST_NAME,
                 json.dumps(manifest, indent=1, ensure_ascii=False, sort_keys=True).encode())
    log.info("prompts: %d built in %s", len(built), out_dir)
    return [out_dir / rel for rel in built]


# --- command line -------------------------------------------------------------------------
class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message} (see --help)")


def _existing_file(value: str) -> Path:
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value}: no such file")
    return path


def _parser() -> _Parser:
    parser = _Parser(prog="python -m firmware.prompts", description="Prompt audio tools.")
    parser.add_argument("--debug", action="store_true", help="tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    build = sub.add_parser("build", help="synthesize the prompts with espeak-ng",
                           description="Synthesize the prompt texts into OUTDIR/<lang>/<name>.wav")
    build.add_argument("out_dir", metavar="OUTDIR", type=Path)
    build.add_argument("--texts", type=_existing_file, default=None,
                       help=f"prompt texts (default {TEXTS_PATH})")
    check = sub.add_parser("check", help="check prompt folders as the appliance loads them",
                           description="Load DIR... in order (as the appliance does) and list "
                                       "every prompt with its source, length and sha256")
    check.add_argument("dirs", metavar="DIR", type=Path, nargs="+")
    return parser


def _build(args: argparse.Namespace) -> None:
    paths = build_prompts(args.out_dir, args.texts)
    sys.stdout.write(f"{args.out_dir}: {len(paths)} prompt file(s) written\n")


def _check(args: argparse.Namespace) -> None:
    prompts = PromptSet.load(args.dirs)
    for name, language, _ in prompts.available():
        prompt = prompts.get(name, language)
        sys.stdout.write(f"{language}/{name}: {prompt.source}, {prompt.duration_s:.1f} s, "
                         f"sha256 {prompt.sha256}\n")
    if not len(prompts):
        sys.stdout.write("no prompts: every call would get the chime\n")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except _UsageError as exc:
        sys.stderr.write(f"prompts: error: {exc}\n")
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        (_build if args.command == "build" else _check)(args)
    except PromptError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"prompts: error: {exc}\n")
        return 1
    except OSError as exc:
        if args.debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        sys.stderr.write(f"prompts: error: {where}{exc.strerror or exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
