"""What a run keeps of a step, how it is shown and replayed, and the offline proof."""

from __future__ import annotations

import copy
import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bot.run_view import MODAL_BLOCKS, card_blocks, run_modal
from keyturn.chain import GENESIS, event_hash
from keyturn.domain import command_sha256
from keyturn.recording.output import canonical, fit, make_recording, record_hash, sha256, tags
from keyturn.recording.proof import EvidenceBroken, check, seal_message, seal_of
from keyturn.recording.runs import BadRunId, GrantLife, Run, RunSoFar, Step, Vote, check_run_id
from keyturn.recording.terminal import IDLE_CAP, asciicast, frames, rendered
from keyturn.recording.timeline import json_lines, step_json

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
ROWS = {"columns": ["id", "email"], "rows": [[1, "***"], [2, "***"]], "row_count": 2}


# ------------------------------------------------------------------ what is kept


def test_a_record_keeps_the_output_and_hashes_what_the_agent_saw() -> None:
    step = uuid.uuid4()
    kept = make_recording(step, ROWS, kept="masked", cap=65536)
    assert kept.output() == ROWS and not kept.truncated and kept.intact()
    assert kept.sha256 == sha256(canonical(ROWS)) == kept.stored_sha256
    assert kept.bytes == len(canonical(ROWS).encode())
    assert kept.as_event() | {"record": ""} == {
        "step": str(step), "record": "", "bytes": kept.bytes, "sha256": kept.sha256,
        "kept": "masked", "truncated": False,
    }  # fmt: skip
    nothing = make_recording(step, ROWS, kept="none", cap=65536)
    assert nothing.text is None and nothing.sha256 == kept.sha256 and nothing.intact()
    shape = make_recording(step, ROWS | {"stdout": "héllo"}, kept="tags", cap=65536)
    assert shape.output() == {
        "columns": ["id", "email"], "row_count": 2, "rows_count": 2, "stdout_bytes": 6,
    }  # fmt: skip


def test_every_field_of_a_record_is_in_its_hash() -> None:
    step = uuid.uuid4()
    base = (step, "masked", 10, "a" * 64, False, "b" * 64)
    seen = {record_hash(*base)}
    for i, other in enumerate((uuid.uuid4(), "tags", 11, "c" * 64, True, "d" * 64)):
        changed = list(base)
        changed[i] = other
        seen.add(record_hash(*changed))  # type: ignore[arg-type]
    assert len(seen) == 7
    # length-prefixed: no value can shift into its neighbour
    assert record_hash(step, "masked", 1, "23", False, "") != record_hash(
        step, "masked", 12, "3", False, ""
    )


def test_tags_keep_the_shape_and_none_of_the_values() -> None:
    http = {"status": 200, "headers": {"X-Secret": "v"}, "json": {"a": 1}, "bytes": 7}
    assert tags(http) == {"status": 200, "bytes": 7}
    shell = {"exit_status": 0, "stdout": "out", "stderr": "", "timing": [[0.1, "stdout", 3]]}
    assert tags(shell) == {
        "exit_status": 0,
        "stdout_bytes": 3,
        "stderr_bytes": 0,
        "timing_count": 1,
    }
    # a database quotes values in its errors: an error keeps only its size
    failed = {"error": '22P02: invalid input syntax for type integer: "4111-SECRET"'}
    assert tags(failed) == {"error_bytes": 59}
    kept = make_recording(uuid.uuid4(), failed, kept="tags", cap=65536)
    assert "SECRET" not in (kept.text or "") and kept.bytes > 59


def test_a_long_output_is_fitted_as_json_within_the_cap() -> None:
    big = {"columns": ["v"], "rows": [["x" * 1000, i] for i in range(500)], "row_count": 500}
    text, cut = fit(canonical(big), 4096)
    assert cut and len(text.encode()) <= 4096
    value = json.loads(text)  # never cut mid-JSON
    assert value["columns"] == ["v"] and value["row_count"] == 500  # the top level stays
    assert 0 < len(value["rows"]) < 500 or all(len(r[0]) < 1000 for r in value["rows"])
    unicode = {"stdout": "é" * 10_000}
    text, cut = fit(canonical(unicode), 1024)
    assert cut and len(text.encode()) <= 1024 and set(json.loads(text)["stdout"]) == {"é"}


