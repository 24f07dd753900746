# Sourced by the scripts that need uv: find a Python 3.11+, and put the uv that uv.lock pins
# into a virtualenv with pip (only that wheel, hash-checked), so uv itself is locked too.
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
    echo "keyturn needs Python 3.11 to 3.13 (set PYTHON=/path/to/python3.13)" >&2
    return 2
}

# install_uv VENV: the locked uv in VENV (already there at that version: nothing to do)
install_uv() {
    local venv="$1" pin
    pin="$("$venv/bin/python" scripts/lockfile.py uv-pin)" || return 1
    [ "uv==$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "${pin%% *}" ] || return 0
    echo "$pin" | "$venv/bin/python" -m pip install -qq --disable-pip-version-check \
        --no-deps --require-hashes --only-binary :all: -r /dev/stdin >&2
}
