"""The public gateway: client authentication, limits, routing to state shards."""
