"""A run on a terminal: what ``keyturn runs replay`` prints and the asciicast files hold.

The rendition is a list of :class:`Frame`: the command as typed (``i``, echoed as ``o``),
what happened to it (``m`` markers: held, approved by, denied by, credentials issued and
revoked) and its output (``o``), each at the time it happened, with idle gaps capped so a
run with an hour's pause replays in seconds. An SSH command's output keeps the pacing its
chunks arrived with. Every piece of text an agent, a target or a person wrote goes through
:func:`~keyturn.recording.timeline.inert` before keyturn's own colours are added: nothing
recorded can drive the terminal it is replayed on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from keyturn.recording.runs import Run, Step
from keyturn.recording.timeline import inert

IDLE_CAP = 2.0  # seconds: a longer pause between frames is replayed as this
WIDTH, HEIGHT = 120, 40  # the terminal asciicast headers declare
_BOLD, _DIM, _RED, _RESET = "\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m"


def _lines(text: str) -> str:
    """Line feeds as a terminal's CRLF (a carriage return alone was made inert before)."""
    return text.replace("\n", "\r\n")


def _said(value: object) -> str:
    """A value someone else wrote, inert (JSON escapes controls in what it quotes)."""
    return inert(value if isinstance(value, str) else json.dumps(value))


def rendered(output: dict[str, Any] | None) -> str:
    """An output as a terminal shows it, its text inert, lines ending in CRLF."""
    if output is None:
        return ""
    return _lines(_text(output))


def _text(output: dict[str, Any]) -> str:
    if "error" in output:
        error = output["error"]
        message = error.get("message") if isinstance(error, dict) else error
        return f"{_RED}ERROR: {_said(message)}{_RESET}\n"
    if "cut" in output:
        return f"{_DIM}({_said(output['cut'])}){_RESET}\n"
    if "columns" in output:
        return _rows(output)
    if "exit_status" in output:
        err = _said(output.get("stderr") or "")
        stderr = f"{_RED}{err}{_RESET}" if err else ""
        status = _said(output["exit_status"])
        return f"{_said(output.get('stdout') or '')}{stderr}{_DIM}(exit {status}){_RESET}\n"
    if "status" in output and "headers" in output:
        body = output.get("json")
        text = json.dumps(body, indent=2) if body is not None else _said(output.get("text") or "")
        note = f"\n{_DIM}({_said(output['note'])}){_RESET}" if output.get("note") else ""
        return f"HTTP {_said(output['status'])}\n{text}{note}\n"
    return json.dumps(output, indent=2) + "\n"


