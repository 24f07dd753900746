# keyturn gateway: least privilege.
#
# The gateway runs allowed commands with short-lived read-only database credentials that it
# reads itself (one login per agent identity), and approved commands with credentials the bot
# hands over as single-use wrapping tokens. It can read nothing else: no write roles, no SSH
# signing, and it may revoke only its own read-only leases.
#
# For HTTP API targets it reads, when a call is sent, only the KV v2 secret each target names
# (or mints an identity token with each target's OIDC role).
#
# `keyturn vault-bootstrap` renders this file: <database_mount> becomes the configured mount,
# and a stanza naming <readonly_role> is repeated once per Postgres target's read-only role
# (as the HTTP stanzas below are per HTTP target's secret or identity-token role).

path "<database_mount>/creds/<readonly_role>" {
  capabilities = ["read"]
}

# Keep its own read-only leases alive (path form, scoped to those roles).
path "sys/leases/renew/<database_mount>/creds/<readonly_role>/*" {
  capabilities = ["update"]
}

# End a read-only login it closed (idle, or to stay within gateway.readonly_logins).
path "sys/leases/revoke/<database_mount>/creds/<readonly_role>/*" {
  capabilities = ["update"]
}

# Inspect a wrapping token's creation_path before consuming it, then unwrap it once.
path "sys/wrapping/lookup" {
  capabilities = ["update"]
}

path "sys/wrapping/unwrap" {
  capabilities = ["update"]
}

# An HTTP target's credential, read when one of its calls is sent (a KV v2 data path).
path "<http_secret>" {
  capabilities = ["read"]
}

# An HTTP target's short-lived identity token, minted per call for the gateway's entity.
path "identity/oidc/token/<identity_role>" {
  capabilities = ["read"]
}
