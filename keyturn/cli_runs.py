"""``keyturn runs``: agents' runs listed, shown, replayed and exported, read from keyturn's
database (KEYTURN_DATABASE_URL; without it, a running ``keyturn dev``'s). ``--config``
supplies ``record.run_gap``, which names the idle-gap runs; without it the default (15 min)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from keyturn.config.durations import parse_duration
from keyturn.errors import ConfigError

FORMATS = ("asciicast", "asciicast3", "jsonl")


def add_parser(sub: Any) -> None:
    from keyturn.cli import _Parser

    p = sub.add_parser("runs", help="agents' runs: list, show, replay, export")
    runs = p.add_subparsers(dest="runs_command", required=True, parser_class=_Parser)
    listing = runs.add_parser("list", help="one line a run: agent, start, steps, held, denied")
    listing.add_argument("--agent", help="one agent identity's runs")
    listing.add_argument("--since", default="24h", help="runs with steps this recent (24h)")
    listing.add_argument("--target", help="runs that used this target")
    listing.add_argument("--limit", type=int, default=200, help="at most this many runs (200)")
    show = runs.add_parser("show", help="a run's steps in order (--json for all of it)")
    show.add_argument("--json", action="store_true", help="one JSON object with every step")
    replay = runs.add_parser("replay", help="play a run in this terminal, paced as it happened")
    replay.add_argument("--speed", type=float, default=1.0, help="2 plays twice as fast")
    replay.add_argument("--step", type=int, default=1, help="start at this step")
    export = runs.add_parser("export", help="write a run as asciicast v2 (or v3) or JSON lines")
    export.add_argument("--format", choices=FORMATS, default="asciicast")
    export.add_argument("-o", "--output", default="-", help="file (default: stdout)")
    for one in (show, replay, export):
        one.add_argument("run", help="the run's id (its run_id, or auto-… from runs list)")
        one.add_argument("--agent", help="only this agent's steps of a shared run_id")
        one.add_argument("--limit", type=int, default=1000, help="at most this many steps")
    for one in (listing, show, replay, export):
        one.add_argument("--config", type=Path, help="the config file (for record.run_gap)")
        one.add_argument(
            "--stack",
            type=Path,
            default=Path(".keyturn/dev/stack.json"),
            help="without KEYTURN_DATABASE_URL: the keyturn dev stack to read",
        )
    p.set_defaults(func=cmd_runs, extra="server")


def _where(args: argparse.Namespace) -> tuple[Any, timedelta]:
    """keyturn's database and ``record.run_gap``: from KEYTURN_DATABASE_URL and --config, or
    (without the variable) from a running ``keyturn dev``'s stack.json and policy file."""
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings

    config = args.config
    if "KEYTURN_DATABASE_URL" in os.environ or not args.stack.exists():
        dsn = load_settings().dsn()
    else:
        from keyturn.harness.demo import load_stack
        from keyturn.store.dsn import parse_dsn

        stack = load_stack(args.stack)
        dsn = parse_dsn(str(stack.get("database_url", "")), f"{args.stack}: database_url")
        config = config or Path(str(stack.get("policy_file", "")))
    gap = load_config(config).record.run_gap if config else timedelta(minutes=15)
    return dsn, gap


def _duration(value: str, flag: str) -> timedelta:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def cmd_runs(args: argparse.Namespace) -> int:
    from keyturn.cli import _run, _store

    if not 1 <= args.limit <= 100_000:
        raise ConfigError("--limit must be 1 to 100000")
    if args.runs_command == "replay" and not (0.01 <= args.speed <= 1000 and args.step >= 1):
        raise ConfigError("--speed must be 0.01 to 1000 and --step 1 or more")
    since = _duration(args.since, "--since") if args.runs_command == "list" else None
    dsn, gap = _where(args)

    async def run() -> int:
        from keyturn.store import run_steps

        async with _store(dsn) as store:
            if since is not None:
                found = await run_steps.runs_since(
                    store,
                    store.clock.now() - since,
                    gap,
                    agent=args.agent,
                    target=args.target,
                    limit=args.limit,
                )
                print(_listing(found))
                return 0
            ran = await run_steps.run(store, args.run, gap, agent=args.agent, limit=args.limit)
        return _one_run(args, ran)

    return _run(run())


def _listing(found: list[Any]) -> str:
    from keyturn.recording.views import one_line

    lines = [
        f"{'run':<42}  {'agent':<16}  {'started (UTC)':<19}  steps  held  denied  blocked  targets"
    ]
    for r in found:
        lines.append(
            f"{one_line(r.id, 42):<42}  {one_line(', '.join(r.agents), 16):<16}  "
            f"{r.started:%Y-%m-%d %H:%M:%S}  {r.steps:>5}  {r.held:>4}  {r.denied:>6}  "
            f"{r.blocked:>7}  {one_line(', '.join(r.targets), 40)}"
        )
    if not found:
        lines.append("(no runs in that period)")
    return "\n".join(lines)


def _one_run(args: argparse.Namespace, ran: Any) -> int:
    from keyturn.recording import views

    if args.runs_command == "show":
        if args.json:
            steps = [views.step_json(s, n) for n, s in enumerate(ran.steps, 1)]
            print(json.dumps({"run": ran.id, "steps": steps, "more": ran.later}, indent=2))
        else:
            print(views.table(ran))
        return 0
    if args.runs_command == "replay":
        return _replay(ran, args.speed, args.step)
    text = (
        views.json_lines(ran)
        if args.format == "jsonl"
        else views.asciicast(ran, 3 if args.format == "asciicast3" else 2)
    )
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote run {ran.id} ({len(ran.steps)} steps) to {args.output}", file=sys.stderr)
    return 0


def _replay(ran: Any, speed: float, first: int) -> int:
    """Print the run's frames with their pacing; markers as dim lines of their own."""
    from keyturn.recording import views

    if first > len(ran.steps):
        raise ConfigError(f"--step {first}: the run has {len(ran.steps)} steps")
    shown = [f for f in views.frames(ran) if f.step >= first]
    out = sys.stdout
    clock = shown[0].at if shown else 0.0
    for frame in shown:
        time.sleep(max(frame.at - clock, 0.0) / speed)
        clock = frame.at
        if frame.code == "o":
            out.write(frame.text.replace("\r\n", "\n"))
        elif frame.code == "m":
            out.write(f"\x1b[2m── {frame.text}\x1b[0m\n")
        out.flush()
    return 0
