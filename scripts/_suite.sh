#!/usr/bin/env bash
# The checks themselves, on whatever environment PATH holds first (scripts/test sets .venv up
# from uv.lock; scripts/test --latest a throwaway one): lint, format, types, import contracts,
# then pytest on real services. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== import contracts"
lint-imports
echo "== pytest"
exec python -m pytest "$@"
