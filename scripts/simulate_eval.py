"""Evaluate a saved policy in closed loop in simulation: `drifting-eval` from a checkout. The code is drifting_vla/cli/eval.py."""

from drifting_vla.cli.eval import main

if __name__ == "__main__":
    main()
