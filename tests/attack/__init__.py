"""Attack and bad-input suite: property-based tests and a fuzz runner over every decoder.

`python -m tests.attack.fuzz --seconds N` loops the same mutations as the tests, for longer.
"""
