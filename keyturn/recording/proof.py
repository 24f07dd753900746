"""One step's evidence file, checked offline: no database, only the file.

The file holds the step (its request: agent, run, target, command, verdict, status, every
decision, its grant), its recording, and the segment of the audit chain from the step's first
event to its last, every event with the exact fields its hash covers. The check recomputes
every event's hash and link, then holds each of the file's claims against the events: the
step is what its first event says (agent, target, run_id, rule, the command's sha256), its
decisions are exactly the decision events in order, its status is what its last event made
it, its grant was issued and ended as the events say, and its recording is the one the event
that ended the step vouches for. Changing one byte, or leaving an event out, fails the check;
what :class:`Proven` reports comes from the events, not from the file's own words.

The file proves the step as of its last event: a step still going on when it was written
may have more events since. The segment starts with the step's first event and ends with its
last one at that time.

What the chain alone cannot show is that the segment is this deployment's: anyone can chain
events. A file written with the bot's Vault access carries a *seal*: the step, where the
segment starts (its first event and the hash before it) and ends, and when it was written,
HMACed by the deployment's audit key under a label of its own (:func:`seal_message`), so
neither a checkpoint nor another step's seal passes for it. Checking the seal needs that
Vault (``keyturn audit verify --evidence FILE --config …``), not the database.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from keyturn.chain import event_hash
from keyturn.domain import command_sha256
from keyturn.recording.output import record_hash, sha256

FORMAT = 1
SEAL_FIELDS = ("step", "first_seq", "first_prev_hash", "last_seq", "last_hash", "at")


def seal_message(seal: dict[str, Any]) -> bytes:
    """What a seal's HMAC covers: every field, length-prefixed, under its own label."""
    fields = ["keyturn-evidence-seal/1", *(str(seal[name]) for name in SEAL_FIELDS)]
    return "|".join(f"{len(f)}:{f}" for f in fields).encode()


def seal_of(step_id: str, events: list[dict[str, Any]], at: str) -> dict[str, Any]:
    """The fields a seal covers, for a segment of ``events`` (its HMAC added by Vault)."""
    first, last = events[0], events[-1]
    return {
        "step": step_id,
        "first_seq": first["seq"],
        "first_prev_hash": first["prev_hash"],
        "last_seq": last["seq"],
        "last_hash": last["hash"],
        "at": at,
    }


# the event that opens a step, and the status each event leaves a request in
_OPENING = {"request.held", "request.allowed", "request.blocked"}
_STATUS = {
    "request.held": "pending",
    "request.allowed": "executing",
    "request.approved": "approved",
    "request.executing": "executing",
    "request.executed": "executed",
    "request.failed": "failed",
    "request.denied": "denied",
    "request.expired": "expired",
    "request.cancelled": "cancelled",
    "request.blocked": "blocked",
}
_DECISIONS = {
    "request.approved": "approve",
    "request.approval_recorded": "approve",
    "request.denied": "deny",
}


class EvidenceBroken(ValueError):
    """The file does not prove what it says: the first problem found."""


@dataclass(frozen=True)
class Proven:
    """What the events prove of the step."""

    step: str
    agent: str
    target: str
    status: str
    decisions: tuple[tuple[str, str], ...]  # (who, approve | deny), in order
    events: int
    first_seq: int
    last_seq: int
    seal: dict[str, Any] | None  # a checkpoint of the last event, to check with Vault


def check(evidence: object) -> Proven:
    """What the file proves, or :class:`EvidenceBroken` naming the first thing it does not."""
    try:
        if not isinstance(evidence, dict):
            raise EvidenceBroken("not a keyturn evidence file (not a JSON object)")
        return _check(evidence)
    except EvidenceBroken:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EvidenceBroken(f"not a keyturn evidence file: {type(exc).__name__}: {exc}") from None


def _check(evidence: dict[str, Any]) -> Proven:
    if evidence.get("keyturn_evidence") != FORMAT:
        raise EvidenceBroken(f"not a keyturn evidence file (format {FORMAT})")
    events = evidence["events"]
    if not isinstance(events, list) or not events:
        raise EvidenceBroken("the file holds no audit events")
    _chain(events)
    step = evidence["step"]
    own = [e for e in events if _is_own(e, step["id"])]
    if not own:
        raise EvidenceBroken(f"no event in the segment is about step {step['id']}")
    opening = own[0]
    if opening is not events[0] or opening["kind"] not in _OPENING:
        raise EvidenceBroken("the segment does not start with the step's first event")
    if own[-1] is not events[-1]:
        raise EvidenceBroken("the segment does not end with the step's last event")
    _opened(step, opening)
    decisions = tuple((e["actor"], _DECISIONS[e["kind"]]) for e in own if e["kind"] in _DECISIONS)
    claimed = tuple((d["by"], d["decision"]) for d in step["decisions"])
    if claimed != decisions:
        raise EvidenceBroken(f"the decisions are not the ones the events record: {decisions}")
    status = [_STATUS[e["kind"]] for e in own if e["kind"] in _STATUS][-1]
    if step["status"] != status:
        raise EvidenceBroken(f"the status is not the one the events leave it in ({status})")
    _grant(step, own)
    _recording(evidence.get("recording"), step["id"], own)
    last = events[-1]
    seal = evidence.get("seal")
    if seal is not None and {k: seal.get(k) for k in SEAL_FIELDS} != seal_of(
        step["id"], events, seal.get("at")
    ):
        raise EvidenceBroken("the seal is not of this step's segment")
    return Proven(
        step["id"],
        opening["actor"],
        _data(opening)["target"],
        status,
        decisions,
        len(events),
        events[0]["seq"],
        last["seq"],
        seal,
    )


