"""The MQTT broker of the sync path: mosquitto with mutual TLS and per-device ACLs.

``render_config`` turns ``sync/mosquitto/mosquitto.conf.template`` and a ``BrokerConfig`` into
a mosquitto.conf (text in, text out). ``Broker`` runs mosquitto with such a config as a
child process, for the tests and the demo: it starts it, waits until the port completes
a TLS handshake, stops it (SIGTERM: persistence saved) or kills it (SIGKILL), and starts
it again on the same persistence directory. docs/PROTOCOL.md describes what the
configuration enforces.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import socket
import ssl
import string
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from firmware.fsutil import atomic_write, make_dirs
from sync.pki import Credential, Pki

log = logging.getLogger(__name__)

MOSQUITTO = Path("/usr/sbin/mosquitto")  # Debian 12 package mosquitto 2.0.11
BROKER_FILES = Path(__file__).with_name("mosquitto")
TEMPLATE_PATH = BROKER_FILES / "mosquitto.conf.template"
ACL_PATH = BROKER_FILES / "acl"

# mosquitto.conf(5): max_packet_size below 20 is refused. OASIS MQTT 5.0, 1.5.5: the
# remaining length is at most 268,435,455, after a fixed header of at most 5 bytes.
MIN_PACKET_SIZE = 20
MAX_PACKET_SIZE = 268_435_460
# Twice AWS IoT Core's 128 KB message limit (the smallest of the common brokers), so a
# chunk sized to fit any broker fits here with its properties; the broker buffers at most
# this per packet per client.
DEFAULT_MAX_PACKET_SIZE = 256 * 1024
DEFAULT_AUTOSAVE_INTERVAL_S = 60
# mosquitto.conf(5): QoS 1 messages held per client beyond those in flight before new ones
# are dropped; mosquitto's own default (0 would mean no limit).
DEFAULT_MAX_QUEUED_MESSAGES = 1000
LOOPBACK = "127.0.0.1"

CONFIG_NAME = "mosquitto.conf"
LOG_NAME = "mosquitto.log"
DATA_DIR_NAME = "data"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
PROBE_INTERVAL_S = 0.02
PROBE_TIMEOUT_S = 1.0
LOG_TAIL_LINES = 5
# Logged once the listeners are open (mosquitto 2.0.11 logs "Opening ... listen socket"
# first, and exits instead when a listener cannot be opened).
RUNNING_LINE = re.compile(rb"mosquitto version \S+ running")
PORT_TAKEN = b"Address already in use"  # strerror(EADDRINUSE), logged when bind fails
PORT_ATTEMPTS = 3


class BrokerError(Exception):
    """The broker cannot be configured or started (message is one line)."""


class PortTakenError(BrokerError):
    """Another process listens on the broker's port."""


@dataclass(frozen=True)
class BrokerConfig:
    """What differs between one mosquitto.conf and another.

    ``bind_address`` None listens on all interfaces (production); tests bind loopback.
    """

    port: int
    data_dir: Path
    cafile: Path
    certfile: Path
    keyfile: Path
    acl_file: Path = ACL_PATH
    bind_address: str | None = LOOPBACK
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE
    autosave_interval_s: int = DEFAULT_AUTOSAVE_INTERVAL_S
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES
    user: str = "mosquitto"
    log_dest: str = "stderr"


