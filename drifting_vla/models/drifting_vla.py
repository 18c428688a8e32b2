"""The Drifting-VLA policy network: observation in, G action chunks out, in one forward pass.

    obs.images      uint8 [B, V, 3, H, W] --VisionEncoder-->   [B, V*N, Dv] --+
    obs.instruction list[str] (B)         --language encoder-> [B, L, Dl]   --+--Fusion--> cond [B, K, D], c [B, D]
    obs.proprio     float [B, S]          ----------------------------------+
    x, t            [B, G, T, noise_dim], [B, G] --DiT(c, cond)--> [B, G, T, D] --ActionDecoder--> [B, G, T, A]

With an observation history (`data.n_obs_steps` = n > 1) images are [B, n, V, 3, H, W] and proprio
[B, n, S], oldest step first: every frame becomes tokens (with a learned step embedding) and the
n proprio vectors are concatenated, so the fusion sees all n steps at once. n = 1 is the layout
and the network above, parameter for parameter.

`encode_condition` runs the encoders ONCE per observation; `predict` evaluates the DiT for G inputs
from that one condition. Outputs live in the normalized action space (the normalizer lives with the
data and is applied outside the network). The objective (drifting, regression, flow matching,
diffusion; objectives/methods.py) owns both the loss and the sampler: it decides what x and t are
and what the output means. Nothing about it is baked in here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from drifting_vla.models.action_decoder import ActionDecoder
from drifting_vla.models.dit import DiT
from drifting_vla.models.fusion import Fusion
from drifting_vla.models.language_encoder import build_language_encoder
from drifting_vla.models.vision_encoder import build_vision_encoder
from drifting_vla.specs import ActionSpec


@dataclass
class Condition:
    """One observation's conditioning, shared by all G samples drawn for it."""

    tokens: torch.Tensor  # [B, K, D] fused conditioning tokens (DiT cross-attention)
    pooled: torch.Tensor  # [B, D] pooled conditioning vector (DiT adaLN)

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


