"""The ``keyturn`` command.

Bad input of any kind (arguments, config, DSN, an unreachable Postgres or Vault, a missing
extra) prints one line saying what is wrong and what to do, and exits 2, never a traceback. A
config file with several problems prints one line per problem. Third-party libraries' warnings
are not shown to a person (``KEYTURN_DEBUG=1`` or ``python -W`` shows them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyturn import cli_evidence, cli_runs, extras
from keyturn.cli_common import EXIT_BAD_INPUT, EXIT_TAMPERED
from keyturn.cli_common import Parser as _Parser
from keyturn.cli_common import one_store as _store
from keyturn.cli_common import run as _run
from keyturn.errors import ConfigError, KeyturnError

if TYPE_CHECKING:
    from keyturn.config.policy import Config


def run_fast(coro: Coroutine[Any, Any, None]) -> None:
    """Run a server on uvloop where it exists (leaner per connection, faster), else asyncio,
    until it returns or SIGTERM/SIGINT asks it to stop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(until_stopped(coro))
    else:
        uvloop.run(until_stopped(coro))


async def until_stopped(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro``; SIGTERM (what systemd and Kubernetes send) or SIGINT cancels it, so its
    ``finally`` blocks run: connections drain and the gateway's read-only logins are revoked
    rather than left to live until their Vault lease ends. It then exits 0: being stopped is
    how a server ends. Later signals are ignored, so a second one (Ctrl-C reaches a whole
    process group, then a supervisor sends SIGTERM) cannot cut that cleanup short; SIGKILL
    is there for impatience."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(coro)
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, lambda: None)
        task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    try:
        await task
    except asyncio.CancelledError:
        if not stopping:
            raise
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


# ------------------------------------------------------------------ commands


def cmd_check_config(args: argparse.Namespace) -> int:
    from keyturn.classify import policy_warnings
    from keyturn.config.loading import load_config

    config = load_config(args.file)
    rules, targets = len(config.policy.rules), len(config.policy.targets)
    for warning in policy_warnings(config):
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    if _policy_cases_fail(args.file, config):
        return 1
    access, tests = len(config.policy.access), len(config.policy.tests)
    print(
        f"{args.file}: ok ({targets} targets, {rules} rules, {access} access rules, {tests} tests)"
    )
    return 0


def _policy_cases_fail(file: Path, config: Config) -> bool:
    from keyturn.classify.cases import failing_cases

    failing = failing_cases(config)
    for failure in failing:
        print(f"{file}: {failure}", file=sys.stderr)
    return bool(failing)


def cmd_policy_test(args: argparse.Namespace) -> int:
    from keyturn.config.loading import load_config

    config = load_config(args.file)
    if _policy_cases_fail(args.file, config):
        return 1
    print(f"{args.file}: all {len(config.policy.tests)} tests pass")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from keyturn.classify import Identity, classify
    from keyturn.config.loading import load_config

    config = load_config(args.config)
    who = Identity(args.subject, frozenset(args.group)) if args.subject else None
    print(json.dumps(classify(config, args.target, args.command, who).as_json()))
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from keyturn.settings import load_settings
    from keyturn.store import migrate

    dsn = load_settings().dsn()
    _run(_check_database(dsn))
    if args.down:
        migrate.downgrade(dsn, args.down)
        print(f"downgraded {dsn.redacted} to {args.down}")
    else:
        migrate.upgrade(dsn, args.revision)
        print(f"upgraded {dsn.redacted} to {args.revision}")
    return 0


