"""Human-readable tables for the CLI (rich)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


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


def print_recordings(rows: Sequence[dict[str, Any]], console: Console | None = None) -> None:
    (console or Console()).print(recordings_table(rows))