class DriftingVLA(nn.Module):
    def __init__(
        self,
        vision_encoder: nn.Module,
        language_encoder: nn.Module,
        fusion: Fusion,
        dit: DiT,
        action_decoder: ActionDecoder,
        action_spec: ActionSpec,
    ):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.language_encoder = language_encoder
        self.fusion = fusion
        self.dit = dit
        self.action_decoder = action_decoder
        self.action_spec = action_spec
        self.horizon = dit.horizon
        self.noise_dim = dit.noise_dim
        self.n_obs_steps = vision_encoder.num_obs_steps

    def encode_condition(self, obs: Mapping) -> Condition:
        """obs: images uint8 [B, V, 3, H, W], proprio float [B, S], instruction list[str] (B);
        optionally vision_features [B, V, N, D] from a frozen backbone, used instead of images.
        With n_obs_steps = n > 1: images [B, n, V, 3, H, W], proprio [B, n, S], vision_features
        [B, n, V, N, D]."""
        instructions = list(obs["instruction"])
        if len(instructions) != obs["images"].shape[0]:
            raise ValueError(
                f"got {len(instructions)} instructions for {obs['images'].shape[0]} observations; "
                f"give one instruction string per observation"
            )
        if "vision_features" in obs:  # cached outputs of a frozen backbone [B, V, N, D]
            vision = self.vision_encoder.embed(obs["vision_features"])
        else:
            vision = self.vision_encoder(obs["images"])
        return self.fuse(vision, self.language_encoder(instructions), obs["proprio"])

    def fuse(self, vision: torch.Tensor, language: tuple[torch.Tensor, ...], proprio: torch.Tensor) -> Condition:
        """The encoders' outputs -> the condition: vision tokens [B, K, Dv], language (tokens
        [B, L, Dl], mask bool [B, L], pooled [B, Dl]) and proprio [B, S] ([B, n, S]). Apart from
        `encode_condition` so that the ONNX export (onnx_export.py) can feed language features
        looked up by instruction index, where strings cannot enter a graph."""
        tokens, pooled = self.fusion(vision, *language, self._proprio(proprio))
        return Condition(tokens, pooled)

    def _proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        """[B, S] or, with a history, [B, n, S] -> [B, n * S] float, the steps concatenated."""
        expected = 2 if self.n_obs_steps == 1 else 3
        if proprio.ndim != expected or (expected == 3 and proprio.shape[1] != self.n_obs_steps):
            layout = "[B, S]" if expected == 2 else f"[B, {self.n_obs_steps}, S] (data.n_obs_steps steps, oldest first)"
            raise ValueError(f"expected proprio {layout}, got {tuple(proprio.shape)}")
        return proprio.float().flatten(1)

    def sample_noise(
        self, batch_size: int, num_samples: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Standard normal noise [B, G, T, noise_dim], drawn on the CPU (so a seeded generator gives
        the same noise on every device) and moved to `device`."""
        shape = (batch_size, num_samples, self.horizon, self.noise_dim)
        return torch.randn(shape, generator=generator).to(device)

    def predict(self, condition: Condition, x: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """One network evaluation for G inputs per observation: x [B, G, T, noise_dim] (noise for a
        one-step generator, a noisy chunk for flow and diffusion), timestep [B, G] in [0, 1]
        (None: the fixed t = 0 of one-step objectives) -> head outputs [B, G, T, A].

        What the output means (an action chunk, a velocity, a noise estimate) is the objective's
        business; `to_actions` applies the action components' output activations where the output
        is an action chunk."""
        if timestep is None:
            timestep = x.new_zeros(x.shape[:2])
        features = self.dit(x, timestep, condition.pooled, condition.tokens)
        return self.action_decoder(features)

    def forward(self, obs: Mapping, x: torch.Tensor, timestep: torch.Tensor | None = None) -> torch.Tensor:
        """encode_condition then predict: [B, G, T, A] head outputs. Training goes through here, so
        data-parallel wrappers see one call per step."""
        return self.predict(self.encode_condition(obs), x, timestep)

    def to_actions(self, outputs: torch.Tensor) -> torch.Tensor:
        """Head outputs that stand for an action chunk -> valid actions (orthonormal 6D rotations, gripper in [0, 1])."""
        return self.action_decoder.activate(outputs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: everything except the frozen pretrained encoders."""
        return [p for p in self.parameters() if p.requires_grad]


def build_model(cfg) -> DriftingVLA:
    """Build the network from the composed config (a dict or an OmegaConf DictConfig).

    Reads `cfg.model` (drifting_vla/configs/model/*.yaml) and from `cfg.data`: `action_spec`,
    `cameras` (list of names; their count matters), `proprio_dim`, `horizon`, and optionally
    `n_obs_steps` (1 when absent, as in checkpoints from before histories) and `instructions`
    (for task embeddings). `model.pretrained=false` gives random weights and no
    download, so any config can be built, counted and shape-checked offline.
    """
    # Only these two: the rest of a composed config may hold `${hydra:...}` keys that resolve only
    # inside a Hydra app (a notebook's `hydra.compose` has none).
    model_cfg, data_cfg = _plain(cfg["model"]), _plain(cfg["data"])
    for key in ("action_spec", "cameras", "proprio_dim", "horizon"):
        if key not in data_cfg:
            raise KeyError(f"build_model needs data.{key} in the data config (drifting_vla/configs/data/*.yaml)")
    action_spec = ActionSpec.from_config(data_cfg["action_spec"])
    pretrained = bool(model_cfg.get("pretrained", True))
    dit_cfg = model_cfg["dit"]
    hidden = dit_cfg["hidden_size"]

    n_obs_steps = int(data_cfg.get("n_obs_steps", 1))
    if n_obs_steps < 1:
        raise ValueError(f"data.n_obs_steps must be >= 1, got {n_obs_steps}")
    vision = build_vision_encoder(model_cfg["vision"], len(data_cfg["cameras"]), pretrained, n_obs_steps)
    language = build_language_encoder(model_cfg["language"], pretrained, data_cfg.get("instructions"))
    fusion = Fusion(
        vision.out_dim,
        language.out_dim,
        int(data_cfg["proprio_dim"]) * n_obs_steps,
        hidden,
        num_heads=dit_cfg["num_heads"],
        mlp_ratio=dit_cfg.get("mlp_ratio", 4.0),
        **model_cfg.get("fusion", {}),
    )
    dit = DiT(
        noise_dim=model_cfg.get("noise_dim") or action_spec.network_dim,
        horizon=int(data_cfg["horizon"]),
        **dit_cfg,
    )
    decoder = ActionDecoder(action_spec, hidden, model_cfg.get("decoder_hidden_size") or hidden)
    return DriftingVLA(vision, language, fusion, dit, decoder, action_spec)


def parameter_table(model: nn.Module) -> str:
    """Parameter counts per top-level component, total and trainable; printed at start-up."""
    rows = [(name, _count(child)) for name, child in model.named_children()]
    rows.append(("total", _count(model)))
    lines = [f"{'component':<18} {'parameters':>14} {'trainable':>14}"]
    lines += [f"{name:<18} {total:>14,} {trainable:>14,}" for name, (total, trainable) in rows]
    return "\n".join(lines)


def _count(module: nn.Module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _plain(node):
    """A dict/DictConfig tree as plain dicts and lists, without importing omegaconf here."""
    if isinstance(node, Mapping) or hasattr(node, "keys"):
        return {str(k): _plain(node[k]) for k in node.keys()}
    if isinstance(node, (list, tuple)) or (hasattr(node, "__iter__") and not isinstance(node, (str, bytes))):
        return [_plain(v) for v in node]
    return node
