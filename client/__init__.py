"""The Python SDK and the `veil` command line."""
