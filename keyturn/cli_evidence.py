"""``keyturn audit evidence`` and ``keyturn audit verify --evidence``: one step's proof
written (sealed with the audit key when ``--config`` gives the bot's Vault), and checked:
offline for consistency, with Vault for the seal (:mod:`keyturn.recording.proof`)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from keyturn.cli_common import EXIT_TAMPERED, one_store, run
from keyturn.errors import ConfigError

if TYPE_CHECKING:
    from keyturn.checkpoint import Anchor


def _anchor(config: Path) -> Anchor:
    """The deployment's audit key in Vault, reached with the bot's AppRole."""
    from keyturn.checkpoint import Anchor
    from keyturn.config.loading import load_config
    from keyturn.settings import load_settings
    from keyturn.vault import process_vault

    loaded = load_config(config)
    return Anchor.of(process_vault(load_settings(), loaded, "bot"), loaded.vault)


def verify(file: Path, config: Path | None) -> int:
    """Exit 0 when the file is consistent (and, with ``config``, sealed by this deployment's
    audit key); 1 naming the first thing that does not hold."""
    from keyturn.recording.proof import EvidenceBroken, check, seal_message

    try:
        evidence = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read it as an evidence file: {exc}") from None
    try:
        proven = check(evidence)
    except EvidenceBroken as exc:
        print(f"{file}: evidence does not hold: {exc}", file=sys.stderr)
        return EXIT_TAMPERED
    decided = ", ".join(f"{d} by {who}" for who, d in proven.decisions) or "no decision"
    what = (
        f"step {proven.step} by {proven.agent} on {proven.target}: {proven.status} ({decided});"
        f" {proven.events} audit events ({proven.first_seq}..{proven.last_seq}) recomputed and"
        f" linked, as of event {proven.last_seq}"
    )
    if config is None:
        sealed = "sealed" if proven.seal else "not sealed"
        print(
            f"{file}: consistent: {what}. The file is {sealed}; only --config checks that its "
            "events are this deployment's (against the audit key in Vault)"
        )
        return 0
    if proven.seal is None:
        print(f"{file}: evidence does not hold: it is not sealed (write it with --config)",
              file=sys.stderr)  # fmt: skip
        return EXIT_TAMPERED
    anchor = _anchor(config)

    seal = proven.seal

    async def genuine() -> int:
        try:
            return int(await anchor.verify(seal_message(seal), str(seal.get("hmac"))))
        finally:
            await anchor.vault.close()

    if not run(genuine()):
        print(f"{file}: evidence does not hold: its seal is not from this deployment's audit "
              "key", file=sys.stderr)  # fmt: skip
        return EXIT_TAMPERED
    print(
        f"{file}: evidence holds: {what}; sealed by this deployment's audit key (checked) at "
        f"{seal.get('at')}"
    )
    return 0


def write(request: str, file: Path, config: Path | None) -> int:
    from keyturn import evidence
    from keyturn.settings import load_settings

    try:
        step_id = uuid.UUID(request)
    except ValueError:
        raise ConfigError(f"{request!r} is not a request id (a UUID)") from None
    dsn = load_settings().dsn()
    anchor = _anchor(config) if config is not None else None

    async def written() -> int:
        partial = file.with_name(file.name + ".partial")  # the file appears whole, or not at all
        try:
            async with one_store(dsn) as store:
                with partial.open("w", encoding="utf-8") as out:
                    count = await evidence.write(store, step_id, out, anchor)
            partial.replace(file)
        except OSError as exc:
            raise ConfigError(f"cannot write {file}: {exc.strerror or exc}") from None
        finally:
            partial.unlink(missing_ok=True)
            if anchor is not None:
                await anchor.vault.close()
        return count

    count = run(written())
    sealed = " (sealed)" if anchor is not None else ""
    print(f"wrote the evidence of {step_id}{sealed} ({count} audit events) to {file}",
          file=sys.stderr)  # fmt: skip
    return 0
