"""docker-compose.yml and the Dockerfile, checked as an operator would before a deploy.

Each check is a function from the files to a list of problems that name the service (or file)
at fault. Every test also feeds its check a deliberately broken copy: a check that cannot fail
proves nothing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, cast

import pytest
import yaml

from keyturn.classify.cases import failing_cases
from keyturn.cli import build_parser
from keyturn.config.loading import load_config, parse_config
from keyturn.config.policy import Config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"
POLICY_EXAMPLE = ROOT / "deploy" / "policy.example.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"

# Files the operator provides, mounted from the project folder, and the example we ship.
OPERATOR_FILES = {"policy.yml": "deploy/policy.example.yml"}
# Commands that have no place in a deployment: the dev stack, its demo, development tokens.
DEV_ONLY = {"dev", "demo", "token"}
# Arguments naming a file the command reads: it must be mounted into the service.
INPUT_FILES = ("config", "file")
# The processes with an HTTP listener: `gateway.listen` and `bot.listen` in the policy file.
LISTENERS = ("gateway", "bot")

Compose = dict[str, Any]


def load_compose(text: str | None = None) -> Compose:
    data = yaml.safe_load(COMPOSE.read_text() if text is None else text)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def services(compose: Compose) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from compose["services"].items()


def command_of(service: dict[str, Any]) -> list[str]:
    """Compose accepts a list or a string (split like a shell would)."""
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(w) for w in command]


def console_scripts() -> dict[str, str]:
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    return cast(dict[str, str], scripts)


def mount_targets(service: dict[str, Any]) -> set[str]:
    targets = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.add(str(volume.get("target", "")))
        else:
            parts = str(volume).split(":")
            targets.add(parts[1] if len(parts) > 1 else parts[0])
    return targets


# ------------------------------------------------------------------ commands


def parse_keyturn(args: list[str]) -> tuple[Any, str]:
    """The real ``keyturn`` parser on ``args``: (namespace, "") or (None, what it said)."""
    said = io.StringIO()
    with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
        try:
            return build_parser().parse_args(args), ""
        except SystemExit:  # argparse exits on bad input (and on --help)
            return None, said.getvalue().strip().splitlines()[-1] if said.getvalue() else "exits"


def keyturn_command_problems(where: str, argv: list[str], mounts: set[str] | None) -> list[str]:
    shown = shlex.join(argv)
    args, said = parse_keyturn(argv[1:])
    if args is None:
        return [f"{where}: `{shown}` is not a valid keyturn command: {said}"]
    if args.command in DEV_ONLY:
        return [f"{where}: `{shown}` is for development only, not a deployment"]
    problems = []
    for name in INPUT_FILES:
        path = getattr(args, name, None)
        if not (mounts is not None and isinstance(path, Path) and path.is_absolute()):
            continue
        if not any(path.is_relative_to(target) for target in mounts if target):
            problems.append(f"{where}: `{shown}` reads {path}, which no volume mounts")
    return problems


def command_problems(compose: Compose) -> list[str]:
    """Every keyturn service runs a real subcommand with valid flags, on files it can see."""
    scripts = console_scripts()
    problems = []
    for name, service in services(compose):
        argv = command_of(service)
        from_keyturn_image = service.get("build") in (".", "./")
        if from_keyturn_image and (not argv or argv[0] not in scripts):
            problems.append(
                f"service {name}: the keyturn image runs {shlex.join(argv) or 'its default'}, "
                f"not one of its console scripts {sorted(scripts)}"
            )
        elif argv and argv[0] == "keyturn":
            where = f"service {name}"
            problems += keyturn_command_problems(where, argv, mount_targets(service))
    return problems


def documented_commands(text: str) -> Iterator[tuple[int, list[str]]]:
    """The ``$ …`` command lines in the file's comments (``\\`` continues one), split."""
    lines = iter(enumerate(text.splitlines(), start=1))
    for number, line in lines:
        found = re.match(r"\s*#\s*\$ (.*)$", line)
        if not found:
            continue
        command = found.group(1)
        while command.endswith("\\"):
            command = command[:-1] + " " + re.sub(r"^\s*#\s*", "", next(lines, (0, ""))[1])
        yield number, shlex.split(command)


