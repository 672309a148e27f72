"""Audio prompts the compliance engine plays into the line: recording notice and consent request.

Prompts are 8 kHz 16-bit mono PCM (what ``LineBackend.play`` takes). They live as
``<dir>/<language>/<name>.wav``; :meth:`PromptSet.load` reads the site's recorded prompts
first (``<data_dir>/prompts``), then the defaults built from ``firmware/data/prompts.toml``
with espeak-ng (``python -m firmware.promptbuild build DIR``, run by ``make prompts``). Every
file is checked when the set is loaded, so a bad installed file fails at start, not in a
call. :meth:`PromptSet.get` never fails: exact language, its base language, English, then
a soft two-note chime. ``python -m firmware.promptbuild check DIR...`` loads folders as the
appliance does and lists what it would play.

Levels: 0 dBFS is a full-scale sine (peak 32767), as in ``drivers/dsp``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import wave
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, NoReturn

import numpy as np

from firmware.recfile import SAMPLE_RATE

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
TEXTS_PATH = DATA_DIR / "prompts.toml"
BUILT_PROMPTS_DIR = DATA_DIR / "prompts"  # `make prompts` builds here
MANIFEST_NAME = "manifest.json"  # written by build_prompts: which files espeak-ng made

PROMPT_NAMES = ("notice", "consent")
FALLBACK_LANGUAGE = "en"
PromptSource = Literal["recorded", "espeak-ng", "tone"]

LANGUAGE_RE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?$")  # as firmware.policyfile.Language
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# A prompt holds up the call it is played on; a longer file is a mistake (wrong file, a
# whole recording instead of a prompt).
MAX_PROMPT_S = 30.0
FULL_SCALE = 32767.0  # peak of a 0 dBFS sine in int16 samples
RAMP_S = 0.005  # raised-cosine on/off ramps of tones: no clicks on the line
# Built prompts: active speech level (20 ms frames within ACTIVE_GATE_DB of the loudest),
# as the RMS of a sine; peaks limited to PEAK_LIMIT_DBFS.
PROMPT_LEVEL_DBFS = -16.0
PEAK_LIMIT_DBFS = -1.0
ACTIVE_GATE_DB = 30.0
LIMITER_WINDOW = 41  # samples (5 ms): the limiter's gain changes over this span
TRIM_GATE_DB = 40.0  # leading and trailing audio this far below the peak is silence
TRIM_MARGIN_S = 0.05
# espeak-ng speaks at 175 words per minute by default (espeak-ng.1, -s); a notice on a
# phone line is read slower.
SPEECH_WPM = 150
TOOL_TIMEOUT_S = 60.0

# Resampler (numpy path, when sox is absent): Kaiser-windowed sinc, flat to 0.85 x the
# lower Nyquist frequency (3.4 kHz at 8 kHz: the telephone band), >= 70 dB down from
# the output's Nyquist frequency on; Kaiser's design formulas (Oppenheim & Schafer,
# Discrete-Time Signal Processing, 3rd ed., eq. 7.62-7.63).
RESAMPLE_PASS = 0.85
RESAMPLE_ATTENUATION_DB = 70.0
RESAMPLE_CHUNK = 4096  # output samples per matrix step

# The chime played when no spoken prompt exists: E5 then C5 (equal temperament, A4 =
# 440 Hz), one after the other, never together. Both stay > 5 % away from every DTMF
# frequency (ITU-T Q.23: 697..941 and 1209..1633 Hz; receivers must reject >= 3.5 %,
# Q.24), from every call-progress tone of drivers/toneplan.py (350..620 Hz, with AM
# sidebands 367..433 Hz) and from the special information tones (913.8 / 985.2 Hz and
# up, ITU-T Q.35).
CHIME_NOTES_HZ = (659.25, 523.25)
CHIME_NOTE_S = 0.3
CHIME_LEVEL_DBFS = -12.0
CHIME_DECAY_S = 0.12  # exponential decay time constant of each note
CHIME_RELEASE_S = 0.02


class PromptError(Exception):
    """A prompt file, the texts file or a build step is invalid (one-line message)."""


# --- prompts ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, eq=False)
class Prompt:
    """One playable prompt. ``sha256`` is over the int16 little-endian samples, exactly what
    is played; ``language`` is the language actually spoken ("" for the chime)."""

    name: str
    language: str
    pcm: np.ndarray
    sha256: str
    source: PromptSource

    @classmethod
    def of(cls, name: str, language: str, pcm: np.ndarray, source: PromptSource) -> Prompt:
        samples = np.array(pcm, dtype=np.int16)
        samples.flags.writeable = False
        return cls(name, language, samples, pcm_sha256(samples), source)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE


def pcm_sha256(pcm: np.ndarray) -> str:
    """Hex SHA-256 of ``pcm`` as int16 little-endian bytes."""
    return hashlib.sha256(np.asarray(pcm, dtype="<i2").tobytes()).hexdigest()


def fallback_chain(language: str) -> list[str]:
    """Languages tried for ``language``: itself, its base ("pt-BR" -> "pt"), English."""
    chain = [language, language.split("-", 1)[0], FALLBACK_LANGUAGE]
    return list(dict.fromkeys(code for code in chain if code))


def default_directories(data_dir: Path) -> list[Path]:
    """Where the appliance looks for prompts: the site's recorded ones, then the built ones."""
    return [data_dir / "prompts", BUILT_PROMPTS_DIR]


