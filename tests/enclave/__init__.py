"""Tests of the enclave (the TCB), its providers, runner and host client."""
