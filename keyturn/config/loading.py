"""Loading the configuration file: YAML in, a validated :class:`~keyturn.config.policy.Config`
out.

Every problem is reported with its location in the file (``rules[2].action: expected allow,
hold or block``) and all problems are reported at once. Secrets never belong here: a key that
looks like one, or a DSN carrying a user or password, is an error that names the environment
variable to use instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)
from pydantic_core import ErrorDetails

from keyturn.config.policy import Config
from keyturn.errors import ConfigError
from keyturn.settings import target_env_name


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    if loc[:1] == ("policy",):  # nested in the model, at the top level of the file
        loc = loc[1:]
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("postgres", "ssh", "http") and out.startswith("targets."):
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
        return "missing kind (postgres, ssh or http)"
    if kind == "union_tag_invalid":
        return f"expected kind postgres, ssh or http, got {ctx.get('tag')!r}"
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


def parse_config(data: Any, source: str = "config", base_dir: Path | None = None) -> Config:
    """``base_dir``: where relative paths in the file (an OpenAPI file) are found."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with targets and rules at the top level")
    problems = _secret_keys(data)
    try:
        config = Config.model_validate(data, context={"base_dir": base_dir})
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
    return parse_config(data, str(path), path.parent)
