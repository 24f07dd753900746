"""The policy file: targets, rules, masking (DESIGN.md "Policy"), validated with clear errors.

Every problem is reported with its location in the file (``rules[2].action: expected allow,
hold or block``) and all problems are reported at once. Secrets never belong here: a key that
looks like one, or a DSN carrying a user or password, is an error that names the environment
variable to use instead.
"""

from __future__ import annotations

import re
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from keyturn.errors import ConfigError
from keyturn.settings import target_env_name
from keyturn.store.dsn import parse_dsn

LONGEST = timedelta(days=3650)  # any duration past this is a typo (and past timedelta's range)
_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$")


def parse_duration(value: object) -> timedelta:
    """``90``, ``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"``, ``"500ms"`` -> a positive timedelta."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and value.strip() and (m := _DURATION.match(value.strip())):
        d, h, mi, s, ms = (int(x or 0) for x in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s + ms / 1000
    else:
        raise ValueError(f"expected a duration such as 30s, 10m, 1h or 2d, got {value!r}")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > LONGEST.total_seconds():
        raise ValueError(f"{value!r} is longer than {LONGEST.days} days: surely a mistake")
    return timedelta(seconds=seconds)


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
Name = Annotated[
    str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
]


def _typed_subject(value: object) -> object:
    """``agent:<JWT sub>`` or ``group:<groups claim entry>``: a subject says what it names.

    An untyped name is refused rather than guessed at: read as both, a token whose ``sub`` is
    ``group:ops`` would pass for the group ``ops``.
    """
    if isinstance(value, str):
        kind, sep, name = value.partition(":")
        if not sep or kind not in ("agent", "group"):
            raise ValueError(
                f"{value!r} must say what it names: agent:{value} (a token's sub) or "
                f"group:{value} (an entry of its groups claim)"
            )
        if not name or name != name.strip():
            raise ValueError(f"{value!r} names nobody after {kind}:")
    return value


Subject = Annotated[str, BeforeValidator(_typed_subject), Field(max_length=201)]

# What a SQL rule can match; keyturn.policy's classifier (gateway issue) assigns these.
SqlKind = Literal[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "create",
    "alter",
    "drop",
    "truncate",
    "grant",
    "revoke",
    "copy",
    "call",
    "do",
    "set",
    "lock",
    "maintenance",
    "transaction",
    "prepare",
    "execute",
    "explain",
    "delete_without_where",
    "update_without_where",
    "function_call",
    "any",
]
Detector = Literal["email", "credit_card", "us_ssn", "phone"]

SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "secret",
        "secret_id",
        "token",
        "api_key",
        "private_key",
        "signing_secret",
        "client_secret",
        "app_token",
        "bot_token",
    }
)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresVault(Model):
    readonly_role: Name
    write_role: Name
    max_ttl: Duration = timedelta(hours=1)
    schemas: list[Name] = ["public"]


class SshVault(Model):
    ssh_role: Name
    max_ttl: Duration = timedelta(hours=1)


class TargetBase(Model):
    subjects: list[Subject] | None = None
    approval_channel: str | None = None
    # shown to agents (GET /v1/targets, the CrewAI and MCP tools): what is there, in one line
    description: str | None = Field(default=None, min_length=1, max_length=200, pattern=r"^[^\n]*$")


class PostgresTarget(TargetBase):
    kind: Literal["postgres"]
    dsn: str
    vault: PostgresVault

    @field_validator("dsn")
    @classmethod
    def _no_credentials(cls, value: str) -> str:
        try:
            dsn = parse_dsn(value, "dsn")
        except ConfigError as exc:
            raise ValueError(exc.message.removeprefix("dsn ")) from None
        parts = urlsplit(dsn.url)
        if parts.username or parts.password:
            raise ValueError(
                "must not carry a user or password: Vault issues credentials (vault-bootstrap "
                "reads the admin login from KEYTURN_TARGET_<NAME>_USERNAME/_PASSWORD)"
            )
        return value

    @property
    def host_port_db(self) -> tuple[str, int, str]:
        parts = urlsplit(parse_dsn(self.dsn).url)
        return parts.hostname or "", parts.port or 5432, parts.path.lstrip("/")

    def login(self, username: str, password: str) -> tuple[str, dict[str, object]]:
        """asyncpg ``connect`` arguments for this target with a Vault-issued login."""
        dsn = parse_dsn(self.dsn, "dsn")
        parts = urlsplit(dsn.url)
        netloc = f"{parts.hostname}:{parts.port or 5432}"
        return urlunsplit(parts._replace(netloc=netloc)), {
            **dsn.connect_args,
            "user": username,
            "password": password,
        }


class SshTarget(TargetBase):
    kind: Literal["ssh"]
    host: str = Field(min_length=1)
    port: int = Field(default=22, ge=1, le=65535)
    principal: Name
    vault: SshVault
    host_key: str | None = None  # the target's public host key (known_hosts line or key)
    host_ca: str | None = None  # or the CA that signs host keys
    source_address: str | None = None  # CIDR list baked into certificates

    @field_validator("principal")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value == "root":
            raise ValueError("root is not an allowed principal; use an unprivileged account")
        return value


Target = Annotated[PostgresTarget | SshTarget, Field(discriminator="kind")]


class People(Model):
    """Slack people: listed user ids and/or the members of one user group."""

    slack_usergroup: str | None = None
    users: list[str] = []

    @model_validator(mode="after")
    def _someone(self) -> People:
        if not self.slack_usergroup and not self.users:
            raise ValueError("name a slack_usergroup or at least one user")
        return self


class Match(Model):
    sql: list[SqlKind] | None = None
    shell: list[str] | None = None

    @field_validator("shell")
    @classmethod
    def _argument_patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            try:
                words = shlex.split(pattern)
            except ValueError as exc:
                raise ValueError(f"{pattern!r} is not a list of arguments: {exc}") from None
            if not words or words[0] in ("*", "**"):
                raise ValueError(f"{pattern!r} must start with the program it allows")
        return value

    @model_validator(mode="after")
    def _something(self) -> Match:
        if not self.sql and not self.shell:
            raise ValueError("a match needs sql kinds or shell patterns")
        return self


class Rule(Model):
    name: Name
    target: str = "*"
    subjects: list[Subject] | None = None
    match: Match
    action: Literal["allow", "hold", "block"]
    approvers: People | None = None
    quorum: int = Field(default=1, ge=1, le=10)
    grant_ttl: Duration | None = None
    pending_ttl: Duration | None = None
    message: str | None = None
    # shadow: record what the rule would have done (audit, /metrics) without enforcing it
    mode: Literal["enforce", "shadow"] = "enforce"
    # functions an allow rule lets take masked columns as plain arguments, e.g. [count]
    masked_uses: list[Name] = []

    @model_validator(mode="after")
    def _hold_only_fields(self) -> Rule:
        if self.action != "hold":
            for name in ("approvers", "grant_ttl", "pending_ttl"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} only applies to action: hold")
        if self.masked_uses and self.action != "allow":
            raise ValueError("masked_uses only applies to action: allow")
        if (
            self.approvers
            and not self.approvers.slack_usergroup
            and self.quorum > len(set(self.approvers.users))
        ):
            raise ValueError(
                f"quorum {self.quorum} needs at least {self.quorum} distinct approvers"
            )
        return self


class AccessRule(Model):
    """Who may ask for a session of their own (``/keyturn db|ssh|request``), on which
    targets, for how long, and who must approve it. The first rule that names the target and
    the requester decides."""

    name: Name
    targets: list[str] = Field(default=["*"], min_length=1)
    requesters: People
    approvers: People
    quorum: int = Field(default=1, ge=1, le=10)
    durations: list[Duration] = Field(
        default=[timedelta(minutes=15), timedelta(minutes=30), timedelta(hours=1)], min_length=1
    )  # the request modal's choices
    max_duration: Duration = timedelta(hours=1)  # what a typed TTL and Extend may reach
    pending_ttl: Duration | None = None
    # An approver in one of requesters.slack_usergroup's members is a peer of the requester:
    # False (the default) lets only people outside that group approve.
    own_group_may_approve: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> AccessRule:
        longest = max(self.durations)
        if longest > self.max_duration:
            raise ValueError(
                f"the duration {format_duration(longest)} is longer than max_duration "
                f"{format_duration(self.max_duration)}"
            )
        if not self.approvers.slack_usergroup and self.quorum > len(set(self.approvers.users)):
            raise ValueError(
                f"quorum {self.quorum} needs at least {self.quorum} distinct approvers"
            )
        return self

    def covers(self, target: str) -> bool:
        return "*" in self.targets or target in self.targets


def format_duration(duration: timedelta) -> str:
    """``1h30m`` for 5400 s: durations as they are typed in this file and in Slack."""
    minutes, seconds = divmod(int(duration.total_seconds()), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    units = ((days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s"))
    return "".join(f"{v}{u}" for v, u in units if v) or "0s"


class PolicyTest(Model):
    """A case the policy must decide as stated: run by check-config and `keyturn policy test`."""

    target: str
    command: str = Field(min_length=1)
    subject: str = "agent:keyturn-policy-test"  # as `agent:<sub>`; groups below
    groups: list[str] = []
    expect: Literal["allow", "hold", "block"]
    rule: str | None = None  # the rule expected to decide (None: not checked)
    masked: list[str] | None = None  # result columns expected masked (SELECTs)

    @field_validator("subject")
    @classmethod
    def _agent(cls, value: str) -> str:
        if not value.startswith("agent:") or len(value) == 6:
            raise ValueError(f"{value!r} must be agent:<sub> (put groups in groups)")
        return value


class Masking(Model):
    columns: list[str] = []
    detectors: list[Detector] = []


class VaultConfig(Model):
    addr: str | None = None  # KEYTURN_VAULT_ADDR overrides
    database_mount: Name = "database"
    ssh_mount: Name = "ssh"
    approle_mount: Name = "approle"
    gateway_approle: Name = "keyturn-gateway"
    bot_approle: Name = "keyturn-bot"
    wrap_ttl: Duration = timedelta(seconds=60)  # a gateway takes its hand-off at once
    session_wrap_ttl: Duration = timedelta(minutes=10)  # a person reads a DM, then unwraps
    public_addr: str | None = None  # how people reach Vault to unwrap; default: addr
    transit_mount: Name = "transit"  # its key HMACs audit checkpoints (keyturn.checkpoint)
    kv_mount: Name = "secret"  # KV v2: where audit checkpoints are kept
    audit_anchor: Name = "default"  # this deployment's checkpoint: keyturn/audit/<name>


Algorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256"
]


class GatewayAuth(Model):
    """How agents' JWTs are verified. HS256 only with KEYTURN_GATEWAY_DEV_SECRET (development)."""

    jwks_url: str | None = None
    public_key_file: Path | None = None
    algorithms: list[Algorithm] = ["RS256", "ES256", "EdDSA"]
    audience: str = "keyturn"
    issuer: str | None = None
    groups_claim: str = "groups"
    leeway_seconds: int = Field(default=30, ge=0, le=300)

    @model_validator(mode="after")
    def _one_key_source(self) -> GatewayAuth:
        if self.jwks_url and self.public_key_file:
            raise ValueError("set jwks_url or public_key_file, not both")
        return self


