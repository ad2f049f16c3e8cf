"""Veil services: host-side, untrusted code (gateway, keyvault, state and their shared plumbing)."""