def test_an_output_whose_shape_alone_is_over_the_cap_is_replaced_by_a_note() -> None:
    keys = {f"key-{i:05}": i for i in range(2000)}  # a top level of 2,000 keys
    text, cut = fit(canonical(keys), 1024)
    assert cut and json.loads(text) == {
        "cut": "the output's shape alone is over record.output_bytes"
    }


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "1 to 200 characters"),
        ("x" * 201, "1 to 200 characters"),
        ("run\n1", "letters, digits"),
        (" auto-1", "letters, digits"),
        ("a/b", "letters, digits"),
        ("?", "letters, digits"),
        ("\x1b]0;x\x07", "letters, digits"),
        ("auto-123", "keyturn's own runs"),
    ],
)
def test_run_ids_an_agent_may_not_use(value: str, problem: str) -> None:
    with pytest.raises(BadRunId, match=problem):
        check_run_id(value)
    assert check_run_id("nightly-7") == "nightly-7"


# ------------------------------------------------------------------ views


def _step(n: int, at: datetime, took: float = 0.5, **fields: Any) -> Step:
    output = fields.pop("output", ROWS)
    ident = uuid.uuid4()
    kept = make_recording(ident, output, kept="masked", cap=65536) if output is not None else None
    return Step(
        id=ident, agent="crew-7", run_id="r1", run="r1", at=at, target="shop",
        command=fields.pop("command", f"SELECT {n}"), verdict=fields.pop("verdict", "allowed"),
        status=fields.pop("status", "executed"), rule=fields.pop("rule", "reads"),
        ended_at=at + timedelta(seconds=took), recording=kept, **fields,
    )  # fmt: skip


def _run() -> Run:
    held = T0 + timedelta(seconds=3)
    approved = Vote("U1", "approve", held + timedelta(minutes=40), None)
    grant = GrantLife(uuid.uuid4(), approved.at, approved.at + timedelta(minutes=5), "revoked",
                      approved.at + timedelta(seconds=2), "keyturn")  # fmt: skip
    return Run(
        "r1",
        [
            _step(1, T0),
            _step(2, T0 + timedelta(seconds=1), command="DROP TABLE t", verdict="blocked",
                  status="blocked", rule="no-drop",
                  output={"error": {"code": "blocked", "message": "never", "rule": "no-drop"}}),
            Step(uuid.uuid4(), "crew-7", "r1", "r1", held, "shop", "UPDATE t SET a = 1\nWHERE id = 2",
                 "held", "executed", "writes", approved.at + timedelta(seconds=1), None,
                 (approved,), grant, make_recording(uuid.uuid4(), {"tags": ["UPDATE 1"], "columns": [],
                 "rows": [], "row_count": 0}, kept="masked", cap=65536)),
            _step(4, approved.at + timedelta(seconds=2), command="uptime", output={
                "exit_status": 0, "stdout": "one\ntwo\n", "stderr": "",
                "timing": [[0.0, "stdout", 4], [0.5, "stdout", 8]]}),
        ],
    )  # fmt: skip


def test_frames_are_in_time_order_with_idle_gaps_capped() -> None:
    shown = frames(_run())
    times = [f.at for f in shown]
    assert times == sorted(times)
    assert all(b - a <= IDLE_CAP + 1e-9 for a, b in itertools.pairwise(times))
    assert times[-1] < 4 * IDLE_CAP + 3  # forty minutes of waiting replays in seconds
    markers = [f.text for f in shown if f.code == "m"]
    assert markers[1].startswith("held for approval (request ")
    assert markers[:1] + markers[2:] == [
        "blocked by rule no-drop",
        "approved by U1",
        "credentials issued until 12:45:03",
        "credentials revoked by keyturn",
    ]
    typed = [f.text for f in shown if f.code == "i"]
    assert typed[2] == "UPDATE t SET a = 1\nWHERE id = 2\n"
    outputs = "".join(f.text for f in shown if f.code == "o")
    assert "id | email\r\n1 | ***" in outputs and "ERROR: never" in outputs
    assert outputs.index("UPDATE 1") < outputs.index("one\r\n") < outputs.index("two\r\n")


