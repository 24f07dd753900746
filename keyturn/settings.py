"""Process settings: secrets and addresses from ``KEYTURN_*`` environment variables only.

The policy YAML (:mod:`keyturn.config`) says *what* is allowed; this says *where* things are
and holds every secret. Nothing here is read from the YAML file, so a config file can be
reviewed, committed and shared without leaking anything.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from keyturn.errors import ConfigError
from keyturn.store.dsn import Dsn, parse_dsn


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KEYTURN_", extra="ignore")

    config: Path | None = None
    database_url: SecretStr | None = None
    vault_addr: str | None = None
    vault_token: SecretStr | None = None  # privileged token, for vault-bootstrap and dev only
    gateway_role_id: str | None = None
    gateway_secret_id: SecretStr | None = None
    bot_role_id: str | None = None
    bot_secret_id: SecretStr | None = None
    gateway_dev_secret: SecretStr | None = None  # HS256 agent tokens, development only
    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_api_url: str | None = None  # a Slack API emulator (tests, keyturn dev)

    def dsn(self) -> Dsn:
        if self.database_url is None:
            raise ConfigError(
                "KEYTURN_DATABASE_URL is not set; "
                "export it as postgresql://USER:PASSWORD@HOST:PORT/DBNAME"
            )
        return parse_dsn(self.database_url.get_secret_value(), "KEYTURN_DATABASE_URL")


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "KEYTURN_" + str(first["loc"][0]).upper()
        raise ConfigError(f"{name}: {first['msg']}") from None


def target_env_name(target: str, field: str) -> str:
    """``orders-db`` + ``password`` -> ``KEYTURN_TARGET_ORDERS_DB_PASSWORD``."""
    return "KEYTURN_TARGET_" + re.sub(r"[^A-Za-z0-9]", "_", target).upper() + "_" + field.upper()


def target_admin_credentials(target: str) -> tuple[str, str] | None:
    """The admin login Vault uses to create roles on ``target``, if the environment holds one."""
    user = os.environ.get(target_env_name(target, "username"))
    password = os.environ.get(target_env_name(target, "password"))
    if user and password:
        return user, password
    return None
