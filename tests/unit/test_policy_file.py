"""The policy file: every error with its location, secrets refused, durations parsed."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from keyturn.config.durations import parse_duration
from keyturn.config.loading import load_config, parse_config
from keyturn.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "examples" / "policy.yml"


def base(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "targets": {
            "orders-db": {
                "kind": "postgres",
                "dsn": "postgresql://db.internal:5432/orders",
                "vault": {"readonly_role": "orders-ro", "write_role": "orders-rw"},
            }
        },
        "rules": [{"name": "reads", "match": {"sql": ["select"]}, "action": "allow"}],
    }
    data.update(extra)
    return data


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.problems


def test_the_example_policy_is_valid() -> None:
    config = load_config(EXAMPLE)
    assert set(config.policy.targets) == {"orders-db", "web-1"}
    assert config.policy.rules[2].grant_ttl == timedelta(minutes=10)
    assert config.policy.pending_ttl == timedelta(minutes=15)


def test_bad_action_names_its_location() -> None:
    data = base()
    data["rules"] += [
        {"name": "b", "match": {"sql": ["insert"]}, "action": "hold"},
        {"name": "c", "match": {"sql": ["delete"]}, "action": "permit"},
    ]
    assert problems(data) == ["rules[2].action: expected allow, hold or block"]


def test_every_error_is_reported_at_once() -> None:
    data = base()
    data["targets"]["web"] = {"kind": "telnet"}
    data["targets"]["box"] = {"host": "x"}
    data["rules"].append({"name": "x", "match": {"sql": ["sellect"]}, "action": "allow", "oops": 1})
    found = problems(data)
    assert "targets.web: expected kind postgres, ssh or http, got 'telnet'" in found
    assert "targets.box: missing kind (postgres, ssh or http)" in found
    assert any(p.startswith("rules[1].match.sql[0]: expected select") for p in found)
    assert "rules[1].oops: unknown field" in found
    assert len(found) == 4


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["targets"]["orders-db"].update(dsn="postgresql://admin:pw@db/orders"),
            "targets.orders-db.dsn: must not carry a user or password",
        ),
        (
            lambda d: d["targets"]["orders-db"].update(dsn="mysql://db/orders"),
            "targets.orders-db.dsn: must start with postgresql://",
        ),
        (
            lambda d: d["targets"]["orders-db"].update(password="hunter2"),
            "targets.orders-db.password: secrets are not allowed in the config file; "
            "set KEYTURN_TARGET_ORDERS_DB_PASSWORD instead",
        ),
        (
            lambda d: d.update(vault={"token": "s.abc"}),
            "vault.token: secrets are not allowed in the config file; set KEYTURN_VAULT_TOKEN instead",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "reads", "match": {"sql": ["select"]}, "action": "allow"}
            ),
            "rules[1].name: 'reads' is used by an earlier rule",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "w", "target": "nope", "match": {"sql": ["insert"]}, "action": "hold"}
            ),
            "rules[1].target: unknown target 'nope' (known: orders-db)",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "w", "match": {"sql": ["insert"]}, "action": "hold", "grant_ttl": "10x"}
            ),
            "rules[1].grant_ttl: expected a duration such as 30s, 10m, 1h or 2d, got '10x'",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "w", "match": {"sql": ["insert"]}, "action": "allow", "grant_ttl": "10m"}
            ),
            "rules[1]: grant_ttl only applies to action: hold",
        ),
        (
            lambda d: d["rules"].append(
                {
                    "name": "w",
                    "match": {"sql": ["insert"]},
                    "action": "hold",
                    "quorum": 2,
                    "approvers": {"users": ["U1"]},
                }
            ),
            "rules[1]: quorum 2 needs at least 2 distinct approvers",
        ),
        (
            lambda d: d["rules"].append({"name": "w", "match": {}, "action": "hold"}),
            "rules[1].match: a match needs sql kinds, shell patterns, http patterns or operations",
        ),
        (
            lambda d: d["targets"].update(
                web={"kind": "ssh", "host": "h", "principal": "root", "vault": {"ssh_role": "r"}}
            ),
            "targets.web.principal: root is not an allowed principal",
        ),
        (
            lambda d: d["targets"].update(
                web={
                    "kind": "ssh",
                    "host": "h",
                    "port": 70000,
                    "principal": "deploy",
                    "vault": {"ssh_role": "r"},
                }
            ),
            "targets.web.port: Input should be less than or equal to 65535",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "s", "match": {"shell": ["cat 'unclosed"]}, "action": "allow"}
            ),
            'rules[1].match.shell: "cat \'unclosed" is not a list of arguments: '
            "No closing quotation",
        ),
        (
            lambda d: d["rules"].append(
                {"name": "s", "match": {"shell": ["** x"]}, "action": "allow"}
            ),
            "rules[1].match.shell: '** x' must start with the program it allows",
        ),
        (
            lambda d: d["targets"]["orders-db"].update(subjects=["crew-billing"]),
            "targets.orders-db.subjects[0]: 'crew-billing' must say what it names: "
            "agent:crew-billing (a token's sub) or group:crew-billing",
        ),
        (
            lambda d: d["rules"][0].update(subjects=["role:admin"]),
            "rules[0].subjects[0]: 'role:admin' must say what it names",
        ),
        (
            lambda d: d["rules"][0].update(subjects=["agent:"]),
            "rules[0].subjects[0]: 'agent:' names nobody after agent:",
        ),
    ],
)
def test_specific_errors(mutate: Any, expected: str) -> None:
    data = base()
    mutate(data)
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["targets"])


def test_yaml_errors_give_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "p.yml"
    path.write_text("targets:\n  a: [1, 2\nrules: []\n")
    with pytest.raises(ConfigError, match=r"p.yml:3:\d+: invalid YAML"):
        load_config(path)
    path.write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yml")


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (90, 90),
        ("90s", 90),
        ("10m", 600),
        ("1h30m", 5400),
        ("2d", 172800),
        (" 5m ", 300),
        ("1s500ms", 1.5),
    ],
)
def test_durations(raw: object, seconds: int) -> None:
    assert parse_duration(raw) == timedelta(seconds=seconds)


@pytest.mark.parametrize("raw", ["", "0s", 0, -5, "10x", "m", True, None, 1.5])
def test_bad_durations(raw: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(raw)


def _access(**fields: Any) -> dict[str, Any]:
    return {
        "name": "on-call",
        "requesters": {"users": ["U1"]},
        "approvers": {"users": ["U2"]},
    } | fields


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        (_access(targets=["nope"]), "access[0].targets: unknown target 'nope' (known: orders-db)"),
        (
            _access(max_duration="2h"),
            "access[0].max_duration: 2h is longer than orders-db's vault.max_ttl 1h",
        ),
        (_access(durations=["2h"]), "access[0]: the duration 2h is longer than max_duration 1h"),
        (_access(quorum=2), "access[0]: quorum 2 needs at least 2 distinct approvers"),
        (_access(approvers={}), "access[0].approvers: name a slack_usergroup or at least one user"),
        (_access(requesters=None), "access[0].requesters: "),
        (_access(durations=[]), "access[0].durations: "),
        (_access(owner="me"), "access[0].owner: unknown field"),
    ],
)
def test_access_rule_errors(rule: dict[str, Any], expected: str) -> None:
    found = problems(base(access=[rule]))
    assert any(p.startswith(expected) for p in found), found


def test_access_rules_in_order_by_target() -> None:
    data = base(access=[_access(targets=["orders-db"]), _access(name="all")])
    policy = parse_config(data).policy
    assert [r.name for r in policy.access_rules("orders-db")] == ["on-call", "all"]
    assert [r.name for r in policy.access_rules("elsewhere")] == ["all"]
    assert policy.access_rule("all") is policy.access[1] and policy.access_rule(None) is None
    assert problems(base(access=[_access(), _access()])) == [
        "access[1].name: 'on-call' is used by an earlier rule"
    ]
