# Sourced by scripts/dev and scripts/test: create or reuse .venv and keep it exactly what
# uv.lock says (every extra, every hash), so a new release of any dependency cannot change a
# fresh clone. Re-syncs only when uv.lock or pyproject.toml changed.
source scripts/_uv.sh

VENV="${KEYTURN_VENV:-.venv}"
stamp="$VENV/.keyturn-installed"
want="$(cat uv.lock pyproject.toml | "$(find_python)" -c \
    'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
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
    install_uv "$VENV" || failed
    # uv fetches and checks everything before it changes the environment: a failed download
    # leaves the old one as it was. Bytecode is compiled once here (pip did so; uv does not by
    # default), or every process the stack and the tests start would compile its imports anew.
    UV_PROJECT_ENVIRONMENT="$VENV" "$VENV/bin/uv" sync --quiet --frozen --all-extras --compile-bytecode >&2 || failed
    echo "$want" > "$stamp"
fi
case "$VENV" in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