def _rows(output: dict[str, Any]) -> str:
    columns = [_said(c) for c in output.get("columns") or []]
    rows = output.get("rows") or []
    lines = [" | ".join(columns)] if columns else []
    lines += [" | ".join("NULL" if v is None else _said(v) for v in row) for row in rows]
    count = _said(output.get("row_count", len(rows)))
    tags = ", ".join(_said(t) for t in output.get("tags") or [])
    lines.append(f"{_DIM}({tags or f'{count} rows'}){_RESET}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ frames: the run in time


@dataclass(frozen=True)
class Frame:
    at: float  # seconds since the run began, idle gaps capped
    code: str  # "i" input, "o" output, "m" marker
    text: str
    number: int  # the step it belongs to: 1 for the run's first


def frames(run: Run, idle_cap: float = IDLE_CAP) -> list[Frame]:
    """Every frame of the run in order of time, gaps longer than ``idle_cap`` shortened."""
    timed: list[tuple[datetime, int, int, str, str]] = []
    for n, step in enumerate(run.steps, 1):
        for offset, (when, code, text) in enumerate(_step_frames(step)):
            timed.append((when, n, offset, code, text))
    timed.sort(key=lambda f: (f[0], f[1], f[2]))
    out: list[Frame] = []
    clock, previous = 0.0, timed[0][0] if timed else None
    for when, n, _, code, text in timed:
        assert previous is not None
        clock += min(max((when - previous).total_seconds(), 0.0), idle_cap)
        previous = when
        out.append(Frame(round(clock, 6), code, text, n))
    return out


def _step_frames(step: Step) -> list[tuple[datetime, str, str]]:
    """One step's frames, at the real times they happened."""
    typed = inert(step.command.replace("\r\n", "\n"))
    who = f"{inert(step.agent)}@{inert(step.target)}"
    prompt = f"{_BOLD}{who}>{_RESET} {_lines(typed)}\r\n"
    out: list[tuple[datetime, str, str]] = [(step.at, "i", typed + "\n"), (step.at, "o", prompt)]
    if step.verdict == "blocked":
        rule = f"blocked by rule {inert(step.rule)}" if step.rule else "blocked"
        out.append((step.at, "m", rule))
    elif step.verdict == "held":
        out.append((step.at, "m", f"held for approval (request {step.id})"))
    for vote in step.votes:
        verb = "approved" if vote.decision == "approve" else "denied"
        reason = f": {inert(vote.reason)}" if vote.reason else ""
        out.append((vote.at, "m", f"{verb} by {inert(vote.approver)}{reason}"))
    grant = step.grant
    if grant is not None:
        out.append((grant.issued_at, "m", f"credentials issued until {grant.expires_at:%H:%M:%S}"))
    ended = step.ended_at or (step.votes[-1].at if step.votes else step.at)
    out += _output_frames(step, ended)
    if step.status in ("expired", "cancelled"):
        out.append((ended, "m", f"{step.status}: it never ran"))
    if grant is not None and grant.ended_at is not None:
        by = f" by {inert(grant.ended_by)}" if grant.ended_by else ""
        out.append((grant.ended_at, "m", f"credentials {grant.status}{by}"))
    return out


def _output_frames(step: Step, ended: datetime) -> list[tuple[datetime, str, str]]:
    recording = step.recording
    if recording is None:
        if step.error:
            return [(ended, "o", rendered({"error": step.error}))]
        return []
    if recording.text is None:
        gone = "deleted by retention" if recording.kept != "none" else "not kept (record.outputs)"
        note = f"{_DIM}(output of {recording.bytes} bytes {gone}){_RESET}\r\n"
        return [(ended, "o", note)]
    output = recording.output() or {}
    cut = f"{_DIM}(cut to the recording's cap of the {recording.bytes} bytes){_RESET}\r\n"
    tail = [(ended, "o", cut)] if recording.truncated else []
    timing = output.pop("timing", None)
    if timing and "stdout" in output:
        return _timed(output, timing, step.at, ended) + tail
    return [(ended, "o", rendered(output)), *tail]


def _timed(
    output: dict[str, Any], timing: list[Any], began: datetime, ended: datetime
) -> list[tuple[datetime, str, str]]:
    """Shell output in the chunks it arrived in, at their offsets before it ended. Offsets
    were taken before masking: each stream's are scaled to its masked length."""
    last = max((float(t) for t, _, _ in timing), default=0.0)
    ends = {
        name: max((int(e) for _, s, e in timing if s == name), default=0)
        for name in ("stdout", "stderr")
    }
    done = {"stdout": 0, "stderr": 0}
    out = []
    for t, name, end in timing:
        text = output.get(name) or ""
        scaled = round(int(end) * len(text) / ends[name]) if ends[name] else len(text)
        piece = text[done[name] : scaled]
        done[name] = max(done[name], scaled)
        if piece:
            shown = inert(piece)
            colour = f"{_RED}{shown}{_RESET}" if name == "stderr" else shown
            when = max(began, ended - timedelta(seconds=last - float(t)))
            out.append((when, "o", _lines(colour)))
    rest = {k: (output.get(k) or "")[done[k] :] for k in done}
    out.append(
        (ended, "o", rendered({**output, "stdout": rest["stdout"], "stderr": rest["stderr"]}))
    )
    return out


# ------------------------------------------------------------------ files


def asciicast(run: Run, version: int = 2) -> str:
    """The run as an asciicast file: v2 (asciinema 2.x, asciinema-player) or v3."""
    header: dict[str, Any] = {
        "version": version,
        "timestamp": int(run.steps[0].at.timestamp()) if run.steps else 0,
        "title": inert(f"keyturn run {run.name} ({', '.join(run.agents)})"),
        "env": {"TERM": "xterm-256color"},
    }
    if version == 2:
        header |= {"width": WIDTH, "height": HEIGHT, "idle_time_limit": IDLE_CAP}
    else:
        header |= {"term": {"cols": WIDTH, "rows": HEIGHT}, "idle_time_limit": IDLE_CAP}
    lines = [json.dumps(header)]
    previous = 0.0
    for frame in frames(run):
        at = frame.at if version == 2 else round(frame.at - previous, 6)
        previous = frame.at
        lines.append(json.dumps([at, frame.code, frame.text]))
    return "\n".join(lines) + "\n"
