"""`make bench`: the mesh benchmark driver (bench.run) and its results (bench/results/)."""
