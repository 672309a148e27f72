"""DtmfDetector against ITU-T Q.24 / ETSI ES 201 235-3 receiver figures, on own vectors.

Levels are dBFS per tone (0 dBFS = full-scale sine). Reject checks sit beyond the accept
points with margins: offset 1.5 % accept / 3.5 % reject (limit 2.5 %); normal twist 8 dB
accept / 10 dB reject (limit 9 dB); reverse twist 4 dB accept / 6 dB reject (limit 5 dB).

Talk-off is checked at 16 phases of the detector's block grid: a receiver that is marginal
on some speech passes or fails it depending on where its blocks happen to fall.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from drivers.dsp import dtmf as dtmf_module
from drivers.dsp.dtmf import BLOCK_LEN, HALF_LEN, DtmfDetector
from drivers.dsp.events import DtmfDigit
from drivers.dsp.goertzel import GoertzelBank
from drivers.sim import synth
from drivers.sim.backend import FAR_SPEECH_DBFS, NEAR_SPEECH_DBFS, render
from drivers.sim.scenario import load_scenario
from tests.drivers.dsp import vectors as v

ALL_DIGITS = "123A456B789C*0#D"
ROWS = ("123A", "456B", "789C", "*0#D")
COLS = ("147*", "2580", "369#", "ABCD")
# The block grid repeats every HALF_LEN (52) samples; 7 * k for k < 16 spans a whole block
# (0 .. 105) and falls on 16 distinct phases of the grid.
GRID_OFFSETS = tuple(7 * k for k in range(16))
ONE_SECOND = 8000  # talk-off runs feed 1 s frames in 1 s batches (same decisions, less overhead)
LONG_OFFHOOK = Path(__file__).parents[3] / "examples" / "scenarios" / "long-offhook.toml"


def detect(x: np.ndarray, frame: int = 160, start: int = 0) -> list[DtmfDigit]:
    """Feed ``x`` in frames on a timeline starting at ``start``, then 100 ms of silence."""
    pcm = np.concatenate([v.to_int16(x), np.zeros(800, dtype=np.int16)])
    det = DtmfDetector()
    events = []
    for i in range(0, len(pcm), frame):
        events += det.feed(start + i, pcm[i:i + frame])
    assert all(isinstance(e, DtmfDigit) for e in events)
    return events


def digits(x: np.ndarray, **kw: int) -> str:
    return "".join(e.digit for e in detect(x, **kw))


def framed(tone: np.ndarray, lead_s: float = 0.1) -> np.ndarray:
    return np.concatenate([v.silence(lead_s), tone, v.silence(0.1)])


def test_goertzel_bank_matches_the_dft() -> None:
    rng = np.random.default_rng(1)
    blocks = rng.normal(size=(3, 52))
    freqs = (697.0, 1633.0, 2000.0)
    bank = GoertzelBank(freqs, 52, window=np.hamming(52))
    n = np.arange(52)
    expected = (blocks * np.hamming(52)) @ np.exp(-2j * np.pi * np.outer(n, freqs) / 8000)
    assert np.allclose(bank.analyse(blocks), expected)
    joined = bank.analyse(blocks[:1]) + bank.analyse(blocks[1:2]) * bank.block_rotation()
    whole = np.concatenate([blocks[0] * np.hamming(52), blocks[1] * np.hamming(52)])
    assert np.allclose(joined[0], whole @ np.exp(-2j * np.pi * np.outer(np.arange(104), freqs)
                                                 / 8000))


def test_every_digit_with_sample_accurate_bounds() -> None:
    tone_s, gap_s, lead_s = 0.06, 0.06, 0.1
    events = detect(v.dtmf_string(ALL_DIGITS, tone_s, gap_s, lead_s=lead_s))
    assert "".join(e.digit for e in events) == ALL_DIGITS
    for i, e in enumerate(events):
        onset = v.samples(lead_s + i * (tone_s + gap_s))
        assert abs(e.sample - onset) <= BLOCK_LEN
        assert e.end_sample is not None
        assert abs(e.end_sample - (onset + v.samples(tone_s))) <= BLOCK_LEN


@pytest.mark.parametrize("frame", [1, 37, 160, 1000, 4096])
def test_any_frame_length_gives_the_same_events(frame: int) -> None:
    x = v.dtmf_string("9A0#", 0.05, 0.05)
    assert detect(x, frame=frame) == detect(x, frame=160)


def test_events_are_on_the_callers_timeline() -> None:
    x = v.dtmf_string("58")
    base = detect(x)
    shifted = detect(x, start=1_000_003)
    assert [(e.sample + 1_000_003, e.end_sample + 1_000_003) for e in base if e.end_sample] == [
        (e.sample, e.end_sample) for e in shifted]


@pytest.mark.parametrize("offset", [0.015, -0.015])
def test_frequency_offset_of_1_5_percent_is_accepted(offset: float) -> None:
    for d in ALL_DIGITS:
        assert digits(framed(v.dtmf(d, 0.05, row_offset=offset))) == d, (d, "row")
        assert digits(framed(v.dtmf(d, 0.05, col_offset=offset))) == d, (d, "col")
        assert digits(framed(v.dtmf(d, 0.05, row_offset=offset, col_offset=offset))) == d


@pytest.mark.parametrize("offset", [0.035, -0.035])
def test_frequency_offset_of_3_5_percent_is_rejected(offset: float) -> None:
    for d in ALL_DIGITS:
        assert digits(framed(v.dtmf(d, 0.2, row_offset=offset))) == "", (d, "row")
        assert digits(framed(v.dtmf(d, 0.2, col_offset=offset))) == "", (d, "col")


@pytest.mark.parametrize(("twist_db", "accepted"),
                         [(8.0, True), (-4.0, True), (10.0, False), (-6.0, False)])
def test_twist(twist_db: float, accepted: bool) -> None:
    for d in ALL_DIGITS:
        got = digits(framed(v.dtmf(d, 0.06, twist_db=twist_db)))
        assert got == (d if accepted else ""), (d, twist_db)


def test_dynamic_range_of_38_db() -> None:
    for level in (-7.0, -15.0, -25.0, -35.0, -45.0):
        got = "".join(digits(framed(v.dtmf(d, 0.05, level_dbfs=level))) for d in ALL_DIGITS)
        assert got == ALL_DIGITS, level


def test_tones_below_the_sensitivity_floor_are_ignored() -> None:
    assert digits(framed(v.dtmf("5", 0.1, level_dbfs=-55.0))) == ""


@pytest.mark.parametrize("lead", GRID_OFFSETS)
def test_40_ms_detected_and_20_ms_rejected_at_any_block_alignment(lead: int) -> None:
    lead_s = 0.1 + lead / v.RATE
    assert digits(framed(v.dtmf("5", 0.040), lead_s)) == "5"
    assert digits(framed(v.dtmf("D", 0.040), lead_s)) == "D"
    assert digits(framed(v.dtmf("5", 0.020), lead_s)) == ""
    assert digits(framed(v.dtmf("D", 0.020), lead_s)) == ""


@pytest.mark.parametrize("lead", GRID_OFFSETS)
def test_gaps_of_10_ms_are_bridged_and_30_ms_separate(lead: int) -> None:
    lead_s = 0.1 + lead / v.RATE

    def broken(gap_s: float) -> np.ndarray:
        tone = v.dtmf("7", 0.1 + gap_s)  # 50 ms, gap, 50 ms; phase runs on through the gap
        cut = v.samples(0.05)
        tone[cut:cut + v.samples(gap_s)] = 0.0
        return framed(tone, lead_s)

    assert digits(broken(0.010)) == "7"
    assert digits(broken(0.030)) == "77"


def test_white_noise_at_15_db_snr() -> None:
    for seed in range(3):
        for d in ALL_DIGITS:
            tone = v.dtmf(d, 0.045, level_dbfs=-12.0)
            x = framed(tone)
            rms = np.sqrt(np.mean(tone * tone) / 10 ** 1.5)
            assert digits(x + v.white_noise(len(x), rms, seed)) == d, (d, seed)


def test_worst_corner_twist_offset_and_noise_together() -> None:
    """8 dB twist, 1.5 % offset on both tones and 15 dB S/N at once, 60 ms tones."""
    for d in ALL_DIGITS:
        tone = v.dtmf(d, 0.06, twist_db=8.0, row_offset=-0.015, col_offset=0.015)
        x = framed(tone)
        rms = np.sqrt(np.mean(tone * tone) / 10 ** 1.5)
        assert digits(x + v.white_noise(len(x), rms, 7)) == d


def test_noise_alone_gives_no_digits() -> None:
    assert digits(v.white_noise(v.samples(20.0), 3000.0, 11)) == ""


def test_music_gives_no_digits() -> None:
    """Chords and arpeggios with harmonics, including F5 + F#6 (within 0.2 % of '3')."""
    for seed in range(6):
        assert digits(v.music_like(20.0, seed)) == "", seed


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """espeak-ng speech in six languages, resampled to 8 kHz by sox."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("espeak-ng and sox are needed for the talk-off test")
    texts = {
        "en": "Good morning, this is the service desk. Your car is ready, the invoice is "
              "four hundred and twelve dollars. Please call us back at nine.",
        "de": "Guten Tag, hier ist das Autohaus. Ihr Wagen ist fertig, Sie können ihn "
              "morgen früh abholen. Die Rechnung beträgt dreihundert Euro.",
        "fr": "Bonjour, je vous appelle au sujet de la voiture. Pouvez-vous me rappeler "
              "demain matin, s'il vous plaît? Merci beaucoup.",
        "es": "Buenos días, le llamo por el coche nuevo. ¿Puede devolverme la llamada "
              "mañana por la tarde? Muchas gracias.",
        "it": "Buongiorno, la chiamo per la macchina. Può richiamarmi domani mattina per "
              "favore? Grazie mille, arrivederci.",
        "nl": "Goedemiddag, u spreekt met de garage. Uw auto staat klaar, u kunt hem "
              "morgen ophalen. Tot ziens.",
    }
    out: dict[str, np.ndarray] = {}
    tmp: Path = tmp_path_factory.mktemp("speech")
    for lang, text in texts.items():
        wav, raw = tmp / f"{lang}.wav", tmp / f"{lang}.raw"
        subprocess.run(["espeak-ng", "-v", lang, "-w", str(wav), text], check=True)
        subprocess.run(["sox", str(wav), "-r", "8000", "-b", "16", "-e", "signed", "-c", "1",
                        "-t", "raw", str(raw)], check=True)
        out[lang] = np.fromfile(raw, dtype=np.int16).astype(np.float64)
    return out


@pytest.mark.parametrize("lang", ["en", "de", "fr", "es", "it", "nl"])
def test_speech_gives_no_digits(speech: dict[str, np.ndarray], lang: str) -> None:
    x = speech[lang]
    assert len(x) > v.RATE  # more than a second of speech
    for gain in (1.0, 0.3, 0.05):
        assert digits(x * gain) == "", gain
    # DTMF keyed over speech is still found
    mixed = x * 0.05
    tone = v.dtmf("4", 0.08, level_dbfs=-10.0)
    at = len(mixed) // 3
    mixed[at:at + len(tone)] += tone
    assert digits(mixed) == "4"


def feed_from(det: DtmfDetector, pcm: np.ndarray, start: int) -> list[DtmfDigit]:
    """reset(), then feed ``pcm[start:]`` at its own sample numbers, then a second of
    silence (a full batch: everything fed is analysed and any run in progress ends)."""
    det.reset()
    events = []
    for i in range(start, len(pcm), ONE_SECOND):
        events += det.feed(i, pcm[i:i + ONE_SECOND])
    events += det.feed(len(pcm), np.zeros(ONE_SECOND, dtype=np.int16))
    assert all(isinstance(e, DtmfDigit) for e in events)
    return events


def digits_at_every_grid_offset(pcm: np.ndarray) -> dict[int, str]:
    det = DtmfDetector(batch_samples=ONE_SECOND)
    return {off: "".join(e.digit for e in feed_from(det, pcm, off)) for off in GRID_OFFSETS}


def test_batch_size_does_not_change_the_events() -> None:
    x = v.dtmf_string(ALL_DIGITS, 0.05, 0.05)  # 1.8 s: 1 s batches are cut in 0.42 s slices
    det = DtmfDetector(batch_samples=ONE_SECOND)
    assert feed_from(det, v.to_int16(x), 0) == detect(x)


@pytest.mark.parametrize(("neighbours_db", "expected"),
                         [(-8.0, ""), (-10.0, ""), (-200.0, "*")])
def test_two_harmonics_on_a_digit_pair_are_not_a_digit(neighbours_db: float,
                                                       expected: str) -> None:
    """A steady vowel of 118.9 Hz: harmonics 8 and 10 sit on 941 / 1209 Hz ('*') within
    1.7 %, harmonics 7, 9 and 11 lie ``neighbours_db`` below them. The tone pair then holds
    81 % or 87 % of the energy, like the speech that used to pass at some block alignments.
    Without the neighbours it is a valid '*' (offsets +1.1 % and -1.7 %)."""
    t = np.arange(v.samples(0.3)) / v.RATE
    phases = np.random.default_rng(1).uniform(0.0, 2 * np.pi, 5)
    gains = [1.0 if k in (8, 10) else 10 ** (neighbours_db / 20) for k in range(7, 12)]
    vowel = sum(g * np.sin(2 * np.pi * k * 118.9 * t + ph)
                for k, g, ph in zip(range(7, 12), gains, phases, strict=True))
    x = framed(vowel / np.max(np.abs(vowel)) * v.amplitude(-12.0))
    assert digits_at_every_grid_offset(v.to_int16(x)) == dict.fromkeys(GRID_OFFSETS, expected)


@pytest.fixture(scope="module")
def long_offhook() -> tuple[np.ndarray, str, tuple[int, ...]]:
    """The simulator's 10-minute outbound call: dial tone, 9 keyed digits, conversation."""
    pcm, _, truth = render(load_scenario(LONG_OFFHOOK))
    assert truth[0].dialed is not None
    return pcm, truth[0].dialed, truth[0].digit_samples


