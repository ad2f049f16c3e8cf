"""Host-side plumbing shared by all three services: config, mTLS, identity, server factory, errors."""
