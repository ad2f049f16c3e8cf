"""The keyvault: attestation verification, key management, secure key release, freshness, audit."""