class GatewayConfig(Model):
    listen: str = "127.0.0.1:8080"
    public_url: str | None = None  # how agents reach us (for wait_url); default from listen
    auth: GatewayAuth = GatewayAuth()
    # the deadline of one SQL command, all its statements together (enforced by the gateway)
    statement_timeout: Duration = timedelta(seconds=5)
    ssh_timeout: Duration = timedelta(seconds=60)  # an approved shell command, end to end
    row_limit: int = Field(default=1000, ge=1, le=100_000)
    value_bytes: int = Field(default=64 * 1024, ge=1024, le=64 * 1024 * 1024)
    response_bytes: int = Field(default=1024 * 1024, ge=4096, le=256 * 1024 * 1024)
    max_statements: int = Field(default=20, ge=1, le=1000)  # per allowed command
    rate_per_second: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=40, ge=1)
    # held requests of one agent waiting for a human at once: each posts a card (and a long
    # command a thread of them), so an agent cannot bury everyone's approvals in its own
    max_pending_per_agent: int = Field(default=20, ge=1, le=10_000)
    max_wait: Duration = timedelta(seconds=60)
    poll_interval: Duration = timedelta(seconds=5)
    # the allowed path: one read-only login (Vault lease + pool) per agent identity and target
    readonly_pool_size: int = Field(default=2, ge=1, le=50)  # connections per login
    readonly_logins: int = Field(default=50, ge=1, le=10_000)  # open logins, LRU closed first
    readonly_idle: Duration = timedelta(minutes=5)  # a login unused this long is closed
    agent_concurrency: int = Field(default=8, ge=1, le=1000)  # allowed commands in flight
    catalog_refresh: Duration = timedelta(minutes=10)  # re-read a target's function catalog

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:8080")
        return value