def local_config(pki: Pki, directory: Path, port: int, *,
                 max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> BrokerConfig:
    """A loopback broker for tests and the demo: the PKI's broker certificate, data under
    ``directory``, running as the current user (root keeps root: the keys are 0600)."""
    return BrokerConfig(port=port, data_dir=directory / DATA_DIR_NAME, cafile=pki.ca_cert,
                        certfile=pki.broker.cert, keyfile=pki.broker.key,
                        max_packet_size=max_packet_size,
                        user=pwd.getpwuid(os.geteuid()).pw_name)


def load_template() -> str:
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def render_config(template: str, config: BrokerConfig) -> str:
    """mosquitto.conf text from ``template`` with ``config`` filled in.

    A value that could end a config line or split an option (whitespace, control
    characters) is refused, so no value can smuggle in another option.
    """
    _check_ranges(config)
    listener = str(config.port)
    if config.bind_address is not None:
        listener = f"{config.port} {_one_token('bind_address', config.bind_address)}"
    values = {
        "user": config.user, "acl_file": config.acl_file, "data_dir": config.data_dir,
        "autosave_interval_s": config.autosave_interval_s,
        "max_packet_size": config.max_packet_size, "log_dest": config.log_dest,
        "max_queued_messages": config.max_queued_messages,
        "cafile": config.cafile, "certfile": config.certfile, "keyfile": config.keyfile,
    }
    text = {key: _one_token(key, str(value)) for key, value in values.items()}
    try:
        return string.Template(template).substitute(text, listener=listener)
    except KeyError as exc:
        raise BrokerError(f"broker config template: no value for placeholder {exc}") from None
    except ValueError as exc:
        raise BrokerError(f"broker config template: {exc}") from None


def _check_ranges(config: BrokerConfig) -> None:
    if not 1 <= config.port <= 65535:
        raise BrokerError(f"broker config: port: {config.port} is not in 1..65535")
    if not MIN_PACKET_SIZE <= config.max_packet_size <= MAX_PACKET_SIZE:
        raise BrokerError(f"broker config: max_packet_size: {config.max_packet_size} is not "
                          f"in {MIN_PACKET_SIZE}..{MAX_PACKET_SIZE}")
    if config.autosave_interval_s < 0:
        raise BrokerError(f"broker config: autosave_interval_s: "
                          f"{config.autosave_interval_s} is negative")
    if config.max_queued_messages < 0:
        raise BrokerError(f"broker config: max_queued_messages: "
                          f"{config.max_queued_messages} is negative")


def _one_token(key: str, value: str) -> str:
    if not value:
        raise BrokerError(f"broker config: {key}: empty")
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        raise BrokerError(f"broker config: {key}: {value!r} holds whitespace or a control "
                          "character, which a mosquitto.conf value cannot")
    return value


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (another process may take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_local(pki: Pki, directory: Path, *, attempts: int = PORT_ATTEMPTS,
                max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> Broker:
    """A started loopback broker on a free port, for tests and the demo.

    A free port can be taken by another process before mosquitto binds it: then another
    port is tried, up to ``attempts`` times. The central certificate probes readiness.
    """
    for _ in range(attempts - 1):
        try:
            return _started(pki, directory, max_packet_size)
        except PortTakenError as exc:
            log.info("%s; trying another port", exc)
    return _started(pki, directory, max_packet_size)


def _started(pki: Pki, directory: Path, max_packet_size: int) -> Broker:
    config = local_config(pki, directory, free_port(), max_packet_size=max_packet_size)
    broker = Broker(directory, config, probe=pki.central)
    broker.start()
    return broker


class Broker:
    """mosquitto with a rendered config as a child process.

    ``directory`` holds the config and the log (kept across restarts; the log is
    appended to); persistence lives in ``config.data_dir``. ``probe`` is a client
    certificate for the readiness handshake.
    """

    def __init__(self, directory: Path, config: BrokerConfig, *, probe: Credential | None = None,
                 mosquitto: Path = MOSQUITTO, template: str | None = None) -> None:
        if config.log_dest != "stderr":
            raise BrokerError(f"broker config: log_dest: {config.log_dest!r}; the runner reads "
                              "the log and needs 'stderr'")
        self.directory = directory
        self.config = config
        self.config_path = directory / CONFIG_NAME
        self.log_path = directory / LOG_NAME
        self._mosquitto = mosquitto
        self._template = template
        self._probe_credential = probe
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def host(self) -> str:
        return self.config.bind_address or LOOPBACK

    @property
    def port(self) -> int:
        return self.config.port

    @property
    def pid(self) -> int | None:
        """mosquitto's process id while it runs (for CPU accounting), else None."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start mosquitto; return once its port completes a TLS handshake."""
        if self.running:
            raise BrokerError(f"broker on port {self.port}: already running")
        text = render_config(self._template or load_template(), self.config)
        make_dirs(self.directory, 0o700)
        make_dirs(self.config.data_dir, 0o700)
        atomic_write(self.config_path, text.encode(), 0o644)
        self._log_file = self.log_path.open("ab")
        log_offset = self._log_file.tell()
        self._process = subprocess.Popen(
            [str(self._mosquitto), "-c", str(self.config_path)], stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT)
        log.debug("mosquitto pid %d on port %d", self._process.pid, self.port)
        try:
            self._wait_ready(log_offset, timeout_s)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it does not exit."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto pid %d ignored SIGTERM; killing", self._process.pid)
        self.kill()

    def kill(self) -> None:
        """SIGKILL: what a power cut does (nothing saved since the last autosave)."""
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop cleanly and start again on the same port and persistence directory."""
        self.stop()
        self.start(timeout_s)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout_s: float) -> bool:
        """Whether ``needle`` shows in the log within ``timeout_s``. mosquitto logs after
        it acts (a refused client has its TLS alert before the log has its line), and the
        log is a file: it is polled."""
        deadline = time.monotonic() + timeout_s
        while needle not in self.log_text():
            if time.monotonic() >= deadline:
                return False
            time.sleep(PROBE_INTERVAL_S)
        return True

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _wait_ready(self, log_offset: int, timeout_s: float) -> None:
        """Until this process logged that it runs (its listener is open: another broker on
        the port cannot fool us) and the port completes a TLS handshake."""
        deadline = time.monotonic() + timeout_s
        context = self._probe_context()
        last_error = "no 'running' line in the log yet"
        while time.monotonic() < deadline:
            self._check_alive(log_offset)
            if self._logged_running(log_offset):
                try:
                    self._probe(context)
                    return
                except ssl.SSLCertVerificationError as exc:
                    raise BrokerError(f"broker on port {self.port}: its certificate does not "
                                      f"verify against {self.config.cafile}: "
                                      f"{exc.verify_message}") from None
                except OSError as exc:  # ssl.SSLError is an OSError
                    last_error = str(exc)
            time.sleep(PROBE_INTERVAL_S)  # nothing to wait on: log and port are polled
        raise BrokerError(f"mosquitto on port {self.port}: not ready within {timeout_s:g} s "
                          f"({last_error}); {self._log_tail()}")

    def _check_alive(self, log_offset: int) -> None:
        assert self._process is not None
        if self._process.poll() is None:
            return
        error = PortTakenError if PORT_TAKEN in self._log_since(log_offset) else BrokerError
        raise error(f"mosquitto exited with status {self._process.returncode} at start: "
                    f"{self._log_tail()}")

    def _log_since(self, log_offset: int) -> bytes:
        with self.log_path.open("rb") as handle:
            handle.seek(log_offset)
            return handle.read()

    def _logged_running(self, log_offset: int) -> bool:
        return RUNNING_LINE.search(self._log_since(log_offset)) is not None

    def _probe_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.config.cafile))
        if self._probe_credential is not None:
            context.load_cert_chain(self._probe_credential.cert, self._probe_credential.key)
        return context

    def _probe(self, context: ssl.SSLContext) -> None:
        """A TLS handshake that checks the broker's certificate. Without a ``probe``
        credential the broker logs each probe as a client without a certificate."""
        with socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT_S) as raw, \
                context.wrap_socket(raw, server_hostname=self.host) as tls:
            self._close_orderly(tls)

    @staticmethod
    def _close_orderly(tls: ssl.SSLSocket) -> None:
        """close_notify, so the broker logs an orderly close. Without a probe credential
        TLS 1.3 refuses here, after the handshake: the broker is up all the same."""
        with contextlib.suppress(OSError):
            tls.unwrap()

    def _log_tail(self) -> str:
        lines = [line for line in self.log_text().splitlines() if line.strip()]
        return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"