class PromptSet:
    """The prompts found on the appliance, with the fallback rules of :meth:`get`."""

    def __init__(self, prompts: Mapping[tuple[str, str], Prompt] | None = None) -> None:
        self._prompts = dict(prompts or {})
        self._warned: set[tuple[str, str]] = set()

    @classmethod
    def load(cls, directories: Sequence[Path], *,
             languages: Collection[str] | None = None) -> PromptSet:
        """Read ``<dir>/<language>/<name>.wav`` from each directory; the first directory
        holding a prompt wins. Every file read is checked (:func:`read_prompt_wav`); a bad
        one raises :class:`PromptError`. ``languages`` limits what is read to those
        languages and their fallbacks (memory: the daemon needs only the site's)."""
        wanted = None if languages is None else {
            code for language in languages for code in fallback_chain(language)}
        found: dict[tuple[str, str], Prompt] = {}
        for directory in directories:
            for prompt in _load_directory(Path(directory), wanted):
                found.setdefault((prompt.name, prompt.language), prompt)
        if languages is not None:  # keep only what get() can return for these languages
            found = _reachable(found, languages)
        log.info("prompts: %d loaded from %s", len(found), ", ".join(map(str, directories)))
        return cls(found)

    def get(self, name: str, language: str) -> Prompt:
        """The prompt ``name`` in ``language``, else its base language, else English, else
        the chime (source "tone"). Never raises."""
        for code in fallback_chain(language):
            prompt = self._prompts.get((name, code))
            if prompt is not None:
                if code != language:
                    self._warn_once(name, language, f"playing {code!r}")
                return prompt
        self._warn_once(name, language, "playing the chime")
        return tone_prompt(name)

    def available(self) -> list[tuple[str, str, PromptSource]]:
        """(name, language, source) of every prompt loaded, sorted."""
        return sorted((p.name, p.language, p.source) for p in self._prompts.values())

    def __len__(self) -> int:
        return len(self._prompts)

    def _warn_once(self, name: str, language: str, what: str) -> None:
        if (name, language) not in self._warned:
            self._warned.add((name, language))
            log.warning("prompts: no %r prompt in %r; %s", name, language, what)


def _load_directory(directory: Path, wanted: Collection[str] | None) -> Iterator[Prompt]:
    if not directory.is_dir():
        log.info("prompts: %s: no such directory", directory)
        return
    built = _built_hashes(directory)
    for lang_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        language = lang_dir.name
        if not LANGUAGE_RE.match(language):
            log.warning("prompts: %s: not a language code (like de, pt-BR); ignored", lang_dir)
            continue
        if wanted is not None and language not in wanted:
            continue
        for path in sorted(lang_dir.glob("*.wav")):
            if not NAME_RE.match(path.stem):
                log.warning("prompts: %s: not a prompt name (a-z, 0-9, _); ignored", path)
                continue
            pcm = read_prompt_wav(path)
            source: PromptSource = (
                "espeak-ng" if built.get(f"{language}/{path.name}") == pcm_sha256(pcm)
                else "recorded")
            yield Prompt.of(path.stem, language, pcm, source)


def _reachable(found: Mapping[tuple[str, str], Prompt], languages: Collection[str]
               ) -> dict[tuple[str, str], Prompt]:
    """Per language and prompt name, only the first of the fallback chain that exists."""
    keep: dict[tuple[str, str], Prompt] = {}
    for name in {n for n, _ in found}:
        for language in languages:
            code = next((c for c in fallback_chain(language) if (name, c) in found), None)
            if code is not None:
                keep[(name, code)] = found[(name, code)]
    return keep


