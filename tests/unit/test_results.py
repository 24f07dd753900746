"""Bounding and shaping results: the server-side cut, masking of cut values, the caps."""

from __future__ import annotations

from gateway.drivers.postgres.fetch import bounded_select
from gateway.drivers.postgres.values import Cut, Fetched, Limits, jsonable, shape
from keyturn.config.rules import Masking
from keyturn.masking import Masker

MASKER = Masker.from_policy(Masking(columns=["*email*"], detectors=["email", "credit_card"]))
LIMITS = Limits(rows=100, value_bytes=1024, response_bytes=4096)


def test_only_variable_length_columns_are_wrapped() -> None:
    assert bounded_select("SELECT 1", [23, 2950], 1024) is None
    wrapped = bounded_select("SELECT id, note FROM t -- trailing", [23, 25], 99)
    assert wrapped is not None
    assert "_k.c0," in wrapped and "octet_length(_k.c1) > 99" in wrapped
    assert "left(_k.c1::text, 99)" in wrapped
    assert "-- trailing\n)" in wrapped  # a trailing comment cannot swallow the parenthesis


def test_a_cut_value_loses_its_tail_after_masking() -> None:
    value = Cut("x" * 900 + " ada@example.com 4111 1111 1111")
    rows, truncated = shape(Fetched(["note"], [[value]]), MASKER, LIMITS)
    assert truncated == "value_bytes"
    assert set(rows[0][0]) == {"x"} and len(rows[0][0]) > 600  # nothing of the PII is left


def test_the_gateway_cuts_what_the_server_did_not() -> None:
    rows, truncated = shape(Fetched(["plan"], [["é" * 2000], [[1] * 1000]]), MASKER, LIMITS)
    assert truncated == "value_bytes"
    assert len(rows[0][0].encode()) <= 1024 - 256 and isinstance(rows[1][0], str)


def test_masked_columns_and_the_response_cap() -> None:
    fetched = Fetched(["id", "email"], [[i, f"user{i}@example.com"] for i in range(500)])
    rows, truncated = shape(fetched, MASKER, LIMITS)
    assert truncated == "response_bytes" and 50 < len(rows) < 500
    assert rows[0] == [0, "***"]


def test_json_has_no_nan() -> None:
    assert [jsonable(float("nan")), jsonable(float("-inf")), jsonable(1.5)] == [
        "NaN",
        "-Infinity",
        1.5,
    ]


def test_a_result_of_another_width_than_lineage_counted_is_masked_whole() -> None:
    """The red team's (f()).* made lineage count fewer columns than came back; the gateway
    then masked by name only, and a renamed email was clear but for the detector."""
    fetched = Fetched(["e2", "x"], [["secret-value", 1]])
    rows, _ = shape(fetched, MASKER, LIMITS, masked=(True,))
    assert rows == [["***", "***"]]
    rows, _ = shape(fetched, MASKER, LIMITS, masked=(True, False))
    assert rows == [["***", 1]]
