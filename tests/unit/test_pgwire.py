"""The Postgres protocol's sans-IO parts: bytes in at every split, events out; values between
the wire and keyturn; what a statement means for a session."""

from __future__ import annotations

import decimal
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edges.pgwire import protocol as pg
from gateway.edges.pgwire.statements import BadStatement, prepare, split
from gateway.edges.pgwire.values import ValueError_, cell, literal, param_text
from keyturn.classify.readonly import statement_texts
from keyturn.classify.session import Refused, SessionSettings
from keyturn.classify.sql import parse
from keyturn.errors import TooComplex

SETTINGS = SessionSettings(("$user", "public"), "Etc/UTC")


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


STARTUP = struct.pack("!i", 196608) + b"user\0crew\0database\0shop\0\0"
SESSION = (
    struct.pack("!i", len(STARTUP) + 4)
    + STARTUP
    + _msg(b"p", b"token\0")
    + _msg(b"P", b"s1\0SELECT $1\0" + struct.pack("!hI", 1, 23))
    + _msg(b"B", b"\0s1\0" + struct.pack("!hh", 1, 1) + struct.pack("!hi", 1, 4) + b"\0\0\0\x07" + struct.pack("!hh", 1, 0))
    + _msg(b"D", b"P\0")
    + _msg(b"E", b"\0" + struct.pack("!i", 0))
    + _msg(b"S", b"")
    + _msg(b"Q", b"SELECT 1\0")
    + _msg(b"X", b"")
)  # fmt: skip
EXPECTED = [
    pg.Startup(0, {"user": "crew", "database": "shop"}),
    pg.Password("token"),
    pg.Parse("s1", "SELECT $1", (23,)),
    pg.Bind("", "s1", (1,), (b"\0\0\0\x07",), (0,)),
    pg.Describe("P", ""),
    pg.Execute("", 0),
    pg.Sync(),
    pg.Query("SELECT 1"),
    pg.Terminate(),
]


def test_a_session_split_at_every_byte_gives_the_same_events() -> None:
    for cut in range(len(SESSION) + 1):
        conn = pg.Connection()
        rest = SESSION[cut:]
        events = conn.receive(SESSION[:cut]) + (conn.receive(rest) if rest else [])
        assert events == EXPECTED, cut
        assert conn.state is pg.State.CLOSED


def test_one_byte_at_a_time() -> None:
    conn = pg.Connection()
    events = [e for i in range(len(SESSION)) for e in conn.receive(SESSION[i : i + 1])]
    assert events == EXPECTED


@pytest.mark.parametrize(
    ("data", "sqlstate"),
    [
        (struct.pack("!ii", 1 << 30, 196608), "08P01"),  # startup past 10,000 bytes
        (struct.pack("!ii", 8, 2 << 16), "0A000"),  # protocol 2
        (struct.pack("!i", 9) + struct.pack("!i", 196608) + b"x", "08P01"),  # no terminator
    ],
)
def test_bad_startup_packets(data: bytes, sqlstate: str) -> None:
    with pytest.raises(pg.ProtocolError) as caught:
        pg.Connection().receive(data)
    assert caught.value.sqlstate == sqlstate


def _ready() -> pg.Connection:
    conn = pg.Connection(max_message=1024)
    conn.receive(struct.pack("!i", len(STARTUP) + 4) + STARTUP + _msg(b"p", b"t\0"))
    assert conn.state is pg.State.READY
    return conn


@pytest.mark.parametrize(
    "data",
    [
        b"Q" + struct.pack("!i", 1 << 30),  # refused from the header: nothing buffered
        b"Q" + struct.pack("!i", 3),
        b"z" + struct.pack("!i", 4),
        b"F" + struct.pack("!i", 4),
        b"p" + struct.pack("!i", 5) + b"\0",  # a password after authentication
        _msg(b"B", b"\0\0" + struct.pack("!h", 500)),
        _msg(b"B", b"\0\0" + struct.pack("!hh", 1, 7) + struct.pack("!hh", 0, 0)),
        _msg(b"E", b"\0"),
        _msg(b"S", b"x"),
        _msg(b"Q", b"\xff\0"),
        _msg(b"D", b"Z\0"),
    ],
)
def test_bad_messages_end_the_connection(data: bytes) -> None:
    conn = _ready()
    with pytest.raises(pg.ProtocolError):
        conn.receive(data)
    assert conn.state is pg.State.CLOSED
    with pytest.raises(pg.ProtocolError):
        conn.receive(_msg(b"S", b""))