def documented_command_problems(text: str, compose: Compose) -> list[str]:
    """The commands the comments tell an operator to run are real too."""
    problems = []
    for line, words in documented_commands(text):
        if "keyturn" not in words:
            continue
        at = words.index("keyturn")
        service = compose["services"].get(words[at - 1]) if at else None
        mounts = mount_targets(service) if service is not None else None
        where = f"docker-compose.yml line {line}"
        problems += keyturn_command_problems(where, words[at:], mounts)
    return problems


def test_every_keyturn_service_runs_a_real_command() -> None:
    assert command_problems(load_compose()) == []


def test_the_commands_in_the_comments_are_real() -> None:
    text = COMPOSE.read_text()
    assert any("keyturn" in words for _, words in documented_commands(text))
    assert documented_command_problems(text, load_compose(text)) == []


@pytest.mark.parametrize(
    ("service", "command", "expected"),
    [
        ("gateway", ["keyturn", "gateway", "--confg", "/etc/keyturn/policy.yml"], "--confg"),
        ("bot", ["keyturn", "bott", "--config", "/etc/keyturn/policy.yml"], "invalid choice"),
        ("vault-bootstrap", ["keyturn", "vault-bootstrap"], "--config"),
        ("migrate", "keyturn migrate --down", "expected one argument"),
        ("gateway", ["keyturn", "dev"], "development only"),
        ("gateway", ["keyturn", "gateway", "--config", "/etc/keyturn/policy.yaml"], "no volume"),
        ("bot", ["python", "-m", "bot"], "console scripts"),
        ("migrate", [], "console scripts"),
    ],
)
def test_a_bad_command_is_reported(service: str, command: Any, expected: str) -> None:
    broken = load_compose()
    broken["services"][service]["command"] = command
    assert any(f"service {service}" in p and expected in p for p in command_problems(broken)), (
        command_problems(broken)
    )


def test_a_bad_documented_command_is_reported() -> None:
    text = COMPOSE.read_text().replace("--secret-ids-out /out", "--secret-id-out /out")
    problems = documented_command_problems(text, load_compose(text))
    assert len(problems) == 1 and "--secret-id-out" in problems[0] and "line" in problems[0]


# ------------------------------------------------------------------ variables


def referenced_variables(compose: Compose) -> dict[str, set[str]]:
    """``${VAR}``, ``${VAR:-x}``, ``${VAR:?msg}``, ``$VAR`` in values -> the services using it.

    Comments are not interpolated, and ``$$`` is a literal dollar sign.
    """
    found: dict[str, set[str]] = {}

    def walk(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item, where)
        elif isinstance(value, list):
            for item in value:
                walk(item, where)
        elif isinstance(value, str):
            pattern = r"\$(\$|\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))"
            for match in re.finditer(pattern, value):
                name = match.group(2) or match.group(3)
                if name:
                    found.setdefault(name, set()).add(where)

    for section in ("services", "volumes", "networks", "secrets", "configs"):
        for name, value in (compose.get(section) or {}).items():
            walk(value, f"{section[:-1]} {name}")
    return found


