"""The enclave: Veil's trusted code base (TCB), reached only through its ECALL table."""