def _read_manifest(directory: Path) -> dict[str, dict[str, str]]:
    path = directory / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        prompts = json.loads(path.read_text(encoding="utf-8"))["prompts"]
        if not isinstance(prompts, dict):
            raise TypeError("prompts is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("prompts: %s: unreadable (%s); its prompts count as recorded", path, exc)
        return {}
    return prompts


def _built_hashes(directory: Path) -> dict[str, str]:
    """``relative path -> sha256`` of the files build_prompts wrote into ``directory``."""
    manifest = _read_manifest(directory)
    return {rel: str(entry.get("sha256")) for rel, entry in manifest.items()}


# --- WAV files ----------------------------------------------------------------------------
def read_prompt_wav(path: Path) -> np.ndarray:
    """The samples of a prompt file: PCM WAV, 16-bit, mono, 8000 Hz, 1 sample to 30 s."""
    try:
        with open(path, "rb") as handle:
            return decode_prompt_wav(handle, str(path))
    except OSError as exc:
        raise PromptError(f"{path}: cannot read: {exc.strerror or exc}") from None


def decode_prompt_wav(handle: BinaryIO, source: str) -> np.ndarray:
    """Decode a prompt WAV from ``handle`` (seekable); errors name ``source``."""
    head = handle.read(12)
    handle.seek(0)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise PromptError(f"{source}: not a WAV file (no RIFF/WAVE header)")
    try:
        with wave.open(handle, "rb") as wav:
            _check_format(wav, source)
            expected = wav.getnframes()
            data = wav.readframes(expected)
    except wave.Error as exc:
        raise PromptError(f"{source}: not a PCM WAV file ({exc})") from None
    except EOFError:
        raise PromptError(f"{source}: truncated WAV header") from None
    if len(data) != 2 * expected:
        raise PromptError(f"{source}: truncated: the header announces {expected} samples, "
                          f"the file holds {len(data) // 2}")
    return np.frombuffer(data, dtype="<i2").astype(np.int16)


def _check_format(wav: wave.Wave_read, source: str) -> None:
    if wav.getnchannels() != 1:
        _bad(source, f"{wav.getnchannels()} channels; prompts must be mono")
    if wav.getsampwidth() != 2:
        _bad(source, f"{8 * wav.getsampwidth()}-bit samples; prompts must be 16-bit")
    if wav.getframerate() != SAMPLE_RATE:
        _bad(source, f"{wav.getframerate()} Hz; prompts must be {SAMPLE_RATE} Hz")
    if wav.getnframes() == 0:
        _bad(source, "no audio")
    if wav.getnframes() > MAX_PROMPT_S * SAMPLE_RATE:
        _bad(source, f"{wav.getnframes() / SAMPLE_RATE:.1f} s long; a prompt may last at "
                     f"most {MAX_PROMPT_S:g} s")


def _bad(source: str, what: str) -> NoReturn:
    raise PromptError(f"{source}: {what}")


# --- tones --------------------------------------------------------------------------------
def _raised_cosine(n: int) -> np.ndarray:
    """A ramp from 0 to 1 over ``n`` samples."""
    return 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)


def _ramped(x: np.ndarray, ramp_s: float, release_s: float | None = None) -> np.ndarray:
    attack = min(round(ramp_s * SAMPLE_RATE), len(x) // 2)
    release = min(round((release_s or ramp_s) * SAMPLE_RATE), len(x) // 2)
    out = x.copy()
    if attack:
        out[:attack] *= _raised_cosine(attack)
    if release:
        out[-release:] *= _raised_cosine(release)[::-1]
    return out


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def beep_tone(freq_hz: float, duration_s: float, level_dbfs: float = -12.0) -> np.ndarray:
    """A sine of ``duration_s`` (ramps included) with 5 ms raised-cosine ramps, int16 at
    8 kHz. The recorder warning tone is ``beep_tone(1400, 0.5)`` (47 CFR 64.501)."""
    if not 0 < freq_hz < SAMPLE_RATE / 2:
        raise ValueError(f"beep_tone: freq_hz {freq_hz} must be in (0, {SAMPLE_RATE // 2})")
    if not 0 < duration_s <= MAX_PROMPT_S:
        raise ValueError(f"beep_tone: duration_s {duration_s} must be in (0, {MAX_PROMPT_S:g}]")
    if level_dbfs > 0:
        raise ValueError(f"beep_tone: level_dbfs {level_dbfs} must be <= 0")
    n = max(1, round(duration_s * SAMPLE_RATE))
    amplitude = FULL_SCALE * 10.0 ** (level_dbfs / 20.0)
    x = amplitude * np.sin(2.0 * np.pi * freq_hz * np.arange(n) / SAMPLE_RATE)
    return _to_int16(_ramped(x, RAMP_S))


def _chime_note(freq_hz: float) -> np.ndarray:
    t = np.arange(round(CHIME_NOTE_S * SAMPLE_RATE)) / SAMPLE_RATE
    amplitude = FULL_SCALE * 10.0 ** (CHIME_LEVEL_DBFS / 20.0)
    x = amplitude * np.exp(-t / CHIME_DECAY_S) * np.sin(2.0 * np.pi * freq_hz * t)
    return _ramped(x, RAMP_S, CHIME_RELEASE_S)


@functools.cache
def chime() -> np.ndarray:
    """The prompt of last resort: two soft notes, 0.6 s, no DTMF or call-progress tone."""
    pcm = _to_int16(np.concatenate([_chime_note(f) for f in CHIME_NOTES_HZ]))
    pcm.flags.writeable = False
    return pcm


def tone_prompt(name: str) -> Prompt:
    """The chime standing in for prompt ``name``."""
    return Prompt.of(name, "", chime(), "tone")
