"""The engineer's side of serial provisioning (`edge-recorder provision`).

:class:`Client` sends requests with retries (same request id, so the device answers a
repeat from its replay cache) and checks response MACs. :func:`provision` walks the steps
from whatever state the device reports, so a run cut short by a pulled cable is simply
run again. A plan (TOML file or flags) holds everything for non-interactive bulk work.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from provisioning import codec as c
from provisioning.auth import AuthError, PakeSession, check_frame_mac, frame_mac
from provisioning.cliargs import ALL_SELFTESTS
from provisioning.state import State
from provisioning.transport import Link, Port

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 2.0
RETRIES = 5
# Extra wait for commands that work before answering (key generation on a Pi Zero ~1 s).
EXTRA_WAIT_S = {c.MsgType.GENERATE_KEY: 5.0, c.MsgType.AUTH_START: 2.0}
TICKET_LIFETIME_S = 600  # bench unlock: signed and used at once

M = TypeVar("M", bound=c.Msg)


class ProvisionError(Exception):
    """Provisioning stopped (message is one line saying where and why)."""


class DeviceError(ProvisionError):
    """The device refused a request with an error code."""

    def __init__(self, code: int, message: str, retry_after_s: float = 0.0) -> None:
        name = c.ErrorCode(code).name if code in iter(c.ErrorCode) else str(code)
        super().__init__(f"device refused: {name}: {message}")
        self.code = code
        self.retry_after_s = retry_after_s


class Client:
    """Requests and responses over one link."""

    def __init__(self, port: Port, *, name: str = "port", timeout_s: float = REQUEST_TIMEOUT_S,
                 retries: int = RETRIES) -> None:
        self.link = Link(port, name)
        self.name = name
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_frame = c.DEFAULT_MAX_FRAME
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._mac_key: bytes | None = None

    def request(self, msg_type: c.MsgType, message: c.Msg, kind: type[M],
                extra_wait_s: float = 0.0) -> M:
        frame = self._frame(msg_type, c.pack(message))
        timeout_s = self.timeout_s + EXTRA_WAIT_S.get(msg_type, 0.0) + extra_wait_s
        for attempt in range(self.retries + 1):
            if attempt:
                log.debug("%s: no answer to %s, retry %d", self.name, msg_type.name, attempt)
            self.link.send(frame)
            reply = self._await(frame.request_id, timeout_s)
            if reply is not None:
                return self._parse(reply, kind)
        raise ProvisionError(f"{self.name}: no answer to {msg_type.name} after "
                             f"{self.retries + 1} tries (cable, port or baud rate?)")

    def _frame(self, msg_type: c.MsgType, payload: bytes) -> c.Frame:
        request_id = self._next_id
        self._next_id = (self._next_id + 1) % c.REQUEST_ID_MODULUS
        frame = c.Frame(type=msg_type, request_id=request_id, payload=payload)
        if self._mac_key is None:
            return frame
        return c.Frame(type=msg_type, request_id=request_id, payload=payload,
                       mac=frame_mac(self._mac_key, frame))

    def _await(self, request_id: int, timeout_s: float) -> c.Frame | None:
        while (reply := self.link.receive(timeout_s)) is not None:
            if reply.is_response and reply.request_id == request_id:
                return reply
            log.debug("%s: ignored a stale frame (request %d)", self.name, reply.request_id)
        return None

    def _parse(self, reply: c.Frame, kind: type[M]) -> M:
        if reply.is_error:
            error = c.unpack(reply.payload, c.ErrorRep)
            raise DeviceError(error.code, error.message, error.retry_after_s)
        if self._mac_key is not None and not check_frame_mac(self._mac_key, reply):
            raise ProvisionError(f"{self.name}: response MAC does not verify")
        try:
            return c.unpack(reply.payload, kind)
        except c.CodecError as exc:
            raise ProvisionError(f"{self.name}: malformed response: {exc}") from None

    # --- operations ---------------------------------------------------------------------
    def hello(self) -> c.HelloRep:
        rep = self.request(c.MsgType.HELLO, c.HelloReq(max_frame=c.DEFAULT_MAX_FRAME),
                           c.HelloRep)
        self.max_frame = rep.max_frame
        return rep

    def identify(self) -> c.IdentifyRep:
        return self.request(c.MsgType.IDENTIFY, c.Empty(), c.IdentifyRep)

    def authenticate(self, secret: bytes, serial: str) -> str:
        """Run SPAKE2 and key confirmation; the device's state afterwards."""
        self._mac_key = None
        pake = PakeSession(secret, serial, engineer=True)
        rep = self.request(c.MsgType.AUTH_START, c.AuthStartReq(message=pake.outbound),
                           c.AuthStartRep)
        try:
            pake.finish(rep.message)
        except AuthError as exc:
            raise ProvisionError(f"{self.name}: {exc}") from None
        confirm = self.request(c.MsgType.AUTH_CONFIRM,
                               c.AuthConfirmReq(confirm=pake.confirmation(engineer=True)),
                               c.AuthConfirmRep)
        if not pake.check_confirmation(confirm.confirm, engineer=False):
            raise ProvisionError(f"{self.name}: the device did not prove the same secret")
        self._mac_key = pake.frame_mac_key()
        return confirm.state

    def upload(self, name: str, data: bytes, progress: Callable[[int], None] | None = None,
               ) -> None:
        self.request(c.MsgType.ITEM_BEGIN, c.item_info(name, data), c.ItemChunkRep)
        step = c.chunk_bytes_for(self.max_frame)
        for offset in range(0, len(data), step):
            self.request(c.MsgType.ITEM_CHUNK,
                         c.ItemChunkReq(name=name, offset=offset, data=data[offset:offset + step]),
                         c.ItemChunkRep)
            if progress:
                progress(min(offset + step, len(data)))

    def download(self, info: c.ItemInfo) -> bytes:
        import hashlib

        data = bytearray()
        step = c.chunk_bytes_for(self.max_frame)
        while len(data) < info.size:
            rep = self.request(c.MsgType.ITEM_READ,
                               c.ItemReadReq(name=info.name, offset=len(data), length=step),
                               c.ItemReadRep)
            if not rep.data:
                raise ProvisionError(f"item {info.name!r}: device sent no data at {len(data)}")
            data += rep.data
        if len(data) != info.size or hashlib.sha256(data).digest() != info.sha256:
            raise ProvisionError(f"item {info.name!r}: size or SHA-256 does not match")
        return bytes(data)


