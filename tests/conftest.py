pytest_plugins = ["keyturn.harness.pytest_plugin"]
