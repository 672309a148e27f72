"""Each disclosure mode end to end on the simulated line, through the real appliance.

The simulator renders the line; the appliance plays its prompts and beeps into it (the
sim mixes them in, as a tap would hear them); the central key decrypts the recording.
What the recording must hold is computed from the simulator's ground truth: the line's
own audio, plus exactly the prompt or beep the audit trail says was played, where it says.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drivers.sim.backend import render
from drivers.sim.scenario import load_scenario
from firmware.agecrypt import Identity
from firmware.catalogue import Catalogue
from firmware.codec import alaw_decode, alaw_encode
from firmware.config import load_config
from firmware.prompts import BUILT_PROMPTS_DIR, PromptSet
from firmware.recfile import DecryptedRecording, decrypt_recording
from tests.firmware.test_scenarios import run_appliance, write_config

RATE = 8000
PROMPTS = PromptSet.load([BUILT_PROMPTS_DIR])


def mode_policy(mode: str, direction: str = "inbound") -> str:
    return f'[policy.overrides.{direction}]\nmode = "{mode}"\n'


def scenario(tmp: Path, calls: str) -> Path:
    path = tmp / "scenario.toml"
    path.write_text(f'country = "DE"\nseed = 7\n{calls}')
    return path


def inbound(talk: str, caller: str = "022112345") -> str:
    return (f'[[calls]]\ndirection = "inbound"\ncaller = "{caller}"\ncid = "v23"\n'
            f'rings = 2\ntalk = [{talk}]\n')


def run(tmp: Path, scenario_path: Path, policy: str, extra: str = "",
        jurisdiction: str = "DE") -> tuple[Catalogue, Identity, Path]:
    central = Identity.generate()
    config = write_config(tmp, scenario_path, str(central.recipient), policy=policy,
                          extra=extra, jurisdiction=jurisdiction)
    return run_appliance(config), central, config


def audits(catalogue: Catalogue, kind: str) -> list[dict]:
    return [json.loads(e.data) if isinstance(e.data, str) else dict(e.data)
            for e in catalogue.audit_entries() if e.kind == kind]


def line_audio(scenario_path: Path) -> tuple[np.ndarray, list]:
    pcm, _events, truths = render(load_scenario(scenario_path))
    return pcm, truths


def added(rec: DecryptedRecording, line_pcm: np.ndarray) -> np.ndarray:
    """What the appliance put into the line: the recording minus the line's own audio."""
    own = line_pcm[rec.start_sample:rec.start_sample + len(rec.pcm)].astype(np.int32)
    return rec.pcm.astype(np.int32) - own


def best_alignment(extra: np.ndarray, played: np.ndarray, first: int, last: int
                   ) -> tuple[int, float]:
    """(start, correlation) of ``played`` in ``extra`` at the best start in [first, last]."""
    scores = [(at, float(np.corrcoef(extra[at:at + len(played)], played)[0, 1]))
              for at in range(first, last + 1)]
    return max(scores, key=lambda item: item[1])


def only_recording(catalogue: Catalogue, central: Identity) -> DecryptedRecording:
    rows = catalogue.recordings()
    assert len(rows) == 1, rows
    return decrypt_recording(Path(rows[0]["path"]), [central])


def test_notice_prompt_is_in_the_recording_at_the_answer(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 3.0}, {who = "customer", s = 12.0}'))
    catalogue, central, _ = run(tmp_path, path, mode_policy("notice"))
    line_pcm, (truth,) = line_audio(path)
    (played,) = audits(catalogue, "prompt.played")
    prompt = PROMPTS.get("notice", "de")
    assert (played["name"], played["language"], played["sha256"]) == ("notice", "de", prompt.sha256)
    rec = only_recording(catalogue, central)
    assert rec.start_sample == truth.start_sample  # the whole call is kept
    answer = truth.answer_sample - rec.start_sample
    extra = added(rec, line_pcm).astype(float)
    # it plays from the first 20 ms frame the line reads after the answer
    lag, corr = best_alignment(extra, prompt.pcm.astype(float), answer, answer + 160)
    assert corr > 0.98, (lag, corr)
    assert np.abs(extra[:answer]).max() <= 1100  # before it: only A-law rounding
    assert played["offset_s"] == pytest.approx((truth.answer_sample - truth.start_sample) / RATE,
                                               abs=0.03)