def documented_variables(readme: str) -> list[re.Pattern[str]]:
    """Names in the first column of the README's configuration table, as patterns.

    A row may list several (`A`, `B`), shorten a sibling to its suffix (`X_ROLE_ID` /
    `_SECRET_ID` is `X_SECRET_ID`) and hold placeholders (`KEYTURN_TARGET_<NAME>_PASSWORD`).
    """
    lines = readme.splitlines()
    header = re.compile(r"^\|\s*variable\s*\|\s*used by\s*\|\s*meaning\s*\|\s*$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    assert start is not None, "README.md has no `| variable | used by | meaning |` table"
    patterns = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        full = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if name.startswith("_") and full:
                name = "_".join(full.split("_")[: -name.count("_")]) + name
            else:
                full = name
            pieces = re.split(r"<[A-Za-z_]+>", name)
            patterns.append(re.compile("[A-Z0-9_]+".join(map(re.escape, pieces))))
    return patterns


def undocumented_variable_problems(compose: Compose, readme: str) -> list[str]:
    """Every variable an operator must know about is in the README's configuration table."""
    documented = documented_variables(readme)
    return [
        f"${{{name}}} ({', '.join(sorted(where))}) is not in README.md's configuration table"
        for name, where in sorted(referenced_variables(compose).items())
        if not any(p.fullmatch(name) for p in documented)
    ]


def test_every_variable_is_in_the_readme_table() -> None:
    compose = load_compose()
    assert "KEYTURN_DB_PASSWORD" in referenced_variables(compose)
    assert undocumented_variable_problems(compose, README.read_text()) == []


def test_the_readme_table_is_read_with_its_shorthands() -> None:
    readme = "\n".join(
        [
            "| variable | used by | meaning |",
            "|---|---|---|",
            "| `KEYTURN_TARGET_<NAME>_USERNAME` / `_PASSWORD` | vault-bootstrap | x |",
            "| `KEYTURN_GATEWAY_ROLE_ID` / `_SECRET_ID` | gateway | x |",
            "| `KEYTURN_SLACK_BOT_TOKEN`, `KEYTURN_SLACK_SIGNING_SECRET` | bot | x |",
            "",
            "| `KEYTURN_AFTER_THE_TABLE` | - | x |",
        ]
    )
    patterns = documented_variables(readme)
    for name in (
        "KEYTURN_TARGET_ORDERS_DB_PASSWORD",
        "KEYTURN_TARGET_ORDERS_DB_USERNAME",
        "KEYTURN_GATEWAY_ROLE_ID",
        "KEYTURN_GATEWAY_SECRET_ID",
        "KEYTURN_SLACK_SIGNING_SECRET",
    ):
        assert any(p.fullmatch(name) for p in patterns), name
    for name in ("KEYTURN_GATEWAY_PASSWORD", "KEYTURN_TARGET__TOKEN", "KEYTURN_AFTER_THE_TABLE"):
        assert not any(p.fullmatch(name) for p in patterns), name


@pytest.mark.parametrize(
    ("value", "reported"),
    [
        ("${KEYTURN_GATEWAY_TIMOUT:-5}", "KEYTURN_GATEWAY_TIMOUT"),
        ("${KEYTURN_UNKNOWN:?set it}", "KEYTURN_UNKNOWN"),
        ("${KEYTURN_UNKNOWN?set it}", "KEYTURN_UNKNOWN"),
        ("$KEYTURN_UNKNOWN", "KEYTURN_UNKNOWN"),
        ("postgresql://u:${KEYTURN_DB_PASSWORDS}@db/k", "KEYTURN_DB_PASSWORDS"),
        ("$${NOT_INTERPOLATED} and $$HOME", None),
    ],
)
def test_an_undocumented_variable_is_reported(value: str, reported: str | None) -> None:
    broken = load_compose()
    broken["services"]["gateway"]["environment"]["KEYTURN_EXTRA"] = value
    problems = undocumented_variable_problems(broken, README.read_text())
    real = undocumented_variable_problems(load_compose(), README.read_text())
    new = [p for p in problems if p not in real]
    if reported is None:
        assert new == []
    else:
        assert len(new) == 1 and reported in new[0] and "service gateway" in new[0], new


def required_variables(compose: Compose) -> set[str]:
    """The variables compose refuses to run without: ``${VAR:?msg}`` and ``${VAR?msg}``."""
    text = json.dumps(compose["services"])
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*):?\?", text))


def env_example_problems(compose: Compose, example: str) -> list[str]:
    """deploy/.env.example holds every variable compose requires, nothing it does not use,
    no value, and none of the secrets that must not sit in .env."""
    listed = {}
    for line in example.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            listed[name.strip()] = value.strip()
    used = referenced_variables(compose)
    problems = [
        f"deploy/.env.example lacks {name}, which docker-compose.yml requires"
        for name in sorted(required_variables(compose) - set(listed))
    ]
    for name, value in listed.items():
        if name == "KEYTURN_VAULT_TOKEN" or name.startswith("KEYTURN_TARGET_"):
            problems.append(f"deploy/.env.example: {name} belongs to a command line, not .env")
        elif name not in used:
            problems.append(f"deploy/.env.example: {name} is not used by docker-compose.yml")
        if value:
            problems.append(f"deploy/.env.example ships a value for {name}")
    return problems


