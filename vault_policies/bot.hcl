# keyturn bot: least privilege.
#
# On approval the bot issues write credentials (wrapped, for the gateway) or signs an SSH key
# with the CA, wraps what it issued, and later renews (Extend) or revokes (Revoke now, expiry,
# orphan sweep) those leases. It cannot read the read-only roles, change Vault's
# configuration, or touch leases outside its own roles.
#
# `keyturn vault-bootstrap` renders this file: <database_mount> and <ssh_mount> become the
# configured mounts; a stanza naming <write_role> or <ssh_role> is repeated once per role.

path "<database_mount>/creds/<write_role>" {
  capabilities = ["read"]
}

path "<ssh_mount>/sign/<ssh_role>" {
  capabilities = ["update"]
}

path "sys/wrapping/wrap" {
  capabilities = ["update"]
}

path "sys/leases/renew/<database_mount>/creds/<write_role>/*" {
  capabilities = ["update"]
}

path "sys/leases/revoke/<database_mount>/creds/<write_role>/*" {
  capabilities = ["update"]
}

# The orphan sweep lists the leases under each write role (listing leases requires sudo).
path "sys/leases/lookup/<database_mount>/creds/<write_role>/" {
  capabilities = ["list", "sudo"]
}

# Audit checkpoints (keyturn.checkpoint): the chain's head, HMACed under a key nobody can
# export and kept where a database superuser cannot write. The bot takes one every minute;
# `keyturn audit verify` checks the chain against it with the same AppRole.
path "<transit_mount>/hmac/keyturn-audit" {
  capabilities = ["update"]
}

path "<transit_mount>/verify/keyturn-audit" {
  capabilities = ["update"]
}

path "<kv_mount>/data/keyturn/audit/*" {
  capabilities = ["create", "read", "update"]
}
