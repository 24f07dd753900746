"""``keyturn runs``: agents' runs listed, shown, replayed and exported, read from keyturn's
database (KEYTURN_DATABASE_URL; without it, a running ``keyturn dev``'s)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from keyturn.cli_common import Parser, one_store
from keyturn.config.durations import parse_duration
from keyturn.errors import ConfigError

FORMATS = ("asciicast", "asciicast3", "jsonl")
DEV_STACK = Path(".keyturn/dev/stack.json")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("runs", help="agents' runs: list, show, replay, export")
    runs = p.add_subparsers(dest="runs_command", required=True, parser_class=Parser)
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
        one.add_argument("run", help="the run: its run_id, or auto-… from keyturn runs list")
        one.add_argument("--agent", help="only this agent's steps of a shared run_id")
        one.add_argument("--limit", type=int, default=1000, help="at most this many steps")
    for one in (listing, show, replay, export):
        one.add_argument(
            "--stack",
            type=Path,
            default=DEV_STACK,
            help="without KEYTURN_DATABASE_URL: the keyturn dev stack to read",
        )
    p.set_defaults(func=cmd_runs, extra="server")


def _dsn(stack: Path) -> Any:
    """keyturn's database: KEYTURN_DATABASE_URL, or a running ``keyturn dev``'s."""
    from keyturn.settings import load_settings

    if "KEYTURN_DATABASE_URL" in os.environ or not stack.exists():
        return load_settings().dsn()
    from keyturn.harness.demo import load_stack
    from keyturn.store.dsn import parse_dsn

    return parse_dsn(str(load_stack(stack).get("database_url", "")), f"{stack}: database_url")


def _checked(args: argparse.Namespace) -> timedelta | None:
    """The arguments' own problems, one at a time; ``--since`` as a duration."""
    if not 1 <= args.limit <= 100_000:
        raise ConfigError("--limit must be 1 to 100000")
    if args.runs_command == "replay":
        if not 0.01 <= args.speed <= 1000:  # also refuses nan
            raise ConfigError("--speed must be 0.01 to 1000")
        if args.step < 1:
            raise ConfigError("--step must be 1 or more")
    if args.runs_command != "list":
        return None
    try:
        return parse_duration(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None


def cmd_runs(args: argparse.Namespace) -> int:
    since = _checked(args)
    dsn = _dsn(args.stack)

    async def read() -> Any:
        from keyturn.store import run_list, run_steps

        async with one_store(dsn) as store:
            if since is not None:
                return await run_list.runs_since(
                    store,
                    store.clock.now() - since,
                    agent=args.agent,
                    target=args.target,
                    limit=args.limit,
                )
            return await run_steps.run(store, args.run, agent=args.agent, limit=args.limit)

    found = asyncio.run(read())
    if since is not None:
        print(_listing(found))
        return 0
    return _one_run(args, found)


def _listing(found: list[Any]) -> str:
    from keyturn.recording.timeline import one_line

    lines = [
        f"{'run':<42}  {'agent':<16}  {'started (UTC)':<19}  steps  held  denied  blocked  targets"
    ]
    for r in found:
        lines.append(
            f"{one_line(r.run, 42):<42}  {one_line(', '.join(r.agents), 16):<16}  "
            f"{r.started:%Y-%m-%d %H:%M:%S}  {r.steps:>5}  {r.held:>4}  {r.denied:>6}  "
            f"{r.blocked:>7}  {one_line(', '.join(r.targets), 40)}"
        )
    if not found:
        lines.append("(no runs in that period)")
    return "\n".join(lines)


def _one_run(args: argparse.Namespace, ran: Any) -> int:
    from keyturn.recording import terminal, timeline

    if args.runs_command == "show":
        if args.json:
            steps = [timeline.step_json(s, n) for n, s in enumerate(ran.steps, 1)]
            print(json.dumps({"run": ran.name, "steps": steps, "more": ran.more}, indent=2))
        else:
            print(timeline.table(ran))
        return 0
    if args.runs_command == "replay":
        return _replay(ran, args.speed, args.step)
    if args.format == "jsonl":
        text = timeline.json_lines(ran)
    else:
        text = terminal.asciicast(ran, 3 if args.format == "asciicast3" else 2)
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    try:
        Path(args.output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    print(f"wrote run {ran.name} ({len(ran.steps)} steps) to {args.output}", file=sys.stderr)
    return 0


def _replay(ran: Any, speed: float, first: int) -> int:
    """Print the run's frames with their pacing; markers as dim lines of their own."""
    from keyturn.recording import terminal

    if first > len(ran.steps):
        raise ConfigError(f"--step {first}: the run has {len(ran.steps)} steps")
    shown = [f for f in terminal.frames(ran) if f.number >= first]
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
