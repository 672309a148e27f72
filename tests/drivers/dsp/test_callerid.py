"""Caller ID: message parser, FSK bursts (Bell 202, ETSI V.23), DTMF caller ID."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from drivers.dsp.callerid import (
    CallerIdConfigError,
    CallerIdDetector,
    CallerIdMessageError,
    DtmfCallerIdAssembler,
    parse_cid_message,
    parse_dtmf_cid,
)
from drivers.dsp.events import CallerId, DtmfDigit
from drivers.dsp.fsk import FskDemodulator, Uart8N1, UartByte
from drivers.sim import synth
from drivers.sim.backend import FAR_SPEECH_DBFS, NEAR_SPEECH_DBFS
from tests.drivers.dsp import vectors as v

FULL = v.mdmf([(0x01, b"11221530"), (0x02, b"5551234567"), (0x07, b"JOHN DOE")])
WITHHELD = v.mdmf([(0x01, b"03141559"), (0x04, b"P"), (0x08, b"P")])
ETSI = v.mdmf([(0x01, b"07040915"), (0x02, b"4930123456"), (0x07, "Müller".encode("latin-1"))])


def decode(x: np.ndarray, standards: tuple[str, ...] = ("bell202", "v23", "dtmf"),
           frame: int = 160, start: int = 0) -> list[CallerId]:
    pcm = np.concatenate([v.to_int16(x), np.zeros(1600, dtype=np.int16)])
    det = CallerIdDetector(standards)
    events = []
    for i in range(0, len(pcm), frame):
        events += det.feed(start + i, pcm[i:i + frame])
    assert all(isinstance(e, CallerId) for e in events)
    return events


def is_full(e: CallerId) -> bool:
    return (e.number, e.name, e.when, e.absence) == ("5551234567", "JOHN DOE", "11221530", None)


# --- parser ------------------------------------------------------------------------------

def test_parse_mdmf_number_name_date() -> None:
    msg = parse_cid_message(FULL)
    assert (msg.msg_type, msg.number, msg.name, msg.when) == (0x80, "5551234567", "JOHN DOE",
                                                             "11221530")
    assert msg.absence is None and msg.name_absence is None
    assert msg.params[1] == (0x02, b"5551234567")


def test_parse_mdmf_absence_reasons() -> None:
    msg = parse_cid_message(WITHHELD)
    assert (msg.number, msg.absence, msg.name, msg.name_absence) == (None, "P", None, "P")
    out_of_area = parse_cid_message(v.mdmf([(0x04, b"O"), (0x08, b"O")]))
    assert (out_of_area.absence, out_of_area.name_absence) == ("O", "O")


def test_parse_sdmf_number_and_absence() -> None:
    msg = parse_cid_message(v.sdmf("01020304", "8005551212"))
    assert (msg.msg_type, msg.number, msg.when, msg.name) == (0x04, "8005551212", "01020304",
                                                             None)
    for code in "OP":
        withheld = parse_cid_message(v.sdmf("12312359", code))
        assert (withheld.number, withheld.absence) == (None, code)


def test_parse_etsi_latin1_name_and_unknown_parameters() -> None:
    msg = parse_cid_message(v.mdmf([(0x11, b"\x01"), (0x02, b"4930123456"),
                                    (0x07, "Müller".encode("latin-1"))]))
    assert (msg.number, msg.name) == ("4930123456", "Müller")


@pytest.mark.parametrize(("data", "fault"), [
    (FULL[:-1] + bytes([(FULL[-1] + 1) & 0xFF]), "checksum"),
    (FULL[:-2] + FULL[-1:], "length"),
    (b"\x80\x01", "too short"),
    (v.mdmf([(0x02, b"555\x07123")]), "control"),
    (v.mdmf([(0x02, b"55A5")]), "dialable"),
    (v.mdmf([(0x04, b"X")]), "absence"),
    (v.mdmf([(0x01, b"1122")]), "MMDDHHMM"),
    (v.mdmf([], msg_type=0x82), "not supported"),
])
def test_parse_rejects_untrustworthy_messages(data: bytes, fault: str) -> None:
    with pytest.raises(CallerIdMessageError, match=fault):
        parse_cid_message(data)


def test_parse_rejects_a_parameter_overrunning_the_message() -> None:
    body = bytes([0x80, 4, 0x02, 9, 0x35, 0x35])
    with pytest.raises(CallerIdMessageError, match="overruns"):
        parse_cid_message(body + bytes([(-sum(body)) & 0xFF]))


def test_parse_rejects_an_impossible_date_and_with_it_the_number() -> None:
    with pytest.raises(CallerIdMessageError, match="out of range"):
        parse_cid_message(v.mdmf([(0x01, b"13449999"), (0x02, b"5551234")]))


# --- FSK --------------------------------------------------------------------------------

def test_bell202_mdmf() -> None:
    events = decode(v.cid_burst(FULL, v.BELL202, lead_s=0.2))
    assert len(events) == 1 and is_full(events[0])
    assert events[0].standard == "bell202"
    assert abs(events[0].sample - v.samples(0.2)) <= 8  # where the channel seizure began


def test_bell202_sdmf_and_withheld() -> None:
    (e,) = decode(v.cid_burst(v.sdmf("01020304", "8005551212")))
    assert (e.number, e.when, e.name, e.standard) == ("8005551212", "01020304", None, "bell202")
    (p,) = decode(v.cid_burst(WITHHELD))
    assert (p.number, p.name, p.absence, p.when) == (None, None, "P", "03141559")


def test_v23_call_setup_with_dt_as_and_sin227_timing() -> None:
    """UK SIN227: DT-AS alert, >= 45 ms, seizure 96 bits, 55 mark bits, data."""
    burst = v.fsk(v.cid_bits(ETSI, seizure_bits=96, mark_bits=55), v.V23, level_dbfs=-15.0)
    x = np.concatenate([v.silence(0.1), v.dt_as(), v.silence(0.05), burst, v.silence(0.25)])
    (e,) = decode(x)
    assert (e.number, e.name, e.when, e.standard) == ("4930123456", "Müller", "07040915", "v23")
    assert abs(e.sample - v.samples(0.25)) <= 8


def test_v23_without_alert_or_seizure() -> None:
    x = np.concatenate([v.silence(0.1), v.fsk(v.cid_bits(ETSI, 0, 80), v.V23), v.silence(0.1)])
    (e,) = decode(x)
    assert (e.number, e.standard) == ("4930123456", "v23")
    (p,) = decode(v.cid_burst(WITHHELD, v.V23, seizure_bits=300, mark_bits=80))
    assert (p.absence, p.standard) == ("P", "v23")


def test_long_etsi_message_with_unknown_parameters() -> None:
    """~190 bytes (1.6 s of data): framing and the Bell/V.23 decision hold up."""
    params = [(0x01, b"07040915"), (0x03, b"4930999999"), (0x11, b"\x01"),
              (0xE0, bytes(range(0x20, 0x7F)) + b"x" * 50), (0x02, b"4930123456"),
              (0x07, b"AUTOHAUS MUSTERMANN GMBH")]
    message = v.mdmf(params)
    assert len(message) > 180
    (e,) = decode(v.cid_burst(message, v.V23, seizure_bits=300, mark_bits=80))
    assert (e.number, e.name, e.standard) == ("4930123456", "AUTOHAUS MUSTERMANN GMBH", "v23")


@pytest.mark.parametrize("standards", [("bell202",), ("v23",), ("bell202", "v23")])
def test_the_reported_standard_is_measured(standards: tuple[str, ...]) -> None:
    (bell,) = decode(v.cid_burst(FULL, v.BELL202), standards)
    (v23,) = decode(v.cid_burst(FULL, v.V23), standards)
    assert (bell.standard, v23.standard) == ("bell202", "v23")
    assert is_full(bell) and is_full(v23)


@pytest.mark.parametrize("frame", [1, 7, 160, 1000, 8000])
def test_any_frame_length(frame: int) -> None:
    events = decode(v.cid_burst(FULL, v.V23), frame=frame, start=123_457)
    assert len(events) == 1 and is_full(events[0])
    assert abs(events[0].sample - (123_457 + v.samples(0.2))) <= 8


@pytest.mark.parametrize("level", [-3.0, -20.0, -35.0, -45.0])
def test_levels(level: float) -> None:
    events = decode(v.cid_burst(FULL, v.BELL202, level_dbfs=level))
    assert len(events) == 1 and is_full(events[0])


@pytest.mark.parametrize("mark_space", [v.BELL202, v.V23])
def test_every_single_bit_flip_in_the_message_gives_nothing(
        mark_space: tuple[float, float]) -> None:
    """Data-bit flips fail the checksum, start/stop-bit flips the framing."""
    bits = v.cid_bits(FULL, seizure_bits=300, mark_bits=180)
    first = 300 + 180  # the message's first start bit
    for k in range(first, first + 10 * len(FULL)):
        flipped = list(bits)
        flipped[k] ^= 1
        x = np.concatenate([v.silence(0.1), v.fsk(flipped, mark_space), v.silence(0.1)])
        assert decode(x, ("bell202", "v23")) == [], k - first


def uart_bytes(x: np.ndarray) -> list[UartByte]:
    demod = FskDemodulator(1250.0, 2150.0)  # as CallerIdDetector with bell202 + v23
    levels, soft = demod.demodulate(x)
    return Uart8N1().feed(-demod.delay, levels, soft)


def test_two_doubtful_bits_that_cancel_in_the_checksum_give_nothing() -> None:
    """'5' -> '7' (+2) and '2' -> '0' (-2) keep the checksum: only the weakness of the two
    decisions (the other tone almost as strong) betrays them."""
    bits = v.cid_bits(FULL, seizure_bits=300, mark_bits=180)
    number_at = FULL.index(b"5551234567")
    # data bit 1 (weight 2) of '5' (0x35, bit = 0) and of '2' (0x32, bit = 1)
    pos_a, pos_b = (300 + 180 + 10 * byte + 2 for byte in (number_at, number_at + 4))
    assert (bits[pos_a], bits[pos_b]) == (0, 1)

    right = v.fsk_with_doubts(bits, {pos_a: 1.1}, v.BELL202)
    weak = [(b.value, b.weak_bits) for b in uart_bytes(right) if b.weak_bits]
    assert weak == [(ord("5"), 1)]  # one doubtful bit, read right
    (e,) = decode(right, ("bell202", "v23"))
    assert is_full(e)

    flipped = list(bits)
    flipped[pos_a], flipped[pos_b] = 1, 0
    wrong = v.fsk_with_doubts(flipped, {pos_a: 0.95, pos_b: 0.9}, v.BELL202)
    weak = [(b.value, b.weak_bits) for b in uart_bytes(wrong) if b.weak_bits]
    assert weak == [(ord("7"), 1), (ord("0"), 1)]  # the checksum alone would pass it
    assert decode(wrong, ("bell202", "v23")) == []


def test_impulses_give_nothing_or_the_truth() -> None:
    x = v.cid_burst(FULL, v.BELL202)
    start = v.samples(0.2) + round(480 * v.RATE / v.BAUD)
    end = start + round(len(FULL) * 10 * v.RATE / v.BAUD)
    rng = np.random.default_rng(3)
    for pos in range(start, end, 23):
        y = x.copy()
        y[pos:pos + 3] = rng.choice([-32000.0, 32000.0], size=3)
        events = decode(y, ("bell202", "v23"))
        assert not events or (len(events) == 1 and is_full(events[0])), pos


def test_truncated_bursts_give_nothing() -> None:
    bits = v.cid_bits(FULL, seizure_bits=300, mark_bits=180)
    message_end = 480 + 10 * len(FULL)
    for cut in range(480 + 5, message_end - 2, 17):
        x = np.concatenate([v.silence(0.1), v.fsk(bits[:cut], v.BELL202), v.silence(0.3)])
        assert decode(x) == [], cut


def test_noise_never_yields_a_wrong_caller_id() -> None:
    for mark_space in (v.BELL202, v.V23):
        right = 0
        for seed in range(12):
            x = v.cid_burst(FULL, mark_space, level_dbfs=-20.0)
            burst = x[v.samples(0.2):-v.samples(0.2)]
            snr = 20.0 if seed < 4 else 8.0
            events = decode(v.with_snr(x, snr, seed, reference=burst), ("bell202", "v23"))
            assert all(is_full(e) for e in events), (mark_space, seed, events)
            right += len(events)
            if snr == 20.0:
                assert len(events) == 1
        assert right >= 4


def test_speech_like_noise_and_dtmf_give_no_fsk_caller_id() -> None:
    x = np.concatenate([v.white_noise(v.samples(5.0), 2000.0, 1), v.music_like(5.0, 2),
                        v.dtmf_string("0123456789")])
    assert decode(x, ("bell202", "v23")) == []


def test_uart_reports_idle_mark_and_carrier_start() -> None:
    data = bytes([0x55, 0x80, 0x00, 0xFF])
    bits = [1] * 40 + v.uart_bits(data[:1]) + [1] * 50 + v.uart_bits(data[1:])
    x = np.concatenate([v.silence(0.05), v.fsk(bits, v.BELL202), v.silence(0.05)])
    demod = FskDemodulator(*v.BELL202)
    levels, soft = demod.demodulate(x)
    got = Uart8N1().feed(-demod.delay, levels, soft)
    assert [b.value for b in got] == list(data)
    assert 39 <= got[0].idle_bits <= 41 and 49 <= got[1].idle_bits <= 51
    assert got[2].idle_bits < 3  # the 1 in bit 7 of 0x80 and its stop bit
    assert all(abs(b.carrier_start - v.samples(0.05)) <= 4 for b in got)
    spb = v.RATE / v.BAUD
    assert abs(got[1].sample - (v.samples(0.05) + 100 * spb)) <= 2


@pytest.mark.skipif(not (shutil.which("minimodem") and shutil.which("sox")),
                    reason="minimodem and sox are the independent Bell 202 checker")
def test_bell202_vectors_agree_with_minimodem(tmp_path: Path) -> None:
    for message, number in ((FULL, "5551234567"), (v.sdmf("01020304", "8005551212"),
                                                   "8005551212")):
        x = v.cid_burst(message, v.BELL202)
        raw, wav = tmp_path / "cid.raw", tmp_path / "cid.wav"
        v.to_int16(x).tofile(raw)
        subprocess.run(["sox", "-t", "raw", "-r", "8000", "-e", "signed", "-b", "16", "-c",
                        "1", str(raw), str(wav)], check=True)
        out = subprocess.run(["minimodem", "--rx", "-q", "-f", str(wav), "callerid"],
                             check=True, capture_output=True, text=True, timeout=30).stdout
        phones = [line.split(":", 1)[1].strip().replace("-", "")
                  for line in out.splitlines() if line.startswith("Phone:")]
        assert phones == [number]
        (e,) = decode(x)
        assert e.number == number


@pytest.mark.skipif(not (shutil.which("multimon-ng") and shutil.which("sox")),
                    reason="multimon-ng and sox are the independent V.23 checker")
def test_v23_vectors_agree_with_multimon_ng(tmp_path: Path) -> None:
    x = v.cid_burst(FULL, v.V23)
    raw8, raw22 = tmp_path / "v8.raw", tmp_path / "v22.raw"
    v.to_int16(x).tofile(raw8)
    subprocess.run(["sox", "-t", "raw", "-r", "8000", "-e", "signed", "-b", "16", "-c", "1",
                    str(raw8), "-t", "raw", "-r", "22050", str(raw22)], check=True)
    out = subprocess.run(["multimon-ng", "-q", "-c", "-a", "CLIPFSK", "-t", "raw", str(raw22)],
                         check=True, capture_output=True, text=True, timeout=30).stdout
    assert "CID=5551234567" in out and "CNT=JOHN DOE" in out
    (e,) = decode(x)
    assert is_full(e)


# --- DTMF caller ID ----------------------------------------------------------------------

@pytest.mark.parametrize(("sent", "number", "absence"), [
    ("A5551234C", "5551234", None),
    ("A5551234#", "5551234", None),
    ("D5551234C", "5551234", None),
    ("5551234#", "5551234", None),
    ("D1#", None, "P"),
    ("D2#", None, "O"),
    ("D3#", None, "O"),
    ("B00C", None, "O"),
    ("B10C", None, "P"),
    ("D0000000000C", None, "O"),
])
def test_dtmf_caller_id_forms(sent: str, number: str | None, absence: str | None) -> None:
    assert parse_dtmf_cid(sent) == (number, absence)
    events = decode(v.dtmf_string(sent, 0.07, 0.07, lead_s=0.2))
    assert len(events) == 1
    e = events[0]
    assert (e.number, e.absence, e.standard, e.name, e.when) == (number, absence, "dtmf",
                                                                 None, None)
    assert abs(e.sample - v.samples(0.2)) <= 104


@pytest.mark.parametrize("sent", ["A5551234", "AC", "B55C", "A55*5C", "#", "*5551234C"])
def test_dtmf_strings_that_are_not_caller_ids(sent: str) -> None:
    assert decode(v.dtmf_string(sent, 0.07, 0.07)) == []


def test_dtmf_assembler_on_digit_events() -> None:
    def digits(text: str, start: int = 0, step: int = 1120) -> list[DtmfDigit]:
        return [DtmfDigit(start + i * step, d, start + i * step + 560)
                for i, d in enumerate(text)]

    asm = DtmfCallerIdAssembler()
    results = [asm.push(d) for d in digits("A5551234C", start=8000)]
    assert results[:-1] == [None] * 8
    assert results[-1] == CallerId(8000, "5551234", None, "dtmf")
    # a pause longer than max_gap_s abandons the string
    slow = [asm.push(d) for d in digits("A5551234C", step=8000)]
    assert slow == [None] * 9
    # stray digits just before the start code do not spoil the string
    results = [asm.push(d) for d in digits("12A5551234C")]
    assert results[-1] == CallerId(2 * 1120, "5551234", None, "dtmf")
    # keyed digits ending in # are not taken when bare numbers are off
    strict = DtmfCallerIdAssembler(bare_numbers=False)
    assert [strict.push(d) for d in digits("1234#")] == [None] * 5


def test_unknown_standard_is_a_config_error() -> None:
    with pytest.raises(CallerIdConfigError, match="fsk9600"):
        CallerIdDetector(("bell202", "fsk9600"))
    with pytest.raises(CallerIdConfigError):
        CallerIdDetector(())


def test_reset_and_timeline_jump_drop_a_burst_in_progress() -> None:
    pcm = v.to_int16(v.cid_burst(FULL, v.BELL202))
    half = v.samples(0.2) + round((480 + 100) * v.RATE / v.BAUD)  # inside the message
    det = CallerIdDetector()
    det.feed(0, pcm[:half])
    det.reset()
    assert det.feed(half, pcm[half:]) == []
    det = CallerIdDetector()
    det.feed(0, pcm[:half])
    assert det.feed(half + 5000, pcm[half:]) + det.feed(len(pcm) + 5000, pcm[:2000]) == []


def test_a_timeline_jump_still_delivers_a_message_that_ended_before_it() -> None:
    pcm = v.to_int16(v.cid_burst(FULL, v.BELL202, trail_s=0.0))
    det = CallerIdDetector(("bell202", "v23"))
    events = det.feed(0, pcm)
    events += det.feed(len(pcm) + 8000, np.zeros(160, dtype=np.int16))
    assert len(events) == 1 and isinstance(events[0], CallerId) and is_full(events[0])


# --- the demodulator's gate --------------------------------------------------------------

def test_a_non_ascii_digit_in_the_date_is_a_rejected_message() -> None:
    """Latin-1 '¹' (0xB9) passes the character check and str.isdigit(), not int()."""
    with pytest.raises(CallerIdMessageError, match="MMDDHHMM"):
        parse_cid_message(v.mdmf([(0x01, "0106¹200".encode("latin-1")),
                                  (0x02, b"5551234567")]))


@pytest.mark.parametrize(("voice", "seed", "level_dbfs"),
                         [("dealer", 7, NEAR_SPEECH_DBFS), ("customer", 8, FAR_SPEECH_DBFS)])
def test_speech_is_not_demodulated_but_a_burst_after_it_is(voice: str, seed: int,
                                                           level_dbfs: float) -> None:
    """Voiced speech passes the gate's 7-sample carrier test for tens of ms at a time; it
    holds no steady mark tone, so none of it reaches the demodulator. A burst does."""
    speech = synth.to_pcm16(synth.speech_like(20.0, voice, np.random.default_rng(seed),
                                              level_dbfs))
    pad = np.zeros(800, dtype=np.int16)
    demod = FskDemodulator(1250.0, 2150.0, gate_marks_hz=(1200.0, 1300.0))
    assert demod.demodulate_spans(np.concatenate([pad, speech, pad])) == []
    burst = v.to_int16(v.cid_burst(FULL, v.V23))
    demod.reset()
    spans = demod.demodulate_spans(np.concatenate([pad, speech, burst]))
    start = len(pad) + len(speech) + v.samples(0.2)  # where the burst's carrier begins
    assert [(a <= start and a + len(levels) >= start + v.samples(0.3))
            for a, levels, _ in spans] == [True]
    (e,) = decode(np.concatenate([speech.astype(float), v.cid_burst(FULL, v.V23)]))
    assert is_full(e) and e.standard == "v23"


def fsk_tilted(bits: list[int], mark_space: tuple[float, float], level_dbfs: float,
               space_db: float, offset: float) -> np.ndarray:
    """Phase-continuous FSK with the space tone ``space_db`` against the mark (a sloped
    line) and both tones ``offset`` (relative) off their nominal frequencies."""
    n = int(np.ceil(len(bits) * v.RATE / v.BAUD))
    bit = np.asarray(bits)[np.minimum((np.arange(n) * v.BAUD / v.RATE).astype(int),
                                      len(bits) - 1)]
    freq = np.where(bit == 1, mark_space[0], mark_space[1]) * (1.0 + offset)
    amp = np.where(bit == 1, 1.0, 10.0 ** (space_db / 20.0))
    return v.amplitude(level_dbfs) * amp * np.sin(2 * np.pi * np.cumsum(freq) / v.RATE)


@pytest.mark.parametrize("mark_space", [v.BELL202, v.V23])
@pytest.mark.parametrize("space_db", [-6.0, 6.0])
@pytest.mark.parametrize("offset", [-0.02, 0.02])
def test_tilt_offset_and_noise_together(mark_space: tuple[float, float], space_db: float,
                                        offset: float) -> None:
    """The gate's mark test holds for a mark 2 % off on a sloped, noisy line."""
    seizure = 300 if mark_space == v.BELL202 else 0
    bits = v.cid_bits(FULL, seizure_bits=seizure, mark_bits=80)
    burst = fsk_tilted(bits, mark_space, -20.0 - max(space_db, 0.0), space_db, offset)
    x = v.with_snr(np.concatenate([v.silence(0.2), burst, v.silence(0.2)]), 20.0, 1,
                   reference=burst)
    (e,) = decode(x, ("bell202", "v23"))
    assert is_full(e)


def test_a_burst_starting_anywhere_around_a_batch_boundary() -> None:
    """Live batches (640 samples) and one batch give the same caller ID and carrier start
    wherever the carrier begins against the batch edges (the gate holds a stretch at a
    batch's end until the next batch shows whether a carrier goes on)."""
    bits = v.cid_bits(FULL, seizure_bits=0, mark_bits=60)
    burst = v.fsk(bits, v.V23, level_dbfs=-30.0)
    for lead in range(560, 720, 9):
        x = v.with_snr(np.concatenate([np.zeros(lead), burst, v.silence(0.2)]), 15.0, lead,
                       reference=burst)
        live = decode(x, ("bell202", "v23"))
        whole = decode(x, ("bell202", "v23"), frame=len(x) + 1600)
        assert live == whole and len(live) == 1 and is_full(live[0]), lead
        assert abs(live[0].sample - lead) <= 16, lead  # (noise moves the onset a little)