# --- the plan ---------------------------------------------------------------------------
class PkiPlan(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ca_cert: str | None = None  # local CA (bench): sign the CSR here
    ca_key: str | None = None
    csr_out: str | None = None  # company PKI: write the CSR here and stop
    certificate: str | None = None  # company PKI: the signed certificate to install
    chain: str | None = None  # CA chain to install (default: ca_cert)


class InstallPlan(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    broker_host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    broker_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8883
    ops_public_key: str


class Plan(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    secret: str | None = None
    secret_file: str | None = None
    settings_file: str | None = None
    selftests: list[str] = msgspec.field(default_factory=lambda: list(ALL_SELFTESTS))
    selftest_timeout_s: Annotated[float, msgspec.Meta(gt=0, le=300)] = 10.0  # each test
    lock: bool = False
    pki: PkiPlan = msgspec.field(default_factory=PkiPlan)
    install: InstallPlan | None = None
    base_dir: str = "."  # relative paths resolve against the plan file's folder

    def path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def read(self, value: str, what: str) -> bytes:
        try:
            return self.path(value).read_bytes()
        except OSError as exc:
            raise ProvisionError(
                f"{self.path(value)}: cannot read {what}: {exc.strerror}") from None

    def secret_bytes(self) -> bytes | None:
        if self.secret is not None:
            return self.secret.encode()
        if self.secret_file is not None:
            return self.read(self.secret_file, "the label secret").strip()
        return None


def load_plan(path: Path) -> Plan:
    """A plan from a TOML file; errors name the file and key."""
    from firmware.config import convert_checked

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"{path}: not valid TOML: {exc}") from None
    raw["base_dir"] = str(path.parent)
    plan = convert_checked(raw, Plan, str(path), error=ProvisionError)
    unknown = [name for name in plan.selftests if name not in ALL_SELFTESTS]
    if unknown:
        raise ProvisionError(f"{path}: selftests: unknown {unknown[0]!r}")
    return plan


# --- the flow ---------------------------------------------------------------------------
@dataclass
class Outcome:
    serial: str = ""
    state: str = ""
    csr_path: Path | None = None
    certificate: bytes | None = None  # signed here by the local CA
    results: list[c.TestResult] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


class Reporter:
    """Where the flow reports progress; the CLI shows it with rich."""

    def step(self, name: str, detail: str) -> None:
        log.info("%s: %s", name, detail)

    def transfer(self, name: str, done_bytes: int, total_bytes: int) -> None:
        log.debug("%s: %d/%d bytes", name, done_bytes, total_bytes)


_RANK = {state: rank for rank, state in enumerate(State)}


def provision(client: Client, plan: Plan, reporter: Reporter | None = None) -> Outcome:
    """Take the device from its current state as far as the plan goes."""
    reporter = reporter or Reporter()
    out = Outcome()
    hello = client.hello()
    ident = client.identify()
    out.serial = hello.serial
    reporter.step("identify", f"serial {ident.serial}, firmware {ident.firmware}, state "
                  f"{ident.state}, device {ident.device_id or '-'}, lines "
                  f"{', '.join(f'{li.id} ({li.backend})' for li in ident.lines) or '-'}")
    secret = plan.secret_bytes()
    if secret is None:
        raise ProvisionError("no label secret (plan secret / secret_file, or --secret-file)")
    state = State(client.authenticate(secret, hello.serial))
    reporter.step("authenticate", f"SPAKE2 ok, device state {state.value}")
    for _name, run in _STEPS:
        state = run(client, plan, state, reporter, out)
        out.state = state.value
        if out.csr_path is not None:
            break
    return out


def _configure(client: Client, plan: Plan, state: State, reporter: Reporter,
               out: Outcome) -> State:
    if _RANK[state] >= _RANK[State.CONFIGURED] or plan.settings_file is None:
        return state
    settings = plan.read(plan.settings_file, "the settings")
    client.upload("settings", settings,
                  lambda n: reporter.transfer("settings", n, len(settings)))
    rep = client.request(c.MsgType.CONFIGURE, c.ConfigureReq(settings="settings"), c.StateRep)
    reporter.step("configure", rep.detail)
    out.steps.append("configure")
    return State(rep.state)


def _keys(client: Client, plan: Plan, state: State, reporter: Reporter,
          out: Outcome) -> State:
    imported = plan.pki.certificate is not None and state == State.KEYED
    if state not in (State.CONFIGURED, State.KEYED) or imported:
        return state
    rep = client.request(c.MsgType.GENERATE_KEY, c.Empty(), c.GenerateKeyRep)
    csr = client.download(rep.csr)
    reporter.step("keys", f"P-256 TLS key and Ed25519 audit key on the device; CSR "
                  f"{len(csr)} bytes")
    out.steps.append("keys")
    if plan.pki.certificate is None and plan.pki.ca_key is None:
        if plan.pki.csr_out is None:
            raise ProvisionError("plan: pki: needs ca_cert + ca_key (bench), or csr_out and "
                                 "later certificate (company PKI)")
        out.csr_path = plan.path(plan.pki.csr_out)
        out.csr_path.write_bytes(csr)
        reporter.step("csr", f"written to {out.csr_path}; sign it and run again with "
                      "pki.certificate")
    elif plan.pki.certificate is None:
        out.certificate = _sign_locally(plan, csr)
    return State(rep.state)


def _sign_locally(plan: Plan, csr: bytes) -> bytes:
    from provisioning.pki import PkiError, sign_csr

    if plan.pki.ca_cert is None or plan.pki.ca_key is None:
        raise ProvisionError("plan: pki: ca_cert and ca_key are both needed to sign locally")
    try:
        return sign_csr(csr, plan.path(plan.pki.ca_cert), plan.path(plan.pki.ca_key))
    except PkiError as exc:
        raise ProvisionError(str(exc)) from None


def _install(client: Client, plan: Plan, state: State, reporter: Reporter,
             out: Outcome) -> State:
    if state != State.KEYED:
        return state
    if plan.install is None:
        raise ProvisionError("plan: install: broker_host and ops_public_key are needed")
    cert = out.certificate
    if cert is None and plan.pki.certificate is not None:
        cert = plan.read(plan.pki.certificate, "the certificate")
    if cert is None:
        raise ProvisionError("plan: pki: no certificate to install (certificate or CA to sign)")
    chain_name = plan.pki.chain or plan.pki.ca_cert
    if chain_name is None:
        raise ProvisionError("plan: pki: chain: the CA chain to install is needed")
    chain = plan.read(chain_name, "the CA chain")
    for name, data in (("certificate", cert), ("chain", chain)):
        client.upload(name, data, lambda n, name=name, d=data: reporter.transfer(name, n, len(d)))
    rep = client.request(c.MsgType.INSTALL, c.InstallReq(
        certificate="certificate", chain="chain", broker_host=plan.install.broker_host,
        broker_port=plan.install.broker_port, ops_public_key=plan.install.ops_public_key),
        c.StateRep)
    reporter.step("install", rep.detail)
    out.steps.append("install")
    return State(rep.state)


def _selftest(client: Client, plan: Plan, state: State, reporter: Reporter,
              out: Outcome) -> State:
    if state != State.CERT_INSTALLED:
        return state
    rep = client.request(c.MsgType.SELFTEST,
                         c.SelfTestReq(tests=plan.selftests, timeout_s=plan.selftest_timeout_s),
                         c.SelfTestRep, plan.selftest_timeout_s * len(plan.selftests))
    out.results = rep.results
    for result in rep.results:
        reporter.step(f"selftest {result.name}", ("ok: " if result.ok else "FAILED: ")
                      + result.detail)
    out.steps.append("selftest")
    failed = [r.name for r in rep.results if not r.ok]
    if failed:
        raise ProvisionError(f"self-test failed: {', '.join(failed)} (device not locked)")
    return State(rep.state)


def _lock(client: Client, plan: Plan, state: State, reporter: Reporter,
          out: Outcome) -> State:
    if state != State.TESTED or not plan.lock:
        return state
    rep = client.request(c.MsgType.LOCK, c.Empty(), c.StateRep)
    reporter.step("lock", rep.detail)
    out.steps.append("lock")
    return State(rep.state)


_STEPS = (("configure", _configure), ("keys", _keys), ("install", _install),
          ("selftest", _selftest), ("lock", _lock))


# --- field unlock -----------------------------------------------------------------------
CHALLENGE_KIND = "edge-recorder unlock challenge"
TICKET_KIND = "edge-recorder unlock ticket"
FIELD_TICKET_LIFETIME_S = 8 * 3600  # one working day on site


def fetch_challenge(client: Client) -> dict[str, object]:
    """The device's unlock challenge as a document for ops (JSON-ready)."""
    hello = client.hello()
    rep = client.request(c.MsgType.UNLOCK_CHALLENGE, c.Empty(), c.ChallengeRep)
    if rep.serial != hello.serial:
        raise ProvisionError(f"{client.name}: challenge for serial {rep.serial!r}, "
                             f"device said {hello.serial!r}")
    return {"kind": CHALLENGE_KIND, "serial": rep.serial, "device_id": rep.device_id,
            "state": rep.state, "nonce": rep.nonce.hex(), "firmware": hello.firmware}


def _field(doc: Mapping[str, object], key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise ProvisionError(f"{where}: {key}: missing or not a {kind.__name__}")
    return value


def _read_doc(path: Path, kind: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProvisionError(f"{path}: not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != kind:
        raise ProvisionError(f"{path}: kind: not an {kind}")
    return doc


def make_ticket(challenge: Mapping[str, object], ops_key: Path, now_s: float,
                lifetime_s: float = FIELD_TICKET_LIFETIME_S, where: str = "challenge",
                ) -> dict[str, object]:
    """Ops side: sign a ticket for exactly this challenge (device, nonce), expiring."""
    from provisioning.pki import TICKET_PURPOSE, PkiError, sign_ticket

    try:
        nonce = bytes.fromhex(_field(challenge, "nonce", str, where))
    except ValueError:
        raise ProvisionError(f"{where}: nonce: not hex") from None
    device_id = challenge.get("device_id")
    ticket = c.UnlockTicket(purpose=TICKET_PURPOSE, serial=_field(challenge, "serial", str, where),
                            nonce=nonce, expires_unix=int(now_s + lifetime_s),
                            device_id=device_id if isinstance(device_id, str) else None)
    packed = c.pack(ticket)
    try:
        signature = sign_ticket(packed, ops_key)
    except PkiError as exc:
        raise ProvisionError(str(exc)) from None
    return {"kind": TICKET_KIND, "serial": ticket.serial, "device_id": ticket.device_id,
            "expires_unix": ticket.expires_unix, "ticket": base64.b64encode(packed).decode(),
            "signature": base64.b64encode(signature).decode()}


def apply_ticket(client: Client, secret: bytes, ticket: Mapping[str, object],
                 where: str = "ticket") -> str:
    """Engineer side: authenticate and present the ops ticket; the device's new state."""
    try:
        packed = base64.b64decode(_field(ticket, "ticket", str, where), validate=True)
        signature = base64.b64decode(_field(ticket, "signature", str, where), validate=True)
    except ValueError:
        raise ProvisionError(f"{where}: ticket/signature: not base64") from None
    hello = client.hello()
    client.authenticate(secret, hello.serial)
    rep = client.request(c.MsgType.UNLOCK, c.UnlockReq(ticket=packed, signature=signature),
                         c.StateRep)
    return rep.state


def unlock(client: Client, secret: bytes, ops_key: Path, now_s: float) -> str:
    """Unlock with a ticket signed here by the ops key (bench; ops signs it in the field)."""
    challenge = fetch_challenge(client)
    return apply_ticket(client, secret, make_ticket(challenge, ops_key, now_s,
                                                    TICKET_LIFETIME_S))


def read_ticket(path: Path) -> dict[str, Any]:
    return _read_doc(path, TICKET_KIND)


def write_doc(path: Path, doc: Mapping[str, object]) -> None:
    try:
        path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot write: {exc.strerror}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m provisioning.tool",
                                     description="ops side of field unlock")
    commands = parser.add_subparsers(dest="command", required=True)
    sign = commands.add_parser("sign-ticket", help="sign an unlock ticket for a challenge")
    sign.add_argument("--key", type=Path, required=True, help="ops Ed25519 key (PEM)")
    sign.add_argument("--challenge", type=Path, required=True, help="the device's challenge")
    sign.add_argument("-o", "--output", type=Path, required=True, help="ticket file to write")
    sign.add_argument("--lifetime-s", type=float, default=FIELD_TICKET_LIFETIME_S,
                      help="seconds the ticket stays valid")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m provisioning.tool sign-ticket`: exit 0, 1 on failure, 2 on usage."""
    from provisioning.pki import MAX_TICKET_LIFETIME_S

    args = _parser().parse_args(argv)
    if not 0 < args.lifetime_s <= MAX_TICKET_LIFETIME_S:
        print(f"--lifetime-s: must be in (0, {MAX_TICKET_LIFETIME_S}]", file=sys.stderr)  # noqa: T201 - CLI output
        return 2
    try:
        challenge = _read_doc(args.challenge, CHALLENGE_KIND)
        ticket = make_ticket(challenge, args.key, time.time(), args.lifetime_s,
                             str(args.challenge))
        write_doc(args.output, ticket)
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)  # noqa: T201 - CLI output
        return 1
    print(f"{args.output}: ticket for serial {ticket['serial']} (device "  # noqa: T201 - CLI output
          f"{ticket['device_id'] or '-'}), valid until {ticket['expires_unix']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