def test_the_env_example_lists_what_compose_requires() -> None:
    compose = load_compose()
    assert {"KEYTURN_DB_PASSWORD", "KEYTURN_BOT_SECRET_ID"} <= required_variables(compose)
    assert "KEYTURN_VAULT_TOKEN" not in required_variables(compose)
    assert env_example_problems(compose, ENV_EXAMPLE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("KEYTURN_BOT_SECRET_ID=\n", "", "lacks KEYTURN_BOT_SECRET_ID"),
        ("KEYTURN_DB_PASSWORD=\n", "KEYTURN_DB_PASSWORD=hunter2\n", "ships a value"),
        ("KEYTURN_BOT_ROLE_ID=\n", "KEYTURN_BOT_ROLE_ID=\nKEYTURN_VAULT_TOKEN=\n", "command line"),
        ("KEYTURN_BOT_ROLE_ID=\n", "KEYTURN_BOT_ROLE_ID=\nKEYTURN_BOT_ROLEID=\n", "not used"),
    ],
)
def test_a_wrong_env_example_is_reported(old: str, new: str, expected: str) -> None:
    text = ENV_EXAMPLE.read_text()
    assert old in text
    problems = env_example_problems(load_compose(), text.replace(old, new))
    assert any(expected in p for p in problems), problems


# ------------------------------------------------------------------ healthchecks


def one_shot_services(compose: Compose) -> set[str]:
    """Services something waits on to exit 0 (``service_completed_successfully``)."""
    return {
        dependency
        for _, service in services(compose)
        for dependency, how in (service.get("depends_on") or {}).items()
        if isinstance(how, dict) and how.get("condition") == "service_completed_successfully"
    }


def healthcheck_problems(compose: Compose) -> list[str]:
    """One-shots run once and are awaited; everything else restarts and says when it is up.

    Without a healthcheck, `service_healthy` cannot be waited for and a wedged process looks
    alive; a long-running service with ``restart: "no"`` stays down after a crash.
    """
    problems = []
    one_shot = one_shot_services(compose)
    for name, service in services(compose):
        restart = service.get("restart")
        if name in one_shot:
            if restart != "no":
                problems.append(
                    f'service {name}: others wait for it to complete, so restart must be "no"'
                    f" (quoted), not {restart!r}"
                )
            continue
        if restart not in ("always", "unless-stopped", "on-failure"):
            problems.append(
                f"service {name}: long-running (nothing awaits its completion) but restart is "
                f"{restart!r}: it would stay down after a crash"
            )
        check = service.get("healthcheck") or {}
        test = check.get("test")
        if check.get("disable") or not test or test in ("NONE", ["NONE"]):
            problems.append(f"service {name}: long-running but has no healthcheck")
    return problems


def test_long_running_services_have_healthchecks() -> None:
    compose = load_compose()
    assert one_shot_services(compose) == {"migrate", "vault-bootstrap"}
    assert healthcheck_problems(compose) == []


@pytest.mark.parametrize(
    ("service", "change", "expected"),
    [
        ("gateway", {"healthcheck": None}, "no healthcheck"),
        ("bot", {"healthcheck": {"disable": True}}, "no healthcheck"),
        ("openbao", {"healthcheck": {"test": ["NONE"]}}, "no healthcheck"),
        ("postgres", {"restart": None}, "stay down"),
        ("migrate", {"restart": False}, 'restart must be "no"'),  # YAML's unquoted no
        ("vault-bootstrap", {"restart": "unless-stopped"}, 'restart must be "no"'),
    ],
)
def test_a_missing_healthcheck_is_reported(
    service: str, change: dict[str, Any], expected: str
) -> None:
    broken = load_compose()
    for key, value in change.items():
        if value is None:
            broken["services"][service].pop(key, None)
        else:
            broken["services"][service][key] = value
    problems = healthcheck_problems(broken)
    assert any(f"service {service}" in p and expected in p for p in problems), problems


