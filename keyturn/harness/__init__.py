"""Throwaway real services for ``keyturn dev`` and the tests, never for production.

Everything dev-only lives here: a Postgres cluster, an OpenBao dev server, an sshd trusting
OpenBao's SSH CA, a development IdP and its tokens, the Slack emulator with its sandbox page, a
scripted CrewAI model, the dev stack that runs them all (:mod:`keyturn.harness.dev`), the demo
agent (:mod:`keyturn.harness.demo`) and the pytest fixtures built on them
(:mod:`keyturn.harness.pytest_plugin`). ``keyturn dev`` needs the ``dev`` extra; the demo needs
only the client. The production entry points (gateway, bot, migrate, vault-bootstrap, audit)
import nothing from here: an import-linter contract says so.
"""
