"""Operator and test tooling: `veil up`, the dev PKI, dev policies and collateral, load and benchmarks.

Not part of the SDK: these need the servers (`pip install 'veil[server]'`). Nothing in production code
imports this package (tests/test_layering.py).
"""