def test_a_one_shot_nobody_waits_for_is_long_running() -> None:
    broken = load_compose()
    for name in ("gateway", "bot", "sshd"):
        broken["services"][name]["depends_on"].pop("vault-bootstrap")
    problems = healthcheck_problems(broken)
    assert any("service vault-bootstrap" in p and "no healthcheck" in p for p in problems), problems


# ------------------------------------------------------------------ probes


def served_paths(command: str) -> set[str]:
    """The GET routes the process really serves, from its own application object."""
    if command == "gateway":
        from gateway.edges.http import create_app

        app = create_app(cast(Any, None))
    else:
        from bot.bootstrap import web_application

        app = web_application(cast(Any, None))
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}


def probe_problems(compose: Compose, config: Config) -> list[str]:
    """A keyturn listener's probe and published port hit the address the policy makes it
    listen on, at a path it serves: a wrong one keeps it unhealthy, or unreachable while its
    in-container probe passes."""
    problems = []
    for name, service in services(compose):
        argv = command_of(service)
        if argv[:1] != ["keyturn"] or len(argv) < 2 or argv[1] not in LISTENERS:
            continue
        listen = getattr(config, argv[1]).listen
        host, _, port = listen.rpartition(":")
        if host not in ("0.0.0.0", "::", "[::]"):  # noqa: S104 (what it must bind to)
            problems.append(f"service {name}: the policy listens on {listen}: unreachable")
        probe = json.dumps((service.get("healthcheck") or {}).get("test"))
        urls = re.findall(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/[^'\" ]*)", probe)
        if not urls:
            problems.append(f"service {name}: its healthcheck requests no local URL")
        for probe_port, path in urls:
            if probe_port != port:
                problems.append(f"service {name}: probes port {probe_port}, listens on {port}")
            if path not in served_paths(argv[1]):
                problems.append(f"service {name}: probes {path}, which `keyturn {argv[1]}` lacks")
        for published in service.get("ports", []):
            inside = str(published).split(":")[-1].split("/")[0]
            if inside != port:
                problems.append(f"service {name}: publishes {published}, listens on {port}")
    return problems


def test_the_example_policy_is_valid_and_its_tests_pass() -> None:
    config = load_config(POLICY_EXAMPLE)
    assert failing_cases(config) == []
    assert config.policy.tests and "demo-ssh" in config.policy.targets


def test_probes_hit_what_the_processes_serve() -> None:
    assert "/healthz" in served_paths("gateway") and "/healthz" in served_paths("bot")
    assert probe_problems(load_compose(), load_config(POLICY_EXAMPLE)) == []


@pytest.mark.parametrize(
    ("service", "old", "new", "expected"),
    [
        ("gateway", "8080/healthz", "8080/health", "probes /health, which"),
        ("bot", "3000/healthz", "3001/healthz", "probes port 3001"),
        ("gateway", "u.urlopen('http://127.0.0.1:8080/healthz', timeout=3)", "1", "no local URL"),
    ],
)
def test_a_wrong_probe_is_reported(service: str, old: str, new: str, expected: str) -> None:
    broken = load_compose()
    check = broken["services"][service]["healthcheck"]
    check["test"] = [word.replace(old, new) for word in check["test"]]
    problems = probe_problems(broken, load_config(POLICY_EXAMPLE))
    assert any(f"service {service}" in p and expected in p for p in problems), problems


def test_a_listener_the_ports_do_not_reach_is_reported() -> None:
    data = yaml.safe_load(POLICY_EXAMPLE.read_text())
    data["gateway"]["listen"] = "127.0.0.1:8080"
    data["bot"]["listen"] = "0.0.0.0:3030"
    problems = probe_problems(load_compose(), parse_config(data))
    assert any("service gateway" in p and "unreachable" in p for p in problems), problems
    assert any("service bot" in p and "publishes" in p for p in problems), problems


# ------------------------------------------------------------------ Dockerfile


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out = []
    for line in re.sub(r"\\\n", " ", dockerfile).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(arguments: str) -> list[str]:
    return [str(w) for w in json.loads(arguments)] if arguments.startswith("[") else [arguments]


def copies(dockerfile: str) -> list[tuple[int, list[str], str]]:
    """(position, sources, destination) of each COPY/ADD, the destination made absolute."""
    workdir, out = PurePosixPath("/"), []
    for at, (word, rest) in enumerate(instructions(dockerfile)):
        if word == "WORKDIR":
            workdir = workdir / rest
        elif word in ("COPY", "ADD"):
            args = exec_form(rest) if rest.startswith("[") else shlex.split(rest)
            args = [a for a in args if not a.startswith("--")]
            out.append((at, [a.rstrip("/") or "." for a in args[:-1]], str(workdir / args[-1])))
    return out


def installs_the_project(run: str) -> list[str]:
    """The flags of the ``uv sync`` that installs the project, or [] when none does."""
    for part in re.split(r"&&|\|\||;", run):
        words = shlex.split(part)
        if "sync" in words:
            at = words.index("sync")
            if any(w.split("/")[-1] == "uv" for w in words[:at]):
                return words[at:]
    return []


def dockerfile_problems(dockerfile: str, pyproject: dict[str, Any]) -> list[str]:
    """The image installs this project's server from the lock, as a non-root user, and runs
    its script."""
    project = pyproject["project"]
    scripts: dict[str, str] = project["scripts"]
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.split(".")[0].rstrip("*") for p in found})
    steps = instructions(dockerfile)
    copied = copies(dockerfile)
    installs = [at for at, (word, rest) in enumerate(steps) if word == "RUN"]
    installs = [at for at in installs if installs_the_project(steps[at][1])]
    problems = []
    if not installs:
        problems.append("Dockerfile: no `uv sync`: the image would not contain keyturn")
    for at in installs:
        flags = installs_the_project(steps[at][1])
        if "--frozen" not in flags:
            problems.append("Dockerfile: `uv sync` without --frozen may install other versions")
        if "--no-editable" not in flags:
            problems.append("Dockerfile: `uv sync` without --no-editable links to the sources")
        if "server" not in [e for f, e in itertools.pairwise(flags) if f == "--extra"]:
            problems.append("Dockerfile: `uv sync` without --extra server has no gateway or bot")
    needed = [*packages, "pyproject.toml", "uv.lock", project["readme"]]
    for script, target in scripts.items():
        top = target.split(":")[0].split(".")[0]
        if top not in packages:
            problems.append(f"pyproject: script {script} runs {target}, outside {packages}")
    for name in needed:
        at = [a for a, sources, _ in copied if name in sources or "." in sources]
        if not at:
            problems.append(f"Dockerfile: {name} is not copied into the image")
        elif installs and min(at) > installs[0]:
            problems.append(f"Dockerfile: {name} is copied after `uv sync` ran")
    env = dict(kv.split("=", 1) for word, rest in steps if word == "ENV" for kv in rest.split())
    policies = env.get("KEYTURN_VAULT_POLICIES")
    if not any(d == policies and "vault_policies" in s for _, s, d in copied):
        problems.append(
            f"Dockerfile: KEYTURN_VAULT_POLICIES={policies} does not hold a copy of "
            "vault_policies (vault-bootstrap reads its HCL sources there)"
        )
    user = [rest for word, rest in steps if word == "USER"]
    if not user or user[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the processes would run as root; add a USER")
    entrypoint = [exec_form(rest) for word, rest in steps if word == "ENTRYPOINT"]
    if entrypoint and entrypoint[-1]:
        problems.append(f"Dockerfile: ENTRYPOINT {entrypoint[-1]} would prefix every command")
    command = [exec_form(rest) for word, rest in steps if word == "CMD"]
    if command and (not command[-1] or command[-1][0].split()[0] not in scripts):
        problems.append(f"Dockerfile: CMD {command[-1]} is not one of the scripts {list(scripts)}")
    return problems


def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def test_the_dockerfile_installs_what_compose_runs() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text(), pyproject()) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("COPY bot ./bot\n", "", "bot is not copied"),
        ("COPY gateway ./gateway\n", "", "gateway is not copied"),
        (
            "COPY pyproject.toml uv.lock README.md",
            "COPY pyproject.toml uv.lock",
            "README.md is not",
        ),
        ("uv sync --frozen", "uv pip install keyturn --frozen", "no `uv sync`"),
        ("uv sync --frozen", "uv sync", "without --frozen"),
        ("--no-editable", "", "without --no-editable"),
        ("--extra server", "--extra mcp", "without --extra server"),
        (
            "COPY pyproject.toml uv.lock README.md",
            "COPY pyproject.toml README.md",
            "uv.lock is not",
        ),
        ("COPY vault_policies ./vault_policies\n", "", "KEYTURN_VAULT_POLICIES"),
        ("USER keyturn\n", "", "as root"),
        ('CMD ["keyturn", "--help"]', 'CMD ["keyturn-server"]', "not one of the scripts"),
        ("ENTRYPOINT []", 'ENTRYPOINT ["python"]', "would prefix"),
    ],
)
def test_a_broken_dockerfile_is_reported(old: str, new: str, expected: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new), pyproject())
    assert any(expected in p for p in problems), problems


