"""The compliance decision for one call: which rule applies, and what the appliance does.

Pure (no I/O): :class:`CompliancePolicy` answers the recorder's :class:`PolicyHook` question
from a validated :class:`PolicySet` and the site's settings. The checks run in a fixed
order and each gives its own ``reason``, which the audit trail keeps:

1. no valid policy, or none for the jurisdiction -> do not record ("no valid policy for J");
2. the number is an emergency number -> no prompt, no beep, no gate (mode "none"),
   recorded only if the policy says ``emergency_record``;
3. the dialled number starts with the site's private-call code -> do not record;
4. the number is on the site's do-not-record list -> do not record;
5. the jurisdiction's rule for the direction, with the site's overrides applied. A call
   of unknown direction gets the stricter of the two rules (``MODES`` order).

Reasons never contain a phone number: the audit trail stores numbers as commitments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from firmware.policy import CallFacts, Decision
from firmware.policyfile import DIRECTIONS, MODES, PolicySet, Rule, is_emergency

if TYPE_CHECKING:
    from firmware.config import Config

OVERRIDE_FIELDS = ("record", "mode", "basis", "retention_days")
ITALY_CC = "39"  # Italian numbers keep their leading 0 after +39 (ITU-T E.164 national plan)
NANP_CC = "1"  # North American Numbering Plan: 10-digit national numbers, trunk prefix 1
NANP_DIGITS = 10


@dataclass(frozen=True, slots=True)
class SitePolicy:
    """The site's part of the decision, from the ``[policy]`` table of the config."""

    do_not_record: tuple[str, ...] = ()
    private_prefix: str = ""
    dial_prefixes: tuple[str, ...] = ()
    country_code: str = ""  # E.164 country calling code without "+", e.g. "49"
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    language: str = ""

    @classmethod
    def from_config(cls, config: Config) -> SitePolicy:
        policy = config.policy
        overrides = {direction: {name: value for name in OVERRIDE_FIELDS
                                 if (value := getattr(spec, name)) is not None}
                     for direction in DIRECTIONS
                     if (spec := getattr(policy.overrides, direction)) is not None}
        return cls(do_not_record=tuple(policy.do_not_record),
                   private_prefix=policy.private_prefix or "",
                   dial_prefixes=tuple(policy.dial_prefixes),
                   country_code=policy.country_code or "",
                   overrides={k: v for k, v in overrides.items() if v},
                   language=policy.language or "")