def test_long_call_gives_only_the_dialed_digits_at_every_grid_offset(
        long_offhook: tuple[np.ndarray, str, tuple[int, ...]]) -> None:
    pcm, dialed, onsets = long_offhook
    det = DtmfDetector(batch_samples=ONE_SECOND)
    for off in GRID_OFFSETS:
        events = feed_from(det, pcm, off)
        assert "".join(e.digit for e in events) == dialed, off
        for e, onset in zip(events, onsets, strict=True):
            assert abs(e.sample - onset) <= BLOCK_LEN, (off, e)


@pytest.mark.parametrize(("voice", "seed", "level_dbfs"),
                         [("dealer", 101, NEAR_SPEECH_DBFS), ("customer", 202, FAR_SPEECH_DBFS),
                          ("customer", 303, NEAR_SPEECH_DBFS)])
def test_synthetic_voices_give_no_digits_at_every_grid_offset(
        voice: str, seed: int, level_dbfs: float) -> None:
    speech = synth.speech_like(150.0, voice, np.random.default_rng(seed), level_dbfs)
    assert digits_at_every_grid_offset(synth.to_pcm16(speech)) == dict.fromkeys(GRID_OFFSETS, "")


def test_espeak_speech_gives_no_digits_at_every_grid_offset(
        speech: dict[str, np.ndarray]) -> None:
    pause = np.zeros(v.samples(0.2))
    talk = np.concatenate([part for x in speech.values() for part in (x, pause)])
    for gain in (1.0, 0.3):
        got = digits_at_every_grid_offset(v.to_int16(talk * gain))
        assert got == dict.fromkeys(GRID_OFFSETS, ""), gain


