"""Serve a saved policy over a websocket: `drifting-serve` from a checkout. The code is drifting_vla/cli/serve.py."""

from drifting_vla.cli.serve import main

if __name__ == "__main__":
    main()