class CompliancePolicy:
    """The :class:`firmware.policy.PolicyHook` the recorder asks at the start of a call."""

    def __init__(self, policy: PolicySet | None, jurisdiction: str,
                 site: SitePolicy | None = None) -> None:
        self.policy = policy
        self.jurisdiction = jurisdiction
        self.site = site or SitePolicy()
        self._dnr = frozenset(form for number in self.site.do_not_record
                              for form in number_forms(number, self.site.country_code))

    def decide(self, facts: CallFacts) -> Decision:
        jurisdiction = facts.jurisdiction or self.jurisdiction
        code = self.policy.resolve_code(jurisdiction) if self.policy is not None else None
        if self.policy is None or code is None:
            return self._no_policy(jurisdiction, facts.direction)
        rules = {d: self.policy.rule(code, d) for d in DIRECTIONS}
        rule = _pick(rules, facts.direction)
        numbers = _numbers(facts)
        if any(is_emergency(n, rule.emergency, self.site.dial_prefixes) for n in numbers):
            return self._emergency(self.policy, rule, facts.direction)
        dialled = facts.dialed_number or ""
        if self.site.private_prefix and dialled.startswith(self.site.private_prefix):
            return self._skip(self.policy, rule, facts.direction, "private call code")
        if any(self._dnr & number_forms(n, self.site.country_code) for n in numbers):
            return self._skip(self.policy, rule, facts.direction, "do-not-record list")
        return self._by_rule(self.policy, rules, facts.direction)

    # --- the outcomes ------------------------------------------------------------------------
    def _no_policy(self, jurisdiction: str, direction: str) -> Decision:
        policy = self.policy
        return Decision(record=False, mode="none", basis="", retention_days=None,
                        policy_id=policy.id if policy else "none",
                        policy_hash=policy.sha256 if policy else None,
                        reason=f"no valid policy for {jurisdiction or '(no jurisdiction)'}",
                        jurisdiction=jurisdiction, direction=direction,
                        policy_version=policy.version if policy else 0)

    def _emergency(self, policy: PolicySet, rule: Rule, direction: str) -> Decision:
        record = rule.emergency_record
        return replace(self._base(policy, rule, direction, "emergency number"),
                       record=record, mode="none", emergency=True, reviewed=rule.reviewed,
                       basis=f"emergency call recorded by policy; {rule.basis}" if record
                       else "", retention_days=rule.retention_days if record else None)

    def _skip(self, policy: PolicySet, rule: Rule, direction: str, reason: str) -> Decision:
        return self._base(policy, rule, direction, reason)

    def _by_rule(self, policy: PolicySet, rules: Mapping[str, Rule],
                 direction: str) -> Decision:
        if direction in DIRECTIONS:
            return self._apply(policy, rules[direction], direction)
        candidates = [self._apply(policy, rules[d], direction) for d in DIRECTIONS]
        chosen = min(candidates, key=lambda d: (MODES.index(d.mode), d.retention_days or 0))
        return replace(chosen, reason=chosen.reason + "; direction unknown: the stricter rule")

    def _apply(self, policy: PolicySet, rule: Rule, direction: str) -> Decision:
        changes = dict(self.site.overrides.get(rule.direction, {}))
        record = changes.get("record", rule.record)
        mode = changes.get("mode", rule.mode)
        if not record or mode == "none":
            record, mode = False, "none"
        reason = f"{rule.jurisdiction} {rule.direction} rule"
        if changes:
            reason += f"; site override: {', '.join(sorted(changes))}"
        return replace(self._base(policy, rule, direction, reason), record=record, mode=mode,
                       basis=changes.get("basis", rule.basis) if record else "",
                       retention_days=changes.get("retention_days", rule.retention_days)
                       if record else None,
                       reviewed=rule.reviewed and not changes)

    def _base(self, policy: PolicySet, rule: Rule, direction: str, reason: str) -> Decision:
        """Everything the rule says, not recording; the outcomes adjust it."""
        return Decision(
            record=False, mode="none", basis="", retention_days=None,
            policy_id=policy.id, policy_hash=policy.sha256, reason=reason,
            jurisdiction=rule.jurisdiction, direction=direction, reviewed=False,
            language=self.site.language or rule.languages[0],
            policy_version=policy.version, consent_timeout_s=rule.consent_timeout_s,
            consent_digits=rule.consent_digits, beep=tuple(rule.beep),
            audit_numbers=rule.audit_numbers, sources=rule.sources)


def _pick(rules: Mapping[str, Rule], direction: str) -> Rule:
    """The rule for ``direction``; for "unknown", the stricter (MODES order, then the
    shorter retention, then inbound: ``min`` keeps the first of equals)."""
    if direction in DIRECTIONS:
        return rules[direction]
    return min((rules[d] for d in DIRECTIONS),
               key=lambda r: (MODES.index(r.mode), r.retention_days))


def _numbers(facts: CallFacts) -> list[str]:
    """The far end's number(s): dialled for outbound, caller for inbound, both if unknown."""
    if facts.direction == "outbound":
        candidates = [facts.dialed_number]
    elif facts.direction == "inbound":
        candidates = [facts.caller_number]
    else:
        candidates = [facts.caller_number, facts.dialed_number]
    return [number for number in candidates if number]


def number_forms(number: str, country_code: str = "") -> frozenset[str]:
    """The forms of ``number`` to compare: as written (digits, leading '+' kept) and, when
    the site's country calling code is known, international ("+<cc><national>").

    "0221 555 000" with country code "49" gives {"0221555000", "+49221555000"};
    "0049221555000" and "+49 221 555000" give "+49221555000" too.
    """
    digits = ("+" if number.strip().startswith("+") else "") + "".join(
        c for c in number if c.isdigit())
    forms = {digits}
    international = _international(digits, country_code)
    if international:
        forms.add(international)
    return frozenset(f for f in forms if f.strip("+"))


def _international(digits: str, cc: str) -> str | None:
    if digits.startswith("+"):
        return digits
    if digits.startswith("00"):  # ITU-T E.164 international prefix (most of the world)
        return "+" + digits[2:]
    if not cc:
        return None
    if cc == NANP_CC:
        if digits.startswith("011"):  # NANP international prefix
            return "+" + digits[3:]
        if len(digits) == NANP_DIGITS + 1 and digits.startswith("1"):
            return "+" + digits
        return "+1" + digits if len(digits) == NANP_DIGITS else None
    if cc == ITALY_CC and digits.startswith("0"):
        return f"+{cc}{digits}"
    if digits.startswith("0"):  # national trunk prefix
        return f"+{cc}{digits[1:]}"
    return None
