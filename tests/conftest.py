"""Suite-wide: a SIGTERM cleans up like Ctrl-C (``tests/sigterm.py``)."""

pytest_plugins = ["tests.sigterm"]
