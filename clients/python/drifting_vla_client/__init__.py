"""The robot side of a Drifting-VLA policy server, without torch: numpy, msgpack and websockets.

    pip install ./clients/python            # from a drifting-vla checkout

    from drifting_vla_client import PolicyClient, AsyncChunkExecutor, server_health

    client = PolicyClient("ws://gpu-box:8000")          # reads client.metadata on connect
    chunk = client.predict({"images": images, "proprio": proprio, "instruction": "open the drawer"})

The modules under `serving/` and `inference/` and `specs.py` are drifting_vla's own files
(drifting_vla/serving/{client,protocol,execution}.py, drifting_vla/inference/history.py,
drifting_vla/specs.py), linked here, not copied: `from drifting_vla.serving import PolicyClient`
in the full framework is the same code. Protocol and usage: docs/serving.md of drifting-vla.
"""

from .serving import *  # noqa: F403  the robot side: PolicyClient, AsyncChunkExecutor, server_health, ...
from .serving import __all__ as __all__

__version__ = "0.1.0"
