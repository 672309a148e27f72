"""The compliance decision: the order of checks, site settings, and properties that hold for
every jurisdiction, direction and call shape of the shipped policy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.compliance import CompliancePolicy, SitePolicy, number_forms
from firmware.config import parse_config
from firmware.policy import CallFacts, Decision, PlaceholderPolicy
from firmware.policyfile import PolicySet, parse_policy
from firmware.policystore import BUILTIN_PATH
from tests.firmware.policydata import MINI, config_text

BUILTIN = parse_policy(BUILTIN_PATH.read_bytes(), "policy.toml")
SITE = SitePolicy(do_not_record=("+49 221 123456", "0221 555 000"), private_prefix="*99",
                  dial_prefixes=("0",), country_code="49")


def facts(direction: str = "outbound", caller: str | None = None, dialed: str | None = None,
          jurisdiction: str = "DE") -> CallFacts:
    return CallFacts(line_id="line1", jurisdiction=jurisdiction, direction=direction,
                     caller_number=caller, dialed_number=dialed)


def decide(policy: PolicySet | None, call: CallFacts, site: SitePolicy = SITE) -> Decision:
    return CompliancePolicy(policy, call.jurisdiction, site).decide(call)


# --- 1. no valid policy --------------------------------------------------------------------
def test_no_policy_means_no_recording() -> None:
    decision = decide(None, facts(dialed="0221999"))
    assert (decision.record, decision.mode, decision.reason) == (
        False, "none", "no valid policy for DE")
    assert decision.policy_id == "none" and decision.policy_hash is None


def test_jurisdiction_missing_from_the_policy() -> None:
    decision = decide(BUILTIN, facts(dialed="0221999", jurisdiction="XX"))
    assert (decision.record, decision.mode, decision.reason) == (
        False, "none", "no valid policy for XX")
    assert decision.policy_hash == BUILTIN.sha256 and decision.policy_version == 1


# --- 2. emergency --------------------------------------------------------------------------
@pytest.mark.parametrize(("jurisdiction", "number"), [
    ("DE", "112"), ("DE", "110"), ("DE", "0112"), ("DE", "116117"), ("UK", "999"),
    ("US-CA", "911"), ("FR", "15"), ("AU", "000"), ("JP", "119")])
def test_emergency_numbers_get_no_prompt(jurisdiction: str, number: str) -> None:
    decision = decide(BUILTIN, facts(dialed=number, jurisdiction=jurisdiction))
    assert decision.emergency and decision.mode == "none" and not decision.record
    assert decision.reason == "emergency number"
    assert number not in decision.reason


def test_emergency_beats_private_code_and_do_not_record() -> None:
    site = SitePolicy(do_not_record=("112",), private_prefix="11")
    decision = decide(BUILTIN, facts(dialed="112"), site)
    assert decision.reason == "emergency number"


def test_inbound_emergency_is_the_callers_number() -> None:
    assert decide(BUILTIN, facts("inbound", caller="112")).emergency
    assert not decide(BUILTIN, facts("inbound", caller="0221999", dialed="112")).emergency


def test_emergency_record_policy_keeps_basis_and_retention() -> None:
    text = MINI.replace('consent_digits = "1"', 'consent_digits = "1"\nemergency_record = true')
    decision = decide(parse_policy(text.encode()), facts("inbound", caller="110"))
    assert decision.record and decision.mode == "none" and decision.emergency
    assert decision.basis.startswith("emergency call recorded by policy")
    assert decision.retention_days == 90


# --- 3. private call code, 4. do-not-record list -------------------------------------------
def test_private_call_code() -> None:
    decision = decide(BUILTIN, facts(dialed="*990221999"))
    assert (decision.record, decision.mode, decision.reason) == (False, "none",
                                                                 "private call code")


@pytest.mark.parametrize("number", ["022112 3456", "+49221123456", "0049221123456",
                                    "02215 55000", "+49 221 555000"])
def test_do_not_record_list_compares_national_and_international(number: str) -> None:
    decision = decide(BUILTIN, facts(dialed=number))
    assert (decision.record, decision.reason) == (False, "do-not-record list")
    assert decide(BUILTIN, facts("inbound", caller=number)).reason == "do-not-record list"


def test_numbers_not_on_the_list_are_recorded() -> None:
    for number in ("0221123457", "+43221123456", "221123456"):
        assert decide(BUILTIN, facts(dialed=number)).record, number


@pytest.mark.parametrize(("number", "cc", "expected"), [
    ("0221 555 000", "49", {"0221555000", "+49221555000"}),
    ("(212) 555-1234", "1", {"2125551234", "+12125551234"}),
    ("1 212 555 1234", "1", {"12125551234", "+12125551234"}),
    ("011 49 221 555", "1", {"01149221555", "+49221555"}),
    ("06 1234 5678", "39", {"0612345678", "+390612345678"}),
    ("0221 555", "", {"0221555"}),
    ("+33 1 23", "", {"+33123"}),
])
def test_number_forms(number: str, cc: str, expected: set[str]) -> None:
    assert number_forms(number, cc) == expected


# --- 5. the rule, with site overrides ------------------------------------------------------
def test_rule_fields_reach_the_decision() -> None:
    decision = decide(BUILTIN, facts(dialed="0221999"))
    rule = BUILTIN.rule("DE", "outbound")
    assert (decision.record, decision.mode, decision.basis, decision.retention_days) == (
        True, "consent_gate", rule.basis, rule.retention_days)
    assert decision.jurisdiction == "DE" and decision.direction == "outbound"
    assert decision.language == "de" and decision.consent_digits == "1"
    assert decision.beep == (1400.0, 0.5, 15.0) and decision.consent_timeout_s == 15.0
    assert decision.sources == rule.sources and decision.audit_numbers == "commitment"
    assert decision.reason == "DE outbound rule" and decision.reviewed is False
    assert json.loads(json.dumps(decision.as_dict()))["beep"] == [1400.0, 0.5, 15.0]


def test_reviewed_rule_without_override_is_reviewed() -> None:
    policy = parse_policy(MINI.encode())
    assert decide(policy, facts("inbound", caller="0221999")).reviewed
    site = SitePolicy(overrides={"inbound": {"retention_days": 30}})
    overridden = decide(policy, facts("inbound", caller="0221999"), site)
    assert not overridden.reviewed and overridden.retention_days == 30
    assert overridden.reason == "DE inbound rule; site override: retention_days"


def test_override_mode_and_record() -> None:
    site = SitePolicy(overrides={"outbound": {"mode": "notice", "basis": "contract"}})
    decision = decide(BUILTIN, facts(dialed="0221999"), site)
    assert (decision.mode, decision.basis, decision.record) == ("notice", "contract", True)
    assert decision.reason.endswith("site override: basis, mode")
    site = SitePolicy(overrides={"outbound": {"record": False}})
    decision = decide(BUILTIN, facts(dialed="0221999"), site)
    assert (decision.record, decision.mode, decision.basis, decision.retention_days) == (
        False, "none", "", None)


def test_unknown_direction_takes_the_stricter_rule() -> None:
    decision = decide(BUILTIN, facts("unknown", caller="01234", jurisdiction="FR"))
    assert decision.mode == "manual" and decision.direction == "unknown"
    assert "stricter" in decision.reason
    decision = decide(BUILTIN, facts("unknown", jurisdiction="US"))
    assert decision.mode == "notice"  # inbound notice is stricter than outbound log_basis
    # MINI's DE: inbound consent_gate, outbound not recorded -> not recorded.
    assert decide(parse_policy(MINI.encode()), facts("unknown")).mode == "none"


def test_site_language_and_aliases() -> None:
    decision = decide(BUILTIN, facts(dialed="020", jurisdiction="gb"),
                      SitePolicy(language="cy"))
    assert decision.jurisdiction == "UK" and decision.language == "cy"


def test_placeholder_still_decides_with_defaults() -> None:
    decision = PlaceholderPolicy().decide(facts())
    assert decision.record and decision.jurisdiction == "" and decision.beep is None
    assert json.dumps(decision.as_dict())


def test_site_policy_from_config(tmp_path: Path) -> None:
    config = parse_config(config_text(tmp_path, """
