"""The policy server: one DriftingPolicy behind a websocket, concurrent clients batched.

    server = PolicyServer(DriftingPolicy.from_checkpoint(path), ServerConfig(port=8000))
    asyncio.run(server.serve())          # until server.stop() (scripts/serve.py: on SIGTERM)

How requests become forward passes (one model thread; the event loop never runs the model):

    connection 1 ── request ─┐                      ┌─> reply 1
    connection 2 ── request ─┼─> queue (<= max_queue) ─> batcher ─> one predict_action_chunk ─┼─> reply 2
    connection 3 ── request ─┘   full: "busy" at once   waits <= max_wait_ms    [B, T, A]      └─> reply 3
                                                         for <= max_batch
                                                         (not once every open connection is in)

- Each connection has at most one request in flight (it waits for its reply before reading the
  next), so a fast client cannot starve the others and the queue holds one entry per client.
- A request with a `seed` runs alone: its noise comes from `torch.Generator().manual_seed(seed)`
  for exactly its row, so the same seed gives the same chunk whoever else is connected.
- A bad request is answered with an error naming the problem; a model failure is answered with
  an `internal` error for the requests of that batch. Neither closes a connection or the server.
- The finite-action guarantee (drifting_vla/safety.py): a request whose proprio the policy
  refuses is answered `out_of_range`, one whose chunk is not finite `non_finite`; the other
  requests of its batch go back to the queue's front and are served.
- What one client can cost is bounded: an instruction longer than `max_instruction_chars` or an
  image of more than `max_image_pixels` is answered `too_large` (the limits travel in the
  metadata), and frames are decoded, checked and resized in a thread pool, never on the event
  loop, so a client sending large frames does not delay the others' replies.
- `stop()` drains: it stops accepting connections, refuses new requests (`shutting_down`),
  answers every queued one, then closes the connections (code 1001) and returns from `serve()`.
  Called during start-up (the warm-up pass), `serve()` returns once the warm-up ends, without
  opening the port.

Its settings (`ServerConfig`, drifting_vla/formats/config.py) are the ones configs/serve.yaml
holds; drifting-serve hands the validated config over as it is.

The policy-facing surface is `predict_action_chunk(obs, generator=None)` and the attributes read
by `policy_metadata`; nothing else of the policy is used.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from drifting_vla.data.transforms import resize_image
from drifting_vla.evaluation.rollout import batch_observations
from drifting_vla.formats.config import ServerConfig
from drifting_vla.safety import NonFiniteActions, PolicyRefusal, ProprioOutOfRange, non_finite_rows
from drifting_vla.serving.protocol import (
    BAD_REQUEST,
    BUSY,
    INTERNAL,
    NON_FINITE,
    OUT_OF_RANGE,
    PROTOCOL,
    SHUTTING_DOWN,
    TOO_LARGE,
    ProtocolError,
    RequestTooLarge,
    check_observation,
    encode_array,
    error_message,
    pack,
    unpack,
)

log = logging.getLogger("drifting_vla.serving")
HEALTH_PATH = "/healthz"


def policy_metadata(policy, control_hz: float | None = None, limits: dict | None = None) -> dict:
    """What a client needs to validate its robot before the first request. `limits`: the
    server's `max_instruction_chars` and `max_image_pixels` (check_observation enforces them)."""
    cfg = policy.cfg
    data = cfg["data"]
    language = cfg["model"].get("language", {})
    instructions = list(data.get("instructions") or []) if language.get("name") == "task_embedding" else None
    instructions = getattr(policy, "known_instructions", instructions)  # an ONNX export: the ones it was exported with
    return {
        "protocol": PROTOCOL,
        "action_spec": policy.action_spec.to_config(),
        "action_dim": policy.action_spec.dim,
        "cameras": list(data["cameras"]),
        "image_size": int(data["image_size"]),
        "proprio_dim": int(data["proprio_dim"]),
        "horizon": int(policy.horizon),
        "n_obs_steps": int(policy.n_obs_steps),  # > 1: each request carries the last n control steps
        "control_hz": control_hz if control_hz is not None else data.get("control_hz"),
        "objective": policy.objective.name,
        "nfe": int(policy.nfe),
        "sampler": policy.sampler,
        "method": policy.method,  # e.g. "drifting nfe=1": what results over this server are labelled with
        "instructions": instructions,  # None: any text; a list: the only ones this model knows
        "checkpoint": str(getattr(policy, "checkpoint", "")),
        "model": Path(str(getattr(policy, "checkpoint", "") or "")).name,  # the health check's model id
        "data": data,  # the checkpoint's data config: a remote evaluation builds its envs from it
        **(limits or {}),
    }


