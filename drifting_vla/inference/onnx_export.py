"""ONNX export of a DriftingPolicy: the whole observation-to-chunk path as ONE graph.

    policy.export_onnx("policy.onnx")                            # inference/policy.py calls export_onnx here
    python scripts/export_onnx.py checkpoint=runs/x output=policy.onnx
    OnnxPolicy.from_file("policy.onnx").predict_action_chunk(obs)   # onnx_policy.py, no torch

The graph, traced from the policy's own code (the normalizer, the encoders, `DriftingVLA.fuse`,
`objective.sample`, the decoder's activations):

    images       uint8   [B, V, 3, H, W] (H = W = image_size)   --vision encoder--------------------+
    instruction  int64   [B]  row of the instruction table      --language table lookup-------------+--fuse--> condition
    proprio      float32 [B, S] raw units                       --normalize--------------------------+
    noise        float32 [B, 1, T, noise_dim] standard normal   --objective.sample(condition)--> [B, 1, T, network_dim]
                                                                --unnormalize--> actions float32 [B, T, A] raw units

With an observation history (n_obs_steps = n > 1) images are [B, n, V, 3, H, W] and proprio
[B, n, S], oldest first. B is dynamic; everything else is fixed by the policy.

Why these choices:
- The noise is an INPUT, not a random op in the graph: the graph is a pure function, so a test can
  feed the noise PyTorch drew and compare chunks, and a caller controls reproducibility.
  `OnnxPolicy` draws it (numpy, seeded) when none is given. The regression objective ignores it
  (it feeds the network zeros), so every export has the same four inputs.
- Strings cannot enter an ONNX graph, and a tokenizer plus a text transformer would make the
  graph depend on a tokenizer runtime. Language features are therefore computed AT EXPORT TIME
  for a fixed list of instructions (the policy's `data.instructions`, plus any given to
  `export_onnx`), by the policy's own language encoder, and stored as a table the graph indexes.
  A text-encoder policy (MiniLM, CLIP) exported this way understands exactly those phrasings;
  another needs a new export.
- Iterative objectives (flow matching, diffusion/ddim) are exported with their sampling loop
  unrolled at the policy's nfe: tracing runs `objective.sample` once, so every step of the loop
  is in the graph, sharing the one set of DiT weights. The loop therefore runs inside ONNX
  Runtime, exactly as the objective defines it, and another nfe is another export.
  diffusion/ddpm draws fresh noise at every step and is refused (export with sampler=ddim).
- Images of a size other than `image_size` are resized outside the graph (`OnnxPolicy`, like the
  policy server); from `image_size` to the encoder's `input_size` the model's own preprocessing
  resizes inside it, as in training.

The metadata (action spec, cameras, image size, instructions, execution horizon, objective,
normalization, the run's config) is a JSON string in the model's `metadata_props` under
`drifting_vla`: one file carries it all.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from drifting_vla.inference.onnx_policy import (
    METADATA_KEY,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    OnnxPolicy,
)

OPSET = 18
INPUTS = ("images", "proprio", "instruction", "noise")
EXPORT_BATCH = 2  # traced at B = 2 so that nothing batch-sized is mistaken for a constant


class GivenNoise:
    """The model as an objective sees it, except that `sample_noise` returns the graph's noise
    input instead of drawing: the objective's own sampler then runs unchanged."""

    def __init__(self, model: nn.Module, noise: torch.Tensor) -> None:
        self._model, self._noise = model, noise

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def sample_noise(self, batch_size: int, num_samples: int, device, generator=None) -> torch.Tensor:
        """noise input [B, 1, T, noise_dim]; one chunk per observation is what the graph draws."""
        del batch_size, num_samples, device, generator
        return self._noise


