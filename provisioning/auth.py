"""Engineer authentication: SPAKE2 on the label secret, key confirmation, frame MACs.

SPAKE2 (Abdalla & Pointcheval 2005; the ``spake2`` package, Ed25519 group) gives both
sides the same key only if both used the same secret, and a recorded session gives an
eavesdropper nothing to test guesses against offline. The engineer is side A, the device
side B with its serial number as identity. Each side then proves it holds the key
(HMAC confirmations, engineer first, so a wrong guess learns nothing from the device), and
every later frame carries a MAC under a key derived from it.
"""

from __future__ import annotations

import hashlib
import hmac

from spake2 import SPAKE2_A, SPAKE2_B, SPAKEError

from provisioning.codec import MAC_BYTES, Frame, mac_input

ENGINEER_ID = b"edge-recorder engineer"
_CONFIRM_ENGINEER = b"edge-recorder provision confirm engineer"
_CONFIRM_DEVICE = b"edge-recorder provision confirm device"
_MAC_KEY = b"edge-recorder provision frame mac"


class AuthError(Exception):
    """The PAKE failed: a malformed message or a wrong secret."""


def _derive(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


class PakeSession:
    """One side of a SPAKE2 exchange and the keys that follow from it."""

    def __init__(self, secret: bytes, serial: str, *, engineer: bool) -> None:
        side = SPAKE2_A if engineer else SPAKE2_B
        self._engineer = engineer
        self._spake = side(secret, idA=ENGINEER_ID, idB=serial.encode())
        self.outbound = self._spake.start()
        self._key: bytes | None = None
        self._transcript = b""

    def finish(self, inbound: bytes) -> None:
        try:
            self._key = self._spake.finish(inbound)
        except (SPAKEError, ValueError) as exc:
            raise AuthError(f"PAKE message rejected: {exc}") from None
        mine, theirs = self.outbound, inbound
        engineer_msg, device_msg = (mine, theirs) if self._engineer else (theirs, mine)
        self._transcript = hashlib.sha256(engineer_msg + device_msg).digest()

    @property
    def key(self) -> bytes:
        if self._key is None:
            raise AuthError("PAKE not finished")
        return self._key

    def confirmation(self, *, engineer: bool) -> bytes:
        label = _CONFIRM_ENGINEER if engineer else _CONFIRM_DEVICE
        return _derive(self.key, label + self._transcript)

    def check_confirmation(self, confirm: bytes, *, engineer: bool) -> bool:
        return hmac.compare_digest(self.confirmation(engineer=engineer), confirm)

    def frame_mac_key(self) -> bytes:
        return _derive(self.key, _MAC_KEY)


def frame_mac(mac_key: bytes, frame: Frame) -> bytes:
    return hmac.new(mac_key, mac_input(frame), hashlib.sha256).digest()[:MAC_BYTES]


def check_frame_mac(mac_key: bytes, frame: Frame) -> bool:
    return bool(frame.mac) and hmac.compare_digest(frame_mac(mac_key, frame), frame.mac)
