"""Alembic, driven from code: ``keyturn migrate`` and the test template database use this.

Alembic's env.py runs its own event loop, so these are plain functions; async callers use
``asyncio.to_thread``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from keyturn.store.dsn import Dsn

SCRIPT_LOCATION = Path(__file__).parent / "alembic"


def alembic_config(dsn: Dsn) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["dsn"] = dsn
    return cfg


def upgrade(dsn: Dsn, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: Dsn, revision: str) -> None:
    command.downgrade(alembic_config(dsn), revision)


def heads(dsn: Dsn) -> list[str]:
    return list(ScriptDirectory.from_config(alembic_config(dsn)).get_heads())
