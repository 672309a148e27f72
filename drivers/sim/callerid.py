"""Caller-ID message encoders (bytes or DTMF digit strings out; no I/O).

FSK messages (Telcordia GR-30-CORE; ETSI EN 300 659-3 uses the same layout):
``type, length, parameters..., checksum`` where the checksum is the two's complement of
the sum of all preceding bytes modulo 256. The decoders live with the detectors; these
are the senders the simulated exchange uses.
"""

from __future__ import annotations

from datetime import datetime

SDMF_TYPE = 0x04  # GR-30-CORE single data message format
MDMF_TYPE = 0x80  # GR-30-CORE multiple data message format
ETSI_CALL_SETUP_TYPE = 0x80  # EN 300 659-3: call set-up message

# Parameter ids (GR-30-CORE MDMF and EN 300 659-3 agree on these).
PARAM_DATE_TIME = 0x01  # MMDDHHMM, 8 ASCII digits
PARAM_NUMBER = 0x02  # calling line identity
PARAM_NUMBER_ABSENT = 0x04  # reason for absence of the number: 'O' or 'P'
PARAM_NAME = 0x07  # calling party name
PARAM_NAME_ABSENT = 0x08  # reason for absence of the name: 'O' or 'P'

ABSENCE_CODES = ("O", "P")  # O = unavailable ("out of area"), P = private (withheld)
MAX_NUMBER_DIGITS = 20  # EN 300 659-3 calling line identity: up to 20 characters
MAX_NAME_CHARS_GR30 = 15  # GR-30-CORE MDMF name field
MAX_NAME_CHARS_ETSI = 50  # EN 300 659-3 calling party name

# DTMF caller ID: start/stop digits and the special codes for an absent number, as parsed
# by Asterisk main/callerid.c callerid_get_dtmf(): "B" + 00 = unavailable, "B" + 10 =
# private; the Danish "D" variant uses D1# = private, D2#/D3# = unavailable.
DTMF_VARIANTS: dict[str, tuple[str, str]] = {
    "A_C": ("A", "C"),
    "A_#": ("A", "#"),
    "D_C": ("D", "C"),
    "_#": ("", "#"),
}
DTMF_ABSENCE: dict[str, dict[str, str]] = {
    "A_C": {"O": "B00C", "P": "B10C"},
    "A_#": {"O": "B00C", "P": "B10C"},
    "_#": {"O": "B00C", "P": "B10C"},
    "D_C": {"O": "D3#", "P": "D1#"},
}


class CallerIdEncodeError(ValueError):
    """A field that the message format cannot carry."""


def checksum(body: bytes) -> int:
    """Two's complement of the byte sum modulo 256 (GR-30-CORE, EN 300 659-3)."""
    return (-sum(body)) & 0xFF


def date_field(when: datetime | str) -> bytes:
    """MMDDHHMM as 8 ASCII digits."""
    text = when.strftime("%m%d%H%M") if isinstance(when, datetime) else when
    if len(text) != 8 or not text.isdigit():
        raise CallerIdEncodeError(f"date-time must be MMDDHHMM, got {text!r}")
    return text.encode("ascii")


def _number(number: str) -> bytes:
    if not number or len(number) > MAX_NUMBER_DIGITS or not number.isdigit():
        raise CallerIdEncodeError(
            f"number must be 1-{MAX_NUMBER_DIGITS} digits 0-9, got {number!r}")
    return number.encode("ascii")


def _name(name: str, max_chars: int) -> bytes:
    if not name or len(name) > max_chars or not all(" " <= c <= "~" for c in name):
        raise CallerIdEncodeError(
            f"name must be 1-{max_chars} printable ASCII characters, got {name!r}")
    return name.encode("ascii")


def _absence(code: str) -> bytes:
    if code not in ABSENCE_CODES:
        raise CallerIdEncodeError(f"absence reason must be 'O' or 'P', got {code!r}")
    return code.encode("ascii")


def _message(msg_type: int, body: bytes) -> bytes:
    if len(body) > 255:
        raise CallerIdEncodeError(f"message body is {len(body)} bytes; the limit is 255")
    head = bytes([msg_type, len(body)]) + body
    return head + bytes([checksum(head)])


def _param(param_id: int, value: bytes) -> bytes:
    return bytes([param_id, len(value)]) + value


def sdmf(number: str | None, when: datetime | str, absence: str | None = None) -> bytes:
    """GR-30 SDMF: MMDDHHMM then the number, or 'O'/'P' in its place."""
    if (number is None) == (absence is None):
        raise CallerIdEncodeError("SDMF carries either a number or an absence reason")
    field = _number(number) if number is not None else _absence(absence or "")
    return _message(SDMF_TYPE, date_field(when) + field)


def _params(number: str | None, name: str | None, when: datetime | str | None,
            number_absence: str | None, name_absence: str | None, max_name: int) -> bytes:
    if number is not None and number_absence is not None:
        raise CallerIdEncodeError("give either a number or its absence reason, not both")
    if name is not None and name_absence is not None:
        raise CallerIdEncodeError("give either a name or its absence reason, not both")
    body = b"" if when is None else _param(PARAM_DATE_TIME, date_field(when))
    if number is not None:
        body += _param(PARAM_NUMBER, _number(number))
    elif number_absence is not None:
        body += _param(PARAM_NUMBER_ABSENT, _absence(number_absence))
    if name is not None:
        body += _param(PARAM_NAME, _name(name, max_name))
    elif name_absence is not None:
        body += _param(PARAM_NAME_ABSENT, _absence(name_absence))
    return body


def mdmf(number: str | None = None, name: str | None = None,
         when: datetime | str | None = None, number_absence: str | None = None,
         name_absence: str | None = None) -> bytes:
    """GR-30 MDMF (type 0x80) with date-time, number or its absence, name or its absence."""
    body = _params(number, name, when, number_absence, name_absence, MAX_NAME_CHARS_GR30)
    return _message(MDMF_TYPE, body)


def etsi_call_setup(number: str | None = None, name: str | None = None,
                    when: datetime | str | None = None, number_absence: str | None = None,
                    name_absence: str | None = None) -> bytes:
    """ETSI EN 300 659-3 call set-up message (type 0x80), same parameters as MDMF."""
    body = _params(number, name, when, number_absence, name_absence, MAX_NAME_CHARS_ETSI)
    return _message(ETSI_CALL_SETUP_TYPE, body)


def dtmf_cid(number: str | None, variant: str = "A_C", absence: str | None = None) -> str:
    """DTMF caller-ID digit string, e.g. ``A0221234C``; absent numbers use B/D codes."""
    if variant not in DTMF_VARIANTS:
        raise CallerIdEncodeError(
            f"unknown DTMF caller-ID variant {variant!r}; known: {', '.join(DTMF_VARIANTS)}")
    if (number is None) == (absence is None):
        raise CallerIdEncodeError("DTMF caller ID carries either a number or an absence")
    if number is None:
        _absence(absence or "")
        return DTMF_ABSENCE[variant][absence or ""]
    start, stop = DTMF_VARIANTS[variant]
    return start + _number(number).decode("ascii") + stop