@dataclass
class _Request:
    obs: dict  # check_observation's output, images resized
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class PolicyServer:
    def __init__(self, policy, config: ServerConfig | None = None) -> None:
        self.policy = policy
        self.config = config or ServerConfig()
        limits = {"max_instruction_chars": self.config.max_instruction_chars, "max_image_pixels": self.config.max_image_pixels}
        self.metadata = policy_metadata(policy, self.config.control_hz, limits)
        self.port: int | None = None
        self.requests_served = 0
        self._pending: deque[_Request] = deque()
        self._arrived: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._in_flight = 0  # requests accepted and not yet answered
        self._connections = 0  # open connections: at most one request in flight each
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy")
        self._decode_threads = ThreadPoolExecutor(max_workers=self.config.decode_threads, thread_name_prefix="decode")
        self._stop_requested = False  # stop() before serve() made its events

    # ------------------------------------------------------------------------------------------
    # Lifecycle

    async def serve(self, ready: Callable[[PolicyServer], None] | None = None) -> None:
        """Serve until `stop()`; `ready(self)` is called once the port is bound. OSError naming
        the host and port when they cannot be listened on."""
        loop = asyncio.get_running_loop()
        self._arrived, self._stopping = asyncio.Event(), asyncio.Event()
        self._loop = loop
        if self._stop_requested:
            self._stopping.set()
        try:
            await loop.run_in_executor(self._model_thread, self._warm_up)
            if self._stopping.is_set():
                log.info("stopped during start-up, before the port opened")
                return
            await self._serve_bound(ready)
        finally:
            self._model_thread.shutdown(wait=True)
            self._decode_threads.shutdown(wait=True)

    async def _serve_bound(self, ready: Callable[[PolicyServer], None] | None) -> None:
        try:
            server = await serve(
                self._handle,
                self.config.host,
                self.config.port,
                process_request=self._process_request,
                compression=None,  # images and chunks do not compress; deflate only costs time
                max_size=self.config.max_message_bytes,
            )
        except OSError as error:
            raise OSError(error.errno, f"cannot listen on host={self.config.host!r} port={self.config.port}: "
                          f"{error.strerror or error}") from error
        batcher = None
        try:
            self.port = server.sockets[0].getsockname()[1]
            log.info("serving %s on ws://%s:%d", self.metadata["checkpoint"], self.config.host, self.port)
            if ready is not None:
                ready(self)
            batcher = asyncio.create_task(self._batch_loop())
            await self._stopping.wait()
            server.server.close()  # the listening socket: no new connections; the open ones drain
            while self._in_flight:
                await asyncio.sleep(0.005)
        finally:
            if batcher is not None:
                batcher.cancel()
            server.close(close_connections=True)
            await server.wait_closed()
        log.info("stopped after %d requests", self.requests_served)

    def stop(self) -> None:
        """Drain and stop; safe to call from a signal handler or another thread, twice, and at
        any point of start-up (before `serve()`, during the warm-up)."""
        self._stop_requested = True
        loop = getattr(self, "_loop", None)
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._stopping.set)

    def _warm_up(self) -> None:
        """One forward pass before the port opens, so the first client does not pay for it."""
        meta = self.metadata
        size = meta["image_size"]
        steps = (meta["n_obs_steps"],) if meta["n_obs_steps"] > 1 else ()
        predict_chunks(self.policy, [{
            "images": np.zeros((*steps, len(meta["cameras"]), 3, size, size), dtype=np.uint8),
            "proprio": np.zeros((*steps, meta["proprio_dim"]), dtype=np.float32),
            "instruction": (meta["instructions"] or ["warm up"])[0],
        }], seed=0)

    def _process_request(self, connection: ServerConnection, request):
        """Before the websocket upgrade: `GET /healthz` is answered here (no token needed: it
        tells only whether to route clients here); every other request must carry the token."""
        if request.path == HEALTH_PATH:
            return self._health(connection)
        return self._authorize(connection, request)

    def _health(self, connection: ServerConnection):
        """200 {"ready": true, ...} while serving; 503 with ready false once draining after SIGTERM."""
        ready = not self._stopping.is_set()
        body = {"ready": ready, "protocol": PROTOCOL, "model": self.metadata["model"], "method": self.metadata["method"]}
        response = connection.respond(HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE, json.dumps(body) + "\n")
        del response.headers["Content-Type"]
        response.headers["Content-Type"] = "application/json"
        return response

    def _authorize(self, connection: ServerConnection, request):
        if not self.config.token:
            return None
        expected = f"Bearer {self.config.token}"
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), expected.encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "send the server's token as 'Authorization: Bearer <token>'\n")

    # ------------------------------------------------------------------------------------------
    # One connection

    async def _handle(self, connection: ServerConnection) -> None:
        peer = connection.remote_address
        self._connections += 1
        try:
            await connection.send(pack(self.metadata))
            async for frame in connection:
                await connection.send(await self._answer(frame))
        except ConnectionClosed:
            pass
        finally:
            self._connections -= 1
        log.debug("connection %s closed", peer)

    async def _answer(self, frame) -> bytes:
        """One request frame -> one reply frame (a chunk or an error; never an exception)."""
        started = time.perf_counter()
        try:
            request_id, obs = await self._loop.run_in_executor(self._decode_threads, self._decode, frame)
        except _Refused as refused:
            kind = TOO_LARGE if isinstance(refused.error, RequestTooLarge) else BAD_REQUEST
            return pack(error_message(kind, str(refused.error), refused.request_id))
        if self._stopping.is_set():
            return pack(error_message(SHUTTING_DOWN, "the server is shutting down; connect to another", request_id))
        if len(self._pending) >= self.config.max_queue:
            return pack(error_message(BUSY, f"{len(self._pending)} requests queued; retry shortly", request_id))
        decoded = time.perf_counter()
        request = _Request(obs, self._loop.create_future(), queued=decoded)
        self._in_flight += 1
        try:
            self._pending.append(request)
            self._arrived.set()
            try:
                actions, batch_size, forward_started, model_s = await request.future
            except PolicyRefusal as refusal:  # this observation, not the server: say which rule
                kind = OUT_OF_RANGE if isinstance(refusal, ProprioOutOfRange) else NON_FINITE
                return pack(error_message(kind, str(refusal), request_id))
            except Exception as error:  # the model failed: say so, keep serving
                log.exception("forward pass failed")
                return pack(error_message(INTERNAL, f"{type(error).__name__}: {error}", request_id))
            t0 = time.perf_counter()
            encoded = encode_array(actions)
            encode_s = time.perf_counter() - t0
            reply = {
                "actions": encoded,
                "batch_size": batch_size,
                "timing": {
                    "decode_ms": 1e3 * (decoded - started),
                    "queue_ms": 1e3 * (forward_started - decoded),
                    "model_ms": 1e3 * model_s,
                    "encode_ms": 1e3 * encode_s,
                },
            }
            if request_id is not None:
                reply["id"] = request_id
            self.requests_served += 1
            return pack(reply)
        finally:
            self._in_flight -= 1

    def _decode(self, frame) -> tuple:
        """One request frame -> (its id, the checked observation with images resized); runs in
        a decode thread. Raises _Refused holding the ProtocolError and the id."""
        request_id = None
        try:
            message = unpack(frame)
            request_id = _plain_id(message.get("id"))
            obs = check_observation(message, self.metadata)
            self._check_instruction(obs["instruction"])
            obs["images"] = _resized(obs["images"], self.metadata["image_size"])
        except ProtocolError as error:
            raise _Refused(error, request_id) from None
        return request_id, obs

    def _check_instruction(self, instruction: str) -> None:
        known = self.metadata["instructions"]
        if known is not None and instruction not in known:
            raise ProtocolError(f"unknown instruction {instruction!r}; this model knows {known}")

    # ------------------------------------------------------------------------------------------
    # Batching

    async def _batch_loop(self) -> None:
        while True:
            await self._wait_for_request()
            batch = await self._collect_batch()
            loop = asyncio.get_running_loop()
            forward_started = time.perf_counter()
            try:
                chunks, model_s = await loop.run_in_executor(self._model_thread, self._forward, [r.obs for r in batch])
            except PolicyRefusal as refusal:
                self._refuse_rows(batch, refusal)
                continue
            except Exception as error:
                for request in batch:
                    request.future.set_exception(error)
                continue
            for request, chunk in zip(batch, chunks, strict=True):
                request.future.set_result((chunk, len(batch), forward_started, model_s))

    def _refuse_rows(self, batch: list[_Request], refusal: PolicyRefusal) -> None:
        """Answer the refused rows of `batch` with the refusal; the others go back to the front
        of the queue, to be served in the next forward pass."""
        refused = set(refusal.rows) & set(range(len(batch)))
        if not refused:
            refused = set(range(len(batch)))
        for index, request in enumerate(batch):  # each reply says only its kind and the message
            if index in refused:
                request.future.set_exception(refusal)
        self._pending.extendleft(reversed([r for i, r in enumerate(batch) if i not in refused]))
        if len(refused) < len(batch):
            self._arrived.set()

    async def _wait_for_request(self) -> None:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()

    async def _collect_batch(self) -> list[_Request]:
        """The first request, then unseeded ones that arrive within max_wait_ms, up to max_batch.
        A seeded request is a batch of its own. Once every open connection has a request in the
        batch nobody else can join it, so a lone client never waits."""
        batch = [self._pending.popleft()]
        if batch[0].obs["seed"] is not None:
            return batch
        deadline = time.perf_counter() + self.config.max_wait_ms / 1e3
        while len(batch) < self.config.max_batch:
            if self._pending:
                if self._pending[0].obs["seed"] is not None:
                    break
                batch.append(self._pending.popleft())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or len(batch) >= self._connections:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                break
        return batch

    def _forward(self, observations: list[dict]) -> tuple[np.ndarray, float]:
        """One forward pass for the batch (model thread): [B, T, A] float32 and its seconds."""
        t0 = time.perf_counter()
        chunks = predict_chunks(self.policy, observations, observations[0]["seed"])
        return chunks, time.perf_counter() - t0


