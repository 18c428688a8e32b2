"""Serving a policy over the network: `scripts/serve.py` on the GPU machine, `PolicyClient` on the
robot, `AsyncChunkExecutor` to keep the robot moving while the next chunk is computed.

    from drifting_vla.serving import PolicyClient, AsyncChunkExecutor

The server (`drifting_vla.serving.server`) needs torch; this package's client side does not.
Protocol and load figures: docs/serving.md.
"""

from drifting_vla.serving.client import (
    PolicyClient,
    PolicyError,
    ServerBusy,
    ServerNonFiniteActions,
    ServerProprioOutOfRange,
)
from drifting_vla.serving.execution import AsyncChunkExecutor, ChunkedPolicy, ChunkQueue
from drifting_vla.serving.protocol import PROTOCOL, ProtocolError

__all__ = [
    "PROTOCOL",
    "AsyncChunkExecutor",
    "ChunkQueue",
    "ChunkedPolicy",
    "PolicyClient",
    "PolicyError",
    "ProtocolError",
    "ServerBusy",
    "ServerNonFiniteActions",
    "ServerProprioOutOfRange",
]
