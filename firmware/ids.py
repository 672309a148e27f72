"""UUIDv7 identifiers (RFC 9562 section 5.7) from the injected clock.

Within one millisecond (or if the wall clock steps back) the 12-bit ``rand_a`` field is
used as a counter seeded at random (RFC 9562 section 6.2, method 1), so ids from one
factory sort in creation order.
"""

from __future__ import annotations

import os
import threading
import uuid

from drivers.clock import Clock


class Uuid7Factory:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def new(self) -> str:
        with self._lock:
            ms = int(self._clock.wall() * 1000)
            if ms > self._last_ms:
                self._last_ms = ms
                self._counter = int.from_bytes(os.urandom(2), "big") & 0x7FF
            else:
                self._counter += 1
                if self._counter > 0xFFF:  # counter overflow: borrow the next millisecond
                    self._last_ms += 1
                    self._counter = 0
            ms = self._last_ms
            rand_b = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76 | self._counter << 64 | 0b10 << 62 | rand_b
        return str(uuid.UUID(int=value))