def predict_chunks(policy, observations: list[dict], seed: int | None = None) -> np.ndarray:
    """One `predict_action_chunk` call for observations {images uint8 [V, 3, H, W], proprio [S],
    instruction} (with a history: [n, V, 3, H, W] and [n, S]): float32 [B, T, A] raw units.
    `seed`: noise from torch.Generator().manual_seed(seed)."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    chunks = policy.predict_action_chunk(batch_observations(observations), generator=generator).astype(np.float32)
    bad = non_finite_rows(chunks)
    if bad:  # whatever the policy object: no non-finite action leaves the server
        raise NonFiniteActions(f"the policy drew non-finite actions for batch row(s) {bad}; none were sent", bad)
    return chunks


class _Refused(Exception):
    """A request refused while decoding: the ProtocolError and the request's id (for the reply)."""

    def __init__(self, error: ProtocolError, request_id) -> None:
        super().__init__(str(error))
        self.error, self.request_id = error, request_id


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [..., 3, H, W] (cameras, and steps of a history) -> [..., 3, size, size], every
    frame resized as the datasets resize them."""
    frames = [resize_image(f.transpose(1, 2, 0), size).transpose(2, 0, 1) for f in images.reshape(-1, *images.shape[-3:])]
    return np.stack(frames).reshape(*images.shape[:-2], size, size)


def _plain_id(request_id):
    """The request's `id`, echoed in its reply when it is an int or a string (else dropped)."""
    return request_id if isinstance(request_id, (int, str)) else None


def serve_forever(policy, config: ServerConfig, install_signal_handlers: bool = True) -> PolicyServer:
    """Run a server in this thread until SIGTERM / SIGINT (drained) and return it."""
    import signal

    server = PolicyServer(policy, config)

    async def main() -> None:
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, server.stop)
        await server.serve(ready=lambda s: print(f"ready: ws://{config.host}:{s.port}", flush=True))

    asyncio.run(main())
    return server