def _chain(events: list[dict[str, Any]]) -> None:
    previous: dict[str, Any] | None = None
    for event in events:
        if previous is not None:
            if event["seq"] != previous["seq"] + 1:
                raise EvidenceBroken(
                    f"events {previous['seq'] + 1}..{event['seq'] - 1} are missing"
                )
            if event["prev_hash"] != previous["hash"]:
                raise EvidenceBroken(f"event {event['seq']} does not follow the one before it")
        recomputed = event_hash(
            prev_hash=event["prev_hash"],
            seq=event["seq"],
            at=datetime.fromisoformat(event["at"]),
            kind=event["kind"],
            actor=event["actor"],
            request_id=UUID(event["request_id"]) if event["request_id"] else None,
            grant_id=UUID(event["grant_id"]) if event["grant_id"] else None,
            data_text=event["data_text"],
        )
        if recomputed != event["hash"]:
            raise EvidenceBroken(f"event {event['seq']} was changed (its hash does not match)")
        previous = event


def _data(event: dict[str, Any]) -> dict[str, Any]:
    data = json.loads(event["data_text"])
    return data if isinstance(data, dict) else {}


def _is_own(event: dict[str, Any], step_id: str) -> bool:
    if event["request_id"] == step_id:
        return True
    return (_data(event).get("output") or {}).get("step") == step_id


def _opened(step: dict[str, Any], opening: dict[str, Any]) -> None:
    """The step is what its first event says it is."""
    said = _data(opening)
    claims = {
        "agent": (step["agent"], opening["actor"]),
        "target": (step["target"], said.get("target")),
        "run_id": (step["run_id"], said.get("run_id")),
        "rule": (step["rule"], said.get("rule")),
        "command": (command_sha256(step["command"]), said.get("command_sha256")),
        "verdict": (step["verdict"] == "blocked", opening["kind"] == "request.blocked"),
    }
    wrong = [name for name, (claimed, recorded) in claims.items() if claimed != recorded]
    if wrong:
        raise EvidenceBroken(f"the step's {', '.join(wrong)} is not what its first event says")


def _grant(step: dict[str, Any], own: list[dict[str, Any]]) -> None:
    issued = [e for e in own if e["kind"] == "grant.issued"]
    grant = step.get("grant")
    if grant is None:
        if issued:
            raise EvidenceBroken("the events record a grant the file leaves out")
        return
    of_grant = [e for e in own if e["grant_id"] == grant["id"]]
    if not any(e["kind"] == "grant.issued" for e in of_grant):
        raise EvidenceBroken("no audit event records the grant's credentials being issued")
    ends = {"grant.revoked", "grant.expired"}
    ended = [e["kind"].removeprefix("grant.") for e in of_grant if e["kind"] in ends]
    if (grant["status"] != "active") != bool(ended) or (ended and ended[-1] != grant["status"]):
        raise EvidenceBroken(f"the grant did not end as the file says ({grant['status']})")


def _recording(recording: dict[str, Any] | None, step_id: str, own: list[dict[str, Any]]) -> None:
    vouched = [data["output"] for data in map(_data, own) if "output" in data]
    if recording is None:
        if vouched:
            raise EvidenceBroken("the audit events vouch for a recording the file leaves out")
        return
    if recording["step"] != step_id or not vouched:
        raise EvidenceBroken("no audit event vouches for the recording")
    fields = (
        recording["kept"],
        recording["output_bytes"],
        recording["output_sha256"],
        recording["truncated"],
        recording["stored_sha256"],
    )
    if record_hash(UUID(step_id), *fields) != vouched[-1]["record"]:
        raise EvidenceBroken("the recording's hashes are not the ones the audit chain holds")
    text = recording["output"]
    if text is not None and sha256(text) != recording["stored_sha256"]:
        raise EvidenceBroken("the recorded output was changed")