class SlackConfig(Model):
    approval_channel: str | None = None  # channel id (C…) for targets without their own
    approvers: People | None = None  # for requests no rule with approvers matched


class BotConfig(Model):
    listen: str = "127.0.0.1:3000"
    poll_interval: Duration = timedelta(seconds=3)
    card_claim_timeout: Duration = timedelta(seconds=60)
    usergroup_cache: Duration = timedelta(seconds=60)
    sweep_interval: Duration = timedelta(seconds=15)  # revocation's guarantee behind the jobs
    orphan_grace: Duration = timedelta(seconds=60)  # unknown this long -> an orphan lease
    issue_timeout: Duration = timedelta(minutes=15)  # keep retrying Vault this long, then fail
    audit_checkpoint: Duration = timedelta(minutes=1)  # anchor the audit chain in Vault this often


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
    humans' sessions (``access``), masking, TTLs, and the tests the rules must pass."""

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
        self._check_access()
        for i, test in enumerate(self.tests):
            if test.target not in self.targets:
                raise ValueError(f"tests[{i}].target: unknown target {test.target!r}")
            if test.rule is not None and test.rule not in seen:
                raise ValueError(f"tests[{i}].rule: no rule is named {test.rule!r}")
        return self

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
        """The rules that may let someone open a session on ``target``, in file order."""
        return [rule for rule in self.access if rule.covers(target)]

    def access_rule(self, name: str | None) -> AccessRule | None:
        return next((rule for rule in self.access if rule.name == name), None)

    def postgres_targets(self) -> dict[str, PostgresTarget]:
        return {n: t for n, t in self.targets.items() if isinstance(t, PostgresTarget)}

    def ssh_targets(self) -> dict[str, SshTarget]:
        return {n: t for n, t in self.targets.items() if isinstance(t, SshTarget)}


