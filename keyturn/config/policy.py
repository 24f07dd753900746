"""The whole file: the policy (targets, rules, access, masking, tests) and the processes'
settings (DESIGN.md "Policy")."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import (
    model_validator,
)

from keyturn.config.durations import Duration, format_duration
from keyturn.config.model import Model, Name
from keyturn.config.process import (
    BotConfig,
    GatewayConfig,
    RecordConfig,
    SlackConfig,
    VaultConfig,
)
from keyturn.config.rules import AccessRule, Masking, PolicyTest, Rule
from keyturn.config.targets import HttpTarget, PostgresTarget, SshTarget, Target

# What keyturn decides with (targets, rules, masking, TTLs and the file's own tests); the
# rest of the file says how the processes run. In the YAML both sit at the top level.
POLICY_KEYS = (
    "targets",
    "rules",
    "access",
    "masking",
    "pending_ttl",
    "default_grant_ttl",
    "tests",
)


class Policy(Model):
    """What keyturn decides with: the targets, the rules for agents' commands, the rules for
    people's own access (``access``), masking, TTLs, and the tests the rules must pass."""

    targets: dict[Name, Target]
    rules: list[Rule] = []
    access: list[AccessRule] = []
    masking: Masking = Masking()
    pending_ttl: Duration = timedelta(minutes=15)
    default_grant_ttl: Duration = timedelta(minutes=10)
    tests: list[PolicyTest] = []

    @model_validator(mode="after")
    def _references(self) -> Policy:
        seen: set[str] = set()
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise ValueError(f"rules[{i}].name: {rule.name!r} is used by an earlier rule")
            seen.add(rule.name)
            if rule.target != "*" and rule.target not in self.targets:
                known = ", ".join(sorted(self.targets)) or "none"
                raise ValueError(
                    f"rules[{i}].target: unknown target {rule.target!r} (known: {known})"
                )
            self._check_operations(i, rule)
        self._check_access()
        for i, test in enumerate(self.tests):
            if test.target not in self.targets:
                raise ValueError(f"tests[{i}].target: unknown target {test.target!r}")
            if test.rule is not None and test.rule not in seen:
                raise ValueError(f"tests[{i}].rule: no rule is named {test.rule!r}")
        return self

    def _check_operations(self, i: int, rule: Rule) -> None:
        """A rule's operation ids must be in the OpenAPI file of a target it applies to."""
        if not rule.match.operation:
            return
        specs = [
            t.spec
            for name, t in self.http_targets().items()
            if t.spec is not None and rule.target in ("*", name)
        ]
        known = set().union(*(spec.operation_ids() for spec in specs))
        for op in rule.match.operation:
            if op not in known:
                raise ValueError(
                    f"rules[{i}].match.operation: {op!r} is in no OpenAPI file of the targets "
                    f"it applies to (known: {', '.join(sorted(known)) or 'none'})"
                )

    def _check_access(self) -> None:
        names: set[str] = set()
        for i, rule in enumerate(self.access):
            if rule.name in names:
                raise ValueError(f"access[{i}].name: {rule.name!r} is used by an earlier rule")
            names.add(rule.name)
            for name in rule.targets:
                if name != "*" and name not in self.targets:
                    known = ", ".join(sorted(self.targets)) or "none"
                    raise ValueError(
                        f"access[{i}].targets: unknown target {name!r} (known: {known})"
                    )
            for name, target in self.targets.items():
                if rule.covers(name) and rule.max_duration > target.vault.max_ttl:
                    raise ValueError(
                        f"access[{i}].max_duration: {format_duration(rule.max_duration)} is "
                        f"longer than {name}'s vault.max_ttl "
                        f"{format_duration(target.vault.max_ttl)}"
                    )

    def access_rules(self, target: str) -> list[AccessRule]:
        """The rules that may let someone ask for access to ``target``, in file order."""
        return [rule for rule in self.access if rule.covers(target)]

    def access_rule(self, name: str | None) -> AccessRule | None:
        return next((rule for rule in self.access if rule.name == name), None)

    def postgres_targets(self) -> dict[str, PostgresTarget]:
        return {n: t for n, t in self.targets.items() if isinstance(t, PostgresTarget)}

    def ssh_targets(self) -> dict[str, SshTarget]:
        return {n: t for n, t in self.targets.items() if isinstance(t, SshTarget)}

    def http_targets(self) -> dict[str, HttpTarget]:
        return {n: t for n, t in self.targets.items() if isinstance(t, HttpTarget)}


class Config(Model):
    """The whole configuration file: the :class:`Policy`, and how each process runs (Vault
    mounts, Slack, the gateway's and the bot's settings)."""

    policy: Policy
    vault: VaultConfig = VaultConfig()
    slack: SlackConfig = SlackConfig()
    gateway: GatewayConfig = GatewayConfig()
    bot: BotConfig = BotConfig()
    record: RecordConfig = RecordConfig()

    @model_validator(mode="before")
    @classmethod
    def _flat_file(cls, data: Any) -> Any:
        """The file keeps the policy's keys at the top level; the model nests them."""
        if not isinstance(data, dict):
            return data
        if "policy" in data:
            raise ValueError("policy: unknown field (targets, rules... go at the top level)")
        nested = {k: v for k, v in data.items() if k in POLICY_KEYS}
        return {k: v for k, v in data.items() if k not in POLICY_KEYS} | {"policy": nested}

    def approval_channel(self, target: str) -> str | None:
        """Where ``target``'s cards go: its own channel, else ``slack.approval_channel``."""
        configured = self.policy.targets.get(target)
        own = configured.approval_channel if configured is not None else None
        return own or self.slack.approval_channel
