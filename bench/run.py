"""Benchmarks of the appliance core. Run: `make bench` (or `.venv/bin/python bench/run.py`).

1. CPU seconds per hour of recorded audio per line: engine + detectors + A-law +
   encryption + fsync'ed writes + catalogue, fed from pre-rendered simulated line items
   (synthesis is not counted). Target <= 1 % of one core per line.
2. Peak RSS of `edge-recorder run` with 4 simulated lines. Target <= 60 MB.
3. Bytes written to the block device per byte of recorded audio (write amplification),
   from /sys/dev/block/<dev>/stat around a recording run, minus the same interval idle.
   Target <= 2.6x.

Prints a Markdown table and writes bench/out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drivers.clock import SystemClock  # noqa: E402
from drivers.line import AudioFrame, LineClosed  # noqa: E402
from drivers.registry import open_line  # noqa: E402
from firmware.agecrypt import Identity  # noqa: E402
from firmware.catalogue import Catalogue  # noqa: E402
from firmware.daemon import default_detectors  # noqa: E402
from firmware.engine import CallEngine  # noqa: E402
from firmware.ids import Uuid7Factory  # noqa: E402
from firmware.policy import PlaceholderPolicy  # noqa: E402
from firmware.recorder import CallRecorder, RecorderSettings  # noqa: E402

OUT = REPO / "bench" / "out"


def scenario_text(call_minutes: float, calls: int, gap_s: float = 20.0) -> str:
    """A line that is busy most of the time: alternating inbound and outbound calls."""
    parts = ['country = "DE"\nseed = 11\ntail_s = 1.0\n']
    for index in range(calls):
        if index % 2:
            parts.append(f'[[calls]]\ndirection = "outbound"\ngap_s = {gap_s}\n'
                         f'dialed = "02219876{index:03d}"\ntalk_s = {call_minutes * 60}\n')
        else:
            parts.append(f'[[calls]]\ndirection = "inbound"\ngap_s = {gap_s}\n'
                         f'caller = "08912345{index:03d}"\nrings = 2\n'
                         f'talk_s = {call_minutes * 60}\n')
    return "\n".join(parts)


def render_items(scenario: Path) -> list[object]:
    line = open_line("sim", "bench", {"scenario": str(scenario), "speed": 0.0},
                     clock=SystemClock(), country="DE")
    items: list[object] = []
    with line:
        try:
            while True:
                item = line.read(None)
                if item is not None:
                    items.append(item)
        except LineClosed:
            pass
    return items


def bench_cpu(work: Path, detectors: bool) -> dict[str, float]:
    scenario = work / "cpu.toml"
    scenario.write_text(scenario_text(call_minutes=5, calls=12))
    items = render_items(scenario)
    frames = sum(1 for i in items if isinstance(i, AudioFrame))
    line_s = frames * 0.02
    clock = SystemClock()
    catalogue = Catalogue(work / f"cpu-{detectors}.db", clock=clock, device_id="bench")
    ids = Uuid7Factory(clock)
    recordings = work / f"rec-{detectors}"
    recordings.mkdir()
    settings = RecorderSettings(device_id="bench", jurisdiction="DE", recordings_dir=recordings,
                                recipients=[Identity.generate().recipient])
    recorder = CallRecorder(catalogue, PlaceholderPolicy(), settings, clock=clock, new_id=ids.new)
    engine = CallEngine("bench", recorder, clock=clock, new_id=ids.new,
                        detectors=default_detectors("DE") if detectors else [])
    start = time.process_time()
    for item in items:
        engine.feed(item)  # type: ignore[arg-type]
    engine.shutdown()
    cpu_s = time.process_time() - start
    catalogue.close()
    recorded_s = recorder_audio_s(work / f"cpu-{detectors}.db")
    return {"line_s": line_s, "recorded_s": recorded_s, "cpu_s": cpu_s,
            "cpu_s_per_line_hour": cpu_s / line_s * 3600,
            "core_percent": cpu_s / line_s * 100}


def recorder_audio_s(db: Path) -> float:
    catalogue = Catalogue.read_only(db)
    try:
        return sum(r.get("audio_s") or 0 for r in catalogue.recordings())
    finally:
        catalogue.close()


def write_config(work: Path, lines: int, scenario: Path, name: str) -> Path:
    recipient = Identity.generate().recipient
    text = [f'device_id = "bench"\nsite = "bench"\njurisdiction = "DE"\n'
            f'[storage]\ndata_dir = "{work / name}"\n[keys]\nrecipients = ["{recipient}"]\n'
            # every connected call kept whole (the DE consent gate would keep almost nothing)
            '[policy.overrides.inbound]\nmode = "log_basis"\n'
            '[policy.overrides.outbound]\nmode = "log_basis"\n']
    for index in range(lines):
        text.append(f'[[lines]]\nid = "line{index + 1}"\nbackend = "sim"\n[lines.options]\n'
                    f'scenario = "{scenario}"\nspeed = 0.0\n')
    path = work / f"{name}.config.toml"
    path.write_text("\n".join(text))
    return path


def run_daemon(config: Path) -> tuple[float, float]:
    """Run the recorder until its lines end; return (wall seconds, its own peak RSS in MB).

    The daemon logs its peak RSS at stop; the parent's RUSAGE_CHILDREN would count the
    parent's pages that fork copied before exec.
    """
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "firmware.cli", "run", "--config",
                           str(config), "--until-lines-end"], check=True, cwd=REPO,
                          stderr=subprocess.PIPE, text=True)
    wall_s = time.monotonic() - start
    match = re.search(r"peak_rss_kib=(\d+)", done.stderr)
    if match is None:
        raise RuntimeError("the daemon did not log its peak RSS")
    return wall_s, int(match.group(1)) / 1024


def bench_rss(work: Path) -> dict[str, float]:
    scenario = work / "rss.toml"
    scenario.write_text(scenario_text(call_minutes=3, calls=6, gap_s=5))
    wall_s, peak_mb = run_daemon(write_config(work, 4, scenario, "rss"))
    _one_s, one_mb = run_daemon(write_config(work, 1, scenario, "rss1"))
    return {"lines": 4, "peak_rss_mb": peak_mb, "wall_s": wall_s,
            "peak_rss_mb_one_line": one_mb}


def sectors_written(path: Path) -> int:
    """Sectors written so far to the block device holding ``path`` (field 7 of its stat)."""
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    if not stat.exists():
        raise RuntimeError(f"{stat}: not found; cannot measure writes here")
    return int(stat.read_text().split()[6])


def private_ext4(work: Path) -> Path | None:
    """A fresh ext4 file system on a loop device (as on the appliance's SD card, noatime),
    so the count holds only the recorder's writes. None when this machine cannot mount."""
    image, mount = work / "sd.img", work / "sd"
    mount.mkdir()
    with image.open("wb") as f:
        f.truncate(512 * 1024 * 1024)
    # Initialise inode tables and journal now, not lazily while we measure.
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                           "lazy_itable_init=0,lazy_journal_init=0", str(image)],
                          capture_output=True, check=False)
    if made.returncode != 0 or subprocess.run(
            ["mount", "-o", "loop,noatime", str(image), str(mount)], capture_output=True,
            check=False).returncode != 0:
        return None
    return mount


