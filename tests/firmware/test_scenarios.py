"""Whole-system scenario replay: a scenario file in, the expected calls, recordings and audit out.

The appliance runs in-process on the simulated line (unpaced). Everything is checked
against the simulator's ground truth: directions, numbers recovered from the audio by the
detectors, answer and end, and the decrypted audio sample for sample.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from drivers.clock import SystemClock
from drivers.sim.backend import CallTruth, render
from drivers.sim.scenario import load_scenario
from firmware.agecrypt import Identity
from firmware.audit import verify_audit
from firmware.catalogue import Catalogue
from firmware.codec import alaw_decode, alaw_encode
from firmware.config import load_config
from firmware.daemon import Appliance
from firmware.keys import load_public_key
from firmware.recfile import decrypt_recording

REPO = Path(__file__).resolve().parents[2]
SCENARIOS = [*sorted((REPO / "examples" / "scenarios").glob("*.toml")),
             REPO / "examples" / "dealer-day.toml"]


def write_config(tmp: Path, scenario: Path, recipient: str, *, lines: int = 1,
                 extra: str = "") -> Path:
    text = (f'device_id = "test-1"\nsite = "t"\njurisdiction = "DE"\n'
            f'[storage]\ndata_dir = "{tmp / "data"}"\n'
            f'[keys]\nrecipients = ["{recipient}"]\n{extra}\n')
    for index in range(lines):
        text += (f'[[lines]]\nid = "line{index + 1}"\nbackend = "sim"\n[lines.options]\n'
                 f'scenario = "{scenario}"\nspeed = 0.0\n')
    path = tmp / "config.toml"
    path.write_text(text)
    return path


def run_appliance(config_path: Path) -> Catalogue:
    config = load_config(config_path)
    assert Appliance(config, clock=SystemClock()).run(until_lines_end=True) == 0
    return Catalogue.read_only(config.catalogue_path)


def expected_end(truth: CallTruth) -> str:
    if truth.direction == "inbound":
        return "hangup" if truth.answered else "no_answer"
    if truth.answered:
        return "hangup"
    return "hangup_while_dialing" if truth.dialed else "hangup_before_dialing"


@pytest.mark.parametrize("scenario_path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_replay(tmp_path: Path, scenario_path: Path) -> None:
    central = Identity.generate()
    catalogue = run_appliance(write_config(tmp_path, scenario_path, str(central.recipient)))
    scenario = load_scenario(scenario_path)
    line_pcm, _events, truths = render(scenario)
    rows = list(reversed(catalogue.recordings()))
    calls = [r for r in rows if r["segment"] == 0]
    assert len(calls) == len(truths), [(r["direction"], r["end_reason"]) for r in rows]
    for row, truth in zip(calls, truths, strict=True):
        assert row["direction"] == truth.direction
        if truth.direction == "inbound":
            assert row["caller_number"] == truth.caller
        elif truth.dialed:
            assert row["dialed_number"] == truth.dialed[: len(row["dialed_number"] or "")]
            assert row["dialed_number"] == truth.dialed
        call_start = decrypt_recording(Path(row["path"]), [central]).start_sample
        answered_at = None if row["answered_offset_s"] is None else (
            call_start / 8000 + row["answered_offset_s"])
        if not truth.answered:
            assert answered_at is None
        elif (truth.direction == "inbound"  # the dealer's hook-off
              or scenario.calls[truth.index].answer_signal == "polarity"):  # a reversal
            assert answered_at == pytest.approx(truth.answer_sample / 8000, abs=0.03)
        else:  # heard in the audio: the customer's first word, within 0.5 s
            assert answered_at == pytest.approx(truth.far_speech_sample / 8000, abs=0.5)
        assert row["end_reason"] == expected_end(truth)
        assert row["state"] == "complete"
    for row in rows:
        rec = decrypt_recording(Path(row["path"]), [central])
        assert rec.complete and not rec.gaps
        start = rec.start_sample
        expected = alaw_decode(alaw_encode(line_pcm[start:start + len(rec.pcm)]))
        assert len(rec.pcm) > 0 and np.array_equal(rec.pcm, expected)
    config = load_config(tmp_path / "config.toml")
    report = verify_audit(config.catalogue_path,
                          load_public_key(Path(f"{config.device_key_path}.pub")),
                          device_id="test-1", check_files=True)
    assert report.ok, report.message


def test_long_off_hook_rolls_segments_without_losing_audio(tmp_path: Path) -> None:
    central = Identity.generate()
    scenario = REPO / "examples" / "scenarios" / "long-offhook.toml"
    catalogue = run_appliance(write_config(tmp_path, scenario, str(central.recipient),
                                           extra="[limits]\nmax_segment_s = 120"))
    rows = sorted(catalogue.recordings(), key=lambda r: r["segment"])
    assert len({r["call_id"] for r in rows}) == 1
    assert [r["segment"] for r in rows] == list(range(len(rows))) and len(rows) >= 5
    recs = [decrypt_recording(Path(r["path"]), [central]) for r in rows]
    for before, after in itertools.pairwise(recs):
        assert before.start_sample + len(before.pcm) == after.start_sample  # contiguous
    assert all(r["end_reason"] for r in rows)


def test_four_lines_in_parallel(tmp_path: Path) -> None:
    central = Identity.generate()
    scenario = REPO / "examples" / "scenarios" / "back-to-back.toml"
    catalogue = run_appliance(write_config(tmp_path, scenario, str(central.recipient), lines=4))
    rows = catalogue.recordings()
    per_line = {line: [r for r in rows if r["line_id"] == line] for line in
                ("line1", "line2", "line3", "line4")}
    counts = {line: len(v) for line, v in per_line.items()}
    assert len(set(counts.values())) == 1 and counts["line1"] > 0, counts
    head = catalogue.head()
    assert head.count == len(catalogue.audit_entries())
