"""Scenario files of the simulated line: a TOML list of calls (docs/SIMULATOR.md).

:func:`load_scenario` parses and checks a file; every problem raises
:class:`ScenarioError` with one line naming the file and the key at fault, e.g.
``examples/x.toml: calls[2].direction: expected 'inbound' or 'outbound', got 'in'``.
"""

from __future__ import annotations

import re
import threading
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from drivers.line import LineConfigError
from drivers.sim.callerid import MAX_NAME_CHARS_ETSI, MAX_NAME_CHARS_GR30, MAX_NUMBER_DIGITS
from drivers.toneplan import TonePlanError, tone_plan

NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
Positive = Annotated[float, msgspec.Meta(gt=0.0)]

# Allowed values of the enumerated keys, by key name (also used in error messages).
CHOICES: dict[str, tuple[str, ...]] = {
    "direction": ("inbound", "outbound"),
    "cid": ("bell202", "bell202_sdmf", "v23", "v23_dtas", "dtmf", "none"),
    "dtmf_cid_format": ("A_C", "A_#", "D_C", "_#"),
    "withheld": ("P", "O"),
    "answer_signal": ("none", "polarity"),
    "hangup": ("near", "far"),
    "who": ("dealer", "customer"),
}
OUTBOUND_ONLY = ("dialed", "digits_keyed", "far_busy", "ringback_s", "answer_signal")
INBOUND_ONLY = ("caller", "caller_name", "withheld", "cid", "dtmf_cid_format", "rings")
NAME_LIMITS = {"bell202": MAX_NAME_CHARS_GR30, "v23": MAX_NAME_CHARS_ETSI,
               "v23_dtas": MAX_NAME_CHARS_ETSI}
DTMF_KEYS = set("0123456789*#ABCD")
DEFAULT_START = datetime(2025, 1, 6, 8, 0)  # a Monday morning; only dates caller-ID messages


# msgspec 0.22 builds a Struct type's decoding info on first use; two line threads doing
# that at once crashed the daemon at start (about 1 in 13 runs). One convert at a time.
_CONVERT_LOCK = threading.Lock()


class ScenarioError(LineConfigError):
    """A scenario file that cannot be read or is wrong; the message names file and key."""


class Turn(msgspec.Struct, forbid_unknown_fields=True):
    """One stretch of speech by one party, or keys pressed (``keys``: DTMF digits,
    each 100 ms on and 150 ms off, then silence for the rest of ``s``), or ``silent``."""

    who: Literal["dealer", "customer"]
    s: Positive
    keys: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-D*#]{1,16}$")] | None = None
    silent: bool = False  # nobody speaks for ``s`` (both listen to a prompt)


class Call(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One call on the line; see docs/SIMULATOR.md for every key."""

    direction: Literal["inbound", "outbound"]
    gap_s: NonNegative = 5.0
    # inbound
    caller: str | None = None
    caller_name: str | None = None
    withheld: Literal["P", "O"] | None = None
    cid: Literal["bell202", "bell202_sdmf", "v23", "v23_dtas", "dtmf", "none"] | None = None
    dtmf_cid_format: Literal["A_C", "A_#", "D_C", "_#"] = "A_C"
    rings: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    # both
    answered: bool = True
    # outbound
    dialed: str | None = None
    digits_keyed: Annotated[int, msgspec.Meta(ge=0)] | None = None
    far_busy: bool = False
    ringback_s: NonNegative = 8.0
    answer_signal: Literal["none", "polarity"] = "none"
    # conversation and its end
    talk_s: Positive = 30.0
    talk: list[Turn] | None = None
    hangup: Literal["near", "far"] = "near"
    busy_s: NonNegative = 3.0


class Scenario(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A simulated line: its country and the calls on it, in order."""

    country: str | None = None
    seed: Annotated[int, msgspec.Meta(ge=0)] = 0
    noise_dbfs: Annotated[float, msgspec.Meta(le=0.0)] = -65.0
    tail_s: NonNegative = 2.0
    start: datetime = DEFAULT_START
    calls: list[Call] = msgspec.field(default_factory=list)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file."""
    label = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ScenarioError(f"{label}: cannot read: {reason}") from exc
    return parse_scenario(text, label)


def parse_scenario(text: str, label: str = "<scenario>") -> Scenario:
    """Parse scenario TOML text; ``label`` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{label}: {exc}") from exc
    return scenario_from_dict(raw, label)


def scenario_from_dict(raw: dict[str, Any], label: str = "<scenario>") -> Scenario:
    """Validate an already-parsed scenario table."""
    try:
        with _CONVERT_LOCK:
            scenario = msgspec.convert(raw, Scenario, strict=True)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{label}: {_explain(str(exc), raw)}") from exc
    problem = _check_scenario(scenario, raw)
    if problem:
        raise ScenarioError(f"{label}: {problem}")
    return scenario


def with_country(scenario: Scenario, country: str, label: str = "<scenario>") -> Scenario:
    """The scenario on a line of ``country`` when the file names none, re-checked for it
    (the default caller-ID standard decides whether a name fits)."""
    if scenario.country is not None:
        return scenario
    try:
        tone_plan(country)
    except TonePlanError as exc:
        raise ScenarioError(f"{label}: the line's country: {exc}") from exc
    for i, call in enumerate(scenario.calls):
        problem = _check_inbound(call, country) if call.direction == "inbound" else None
        if problem:
            raise ScenarioError(f"{label}: calls[{i}].{problem} (line country {country})")
    return msgspec.structs.replace(scenario, country=country)


# --- error wording -----------------------------------------------------------------
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_SEGMENT = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]")
_TYPE_WORDS = {"`float`": "a number", "`int`": "an integer", "`str`": "a string",
               "`bool`": "true or false", "`array`": "a list", "`object`": "a table",
               "`datetime`": "a date-time", "`null`": "nothing"}