@given(st.binary(max_size=200))
def test_any_bytes_are_events_or_a_protocol_error(data: bytes) -> None:
    conn = _ready()
    try:
        conn.receive(data)
    except pg.ProtocolError:
        assert conn.state is pg.State.CLOSED


def test_an_ssl_request_stops_the_read_so_nothing_rides_in_behind_it() -> None:
    conn = pg.Connection()
    events = conn.receive(struct.pack("!ii", 8, pg.SSL_REQUEST) + struct.pack("!i", 8))
    assert events == [pg.SslRequest()] and conn.buffered == 4


def test_backend_messages() -> None:
    assert pg.ready("I") == b"Z\0\0\0\5I"
    assert (
        pg.data_row([b"1", None])
        == b"D" + struct.pack("!ih", 15, 2) + b"\0\0\0\x011\xff\xff\xff\xff"
    )
    error = pg.error("42501", "no\0pe", hint="h")
    assert error.startswith(b"E") and b"no\0pe" not in error and b"Hh\0" in error


# ------------------------------------------------------------------ values


@pytest.mark.parametrize(
    ("text", "cast", "sql"),
    [
        ("it's", None, "('it''s')"),
        ("\\'; DROP TABLE t; --", None, "('\\''; DROP TABLE t; --')"),
        (None, "int4", "(NULL::int4)"),
        ("5", '"pg_catalog"."int4"', '(\'5\'::"pg_catalog"."int4")'),
    ],
)
def test_literals(text: str | None, cast: str | None, sql: str) -> None:
    assert literal(text, cast) == sql
    assert len(parse(f"SELECT {sql}")) == 1  # one statement, whatever the value


def test_a_nul_is_refused() -> None:
    with pytest.raises(ValueError_):
        literal("a\0b", None)


@pytest.mark.parametrize(
    "value",
    ["0", "1", "-1", "12345.678", "0.0001", "100000000", "-0.5", "1E+5", "123456789012345678901.5"],
)
def test_numeric_binary_round_trip(value: str) -> None:
    raw = cell(value, 1700, True)
    assert raw is not None
    assert decimal.Decimal(param_text(raw, True, 1700)) == decimal.Decimal(value)


@pytest.mark.parametrize(
    ("value", "oid", "binary"),
    [
        (True, 16, b"\x01"),
        (7, 23, struct.pack("!i", 7)),
        (7, 20, struct.pack("!q", 7)),
        (1.5, 701, struct.pack("!d", 1.5)),
        ("abc", 25, b"abc"),
        ("2026-12-07", 1082, struct.pack("!i", 9837)),
        ("2000-01-01 00:00:01+00", 1184, struct.pack("!q", 1_000_000)),
        (
            "4f6f6d69-0000-4000-8000-000000000000",
            2950,
            bytes.fromhex("4f6f6d69000040008000000000000000"),
        ),
    ],
)
def test_binary_cells_read_back(value: object, oid: int, binary: bytes) -> None:
    assert cell(value, oid, True) == binary
    assert param_text(binary, True, oid) is not None


@pytest.mark.parametrize(
    ("value", "oid", "text"),
    [
        (True, 16, b"t"),
        (1.0, 701, b"1"),
        ("NaN", 701, b"NaN"),
        ([1, None, 3], 1007, b"{1,NULL,3}"),
        (["a b", 'q"', "NULL"], 1009, b'{"a b","q\\"","NULL"}'),
        ("AAE=", 17, b"\\x0001"),
        ({"a": 1}, 3802, b'{"a": 1}'),
        (None, 25, None),
    ],
)
def test_text_cells(value: object, oid: int, text: bytes | None) -> None:
    assert cell(value, oid, False) == text


def test_binary_of_an_unknown_type_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError_, match="text only"):
        cell("(1,2)", 600, True)
    with pytest.raises(ValueError_, match="send it as text"):
        param_text(b"\0", True, 600)
    with pytest.raises(ValueError_, match="malformed"):
        param_text(b"\0\0", True, 23)


def test_a_masked_number_is_refused_not_sent_as_another_type() -> None:
    with pytest.raises(ValueError_, match="masked"):
        cell("************1111", 1700, False)
    assert cell("1E+5", 1700, False) == b"1E+5"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        struct.pack("!iiI", 1, 0, 23),  # no dimensions after the header
        struct.pack("!iiIiiii", 2, 0, 23, 1, 1, 0, 1),  # a zero dimension
        struct.pack("!iiIii", 1, 0, 23, 1 << 30, 1),  # more elements than bytes
        struct.pack("!iiIii", 1, 0, 25, 1, 1) + struct.pack("!i", 1) + b"x",  # wrong element
    ],
)
def test_malformed_binary_arrays_are_refused(raw: bytes) -> None:
    with pytest.raises(ValueError_):
        param_text(raw, True, 1007)


