"""What a run keeps of one step's output, and the hash the audit chain carries for it.

An output reaches here as the agent saw it: drivers mask before anything leaves the gateway,
so a recording never holds more than the agent was shown. It is kept as its canonical JSON
(the text whose sha256 is the request's ``result_digest``), fitted to ``record.output_bytes``
by cutting the longest lists and strings, never by cutting JSON mid-value; the full output's
size and sha256 are kept beside it either way.

One hash covers the record (:func:`record_hash`): the step, what was kept, the full output's
size and sha256, whether it was cut, and the sha256 of the kept text. The audit event that
ends the step carries it, so editing the kept text, its hashes or deleting the record breaks
``keyturn audit verify``; deleting only the kept text (retention) leaves every hash intact.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

Kept = Literal["none", "tags", "masked"]

# an output's shape, as opposed to its values: all ``record.outputs: tags`` keeps (of the
# rest, only sizes: a string's bytes, a list's length)
SHAPE = frozenset(
    {
        "columns",
        "row_count",
        "statements",
        "types",
        "tags",
        "truncated",
        "exit_status",
        "status",
        "bytes",
    }
)


def canonical(output: dict[str, Any]) -> str:
    """The one text of an output that is hashed, sized and kept."""
    return json.dumps(output, sort_keys=True, default=str)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_hash(
    step: uuid.UUID, kept: str, size: int, digest: str, truncated: bool, stored: str
) -> str:
    """The record's digest, fields length-prefixed so none can shift into its neighbour."""
    fields = [str(step), kept, str(size), digest, "1" if truncated else "0", stored]
    return sha256("|".join(f"{len(f)}:{f}" for f in fields))


@dataclass(frozen=True)
class Recording:
    """One step's output as kept: ``text`` is None when nothing of it is kept (``none``) or
    it was deleted by retention; ``stored_sha256`` stays."""

    step: uuid.UUID
    kept: Kept
    text: str | None
    bytes: int  # the full output's canonical JSON, in UTF-8 bytes
    sha256: str  # of the full output: the request's result_digest
    truncated: bool
    stored_sha256: str  # of ``text`` as first kept ("" when nothing was)

    @property
    def digest(self) -> str:
        """The record hash: what the audit event ending the step carries."""
        return record_hash(
            self.step, self.kept, self.bytes, self.sha256, self.truncated, self.stored_sha256
        )

    def as_event(self) -> dict[str, Any]:
        """What the audit event that ends the step says of its output."""
        return {
            "step": str(self.step),
            "record": self.digest,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "kept": self.kept,
            "truncated": self.truncated,
        }

    def output(self) -> dict[str, Any] | None:
        """The kept output, or None when nothing is kept."""
        return None if self.text is None else json.loads(self.text)

    def intact(self) -> bool:
        """The kept text is the one first kept (or none is left to check)."""
        return self.text is None or sha256(self.text) == self.stored_sha256


def make_recording(
    step: uuid.UUID,
    output: dict[str, Any],
    *,
    kept: Kept,
    cap: int,
    timing: list[Any] | None = None,
) -> Recording:
    """What is kept of ``output`` as ``kept`` says, at most ``cap`` bytes. Its size and
    sha256 are of ``output`` alone, as the agent saw it; ``timing`` (when SSH output arrived)
    is kept beside it for a replay."""
    text = canonical(output)
    size, digest = len(text.encode()), sha256(text)
    if kept == "none":
        return Recording(step, kept, None, size, digest, False, "")
    if kept == "tags":
        text = canonical(tags(output))
    elif timing:
        text = canonical(output | {"timing": timing})
        stored, truncated = fit(text, cap)
        return Recording(step, kept, stored, size, digest, truncated, sha256(stored))
    stored, truncated = fit(text, cap, size if kept == "masked" else None)
    same = kept == "masked" and not truncated  # the kept text is the output: one hash
    return Recording(
        step, kept, stored, size, digest, truncated, digest if same else sha256(stored)
    )


def tags(output: dict[str, Any]) -> dict[str, Any]:
    """The output's shape without its values: columns, counts, exit status, HTTP status, and
    the size of everything else (an error's text too: a database quotes values in it)."""
    shape = {k: v for k, v in output.items() if k in SHAPE}
    for key, value in output.items():
        if key in SHAPE:
            continue
        if isinstance(value, str):
            shape[f"{key}_bytes"] = len(value.encode())
        elif isinstance(value, list):
            shape[f"{key}_count"] = len(value)
    return shape


def fit(text: str, cap: int, size: int | None = None) -> tuple[str, bool]:
    """``text`` (canonical JSON of an object) within ``cap`` bytes, and whether it was cut.

    Lists and strings are cut to the longest common length that fits, found by bisection:
    rows are dropped from the end and long values lose their tails, and the top level keeps
    every key (exit status, columns, status code). Bounded: ~log2 of the longest value
    passes over an output the gateway already capped. ``size``: the text's UTF-8 length,
    when known.
    """
    if (len(text.encode()) if size is None else size) <= cap:
        return text, False
    value = json.loads(text)
    low, high = 0, _longest(value)
    best = canonical({k: _cut(v, 0) for k, v in value.items()})
    while low < high:
        mid = (low + high + 1) // 2
        trial = canonical({k: _cut(v, mid) for k, v in value.items()})
        if len(trial.encode()) <= cap:
            low, best = mid, trial
        else:
            high = mid - 1
    if len(best.encode()) > cap:  # even the bare shape is too large: its keys alone
        best = canonical({"cut": "the output's shape alone is over record.output_bytes"})
    return best, True


def _longest(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return max([len(value), *(_longest(v) for v in value)])
    if isinstance(value, dict):
        return max([len(value), *(_longest(v) for v in value.values())])
    return 0


def _cut(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, list):
        return [_cut(v, limit) for v in value[:limit]]
    if isinstance(value, dict):
        return {k: _cut(v, limit) for k, v in list(value.items())[:limit]}
    return value