def _lookup(raw: Any, path: str) -> tuple[bool, Any]:
    node = raw
    for name, index in _SEGMENT.findall(path):
        try:
            node = node[name] if name else node[int(index)]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, node


def _explain(message: str, raw: dict[str, Any]) -> str:
    """Turn a msgspec validation message into ``key.path: what is wrong``."""
    match = _AT.match(message)
    msg, path = (match["msg"], match["path"] or "") if match else (message, "")
    key = path.lstrip(".")
    field = re.search(r"`(\w+)`", msg)
    if msg.startswith("Object contains unknown field") and field:
        return f"{_join(key, field[1])}: unknown key"
    if msg.startswith("Object missing required field") and field:
        return f"{_join(key, field[1])}: required key missing"
    found, value = _lookup(raw, path)
    last = re.findall(r"\w+", key)[-1] if key else ""
    if msg.startswith("Invalid enum value") and last in CHOICES:
        return f"{key}: expected {_or(CHOICES[last])}, got {value!r}"
    msg = msg.split(", got ")[0]  # msgspec names the type it got; show the value instead
    for word, plain in _TYPE_WORDS.items():
        msg = msg.replace(word, plain)
    msg = msg[:1].lower() + msg[1:]
    if found:
        msg += f", got {value!r}"
    return f"{key or '(top level)'}: {msg}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _or(choices: tuple[str, ...]) -> str:
    quoted = [repr(c) for c in choices]
    return " or ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + f" or {quoted[-1]}"


# --- checks msgspec cannot express -------------------------------------------------
def _check_scenario(scenario: Scenario, raw: dict[str, Any]) -> str | None:
    if scenario.country is not None:
        try:
            tone_plan(scenario.country)
        except TonePlanError as exc:
            return f"country: {exc}"
    raw_calls = raw.get("calls", [])
    for i, call in enumerate(scenario.calls):
        problem = _check_call(call, set(raw_calls[i]), scenario.country)
        if problem:
            return f"calls[{i}].{problem}"
    return None


def _check_call(call: Call, given: set[str], country: str | None) -> str | None:
    misplaced = OUTBOUND_ONLY if call.direction == "inbound" else INBOUND_ONLY
    for key in misplaced:
        if key in given:
            other = "outbound" if call.direction == "inbound" else "inbound"
            return f"{key}: only for {other} calls (this call is {call.direction})"
    if "talk" in given and "talk_s" in given:
        return "talk: give either talk or talk_s, not both"
    if call.direction == "inbound":
        return _check_inbound(call, country)
    return _check_outbound(call)


def _check_inbound(call: Call, country: str | None) -> str | None:
    cid = call.cid or (tone_plan(country).cid if country else None)
    if call.caller is not None and call.withheld is not None:
        return "withheld: a withheld call presents no number; remove caller or withheld"
    if call.caller is None and call.withheld is None and cid != "none":
        return "caller: required unless withheld is set or cid = 'none'"
    if call.caller is not None and not (
            call.caller.isdigit() and len(call.caller) <= MAX_NUMBER_DIGITS):
        return f"caller: expected 1-{MAX_NUMBER_DIGITS} digits 0-9, got {call.caller!r}"
    if call.caller_name is not None:
        return _check_name(call.caller_name, cid)
    return None


def _check_name(name: str, cid: str | None) -> str | None:
    if cid is not None and cid not in NAME_LIMITS:
        return f"caller_name: caller-ID standard {cid!r} cannot carry a name"
    limit = NAME_LIMITS.get(cid or "v23", MAX_NAME_CHARS_ETSI)
    if not name or len(name) > limit or not all(" " <= c <= "~" for c in name):
        return f"caller_name: expected 1-{limit} printable ASCII characters, got {name!r}"
    return None


def _check_outbound(call: Call) -> str | None:
    if not call.dialed:
        return "dialed: required for outbound calls"
    if not set(call.dialed) <= DTMF_KEYS:
        return f"dialed: expected DTMF keys 0-9 * # A-D, got {call.dialed!r}"
    if call.digits_keyed is not None and call.digits_keyed > len(call.dialed):
        return (f"digits_keyed: {call.digits_keyed} is more than the "
                f"{len(call.dialed)} digits of dialed")
    if call.far_busy and call.answered:
        return "far_busy: a busy line cannot answer; set answered = false"
    return None
