"""An exported ONNX policy run by ONNX Runtime, with no torch: `DriftingPolicy.predict_action_chunk`
on a machine that has only numpy, Pillow and onnxruntime.

    from drifting_vla.inference.onnx_policy import OnnxPolicy

    policy = OnnxPolicy.from_file("policy.onnx")             # written by DriftingPolicy.export_onnx
    chunk = policy.predict_action_chunk(obs)                  # [B, T, A] raw units, obs as DriftingPolicy takes it
    chunk = policy.predict_action_chunk(obs, noise=noise)     # the graph's noise input given: a pure function
    policy.metadata["instructions"]                           # the only instructions it knows

The graph and its metadata are described in onnx_export.py (the torch side). The noise of a
chunk, standard normal [B, 1, T, noise_dim], comes from, in order: `noise=`; a torch.Generator
passed as `generator` (torch imported only then: the policy server does this, so a seeded request
gives the PyTorch policy's chunk); else this policy's numpy generator (`seed=` of `from_file`). A
numpy stream is not torch's, so the same seed number gives a different draw than
`torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drifting_vla.data.transforms import resize_image
from drifting_vla.specs import ActionSpec

METADATA_KEY = "drifting_vla"  # the metadata_props key onnx_export.py writes
ONNX_FORMAT = "drifting-vla-onnx"
ONNX_FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportedObjective:
    """The objective the graph samples with (its loop, if any, is inside the graph)."""

    name: str
    nfe: int
    sampler: str | None
    method: str


class OnnxPolicy:
    """An exported graph in ONNX Runtime behind `DriftingPolicy.predict_action_chunk`, with the
    attributes the policy server reads (cfg, action_spec, horizon, objective, method, ...)."""

    def __init__(self, session, metadata: dict, path: Path | None = None, seed: int = 0) -> None:
        """`session`: an onnxruntime.InferenceSession of an exported graph; `metadata`: its
        `drifting_vla` metadata (read_metadata)."""
        self.session = session
        self.metadata = metadata
        self.checkpoint = path  # what the server reports as the policy it serves
        self.cfg = metadata["config"]
        self.action_spec = ActionSpec.from_config(metadata["action_spec"])
        self.cameras = list(metadata["cameras"])
        self.image_size = int(metadata["image_size"])
        self.proprio_dim = int(metadata["proprio_dim"])
        self.horizon = int(metadata["horizon"])
        self.n_obs_steps = int(metadata["n_obs_steps"])
        self.noise_dim = int(metadata["noise_dim"])
        self.known_instructions = list(metadata["instructions"])
        self._index = {text: i for i, text in enumerate(self.known_instructions)}
        objective = metadata["objective"]
        self.objective = ExportedObjective(objective["name"], int(objective["nfe"]), objective["sampler"], objective["method"])
        self.nfe, self.sampler, self.method = self.objective.nfe, self.objective.sampler, self.objective.method
        self._inputs = {i.name for i in session.get_inputs()}
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_file(cls, path: str | os.PathLike, seed: int = 0, threads: int | None = None, providers: list[str] | None = None) -> OnnxPolicy:
        """Load `path` (a .onnx file from `export_onnx`). `threads`: ONNX Runtime's intra-op
        threads (None: its default, every core); `providers`: execution providers (None: CPU)."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX policy at {path}: write one with DriftingPolicy.export_onnx or scripts/export_onnx.py")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        session = ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])
        return cls(session, read_metadata(session.get_modelmeta().custom_metadata_map, path), path, seed)

    def predict_action_chunk(self, obs: Mapping, generator=None, *, noise: np.ndarray | None = None) -> np.ndarray:
        """obs batch -> float32 [B, T, A] raw units, as `DriftingPolicy.predict_action_chunk`:
        images uint8 [B, V, 3, H, W] (other H, W are resized to image_size as the server resizes),
        proprio [B, S], instruction list[str] (B); one unbatched observation gives [T, A]. With a
        history: images [B, n, V, 3, H, W], proprio [B, n, S]. `noise` float32 [B, 1, T, noise_dim]
        (module docstring for where it comes from otherwise)."""
        if isinstance(obs["instruction"], str):
            batch = {"images": np.asarray(obs["images"])[None], "proprio": np.asarray(obs["proprio"])[None],
                     "instruction": [obs["instruction"]]}
            return self.predict_action_chunk(batch, generator, noise=None if noise is None else np.asarray(noise)[None])[0]
        feed = {
            "images": self._images(np.asarray(obs["images"])),
            "proprio": self._proprio(np.asarray(obs["proprio"])),
            "instruction": self._instruction_rows(list(obs["instruction"])),
        }
        batch = len(feed["instruction"])
        if len(feed["images"]) != batch or len(feed["proprio"]) != batch:
            raise ValueError(f"got {batch} instructions for {len(feed['images'])} images and {len(feed['proprio'])} proprio rows; "
                             "give one of each per observation")
        if "noise" in self._inputs:
            feed["noise"] = self._noise(batch, generator, noise)
        return self.session.run(["actions"], {k: v for k, v in feed.items() if k in self._inputs})[0]

    def _images(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, (n,) V, 3, H, W] at image_size."""
        lead = (len(self.cameras),) if self.n_obs_steps == 1 else (self.n_obs_steps, len(self.cameras))
        if images.ndim != len(lead) + 4 or tuple(images.shape[1:-3]) != lead or images.shape[-3] != 3:
            history = "" if self.n_obs_steps == 1 else f"{self.n_obs_steps} steps (oldest first) x "
            raise ValueError(f"expected images [B, {', '.join(map(str, lead))}, 3, H, W]: {history}one per camera in "
                             f"{self.cameras}, got {tuple(images.shape)}")
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 in 0..255, got {images.dtype}")
        size = self.image_size
        if images.shape[-2:] == (size, size):
            return np.ascontiguousarray(images)
        frames = images.reshape(-1, *images.shape[-3:])
        resized = [resize_image(f.transpose(1, 2, 0), size).transpose(2, 0, 1) for f in frames]
        return np.stack(resized).reshape(*images.shape[:-2], size, size)

    def _proprio(self, proprio: np.ndarray) -> np.ndarray:
        shape = [self.proprio_dim] if self.n_obs_steps == 1 else [self.n_obs_steps, self.proprio_dim]
        if proprio.ndim != len(shape) + 1 or list(proprio.shape[1:]) != shape:
            raise ValueError(f"expected proprio [B, {', '.join(map(str, shape))}], got {tuple(proprio.shape)}")
        return np.ascontiguousarray(proprio, dtype=np.float32)

    def _instruction_rows(self, instructions: list[str]) -> np.ndarray:
        """int64 [B]: each instruction's row in the graph's language table."""
        unknown = sorted(set(instructions) - self._index.keys())
        if unknown:
            raise KeyError(
                f"instructions not in this ONNX export: {unknown}. It holds language features for {self.known_instructions} "
                "only (computed at export time); export again with instructions=[...] to add phrasings"
            )
        return np.array([self._index[text] for text in instructions], dtype=np.int64)

    def _noise(self, batch: int, generator, noise: np.ndarray | None) -> np.ndarray:
        shape = (batch, 1, self.horizon, self.noise_dim)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != shape:
                raise ValueError(f"noise must have shape {list(shape)} (B, 1, T, noise_dim), got {list(noise.shape)}")
            return noise
        if generator is not None:  # a torch.Generator: the draw DriftingVLA.sample_noise makes
            import torch

            return torch.randn(shape, generator=generator).numpy()
        return self._rng.standard_normal(shape, dtype=np.float32)


def read_metadata(props: Mapping[str, str], path: Path | str) -> dict:
    """The `drifting_vla` entry of an ONNX model's metadata_props, checked."""
    if METADATA_KEY not in props:
        raise ValueError(f"{path} is an ONNX model but not a Drifting-VLA policy export (no {METADATA_KEY!r} metadata): "
                         "write one with DriftingPolicy.export_onnx")
    metadata = json.loads(props[METADATA_KEY])
    if metadata.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path}: metadata format {metadata.get('format')!r}, expected {ONNX_FORMAT!r}")
    if int(metadata.get("format_version", 0)) > ONNX_FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {metadata['format_version']}; this drifting-vla reads up to "
                         f"{ONNX_FORMAT_VERSION}: upgrade drifting-vla")
    return metadata
