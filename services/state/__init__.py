"""The state service: hosts the enclave, batches commands into it, persists and recovers."""
