# OpenBao server config for docker-compose: integrated (raft) storage on the baodata volume,
# TLS terminated in front of it (the port is published on 127.0.0.1 only).
# Initialise and unseal it once by hand (`bao operator init`, `bao operator unseal`; see the
# comments in docker-compose.yml), then `keyturn vault-bootstrap` configures it.
storage "raft" {
  path    = "/openbao/file"
  node_id = "openbao-1"
}

listener "tcp" {
  address         = "0.0.0.0:8200"
  cluster_address = "0.0.0.0:8201"
  tls_disable     = true
}

api_addr      = "http://openbao:8200"
cluster_addr  = "http://openbao:8201"
disable_mlock = true # integrated storage memory-maps its database: mlock is not recommended
ui            = false