def test_installing_before_copying_is_reported() -> None:
    text = DOCKERFILE.read_text().replace("COPY bot ./bot\n", "")
    text = text.replace("ENV PATH=", "COPY bot ./bot\nENV PATH=")
    problems = dockerfile_problems(text, pyproject())
    assert any("bot is copied after" in p for p in problems), problems


def test_a_script_outside_the_packages_is_reported() -> None:
    project = copy.deepcopy(pyproject())
    project["project"]["scripts"]["keyturn-bench"] = "bench.gateway:main"
    problems = dockerfile_problems(DOCKERFILE.read_text(), project)
    assert any("keyturn-bench" in p for p in problems), problems


# ------------------------------------------------------------------ paths


def path_problems(compose: Compose, root: Path) -> list[str]:
    """What the file takes from the repository exists; what the operator supplies has an
    example; nothing comes from elsewhere on the host (a docker.sock mount is root there)."""
    problems = []
    declared = set(compose.get("volumes") or {})
    for name, service in services(compose):
        build = service.get("build")
        if build is not None:
            context = root / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not (context / (dockerfile or "Dockerfile")).is_file():
                problems.append(f"service {name}: no {dockerfile or 'Dockerfile'} in {context}")
            else:
                for _, sources, _ in copies((context / (dockerfile or "Dockerfile")).read_text()):
                    problems += [
                        f"service {name}: its Dockerfile copies {s}, missing from {context}"
                        for s in sources
                        if not (context / s).exists()
                    ]
        for volume in service.get("volumes", []):
            if isinstance(volume, dict):
                source = str(volume.get("source", ""))
            else:
                source = str(volume).split(":")[0]
            if source.startswith("/"):
                problems.append(f"service {name}: mounts {source} from the host, not the project")
            elif source.startswith("."):
                relative = os.path.normpath(source)
                if relative in OPERATOR_FILES:
                    example = OPERATOR_FILES[relative]
                    if not (root / example).is_file():
                        problems.append(f"service {name}: {source} has no example at {example}")
                elif not (root / relative).exists():
                    problems.append(f"service {name}: mounts {source}, missing from the project")
            elif source not in declared:
                problems.append(f"service {name}: volume {source} is not declared in volumes:")
    return problems


