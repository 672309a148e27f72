"""The one abstraction for a phone line.

A line backend delivers a single time-ordered stream of :data:`LineItem`: signalling
events (:class:`SignalEvent`) interleaved with 20 ms audio frames (:class:`AudioFrame`)
on the line's own sample timeline (8 kHz). It can also play audio into the line.

Backends implement the small private hooks (``_open``, ``_read_internal``, ``_play``,
``_close``); the public template methods here handle state, timeouts and errors.
What each hardware backend maps onto this interface is written down in
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import enum
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Self

import msgspec
import numpy as np

from drivers.clock import Clock

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE


class Signal(enum.StrEnum):
    """Signalling a tap can observe. Analog lines use the first five."""

    RING_ON = "ring_on"
    RING_OFF = "ring_off"
    HOOK_OFF = "hook_off"
    HOOK_ON = "hook_on"
    POLARITY_REVERSAL = "polarity_reversal"
    # Digital (ISDN Q.931) lines report call control directly.
    CALL_SETUP = "call_setup"
    CALL_CONNECT = "call_connect"
    CALL_RELEASE = "call_release"


@dataclass(frozen=True, slots=True)
class SignalEvent:
    """A signalling event at ``sample`` on the line timeline."""

    sample: int
    signal: Signal
    # Digital lines only: numbers and origin from the call setup.
    calling: str | None = None
    called: str | None = None
    outgoing: bool | None = None

    @property
    def t(self) -> float:
        return self.sample / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """20 ms of 16-bit mono line audio starting at ``sample``."""

    sample: int
    pcm: np.ndarray  # int16, FRAME_SAMPLES long

    @property
    def t(self) -> float:
        return self.sample / SAMPLE_RATE


LineItem = SignalEvent | AudioFrame


class LineError(Exception):
    """Base of every line backend error; the message names the line."""


class LineConfigError(LineError):
    """The backend or its options are wrong (found at set-up)."""


class LineUnavailable(LineError):
    """The backend cannot run here (missing library or device)."""


class LineIOError(LineError):
    """The device failed while running."""


class LineClosed(LineError):
    """The line has ended (a finished scenario, a closed device)."""


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of a backend that takes none."""


class LineBackend(ABC):
    """Base class of every line backend.

    MUST implement: ``_read_internal``. MAY implement: ``_open``, ``_play``, ``_close``,
    ``_status``. ``Options`` is the msgspec Struct of the backend's ``[lines.options]``.
    """

    name: ClassVar[str] = "abstract"
    Options: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, line_id: str, options: msgspec.Struct, *, clock: Clock,
                 country: str = "US") -> None:
        self.line_id = line_id
        self.options = options
        self.clock = clock
        self.country = country
        self._opened = False
        self._closed = False

    # --- public template methods -------------------------------------------------
    def open(self) -> None:
        """Open the device; idempotent."""
        if self._opened:
            return
        if self._closed:
            raise LineClosed(f"line {self.line_id}: already closed")
        self._open()
        self._opened = True
        log.info("line %s: opened (%s backend)", self.line_id, self.name)

    def read(self, timeout_s: float | None = None) -> LineItem | None:
        """Return the next item in timeline order, or None when ``timeout_s`` passes.

        Raises :class:`LineClosed` when the line has ended.
        """
        if not self._opened:
            self.open()
        if self._closed:
            raise LineClosed(f"line {self.line_id}: closed")
        return self._read_internal(timeout_s)

    def play(self, pcm: np.ndarray) -> None:
        """Queue 16-bit 8 kHz audio to be played into the line (a prompt, a beep)."""
        if pcm.dtype != np.int16 or pcm.ndim != 1:
            raise ValueError(f"line {self.line_id}: play() takes a 1-D int16 array")
        self._play(pcm)

    def status(self) -> dict[str, Any]:
        """Backend facts for self-tests and fleet status (hook state, levels...)."""
        return {"backend": self.name, "open": self._opened and not self._closed,
                **self._status()}

    def close(self) -> None:
        """Release the device; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._close()
        finally:
            log.info("line %s: closed", self.line_id)

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- hooks for backends ----------------------------------------------------
    def _open(self) -> None:  # noqa: B027 - optional hook
        pass

    @abstractmethod
    def _read_internal(self, timeout_s: float | None) -> LineItem | None:
        """Next item, None on timeout; raise LineClosed at the end."""

    def _play(self, pcm: np.ndarray) -> None:
        raise LineError(f"line {self.line_id}: the {self.name} backend cannot play audio")

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    def _status(self) -> dict[str, Any]:
        return {}
