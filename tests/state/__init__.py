"""Tests of the state service: store, batcher, host, servicer."""
