"""Benchmarks of lightning-influence against Kronfluence (run with `make bench`).

Nothing here is part of the library: the benchmarks run in their own environment
(`.bench-venv`, with Kronfluence pinned) and write `docs/benchmarks.md` and plots.
"""
