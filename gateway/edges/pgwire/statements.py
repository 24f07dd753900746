"""Statements as a Postgres client sends them: split, parameters found, literals put in.

A Parse message carries one statement with ``$n`` placeholders; a Query message one or more
statements. Both are parsed once with pglast here. Placeholders are found by pglast's scanner
(a ``$1`` inside a string or a comment is not one), and a Bind's values take their places as
quoted literals (:func:`gateway.edges.pgwire.values.literal`): the statement keyturn judges,
records, shows and runs is that one text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast, parser

from gateway.usecases.driver import Described
from keyturn.classify.readonly import statement_texts
from keyturn.classify.session import Effect, Refused, SessionSettings, session_effect

MAX_PARAMS = 65535  # the protocol's own limit (an int16 count)


@dataclass(frozen=True)
class Statement:
    """One statement: its text as sent, what it does to the session, how to tag its end."""

    text: str
    effect: Effect | None  # answered by the edge itself (transaction control, a harmless SET)
    refused: Refused | None  # refused by the edge (session state keyturn does not carry)
    tag: str  # the command tag's word for a read (SELECT, SHOW, EXPLAIN…)

    @property
    def empty(self) -> bool:
        return not self.text.strip(" \t\n\r;")


@dataclass
class Prepared:
    """A Parse's statement: where its placeholders are, and (once asked) its description."""

    statement: Statement
    placeholders: tuple[tuple[int, int, int], ...]  # (start, end, n) of each $n, in the text
    count: int  # parameters it takes: the highest $n
    client_oids: tuple[int, ...]  # the types the client gave (0: infer)
    described: Described | None = field(default=None)

    def given(self, i: int) -> int:
        """The type oid the client gave parameter ``i`` (0-based), or 0 (infer it)."""
        return self.client_oids[i] if i < len(self.client_oids) else 0

    def bound(self, literals: list[str]) -> str:
        """The text with each ``$n`` replaced by the n-th literal."""
        text, out, at = self.statement.text, [], 0
        for start, end, n in self.placeholders:
            out.append(text[at:start])
            out.append(literals[n - 1])
            at = end
        out.append(text[at:])
        return "".join(out)


_TAGS = {
    ast.SelectStmt: "SELECT",
    ast.VariableShowStmt: "SHOW",
    ast.ExplainStmt: "EXPLAIN",
    ast.InsertStmt: "INSERT 0",
    ast.UpdateStmt: "UPDATE",
    ast.DeleteStmt: "DELETE",
}


def _statement(text: str, node: ast.Node | None, settings: SessionSettings) -> Statement:
    try:
        effect, refused = session_effect(node, settings), None
    except Refused as exc:
        effect, refused = None, exc
    return Statement(text, effect, refused, _TAGS.get(type(node), "SELECT"))


def split(sql: str, settings: SessionSettings) -> list[Statement]:
    """A Query message's statements, each with its own text as sent (raises pglast's
    ParseError; an empty query is no statement)."""
    return [_statement(text, node, settings) for text, node in statement_texts(sql)]


class BadStatement(Exception):
    """A Parse keyturn cannot take (several statements, a parameter number out of range)."""


def prepare(sql: str, client_oids: tuple[int, ...], settings: SessionSettings) -> Prepared:
    """A Parse message's statement, its text the whole message (raises pglast's ParseError,
    or BadStatement)."""
    statements = split(sql, settings)
    if len(statements) > 1:
        raise BadStatement("cannot insert multiple commands into a prepared statement")
    first = statements[0] if statements else Statement("", None, None, "")
    statement = Statement(sql, first.effect, first.refused, first.tag)
    spans = []
    for token in parser.scan(sql):  # pglast counts characters, as Python does
        if token.name == "PARAM":
            number = int(sql[token.start + 1 : token.end + 1])
            if not 0 < number <= MAX_PARAMS:
                raise BadStatement(f"there is no parameter ${number}")
            spans.append((token.start, token.end + 1, number))
    count = max([n for *_, n in spans] + [len(client_oids)])
    return Prepared(statement, tuple(spans), count, client_oids)
