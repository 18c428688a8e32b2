"""Train a policy (Hydra overrides on the command line): `drifting-train` from a checkout. The code is drifting_vla/cli/train.py."""

from drifting_vla.cli.train import main

if __name__ == "__main__":
    main()
