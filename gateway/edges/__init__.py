"""The ways agents reach the gateway: each parses and authenticates, then calls a use case."""
