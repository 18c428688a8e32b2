"""Collect (and cache) scripted-expert demonstrations: `drifting-collect` from a checkout. The code is drifting_vla/cli/collect.py."""

from drifting_vla.cli.collect import main

if __name__ == "__main__":
    main()
