"""The wire format between `scripts/serve.py` and `PolicyClient`: msgpack messages over a websocket.

Every message is one binary websocket frame holding one msgpack map; numpy arrays travel as
`{"__ndarray__": true, "dtype": "<u1", "shape": [...], "data": <raw bytes>}` (no pickle, so a
message can never run code on the receiving side). The whole protocol, with examples, is in
docs/serving.md:

    client                                           server
    ------                                           ------
    connect (header `Authorization: Bearer <token>` when the server has a token)
                           <------------------------ metadata {"protocol", "action_spec", "cameras", ...}
    request {"images", "proprio", "instruction", ["seed"], ["id"]}  -->
                           <------------------------ reply {"actions" [T, A] float32, "timing", "batch_size", ["id"]}
                                                  or error {"error": <kind>, "message": <what to fix>, ["id"]}

This module holds what both sides share: encoding, decoding and checking one observation against
the server's metadata. It imports neither torch nor websockets, so a robot-side client stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

PROTOCOL = "drifting-vla/1"

# Error kinds of an error reply; the message says what to change.
BAD_REQUEST = "bad_request"  # the request cannot be served as sent (garbage, missing key, shape...)
BUSY = "busy"  # the queue is full: try again later (nothing was queued)
INTERNAL = "internal"  # the model failed on a valid request; the server goes on serving
SHUTTING_DOWN = "shutting_down"  # the server is draining after SIGTERM
OUT_OF_RANGE = "out_of_range"  # proprio outside what the policy's normalization represents (nothing was run)
NON_FINITE = "non_finite"  # the policy drew NaN or Inf actions for this observation; none are sent
TOO_LARGE = "too_large"  # an instruction or an image past the server's limits (serve.yaml)

_NDARRAY = "__ndarray__"


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text names the problem and what to send instead."""


class RequestTooLarge(ProtocolError):
    """An instruction or an image past the server's limits (`max_instruction_chars`,
    `max_image_pixels` in its metadata); answered with the error kind `too_large`."""


def encode_array(value: np.ndarray) -> dict:
    """A numeric numpy array as the protocol's array map (its raw bytes, C order)."""
    if value.dtype.hasobject:
        raise TypeError("object arrays cannot be sent; send numeric arrays")
    value = np.ascontiguousarray(value)
    return {_NDARRAY: True, "dtype": value.dtype.str, "shape": list(value.shape), "data": value.tobytes()}


def _encode_other(value: Any) -> Any:
    """msgpack's hook for what it cannot pack itself: numpy arrays and scalars."""
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}; send numpy arrays, numbers, strings, lists or dicts")


def _decode_array(obj: dict) -> Any:
    if obj.get(_NDARRAY) is not True:
        return obj
    try:
        dtype = np.dtype(obj["dtype"])
        if dtype.hasobject:
            raise ProtocolError("object arrays are refused")
        return np.frombuffer(obj["data"], dtype=dtype).reshape(obj["shape"])
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError(f"a malformed array ({type(error).__name__}: {error})") from error


def pack(message: Mapping) -> bytes:
    """A message (map of numpy arrays, numbers, strings, lists, maps) -> one msgpack frame."""
    return msgpack.packb(message, default=_encode_other, use_bin_type=True)


