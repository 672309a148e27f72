"""The recorder daemon: one thread per line, the main thread for signals, checkpoints and
the systemd watchdog.

Threads: each line thread owns its backend, its call engine and its recorder (audio
writes and fdatasync happen there); all threads share one :class:`Catalogue` whose
writes are serialised by its lock. The main thread never touches audio.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import os
import resource
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from drivers.clock import Clock
from drivers.dsp.events import Detector
from drivers.line import LineBackend, LineClosed, LineError
from drivers.registry import open_line
from firmware import __version__
from firmware.agecrypt import Recipient
from firmware.catalogue import Catalogue, needs_migration
from firmware.config import Config
from firmware.engine import CallEngine, EngineLimits
from firmware.gate import Codes
from firmware.ids import Uuid7Factory
from firmware.keys import load_or_create_signing_key
from firmware.policy import PolicyHook
from firmware.prompts import BUILT_PROMPTS_DIR, PromptError, PromptSet, beep_tone
from firmware.recorder import CallRecorder, RecorderSettings, recover_interrupted
from firmware.retention import apply_retention
from firmware.sdnotify import Notifier

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 0.2
M_ARENA_MAX = -8  # glibc <malloc.h>: mallopt() parameter, the most malloc arenas


class ApplianceError(Exception):
    """The appliance cannot start or had to stop (one-line message)."""


def default_detectors(country: str) -> list[Detector]:
    """The live detectors every line runs: digits, caller ID, tones, voice, answer."""
    from drivers.dsp.analyzer import LineAnalyzer

    return [LineAnalyzer(country)]


@dataclass
class LineRunner:
    line: LineBackend
    engine: CallEngine
    recorder: CallRecorder
    thread: threading.Thread | None = None
    error: str | None = None
    items: int = 0
    done: threading.Event = field(default_factory=threading.Event)


class Appliance:
    """Everything ``edge-recorder run`` runs, with its clock and policy injected."""

    def __init__(self, config: Config, *, clock: Clock, policy: PolicyHook | None = None,
                 detectors: Callable[[str], Sequence[Detector]] = default_detectors,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.clock = clock
        self.policy: PolicyHook | None = policy  # None: the installed policy (at start)
        self.detectors = detectors
        self.notifier = notifier or Notifier()
        self.stop_event = threading.Event()
        self.ids = Uuid7Factory(clock)
        self.catalogue: Catalogue | None = None
        self.runners: list[LineRunner] = []
        self._key = None
        self._languages: list[str] = ["en"]  # prompt languages, from the policy at start

    # --- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        _one_malloc_arena()
        for folder in (cfg.data_dir, cfg.recordings_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._key = load_or_create_signing_key(cfg.device_key_path)
        self._migrate_apart()
        self.catalogue = Catalogue(cfg.catalogue_path, clock=self.clock, device_id=cfg.device_id)
        recovered = recover_interrupted(self.catalogue)
        with self.catalogue.transaction() as tx:
            tx.audit("device.started", cfg.device_id, firmware=__version__,
                     config_sha256=_config_hash(cfg), recovered=len(recovered),
                     lines=[line.id for line in cfg.lines])
        self._load_policy()
        prompts = self._load_prompts()
        recipients = [Recipient.parse(r) for r in cfg.keys.recipients]
        codes = Codes(start=cfg.codes.start, pause=cfg.codes.pause, resume=cfg.codes.resume,
                      objection=cfg.codes.objection, max_gap_s=cfg.codes.max_gap_s)
        settings = RecorderSettings(device_id=cfg.device_id, jurisdiction=cfg.jurisdiction,
                                    recordings_dir=cfg.recordings_dir, recipients=recipients,
                                    flush_interval_s=cfg.limits.flush_interval_s, codes=codes)
        limits = EngineLimits(ring_timeout_s=cfg.limits.ring_timeout_s,
                              glare_window_s=cfg.limits.glare_window_s,
                              max_segment_s=cfg.limits.max_segment_s)
        for line_cfg in cfg.lines:
            line = open_line(line_cfg.backend, line_cfg.id, line_cfg.options, clock=self.clock,
                             country=cfg.line_country(line_cfg))
            assert self.policy is not None
            recorder = CallRecorder(self.catalogue, self.policy, settings, clock=self.clock,
                                    new_id=self.ids.new, player=line.play, prompts=prompts,
                                    tone=beep_tone)
            engine = CallEngine(line_cfg.id, recorder, clock=self.clock, new_id=self.ids.new,
                                limits=limits,
                                detectors=self.detectors(cfg.line_country(line_cfg)))
            self.runners.append(LineRunner(line, engine, recorder))
        _release_start_up_memory()
        for runner in self.runners:
            runner.thread = threading.Thread(target=self._line_loop, args=(runner,),
                                             name=f"line-{runner.line.line_id}", daemon=True)
            runner.thread.start()
        self.notifier.ready()
        log.info("appliance %s started: %d line(s)", cfg.device_id, len(self.runners))

    def _load_policy(self) -> None:
        """The compliance policy, unless one was injected: the highest valid version of the
        built-in and installed policy files. Without a valid policy for the jurisdiction
        nothing is recorded, and the audit trail and the log say so (the alert)."""
        assert self.catalogue is not None
        cfg = self.config
        if self.policy is not None:
            return
        from firmware.compliance import CompliancePolicy, SitePolicy
        from firmware.policystore import load_active_policy

        active, problems = load_active_policy(cfg)
        with self.catalogue.transaction() as tx:
            for problem in problems:
                log.error("policy: %s", problem)
                tx.audit("policy.rejected", cfg.device_id, problem=problem)
            if active is None or cfg.jurisdiction not in active.jurisdictions():
                log.error("ALERT: no valid compliance policy for %s: nothing will be recorded",
                          cfg.jurisdiction)
                tx.audit("policy.missing", cfg.device_id, jurisdiction=cfg.jurisdiction,
                         alert=True)
            else:
                tx.audit("policy.active", cfg.device_id, version=active.version,
                         sha256=active.sha256, jurisdiction=cfg.jurisdiction)
        self.policy = CompliancePolicy(active, cfg.jurisdiction, SitePolicy.from_config(cfg))
        if active is not None and cfg.jurisdiction in active.jurisdictions():
            rule = active.rule(cfg.jurisdiction, "inbound")
            self._languages = [cfg.policy.language] if cfg.policy.language else list(
                rule.languages)

    def _load_prompts(self) -> PromptSet:
        """The prompts of the site's languages (and their fallbacks) only: each language
        holds ~100 kB of audio. A damaged installed prompt stops the start with its name."""
        try:
            return PromptSet.load([self.config.prompts_dir, BUILT_PROMPTS_DIR],
                                  languages=self._languages)
        except PromptError as exc:
            raise ApplianceError(f"prompts: {exc}") from None

    def _migrate_apart(self) -> None:
        """Create or upgrade the catalogue schema in a short-lived child process.

        Migrations run on sqlite-utils, whose modules would stay in the daemon for good
        (3.5 MB more at the 4-line peak of bench/run.py, against a 60 MB budget). The
        child is forked before the daemon opens any database or starts a line thread,
        and exits when the schema is current; the daemon's own open below then finds
        nothing to migrate. If the child fails, that open migrates again in-process
        and reports the error.
        """
        cfg = self.config
        if not hasattr(os, "fork") or not needs_migration(cfg.catalogue_path):
            return
        pid = os.fork()
        if pid == 0:  # the child: migrate, close, leave without running any exit handler
            code = 1
            try:
                Catalogue(cfg.catalogue_path, clock=self.clock, device_id=cfg.device_id).close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            log.info("catalogue migration in a child process failed (wait status %d); "
                     "migrating in the daemon", status)

    def run(self, *, until_lines_end: bool = False) -> int:
        """Start, serve until stopped (or until every line has ended), stop. Exit code."""
        self.start()
        next_checkpoint = self.clock.monotonic() + self.config.limits.checkpoint_interval_s
        tick = self.notifier.watchdog_interval_s or 1.0
        while not self.stop_event.wait(min(tick, 1.0)):
            self.notifier.watchdog()
            if self.clock.monotonic() >= next_checkpoint:
                self.checkpoint()
                self.retention()
                next_checkpoint = self.clock.monotonic() + self.config.limits.checkpoint_interval_s
            if any(r.error for r in self.runners):
                break
            if until_lines_end and all(r.done.is_set() for r in self.runners):
                break
        return self.stop()

    def stop(self) -> int:
        self.notifier.stopping()
        self.stop_event.set()
        for runner in self.runners:
            if runner.thread is not None:
                runner.thread.join(timeout=30)
        errors = [f"line {r.line.line_id}: {r.error}" for r in self.runners if r.error]
        if self.catalogue is not None:
            with self.catalogue.transaction() as tx:
                tx.audit("device.stopped", self.config.device_id,
                         errors=errors, firmware=__version__)
            self.checkpoint()
            self.catalogue.close()
            self.catalogue = None
        for error in errors:
            log.error("%s", error)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        log.info("stopped: peak_rss_kib=%d cpu_s=%.2f", _peak_rss_kib(),
                 usage.ru_utime + usage.ru_stime)
        return 1 if errors else 0

    def retention(self) -> None:
        """Delete the recordings due under their retention date that the central store
        has confirmed (firmware.retention)."""
        if self.catalogue is not None:
            apply_retention(self.catalogue, self.clock)

    def checkpoint(self) -> None:
        if self.catalogue is not None and self._key is not None:
            self.catalogue.checkpoint(self._key)

    # --- the line thread ---------------------------------------------------------------
    def _line_loop(self, runner: LineRunner) -> None:
        line, engine = runner.line, runner.engine
        try:
            with line:
                while not self.stop_event.is_set():
                    item = line.read(READ_TIMEOUT_S)
                    if item is not None:
                        engine.feed(item)
                        runner.items += 1
        except LineClosed:
            log.info("line %s: ended", line.line_id)
        except LineError as exc:
            runner.error = str(exc)
            log.error("line %s: %s", line.line_id, exc)
        except Exception as exc:  # the daemon must close recordings whatever happened
            runner.error = f"internal error: {exc}"
            log.exception("line %s: internal error", line.line_id)
        finally:
            engine.shutdown("shutdown" if runner.error is None else "line_error")
            runner.done.set()


def _one_malloc_arena() -> None:
    """Let every thread allocate from glibc's main malloc arena.

    By default glibc gives each thread that allocates its own arena (up to 8 per core),
    and each keeps the free space of its own peaks: with four lines that held about
    3 MB more at the peak than one shared arena (measured with bench/run.py). The line
    threads spend most of their time in numpy and syscalls and allocate under the GIL,
    so they do not wait on the shared arena's lock. No effect where the C library is
    not glibc.
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or mallopt(M_ARENA_MAX, 1) != 1:
        log.debug("mallopt(M_ARENA_MAX) not available: one malloc arena per thread")


def _release_start_up_memory() -> None:
    """Hand the start-up garbage (the parsed policy file's dictionaries, the prompt WAV
    reads) back to the OS before the line threads start, so their peaks stack on a lower
    base: gc, then glibc's malloc_trim. No effect where the C library is not glibc."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _peak_rss_kib() -> int:
    """VmHWM of this process image (ru_maxrss would carry a pre-exec peak over)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _config_hash(cfg: Config) -> str:
    try:
        return hashlib.sha256(Path(cfg.source).read_bytes()).hexdigest()
    except OSError:
        return ""


def install_signal_handlers(app: Appliance) -> None:
    """SIGTERM/SIGINT stop the appliance cleanly (recordings closed, checkpoint signed)."""
    import signal

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        app.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    os.umask(0o077)