async def _check_database(dsn: Any) -> int:
    async with _store(dsn) as store:
        await store.ping()
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from keyturn import audit
    from keyturn.checkpoint import Anchor
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings
    from keyturn.vault import process_vault

    if args.audit_command == "verify" and args.evidence is not None:
        return cli_evidence.verify(args.evidence, args.config)
    if args.audit_command == "evidence":
        return cli_evidence.write(args.request, Path(args.output), args.config)
    settings = load_settings()
    dsn = settings.dsn()
    unanchored = args.audit_command == "verify" and args.unanchored
    if args.config is None and not unanchored:
        more = (
            " (or --unanchored to check the chain alone)" if args.audit_command == "verify" else ""
        )
        raise ConfigError(
            f"keyturn audit {args.audit_command} needs --config FILE and the bot's Vault AppRole "
            f"(KEYTURN_BOT_ROLE_ID, KEYTURN_BOT_SECRET_ID) to use the checkpoints in Vault{more}"
        )
    vault = None
    if args.config is not None and not unanchored:
        config = load_config(args.config)
        vault = process_vault(settings, config, "bot")

    async def run() -> int:
        anchor = Anchor.of(vault, config.vault) if vault is not None else None
        try:
            async with _store(dsn) as store:
                if args.audit_command == "verify":
                    result = await audit.verify(store, anchor)
                    if result.broken is not None:
                        print(str(result.broken), file=sys.stderr)
                        return EXIT_TAMPERED
                    print(result.summary())
                    return 0
                if args.output == "-":
                    count = await audit.export(store, sys.stdout, args.since, anchor)
                else:
                    with Path(args.output).open("w", encoding="utf-8") as out:  # noqa: ASYNC230
                        count = await audit.export(store, out, args.since, anchor)
                print(f"exported {count} events", file=sys.stderr)
                return 0
        finally:
            if vault is not None:
                await vault.close()

    return _run(run())


def cmd_tag(args: argparse.Namespace) -> int:
    """The request behind a target's ``application_name = 'keyturn:<tag>'``."""
    from keyturn.domain import TAG_LENGTH
    from keyturn.settings import load_settings
    from keyturn.store.reads import requests_tagged

    tag = args.tag.strip().removeprefix("keyturn:").lower()
    if len(tag) != TAG_LENGTH or any(c not in "0123456789abcdef" for c in tag):
        raise ConfigError(
            f"a tag is {TAG_LENGTH} hex characters, as in application_name 'keyturn:<tag>'"
        )
    dsn = load_settings().dsn()

    async def run() -> int:
        async with _store(dsn) as store:
            found = await requests_tagged(store, tag)
        for r in found:
            print(f"{r.id} {r.status} on {r.target} by {r.requester} at {r.created_at:%FT%TZ}")
        if not found:
            print(f"keyturn: no request has the tag {tag}", file=sys.stderr)
        return 0 if found else 1

    return _run(run())


def cmd_vault_bootstrap(args: argparse.Namespace) -> int:
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings
    from keyturn.vault import Vault
    from keyturn.vault_setup import bootstrap

    config = load_config(args.config)
    settings = load_settings()
    addr = settings.vault_addr or config.vault.addr or os.environ.get("VAULT_ADDR")
    token = settings.vault_token or None
    raw_token = token.get_secret_value() if token else os.environ.get("VAULT_TOKEN")
    if not addr:
        raise ConfigError("no Vault address: set vault.addr in the config or KEYTURN_VAULT_ADDR")
    if not raw_token:
        raise ConfigError(
            "no Vault token: set KEYTURN_VAULT_TOKEN to a token allowed to configure Vault"
        )

    async def run() -> int:
        vault = Vault(addr, token=raw_token)
        try:
            report = await bootstrap(
                vault, config, issue_secret_ids=args.secret_ids_out is not None
            )
        finally:
            await vault.close()
        for action in report.actions:
            print(action)
        for warning in report.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for role, role_id in report.role_ids.items():
            print(f"AppRole {role}: role_id {role_id}")
        if args.secret_ids_out is not None:
            _write_secret_ids(args.secret_ids_out, config.vault, report.role_ids, report.secret_ids)
            print(f"secret ids written to {args.secret_ids_out} (mode 0600)")
        return 0

    return _run(run())


def _write_secret_ids(
    path: Path, vault: Any, role_ids: dict[str, str], secrets: dict[str, str]
) -> None:
    lines = []
    for prefix, role in (("GATEWAY", vault.gateway_approle), ("BOT", vault.bot_approle)):
        lines += [
            f"KEYTURN_{prefix}_ROLE_ID={role_ids[role]}",
            f"KEYTURN_{prefix}_SECRET_ID={secrets[role]}",
        ]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("\n".join(lines) + "\n")


def cmd_gateway(args: argparse.Namespace) -> int:
    from gateway.bootstrap import serve
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings

    config = load_config(args.config)
    run_fast(serve(load_settings(), config))
    return 0


