"""Runs every benchmark module, or the ones named on the command line."""

from __future__ import annotations

import importlib
import pathlib
import sys


def main(argv: list[str]) -> int:
    available = sorted(p.stem.removeprefix("bench_") for p in pathlib.Path(__file__).parent.glob("bench_*.py"))
    chosen = argv or available
    unknown = set(chosen) - set(available)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; available: {', '.join(available)}")
        return 2
    failures = 0
    for name in chosen:
        print(f"\n=== benchmark: {name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.bench_{name}")
        failures += 1 if module.main([]) else 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