class Config(Model):
    """The whole configuration file: the :class:`Policy`, and how each process runs (Vault
    mounts, Slack, the gateway's and the bot's settings)."""

    policy: Policy
    vault: VaultConfig = VaultConfig()
    slack: SlackConfig = SlackConfig()
    gateway: GatewayConfig = GatewayConfig()
    bot: BotConfig = BotConfig()

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


# ------------------------------------------------------------------ loading and errors


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    if loc[:1] == ("policy",):  # nested in the model, at the top level of the file
        loc = loc[1:]
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("postgres", "ssh") and out.startswith("targets."):
            continue  # the discriminator tag pydantic adds for tagged unions
        elif part.startswith("function-"):
            continue
        else:
            out += ("." if out else "") + part
    return out


def _message(err: ErrorDetails) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "literal_error":
        return "expected " + str(ctx.get("expected", "")).replace("'", "")
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_not_found":
        return "missing kind (postgres or ssh)"
    if kind == "union_tag_invalid":
        return f"expected kind postgres or ssh, got {ctx.get('tag')!r}"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        where, msg = _location(err["loc"]), _message(err)
        # model validators that know the precise place put it first: "rules[1].name: ..."
        if re.match(r"^[\w.\[\]-]+: ", msg):
            problems.append(msg)
        else:
            problems.append(f"{where}: {msg}" if where else msg)
    return problems


def _secret_keys(node: Any, path: str = "") -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            if str(key).lower() in SECRET_KEYS:
                if path.startswith("targets."):
                    env = target_env_name(path.split(".")[1], str(key))
                else:
                    env = "KEYTURN_" + re.sub(r"\W", "_", here.split("[")[0]).upper()
                found.append(
                    f"{here}: secrets are not allowed in the config file; set {env} instead"
                )
            else:
                found += _secret_keys(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _secret_keys(value, f"{path}[{i}]")
    return found


def parse_config(data: Any, source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with targets and rules at the top level")
    problems = _secret_keys(data)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        reported = {p.split(":", 1)[0] for p in problems}
        problems += [p for p in format_errors(exc) if p.split(":", 1)[0] not in reported]
    if problems:
        raise ConfigError(f"{source}: {len(problems)} error(s)", problems)
    return config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty")
    return parse_config(data, str(path))