def test_shell_output_keeps_its_pacing_and_masking_shifts_nothing_out() -> None:
    masked = {"exit_status": 0, "stdout": "a *** b\n", "stderr": "",
              "timing": [[0.0, "stdout", 3], [1.0, "stdout", 16]]}  # fmt: skip
    run = Run("r", [_step(1, T0, took=2.0, command="tail", output=masked)])
    outs = [f for f in frames(run, idle_cap=10) if f.code == "o"][1:]
    assert "".join(f.text for f in outs).startswith("a *** b\r\n")  # every masked char, once
    assert outs[1].at - outs[0].at == pytest.approx(1.0)


def test_asciicast_v2_and_v3_and_json_lines() -> None:
    run = _run()
    header, *events = [json.loads(line) for line in asciicast(run, 2).splitlines()]
    assert header["version"] == 2 and header["width"] == 120 and header["height"] == 40
    assert header["timestamp"] == int(T0.timestamp()) and "r1" in header["title"]
    assert all(len(e) == 3 and e[1] in ("i", "o", "m") for e in events)
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    header3, *events3 = [json.loads(line) for line in asciicast(run, 3).splitlines()]
    assert header3["version"] == 3 and header3["term"] == {"cols": 120, "rows": 40}
    assert sum(e[0] for e in events3) == pytest.approx(events[-1][0])  # intervals
    lines = [json.loads(line) for line in json_lines(run).splitlines()]
    assert [(x["run"], x["number"], x["verdict"]) for x in lines] == [
        ("r1", 1, "allowed"), ("r1", 2, "blocked"), ("r1", 3, "held"), ("r1", 4, "allowed"),
    ]  # fmt: skip
    assert lines[2]["decisions"][0]["by"] == "U1" and lines[2]["grant"]["status"] == "revoked"


def test_a_deleted_or_unkept_output_is_said_so() -> None:
    step = _step(1, T0)
    assert step.recording is not None
    gone = Run("r", [Step(**{**step.__dict__, "recording": type(step.recording)(
        **{**step.recording.__dict__, "text": None})})])  # fmt: skip
    shown = "".join(f.text for f in frames(gone))
    assert "deleted by retention" in shown and "***" not in shown
    assert step_json(gone.steps[0], 1)["output"]["deleted"] is True


def test_rendered_outputs() -> None:
    assert rendered({"status": 201, "headers": {}, "json": {"a": 1}}).startswith("HTTP 201\r\n{")
    assert "(exit 2)" in rendered({"exit_status": 2, "stdout": "", "stderr": "no"})
    assert rendered(None) == ""


# ------------------------------------------------------------------ the approver's view


def test_the_card_shows_the_run_so_far_inert() -> None:
    sneaky = _step(1, T0, command="SELECT '<!channel> `x`' -- " + "y" * 200)
    blocks = card_blocks(RunSoFar("nightly<@U1>", (sneaky,), 7), "req-1")
    text = blocks[0]["text"]["text"]
    assert "<!channel>" not in text and "&lt;!channel&gt;" in text and "<@U1>" not in text
    assert "the last 1 steps before this one, and 7 earlier steps" in text
    assert "y" * 100 not in text  # a step's command is cut on the card
    assert blocks[1]["elements"][0] == {
        "type": "button", "action_id": "keyturn_view_run", "value": "req-1",
        "text": {"type": "plain_text", "text": "View run"},
    }  # fmt: skip
    first = card_blocks(RunSoFar("r1", (), 0), "req-1")[0]["text"]["text"]
    assert "this is its first step" in first


def test_the_run_modal_stays_within_slack_s_limits() -> None:
    steps = tuple(_step(i, T0 + timedelta(seconds=i)) for i in range(150))
    modal = run_modal(RunSoFar("a-rather-long-run-name-indeed", steps, 12), "crew-7")
    assert len(modal["blocks"]) <= MODAL_BLOCKS and len(modal["title"]["text"]) <= 24
    body = json.dumps(modal["blocks"])
    assert "*162 steps*" in body and body.index("SELECT 149") < body.index("SELECT 148")
    assert "and 64 earlier" in body  # the 52 oldest steps that did not fit join the 12


# ------------------------------------------------------------------ evidence


