"""The device side of serial provisioning (`edge-recorder provision-agent`).

:class:`Agent` answers one request frame with one response frame: the replay cache, the
authentication gate, the state machine (provisioning/state.py) and the handlers. ``serve``
runs it over a port. Every file it writes is written whole (write-then-rename) and the
stage is saved after the step's files, so a pulled cable never leaves a half-written
configuration (docs/PROTOCOL.md, "Serial provisioning").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware import __version__
from firmware.config import Config, ConfigError, load_config, parse_config
from firmware.fsutil import atomic_symlink, atomic_write, make_dirs
from provisioning import codec as c
from provisioning.auth import AuthError, PakeSession, check_frame_mac, frame_mac
from provisioning.pki import (
    PkiError,
    check_certificate,
    load_or_create_tls_key,
    make_csr,
    parse_ops_key,
    verify_ticket,
)
from provisioning.selftest import SELFTESTS, SelfTest
from provisioning.state import AuthLimiter, Command, State, StateStore, next_state
from provisioning.transport import Link, Port, TransportError

log = logging.getLogger(__name__)

REPLAY_CACHE_SIZE = 64
CONFIG_MODE = 0o640
UPLOAD_NAMES = frozenset({"settings", "certificate", "chain"})
# Keys of the configuration the device owns; the engineer's settings may not set them.
DEVICE_KEYS = ("storage", "sync", "trust", "source")
CAPABILITIES = ["spake2-ed25519", "hmac-sha256-128", "items-sha256", "selftest", "unlock-ticket"]
NONCE_BYTES = 16
RECEIVE_POLL_S = 0.2


class RequestError(Exception):
    """A request refused with a protocol error code."""

    def __init__(self, code: c.ErrorCode, message: str, retry_after_s: float = 0.0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class DeviceIdentity:
    serial: str
    secret: bytes  # the label secret
    firmware: str = __version__


@dataclass(frozen=True)
class AgentPaths:
    data_dir: Path
    config_path: Path

    @property
    def provision_dir(self) -> Path:
        return self.data_dir / "provision"

    @property
    def managed_config(self) -> Path:
        """The configuration file itself: in the state directory, where the sync agent may
        replace it with a signed update; ``config_path`` (in /etc) links to it."""
        return self.data_dir / "config.toml"

    @property
    def tls_key(self) -> Path:
        return self.data_dir / "keys" / "tls_p256.pem"

    @property
    def certificate(self) -> Path:
        return self.data_dir / "keys" / "tls.crt"

    @property
    def chain(self) -> Path:
        return self.data_dir / "keys" / "ca-chain.pem"


@dataclass(frozen=True)
class InstallFacts:
    broker_host: str
    broker_port: int
    ops_public_key: str


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string with ASCII escapes is a TOML basic string


def compose_config(settings_text: str, paths: AgentPaths, install: InstallFacts | None) -> str:
    """The configuration file: the engineer's settings and the tables the device owns."""
    try:
        settings = tomllib.loads(settings_text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"settings: not valid TOML: {exc}") from None
    for key in DEVICE_KEYS:
        if key in settings:
            raise ConfigError(f"settings: {key}: set by the device, not by the engineer")
    if "device_key" in settings.get("keys", {}):
        raise ConfigError("settings: keys.device_key: set by the device, not by the engineer")
    tables = [f"\n[storage]\ndata_dir = {_toml_str(str(paths.data_dir))}\n"]
    if install is not None:
        tables.append(f"\n[trust]\nops_public_key = {_toml_str(install.ops_public_key)}\n")
        tables.append(
            f"\n[sync]\nhost = {_toml_str(install.broker_host)}\nport = {install.broker_port}\n"
            f"ca_file = {_toml_str(str(paths.chain))}\n"
            f"cert_file = {_toml_str(str(paths.certificate))}\n"
            f"key_file = {_toml_str(str(paths.tls_key))}\n")
    return settings_text.rstrip("\n") + "\n" + "".join(tables)


