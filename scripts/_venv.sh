# Sourced by scripts/dev and scripts/test: create or reuse .venv and keep it in step with
# pyproject.toml (reinstalls only when pyproject.toml changed). Needs Python 3.11+.
set -euo pipefail

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "keyturn needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    return 2
}

VENV="${KEYTURN_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$(find_python)" -m venv "$VENV"
fi
stamp="$VENV/.keyturn-installed"
want="$(cat pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setting up $VENV (first run or pyproject.toml changed)..." >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev,crewai,mcp]' >&2
    echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
