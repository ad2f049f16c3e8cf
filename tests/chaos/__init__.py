"""Chaos: kill -9 the mesh's services under load (`make chaos`; a short run is in `make test`)."""