language = "de"
country_code = "49"
dial_prefixes = ["0"]
private_prefix = "*99"
do_not_record = ["+49 221 123456"]
[policy.overrides.outbound]
mode = "notice"
retention_days = 30
"""), str(tmp_path / "c.toml"))
    site = SitePolicy.from_config(config)
    assert site == SitePolicy(do_not_record=("+49 221 123456",), private_prefix="*99",
                              dial_prefixes=("0",), country_code="49", language="de",
                              overrides={"outbound": {"mode": "notice", "retention_days": 30}})


# --- properties over every jurisdiction, direction and call shape --------------------------
SHAPES = ("none", "emergency", "dnr", "private", "ordinary")


def number_for(shape: str, rule_emergency: tuple[str, ...], digits: str) -> str | None:
    if shape == "none":
        return None
    if shape == "emergency":
        return rule_emergency[len(digits) % len(rule_emergency)].replace("x", "7")
    if shape == "dnr":
        return "0221 555 000"
    if shape == "private":
        return "*99" + digits
    return "09" + digits  # too long for any short code, even after the "0" prefix


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jurisdiction=st.sampled_from(BUILTIN.jurisdictions()),
       direction=st.sampled_from(("inbound", "outbound", "unknown")),
       shape=st.sampled_from(SHAPES),
       digits=st.text("0123456789", min_size=6, max_size=12))
def test_every_call_gets_a_sound_decision(jurisdiction: str, direction: str, shape: str,
                                          digits: str) -> None:
    emergency = BUILTIN.rule(jurisdiction, "inbound").emergency
    number = number_for(shape, emergency, digits)
    call = facts(direction, caller=number if direction != "outbound" else None,
                 dialed=number, jurisdiction=jurisdiction)
    decision = decide(BUILTIN, call)
    assert isinstance(decision, Decision)
    json.dumps(decision.as_dict())
    assert decision.policy_hash == BUILTIN.sha256 and decision.jurisdiction == jurisdiction
    if shape == "emergency":
        assert decision.emergency and decision.mode == "none"
    else:
        assert not decision.emergency
    if shape in ("dnr", "private"):
        assert not decision.record
    if decision.record:
        assert decision.basis.strip() and decision.retention_days
        assert decision.mode != "none" or decision.emergency
    else:
        assert decision.mode == "none" and decision.retention_days is None
    assert not decision.reviewed  # nothing in the shipped policy is reviewed
