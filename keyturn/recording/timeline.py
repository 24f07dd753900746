"""A run as data and as a table: one JSON object a step (``runs show --json``, JSON lines,
the agent API) and one line a step (``runs show``). Terminal replay is
:mod:`keyturn.recording.terminal`'s."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from keyturn.recording.runs import Run, Step

# C0 controls but tab and line feed, DEL, and the C1 controls a terminal obeys: shown as
# their Unicode pictures (␛, ␍, …) or U+FFFD, never sent to a terminal as they are
_INERT = {c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {0x7F: 0x2421}
_INERT |= {c: 0xFFFD for c in range(0x80, 0xA0)}


def inert(text: str) -> str:
    """Text from an agent, a target or a person, safe to print: no control character in it
    can move the cursor, retitle the window or reach the clipboard, and no format character
    (a direction override, a zero-width space) can change how the rest reads: each is shown
    as ``⟦U+202E⟧``."""
    shown = text.translate(_INERT)
    if shown.isascii():
        return shown
    return "".join(f"⟦U+{ord(c):04X}⟧" if unicodedata.category(c) == "Cf" else c for c in shown)


def one_line(text: str, width: int) -> str:
    """``text`` on one line of at most ``width`` characters, every control character shown."""
    flat = inert(" ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def step_json(step: Step, number: int) -> dict[str, Any]:
    """Everything recorded of one step (``number``: its place in the run, 1 for the first)."""
    recording = step.recording
    return {
        "number": number,
        "id": str(step.id),
        "agent": step.agent,
        "run": step.run,
        "run_id": step.run_id,
        "at": step.at.isoformat(),
        "target": step.target,
        "command": step.command,
        "verdict": step.verdict,
        "status": step.status,
        "rule": step.rule,
        "summary": str(step.outcome),
        "ended_at": step.ended_at.isoformat() if step.ended_at else None,
        "error": step.error,
        "decisions": [
            {"by": v.approver, "decision": v.decision, "at": v.at.isoformat(), "reason": v.reason}
            for v in step.votes
        ],
        "grant": None
        if step.grant is None
        else {
            "id": str(step.grant.id),
            "issued_at": step.grant.issued_at.isoformat(),
            "expires_at": step.grant.expires_at.isoformat(),
            "status": step.grant.status,
            "ended_at": step.grant.ended_at.isoformat() if step.grant.ended_at else None,
            "ended_by": step.grant.ended_by,
        },
        "output": None
        if recording is None
        else {
            "kept": recording.kept,
            "bytes": recording.bytes,
            "sha256": recording.sha256,
            "truncated": recording.truncated,
            "record": recording.digest,
            "deleted": recording.kept != "none" and recording.text is None,
            "value": recording.output(),
        },
    }


def json_lines(run: Run) -> str:
    """One JSON object a step (for a SIEM)."""
    return "".join(
        json.dumps(step_json(step, n), sort_keys=True) + "\n" for n, step in enumerate(run.steps, 1)
    )


def table(run: Run) -> str:
    """``keyturn runs show``: one line a step."""
    agents = ", ".join(run.agents)
    count = len(run.steps)
    lines = [f"run {one_line(run.name, 80)} · agents {one_line(agents, 80)} · {count} steps"]
    lines.append(
        f"{'#':>3}  {'time (UTC)':<19}  {'target':<12}  {'outcome':<28}  {'output':>9}  command"
    )
    for n, step in enumerate(run.steps, 1):
        lines.append(
            f"{n:>3}  {step.at:%Y-%m-%d %H:%M:%S}  {one_line(step.target, 12):<12}  "
            f"{one_line(str(step.outcome), 28):<28}  {_size(step):>9}  {one_line(step.command, 60)}"
        )
    if run.more:
        lines.append("…and more steps after these (--limit)")
    return "\n".join(lines)


def _size(step: Step) -> str:
    recording = step.recording
    if recording is None:
        return "—"
    return f"{recording.bytes}B" + ("+" if recording.truncated else "")
