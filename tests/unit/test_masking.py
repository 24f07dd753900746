from __future__ import annotations

import subprocess
import sys

import pytest

from keyturn.config.rules import Masking
from keyturn.masking import MASK, Masker, luhn_ok

FULL_WIDTH_CARD = "".join(chr(0xFF10 + int(d)) for d in "4111111111111111")
ALL = Masker.from_policy(
    Masking(
        columns=["*email*", "ssn", "card*"], detectors=["email", "credit_card", "us_ssn", "phone"]
    )
)


def test_columns_by_pattern_case_insensitive() -> None:
    rows = ALL.rows(
        ["id", "Customer_Email", "SSN", "card_number", "note"],
        [[1, "a@b.co", "123-45-6789", "4111111111111111", None]],
    )
    assert rows == [[1, MASK, MASK, MASK, None]]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail ada@example.com now", "mail a***@example.com now"),
        ("card 4111 1111 1111 1111 ok", "card ************1111 ok"),
        ("card 4111-1111-1111-1111", "card ************1111"),
        ("5500005555555559", "************5559"),
        ("order 4111111111111112", "order 4111111111111112"),  # fails Luhn: not a card
        ("ssn 123-45-6789", "ssn ***-**-6789"),
        ("ssn 000-12-3456 is invalid", "ssn 000-12-3456 is invalid"),
        ("call (415) 555-2671", "call ***-***-2671"),
        ("call +1 415-555-2671", "call ***-***-2671"),
        ("id 12345 and 2024-01-01", "id 12345 and 2024-01-01"),
        # separators people (and agents) put between digit groups
        ("card 4111  1111  1111  1111", "card ************1111"),
        ("card 4111.1111.1111.1111", "card ************1111"),
        ("card 4111 - 1111/1111_1111", "card ************1111"),
        ("card " + FULL_WIDTH_CARD, "card ************1111"),
        ("ssn 123.45.6789", "ssn ***-**-6789"),
        ("role v-shop-ro-h4111-111111111111", "role v-shop-ro-h4111-111111111111"),  # a word's tail
        ("ssn 123 45 6789", "ssn ***-**-6789"),
        ("call 415.555.2671", "call ***-***-2671"),
        ("mail \uff41\uff44\uff41@example.com", "mail a***@example.com"),  # full-width
        ("", ""),
    ],
)
def test_detectors(text: str, expected: str) -> None:
    assert ALL.text(text) == expected


def test_nested_values_and_non_strings() -> None:
    assert ALL.value({"a": ["x@y.io", 5, None]}) == {"a": ["x***@y.io", 5, None]}


def test_only_configured_detectors_run() -> None:
    emails_only = Masker.from_policy(Masking(detectors=["email"]))
    assert emails_only.text("a@b.io 123-45-6789") == "a***@b.io 123-45-6789"


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


ADVERSARIAL = ["a." * 32768, "a-" * 32768, "1." * 32768, "2-" * 32768, "@" + "a.a" * 21000]


def test_a_value_shaped_against_the_detectors_is_masked_in_bounded_time() -> None:
    """A target's 64 KiB value of "a.a.a.…" took the email pattern 4 s (it rescanned to the
    end from every start), on the gateway's event loop. A hang guard, not a timing test: the
    five values get 5 s of CPU between them in a child process; bounded, they take ~0.05 s."""
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_CPU, (5, 5))\n"
        "from tests.unit.test_masking import ADVERSARIAL, ALL\n"
        "for value in ADVERSARIAL: ALL.text(value)\n"
        "print('done')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stderr[-500:]


def test_bounded_email_pattern_still_masks_real_addresses() -> None:
    local = "x" * 64
    assert ALL.text(f"to {local}@example.com") == "to x***@example.com"
    assert ALL.text("ada.lovelace+k@mail.example.co.uk") == "a***@mail.example.co.uk"
