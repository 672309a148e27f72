"""Caller-ID decoders: Bell 202 SDMF/MDMF, ETSI V.23 call set-up, DTMF caller ID.

Three layers, each usable on its own:

* :func:`parse_cid_message` -- the pure message parser (type, length, parameters,
  checksum) shared by Bell 202 (Telcordia GR-30-CORE) and ETSI EN 300 659-3 messages;
* :class:`DtmfCallerIdAssembler` -- turns :class:`DtmfDigit` events into a caller ID
  (``A<number>C``, ``A<number>#``, ``D<number>C``, ``<number>#`` and the information codes);
* :class:`CallerIdDetector` -- the streaming :class:`~drivers.dsp.events.Detector`: FSK
  demodulator and UART (:mod:`drivers.dsp.fsk`), message framing, and a DTMF receiver.

Safety rule: a burst that is damaged (framing error, missing byte, bad checksum, bad
characters, impossible date, two or more doubtful bit decisions) yields no caller ID at all
rather than a wrong one. The 8-bit additive checksum catches every error pattern inside
one byte and every single bit error, but not two flips of equal weight in different
bytes (+2^k, -2^k); those come from noise, and noise-flipped bits are decided with little
confidence, hence the rule on doubtful bits.

FSK framing. A message starts at a byte 0x04 (SDMF) or 0x80 (MDMF / call set-up)
preceded by at least ``MIN_MARK_BITS`` of continuous mark (GR-30: 180 mark bits after the
30-byte channel seizure; EN 300 659-1: 80 +/- 25 mark bits, seizure optional); its bytes
follow with at most ``MAX_GAP_BITS`` of mark between them. When Bell 202 and V.23 are both
enabled one demodulator tuned between them (1250/2150 Hz) decodes both. Either way the
standard reported is measured, from the mark signal before the message: its power at
1200 Hz against 1300 Hz over up to 160 bits (a 100 Hz difference is 4 DFT bins there).
A receiver tuned to one of them decodes the other too (their tones are 100 Hz apart).
The event's ``sample`` is where the carrier that holds the message began (the start of
the channel seizure, or of the mark signal when there is none).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from drivers.dsp.dtmf import DtmfDetector
from drivers.dsp.events import SAMPLE_RATE, CallerId, DetectorEvent, DtmfDigit
from drivers.dsp.fsk import BELL202, V23, FskDemodulator, FskStandard, Uart8N1, UartByte

log = logging.getLogger(__name__)

STANDARDS = ("bell202", "v23", "dtmf")

# Message types: GR-30-CORE SDMF caller ID 0x04, MDMF 0x80; EN 300 659-3 call set-up 0x80.
SDMF_CALLER_ID = 0x04
MDMF_CALL_SETUP = 0x80
# Parameter types (GR-30-CORE MDMF; EN 300 659-3 §5.4 uses the same codes).
PARAM_DATE_TIME = 0x01
PARAM_NUMBER = 0x02
PARAM_NUMBER_ABSENT = 0x04
PARAM_NAME = 0x07
PARAM_NAME_ABSENT = 0x08
ABSENCE_CODES = ("O", "P")  # "O" out of area / unavailable, "P" private
NUMBER_CHARS = frozenset("0123456789*#+")
DATE_LEN = 8  # MMDDHHMM

# The checksum catches any single bit error but not two that cancel (+2^k in one byte,
# -2^k in another). Noise-flipped bits are nearly always weak (fsk.DEFAULT_WEAK_MARGIN),
# so a message with two or more weak bits is dropped rather than trusted.
MAX_WEAK_BITS = 1
MIN_MARK_BITS = 30  # below EN 300 659-1's minimum of 55, above any gap inside a message
MAX_GAP_BITS = 16  # mark bits allowed between the bytes of one message
CLASSIFY_MAX_BITS = 160
# Raw audio kept to tell Bell 202 from V.23 once a message is complete: the longest message
# (258 bytes, 2.15 s) plus its mark signal and one batch fit in 3 s.
HISTORY_SAMPLES = 3 * SAMPLE_RATE
DEFAULT_BATCH_SAMPLES = 640  # FSK work is done per 80 ms (numpy overhead per call)

# DTMF caller ID: no single standard; national forms (DK, SE, NL, FI, BR, IN...) share the
# A/B/D start codes and C/# end codes below (see shared NOTES "Caller ID").
DTMF_START = "AD"  # A: number follows; D: number or information code follows
DTMF_CODE_START = "B"  # B: two-digit information code (SE): 00 unavailable, 10 private
DTMF_END = "C#"
DTMF_CODES = {"00": "O", "10": "P"}  # B-form information codes
DTMF_D_CODES = {"1": "P", "2": "O", "3": "O"}  # D<code># (DK): 1 private, 2/3 unavailable
DTMF_MAX_GAP_S = 0.3  # CLIP digits come every ~100-150 ms; a longer pause ends the string
DTMF_MAX_DIGITS = 32


class CallerIdError(Exception):
    """Base of the caller-ID errors."""


class CallerIdConfigError(CallerIdError, ValueError):
    """An unknown standard or a bad option."""


class CallerIdMessageError(CallerIdError, ValueError):
    """A message that cannot be trusted (length, checksum, parameters, characters)."""


@dataclass(frozen=True, slots=True)
class CallerIdMessage:
    """A parsed SDMF / MDMF / call set-up message."""

    msg_type: int
    number: str | None = None
    name: str | None = None
    when: str | None = None  # MMDDHHMM as sent
    absence: str | None = None  # number withheld: "O" unavailable, "P" private
    name_absence: str | None = None
    params: tuple[tuple[int, bytes], ...] = ()


# --- message parser -------------------------------------------------------------------

def parse_cid_message(data: bytes) -> CallerIdMessage:
    """Parse type, length, payload and checksum of one message (the checksum byte included).

    Raises :class:`CallerIdMessageError` naming the fault; trailing bytes are an error.
    """
    if len(data) < 3:
        raise CallerIdMessageError(f"caller-ID message of {len(data)} bytes is too short")
    msg_type, length = data[0], data[1]
    if len(data) != length + 3:
        raise CallerIdMessageError(
            f"caller-ID message type 0x{msg_type:02x}: length byte {length} but "
            f"{len(data) - 3} payload bytes")
    if sum(data) & 0xFF:
        expected = (-sum(data[:-1])) & 0xFF
        raise CallerIdMessageError(
            f"caller-ID message type 0x{msg_type:02x}: checksum 0x{data[-1]:02x}, "
            f"expected 0x{expected:02x}")
    payload = data[2:-1]
    if msg_type == SDMF_CALLER_ID:
        return _parse_sdmf(payload)
    if msg_type == MDMF_CALL_SETUP:
        return _parse_mdmf(payload)
    raise CallerIdMessageError(f"caller-ID message type 0x{msg_type:02x} is not supported")


def _parse_sdmf(payload: bytes) -> CallerIdMessage:
    if len(payload) < DATE_LEN + 1:
        raise CallerIdMessageError(f"SDMF payload of {len(payload)} bytes is too short")
    when = _date(payload[:DATE_LEN])
    rest = _text(payload[DATE_LEN:], "SDMF number")
    if rest in ABSENCE_CODES:
        return CallerIdMessage(SDMF_CALLER_ID, when=when, absence=rest)
    return CallerIdMessage(SDMF_CALLER_ID, number=_number(rest), when=when)


def _parse_mdmf(payload: bytes) -> CallerIdMessage:
    params: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(payload):
        if pos + 2 > len(payload):
            raise CallerIdMessageError(f"MDMF parameter header cut at byte {pos}")
        ptype, plen = payload[pos], payload[pos + 1]
        value = payload[pos + 2: pos + 2 + plen]
        if len(value) != plen:
            raise CallerIdMessageError(
                f"MDMF parameter 0x{ptype:02x} at byte {pos}: length {plen} overruns")
        params.append((ptype, value))
        pos += 2 + plen
    return _mdmf_fields(params)


def _mdmf_fields(params: list[tuple[int, bytes]]) -> CallerIdMessage:
    fields: dict[str, str | None] = {}
    for ptype, value in params:
        if ptype == PARAM_DATE_TIME:
            fields["when"] = _date(value)
        elif ptype == PARAM_NUMBER:
            fields["number"] = _number(_text(value, "MDMF number"))
        elif ptype == PARAM_NUMBER_ABSENT:
            fields["absence"] = _absence(value, "number")
        elif ptype == PARAM_NAME:
            fields["name"] = _text(value, "MDMF name").strip() or None
        elif ptype == PARAM_NAME_ABSENT:
            fields["name_absence"] = _absence(value, "name")
    return CallerIdMessage(MDMF_CALL_SETUP, params=tuple(params), **fields)


def _text(value: bytes, what: str) -> str:
    """Printable characters only: ASCII 0x20-0x7E, or Latin-1 letters 0xA0-0xFF (ETSI)."""
    if any(b < 0x20 or 0x7F <= b < 0xA0 for b in value):
        raise CallerIdMessageError(f"{what} {value!r} holds control characters")
    return value.decode("latin-1")


def _number(text: str) -> str:
    number = text.replace(" ", "").replace("-", "")
    if not number or not set(number) <= NUMBER_CHARS:
        raise CallerIdMessageError(f"caller-ID number {text!r} is not a dialable number")
    return number


def _absence(value: bytes, what: str) -> str:
    code = value.decode("latin-1")
    if code not in ABSENCE_CODES:
        raise CallerIdMessageError(f"reason for absence of {what} {code!r} is not O or P")
    return code


def _date(value: bytes) -> str:
    """MMDDHHMM. An impossible date fails the whole message: with a valid checksum it most
    likely hides two bit errors that cancel, so the number cannot be trusted either."""
    text = _text(value, "date")
    if len(text) != DATE_LEN or not (text.isascii() and text.isdigit()):
        raise CallerIdMessageError(f"caller-ID date {text!r} is not MMDDHHMM")
    month, day, hour, minute = (int(text[i: i + 2]) for i in range(0, 8, 2))
    if not (1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59):
        raise CallerIdMessageError(f"caller-ID date {text!r} is out of range")
    return text


# --- DTMF caller ID ---------------------------------------------------------------------

def parse_dtmf_cid(digits: str) -> tuple[str | None, str | None]:
    """(number, absence) of a complete DTMF caller-ID string, start and end codes included.

    Raises :class:`CallerIdMessageError` when the string is not a caller ID.
    """
    if len(digits) < 2 or digits[-1] not in DTMF_END:
        raise CallerIdMessageError(f"DTMF caller ID {digits!r} has no end code")
    first, body = digits[0], digits[1:-1]
    if first == DTMF_CODE_START:
        if body in DTMF_CODES:
            return None, DTMF_CODES[body]
        raise CallerIdMessageError(f"DTMF caller ID {digits!r}: unknown information code")
    if first == "D" and body in DTMF_D_CODES:
        return None, DTMF_D_CODES[body]
    if first in DTMF_START:
        if body and body.isdigit() and set(body) != {"0"}:
            return body, None
        if first == "D" and body and set(body) == {"0"}:
            return None, "O"  # NL: D0000000000C, number unknown
    elif digits[-1] == "#" and digits[:-1].isdigit():
        return digits[:-1], None
    raise CallerIdMessageError(f"DTMF caller ID {digits!r} is not a known form")


class DtmfCallerIdAssembler:
    """Collects DTMF digits into a caller ID; push each :class:`DtmfDigit` in time order.

    A string starts with A, B or D (or a digit, for the bare ``<number>#`` form) and ends
    with C or #. A pause longer than ``max_gap_s`` between digits abandons the string.
    ``bare_numbers=False`` ignores the ``<number>#`` form, which digits keyed by a caller
    during a call can also produce.
    """

    def __init__(self, max_gap_s: float = DTMF_MAX_GAP_S, bare_numbers: bool = True) -> None:
        self._max_gap = round(max_gap_s * SAMPLE_RATE)
        self._bare = bare_numbers
        self.reset()

    def reset(self) -> None:
        self._digits: list[DtmfDigit] = []

    def push(self, digit: DtmfDigit) -> CallerId | None:
        if self._digits and digit.sample - self._end(self._digits[-1]) > self._max_gap:
            self._digits = []
        if (self._digits and self._digits[0].digit.isdigit()
                and (digit.digit in DTMF_START or digit.digit == DTMF_CODE_START)):
            self._digits = []  # a start code ends a bare number in progress
        if not self._digits and not self._can_start(digit.digit):
            return None
        self._digits.append(digit)
        if len(self._digits) > DTMF_MAX_DIGITS:
            self._digits = []
        elif len(self._digits) > 1 and digit.digit in DTMF_END:
            return self._complete()
        return None

    def _can_start(self, d: str) -> bool:
        return d in DTMF_START or d == DTMF_CODE_START or (self._bare and d.isdigit())

    def _complete(self) -> CallerId | None:
        digits, self._digits = self._digits, []
        text = "".join(d.digit for d in digits)
        try:
            number, absence = parse_dtmf_cid(text)
        except CallerIdMessageError as exc:
            log.debug("%s", exc)
            return None
        return CallerId(digits[0].sample, number, None, "dtmf", absence=absence)

    @staticmethod
    def _end(d: DtmfDigit) -> int:
        return d.end_sample if d.end_sample is not None else d.sample


# --- FSK message framing --------------------------------------------------------------

class _FskFramer:
    """Collects UART bytes into one message: type byte after a mark signal, length, body."""

    def __init__(self, baud: float) -> None:
        self._spb = SAMPLE_RATE / baud
        self._bytes: list[UartByte] = []

    def reset(self) -> None:
        self._bytes = []

    def push(self, byte: UartByte) -> list[UartByte] | None:
        """The message's bytes when ``byte`` completes one; None otherwise."""
        if self._bytes and (byte.sample - self._bytes[-1].end_sample) / self._spb > MAX_GAP_BITS:
            log.debug("caller ID: message broken off after %d bytes", len(self._bytes))
            self._bytes = []
        if not self._bytes:
            if byte.value in (SDMF_CALLER_ID, MDMF_CALL_SETUP) and byte.idle_bits >= MIN_MARK_BITS:
                self._bytes = [byte]
            return None
        self._bytes.append(byte)
        if len(self._bytes) >= 2 and len(self._bytes) == self._bytes[1].value + 3:
            done, self._bytes = self._bytes, []
            return done
        return None


class _AudioHistory:
    """At least the last HISTORY_SAMPLES of raw audio before the newest stretch added, and
    that stretch, on the line timeline (a ring buffer that grows with the stretches)."""

    def __init__(self) -> None:
        self._ring = np.zeros(HISTORY_SAMPLES, dtype=np.float32)
        self._end = 0  # line sample after the newest one stored

    def add(self, sample: int, pcm: np.ndarray) -> None:
        size = len(self._ring)
        if len(pcm) + HISTORY_SAMPLES > size:  # a big batch (a file): keep all of it too
            grown = len(pcm) + HISTORY_SAMPLES
            kept = self.get(self._end - size, self._end)
            self._ring = np.zeros(grown, dtype=np.float32)
            self._write(self._end - len(kept), kept)
        self._write(sample, pcm)
        self._end = sample + len(pcm)

    def get(self, start: int, end: int) -> np.ndarray:
        start = max(start, self._end - len(self._ring), 0)
        if end <= start:
            return np.zeros(0)
        out = np.empty(end - start)
        size = len(self._ring)
        pos = start % size
        first = min(end - start, size - pos)
        out[:first] = self._ring[pos: pos + first]
        if first < len(out):  # wraps (end - start <= size when asked for stored audio)
            for at in range(first, len(out), size):
                part = self._ring[: min(size, len(out) - at)]
                out[at: at + len(part)] = part
        return out

    def _write(self, sample: int, pcm: np.ndarray) -> None:
        """``pcm`` (at most the ring's length) at line sample ``sample``."""
        size = len(self._ring)
        pos = sample % size
        first = min(len(pcm), size - pos)
        self._ring[pos: pos + first] = pcm[:first]
        self._ring[: len(pcm) - first] = pcm[first:]


def classify_mark(audio: np.ndarray) -> str:
    """"bell202" or "v23": which mark frequency (1200 / 1300 Hz) dominates ``audio``."""
    n = np.arange(len(audio))
    powers = [abs(np.dot(audio, np.exp(-2j * np.pi * f * n / SAMPLE_RATE)))
              for f in (BELL202.mark_hz, V23.mark_hz)]
    return BELL202.name if powers[0] >= powers[1] else V23.name


# --- the detector ----------------------------------------------------------------------

class CallerIdDetector:
    """Streaming caller-ID receiver implementing the Detector protocol.

    Emits :class:`~drivers.dsp.events.CallerId` events only (DTMF digits used for DTMF
    caller ID are consumed). ``standards`` picks the receivers that run, any of
    "bell202", "v23", "dtmf"; an FSK event names the standard measured on the signal.
    A call engine that already runs a :class:`DtmfDetector` can leave out "dtmf" here and
    feed its digits to a :class:`DtmfCallerIdAssembler` instead (half the DTMF work).
    Events come at most one batch (``batch_samples``, 80 ms) after the message ends.
    """

    def __init__(self, standards: Sequence[str] = STANDARDS,
                 batch_samples: int = DEFAULT_BATCH_SAMPLES) -> None:
        unknown = sorted(set(standards) - set(STANDARDS))
        if unknown or not standards:
            raise CallerIdConfigError(
                f"caller-ID standards {list(standards)!r}: choose from {', '.join(STANDARDS)}")
        self.standards = tuple(standards)
        fsk = [s for s in (BELL202, V23) if s.name in self.standards]
        self._demod = _demodulator(fsk) if fsk else None
        self._uart = Uart8N1(BELL202.baud)
        self._framer = _FskFramer(BELL202.baud)
        self._history = _AudioHistory()
        self._dtmf = DtmfDetector() if "dtmf" in self.standards else None
        self._dtmf_cid = DtmfCallerIdAssembler()
        self._batch_samples = batch_samples
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._pending_start = 0
        self._next_sample: int | None = None

    def reset(self) -> None:
        if self._demod is not None:
            self._demod.reset()
        self._uart.reset()
        self._framer.reset()
        self._history = _AudioHistory()
        if self._dtmf is not None:
            self._dtmf.reset()
        self._dtmf_cid.reset()
        self._pending = []
        self._pending_len = 0
        self._next_sample = None

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        if self._next_sample is not None and sample != self._next_sample:
            log.debug("caller ID: timeline jump %d -> %d", self._next_sample, sample)
            events = self._flush_fsk()
            self.reset()
        else:
            events = []
        self._next_sample = sample + len(pcm)
        if self._demod is not None:
            events.extend(self._buffer_fsk(sample, pcm))
        if self._dtmf is not None:
            for digit in self._dtmf.feed(sample, pcm):
                if isinstance(digit, DtmfDigit):
                    cid = self._dtmf_cid.push(digit)
                    if cid is not None:
                        events.append(cid)
        return events

    def flush(self) -> list[DetectorEvent]:
        """End of input: decode what is still buffered (a message may end in it)."""
        return self._flush_fsk()

    def _flush_fsk(self) -> list[DetectorEvent]:
        """Decode what is buffered (a message may end in it) before the timeline breaks."""
        if self._demod is None or not self._pending:
            return []
        # (nothing keeps the batch: the history and the demodulator copy what they need)
        batch = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
        self._pending = []
        self._pending_len = 0
        return self._feed_fsk(self._pending_start, batch)

    def _buffer_fsk(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        """Run the FSK receiver on batches of >= batch_samples (numpy overhead per call)."""
        if not self._pending:
            self._pending_start = sample
        self._pending.append(np.asarray(pcm))
        self._pending_len += len(pcm)
        if self._pending_len < self._batch_samples:
            return []
        return self._flush_fsk()

    def _feed_fsk(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        assert self._demod is not None
        self._history.add(sample, pcm)
        start = sample - self._demod.delay
        events: list[DetectorEvent] = []
        for offset, levels, soft in self._demod.demodulate_spans(pcm):
            self._uart.skip_to(start + offset)
            for byte in self._uart.feed(start + offset, levels, soft):
                message = self._framer.push(byte)
                if message is not None:
                    event = self._decode(message)
                    if event is not None:
                        events.append(event)
        return events

    def _decode(self, message: list[UartByte]) -> CallerId | None:
        data = bytes(b.value for b in message)
        try:
            parsed = parse_cid_message(data)
        except CallerIdMessageError as exc:
            log.info("caller ID rejected: %s", exc)
            return None
        weak = sum(b.weak_bits for b in message)
        if weak > MAX_WEAK_BITS:
            log.info("caller ID rejected: %d doubtful bits in message type 0x%02x", weak,
                     data[0])
            return None
        standard = self._standard(message[0])
        return CallerId(message[0].carrier_start, parsed.number, parsed.name, standard,
                        absence=parsed.absence, when=parsed.when)

    def _standard(self, first: UartByte) -> str:
        spb = SAMPLE_RATE / BELL202.baud
        bits = min(first.idle_bits, CLASSIFY_MAX_BITS) - 2
        start = first.sample - round(bits * spb) - round(spb)
        return classify_mark(self._history.get(start, first.sample - round(spb)))


def _demodulator(standards: list[FskStandard]) -> FskDemodulator:
    """One demodulator for the enabled FSK standards (tuned between them when both). Its
    gate looks for the mark tone of either standard: each receiver decodes both."""
    mark = sum(s.mark_hz for s in standards) / len(standards)
    space = sum(s.space_hz for s in standards) / len(standards)
    return FskDemodulator(mark, space, gate_marks_hz=(BELL202.mark_hz, V23.mark_hz))
