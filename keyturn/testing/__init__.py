"""Real services for tests and ``keyturn dev``: throwaway Postgres, OpenBao, sshd, Slack emulator."""
