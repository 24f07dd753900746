"""The pytest plugin (fixtures on the throwaway services of :mod:`keyturn.harness`)."""