def bench_writes(work: Path) -> dict[str, object]:
    scenario = work / "writes.toml"
    scenario.write_text(scenario_text(call_minutes=10, calls=3, gap_s=2))
    mount = private_ext4(work)
    base = mount if mount is not None else work
    config = write_config(base, 1, scenario, "writes")
    try:
        os.sync()
        before = sectors_written(base)
        run_daemon(config)
        os.sync()
        written = (sectors_written(base) - before) * 512
        audio_s = recorder_audio_s(base / "writes" / "catalogue.db")
        files = sum(p.stat().st_size for p in (base / "writes" / "recordings").glob("*.rec"))
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], check=True)
    audio_bytes = audio_s * 8000
    return {"device": "private ext4 on loop" if mount is not None else "shared device",
            "audio_s": audio_s, "audio_bytes": audio_bytes, "file_bytes": files,
            "device_bytes": written, "amplification": written / audio_bytes}


def bench_dsp(work: Path) -> dict[str, float]:
    """Analysis speed on an hour of mixed line audio, against multimon-ng -a DTMF.

    Three figures for us: the analysis alone (CPU of the detectors, as `analyze` feeds
    them: 60 s batches), the whole `edge-recorder analyze --json` command (CPU of the
    process, with Python start-up and the WAV reading), and the live detectors fed 20 ms
    frames. multimon-ng gets the same audio resampled to the 22050 Hz it needs.
    """
    import shutil
    import wave

    from drivers.dsp.analyzer import FILE_BATCH_SAMPLES, LineAnalyzer
    from drivers.sim.backend import render
    from drivers.sim.scenario import load_scenario

    scenario = work / "dsp.toml"
    scenario.write_text(scenario_text(call_minutes=5, calls=12))
    pcm, _events, _truth = render(load_scenario(scenario))
    audio_s = len(pcm) / 8000
    wav_path = work / "dsp.wav"
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(pcm.astype("<i2").tobytes())

    def detectors_cpu_s(batch: int | None, frame: int) -> tuple[float, int]:
        analyzer = LineAnalyzer("DE", batch_samples=batch)
        start = time.process_time()
        found = 0
        for offset in range(0, len(pcm), frame):
            found += len(analyzer.feed(offset, pcm[offset:offset + frame]))
        return time.process_time() - start, found

    ours_s, found = min(detectors_cpu_s(FILE_BATCH_SAMPLES, FILE_BATCH_SAMPLES)
                        for _ in range(3))
    live_s, _ = detectors_cpu_s(None, 160)
    cli_s = min(child_cpu_s([str(REPO / ".venv" / "bin" / "edge-recorder"), "analyze",
                             "--country", "DE", "--json", str(wav_path)]) for _ in range(3))
    result: dict[str, float] = {
        "audio_s": audio_s, "events": found,
        "analysis_cpu_s": ours_s, "analysis_realtime_factor": audio_s / ours_s,
        "cli_cpu_s": cli_s, "cli_realtime_factor": audio_s / cli_s,
        "live_cpu_s": live_s, "live_core_percent_per_line": live_s / audio_s * 100}
    if shutil.which("multimon-ng") and shutil.which("sox"):
        raw8 = work / "dsp8.raw"
        raw22 = work / "dsp22.raw"
        raw8.write_bytes(pcm.astype("<i2").tobytes())
        subprocess.run(["sox", "-V1", "-t", "raw", "-r", "8000", "-e", "signed", "-b", "16",
                        "-c", "1", str(raw8), "-t", "raw", "-r", "22050", "-e", "signed",
                        "-b", "16", str(raw22)], check=True)
        theirs_s = min(child_cpu_s(["multimon-ng", "-q", "-a", "DTMF", "-t", "raw",
                                    str(raw22)]) for _ in range(3))
        result["multimon_cpu_s"] = theirs_s
        result["multimon_realtime_factor"] = audio_s / theirs_s
        result["analysis_speed_ratio_vs_multimon"] = theirs_s / ours_s
        result["cli_speed_ratio_vs_multimon"] = theirs_s / cli_s
    return result


def child_cpu_s(argv: list[str]) -> float:
    """User + system CPU seconds of one run of ``argv`` (output discarded)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cpu", "rss", "writes", "dsp", "sync", "central",
                                                "provision"],
                        default=None)
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or ''}"
                   f" Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    with tempfile.TemporaryDirectory(prefix="edge-bench-", dir=REPO / "bench") as tmp:
        work = Path(tmp)
        if args.only in (None, "cpu"):
            results["cpu_no_detectors"] = bench_cpu(work, detectors=False)
            results["cpu_with_detectors"] = bench_cpu(work, detectors=True)
        if args.only in (None, "dsp"):
            results["dsp"] = bench_dsp(work)
        if args.only in (None, "rss"):
            results["rss"] = bench_rss(work)
        if args.only in (None, "writes"):
            results["writes"] = bench_writes(work)
        if args.only in (None, "sync"):
            from bench.sync_bench import bench_sync

            results["sync"] = bench_sync()
        if args.only in (None, "central"):
            from bench.central_bench import bench_central

            results["central"] = bench_central()
        if args.only in (None, "provision"):
            from bench.provision_bench import bench_provision

            results["provision"] = bench_provision(work)
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
