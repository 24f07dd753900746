"""One step's evidence file, checked offline: no database, no Vault, only the file.

The file holds the step (its request, decisions, grant), its recording, and the segment of
the audit chain from the step's first event to its last, every event with the exact fields
its hash covers. Checking it recomputes every event's hash and link, then holds each claim
of the file against the events: the command against its sha256, each decision against an
event by that approver, the grant against its issue and end, the recording against the hash
the event that ended the step carries, and the kept output against its sha256. Changing one
byte of any of them, or leaving an event out, fails the check.

What it cannot show offline is that the segment belongs to the deployment's chain: that is
``keyturn audit verify`` against the checkpoint kept in Vault, whose head the file names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from keyturn.domain import command_sha256
from keyturn.recording.output import record_hash, sha256
from keyturn.store.audit_log import event_hash

FORMAT = 1


class EvidenceBroken(ValueError):
    """The file does not prove what it says: the first problem found."""


@dataclass(frozen=True)
class Proven:
    step: str
    events: int
    first_seq: int
    last_seq: int


def check(evidence: dict[str, Any]) -> Proven:
    """What the file proves, or :class:`EvidenceBroken` naming the first thing it does not."""
    try:
        return _check(evidence)
    except EvidenceBroken:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EvidenceBroken(f"not a keyturn evidence file: {type(exc).__name__}: {exc}") from None


def _check(evidence: dict[str, Any]) -> Proven:
    if evidence.get("keyturn_evidence") != FORMAT:
        raise EvidenceBroken(f"not a keyturn evidence file (format {FORMAT})")
    events = evidence["events"]
    if not events:
        raise EvidenceBroken("the file holds no audit events")
    _chain(events)
    step = evidence["step"]
    step_id = step["id"]
    own = [e for e in events if _is_own(e, step_id)]
    if not own:
        raise EvidenceBroken(f"no event in the segment is about step {step_id}")
    _command(step, own)
    _decisions(step, own)
    _grant(step, own)
    _recording(evidence.get("recording"), step_id, own)
    return Proven(step_id, len(events), events[0]["seq"], events[-1]["seq"])


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


def _command(step: dict[str, Any], own: list[dict[str, Any]]) -> None:
    digest = command_sha256(step["command"])
    said = {_data(e).get("command_sha256") for e in own} - {None}
    if said != {digest}:
        raise EvidenceBroken("the command is not the one the audit events name (sha256)")


def _decisions(step: dict[str, Any], own: list[dict[str, Any]]) -> None:
    kinds = {
        "approve": ("request.approved", "request.approval_recorded"),
        "deny": ("request.denied",),
    }
    for decision in step["decisions"]:
        if not any(
            e["kind"] in kinds[decision["decision"]] and e["actor"] == decision["by"] for e in own
        ):
            raise EvidenceBroken(
                f"no audit event records {decision['by']}'s {decision['decision']}"
            )


def _grant(step: dict[str, Any], own: list[dict[str, Any]]) -> None:
    grant = step.get("grant")
    if grant is None:
        return
    of_grant = [e for e in own if e["grant_id"] == grant["id"]]
    if not any(e["kind"] == "grant.issued" for e in of_grant):
        raise EvidenceBroken("no audit event records the grant's credentials being issued")
    if grant["ended_at"] and not any(e["kind"] == f"grant.{grant['status']}" for e in of_grant):
        raise EvidenceBroken(f"no audit event records the grant being {grant['status']}")


def _recording(recording: dict[str, Any] | None, step_id: str, own: list[dict[str, Any]]) -> None:
    vouched = [_data(e)["output"] for e in own if "output" in _data(e)]
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
