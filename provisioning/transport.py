"""Ports and the frame link over them.

Every serial device is opened by URL with pyserial's ``serial_for_url``: /dev/serial0 and
/dev/ttyGS0 on the appliance, /dev/ttyUSB* or /dev/ttyACM* on a laptop, ``socket://`` and
``loop://`` in tests. :class:`FdPort` is the master end of a pty, which has no path.
Frames are delimited by 0x00, never timed (pyserial's inter_byte_timeout does not work on
Linux), so a read timeout only bounds how long one read waits.
"""

from __future__ import annotations

import logging
import os
import select
import time
from typing import Protocol

import serial

from provisioning.cliargs import DEFAULT_BAUD
from provisioning.codec import CodecError, Frame, FrameDecoder, encode_frame

log = logging.getLogger(__name__)


READ_TIMEOUT_S = 0.05  # one read call; frames are found by delimiter, not by time
READ_BYTES = 4096


class TransportError(Exception):
    """A port cannot be opened or has gone (message names the port)."""


class Port(Protocol):
    """What the link needs of a port: pyserial's Serial and :class:`FdPort` both fit."""

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    def close(self) -> None: ...


def open_port(url: str, baud: int = DEFAULT_BAUD) -> Port:
    """A serial port, TCP socket or loop by pyserial URL, with a short read timeout."""
    try:
        port: Port = serial.serial_for_url(url, baudrate=baud, timeout=READ_TIMEOUT_S,
                                           write_timeout=None)
    except (serial.SerialException, ValueError) as exc:
        raise TransportError(f"{url}: cannot open: {exc}") from None
    return port


class FdPort:
    """A port on a file descriptor (the master end of ``os.openpty()``)."""

    def __init__(self, fd: int, timeout_s: float = READ_TIMEOUT_S) -> None:
        self.fd = fd
        self.timeout_s = timeout_s
        self._closed = False

    @property
    def in_waiting(self) -> int:
        ready, _, _ = select.select([self.fd], [], [], 0)
        return READ_BYTES if ready else 0

    def read(self, size: int = 1) -> bytes:
        if self._closed:
            raise TransportError(f"fd {self.fd}: closed")
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            return b""
        try:
            return os.read(self.fd, size)
        except OSError:  # EIO: the other end of the pty is closed
            time.sleep(self.timeout_s)
            return b""

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        return len(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


class Link:
    """Frames over a port: ``send`` writes one, ``receive`` returns the next good one.

    Undecodable stretches are logged and skipped (the sender retries); the decoder keeps
    its place between calls.
    """

    def __init__(self, port: Port, name: str = "port") -> None:
        self.port = port
        self.name = name
        self.decoder = FrameDecoder()
        self._pending: list[Frame] = []
        self.errors = 0

    def send(self, frame: Frame) -> None:
        try:
            self.port.write(encode_frame(frame))
        except (OSError, serial.SerialException) as exc:
            raise TransportError(f"{self.name}: write failed: {exc}") from None

    def receive(self, timeout_s: float) -> Frame | None:
        """The next frame, or None when ``timeout_s`` passes without one."""
        deadline = time.monotonic() + timeout_s
        while not self._pending:
            if time.monotonic() >= deadline:
                return None
            self._read_some()
        return self._pending.pop(0)

    def _read_some(self) -> None:
        try:
            data = self.port.read(1)  # waits up to the port's timeout
            waiting = int(getattr(self.port, "in_waiting", 0) or 0) if data else 0
            if waiting:
                data += self.port.read(min(waiting, READ_BYTES))
        except (OSError, serial.SerialException) as exc:
            raise TransportError(f"{self.name}: read failed: {exc}") from None
        for item in self.decoder.feed(data):
            if isinstance(item, CodecError):
                self.errors += 1
                log.debug("%s: dropped a frame: %s", self.name, item)
            else:
                self._pending.append(item)


class PacedPort:
    """Writes no faster than a serial line of ``baud`` (8N1: 10 bits a byte), for a port
    that does not pace itself (a pty ignores its termios speed)."""

    BITS_PER_BYTE = 10  # start + 8 data + stop

    def __init__(self, inner: Port, baud: int) -> None:
        self.inner = inner
        self.bytes_per_s = baud / self.BITS_PER_BYTE
        self._free_at = time.monotonic()

    @property
    def in_waiting(self) -> int:
        return int(getattr(self.inner, "in_waiting", 0) or 0)

    def read(self, size: int = 1) -> bytes:
        return self.inner.read(size)

    def write(self, data: bytes) -> int | None:
        start = max(time.monotonic(), self._free_at)
        self._free_at = start + len(data) / self.bytes_per_s
        written = self.inner.write(data)
        time.sleep(max(0.0, self._free_at - time.monotonic()))
        return written

    def close(self) -> None:
        self.inner.close()
