"""TOFA's ML library: search spaces, the elastic supernet, costs. No orchestration imports."""
