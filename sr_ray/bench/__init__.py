"""Benchmarks and checks against reference implementations (the peers' own code, the authors' approach)."""