def _chained(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    prev = GENESIS
    out = []
    for seq, e in enumerate(events, 1):
        at = T0 + timedelta(seconds=seq)
        row = {"seq": seq, "at": at.isoformat(), "grant_id": None, "request_id": None} | e
        row["data_text"] = json.dumps(e.get("data", {}))
        row.pop("data", None)
        row["prev_hash"] = prev
        row["hash"] = event_hash(
            prev_hash=prev, seq=seq, at=at, kind=row["kind"], actor=row["actor"],
            request_id=uuid.UUID(row["request_id"]) if row["request_id"] else None,
            grant_id=uuid.UUID(row["grant_id"]) if row["grant_id"] else None,
            data_text=row["data_text"],
        )  # fmt: skip
        prev = row["hash"]
        out.append(row)
    return out


def _evidence() -> dict[str, Any]:
    rid, gid = uuid.uuid4(), uuid.uuid4()
    command = "UPDATE t SET a = 1 WHERE id = 2"
    kept = make_recording(rid, {"tags": ["UPDATE 1"]}, kept="masked", cap=65536)
    r, g = str(rid), str(gid)
    opened = {"target": "shop", "command_sha256": command_sha256(command), "rule": "writes",
              "run_id": "r1"}  # fmt: skip
    events = _chained([
        {"kind": "request.held", "actor": "crew-7", "request_id": r, "data": opened},
        {"kind": "other.thing", "actor": "someone"},
        {"kind": "request.approved", "actor": "U1", "request_id": r},
        {"kind": "grant.issued", "actor": "keyturn", "request_id": r, "grant_id": g,
         "data": {"command_sha256": command_sha256(command)}},
        {"kind": "request.executing", "actor": "keyturn", "request_id": r, "grant_id": g},
        {"kind": "request.executed", "actor": "keyturn", "request_id": r,
         "data": {"output": kept.as_event()}},
        {"kind": "grant.revoked", "actor": "keyturn", "request_id": r, "grant_id": g},
    ])  # fmt: skip
    return {
        "keyturn_evidence": 1,
        "step": {
            "id": r, "agent": "crew-7", "run": "r1", "run_id": "r1", "target": "shop",
            "command": command, "verdict": "held", "status": "executed", "rule": "writes",
            "at": T0.isoformat(),
            "decisions": [{"by": "U1", "decision": "approve", "at": "", "reason": None}],
            "grant": {"id": g, "status": "revoked", "ended_at": T0.isoformat()},
        },
        "recording": {
            "step": r, "kept": kept.kept, "output": kept.text, "output_bytes": kept.bytes,
            "output_sha256": kept.sha256, "truncated": kept.truncated,
            "stored_sha256": kept.stored_sha256,
        },
        "events": events,
        "seal": None,
    }  # fmt: skip


def _tampered(change: Any) -> dict[str, Any]:
    evidence = copy.deepcopy(_evidence_once)
    change(evidence)
    return evidence


_evidence_once = _evidence()


def test_evidence_holds_offline_and_reports_what_the_events_say() -> None:
    proven = check(_evidence_once)
    assert (proven.events, proven.first_seq, proven.last_seq) == (7, 1, 7)
    assert (proven.agent, proven.target, proven.status) == ("crew-7", "shop", "executed")
    assert proven.decisions == (("U1", "approve"),) and proven.seal is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda e: e["recording"].update(output=e["recording"]["output"].replace("1", "2")),
            "the recorded output was changed",
        ),
        (lambda e: e["recording"].update(output_bytes=1), "hashes are not the ones"),
        (lambda e: e.update(recording=None), "vouch for a recording the file leaves out"),
        (lambda e: e["step"].update(command="DELETE FROM t"), "step's command is not"),
        (lambda e: e["step"].update(agent="crew-innocent"), "step's agent is not"),
        (lambda e: e["step"].update(target="staging"), "step's target is not"),
        (lambda e: e["step"].update(run_id="innocent"), "step's run_id is not"),
        (lambda e: e["step"].update(verdict="blocked"), "step's verdict is not"),
        (lambda e: e["step"].update(status="denied"), "not the one the events leave it in"),
        (lambda e: e["step"].update(decisions=[]), "decisions are not the ones"),
        (lambda e: e["step"]["decisions"][0].update(by="U2"), "decisions are not the ones"),
        (lambda e: e["step"].update(grant=None), "record a grant the file leaves out"),
        (lambda e: e["step"]["grant"].update(status="expired"), "did not end as the file says"),
        (lambda e: e["events"].pop(2), "events 3..3 are missing"),
        (lambda e: e["events"].pop(3), "events 4..4 are missing"),
        (lambda e: e["events"].pop(0), "not start with the step's first event"),
        (lambda e: e["events"][0].update(actor="crew-8"), "event 1 was changed"),
        (lambda e: e["events"][1].update(data_text='{"x": 1}'), "event 2 was changed"),
        (lambda e: e["events"][6].update(kind="grant.expired"), "event 7 was changed"),
        (
            lambda e: e.update(seal=seal_of(str(uuid.uuid4()), e["events"], "t")),
            "seal is not of this step's segment",
        ),
        (
            lambda e: e.update(seal=seal_of(e["step"]["id"], e["events"][:-1], "t")),
            "seal is not of this step's segment",
        ),
        (
            lambda e: e.update(seal={"seq": 7, "hash": e["events"][-1]["hash"]}),
            "seal is not of this step's segment",
        ),
        (lambda e: e.update(events=[]), "holds no audit events"),
        (lambda e: e.update(keyturn_evidence=2), "not a keyturn evidence file"),
        (lambda e: e.pop("step"), "not a keyturn evidence file"),
    ],
)
def test_evidence_fails_after_any_change(change: Any, problem: str) -> None:
    with pytest.raises(EvidenceBroken, match=problem):
        check(_tampered(change))