def tone_power(x: np.ndarray, freq_hz: float) -> float:
    n = np.arange(len(x))
    return float(abs(np.dot(x, np.exp(-2j * np.pi * freq_hz * n / RATE))) ** 2 / len(x) ** 2)


def test_notice_beep_every_15_seconds(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 20.0}, {who = "customer", s = 30.0}'))
    catalogue, central, _ = run(tmp_path, path, mode_policy("notice_beep"))
    line_pcm, (truth,) = line_audio(path)
    rec = only_recording(catalogue, central)
    extra = added(rec, line_pcm).astype(float)
    # 50 ms blocks where the added audio is a 1400 Hz tone
    block = 400
    prompt_end = truth.answer_sample - rec.start_sample + len(PROMPTS.get("notice", "de").pcm)
    hot = [i * block for i in range(prompt_end // block + 1, len(extra) // block)
           if tone_power(extra[i * block:(i + 1) * block], 1400.0) > 1e5]
    starts = [s for i, s in enumerate(hot) if i == 0 or s - hot[i - 1] > block]
    assert len(starts) >= 2
    assert starts[0] == pytest.approx(prompt_end + 15 * RATE, abs=0.1 * RATE)
    assert np.diff(starts) == pytest.approx([15 * RATE] * (len(starts) - 1), abs=0.1 * RATE)
    (stopped,) = audits(catalogue, "beep.stopped")
    assert stopped["beeps"] == len(starts)


def consent_scenario(tmp: Path, key_after_s: float, key: str = "1") -> Path:
    prompt_s = len(PROMPTS.get("consent", "de").pcm) / RATE
    wait = prompt_s + key_after_s
    return scenario(tmp, inbound(f'{{who = "dealer", s = {wait:.2f}}}, '
                                 f'{{who = "customer", s = 1.0, keys = "{key}"}}, '
                                 '{who = "customer", s = 6.0}, {who = "dealer", s = 4.0}'))


def test_consent_key_starts_the_recording_and_nothing_before_is_kept(tmp_path: Path) -> None:
    path = consent_scenario(tmp_path, key_after_s=2.0)
    catalogue, central, _ = run(tmp_path, path, mode_policy("consent_gate"))
    line_pcm, (truth,) = line_audio(path)
    (key_at, keys), = truth.key_presses
    assert keys == "1"
    rec = only_recording(catalogue, central)
    # recording starts when the key is heard (its end, within one detector report)
    assert key_at <= rec.start_sample <= key_at + int(0.3 * RATE)
    expected = alaw_decode(alaw_encode(line_pcm[rec.start_sample:rec.start_sample + len(rec.pcm)]))
    assert np.array_equal(rec.pcm, expected)
    events = [g["event"] for g in audits(catalogue, "gate")]
    assert events == ["decided_consent_gate", "consent_key"]
    (played,) = audits(catalogue, "prompt.played")
    assert played["name"] == "consent"


@pytest.mark.parametrize("key", ["", "late"])
def test_no_consent_within_the_timeout_keeps_nothing(tmp_path: Path, key: str) -> None:
    key_after_s = 20.0 if key == "late" else 2.0
    path = (consent_scenario(tmp_path, key_after_s) if key else scenario(
        tmp_path, inbound('{who = "dealer", s = 20.0}, {who = "customer", s = 15.0}')))
    catalogue, _, _ = run(tmp_path, path, mode_policy("consent_gate"))
    assert catalogue.recordings() == []
    gates = audits(catalogue, "gate")
    assert [g["event"] for g in gates] == ["decided_consent_gate", "consent_timeout"]
    assert gates[-1]["action"] == "decline"


def test_manual_mode_records_from_the_dealers_start_code(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 4.0}, '
                                      '{who = "dealer", s = 1.0, keys = "*1"}, '
                                      '{who = "customer", s = 8.0}'))
    catalogue, central, _ = run(tmp_path, path, mode_policy("manual"))
    _, (truth,) = line_audio(path)
    (key_at, _keys), = truth.key_presses
    rec = only_recording(catalogue, central)
    assert key_at + int(0.25 * RATE) <= rec.start_sample <= key_at + int(0.6 * RATE)
    assert audits(catalogue, "prompt.played") == []  # manual mode plays nothing