def test_what_compose_mounts_and_builds_exists() -> None:
    compose = load_compose()
    assert path_problems(compose, ROOT) == []
    for example in OPERATOR_FILES.values():
        assert example in COMPOSE.read_text(), f"docker-compose.yml should point to {example}"


@pytest.mark.parametrize(
    ("service", "change", "expected"),
    [
        ("openbao", {"volumes": ["./deploy/openbao.hc:/openbao/config/k.hcl:ro"]}, "missing"),
        ("gateway", {"volumes": ["/var/run/docker.sock:/var/run/docker.sock"]}, "from the host"),
        ("bot", {"volumes": ["./settings.yml:/etc/keyturn/settings.yml:ro"]}, "missing"),
        ("postgres", {"volumes": ["pgdta:/var/lib/postgresql/data"]}, "not declared"),
        ("sshd", {"build": "./deploy/sshdd"}, "no Dockerfile"),
        (
            "vault-bootstrap",
            {"volumes": [{"type": "bind", "source": "./polcy.yml", "target": "/etc/p.yml"}]},
            "missing",
        ),
    ],
)
def test_a_missing_path_is_reported(service: str, change: dict[str, Any], expected: str) -> None:
    broken = load_compose()
    broken["services"][service].update(change)
    problems = path_problems(broken, ROOT)
    assert any(f"service {service}" in p and expected in p for p in problems), problems


