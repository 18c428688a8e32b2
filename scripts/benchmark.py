"""Speed benchmarks as ratios against a baseline of the same run: `drifting-benchmark` from a checkout. The code is drifting_vla/cli/benchmark.py."""

from drifting_vla.cli.benchmark import main

if __name__ == "__main__":
    main()