def test_evidence_ends_with_the_step_s_last_event_and_its_seal_says_so() -> None:
    """A sealed stretch of chain that goes on past the step cannot be passed off as the
    step's evidence: its status would be the one of the moment the stretch ends."""
    foreign = _chained(
        [
            {"kind": e["kind"], "actor": e["actor"], "request_id": e["request_id"],
             "grant_id": e["grant_id"], "data": json.loads(e["data_text"])}
            for e in _evidence_once["events"]
        ] + [{"kind": "request.held", "actor": "crew-9", "request_id": str(uuid.uuid4())}]
    )  # fmt: skip
    with pytest.raises(EvidenceBroken, match="does not end with the step's last event"):
        check(_evidence_once | {"events": foreign})
    sealed = _evidence_once | {
        "seal": seal_of(_evidence_once["step"]["id"], _evidence_once["events"], "t")
    }
    assert check(sealed).seal is not None
    assert seal_message(sealed["seal"]) != seal_message(sealed["seal"] | {"step": "x"})
    assert seal_message(sealed["seal"]).startswith(b"23:keyturn-evidence-seal/1|")


def test_a_file_that_is_not_evidence_is_told_so() -> None:
    for junk in ([], "x", {"keyturn_evidence": 1, "events": "x"}, None):
        with pytest.raises(EvidenceBroken):
            check(junk)


def test_nothing_recorded_can_drive_the_replaying_terminal() -> None:
    """An agent's command, a target's output and a person's reason carrying escape sequences:
    OSC 52 (the clipboard), a title, cursor moves that would hide a line or fake one."""
    evil = "\x1b]52;c;ZWNobyBwd25lZA==\x07\x1b[1A\x1b[2Kapproved by U_BOSS\x9b2J\r"
    rows = {"columns": [evil], "rows": [[evil, 1]], "row_count": 1, "tags": [evil]}
    shell = {"exit_status": 0, "stdout": evil, "stderr": evil, "timing": [[0.0, "stdout", 5]]}
    vote = Vote("U1" + evil, "deny", T0 + timedelta(seconds=1), evil)
    run = Run("r1", [
        _step(1, T0, command="SELECT 1 -- " + evil, output=rows, rule=evil),
        _step(2, T0, command=evil, output=shell, verdict="held", status="denied", votes=(vote,)),
        _step(3, T0, output={"error": {"message": evil}}, verdict="blocked", status="blocked",
              rule=evil),
        _step(4, T0, output={"status": 200, "headers": {}, "text": evil, "note": evil}),
    ])  # fmt: skip
    ours = ("\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m")  # keyturn's own colours
    header, *events = [json.loads(line) for line in asciicast(run).splitlines()]
    for text in [f.text for f in frames(run)] + [e[2] for e in events] + [header["title"]]:
        for code in ours:
            text = text.replace(code, "")
        assert "\x1b" not in text and "\x07" not in text and "\x9b" not in text
        assert "\r" not in text.replace("\r\n", "")
    assert "␛]52;c;" in "".join(f.text for f in frames(run))
    flipped = Run("r", [_step(1, T0, command="SELECT 1 /* \u202e; ELBAT PORD */ \u200b")])
    shown = "".join(f.text for f in frames(flipped))
    assert "\u202e" not in shown and "⟦U+202E⟧" in shown and "⟦U+200B⟧" in shown
