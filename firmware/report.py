"""Human-readable tables for the CLI (rich)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from firmware.policyfile import PolicySet


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _number(row: dict[str, Any]) -> str:
    if row.get("direction") == "outbound":
        return row.get("dialed_number") or "?"
    return row.get("caller_number") or "withheld"


_END = {"hangup_while_dialing": "unanswered", "hangup_before_dialing": "abandoned",
        "no_answer": "no answer"}


def recordings_table(rows: Sequence[dict[str, Any]], title: str = "Recordings") -> Table:
    """Fits an 80-column terminal; `--json` has every field."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True, show_edge=False)
    for name, justify in (("UTC", "left"), ("line", "left"), ("dir", "left"),
                          ("number", "left"), ("answer", "right"), ("length", "right"),
                          ("end", "left"), ("state", "left"), ("KiB", "right")):
        table.add_column(name, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                         min_width=13 if name == "number" else None)
    days = sorted({(row.get("started_at") or "")[:10] for row in rows})
    if days:
        table.title = f"{title}, {days[0]}" + (f" to {days[-1]}" if len(days) > 1 else "")
    for row in rows:
        answered = row.get("answered_offset_s")
        end_reason = row.get("end_reason") or ""
        table.add_row(
            (row.get("started_at") or "")[11:19], row.get("line_id", ""),
            "in" if row.get("direction") == "inbound" else "out", _number(row),
            "-" if answered is None else f"{answered:.1f}s", _duration(row.get("audio_s")),
            _END.get(end_reason, end_reason), row.get("state", ""),
            f"{row['size'] / 1024:.0f}" if row.get("size") else "-")
    return table


def calls_table(calls: Sequence[dict[str, Any]], outcomes: dict[str, str],
                title: str = "Calls") -> Table:
    """Every call with what the compliance policy decided and what was kept (80 columns).

    ``outcomes`` maps a call id to what happened to its audio (from the audit trail)."""
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  padding=(0, 1), collapse_padding=True, show_edge=False)
    for name in ("UTC", "dir", "end", "mode", "kept"):
        table.add_column(name, no_wrap=name != "kept")
    for call in calls:
        decision = json.loads(call["decision"]) if call.get("decision") else {}
        end_reason = call.get("end_reason") or ""
        table.add_row((call.get("started_at") or "")[11:19],
                      "in" if call.get("direction") == "inbound" else "out",
                      _END.get(end_reason, end_reason), decision.get("mode", "-"),
                      outcomes.get(call["id"], "nothing (never connected)"))
    return table


def print_recordings(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(recordings_table(rows))


# --- compliance policy -----------------------------------------------------------------------
POLICY_TABLE_WIDTH = 100  # columns; `edge-recorder policy` must fit a 100-column terminal


def _unreviewed(policy: PolicySet) -> tuple[int, int]:
    rules = list(policy.rules())
    return sum(not rule.reviewed for rule in rules), len(rules)


def policy_table(policy: PolicySet) -> Table:
    """Every jurisdiction x direction; unreviewed rules in red."""
    table = Table(title=f"Compliance policy {policy.id} v{policy.version} "
                        f"({policy.published}), sha256 {policy.sha256[:16]}",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True, show_edge=False)
    for name, justify, width in (("where", "left", 5), ("dir", "left", 3),
                                 ("rec", "left", 3), ("mode", "left", 12),
                                 ("basis", "left", None), ("days", "right", 4),
                                 ("review", "left", 10)):
        table.add_column(name, justify=justify, no_wrap=name != "basis",  # type: ignore[arg-type]
                         min_width=width, overflow="fold")
    for rule in policy.rules():
        table.add_row(rule.jurisdiction, "in" if rule.direction == "inbound" else "out",
                      "yes" if rule.record else "no", rule.mode, rule.basis,
                      str(rule.retention_days),
                      "reviewed" if rule.reviewed else "[bold red]UNREVIEWED[/]")
    return table


def print_policy(policy: PolicySet, console: Console | None = None) -> None:
    console = console or Console(width=min(Console().width, POLICY_TABLE_WIDTH))
    console.print(policy_table(policy))
    unreviewed, total = _unreviewed(policy)
    style = "bold red" if unreviewed else "green"
    console.print(f"[{style}]{unreviewed} of {total} rules are not reviewed by counsel[/]")


def policy_markdown(policy: PolicySet) -> str:
    """The rules as a Markdown table (docs/COMPLIANCE.md carries this, kept true by a test)."""
    lines = ["| jurisdiction | direction | record | mode | basis | retention (days) | reviewed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rule in policy.rules():
        cells = (f"{rule.jurisdiction} ({rule.name})", rule.direction,
                 "yes" if rule.record else "no", f"`{rule.mode}`", rule.basis,
                 str(rule.retention_days), "yes" if rule.reviewed else "**no**")
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    unreviewed, total = _unreviewed(policy)
    lines.append("")
    lines.append(f"Policy `{policy.id}` version {policy.version} ({policy.published}): "
                 f"{unreviewed} of {total} rules are not reviewed by counsel.")
    return "\n".join(lines) + "\n"
