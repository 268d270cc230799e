"""Benchmarks (`make bench`): each reports a ratio against a baseline measured in the same run.

Tests never assert wall-clock times; these scripts measure them and print figures.
Each module `benchmarks/bench_<name>.py` has a `main(argv) -> int`; run one with
`python -m benchmarks <name>` or all with `python -m benchmarks`.
"""

from dev.secrets import setdefault_environ

# Every benchmark starts services, which need their secrets: random ones for this run
# (inherited by the processes it starts), whichever module is run.
setdefault_environ()
