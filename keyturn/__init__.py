"""keyturn: a chat-ops approval gateway for AI agents (shared core)."""

__version__ = "0.1.0"
