# Sourced by scripts/test: the SSH tests need a real OpenSSH server (sshd). Install it from
# the distribution's packages when it is missing and we may (root, or sudo without a
# password); otherwise say how, and let those tests fail with that message.
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  if command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then as_root=""; elif sudo -n true 2>/dev/null; then as_root="sudo"; else as_root="none"; fi
    if [ "$as_root" != none ]; then
      echo "== installing openssh-server (the SSH tests start a real sshd)"
      $as_root apt-get update -qq
      DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq --no-install-recommends openssh-server >/dev/null
    else
      echo "!! sshd is missing: run 'sudo apt-get install openssh-server' or the SSH tests fail" >&2
    fi
  else
    echo "!! sshd is missing: install OpenSSH server or the SSH tests fail" >&2
  fi
fi