@pytest.mark.parametrize("start", [0, 1, 37, 51, 52, 8_044, 1_000_003])
def test_reset_then_feeding_from_any_sample_is_a_fresh_detector(start: int) -> None:
    """After reset() the grid restarts at the next sample fed: same events as a new detector,
    with start samples on the caller's timeline."""
    tone_s, gap_s, lead_s = 0.05, 0.05, 0.1
    x = v.dtmf_string("3B0*", tone_s, gap_s, lead_s=lead_s)
    det = DtmfDetector()
    history = v.to_int16(v.dtmf("7", 0.2))  # a digit in progress, ending at ``start``
    assert det.feed(start - len(history), history) == []
    det.reset()
    pcm = np.concatenate([v.to_int16(x), np.zeros(800, dtype=np.int16)])
    events = []
    for i in range(0, len(pcm), 160):
        events += det.feed(start + i, pcm[i:i + 160])
    assert events == detect(x, start=start)
    assert "".join(e.digit for e in events) == "3B0*"
    for i, e in enumerate(events):
        assert abs(e.sample - (start + v.samples(lead_s + i * (tone_s + gap_s)))) <= BLOCK_LEN


@pytest.mark.parametrize("cut", [400, 443, 700, 919])
def test_reset_inside_a_tone_detects_the_rest_from_the_next_sample_fed(cut: int) -> None:
    pcm = np.concatenate([v.to_int16(v.dtmf("9", 0.2)), np.zeros(800, dtype=np.int16)])
    det = DtmfDetector()
    assert det.feed(0, pcm[:cut]) == []
    det.reset()
    events = det.feed(cut, pcm[cut:])
    assert [e.digit for e in events] == ["9"]
    assert cut <= events[0].sample <= cut + HALF_LEN  # the first block is half silence