def test_an_operator_file_without_its_example_is_reported(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copy(DOCKERFILE, tmp_path / "Dockerfile")
    (tmp_path / "scripts").mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md", "scripts/lockfile.py"):
        (tmp_path / name).touch()
    for name in ("keyturn", "gateway", "bot", "vault_policies"):
        (tmp_path / name).mkdir()
    assert path_problems(load_compose(), tmp_path) == []
    (tmp_path / OPERATOR_FILES["policy.yml"]).unlink()
    problems = path_problems(load_compose(), tmp_path)
    assert any("./policy.yml has no example" in p for p in problems), problems
    (tmp_path / "deploy" / "sshd" / "sshd_config").unlink()
    problems = path_problems(load_compose(), tmp_path)
    assert any("service sshd" in p and "copies sshd_config" in p for p in problems), problems


# ------------------------------------------------------------------ docker compose config


def compose_cli() -> list[str]:
    """`docker compose` (the plugin) or `docker-compose`; skipped without either, but not in
    CI, where scripts/test (scripts/_packages.sh) installs it."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    message = (
        "neither `docker compose` nor `docker-compose` is installed: scripts/test installs it "
        "(scripts/_packages.sh), or run `sudo apt-get install docker-compose`"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def compose_config(file: Path, tmp_path: Path, values: dict[str, str]) -> tuple[int, str]:
    """`config -q` of ``file`` in this project with exactly ``values`` as its .env."""
    env_file = tmp_path / "placeholders.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    names = set(referenced_variables(load_compose(file.read_text())))
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("COMPOSE_")}
    run = subprocess.run(
        [
            *compose_cli(),
            "--env-file",
            str(env_file),
            "-f",
            str(file),
            "--project-directory",
            str(ROOT),
            "--profile",
            "demo",
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    return run.returncode, run.stdout + run.stderr


def placeholders() -> dict[str, str]:
    return {name: "placeholder" for name in referenced_variables(load_compose())}


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    code, said = compose_config(COMPOSE, tmp_path, placeholders())
    assert code == 0, said


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            '    healthcheck:\n      test: ["CMD", "pg_isready"',
            '    healtcheck:\n      test: ["CMD", "pg_isready"',
            "healtcheck",
        ),
        ("{condition: service_healthy}", "{condition: service_is_healthy}", "service_is_healthy"),
    ],
)
def test_docker_compose_rejects_a_broken_file(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    text = COMPOSE.read_text()
    assert old in text
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text.replace(old, new, 1))
    code, said = compose_config(broken, tmp_path, placeholders())
    assert code != 0 and expected in said, said


def first_run_env() -> dict[str, str]:
    """deploy/.env.example with only what must never be empty (``${VAR:?}``) filled in: the
    AppRole lines still empty, as before first-run step 2, and no Vault token."""
    text = json.dumps(load_compose()["services"])
    filled = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    names = [line.split("=")[0] for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line]
    return {n: "placeholder" if n in filled else "" for n in names if not n.startswith("#")}


def test_docker_compose_runs_before_the_approles_exist(tmp_path: Path) -> None:
    """Step 1 (`docker compose up -d openbao`) must work before step 2 issues the AppRoles."""
    code, said = compose_config(COMPOSE, tmp_path, first_run_env())
    assert code == 0, said
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text().replace("${KEYTURN_BOT_ROLE_ID?", "${KEYTURN_BOT_ROLE_ID:?")
    )
    code, said = compose_config(broken, tmp_path, first_run_env())
    assert code != 0 and "first-run step 2" in said, said


def test_docker_compose_refuses_a_missing_secret(tmp_path: Path) -> None:
    values = placeholders()
    del values["KEYTURN_DB_PASSWORD"]
    code, said = compose_config(COMPOSE, tmp_path, values)
    assert code != 0 and "KEYTURN_DB_PASSWORD" in said, said
