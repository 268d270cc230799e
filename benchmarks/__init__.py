"""Benchmarks (`make bench`): each reports a ratio against a baseline measured in the same run.

Tests never assert wall-clock times; these scripts measure them and print figures.
Each module `benchmarks/bench_<name>.py` has a `main(argv) -> int`; run one with
`python -m benchmarks <name>` or all with `python -m benchmarks`.
"""