def test_paused_audio_is_absent_from_the_recording(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 3.0}, '
                                      '{who = "dealer", s = 1.0, keys = "*2"}, '
                                      '{who = "customer", s = 6.0}, '  # card number
                                      '{who = "dealer", s = 1.0, keys = "*3"}, '
                                      '{who = "customer", s = 4.0}'))
    catalogue, central, _ = run(tmp_path, path, mode_policy("log_basis"))
    line_pcm, (truth,) = line_audio(path)
    (pause_at, _), (resume_at, _) = truth.key_presses
    rec = only_recording(catalogue, central)
    (gap,) = rec.gaps
    assert gap.reason == "paused"
    assert pause_at < gap.start_sample <= pause_at + int(0.6 * RATE)
    assert resume_at < gap.end_sample <= resume_at + int(0.6 * RATE)
    inside = rec.pcm[gap.start_sample - rec.start_sample:gap.end_sample - rec.start_sample]
    assert not inside.any()  # nothing of the customer's card details
    speech = line_pcm[gap.start_sample:gap.end_sample]
    assert np.abs(speech).max() > 1000  # ...which was there on the line
    (row,) = catalogue.recordings()  # the file holds the call minus the pause
    assert row["audio_s"] == pytest.approx((len(rec.pcm) - (gap.end_sample - gap.start_sample)) / RATE)
    (resumed,) = [g for g in audits(catalogue, "gate") if g["event"] == "resume_code"]
    assert resumed["paused_s"] == pytest.approx((gap.end_sample - gap.start_sample) / RATE, abs=0.01)


def test_objection_erases_the_call_everywhere(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 3.0}, '
                                      '{who = "dealer", s = 1.0, keys = "*9"}, '
                                      '{who = "customer", s = 4.0}'))
    catalogue, _, _ = run(tmp_path, path, mode_policy("log_basis"))
    (row,) = catalogue.recordings()
    assert row["deleted_at"] and row["erase_reason"] == "objection"
    assert not Path(row["path"]).exists()
    kinds = {(o["kind"], o["ref"]) for o in catalogue.outbox_pending()}
    assert ("erasure", row["id"]) in kinds and ("recording", row["id"]) not in kinds
    (erased,) = audits(catalogue, "recording.erased")
    assert erased["reason"] == "objection"


def outbound(dialed: str) -> str:
    return (f'[[calls]]\ndirection = "outbound"\ndialed = "{dialed}"\n'
            'talk = [{who = "customer", s = 3.0}, {who = "dealer", s = 3.0}]\n')


def test_emergency_call_gets_no_prompt_and_no_recording(tmp_path: Path) -> None:
    path = scenario(tmp_path, outbound("112"))
    catalogue, _, _ = run(tmp_path, path, mode_policy("notice", "outbound"))
    assert catalogue.recordings() == []
    assert audits(catalogue, "prompt.played") == []
    (decision,) = audits(catalogue, "decision")
    assert decision["emergency"] is True and decision["mode"] == "none"


def test_do_not_record_number(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 3.0}', caller="022155500"))
    policy = mode_policy("log_basis").replace(
        "[policy.overrides.inbound]",
        '[policy]\ncountry_code = "49"\ndo_not_record = ["+49 221 555 00"]\n'
        "[policy.overrides.inbound]")
    catalogue, _, _ = run(tmp_path, path, policy)
    assert catalogue.recordings() == []
    (decision,) = audits(catalogue, "decision")
    assert decision["record"] is False and "do-not-record" in decision["reason"]
    assert "022155500" not in json.dumps(decision)


def test_no_policy_for_the_jurisdiction_records_nothing_and_alerts(tmp_path: Path) -> None:
    path = scenario(tmp_path, inbound('{who = "dealer", s = 3.0}'))
    catalogue, _, config = run(tmp_path, path, "", jurisdiction="DE-BY")  # no rules
    assert catalogue.recordings() == []
    (missing,) = audits(catalogue, "policy.missing")
    assert missing["alert"] is True and missing["jurisdiction"] == "DE-BY"
    (decision,) = audits(catalogue, "decision")
    assert decision["record"] is False and "no valid policy" in decision["reason"]
    assert load_config(config).jurisdiction == "DE-BY"
