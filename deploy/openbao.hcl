# OpenBao server config for docker-compose: file storage, TLS terminated in front of it.
# Initialize and unseal once (`bao operator init`), then run `keyturn vault-bootstrap`.
storage "file" {
  path = "/openbao/data"
}

listener "tcp" {
  address     = "0.0.0.0:8200"
  tls_disable = true
}

api_addr = "http://openbao:8200"
ui       = false