class ChunkGraph(nn.Module):
    """The policy's `predict_action_chunk` as a traceable module (inputs: module docstring)."""

    def __init__(self, policy, instructions: list[str]) -> None:
        super().__init__()
        self.model, self.normalizer, self.objective = policy.model, policy.normalizer, policy.objective
        self.nfe, self.sampler = policy.nfe, policy.sampler
        tokens, mask, pooled = language_table(policy.model, instructions)
        self.register_buffer("language_tokens", tokens)  # [N, L, Dl]
        self.register_buffer("language_mask", mask)  # [N, L] bool
        self.register_buffer("language_pooled", pooled)  # [N, Dl]

    def forward(self, images: torch.Tensor, proprio: torch.Tensor, instruction: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        language = (self.language_tokens[instruction], self.language_mask[instruction], self.language_pooled[instruction])
        proprio = self.normalizer.normalize("proprio", proprio)
        condition = self.model.fuse(self.model.vision_encoder(images), language, proprio)
        chunks = self.objective.sample(GivenNoise(self.model, noise), condition, 1, self.nfe, self.sampler)
        return self.normalizer.unnormalize("actions", chunks[:, 0].float())


@torch.no_grad()
def language_table(model: nn.Module, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The language encoder's (tokens [N, L, D], mask bool [N, L], pooled [N, D]) for each
    instruction, in order: what the graph looks up by instruction index."""
    tokens, mask, pooled = model.language_encoder(list(instructions))
    return tokens.float().cpu().clone(), mask.bool().cpu().clone(), pooled.float().cpu().clone()


def exported_instructions(policy, extra: list[str] | None) -> list[str]:
    """The policy's `data.instructions` and then `extra`, without repeats, in order."""
    known = list(policy.cfg["data"].get("instructions") or [])
    instructions = list(dict.fromkeys(known + list(extra or [])))
    if not instructions:
        raise ValueError(
            "the ONNX graph stores language features for a fixed list of instructions, and this policy's "
            "data.instructions is empty: pass them, policy.export_onnx(path, instructions=['open the drawer', ...]) "
            "or `scripts/export_onnx.py ... instructions=[...]`"
        )
    bad = [text for text in instructions if not isinstance(text, str) or not text]
    if bad:
        raise ValueError(f"instructions must be non-empty strings, got {bad}")
    return instructions


def check_exportable(policy) -> None:
    """One graph needs a deterministic sampler given its noise input and the run's config."""
    if policy.cfg is None:
        raise ValueError(
            "export_onnx needs the run's resolved config (cameras, image size, instructions): load the policy with "
            "DriftingPolicy.from_checkpoint / from_pretrained, or pass cfg= when constructing it"
        )
    if policy.objective.name == "diffusion" and policy.sampler == "ddpm":
        raise ValueError(
            f"the diffusion objective with sampler=ddpm draws fresh noise at each of its {policy.nfe} steps, which "
            "a graph with one noise input cannot reproduce: export a policy loaded with sampler=ddim "
            "(DriftingPolicy.from_checkpoint(path, sampler='ddim'), or `scripts/export_onnx.py ... sampler=ddim`)"
        )


def example_inputs(policy, batch: int = EXPORT_BATCH) -> tuple[torch.Tensor, ...]:
    """Zero inputs of the graph's shapes (module docstring), batch `batch`."""
    data = policy.cfg["data"]
    size, steps = int(data["image_size"]), policy.model.vision_encoder.observation_shape[:-1]
    cameras = len(data["cameras"])
    images = torch.zeros((batch, *steps, cameras, 3, size, size), dtype=torch.uint8)
    proprio = torch.zeros((batch, *steps, int(data["proprio_dim"])), dtype=torch.float32)
    instruction = torch.zeros(batch, dtype=torch.int64)
    noise = torch.zeros((batch, 1, policy.horizon, policy.model.noise_dim), dtype=torch.float32)
    return images, proprio, instruction, noise


def onnx_metadata(policy, instructions: list[str]) -> dict:
    """Everything a runtime needs besides the graph: what the inputs mean and how to act."""
    data = policy.cfg["data"]
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "action_spec": policy.action_spec.to_config(),
        "cameras": list(data["cameras"]),
        "image_size": int(data["image_size"]),
        "proprio_dim": int(data["proprio_dim"]),
        "horizon": int(policy.horizon),
        "n_obs_steps": int(policy.n_obs_steps),
        "noise_dim": int(policy.model.noise_dim),
        "instructions": instructions,
        "language_encoder": str(policy.cfg["model"]["language"]["name"]),
        "objective": {"name": policy.objective.name, "nfe": policy.nfe, "sampler": policy.sampler, "method": policy.method},
        "execution": {"mode": policy.execution, "execute_steps": policy.execute_steps, "ensemble_decay": policy.ensemble_decay},
        "normalization": policy.normalizer.to_dict(),
        "source": None if policy.checkpoint is None else str(policy.checkpoint),
        "config": policy.cfg,
    }


def export_onnx(policy, path: str | os.PathLike, instructions: list[str] | None = None, opset: int = OPSET) -> Path:
    """Write `policy`'s observation-to-chunk graph with its metadata to `path` (module docstring).
    `instructions`: phrasings to add to the policy's `data.instructions` (a task-embedding policy
    refuses any it was not trained with). Returns the path."""
    check_exportable(policy)
    known = exported_instructions(policy, instructions)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _trace(ChunkGraph(policy, known).to("cpu").eval(), example_inputs(policy), path, opset)
    finally:
        policy.model.to(policy.device)
        policy.normalizer.to(policy.device)
    _write_metadata(path, onnx_metadata(policy, known))
    return path


def _trace(graph: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    """torch.onnx.export with the batch dim free. The dynamo exporter, because the TorchScript one
    bakes the batch size into the attention's reshapes (einops reads shapes as Python ints)."""
    # One warning per torchvision op it cannot register (this project has no torchvision), and two
    # about the exporter's own internals: none concerns the graph.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*", category=UserWarning)
        program = torch.onnx.export(
            graph, inputs, input_names=list(INPUTS), output_names=["actions"], dynamic_shapes={name: {0: batch} for name in INPUTS},
            opset_version=opset, dynamo=True, verbose=False, optimize=False,
        )
    program.save(str(path))


def _write_metadata(path: Path, metadata: dict) -> None:
    """The metadata as one JSON string in the file's metadata_props, and a one-line doc string."""
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    history = " (observation history)" if metadata["n_obs_steps"] > 1 else ""
    model.doc_string = (f"Drifting-VLA policy ({metadata['objective']['method']}): images, proprio, instruction index, "
                        f"noise -> actions [B, T, A]{history}")
    onnx.save(model, str(path))


def verify_export(policy, path: str | os.PathLike, seed: int = 0) -> float:
    """max |ONNX Runtime chunk - PyTorch chunk| in raw action units on a random observation of the
    graph's shapes and the first exported instruction, both given the same noise: how faithfully
    the file reproduces the policy."""
    onnx_policy = OnnxPolicy.from_file(path)
    rng = np.random.default_rng(seed)
    images, proprio, _, noise = example_inputs(policy, batch=1)
    obs = {
        "images": rng.integers(0, 256, size=images.shape, dtype=np.uint8),
        "proprio": rng.uniform(-1.0, 1.0, size=proprio.shape).astype(np.float32),
        "instruction": onnx_policy.known_instructions[:1],
    }
    expected = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))
    drawn = torch.randn(tuple(noise.shape), generator=torch.Generator().manual_seed(seed)).numpy()
    return float(np.abs(onnx_policy.predict_action_chunk(obs, noise=drawn) - expected).max())