def test_reset_forgets_a_digit_in_progress() -> None:
    det = DtmfDetector()
    pcm = v.to_int16(v.dtmf("1", 0.2))
    det.feed(0, pcm[:1000])
    det.reset()
    assert det.feed(1000, np.zeros(2000, dtype=np.int16)) == []


def test_timeline_jump_ends_the_digit_in_progress() -> None:
    det = DtmfDetector()
    pcm = v.to_int16(v.dtmf("6", 0.1))
    events = det.feed(0, pcm)
    events += det.feed(50_000, np.zeros(2000, dtype=np.int16))
    assert [e.digit for e in events] == ["6"]
    assert isinstance(events[0], DtmfDigit)
    assert events[0].end_sample is not None and events[0].end_sample <= len(pcm) + BLOCK_LEN


@pytest.mark.skipif(not (shutil.which("multimon-ng") and shutil.which("sox")),
                    reason="multimon-ng and sox are the independent checker")
def test_agrees_with_multimon_ng_on_clean_strings(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    text = "".join(rng.choice(list(ALL_DIGITS), size=24))
    x = v.dtmf_string(text, 0.07, 0.07)
    raw8, raw22 = tmp_path / "d8.raw", tmp_path / "d22.raw"
    v.to_int16(x).tofile(raw8)
    subprocess.run(["sox", "-t", "raw", "-r", "8000", "-e", "signed", "-b", "16", "-c", "1",
                    str(raw8), "-t", "raw", "-r", "22050", str(raw22)], check=True)
    out = subprocess.run(["multimon-ng", "-q", "-c", "-a", "DTMF", "-t", "raw", str(raw22)],
                         check=True, capture_output=True, text=True).stdout
    theirs = "".join(line.split(":")[1].strip() for line in out.splitlines()
                     if line.startswith("DTMF:"))
    assert theirs == text
    assert digits(x) == text


# --- the float32 screen and the purity fit --------------------------------------------

def exact_screen(det: DtmfDetector, halves: np.ndarray) -> np.ndarray:
    """Per block of halves (b, b+1), b = 1 .. n-2: passes the level test, the prescreen
    and the peak test, in float64 as _decide makes them."""
    x = halves.astype(np.float64)
    freqs = (*v.ROW_HZ, *v.COL_HZ)
    bins = x @ np.exp(-2j * np.pi * np.outer(np.arange(HALF_LEN), freqs) / v.RATE)
    rot = np.exp(-2j * np.pi * np.array(freqs) * HALF_LEN / v.RATE)
    power = np.abs(bins[1:-1] + bins[2:] * rot) ** 2
    sums, squares = x.sum(axis=1), (x * x).sum(axis=1)
    ac = squares[1:-1] + squares[2:] - (sums[1:-1] + sums[2:]) ** 2 / BLOCK_LEN
    groups = np.sort(power.reshape(-1, 2, 4), axis=2)
    return ((ac >= det._ac_floor)
            & (groups[:, :, 3].sum(axis=1) >= det._prescreen_share * BLOCK_LEN / 2 * ac)
            & (groups[:, :, 2] * det._peak_factor <= groups[:, :, 3]).all(axis=1))


def just_passing(det: DtmfDetector, make: object, block: int) -> np.ndarray:
    """Halves from ``make(t)`` (t in 0 .. 1; block ``block`` passes exact_screen at 0, fails
    at 1) with t bisected until the block passes by a hair."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_screen(det, make(mid))[block] else (lo, mid)  # type: ignore[operator]
    halves = make(lo)  # type: ignore[operator]
    assert exact_screen(det, halves)[block]
    return halves


@pytest.mark.parametrize("digit", "159#")
@pytest.mark.parametrize("phase", [0, 17, 35])
def test_the_float32_screen_passes_blocks_right_at_the_exact_limits(digit: str,
                                                                  phase: int) -> None:
    """The screen runs in float32 with a margin; a block that the exact tests pass by a
    hair at the level floor, the prescreen limit or the peak margin must pass it too."""
    det = DtmfDetector()
    f_row, f_col = v.dtmf_freqs(digit)
    t = (np.arange(6 * HALF_LEN) + phase) / v.RATE
    pair = np.sin(2 * np.pi * f_row * t + 0.4) + 0.8 * np.sin(2 * np.pi * f_col * t + 1.1)
    noise = np.random.default_rng(phase).normal(size=len(t))
    other_row = v.ROW_HZ[(v.ROW_HZ.index(f_row) + 1) % 4]
    third = np.sin(2 * np.pi * other_row * t + 2.0)
    floor_scale = np.sqrt(det._ac_floor / 104.0)  # amplitude of a floor-level pair, roughly

    def level(s: float) -> np.ndarray:  # quieter and quieter
        return (pair * floor_scale * (1.2 - 0.4 * s) + 3.0).reshape(-1, HALF_LEN)

    def prescreen(s: float) -> np.ndarray:  # more and more noise
        return ((pair + 3.0 * s * noise) * 2000.0).reshape(-1, HALF_LEN)

    def peak(s: float) -> np.ndarray:  # a third tone in the row group, louder and louder
        return ((pair + 1.2 * s * third) * 2000.0).reshape(-1, HALF_LEN)

    for make in (level, prescreen, peak):
        halves = just_passing(det, make, 2)
        assert 2 in det._screen(halves).tolist(), make.__name__


def test_the_purity_fit_splits_exactly_at_its_limit() -> None:
    """A tone pair plus a residual orthogonal to it (and to DC) holding exactly the rest of
    the energy: the fit's share is the pair's, so the limit splits 0.92 -+ 1e-6."""
    rng = np.random.default_rng(4)
    n = np.arange(BLOCK_LEN)
    for digit in ALL_DIGITS:
        freqs = np.array(v.dtmf_freqs(digit)) * (1.0 + rng.uniform(-0.02, 0.02, 2))
        basis = np.column_stack([np.ones(BLOCK_LEN)] + [
            fn(2 * np.pi * f * n / v.RATE) for f in freqs for fn in (np.cos, np.sin)])
        pair = basis[:, 1:] @ rng.normal(size=4) * 1000.0 + 5.0
        noise = rng.normal(size=BLOCK_LEN)
        residual = noise - basis @ np.linalg.lstsq(basis, noise, rcond=None)[0]
        ac_pair = np.sum((pair - pair.mean()) ** 2)
        for share, expected in ((0.92 + 1e-6, True), (0.92 - 1e-6, False)):
            scale = np.sqrt(ac_pair * (1.0 - share) / share / np.sum(residual ** 2))
            block = pair + scale * residual
            ac = np.sum((block - block.mean()) ** 2)
            got = dtmf_module._pure_pair(block[None, :], freqs[None, :], np.array([ac]))
            assert got.tolist() == [expected], (digit, share)
