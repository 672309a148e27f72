"""The device's control plane on MQTT: fleet status (birth, will, heartbeat), signed
configuration and policy updates, signed commands and their job status.

The sync agent owns the MQTT connection and calls :class:`ControlPlane`:

- ``will()`` before every connection attempt (paho: ``will_set(*will())`` in
  ``on_pre_connect``, so automatic reconnects carry a fresh session counter too);
- ``birth()`` and ``subscriptions()`` after every CONNACK;
- ``heartbeat_due(monotonic)`` on every tick of its loop;
- ``handle(topic, payload)`` for each message on the subscribed topics.

Each returns the messages to publish as ``(topic, payload, qos, retain)``; nothing here
touches the network. Every decision is audited in the catalogue; job results, applied
versions and the session counter live in ``<data_dir>/control-state.json`` (written with
write-then-rename). docs/PROTOCOL.md ("Fleet status", "Signed configuration and commands")
is the contract.

``python -m sync.control sign ...`` is the ops-side tool that makes signed envelopes.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

import firmware
from drivers.clock import Clock
from firmware.catalogue import Catalogue
from firmware.config import Config, ConfigError, parse_config
from firmware.fsutil import atomic_write
from firmware.policyfile import PolicyError
from firmware.policystore import install_policy, load_active_policy
from sync import envelope
from sync.envelope import Accepted, Body, Payload, Reason, Rejected
from sync.status import Health, Identity, LineState, birth_payload, heartbeat_payload, iso_utc
from sync.status import will_payload as build_will

log = logging.getLogger(__name__)

Message = tuple[str, bytes, int, bool]

TOPIC_ROOT = "er/v1"  # docs/PROTOCOL.md, "Topics and access"
QOS = 1
STATE_NAME = "control-state.json"
STATE_MODE = 0o600
PREVIOUS_SUFFIX = ".previous"
MAX_JOBS_KEPT = 256  # job results kept for de-duplication, oldest dropped first
DEFAULT_HEARTBEAT_S = 60.0
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 2000
MAX_LOG_BYTES = 64 * 1024  # fits a job status well below the envelope's 120 KiB
RUN_TIMEOUT_S = 30.0
REBOOT_TIMEOUT_S = 300.0  # a reboot not done after this long has timed out
JOB_SIGNING_CONTEXT = b"edge-recorder job status v1\n"
JOURNALCTL = ("journalctl", "-u", "edge-recorder", "--no-pager")
REBOOT = ("systemctl", "reboot")
JOB_STATES = ("queued", "in_progress", "succeeded", "failed", "rejected", "timed_out")
CONFIG_JOB = "config"  # job status topic of configuration and policy updates


@dataclass(frozen=True)
class RunResult:
    returncode: int
    stdout: str


Runner = Callable[[Sequence[str], float], RunResult]


def run_command(argv: Sequence[str], timeout_s: float) -> RunResult:
    """Run a program (no shell); FileNotFoundError if it is not installed,
    subprocess.TimeoutExpired if it runs longer than ``timeout_s``."""
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    return RunResult(done.returncode, done.stdout + done.stderr)


class JobRecord(msgspec.Struct, kw_only=True):
    digest: str
    status: dict[str, Any]
    command: str | None = None


class ControlState(msgspec.Struct, kw_only=True):
    session: int = 0
    versions: dict[str, int] = msgspec.field(default_factory=dict)
    jobs: dict[str, JobRecord] = msgspec.field(default_factory=dict)  # insertion-ordered


class ApplyError(Exception):
    """A verified update or command could not be carried out (one-line message)."""


@dataclass
class _Reboot:
    job_id: str
    body: Body
    requested_at: float | None = None  # monotonic time systemctl was asked


class ControlPlane:
    """Status, signed updates and commands for one device (interface in the module doc)."""

    def __init__(self, config: Config, catalogue_path: Path, clock: Clock,
                 signing_key: Ed25519PrivateKey, *, client_cert: Path | None = None,
                 heartbeat_s: float | None = None, runner: Runner = run_command) -> None:
        """``client_cert`` and ``heartbeat_s`` default to ``[sync]`` ``cert_file`` and
        ``heartbeat_s`` (60 s without a ``[sync]`` table)."""
        if config.sync is not None:
            client_cert = client_cert or config.resolve_path(config.sync.cert_file)
            heartbeat_s = heartbeat_s or config.sync.heartbeat_s
        self._lock = threading.RLock()  # will() runs on paho's thread, the rest on the agent's
        self._config = config
        self._catalogue_path = catalogue_path
        self._clock = clock
        self._key = signing_key
        self._client_cert = client_cert
        self._heartbeat_s = heartbeat_s or DEFAULT_HEARTBEAT_S
        self._run = runner
        self._prefix = f"{TOPIC_ROOT}/{config.device_id}/"
        self._state_path = config.data_dir / STATE_NAME
        self._state = self._load_state()
        self._ops_key = _ops_key(config)
        self._catalogue = Catalogue(catalogue_path, clock=clock, device_id=config.device_id)
        self._started_wall = clock.wall()
        self._started_mono = clock.monotonic()
        self._config_sha256 = _file_sha256(_config_path(config))
        self._policy_version = _policy_version(config)
        self._next_heartbeat: float | None = None
        self._last_error: str | None = None
        self._reboot: _Reboot | None = None
        self._session_announced = False
        self._pending = self._finish_interrupted_jobs()

    def close(self) -> None:
        self._catalogue.close()

    # --- the agent's interface ---------------------------------------------------------
    def will(self) -> Message:
        """The Will for the next connection; increases and persists the session counter."""
        with self._lock:
            return self._new_will()

    def _new_will(self) -> Message:
        self._state.session += 1
        self._save_state()
        self._session_announced = False
        return (self._topic("up/status"), build_will(self._identity()), QOS, True)

    def birth(self) -> list[Message]:
        """Birth (retained) and any job results left from before a restart."""
        with self._lock:
            return self._birth()

    def _birth(self) -> list[Message]:
        if self._state.session == 0 or self._session_announced:
            self._new_will()  # the will was not refreshed: never announce a session twice
        self._session_announced = True
        now = self._clock.monotonic()
        self._next_heartbeat = now + self._heartbeat_s
        payload = birth_payload(
            self._identity(), config_sha256=self._config_sha256,
            config_version=self._state.versions.get("config", 0),
            policy_version=self._policy_version, started_at_s=self._started_wall,
            now_s=self._clock.wall(), clock_synced=self._clock.wall_synced())
        messages = [(self._topic("up/status"), payload, QOS, True), *self._pending]
        self._pending = []
        return messages

    def heartbeat_due(self, now_monotonic: float) -> list[Message]:
        with self._lock:
            return self._heartbeat_due(now_monotonic)

    def _heartbeat_due(self, now_monotonic: float) -> list[Message]:
        messages = self._reboot_tick(now_monotonic)
        if self._next_heartbeat is None or now_monotonic < self._next_heartbeat:
            return messages
        self._next_heartbeat = now_monotonic + self._heartbeat_s
        return [*messages, self._heartbeat()]

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(self._topic("down/config"), QOS), (self._topic("down/cmd/+"), QOS)]

    def handle(self, topic: str, payload: bytes) -> list[Message]:
        with self._lock:
            return self._handle(topic, payload)

    def _handle(self, topic: str, payload: bytes) -> list[Message]:
        if topic == self._topic("down/config"):
            if not payload:  # ops cleared the retained update: nothing to do
                return []
            return self._handle_update(payload)
        command_prefix = self._topic("down/cmd/")
        if topic.startswith(command_prefix):
            return self._handle_command(topic[len(command_prefix):], payload)
        log.warning("control: message on unexpected topic %s ignored", topic)
        return []

    # --- updates -----------------------------------------------------------------------
    def _handle_update(self, payload: bytes) -> list[Message]:
        try:
            accepted = self._verify(payload)
            if accepted.body.kind == "command":
                raise Rejected(Reason.MALFORMED, "a command on the configuration topic",
                               accepted.body)
        except Rejected as rejection:
            return self._reject(CONFIG_JOB, rejection)
        if accepted.duplicate:
            return self._from_cache(accepted.body.kind)
        return self._apply_update(accepted)

    def _apply_update(self, accepted: Accepted) -> list[Message]:
        body = accepted.body
        assert body.payload is not None  # envelope.check_body_shape
        try:
            if body.kind == "config":
                result = self._install_config(body.payload.toml or "")
            else:
                result = self._install_policy(body.payload)
        except ApplyError as exc:
            return self._finish(CONFIG_JOB, accepted, "failed", error=str(exc),
                                dedupe_key=body.kind)
        self._state.versions[body.kind] = body.version
        return self._finish(CONFIG_JOB, accepted, "succeeded", result=result,
                            dedupe_key=body.kind)

    def _install_config(self, text: str) -> dict[str, Any]:
        path = _config_path(self._config)
        if path is None:
            raise ApplyError("the running configuration has no file to replace")
        try:
            new = parse_config(text, str(path))
        except ConfigError as exc:
            raise ApplyError(f"configuration refused: {exc}") from None
        self._check_new_config(new)
        data = text.encode("utf-8")
        try:
            old = path.read_bytes()
            mode = path.stat().st_mode & 0o777
            atomic_write(path.with_name(path.name + PREVIOUS_SUFFIX), old, mode)
            atomic_write(path, data, mode)
        except OSError as exc:
            raise ApplyError(f"{path}: cannot write: {exc.strerror or exc}") from None
        self._config_sha256 = hashlib.sha256(data).hexdigest()
        log.info("control: configuration %s replaced (sha256 %s); restart pending", path,
                 self._config_sha256[:16])
        return {"message": "applied, restart pending", "restart_pending": True,
                "config_sha256": self._config_sha256}

    def _check_new_config(self, new: Config) -> None:
        if new.device_id != self._config.device_id:
            raise ApplyError(f"configuration refused: device_id is {new.device_id!r}, this "
                             f"device is {self._config.device_id!r}")
        if new.trust.ops_public_key is None:
            raise ApplyError("configuration refused: trust.ops_public_key is missing (the "
                             "device could not be managed any more)")

    def _install_policy(self, payload: Payload) -> dict[str, Any]:
        try:
            policy = install_policy(self._config, (payload.policy or "").encode("utf-8"),
                                    (payload.signature or "").encode("ascii"),
                                    source="policy update")
        except (PolicyError, UnicodeEncodeError, OSError) as exc:
            raise ApplyError(f"policy refused: {exc}") from None
        return {"message": "applied, restart pending", "restart_pending": True,
                "policy_id": policy.id, "policy_version": policy.version,
                "policy_sha256": policy.sha256}

    # --- commands ----------------------------------------------------------------------
    def _handle_command(self, topic_job: str, payload: bytes) -> list[Message]:
        try:
            accepted = self._verify(payload)
            body = accepted.body
            if body.kind != "command" or body.job_id != topic_job:
                raise Rejected(Reason.MALFORMED, f"not the command for job {topic_job!r} "
                               f"(kind {body.kind}, job_id {body.job_id!r})", body)
        except Rejected as rejection:
            return self._reject(topic_job, rejection)
        if accepted.duplicate:
            return self._from_cache(topic_job)
        self._state.versions["command"] = body.version
        return self._execute(topic_job, accepted)

    def _execute(self, job_id: str, accepted: Accepted) -> list[Message]:
        command = accepted.body.command
        if command == "reboot":
            return self._start_reboot(job_id, accepted)
        actions: dict[str, Callable[[Body], dict[str, Any]]] = {
            "status": self._cmd_status, "resync": self._cmd_resync,
            "rotate_recipients": self._cmd_rotate, "fetch_logs": self._cmd_fetch_logs}
        extra: list[Message] = []
        try:
            result = actions[str(command)](accepted.body)
        except ApplyError as exc:
            return self._finish(job_id, accepted, "failed", error=str(exc))
        except subprocess.TimeoutExpired:
            return self._finish(job_id, accepted, "timed_out",
                                error=f"{command}: no answer within {RUN_TIMEOUT_S:g} s")
        if command == "status":
            extra.append(self._heartbeat())
        return [*extra, *self._finish(job_id, accepted, "succeeded", result=result)]

    def _cmd_status(self, _body: Body) -> dict[str, Any]:
        return {"health": json.loads(self._heartbeat()[1])}

    def _cmd_resync(self, _body: Body) -> dict[str, Any]:
        """Items sent but not confirmed stored go back to pending (the agent sends them
        again)."""
        with self._catalogue.transaction() as txn:
            requeued = txn.requeue_sent()
        return {"requeued": requeued}

    def _cmd_rotate(self, body: Body) -> dict[str, Any]:
        recipients = (body.args or {}).get("recipients")
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ApplyError("rotate_recipients: args.recipients must be a list of age "
                             "recipients")
        path = _config_path(self._config)
        if path is None:
            raise ApplyError("the running configuration has no file to replace")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ApplyError(f"{path}: cannot read: {exc}") from None
        new_text = replace_recipients(text, recipients, str(path))
        return self._install_config(new_text)

    def _cmd_fetch_logs(self, body: Body) -> dict[str, Any]:
        lines = (body.args or {}).get("lines", DEFAULT_LOG_LINES)
        if not isinstance(lines, int) or isinstance(lines, bool) or \
                not 1 <= lines <= MAX_LOG_LINES:
            raise ApplyError(f"fetch_logs: args.lines must be an integer 1..{MAX_LOG_LINES}")
        argv = [*JOURNALCTL, "-n", str(lines)]
        try:
            done = self._run(argv, RUN_TIMEOUT_S)
        except FileNotFoundError:
            raise ApplyError("fetch_logs: journalctl is not installed on this device") \
                from None
        if done.returncode != 0:
            raise ApplyError(f"fetch_logs: journalctl exited with status {done.returncode}: "
                             f"{done.stdout.strip()[-200:]}")
        output = done.stdout.encode("utf-8")[-MAX_LOG_BYTES:].decode("utf-8", "replace")
        return {"lines": output.splitlines(), "truncated": len(done.stdout) > len(output)}

    # --- reboot: reported in progress first, executed on the next tick -----------------
    def _start_reboot(self, job_id: str, accepted: Accepted) -> list[Message]:
        self._reboot = _Reboot(job_id, accepted.body)
        return self._finish(job_id, accepted, "in_progress",
                            result={"message": "rebooting after this report"})

    def _reboot_tick(self, now_monotonic: float) -> list[Message]:
        reboot = self._reboot
        if reboot is None:
            return []
        if reboot.requested_at is not None:
            if now_monotonic - reboot.requested_at < REBOOT_TIMEOUT_S:
                return []
            self._reboot = None
            return self._update_job(reboot.job_id, "timed_out",
                                    error=f"no reboot within {REBOOT_TIMEOUT_S:g} s")
        reboot.requested_at = now_monotonic
        try:
            done = self._run(REBOOT, RUN_TIMEOUT_S)
        except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
            self._reboot = None
            return self._update_job(reboot.job_id, "failed", error=f"reboot: {exc}")
        if done.returncode != 0:
            self._reboot = None
            return self._update_job(reboot.job_id, "failed", error=(
                f"reboot: systemctl exited with status {done.returncode}: "
                f"{done.stdout.strip()[-200:]}"))
        log.warning("control: reboot requested by job %s", reboot.job_id)
        return []

    def _finish_interrupted_jobs(self) -> list[Message]:
        """Jobs left in progress by a restart: a reboot has succeeded, anything else was
        interrupted. Their results are published with the next birth."""
        messages: list[Message] = []
        for job_id, record in list(self._state.jobs.items()):
            if record.status.get("state") != "in_progress":
                continue
            if record.command == "reboot":
                messages += self._update_job(job_id, "succeeded",
                                             result={"message": "device restarted"})
            else:
                messages += self._update_job(job_id, "failed", error="interrupted by a restart")
        return messages

    # --- verification, results and audit -----------------------------------------------
    def _verify(self, payload: bytes) -> Accepted:
        known = {key: record.digest for key, record in self._state.jobs.items()}
        return envelope.verify(
            payload, public_key=self._ops_key, device_id=self._config.device_id,
            now_s=self._clock.wall(), clock_synced=self._clock.wall_synced(),
            last_versions=self._state.versions, known_jobs=known)

    def _reject(self, job_id: str, rejection: Rejected) -> list[Message]:
        """Report and audit a refusal; nothing is acted on. Before the signature verified
        the content cannot be attributed, so the report is not retained and not stored:
        a forged message cannot overwrite a real job's result."""
        body = rejection.body
        self._last_error = str(rejection)
        status = self._status_fields(job_id, "rejected", body, reason=rejection.reason.value,
                                     error=rejection.detail)
        log.warning("control: %s refused: %s", job_id, rejection)
        with self._catalogue.transaction() as txn:
            txn.audit("control.rejected", job_id, reason=rejection.reason.value,
                      detail=rejection.detail, envelope_kind=body.kind if body else None,
                      version=body.version if body else None,
                      clock_synced=self._clock.wall_synced())
            txn.audit("job.status", job_id, state="rejected", reason=rejection.reason.value)
        return [self._job_message(job_id, status, retain=body is not None)]

    def _finish(self, job_id: str, accepted: Accepted, state: str, *,
                result: dict[str, Any] | None = None, error: str | None = None,
                dedupe_key: str | None = None) -> list[Message]:
        body = accepted.body
        status = self._status_fields(job_id, state, body, result=result, error=error)
        if error is not None:
            self._last_error = error
        self._remember(dedupe_key or job_id, accepted.digest, status, body.command)
        with self._catalogue.transaction() as txn:
            if state in ("succeeded", "in_progress"):
                txn.audit("control.applied", job_id, envelope_kind=body.kind, version=body.version,
                          command=body.command, digest=accepted.digest)
            else:
                txn.audit("control.rejected", job_id, envelope_kind=body.kind, version=body.version,
                          stage="apply", detail=error, digest=accepted.digest)
            txn.audit("job.status", job_id, state=state, error=error)
        self._save_state()
        log.info("control: job %s %s%s", job_id, state, f": {error}" if error else "")
        return [self._job_message(job_id, status, retain=True)]

    def _update_job(self, job_id: str, state: str, *, result: dict[str, Any] | None = None,
                    error: str | None = None) -> list[Message]:
        record = self._state.jobs.get(job_id)
        if record is None:
            return []
        fields = {k: v for k, v in record.status.items() if k not in ("key_id", "signature")}
        fields.update(state=state, at=iso_utc(self._clock.wall()), session=self._state.session,
                      result=result, error=error)
        record.status = self._signed(fields)
        if error is not None:
            self._last_error = error
        with self._catalogue.transaction() as txn:
            txn.audit("job.status", job_id, state=state, error=error)
        self._save_state()
        return [self._job_message(job_id, record.status, retain=True)]

    def _from_cache(self, key: str) -> list[Message]:
        record = self._state.jobs[key]
        job_id = str(record.status.get("job_id", key))
        log.info("control: %s already handled; answering from the stored result", key)
        return [self._job_message(job_id, record.status, retain=True)]

    def _status_fields(self, job_id: str, state: str, body: Body | None, *,
                       reason: str | None = None, result: dict[str, Any] | None = None,
                       error: str | None = None) -> dict[str, Any]:
        fields = {"job_id": job_id, "device": self._config.device_id, "state": state,
                  "session": self._state.session, "at": iso_utc(self._clock.wall()),
                  "kind": body.kind if body else None,
                  "command": body.command if body else None,
                  "version": body.version if body else None,
                  "reason": reason, "error": error, "result": result}
        return self._signed(fields)

    def _signed(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The device key signs each job status (the broker is not the only witness)."""
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        signature = self._key.sign(JOB_SIGNING_CONTEXT + text.encode("utf-8"))
        return {**fields, "key_id": envelope.key_id(self._key.public_key()),
                "signature": base64.b64encode(signature).decode("ascii")}

    def _job_message(self, job_id: str, status: dict[str, Any], *, retain: bool) -> Message:
        payload = json.dumps(status, sort_keys=True, separators=(",", ":"),
                             ensure_ascii=False).encode("utf-8")
        return (self._topic(f"up/jobs/{job_id}"), payload, QOS, retain)

    def _remember(self, key: str, digest: str, status: dict[str, Any],
                  command: str | None) -> None:
        jobs = self._state.jobs
        jobs.pop(key, None)
        jobs[key] = JobRecord(digest=digest, status=status, command=command)
        while len(jobs) > MAX_JOBS_KEPT:
            jobs.pop(next(iter(jobs)))

    # --- status ------------------------------------------------------------------------
    def _identity(self) -> Identity:
        return Identity(self._config.device_id, self._state.session, firmware.__version__)

    def _heartbeat(self) -> Message:
        payload = heartbeat_payload(self._identity(), self._health(),
                                    now_s=self._clock.wall(),
                                    uptime_s=self._clock.monotonic() - self._started_mono)
        return (self._topic("up/status"), payload, QOS, True)

    def _health(self) -> Health:
        stats = catalogue_stats(self._catalogue_path, self._clock.wall())
        active = stats.pop("active_by_line")
        lines = [LineState(line.id, int(active.get(line.id, 0))) for line in self._config.lines]
        return Health(**stats, disk_free_bytes=disk_free_bytes(self._config.data_dir),
                      cert_expiry_days=self._cert_days(),
                      clock_synced=self._clock.wall_synced(), lines=lines,
                      config_sha256=self._config_sha256,
                      config_version=self._state.versions.get("config", 0),
                      policy_version=self._policy_version, last_error=self._last_error)

    def _cert_days(self) -> int | None:
        if self._client_cert is None:
            return None
        try:
            return cert_expiry_days(self._client_cert.read_bytes(), self._clock.wall())
        except (OSError, ValueError) as exc:
            self._last_error = f"{self._client_cert}: cannot read certificate: {exc}"
            return None

    # --- state file --------------------------------------------------------------------
    def _topic(self, rest: str) -> str:
        return self._prefix + rest

    def _load_state(self) -> ControlState:
        try:
            data = self._state_path.read_bytes()
        except FileNotFoundError:
            return ControlState()
        try:
            return msgspec.json.decode(data, type=ControlState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ControlError(f"{self._state_path}: damaged control state ({exc})") from None

    def _save_state(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._state_path, msgspec.json.encode(self._state), STATE_MODE)


class ControlError(Exception):
    """The control plane cannot start (one-line message naming the file)."""


# --- helpers (pure or read-only) -----------------------------------------------------------

def _ops_key(config: Config) -> Ed25519PublicKey | None:
    text = config.trust.ops_public_key
    return envelope.parse_public_key(text) if text else None


def _config_path(config: Config) -> Path | None:
    """The real config file: a symlink (/etc/edge-recorder/config.toml -> the state
    directory's managed copy, on a read-only /etc) is followed, so an update replaces the
    file it points to instead of the link."""
    if not config.source or config.source.startswith("<"):
        return None
    return Path(config.source).resolve()


def _file_sha256(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _policy_version(config: Config) -> int:
    active, _ = load_active_policy(config)
    return active.version if active is not None else 0


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True,
                                 timeout=10.0)) as conn:
        yield conn


def _age_s(iso: str | None, now_s: float) -> int | None:
    if iso is None:
        return None
    return max(0, int(now_s - dt.datetime.fromisoformat(iso).timestamp()))


def catalogue_stats(path: Path, now_s: float) -> dict[str, Any]:
    """Backlog, oldest unsynced item, active calls per line and the newest call, read on
    a read-only connection (table names: docs/FORMAT.md)."""
    with _read_only(path) as conn:
        count, size = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(r.size), 0) FROM outbox o LEFT JOIN recordings r "
            "ON o.kind = 'recording' AND r.id = o.ref WHERE o.state = 'pending'").fetchone()
        oldest = conn.execute("SELECT MIN(created_at) FROM outbox "
                              "WHERE state IN ('pending', 'sent')").fetchone()[0]
        active = dict(conn.execute("SELECT line_id, COUNT(*) FROM calls "
                                   "WHERE state = 'active' GROUP BY line_id").fetchall())
        last_call = conn.execute("SELECT MAX(started_at) FROM calls").fetchone()[0]
    return {"backlog_count": int(count), "backlog_bytes": int(size),
            "oldest_unsynced_age_s": _age_s(oldest, now_s), "active_by_line": active,
            "last_call_at": last_call}


def disk_free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def cert_expiry_days(pem: bytes, now_s: float) -> int:
    """Whole days until the certificate's notAfter (negative once expired)."""
    cert = x509.load_pem_x509_certificate(pem)
    return int((cert.not_valid_after_utc.timestamp() - now_s) // 86_400)


_RECIPIENTS_RE = re.compile(r"^recipients\s*=\s*\[[^\]]*\]", re.MULTILINE)
_TABLE_RE = re.compile(r"^\s*\[", re.MULTILINE)


def replace_recipients(text: str, recipients: Sequence[str], source: str) -> str:
    """The config text with ``keys.recipients`` replaced and nothing else changed
    (comments kept). Checked by parsing both versions: anything but the recipients
    differing refuses the edit."""
    keys_at = re.search(r"^\[keys\]\s*$", text, re.MULTILINE)
    if keys_at is None:
        raise ApplyError(f"{source}: keys.recipients: no [keys] table to edit; "
                         "send a full configuration instead")
    end = _TABLE_RE.search(text, keys_at.end())
    section_end = end.start() if end else len(text)
    match = _RECIPIENTS_RE.search(text, keys_at.end(), section_end)
    if match is None:
        raise ApplyError(f"{source}: keys.recipients: not found as an array in [keys]; "
                         "send a full configuration instead")
    new_array = "recipients = [" + ", ".join(json.dumps(r) for r in recipients) + "]"
    new_text = text[:match.start()] + new_array + text[match.end():]
    _check_only_recipients_changed(text, new_text, recipients, source)
    return new_text


def _check_only_recipients_changed(old_text: str, new_text: str, recipients: Sequence[str],
                                   source: str) -> None:
    try:
        old, new = parse_config(old_text, source), parse_config(new_text, source)
    except ConfigError as exc:
        raise ApplyError(f"rotate_recipients refused: {exc}") from None
    if list(new.keys.recipients) != list(recipients) or msgspec.structs.replace(
            new, keys=old.keys) != old:
        raise ApplyError(f"{source}: keys.recipients: the edit would change more than the "
                         "recipients; send a full configuration instead")


# --- ops-side tool -------------------------------------------------------------------------

class UsageError(Exception):
    pass


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sync.control",
                                     description="Make signed configuration and commands.")
    sub = parser.add_subparsers(dest="action", required=True)
    sign = sub.add_parser("sign", help="write a signed envelope")
    sign.add_argument("--key", type=Path, required=True, help="ops Ed25519 key (PEM)")
    sign.add_argument("--kind", choices=envelope.KINDS, required=True)
    sign.add_argument("--device", required=True, help="device id, or * for every device")
    sign.add_argument("--version", type=int, help="default: the current Unix time in ms")
    sign.add_argument("--valid-s", type=int, default=3600, help="validity (default 1 h)")
    sign.add_argument("--job", help="job id (commands)")
    sign.add_argument("--command", help=f"one of {', '.join(sorted(envelope.COMMANDS))}")
    sign.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                      help="command argument; VALUE is read as JSON if it parses")
    sign.add_argument("--config-file", type=Path, help="configuration TOML (kind config)")
    sign.add_argument("--policy-file", type=Path, help="policy file (kind policy)")
    sign.add_argument("--policy-sig", type=Path, help="its .sig (kind policy)")
    sign.add_argument("-o", "--output", type=Path, required=True)
    return parser.parse_args(argv)


def _command_args(pairs: Sequence[str]) -> dict[str, Any] | None:
    args: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--arg {pair!r}: expected NAME=VALUE")
        try:
            args[name] = json.loads(value)
        except ValueError:
            args[name] = value
    return args or None


def _read_text(path: Path | None, option: str) -> str:
    if path is None:
        raise UsageError(f"{option} is required for this kind")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") \
            from None


def _payload(args: argparse.Namespace) -> Payload | None:
    if args.kind == "config":
        return Payload(toml=_read_text(args.config_file, "--config-file"))
    if args.kind == "policy":
        return Payload(policy=_read_text(args.policy_file, "--policy-file"),
                       signature=_read_text(args.policy_sig, "--policy-sig").strip())
    return None


def cmd_sign(args: argparse.Namespace) -> int:
    from firmware.keys import KeyFileError
    from firmware.policystore import load_signing_key

    try:
        key = load_signing_key(args.key)
    except KeyFileError as exc:
        raise UsageError(str(exc)) from None
    now_s = int(time.time())
    body = envelope.make_body(
        args.kind, device=args.device, version=args.version or int(time.time() * 1000),
        issued_at=now_s, valid_s=args.valid_s, job_id=args.job, command=args.command,
        args=_command_args(args.arg), payload=_payload(args))
    try:
        data = envelope.sign(body, key)
    except (Rejected, ValueError) as exc:
        raise UsageError(f"envelope refused: {exc}") from None
    try:
        atomic_write(args.output, data, 0o644)
    except OSError as exc:
        sys.stderr.write(f"{args.output}: cannot write: {exc.strerror or exc}\n")
        return 1
    sys.stdout.write(f"{args.output}: {args.kind} for {args.device}, version {body.version}, "
                     f"valid until {iso_utc(body.not_after)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return cmd_sign(args)
    except (UsageError, msgspec.ValidationError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