class Agent:
    """One provisioning endpoint; ``handle`` is safe to call from one thread at a time."""

    def __init__(self, paths: AgentPaths, identity: DeviceIdentity, *,
                 now_s: Callable[[], float] = time.time,
                 selftests: Mapping[str, SelfTest] = SELFTESTS,
                 required_tests: frozenset[str] | None = None,
                 max_frame: int = c.DEFAULT_MAX_FRAME) -> None:
        self.paths = paths
        self.identity = identity
        self._now_s = now_s
        self._selftests = selftests
        self._required = frozenset(selftests) if required_tests is None else required_tests
        self._max_frame = max_frame
        self._store = StateStore(paths.provision_dir / "state.json")
        self._limiter = AuthLimiter(paths.provision_dir / "auth.json")
        self._replay: OrderedDict[int, tuple[bytes, c.Frame]] = OrderedDict()
        self._handlers: dict[c.MsgType, tuple[Callable[[Any], c.Msg], bool]] = {
            c.MsgType.HELLO: (self._hello, False),
            c.MsgType.IDENTIFY: (self._identify, False),
            c.MsgType.AUTH_START: (self._auth_start, False),
            c.MsgType.AUTH_CONFIRM: (self._auth_confirm, False),
            c.MsgType.UNLOCK_CHALLENGE: (self._challenge, False),
            c.MsgType.ITEM_BEGIN: (self._item_begin, True),
            c.MsgType.ITEM_CHUNK: (self._item_chunk, True),
            c.MsgType.ITEM_READ: (self._item_read, True),
            c.MsgType.CONFIGURE: (self._configure, True),
            c.MsgType.GENERATE_KEY: (self._generate_key, True),
            c.MsgType.INSTALL: (self._install, True),
            c.MsgType.SELFTEST: (self._selftest, True),
            c.MsgType.LOCK: (self._lock, True),
            c.MsgType.UNLOCK: (self._unlock, True),
        }
        self.end_session()

    # --- session ------------------------------------------------------------------------
    def end_session(self) -> None:
        """Forget the authenticated session, uploads and downloads (a new connection)."""
        self._pending: PakeSession | None = None
        self._mac_key: bytes | None = None
        self._uploads: dict[str, c.ItemAssembler] = {}
        self._downloads: dict[str, bytes] = {}

    @property
    def state(self) -> State:
        stored = self._store.load()
        if stored == State.UNPROVISIONED and self._mac_key is not None:
            return State.AUTHENTICATED
        return stored

    # --- frames -------------------------------------------------------------------------
    def handle(self, frame: c.Frame) -> c.Frame | None:
        """The response to a request frame (None for a stray response frame)."""
        if frame.is_response:
            return None
        digest = hashlib.sha256(c.frame_body(frame)).digest()
        cached = self._replay.get(frame.request_id)
        if cached is not None and cached[0] == digest:
            log.debug("request %d repeated: answered from the replay cache", frame.request_id)
            return cached[1]
        reply = self._execute(frame)
        self._replay[frame.request_id] = (digest, reply)
        while len(self._replay) > REPLAY_CACHE_SIZE:
            self._replay.popitem(last=False)
        return reply

    def _execute(self, frame: c.Frame) -> c.Frame:
        authed = False
        try:
            if frame.version != c.PROTOCOL_VERSION:
                raise RequestError(c.ErrorCode.UNSUPPORTED_VERSION,
                                   f"protocol version {frame.version}; this device speaks "
                                   f"{c.PROTOCOL_VERSION}")
            handler, needs_auth = self._handler(frame.type)
            authed = self._mac_key is not None and check_frame_mac(self._mac_key, frame)
            if needs_auth and not authed:
                raise RequestError(c.ErrorCode.BAD_AUTH, "not authenticated (or bad MAC)")
            try:
                request = c.unpack(frame.payload, c.REQUESTS[c.MsgType(frame.type)])
            except c.CodecError as exc:
                raise RequestError(c.ErrorCode.BAD_REQUEST, str(exc)) from None
            payload, flags = c.pack(handler(request)), c.Flag.RESPONSE
        except RequestError as exc:
            log.info("request %s refused: %s: %s", frame.type, exc.code.name, exc)
            payload = c.pack(c.ErrorRep(code=int(exc.code), message=str(exc),
                                        retry_after_s=exc.retry_after_s))
            flags = c.Flag.RESPONSE | c.Flag.ERROR
        reply = c.Frame(type=frame.type, request_id=frame.request_id, payload=payload,
                        flags=flags)
        if authed and self._mac_key is not None:
            reply = c.Frame(type=reply.type, request_id=reply.request_id, payload=payload,
                            flags=flags, mac=frame_mac(self._mac_key, reply))
        return reply

    def _handler(self, msg_type: int) -> tuple[Callable[[Any], c.Msg], bool]:
        try:
            return self._handlers[c.MsgType(msg_type)]
        except (ValueError, KeyError):
            raise RequestError(c.ErrorCode.UNKNOWN_COMMAND,
                               f"unknown command 0x{msg_type:02x}") from None

    def _transition(self, command: Command) -> State:
        state = self.state
        target = next_state(state, command)
        if target is None:
            code = c.ErrorCode.LOCKED if state == State.LOCKED else c.ErrorCode.BAD_STATE
            raise RequestError(code, f"{command.value} not allowed in state {state.value}")
        return target

    # --- read-only ----------------------------------------------------------------------
    def _hello(self, request: c.HelloReq) -> c.Msg:
        if c.PROTOCOL_VERSION not in request.versions:
            raise RequestError(c.ErrorCode.UNSUPPORTED_VERSION,
                               f"no common version (device speaks {c.PROTOCOL_VERSION})")
        self.end_session()
        max_frame = max(c.MIN_MAX_FRAME, min(request.max_frame, self._max_frame))
        return c.HelloRep(version=c.PROTOCOL_VERSION, max_frame=max_frame,
                          firmware=self.identity.firmware, serial=self.identity.serial,
                          capabilities=CAPABILITIES)

    def _identify(self, _request: c.Empty) -> c.Msg:
        config = self._config_or_none()
        lines = [c.LineInfo(id=line.id, backend=line.backend) for line in config.lines] \
            if config else []
        return c.IdentifyRep(serial=self.identity.serial, firmware=self.identity.firmware,
                             state=self.state.value,
                             device_id=config.device_id if config else None,
                             site=config.site if config else None, lines=lines,
                             auth_retry_after_s=self._limiter.retry_after_s(self._now_s()))

    def _config_or_none(self) -> Config | None:
        if not self.paths.config_path.exists():
            return None
        try:
            return load_config(self.paths.config_path)
        except ConfigError as exc:
            log.warning("%s", exc)
            return None

    @property
    def _challenge_path(self) -> Path:
        return self.paths.provision_dir / "unlock-challenge.json"

    def _challenge(self, _request: c.Empty) -> c.Msg:
        """A fresh nonce, kept on disk until one ticket uses it: ops may sign the ticket
        hours later while the engineer reconnects; a new challenge replaces the old."""
        nonce = os.urandom(NONCE_BYTES)
        make_dirs(self.paths.provision_dir, 0o700)
        atomic_write(self._challenge_path, json.dumps({"nonce": nonce.hex()}).encode(), 0o600)
        config = self._config_or_none()
        return c.ChallengeRep(serial=self.identity.serial, nonce=nonce, state=self.state.value,
                              device_id=config.device_id if config else None)

    def _take_nonce(self) -> bytes | None:
        """The pending challenge nonce, consumed: a ticket works once."""
        try:
            nonce = bytes.fromhex(json.loads(self._challenge_path.read_text())["nonce"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._challenge_path.unlink(missing_ok=True)
        return nonce

    # --- authentication -----------------------------------------------------------------
    def _auth_start(self, request: c.AuthStartReq) -> c.Msg:
        wait_s = self._limiter.retry_after_s(self._now_s())
        if wait_s > 0:
            raise RequestError(c.ErrorCode.RATE_LIMITED,
                               f"too many failed attempts; retry in {wait_s:.0f} s", wait_s)
        self._limiter.begin_attempt(self._now_s())
        self._mac_key, self._pending = None, None
        pake = PakeSession(self.identity.secret, self.identity.serial, engineer=False)
        try:
            pake.finish(request.message)
        except AuthError as exc:
            raise RequestError(c.ErrorCode.BAD_AUTH, str(exc)) from None
        self._pending = pake
        return c.AuthStartRep(message=pake.outbound)

    def _auth_confirm(self, request: c.AuthConfirmReq) -> c.Msg:
        pake, self._pending = self._pending, None
        if pake is None:
            raise RequestError(c.ErrorCode.BAD_STATE, "no authentication in progress")
        if not pake.check_confirmation(request.confirm, engineer=True):
            log.warning("authentication failed: wrong secret")
            raise RequestError(c.ErrorCode.BAD_AUTH, "wrong secret")
        self._limiter.succeeded()
        self._mac_key = pake.frame_mac_key()
        log.info("engineer authenticated")
        return c.AuthConfirmRep(confirm=pake.confirmation(engineer=False),
                                state=self.state.value)

    # --- items --------------------------------------------------------------------------
    def _item_begin(self, request: c.ItemInfo) -> c.Msg:
        if request.name not in UPLOAD_NAMES:
            raise RequestError(c.ErrorCode.BAD_ITEM, f"item {request.name!r}: not one the "
                               f"device takes ({', '.join(sorted(UPLOAD_NAMES))})")
        try:
            self._uploads[request.name] = c.ItemAssembler(request)
        except c.CodecError as exc:
            raise RequestError(c.ErrorCode.BAD_ITEM, str(exc)) from None
        return c.ItemChunkRep(received=0)

    def _item_chunk(self, request: c.ItemChunkReq) -> c.Msg:
        assembler = self._uploads.get(request.name)
        if assembler is None:
            raise RequestError(c.ErrorCode.BAD_ITEM, f"item {request.name!r}: not begun")
        try:
            return c.ItemChunkRep(received=assembler.add(request.offset, request.data))
        except c.CodecError as exc:
            raise RequestError(c.ErrorCode.BAD_ITEM, str(exc)) from None

    def _item_read(self, request: c.ItemReadReq) -> c.Msg:
        data = self._downloads.get(request.name)
        if data is None or request.offset < 0 or request.length < 0:
            raise RequestError(c.ErrorCode.BAD_ITEM, f"item {request.name!r}: none to read")
        length = min(request.length, c.chunk_bytes_for(self._max_frame))
        return c.ItemReadRep(data=data[request.offset:request.offset + length])

    def _upload(self, name: str) -> bytes:
        assembler = self._uploads.get(name)
        if assembler is None:
            raise RequestError(c.ErrorCode.BAD_ITEM, f"item {name!r}: not uploaded")
        try:
            return assembler.complete()
        except c.CodecError as exc:
            raise RequestError(c.ErrorCode.BAD_ITEM, str(exc)) from None

    # --- steps --------------------------------------------------------------------------
    def _configure(self, request: c.ConfigureReq) -> c.Msg:
        target = self._transition(Command.CONFIGURE)
        try:
            settings = self._upload(request.settings).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(c.ErrorCode.BAD_REQUEST, "settings: not UTF-8") from None
        config = self._write_config(settings, self._install_facts())
        atomic_write(self.paths.provision_dir / "settings.toml", settings.encode(), 0o600)
        self._store.save(target)
        return c.StateRep(state=self.state.value, detail=f"device {config.device_id}")

    def _write_config(self, settings: str, install: InstallFacts | None) -> Config:
        """Validate the whole configuration, then replace the file in one rename."""
        make_dirs(self.paths.provision_dir, 0o700)
        try:
            text = compose_config(settings, self.paths, install)
            config = parse_config(text, str(self.paths.config_path))
        except ConfigError as exc:
            raise RequestError(c.ErrorCode.FAILED, str(exc)) from None
        managed = self.paths.managed_config.absolute()
        make_dirs(managed.parent, 0o700)
        atomic_write(managed, text.encode(), CONFIG_MODE)
        link = self.paths.config_path.absolute()
        if link != managed:  # /etc/edge-recorder/config.toml -> the managed copy
            make_dirs(link.parent, 0o755)
            atomic_symlink(link, managed)
        return config

    def _install_facts(self) -> InstallFacts | None:
        path = self.paths.provision_dir / "install.json"
        if not path.exists():
            return None
        return InstallFacts(**json.loads(path.read_text(encoding="utf-8")))

    def _settings(self) -> str:
        return (self.paths.provision_dir / "settings.toml").read_text(encoding="utf-8")

    def _config(self) -> Config:
        try:
            return load_config(self.paths.config_path)
        except ConfigError as exc:
            raise RequestError(c.ErrorCode.FAILED, str(exc)) from None

    def _generate_key(self, _request: c.Empty) -> c.Msg:
        from firmware.keys import load_or_create_signing_key, public_key_pem

        target = self._transition(Command.GENERATE_KEY)
        config = self._config()
        try:
            tls_key = load_or_create_tls_key(self.paths.tls_key)
        except PkiError as exc:
            raise RequestError(c.ErrorCode.FAILED, str(exc)) from None
        signing = load_or_create_signing_key(config.device_key_path)
        csr = make_csr(tls_key, config.device_id)
        self._downloads["csr"] = csr
        self._store.save(target)
        return c.GenerateKeyRep(state=self.state.value, csr=c.item_info("csr", csr),
                                signing_public_key=public_key_pem(signing.public_key()).decode())

    def _install(self, request: c.InstallReq) -> c.Msg:
        target = self._transition(Command.INSTALL)
        config = self._config()
        cert, chain = self._upload(request.certificate), self._upload(request.chain)
        try:
            parse_ops_key(request.ops_public_key)
            tls_key = load_or_create_tls_key(self.paths.tls_key)
            parsed = check_certificate(cert, chain, tls_key, config.device_id)
        except PkiError as exc:
            raise RequestError(c.ErrorCode.FAILED, str(exc)) from None
        facts = InstallFacts(request.broker_host, request.broker_port, request.ops_public_key)
        compose_check = compose_config(self._settings(), self.paths, facts)
        try:
            parse_config(compose_check, str(self.paths.config_path))
        except ConfigError as exc:
            raise RequestError(c.ErrorCode.FAILED, str(exc)) from None
        atomic_write(self.paths.certificate, cert, 0o644)
        atomic_write(self.paths.chain, chain, 0o644)
        atomic_write(self.paths.provision_dir / "install.json",
                     json.dumps(facts.__dict__).encode(), 0o600)
        self._write_config(self._settings(), facts)
        self._store.save(target)
        return c.StateRep(state=self.state.value,
                          detail=f"certificate valid until {parsed.not_valid_after_utc:%Y-%m-%d}")

    def _selftest(self, request: c.SelfTestReq) -> c.Msg:
        target = self._transition(Command.SELFTEST)
        unknown = [name for name in request.tests if name not in self._selftests]
        if unknown:
            raise RequestError(c.ErrorCode.BAD_REQUEST, f"unknown self-test {unknown[0]!r}; "
                               f"known: {', '.join(sorted(self._selftests))}")
        config = self._config()
        results = [self._selftests[name](config, request.timeout_s) for name in request.tests]
        passed = {result.name for result in results if result.ok}
        if all(result.ok for result in results) and self._required <= passed:
            self._store.save(target)
        return c.SelfTestRep(state=self.state.value, results=results)

    def _lock(self, _request: c.Empty) -> c.Msg:
        target = self._transition(Command.LOCK)
        self._store.save(target)
        return c.StateRep(state=self.state.value, detail="locked: only read-only commands")

    def _unlock(self, request: c.UnlockReq) -> c.Msg:
        target = self._transition(Command.UNLOCK)
        nonce = self._take_nonce()
        try:
            ticket = c.unpack(request.ticket, c.UnlockTicket)
        except c.CodecError as exc:
            raise RequestError(c.ErrorCode.BAD_REQUEST, f"unlock ticket: {exc}") from None
        config = self._config()
        ops_key = config.trust.ops_public_key
        problem = _ticket_problem(ticket, (self.identity.serial, config.device_id), nonce,
                                  self._now_s())
        if problem or ops_key is None:
            raise RequestError(c.ErrorCode.BAD_AUTH,
                               f"unlock ticket: {problem or 'no ops key installed'}")
        try:
            verify_ticket(request.ticket, request.signature, ops_key)
        except PkiError as exc:
            raise RequestError(c.ErrorCode.BAD_AUTH, str(exc)) from None
        self._store.save(target)
        return c.StateRep(state=self.state.value, detail="unlocked by ops ticket")

    # --- the port -----------------------------------------------------------------------
    def serve(self, port: Port, stop: threading.Event, name: str = "port") -> None:
        """Answer requests on ``port`` until ``stop`` is set."""
        link = Link(port, name)
        while not stop.is_set():
            frame = link.receive(RECEIVE_POLL_S)
            if frame is None:
                continue
            reply = self.handle(frame)
            if reply is not None:
                link.send(reply)


def _ticket_problem(ticket: c.UnlockTicket, device: tuple[str, str], nonce: bytes | None,
                    now_s: float) -> str:
    from provisioning.pki import MAX_TICKET_LIFETIME_S, TICKET_PURPOSE

    serial, device_id = device
    if ticket.purpose != TICKET_PURPOSE:
        return f"purpose {ticket.purpose!r} is not {TICKET_PURPOSE!r}"
    if ticket.serial != serial:
        return f"for serial {ticket.serial!r}, this device is {serial!r}"
    if ticket.device_id is not None and ticket.device_id != device_id:
        return f"for device {ticket.device_id!r}, this device is {device_id!r}"
    if nonce is None or ticket.nonce != nonce:
        return "nonce is not the one this device issued, or was used (ask for a new challenge)"
    if ticket.expires_unix < now_s:
        return "expired"
    if ticket.expires_unix > now_s + MAX_TICKET_LIFETIME_S:
        return f"valid for more than {MAX_TICKET_LIFETIME_S // 3600} h"
    return ""


# --- the command ------------------------------------------------------------------------
SERIAL_SOURCES = (Path("/sys/firmware/devicetree/base/serial-number"), Path("/etc/machine-id"))
REOPEN_DELAY_S = 1.0


def read_serial(sources: tuple[Path, ...] = SERIAL_SOURCES) -> str:
    """The board serial (Raspberry Pi device tree), else the machine id."""
    for path in sources:
        try:
            value = path.read_bytes().strip(b"\x00\n ").decode("ascii")
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    raise TransportError("no serial number: none of " + ", ".join(map(str, sources)))


def read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the label secret: {exc.strerror}") from None
    if len(secret) < 8:
        raise ConfigError(f"{path}: label secret shorter than 8 characters")
    return secret


def run_agent(port_url: str, paths: AgentPaths, identity: DeviceIdentity, baud: int,
              stop: threading.Event) -> int:
    """Serve on ``port_url``, opening it again whenever it goes (a USB gadget unplugged)."""
    from provisioning.transport import open_port

    agent = Agent(paths, identity)
    log.info("provisioning agent on %s (serial %s, state %s)", port_url, identity.serial,
             agent.state.value)
    while not stop.is_set():
        try:
            port = open_port(port_url, baud)
        except TransportError as exc:
            log.warning("%s; retrying", exc)
            stop.wait(REOPEN_DELAY_S)
            continue
        try:
            agent.serve(port, stop, port_url)
        except TransportError as exc:
            log.warning("%s; reopening", exc)
        finally:
            port.close()
            agent.end_session()
    return 0
