"""Serving a policy over the network: `scripts/serve.py` on the GPU machine, `PolicyClient` on the
robot, `AsyncChunkExecutor` to keep the robot moving while the next chunk is computed.

    from drifting_vla.serving import PolicyClient, AsyncChunkExecutor

The server (`drifting_vla.serving.server`) needs torch; this package's client side does not, and
installs on its own as `drifting-vla-client` (clients/python: the same files, imported as
`drifting_vla_client`).
Protocol and load figures: docs/serving.md.
"""

# Relative imports: these modules are also the robot-side package `drifting_vla_client`
# (clients/python links to them), which installs without the rest of drifting_vla.
from .client import (
    PolicyClient,
    PolicyError,
    ServerBusy,
    ServerNonFiniteActions,
    ServerProprioOutOfRange,
    server_health,
)
from .execution import AsyncChunkExecutor, ChunkedPolicy, ChunkQueue
from .protocol import PROTOCOL, ProtocolError

__all__ = [
    "PROTOCOL",
    "AsyncChunkExecutor",
    "ChunkQueue",
    "ChunkedPolicy",
    "PolicyClient",
    "PolicyError",
    "ProtocolError",
    "ServerBusy",
    "server_health",
    "ServerNonFiniteActions",
    "ServerProprioOutOfRange",
]
