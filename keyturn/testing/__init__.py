"""Real services for tests and ``keyturn dev``: throwaway Postgres, OpenBao, and more to come."""
