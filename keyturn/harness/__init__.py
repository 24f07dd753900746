"""Throwaway real services for ``keyturn dev`` and the tests, never for production.

A Postgres cluster, an OpenBao dev server, an sshd trusting OpenBao's SSH CA, a development
IdP, the Slack emulator with its sandbox page, a scripted CrewAI model, and the dev stack that
runs them all (:mod:`keyturn.harness.dev`). The pytest fixtures built on them live apart, in
:mod:`keyturn.testing`. The production entry points (gateway, bot, migrate, vault-bootstrap,
audit) import nothing from here: an import-linter contract says so.
"""