def cmd_bot(args: argparse.Namespace) -> int:
    from bot.bootstrap import serve
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings

    config = load_config(args.config)
    run_fast(serve(load_settings(), config))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from keyturn.config.durations import parse_duration
    from keyturn.harness.idp import dev_token
    from keyturn.settings import load_settings

    secret = load_settings().gateway_dev_secret
    raw = secret.get_secret_value() if secret else None
    if raw is None and args.state.is_file():
        raw = json.loads(args.state.read_text()).get("dev_secret")
    if not raw:
        raise ConfigError(
            f"no development secret: set KEYTURN_GATEWAY_DEV_SECRET or run `keyturn dev` "
            f"(which writes {args.state})"
        )
    try:
        ttl = int(parse_duration(args.ttl).total_seconds())
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    print(dev_token(raw, args.sub, ttl=ttl, groups=args.group, on_behalf_of=args.on_behalf_of))
    return 0


def cmd_unwrap(args: argparse.Namespace) -> int:
    from keyturn.unwrap import unwrap_login

    addr = args.vault_addr or os.environ.get("KEYTURN_VAULT_ADDR") or os.environ.get("VAULT_ADDR")
    if not addr:
        raise ConfigError("say where Vault is: --vault-addr URL (or set VAULT_ADDR)")
    wrapping = args.token.strip()
    if wrapping == "-":
        wrapping = sys.stdin.readline().strip()
    login = asyncio.run(unwrap_login(addr, wrapping))
    print(login.psql)
    print(login.note(), file=sys.stderr)
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from keyturn.agent.mcp import DEFAULT_MAX_WAIT, MAX_STATUS_WAIT, serve

    max_wait = DEFAULT_MAX_WAIT if args.max_wait is None else args.max_wait
    if not 0 <= max_wait <= MAX_STATUS_WAIT:
        raise ConfigError(f"--max-wait must be 0 to {MAX_STATUS_WAIT:g} seconds")
    run_id = args.run_id or os.environ.get("KEYTURN_RUN_ID") or None
    if run_id is not None:
        from keyturn.recording.runs import BadRunId, check_run_id

        try:
            check_run_id(run_id)
        except BadRunId as exc:
            raise ConfigError(f"--run-id {run_id!r}: {exc}") from None
    asyncio.run(serve(args.http, max_wait, run_id))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from keyturn.harness.demo import demo

    if not 0 < args.timeout <= 86400:  # also refuses nan
        raise ConfigError("--timeout must be 0 to 86400 seconds")
    return demo(args.stack, args.timeout)


