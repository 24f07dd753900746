"""The README's agent examples, run as a new user runs them: `keyturn dev` in one process, the
example in another, and a person clicking in the Slack sandbox (through its own HTTP routes,
as the page does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.devstack import Spawned, click, running_dev


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_dev(tmp_path_factory.mktemp("dev")) as (_dev, stack):
        yield stack


def held_id(line: str) -> str:
    return line.split("request ", 1)[1].split(":", 1)[0].split()[0]


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_the_example_crew_waits_for_the_click(dev_stack: dict[str, Any], decision: str) -> None:
    order = 1 if decision == "approve" else 2
    crew = Spawned(
        "examples/crewai_ops_crew.py", "--stack", dev_stack["file"], "--order", str(order)
    )
    try:
        read = crew.until("<- Ran on orders-db")
        assert ": 1 row." in read
        assert crew.until("| ***").startswith(f"{order} | open | ")  # the email, masked
        held = crew.until("held as request")
        if decision == "approve":
            click(dev_stack, held_id(held), "keyturn_approve")
        else:
            click(dev_stack, held_id(held), "keyturn_deny", "order 2 was refunded; leave it open")
        lines = crew.finish()
    finally:
        crew.stop()
    if decision == "approve":
        assert lines[-1].startswith(f"Order {order}: Ran on orders-db (request ")
        assert lines[-1].endswith("UPDATE 1.")
    else:
        assert "Denied by @U_APPROVER: order 2 was refunded; leave it open." in lines[-1]
    assert dev_stack["agent_token"] not in "\n".join(lines)


def test_the_mcp_example_waits_for_the_click(dev_stack: dict[str, Any]) -> None:
    client = Spawned("examples/mcp_client.py", "--stack", dev_stack["file"], "--order", "3")
    try:
        assert (
            client.until("tools: ")
            == "tools: list_targets, run_sql, run_shell, call_api, request_status"
        )
        assert "3 | open | 300" in client.until("3 | open")
        client.until('-> run_sql {"target": "orders-db", "sql": "UPDATE')
        # run_sql waits up to keyturn mcp's --max-wait: a click meanwhile finishes it at once
        click(dev_stack, "WHERE id = 3", "keyturn_approve")
        lines = client.finish()
    finally:
        client.stop()
    assert lines[-1].startswith("Ran on orders-db (request ") and lines[-1].endswith("UPDATE 1.")
