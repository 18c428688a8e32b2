"""Train and evaluate objectives side by side: `drifting-compare` from a checkout. The code is drifting_vla/cli/compare.py."""

from drifting_vla.cli.compare import main

if __name__ == "__main__":
    main()
