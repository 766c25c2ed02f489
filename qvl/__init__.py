"""The `qvl` command line, the settings tree and the demo."""
