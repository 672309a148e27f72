"""The compliance decision a call is recorded under.

This module holds the interface the call recorder asks; the per-jurisdiction policy
engine plugs in behind :class:`PolicyHook`. Until a policy is installed the appliance
runs :class:`PlaceholderPolicy`, which records every call and says so in the decision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class CallFacts:
    """What the policy may look at when deciding."""

    line_id: str
    jurisdiction: str
    direction: str  # inbound | outbound | unknown
    caller_number: str | None
    dialed_number: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    record: bool
    mode: str  # notice | notice_beep | consent_gate | manual | log_basis | none
    basis: str  # the legal basis logged for the recording
    retention_days: int | None
    policy_id: str
    policy_hash: str | None
    reason: str  # why: stored in the audit trail; never contains a phone number
    jurisdiction: str = ""
    direction: str = ""  # inbound | outbound | unknown
    reviewed: bool = False  # the rule has legal sign-off and no site override changed it
    emergency: bool = False  # a call to or from an emergency number: no prompt, no beep
    language: str = "en"  # prompt language
    policy_version: int = 0
    consent_timeout_s: float = 0.0  # consent_gate: how long to wait for a key
    consent_digits: str = ""  # consent_gate: the keys that mean "yes"
    beep: tuple[float, float, float] | None = None  # (freq_hz, duration_s, period_s)
    audit_numbers: str = "commitment"  # commitment (HMAC only) | clear
    sources: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become lists."""
        data = asdict(self)
        data["beep"] = list(self.beep) if self.beep is not None else None
        data["sources"] = list(self.sources)
        return data


class PolicyHook(Protocol):
    def decide(self, facts: CallFacts) -> Decision:
        ...


class PlaceholderPolicy:
    """Records everything; logged as having no reviewed legal basis."""

    def decide(self, facts: CallFacts) -> Decision:
        return Decision(record=True, mode="log_basis", basis="unconfigured",
                        retention_days=None, policy_id="placeholder", policy_hash=None,
                        reason="no compliance policy installed")
