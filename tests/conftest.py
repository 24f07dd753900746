pytest_plugins = ["keyturn.testing.pytest_plugin"]