def cmd_dev(args: argparse.Namespace) -> int:
    from keyturn.harness.dev import run_dev_stack

    return run_dev_stack(Path(args.state_dir), once=args.once)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="keyturn", description="Chat-ops approval gateway for AI agents.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("dev", help="run the whole stack locally with throwaway services")
    p.add_argument("--state-dir", default=".keyturn/dev", help="where stack.json is written")
    p.add_argument("--once", action="store_true", help="start, print, stop (a smoke test)")
    p.set_defaults(func=cmd_dev, extra="dev")

    p = sub.add_parser(
        "demo", help="play an agent against the running dev stack (then click in the sandbox)"
    )
    p.add_argument("--stack", type=Path, default=Path(".keyturn/dev/stack.json"))
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the click (600)")
    p.set_defaults(func=cmd_demo, extra=None)

    p = sub.add_parser(
        "unwrap", help="turn the token keyturn DMed you into a psql connection string (once)"
    )
    p.add_argument("token", help="the wrapping token from the DM ('-' reads it from stdin)")
    p.add_argument(
        "--vault-addr", help="Vault's address (default: $KEYTURN_VAULT_ADDR, $VAULT_ADDR)"
    )
    p.set_defaults(func=cmd_unwrap, extra="server")

    p = sub.add_parser("gateway", help="run the agent-facing gateway")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=cmd_gateway, extra="server")

    p = sub.add_parser(
        "mcp", help="serve the agent API as MCP tools (KEYTURN_GATEWAY_URL, KEYTURN_AGENT_TOKEN)"
    )
    p.add_argument("--http", metavar="HOST:PORT", help="streamable HTTP on loopback, not stdio")
    p.add_argument(
        "--max-wait", type=float, help="seconds run_* waits before answering pending (20, <= 25)"
    )
    p.add_argument(
        "--run-id", help="record this session's commands as one run (default: $KEYTURN_RUN_ID)"
    )
    p.set_defaults(func=cmd_mcp, extra="mcp")

    p = sub.add_parser("token", help="mint a development agent token (HS256; dev only)")
    p.add_argument("sub", help="the agent identity (JWT sub)")
    p.add_argument("--ttl", default="1h")
    p.add_argument("--group", action="append", default=[])
    p.add_argument("--on-behalf-of", help="the human the agent acts for")
    p.add_argument("--state", type=Path, default=Path(".keyturn/dev/stack.json"))
    p.set_defaults(func=cmd_token, extra="server")

    p = sub.add_parser(
        "check-config", help="validate a policy file (exit 2 listing every error) and run its tests"
    )
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_check_config, extra="server")

    p = sub.add_parser("policy", help="policy tools")
    policy_sub = p.add_subparsers(dest="policy_command", required=True)
    p = policy_sub.add_parser("test", help="run the policy file's tests; exit 1 naming failures")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_policy_test, extra="server")

    p = sub.add_parser("bot", help="run the Slack bot (HTTP mode, /slack/events)")
    p.add_argument("--config", required=True, type=Path)
    p.set_defaults(func=cmd_bot, extra="server")

    p = sub.add_parser("classify", help="how the policy treats a command (one JSON line)")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument("--target", required=True)
    p.add_argument("--subject", help="evaluate rules as this identity (JWT sub)")
    p.add_argument("--group", action="append", default=[], help="a group of that identity")
    p.add_argument("command", help="the SQL or shell command, quoted")
    p.set_defaults(func=cmd_classify, extra="server")

    p = sub.add_parser("migrate", help="apply database migrations (KEYTURN_DATABASE_URL)")
    p.add_argument("--revision", default="head")
    p.add_argument("--down", metavar="REV", help="downgrade to REV (e.g. -1 or base)")
    p.set_defaults(func=cmd_migrate, extra="server")

    p = sub.add_parser("audit", help="verify or export the audit chain")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, parser_class=_Parser)
    ver = audit_sub.add_parser("verify", help="exit 1 naming the first bad event if tampered")
    ver.add_argument(
        "--config",
        type=Path,
        help="check against the checkpoint (an evidence file's seal) in Vault",
    )
    ver.add_argument("--unanchored", action="store_true", help="check the chain alone (no Vault)")
    ver.add_argument(
        "--evidence", type=Path, metavar="FILE", help="check an evidence file offline (no database)"
    )
    evi = audit_sub.add_parser("evidence", help="one request's proof in a file, checkable offline")
    evi.add_argument("request", help="the request's id (or a blocked command's step id)")
    evi.add_argument("-o", "--output", required=True, help="the file to write")
    evi.add_argument(
        "--config", type=Path, help="seal it with the audit key in Vault (bot AppRole)"
    )
    exp = audit_sub.add_parser("export", help="write events as JSON lines")
    exp.add_argument("--config", type=Path, help="end with a fresh checkpoint from Vault")
    exp.add_argument("--since", type=int, default=0, help="only events after this seq")
    exp.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    p.set_defaults(func=cmd_audit, extra="server")

    cli_runs.add_parser(sub)

    p = sub.add_parser(
        "tag", help="the request behind a target's application_name 'keyturn:<tag>' (exit 1: none)"
    )
    p.add_argument("tag")
    p.set_defaults(func=cmd_tag, extra="server")

    p = sub.add_parser("vault-bootstrap", help="configure Vault engines, roles, policies, AppRoles")
    p.add_argument("--config", required=True, type=Path)
    p.add_argument(
        "--secret-ids-out", type=Path, help="also issue AppRole secret ids into this file (0600)"
    )
    p.set_defaults(func=cmd_vault_bootstrap, extra="server")
    return parser


def quiet_libraries() -> None:
    """Hide every warning raised outside keyturn's own code unless asked for.

    A new release of any of ~150 dependencies can start warning (cryptography deprecating DSA
    made asyncssh print eight lines on every start); a person reading a one-line error must not
    get nine. A warning attributed to keyturn's own modules still shows: that one is ours to fix.
    ``KEYTURN_DEBUG=1`` shows every warning (deprecations included) once per place;
    ``-W`` or ``PYTHONWARNINGS`` are obeyed as given.
    """
    if sys.warnoptions:
        return
    if os.environ.get("KEYTURN_DEBUG", "") not in ("", "0"):
        warnings.simplefilter("default")
        return
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"(keyturn|gateway|bot)(\.|$)")


def main(argv: Sequence[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.extra:
            extras.require(args.extra, args.command)
        return func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        if exc.message not in exc.problems:
            print(exc.message, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyturnError as exc:
        print(f"keyturn: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
