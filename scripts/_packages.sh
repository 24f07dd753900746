# Sourced by scripts/test: the system programs the tests run for real, installed from the
# distribution's packages when missing and we may (root, or sudo without a password);
# otherwise say how, and let the tests that need them fail (never skip) with that message.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
missing=()
have sshd || missing+=(openssh-server)       # the SSH tests start a real sshd
have chromium || missing+=(chromium)         # the browser tests drive it with Playwright
have npm || missing+=(nodejs npm)            # json-server, a real CRUD API, is an npm package
have psql || missing+=(postgresql-client)    # the Postgres edge is tested with Debian's psql
have asciinema || missing+=(asciinema)         # recorded runs are exported as asciicast it plays
# the deployment test runs `docker compose config` (the client only: no Docker engine)
docker compose version >/dev/null 2>&1 || have docker-compose || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "!! missing ${missing[*]}: install them, or the tests that need them fail" >&2
  else
    if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo"; else as_root="none"; fi
    if [ "$as_root" = none ]; then
      echo "!! missing ${missing[*]}: run 'sudo apt-get install ${missing[*]}', or the tests that need them fail" >&2
    else
      echo "== installing ${missing[*]} (the tests run the real programs)"
      if ! apt_said=$($as_root apt-get update -qq 2>&1 &&
        DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1); then
        echo "$apt_said" >&2
        echo "!! could not install ${missing[*]}: the tests that need them fail" >&2
      fi
    fi
  fi
fi

# json-server (tests/node), from its committed package-lock.json: npm ci when the lock changed
node_dir=tests/node
if have npm; then
  want_node="$(sha256sum "$node_dir/package-lock.json" | cut -d' ' -f1)"
  if [ "$(cat "$node_dir/node_modules/.keyturn-installed" 2>/dev/null)" != "$want_node" ]; then
    echo "== installing $node_dir's npm packages from package-lock.json"
    if npm ci --prefix "$node_dir" --no-audit --no-fund --silent >&2; then
      echo "$want_node" > "$node_dir/node_modules/.keyturn-installed"
    else
      echo "!! npm ci in $node_dir failed: the tests that run json-server fail" >&2
    fi
  fi
fi
