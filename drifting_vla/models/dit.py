"""The generator's trunk: a DiT over action-chunk tokens, conditioned on the fused observation.

    noise [B, G, T, noise_dim] --linear + learned position embedding--> x [B, G, T, D]
    c [B, D] + TimestepEmbedder(t [B, G]) --> c [B, G, D]  (adaLN conditioning, per sample)
    x --depth x DiTBlock(c [B, G, D], cond [B, K, D])--> final adaLN norm --> features [B, G, T, D]

One token per chunk step. Each block: self-attention over the T steps of one sample, with adaLN-Zero
modulation from the pooled conditioning vector `c`; cross-attention to the observation's
conditioning tokens `cond`; an MLP with adaLN-Zero. The G samples of one observation share its
conditioning: cross-attention runs its queries as [B, G*T, D] against [B, K, D], so the
conditioning tokens are never repeated G times; only the adaLN vector is per sample, because flow
and diffusion objectives give each sample its own time t. One-step objectives (drifting,
regression) run at a fixed t = 0.

Initialization follows DiT's adaLN-Zero (every gate and modulation starts at zero, so each block
starts as the identity) and PixArt-alpha's zero-initialized cross-attention output. Unlike DiT, the
output layer is NOT zeroed: a drifting generator must map different noise to different actions
from the first step, or the G samples of an observation collapse to one point. The timestep
embedder's output layer IS zeroed: at init (and for checkpoints written before it existed) it adds
nothing to the conditioning.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def init_linear_layers(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every nn.Linear inside `module` (DiT's default)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention on `F.scaled_dot_product_attention`; self-attention when no context.

    x [B, N, D], context [B, M, Dc], mask bool [B, M] (True = attend) -> [B, N, D]
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim or dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        context = x if context is None else context
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """t in [0, 1] [B, G] -> [B, G, D]: sinusoidal features of 1000 t (DiT's frequency embedding
    over its 1000-step range), then an MLP whose output layer starts at zero."""

    def __init__(self, dim: int, frequency_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.frequency_dim, self.max_period = frequency_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = (1000.0 * t.float())[..., None] * freqs
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to the conditioning tokens, adaLN-Zero MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, G, T, D], c [B, G, D], cond [B, K, D] -> [B, G, T, D]"""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c)[:, :, None].chunk(6, dim=-1)
        )
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa * self.attn(h.flatten(0, 1)).view_as(x)
        x = x + self.cross_attn(self.norm2(x).flatten(1, 2), cond, cond_mask).view_as(x)
        x = x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """Noise tokens -> per-step features [B, G, T, D] for the action decoder."""

    def __init__(
        self, noise_dim: int, horizon: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
    ):
        super().__init__()
        self.noise_dim = noise_dim
        self.horizon = horizon
        self.hidden_size = hidden_size
        self.noise_embed = nn.Linear(noise_dim, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1, horizon, hidden_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linear_layers(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        # adaLN-Zero: blocks start as the identity; conditioning switches them on during training.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_adaLN_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.zeros_(self.t_embedder.mlp[-1].weight)
        nn.init.zeros_(self.t_embedder.mlp[-1].bias)

    def forward(
        self,
        noise: torch.Tensor,
        timestep: torch.Tensor,
        c: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noise [B, G, T, noise_dim], timestep [B, G] in [0, 1], c [B, D], cond [B, K, D],
        cond_mask [B, K] -> [B, G, T, D]"""
        if noise.shape[-2:] != (self.horizon, self.noise_dim):
            raise ValueError(
                f"noise must be [B, G, {self.horizon}, {self.noise_dim}] (horizon, noise_dim), "
                f"got {tuple(noise.shape)}"
            )
        if timestep.shape != noise.shape[:2]:
            raise ValueError(f"timestep must be [B, G] = {tuple(noise.shape[:2])}, got {tuple(timestep.shape)}")
        c = c[:, None] + self.t_embedder(timestep).to(c.dtype)
        x = self.noise_embed(noise) + self.pos_embed
        for block in self.blocks:
            x = block(x, c, cond, cond_mask)
        shift, scale = self.final_adaLN_modulation(c)[:, :, None].chunk(2, dim=-1)
        return modulate(self.final_norm(x), shift, scale)
