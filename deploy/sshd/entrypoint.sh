#!/bin/sh
# DEMO SSH target: trust Vault's SSH CA, keep one host key across restarts, print it for
# policy.yml, then run sshd in the foreground.
set -eu
ca_url="${VAULT_ADDR:?set VAULT_ADDR}/v1/${SSH_MOUNT:-ssh}/public_key"
ca=/etc/ssh/trusted_user_ca.pub
# The CA's public key needs no token. It exists once vault-bootstrap has run with an ssh target
# in policy.yml; a sealed Vault (503) is retried.
if ! curl -fsS --retry 5 --retry-connrefused --retry-delay 2 "$ca_url" -o "$ca.new" \
  || ! grep -q '^ssh-' "$ca.new"; then
  echo "demo-sshd: no SSH CA at $ca_url: run vault-bootstrap with an ssh target in policy.yml" >&2
  exit 1
fi
mv "$ca.new" "$ca"
key=/var/lib/sshd/ssh_host_ed25519_key
[ -f "$key" ] || ssh-keygen -q -t ed25519 -N '' -C demo-sshd -f "$key"
echo "demo-sshd: trusting the SSH CA at $ca_url"
echo "demo-sshd: host_key for policy.yml: $(cut -d' ' -f1,2 "$key.pub")"
exec /usr/sbin/sshd -D -e
