"""The agent-facing gateway (aiohttp): agent API, auth, hold/wait, executors.

It depends on :mod:`keyturn` only and never imports :mod:`bot` (an import-linter contract).
"""
