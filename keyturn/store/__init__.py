"""Postgres: models, migrations, state-changing operations, LISTEN/NOTIFY."""
