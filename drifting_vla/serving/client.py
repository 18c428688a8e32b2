"""The robot side of the policy server: connect, read the metadata, ask for chunks.

    client = PolicyClient("ws://127.0.0.1:8000")           # reads .metadata on connect
    chunk = client.predict({"images": images,               # uint8 [V, 3, H, W] or [V, H, W, 3]
                            "proprio": proprio,             # [proprio_dim]
                            "instruction": "open the drawer"})
    chunk.shape == (client.metadata["horizon"], client.metadata["action_dim"])   # raw units

Imports no torch: it runs on a robot computer with numpy, msgpack and websockets.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.sync.client import connect

# Relative: this module is also drifting_vla_client.serving.client (clients/python).
from ..safety import NonFiniteActions, ProprioOutOfRange, check_finite_chunk
from .protocol import (
    BUSY,
    NON_FINITE,
    OUT_OF_RANGE,
    PROTOCOL,
    check_observation,
    pack,
    unpack,
)


def _arrays(images):
    """Images as the protocol sends them: arrays, camera maps, or a list of camera maps (a history)."""
    if isinstance(images, Mapping):
        return images
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], Mapping):
        return list(images)
    return np.asarray(images)


class PolicyError(RuntimeError):
    """The server answered with an error; `kind` is one of the protocol's error kinds."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class ServerBusy(PolicyError):
    """The server's queue is full; nothing was queued. Retry shortly."""


class ServerProprioOutOfRange(PolicyError, ProprioOutOfRange):
    """The server refused the proprio as outside what the policy represents (drifting_vla/safety.py)."""


class ServerNonFiniteActions(PolicyError, NonFiniteActions):
    """The policy behind the server drew non-finite actions; the server sent none."""


_ERRORS = {BUSY: ServerBusy, OUT_OF_RANGE: ServerProprioOutOfRange, NON_FINITE: ServerNonFiniteActions}


class PolicyClient:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout_s: float = 30.0,
        max_message_bytes: int = 16 * 2**20,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.url, self.timeout_s = url, timeout_s
        self._connection = connect(
            url, additional_headers=headers, compression=None, max_size=max_message_bytes, open_timeout=timeout_s
        )
        self.metadata: dict = unpack(self._connection.recv(timeout=timeout_s))
        if self.metadata.get("protocol") != PROTOCOL:
            self.close()
            raise PolicyError("protocol", f"the server speaks {self.metadata.get('protocol')!r}, this client {PROTOCOL!r}")
        self.last_timing: dict | None = None  # the server's decode/queue/model/encode ms of the last reply

    def check(self, obs: Mapping) -> None:
        """Raise ProtocolError naming what the server would refuse in `obs` (no request is sent)."""
        check_observation(obs, self.metadata)

    def predict(self, obs: Mapping, seed: int | None = None) -> np.ndarray:
        """One observation -> its action chunk, float32 [horizon, A] in raw units.

        obs: images (uint8 [V, 3, H, W], [V, H, W, 3] or {camera: image}), proprio [S],
        instruction (str). With `metadata["n_obs_steps"]` = n > 1, the last n control steps, oldest
        first: images a list of n such entries, proprio [n, S] (`AsyncChunkExecutor` keeps them).
        `seed` makes the chunk reproducible (the server runs it unbatched).
        Raises ServerBusy when the server's queue is full, ServerProprioOutOfRange /
        ServerNonFiniteActions (PolicyRefusal, drifting_vla/safety.py) when the policy refused,
        NonFiniteActions for a reply with non-finite actions, PolicyError for any other error reply.
        """
        request = {"images": _arrays(obs["images"]), "proprio": np.asarray(obs["proprio"], dtype=np.float32),
                   "instruction": obs["instruction"]}
        if seed is not None:
            request["seed"] = int(seed)
        self._connection.send(pack(request))
        reply = unpack(self._connection.recv(timeout=self.timeout_s))
        if "error" in reply:
            raise _ERRORS.get(reply["error"], PolicyError)(reply["error"], reply.get("message", ""))
        self.last_timing = reply["timing"]
        actions = np.array(reply["actions"], dtype=np.float32)  # a writable copy of the read-only view
        return check_finite_chunk(actions, f"the server at {self.url}")

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_health(url: str, timeout_s: float = 5.0) -> dict:
    """The server's health check: HTTP GET <url>/healthz (ws:// read as http://, wss:// as
    https://) -> {"ready", "protocol", "model", "method"}. Raises urllib.error.URLError when
    nothing answers and HTTPError (code 503) while the server drains. Needs no token."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    with urllib.request.urlopen(urlunsplit((scheme, parts.netloc, "/healthz", "", "")), timeout=timeout_s) as reply:
        return json.loads(reply.read())
