"""What a statement from a Postgres-protocol client means for its session, by its parse.

keyturn runs every statement on a session of its own choosing (the agent's read-only login,
or a one-shot login at approval), so nothing a client sets on "its" session carries to the
next statement. The wire edge answers some statements itself, and :func:`session_effect`
says which: transaction control (the client's block is kept as a status only, see
docs/decisions.md), and ``SET`` of a few settings that change nothing keyturn sends or that
already hold. Every other statement that would change session state (``SET ROLE``, ``RESET
ALL``, ``DISCARD``, ``LISTEN``, cursors, ``PREPARE``, ``COPY``…) is refused with its reason:
were it run, the client would believe in a state that does not exist. Anything else
(``None``) goes through judgement like any command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pglast import ast, enums

Kind = Literal["begin", "commit", "rollback", "savepoint", "release", "rollback_to", "set"]

_TX = enums.TransactionStmtKind
_TRANSACTION: dict[_TX, tuple[Kind, str]] = {
    _TX.TRANS_STMT_BEGIN: ("begin", "BEGIN"),
    _TX.TRANS_STMT_START: ("begin", "START TRANSACTION"),
    _TX.TRANS_STMT_COMMIT: ("commit", "COMMIT"),
    _TX.TRANS_STMT_ROLLBACK: ("rollback", "ROLLBACK"),
    _TX.TRANS_STMT_SAVEPOINT: ("savepoint", "SAVEPOINT"),
    _TX.TRANS_STMT_RELEASE: ("release", "RELEASE"),
    _TX.TRANS_STMT_ROLLBACK_TO: ("rollback_to", "ROLLBACK"),
}
_SESSION_STATE = {
    ast.DiscardStmt: "DISCARD",
    ast.ListenStmt: "LISTEN",
    ast.UnlistenStmt: "UNLISTEN",
    ast.NotifyStmt: "NOTIFY",
    ast.PrepareStmt: "PREPARE",
    ast.ExecuteStmt: "EXECUTE",
    ast.DeallocateStmt: "DEALLOCATE",
    ast.DeclareCursorStmt: "DECLARE",
    ast.FetchStmt: "FETCH",
    ast.ClosePortalStmt: "CLOSE",
    ast.LoadStmt: "LOAD",
    ast.LockStmt: "LOCK",
    ast.CopyStmt: "COPY",
}
ENCODINGS = frozenset({"utf8", "utf-8", "unicode"})
MAX_APPLICATION_NAME = 63  # Postgres's NAMEDATALEN - 1


@dataclass(frozen=True)
class SessionSettings:
    """What the sessions keyturn runs statements on already have (a ``SET`` to these is a
    no-op, so it is accepted)."""

    search_path: tuple[str, ...]
    timezone: str


@dataclass(frozen=True)
class Effect:
    kind: Kind
    tag: str  # the command tag the client is answered with
    setting: tuple[str, str] | None = None  # a ParameterStatus to report (name, value)


class Refused(Exception):
    """A statement keyturn refuses on the wire, with the SQLSTATE and reason to answer."""

    def __init__(self, message: str, sqlstate: str = "0A000") -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


def _values(args: tuple[ast.Node, ...] | None) -> list[str]:
    out = []
    for arg in args or ():
        if isinstance(arg, ast.A_Const) and not arg.isnull and arg.val is not None:
            value = arg.val
            out.append(str(getattr(value, "sval", None) or getattr(value, "ival", "")))
        else:
            raise Refused("SET takes plain values here")
    return out


def _transaction_options(options: tuple[ast.Node, ...] | None) -> None:
    """Options of BEGIN / SET TRANSACTION: keyturn gives each statement its own transaction,
    so only what that already is may be asked for."""
    for option in options or ():
        if not isinstance(option, ast.DefElem):
            raise Refused("unsupported transaction option")
        value = option.arg.val if isinstance(option.arg, ast.A_Const) else None
        raw = getattr(value, "sval", None) or getattr(value, "ival", None)
        if option.defname == "transaction_isolation" and raw == "read committed":
            continue
        if option.defname == "transaction_read_only" and raw == 0:
            continue
        if option.defname == "transaction_deferrable":
            continue
        raise Refused(
            "keyturn runs each statement in a transaction of its own (READ COMMITTED); "
            f"it cannot give a block {(option.defname or '').removeprefix('transaction_')} {raw}"
        )


def _set(node: ast.VariableSetStmt, settings: SessionSettings) -> Effect:
    kind = node.kind
    name = (node.name or "").lower()
    if kind == enums.VariableSetKind.VAR_SET_MULTI and name in (
        "transaction",
        "session characteristics",
    ):
        _transaction_options(node.args)
        return Effect("set", "SET")
    if kind != enums.VariableSetKind.VAR_SET_VALUE:
        what = "RESET ALL" if kind == enums.VariableSetKind.VAR_RESET_ALL else f"RESET {name}"
        raise Refused(f"{what} is refused: keyturn carries no session settings between statements")
    values = _values(node.args)
    if name == "application_name" and len(values) == 1:
        if len(values[0]) > MAX_APPLICATION_NAME:
            raise Refused("application_name is longer than 63 bytes", "22023")
        return Effect("set", "SET", ("application_name", values[0]))
    digits = len(values) == 1 and values[0].lstrip("-").isdigit()
    if name == "extra_float_digits" and digits and -15 <= int(values[0]) <= 3:
        return Effect("set", "SET")  # keyturn's floats are the shortest exact ones anyway
    if name == "client_encoding" and [v.lower() for v in values] in (
        ["utf8"],
        ["utf-8"],
        ["unicode"],
    ):
        return Effect("set", "SET", ("client_encoding", "UTF8"))
    if name == "datestyle" and {v.lower() for v in values} <= {"iso", "mdy"}:
        return Effect("set", "SET", ("DateStyle", "ISO, MDY"))
    if name == "search_path" and tuple(values) == settings.search_path:
        return Effect("set", "SET")
    if name == "timezone" and values == [settings.timezone]:
        return Effect("set", "SET")
    raise Refused(
        f"SET {name} is refused: keyturn runs each statement on a session of its own, where "
        f"only application_name, extra_float_digits, client_encoding UTF8, DateStyle ISO and "
        f"the target's own search_path ({', '.join(settings.search_path)}) and TimeZone "
        f"({settings.timezone}) can be set"
    )


def session_effect(node: ast.Node | None, settings: SessionSettings) -> Effect | None:
    """What the wire edge answers itself for ``node`` (one parsed statement), or None when it
    goes through judgement; raises Refused for a statement that would change session state."""
    if isinstance(node, ast.TransactionStmt):
        if node.kind not in _TRANSACTION:
            raise Refused("two-phase commit is not supported by keyturn")
        if node.chain:
            raise Refused("AND CHAIN is not supported by keyturn")
        kind, tag = _TRANSACTION[node.kind]
        if kind == "begin":
            _transaction_options(node.options)
        return Effect(kind, tag)
    if isinstance(node, ast.VariableSetStmt):
        return _set(node, settings)
    for cls, what in _SESSION_STATE.items():
        if isinstance(node, cls):
            raise Refused(
                f"{what} is refused: keyturn runs each statement on a session of its own, so "
                f"{what} would not do what it says"
            )
    return None
