"""On-device self-tests run before the lock: line, MQTT, clock, disk.

Each test takes the validated config and a time budget and returns a TestResult; none
raises for a failed check (the result says what failed).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import shutil
import threading
import time
from collections.abc import Callable

import numpy as np

from firmware.config import Config
from provisioning.codec import TestResult

log = logging.getLogger(__name__)

# A tap hears at least line noise; a digital zero for seconds means a dead input.
# ITU-T G.711 idle noise is around -70 dBm0; -90 dBFS is below any live line.
MIN_LINE_DBFS = -90.0
LINE_SAMPLE_S = 2.0  # line time read for the level and the ring/hook inputs
# Firmware of this series was built after this date: a clock before it was never set.
EARLIEST_PLAUSIBLE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
FULL_SCALE = 32768.0

SelfTest = Callable[[Config, float], TestResult]


def line_test(config: Config, timeout_s: float) -> TestResult:
    """Every configured line opens through its backend and delivers audio and signals."""
    from drivers.clock import SystemClock
    from drivers.line import AudioFrame, LineClosed, LineError, SignalEvent
    from drivers.registry import open_line

    details = []
    for line in config.lines:
        peak_dbfs, signals = -math.inf, set()
        try:
            with open_line(line.backend, line.id, line.options, clock=SystemClock(),
                           country=config.line_country(line)) as backend:
                read_s, deadline = 0.0, time.monotonic() + timeout_s
                while read_s < LINE_SAMPLE_S and time.monotonic() < deadline:
                    item = backend.read(timeout_s=0.1)
                    if isinstance(item, AudioFrame):
                        read_s += len(item.pcm) / 8000
                        peak_dbfs = max(peak_dbfs, _dbfs(item.pcm))
                    elif isinstance(item, SignalEvent):
                        signals.add(item.signal.value)
                status = backend.status()
        except LineClosed:
            status = {}
        except (LineError, OSError) as exc:
            return TestResult(name="line", ok=False, detail=f"line {line.id}: {exc}")
        if peak_dbfs < MIN_LINE_DBFS:
            return TestResult(name="line", ok=False,
                              detail=f"line {line.id}: no signal (peak {peak_dbfs:.0f} dBFS)")
        details.append(f"{line.id}: peak {peak_dbfs:.1f} dBFS, hook {status.get('hook', '?')}, "
                       f"signals {sorted(signals) or 'none'}")
    return TestResult(name="line", ok=True, detail="; ".join(details))


def _dbfs(pcm: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(pcm.astype(np.float64))))) if pcm.size else 0.0
    return 20 * math.log10(rms / FULL_SCALE) if rms > 0 else -math.inf


def mqtt_test(config: Config, timeout_s: float) -> TestResult:
    """A TLS MQTT 5 connection with the installed certificate is accepted by the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    sync = config.sync
    if sync is None:
        return TestResult(name="mqtt", ok=False, detail="no [sync] settings installed")
    done, outcome = threading.Event(), {"reason": "no answer"}

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: object,
                   _p: object) -> None:
        outcome["reason"] = str(reason)
        outcome["ok"] = "yes" if not getattr(reason, "is_failure", True) else ""
        done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=config.device_id,
                         protocol=mqtt.MQTTv5)
    client.on_connect = on_connect
    try:
        client.tls_set(ca_certs=str(config.resolve_path(sync.ca_file)),
                       certfile=str(config.resolve_path(sync.cert_file)),
                       keyfile=str(config.resolve_path(sync.key_file)))
        client.connect(sync.host, sync.port, keepalive=30, clean_start=True)
    except (OSError, ValueError) as exc:
        return TestResult(name="mqtt", ok=False, detail=f"{sync.host}:{sync.port}: {exc}")
    client.loop_start()
    try:
        done.wait(timeout_s)
    finally:
        client.disconnect()
        client.loop_stop()
    where = f"{sync.host}:{sync.port}"
    if outcome.get("ok"):
        return TestResult(name="mqtt", ok=True, detail=f"{where}: connected as {config.device_id}")
    return TestResult(name="mqtt", ok=False, detail=f"{where}: {outcome['reason']}")


def clock_test(config: Config, _timeout_s: float, now: dt.datetime | None = None) -> TestResult:
    now = now or dt.datetime.now(dt.UTC)
    if now < EARLIEST_PLAUSIBLE:
        return TestResult(name="clock", ok=False,
                          detail=f"clock reads {now:%Y-%m-%d}, before {EARLIEST_PLAUSIBLE:%Y}: "
                                 "not set (no RTC, no NTP yet?)")
    return TestResult(name="clock", ok=True, detail=f"{now:%Y-%m-%dT%H:%M:%SZ}")


def disk_test(config: Config, _timeout_s: float) -> TestResult:
    """The data partition has more than ``storage.min_free_mb`` free."""
    path = config.data_dir
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return TestResult(name="disk", ok=False, detail=f"{path}: {exc.strerror}")
    free_mb = usage.free / 1e6
    ok = free_mb >= config.storage.min_free_mb
    return TestResult(name="disk", ok=ok,
                      detail=f"{path}: {free_mb:.0f} MB free (minimum "
                             f"{config.storage.min_free_mb} MB)")


SELFTESTS: dict[str, SelfTest] = {
    "line": line_test, "mqtt": mqtt_test, "clock": clock_test, "disk": disk_test,
}