def unpack(frame: bytes | str) -> dict:
    """One frame -> a message map; ProtocolError on anything else. Arrays are read-only views."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise ProtocolError("send binary msgpack frames, not text frames")
    try:
        message = msgpack.unpackb(frame, object_hook=_decode_array, raw=False, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as error:  # msgpack raises many types on garbage
        raise ProtocolError(f"the frame is not msgpack ({type(error).__name__}: {error})") from error
    if not isinstance(message, dict):
        raise ProtocolError(f"a message is a msgpack map, got {type(message).__name__}")
    return message


def error_message(kind: str, message: str, request_id: Any = None) -> dict:
    reply = {"error": kind, "message": message}
    if request_id is not None:
        reply["id"] = request_id
    return reply


# ----------------------------------------------------------------------------------------------
# One observation, checked against the server's metadata


def check_observation(request: Mapping, metadata: Mapping) -> dict:
    """A request's observation, checked and in the policy's layout; ProtocolError names the problem.

    images: uint8 [V, 3, H, W] or [V, H, W, 3] in the order of `metadata["cameras"]`, or a map
    {camera name: [3, H, W] or [H, W, 3]}. H, W may differ from `image_size` (the server resizes).
    When the metadata holds the server's limits, an instruction longer than `max_instruction_chars`
    or an image of more than `max_image_pixels` (H x W) raises RequestTooLarge.
    Returns {"images": uint8 [V, 3, H, W], "proprio": float32 [S], "instruction": str,
    "seed": int | None}.

    A policy with an observation history (`metadata["n_obs_steps"]` = n > 1) takes the last n
    control steps, oldest first: images a list of n entries of the form above (or one array
    [n, V, ...]) and proprio [n, S]; returned as images [n, V, 3, H, W] and proprio [n, S].
    """
    for key in ("images", "proprio", "instruction"):
        if key not in request:
            raise ProtocolError(f"the request has no {key!r}; a request carries images, proprio and instruction")
    _check_instruction_length(request["instruction"], metadata.get("max_instruction_chars"))
    steps = int(metadata.get("n_obs_steps", 1))
    cameras = list(metadata["cameras"])
    images = _camera_stack(request["images"], cameras) if steps == 1 else _history_stack(request["images"], steps, cameras)
    _check_image_pixels(images, metadata.get("max_image_pixels"))
    shape = [steps, int(metadata["proprio_dim"])] if steps > 1 else [int(metadata["proprio_dim"])]
    proprio = request["proprio"]
    if not isinstance(proprio, np.ndarray):
        try:
            proprio = np.asarray(proprio, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ProtocolError(f"proprio must be numbers, got {type(request['proprio']).__name__}") from error
    if proprio.dtype.kind not in "fiu":
        raise ProtocolError(f"proprio must be a float array, got dtype {proprio.dtype}")
    if list(proprio.shape) != shape:
        raise ProtocolError(f"proprio must have shape {shape}, got {list(proprio.shape)}")
    proprio = proprio.astype(np.float32)
    if not np.isfinite(proprio).all():
        raise ProtocolError("proprio has NaN or Inf values")
    instruction = request["instruction"]
    if not isinstance(instruction, str):
        raise ProtocolError(f"instruction must be a string, got {type(instruction).__name__}")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ProtocolError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return {"images": images, "proprio": proprio, "instruction": instruction, "seed": seed}


def _check_instruction_length(instruction: Any, limit: int | None) -> None:
    if limit is not None and isinstance(instruction, str) and len(instruction) > limit:
        raise RequestTooLarge(
            f"the instruction has {len(instruction):,} characters; this server takes at most {limit:,} "
            "(max_instruction_chars in its serve.yaml)"
        )


def _check_image_pixels(images: np.ndarray, limit: int | None) -> None:
    """images [..., 3, H, W]: each H x W within `limit`, checked before anything resizes them."""
    height, width = images.shape[-2:]
    if limit is not None and height * width > limit:
        raise RequestTooLarge(
            f"the images are {height} x {width} = {height * width:,} pixels each; this server takes at most "
            f"{limit:,} per image (max_image_pixels in its serve.yaml): send them smaller, the policy sees them "
            "resized to its image_size anyway"
        )


def _history_stack(history: Any, steps: int, cameras: list[str]) -> np.ndarray:
    """uint8 [n, V, 3, H, W] from a list of n steps' images (each as `_camera_stack` takes them)
    or an array [n, V, ...]."""
    is_steps = isinstance(history, (list, tuple)) or (isinstance(history, np.ndarray) and history.ndim == 5)
    if not is_steps or len(history) != steps:
        if is_steps:
            given = f"{len(history)} steps"
        else:
            given = f"an array of shape {list(history.shape)}" if isinstance(history, np.ndarray) else type(history).__name__
        raise ProtocolError(
            f"this policy conditions on the last {steps} control steps: images must be a list of {steps} "
            f"observations' images (oldest first, each [V, 3, H, W], [V, H, W, 3] or a camera map) or an array "
            f"[{steps}, V, ...], got {given}"
        )
    per_step = [_camera_stack(step, cameras) for step in history]
    if len({step.shape for step in per_step}) > 1:
        raise ProtocolError(f"the steps' images differ in size: {[list(step.shape) for step in per_step]}")
    return np.stack(per_step)


def _camera_stack(images: Any, cameras: list[str]) -> np.ndarray:
    """uint8 [V, 3, H, W] from an array [V, 3, H, W] / [V, H, W, 3] or a {camera: image} map."""
    if isinstance(images, Mapping):
        unknown = sorted(set(images) - set(cameras))
        if unknown:
            raise ProtocolError(f"unknown camera(s) {unknown}; this policy reads {cameras}")
        missing = [c for c in cameras if c not in images]
        if missing:
            raise ProtocolError(f"missing camera(s) {missing}; this policy reads {cameras}")
        frames = [_channels_first(images[c], f"images[{c!r}]") for c in cameras]
        if len({f.shape for f in frames}) > 1:
            raise ProtocolError(f"the cameras' images differ in size: {[list(f.shape) for f in frames]}")
        return np.stack(frames)
    if not isinstance(images, np.ndarray):
        raise ProtocolError(f"images must be a uint8 array or a map camera -> array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[0] != len(cameras):
        raise ProtocolError(
            f"images must have shape [V={len(cameras)}, 3, H, W] or [V, H, W, 3] (cameras {cameras}), "
            f"got {list(images.shape)}"
        )
    return np.stack([_channels_first(frame, f"images[{v}]") for v, frame in enumerate(images)])


def _channels_first(frame: Any, name: str) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        dtype = getattr(frame, "dtype", type(frame).__name__)
        raise ProtocolError(f"{name} must be a uint8 array (0..255), got {dtype}")
    if frame.ndim != 3 or 3 not in (frame.shape[0], frame.shape[-1]):
        raise ProtocolError(f"{name} must have shape [3, H, W] or [H, W, 3], got {list(frame.shape)}")
    if frame.shape[0] != 3:
        frame = frame.transpose(2, 0, 1)
    if 0 in frame.shape:  # nothing to resize
        raise ProtocolError(f"{name} has no pixels (shape {list(frame.shape)}); send an image of at least 1 x 1")
    return frame
