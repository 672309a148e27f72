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


# These tests are about recording mechanics: every connected call is kept whole (the DE
# policy's consent gate is tested with the other modes in test_compliance_modes.py).
KEEP_WHOLE_CALLS = ('[policy.overrides.inbound]\nmode = "log_basis"\n'
                    '[policy.overrides.outbound]\nmode = "log_basis"\n')


def write_config(tmp: Path, scenario: Path, recipient: str, *, lines: int = 1,
                 extra: str = "", policy: str = KEEP_WHOLE_CALLS,
                 jurisdiction: str = "DE") -> Path:
    text = (f'device_id = "test-1"\nsite = "t"\njurisdiction = "{jurisdiction}"\n'
            f'[storage]\ndata_dir = "{tmp / "data"}"\n'
            f'[keys]\nrecipients = ["{recipient}"]\n{extra}\n{policy}\n')
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
    call_rows = catalogue.calls()
    assert len(call_rows) == len(truths), [(r["direction"], r["end_reason"]) for r in call_rows]
    recorded = {r["call_id"]: r for r in rows if r["segment"] == 0}
    for call_row, truth in zip(call_rows, truths, strict=True):
        assert call_row["direction"] == truth.direction
        assert call_row["end_reason"] == expected_end(truth)
        # kept whole from its start once connected; an unconnected call leaves nothing
        assert (call_row["id"] in recorded) == truth.answered, call_row
        if not truth.answered:
            assert call_row["answered_offset_s"] is None
    for row, truth in [(recorded[c["id"]], t) for c, t in zip(call_rows, truths, strict=True)
                       if t.answered]:
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
        assert rec.complete
        assert all(g.reason == "paused" for g in rec.gaps)  # only the dealer's pauses
        start = rec.start_sample
        expected = alaw_decode(alaw_encode(line_pcm[start:start + len(rec.pcm)]))
        for gap in rec.gaps:  # nothing of a pause is stored
            expected[gap.start_sample - start:gap.end_sample - start] = 0
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
