"""Typed events produced by the streaming detectors.

Every detector takes 16-bit 8 kHz sample arrays through :meth:`Detector.feed` and returns
events stamped with the sample index (on the line timeline) where the event started.
The call engine and ``edge-recorder analyze`` consume the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 8000


@dataclass(frozen=True, slots=True)
class DtmfDigit:
    sample: int
    digit: str  # one of 0-9 * # A-D
    end_sample: int | None = None


@dataclass(frozen=True, slots=True)
class CallerId:
    sample: int
    number: str | None
    name: str | None
    standard: str  # "bell202" | "v23" | "dtmf"
    absence: str | None = None  # "O" unavailable, "P" private
    when: str | None = None  # MMDDHHMM as sent


@dataclass(frozen=True, slots=True)
class Tone:
    sample: int
    end_sample: int
    tone: str  # "dial" | "busy" | "ringback" | "congestion"


@dataclass(frozen=True, slots=True)
class Voice:
    sample: int
    end_sample: int | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The far end answered an outbound call (first far-end speech after ringback)."""

    sample: int


DetectorEvent = DtmfDigit | CallerId | Tone | Voice | Answer


class Detector(Protocol):
    """A pure streaming detector: no I/O, state only in the object."""

    def feed(self, sample: int, pcm: np.ndarray) -> list[DetectorEvent]:
        """Consume samples starting at ``sample``; return events completed so far."""
        ...

    def reset(self) -> None:
        """Forget everything (a new call starts)."""
        ...


@runtime_checkable
class HookAware(Protocol):
    """A detector that runs only what can occur in the line's hook state."""

    def hook(self, off_hook: bool) -> None:
        ...
