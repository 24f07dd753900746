"""The Slack bot (slack-bolt AsyncApp): cards, approvals, slash commands, Vault broker, revocation.

It depends on :mod:`keyturn` only and never imports :mod:`gateway` (an import-linter contract).
"""
