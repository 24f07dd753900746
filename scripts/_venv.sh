# Sourced by scripts/dev, scripts/test and scripts/lock: create or reuse .venv and keep it
# exactly what uv.lock says (every extra, every hash), so a new release of any dependency
# cannot change a fresh clone. Re-syncs only when uv.lock or pyproject.toml changed.
# Needs Python 3.11+; brings uv itself from the lock (pinned, hash-checked) with pip.
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
stamp="$VENV/.keyturn-installed"
want="$(cat uv.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$VENV/bin/python" ]; then
    if [ -x "$VENV/bin/python" ]; then fresh=""; py="$VENV/bin/python"; else fresh=1; py="$(find_python)"; fi
    "$py" scripts/lockfile.py check-platform || exit 2
    echo "setting up $VENV from uv.lock (first run, or the lock changed)..." >&2
    failed() {
        if [ -n "$fresh" ]; then
            rm -rf "$VENV"
            echo "!! could not set up $VENV (see above); nothing was left behind: run the command again" >&2
        else
            echo "!! could not update $VENV (see above); it still has what it had: run the command again" >&2
        fi
        exit 2
    }
    [ -z "$fresh" ] || "$py" -m venv "$VENV" || failed
    uv_pin="$("$VENV/bin/python" scripts/lockfile.py uv-pin)" || failed
    if [ "uv==$("$VENV/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "${uv_pin%% *}" ]; then
        # pip installs nothing but the hash-checked uv wheel the lock names
        echo "$uv_pin" | "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-deps --require-hashes --only-binary :all: -r /dev/stdin >&2 || failed
    fi
    # uv fetches and checks everything before it changes the environment: a failed download
    # leaves the old one as it was
    UV_PROJECT_ENVIRONMENT="$VENV" "$VENV/bin/uv" sync --quiet --frozen --all-extras >&2 || failed
    echo "$want" > "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