def test_binary_arrays_read_back() -> None:
    raw = struct.pack("!iiIii", 1, 1, 23, 2, 1) + struct.pack("!ii", 4, 5) + struct.pack("!i", -1)
    assert param_text(raw, True, 1007) == "{5,NULL}"


# ------------------------------------------------------------------ statements


def test_placeholders_are_found_by_the_scanner_not_by_grep() -> None:
    prepared = prepare("SELECT 'é $9', $1 /* $3 */, $$ $4 $$, $2", (), SETTINGS)
    assert prepared.count == 2
    assert prepared.bound(["(1)", "(2)"]) == "SELECT 'é $9', (1) /* $3 */, $$ $4 $$, (2)"


def test_a_prepared_statement_is_one_statement() -> None:
    with pytest.raises(BadStatement):
        prepare("SELECT 1; SELECT 2", (), SETTINGS)
    with pytest.raises(BadStatement):
        prepare("SELECT $0", (), SETTINGS)


def test_statements_are_split_by_characters() -> None:
    """pglast's locations count characters: slicing bytes cut a statement after é."""
    texts = [text for text, _ in statement_texts("SELECT 'éééééé'; SELECT 2; SELECT 3")]
    assert texts == ["SELECT 'éééééé'", "SELECT 2", "SELECT 3"]
    assert [s.text for s in split("BEGIN; SELECT 'é'; COMMIT", SETTINGS)] == [
        "BEGIN",
        "SELECT 'é'",
        "COMMIT",
    ]


@pytest.mark.parametrize(
    ("sql", "tag", "setting"),
    [
        ("BEGIN", "BEGIN", None),
        ("START TRANSACTION ISOLATION LEVEL READ COMMITTED", "START TRANSACTION", None),
        ("COMMIT", "COMMIT", None),
        ("SET application_name = 'crew'", "SET", ("application_name", "crew")),
        ("SET extra_float_digits = 3", "SET", None),
        ("SET client_encoding TO 'UTF8'", "SET", ("client_encoding", "UTF8")),
        ("SET DateStyle = ISO", "SET", ("DateStyle", "ISO, MDY")),
        ('SET search_path = "$user", public', "SET", None),
        ("SET TIME ZONE 'Etc/UTC'", "SET", None),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED", "SET", None),
    ],
)
def test_what_the_edge_answers_itself(sql: str, tag: str, setting: tuple[str, str] | None) -> None:
    (statement,) = split(sql, SETTINGS)
    assert statement.effect is not None and statement.refused is None
    assert (statement.effect.tag, statement.effect.setting) == (tag, setting)


@pytest.mark.parametrize(
    "sql",
    [
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
        "SET search_path = pg_temp",
        "SET client_encoding = 'LATIN1'",
        "SET DateStyle = 'German'",
        "SET statement_timeout = 0",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "BEGIN READ ONLY",
        "PREPARE TRANSACTION 'x'",
        "COMMIT AND CHAIN",
        "DISCARD ALL",
        "UNLISTEN *",
        "FETCH ALL FROM c",
        "CLOSE c",
        "LOCK TABLE orders",
        "COPY (SELECT 1) TO STDOUT",
        "SET application_name = '" + "x" * 64 + "'",
    ],
)
def test_what_the_edge_refuses(sql: str) -> None:
    (statement,) = split(sql, SETTINGS)
    assert isinstance(statement.refused, Refused)


def test_everything_else_is_judged() -> None:
    for sql in ("SELECT 1", "UPDATE t SET a = 1", "SHOW search_path", "DO $$ BEGIN END $$"):
        (statement,) = split(sql, SETTINGS)
        assert statement.effect is None and statement.refused is None


def test_the_operator_count_spares_what_cannot_nest() -> None:
    """keyturn.classify.sql.MAX_OPERATORS counts what can deepen a tree, not a bulk INSERT's
    NULLs, TRUEs and DEFAULTs."""
    rows = ", ".join("(NULL, TRUE, DEFAULT)" for _ in range(3000))
    assert len(parse(f"INSERT INTO t VALUES {rows}")) == 1
    with pytest.raises(TooComplex):
        parse("SELECT " + " || ".join(["'a'"] * 6000))
