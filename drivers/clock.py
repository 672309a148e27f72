"""Clocks, injected everywhere time matters (pacing, timestamps, ids).

Production code receives a :class:`Clock`; tests and accelerated simulations pass
:class:`ManualClock`. Nothing reads ``time`` directly outside this module.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Protocol

# systemd-timesyncd creates this file once the clock has been synchronised
# (systemd-timesyncd.service(8), "/run/systemd/timesync/synchronized").
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")


class Clock(Protocol):
    """What the appliance needs from a clock."""

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps (durations, pacing)."""
        ...

    def wall(self) -> float:
        """Unix time in seconds (for the record; may jump when NTP syncs)."""
        ...

    def wall_synced(self) -> bool:
        """True when the wall clock is known to be synchronised (NTP/GPS)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    def __init__(self, sync_flag: Path = TIMESYNC_FLAG) -> None:
        self._sync_flag = sync_flag

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def wall_synced(self) -> bool:
        return self._sync_flag.exists()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to; ``sleep`` advances it instantly."""

    def __init__(self, wall_start: float = 1_790_000_000.0, synced: bool = True) -> None:
        self._lock = threading.Lock()
        self._mono = 0.0
        self._wall0 = wall_start
        self.synced = synced

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def wall(self) -> float:
        with self._lock:
            return self._wall0 + self._mono

    def wall_synced(self) -> bool:
        return self.synced

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._mono += seconds
