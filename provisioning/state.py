"""The device's provisioning state machine and the files that keep it across power cuts.

The stage is persisted (write-then-rename, firmware/fsutil.py) after the work of a step is
on disk, so a cable pulled or power lost at any point leaves the device in the last
completed stage; the next run repeats at most the step in flight, and each step is
idempotent. ``AUTHENTICATED`` is never persisted: a session ends with the connection.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from firmware.fsutil import atomic_write, make_dirs

log = logging.getLogger(__name__)

STATE_DIR_MODE = 0o700
STATE_FILE_MODE = 0o600


class State(enum.StrEnum):
    UNPROVISIONED = "unprovisioned"
    AUTHENTICATED = "authenticated"
    CONFIGURED = "configured"
    KEYED = "keyed"
    CERT_INSTALLED = "certificate-installed"
    TESTED = "tested"
    LOCKED = "locked"


class Command(enum.StrEnum):
    CONFIGURE = "configure"
    GENERATE_KEY = "generate-key"
    INSTALL = "install"
    SELFTEST = "selftest"
    LOCK = "lock"
    UNLOCK = "unlock"


_BEFORE_LOCK = (State.AUTHENTICATED, State.CONFIGURED, State.KEYED, State.CERT_INSTALLED,
                State.TESTED)

# (state, command) -> state after the command succeeded. A pair not listed is refused.
# Settings may be changed at any stage before the lock: later steps then run again.
TRANSITIONS: dict[tuple[State, Command], State] = {
    **{(state, Command.CONFIGURE): State.CONFIGURED for state in _BEFORE_LOCK},
    (State.CONFIGURED, Command.GENERATE_KEY): State.KEYED,
    (State.KEYED, Command.GENERATE_KEY): State.KEYED,
    (State.KEYED, Command.INSTALL): State.CERT_INSTALLED,
    (State.CERT_INSTALLED, Command.INSTALL): State.CERT_INSTALLED,
    (State.TESTED, Command.INSTALL): State.CERT_INSTALLED,
    (State.CERT_INSTALLED, Command.SELFTEST): State.TESTED,
    (State.TESTED, Command.SELFTEST): State.TESTED,
    (State.TESTED, Command.LOCK): State.LOCKED,
    (State.LOCKED, Command.UNLOCK): State.TESTED,
}


class StateFileError(Exception):
    """A provisioning state file is unreadable or invalid (message names the file)."""


def next_state(state: State, command: Command) -> State | None:
    return TRANSITIONS.get((state, command))


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise StateFileError(f"{path}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StateFileError(f"{path}: not a JSON object")
    return data


def _write_json(path: Path, data: dict[str, object]) -> None:
    make_dirs(path.parent, STATE_DIR_MODE)
    atomic_write(path, (json.dumps(data, sort_keys=True) + "\n").encode(), STATE_FILE_MODE)


class StateStore:
    """The persisted stage in ``<dir>/state.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> State:
        data = _read_json(self.path)
        if data is None:
            return State.UNPROVISIONED
        try:
            state = State(str(data.get("state")))
        except ValueError:
            raise StateFileError(f"{self.path}: state: unknown {data.get('state')!r}") from None
        return State.UNPROVISIONED if state == State.AUTHENTICATED else state

    def save(self, state: State) -> None:
        if state == State.AUTHENTICATED:
            state = State.UNPROVISIONED
        _write_json(self.path, {"state": state.value})
        log.info("provisioning state: %s", state.value)


@dataclass(frozen=True)
class BackoffPolicy:
    """After ``free_attempts`` failures each further one doubles the wait, up to a cap.

    ESP-IDF and OWASP practice: a few free tries for typos, then exponential delay, so
    guessing a 10-character label secret online takes longer than the product's life.
    """

    free_attempts: int = 3
    base_delay_s: float = 2.0
    max_delay_s: float = 3600.0

    def delay_s(self, failures: int) -> float:
        if failures < self.free_attempts:
            return 0.0
        exponent = min(failures - self.free_attempts, 32)
        return min(self.base_delay_s * math.pow(2, exponent), self.max_delay_s)


class AuthLimiter:
    """Failed authentications counted in ``<dir>/auth.json``, across restarts.

    An attempt is counted as failed when it starts and cleared when it succeeds, so
    pulling the cable (or the power) between the two does not reset the count.
    """

    def __init__(self, path: Path, policy: BackoffPolicy | None = None) -> None:
        self.path = path
        self.policy = policy or BackoffPolicy()

    def _load(self) -> tuple[int, float]:
        data = _read_json(self.path) or {}
        failures, not_before = data.get("failures", 0), data.get("not_before_unix", 0.0)
        if not isinstance(failures, int) or not isinstance(not_before, int | float):
            raise StateFileError(f"{self.path}: failures/not_before_unix: not numbers")
        return failures, float(not_before)

    def retry_after_s(self, now_s: float) -> float:
        _, not_before = self._load()
        return max(0.0, not_before - now_s)

    def begin_attempt(self, now_s: float) -> None:
        failures, _ = self._load()
        failures += 1
        not_before = now_s + self.policy.delay_s(failures)
        _write_json(self.path, {"failures": failures, "not_before_unix": not_before})
        log.info("authentication attempt %d (next allowed in %.0f s unless it succeeds)",
                 failures, not_before - now_s)

    def succeeded(self) -> None:
        _write_json(self.path, {"failures": 0, "not_before_unix": 0.0})
