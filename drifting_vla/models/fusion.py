"""Fusion: vision tokens, language tokens and proprioception -> conditioning for the DiT.

    vision   [B, Nv, Dv]  --linear + type embedding--+
    language [B, L, Dl]   --linear + type embedding--+--> context [B, Nv + L + 1, D]
    proprio  [B, n*S]     --linear + type embedding--+      (n observation steps, concatenated)
    learned queries [K, D] --num_layers x (cross-attention to context, MLP)--> tokens [B, K, D]
    pooled [B, D] = mean(tokens) + linear(language pooled feature)

A fixed number K of learned queries keeps the DiT's cross-attention cost independent of how many
cameras and patches the vision encoder produces. The pooled vector (which drives the DiT's adaLN)
gets the instruction's pooled feature directly, so task identity reaches every block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from drifting_vla.models.dit import Attention, Mlp, init_linear_layers


class FusionLayer(nn.Module):
    """Pre-norm cross-attention from the queries to the context, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, K, D], context [B, M, D], mask bool [B, M] -> [B, K, D]"""
        x = x + self.attn(self.norm_q(x), self.norm_context(context), mask)
        return x + self.mlp(self.norm_mlp(x))


class Fusion(nn.Module):
    def __init__(
        self,
        vision_dim: int,
        language_dim: int,
        proprio_dim: int,
        dim: int,
        num_tokens: int = 32,
        num_layers: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.vision_proj = nn.Linear(vision_dim, dim)
        self.language_proj = nn.Linear(language_dim, dim)
        self.language_pooled_proj = nn.Linear(language_dim, dim)
        self.proprio_proj = nn.Linear(proprio_dim, dim)
        self.type_embed = nn.Parameter(torch.zeros(3, dim))  # vision, language, proprio
        self.queries = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.layers = nn.ModuleList([FusionLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linear_layers(self)
        nn.init.normal_(self.type_embed, std=0.02)
        nn.init.normal_(self.queries, std=0.02)

    def forward(
        self,
        vision: torch.Tensor,
        language: torch.Tensor,
        language_mask: torch.Tensor,
        language_pooled: torch.Tensor,
        proprio: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> conditioning tokens [B, K, D], pooled conditioning vector [B, D]"""
        b = vision.shape[0]
        context = torch.cat(
            [
                self.vision_proj(vision) + self.type_embed[0],
                self.language_proj(language) + self.type_embed[1],
                self.proprio_proj(proprio).unsqueeze(1) + self.type_embed[2],
            ],
            dim=1,
        )
        mask = torch.cat(
            [
                torch.ones(b, vision.shape[1], dtype=torch.bool, device=vision.device),
                language_mask,
                torch.ones(b, 1, dtype=torch.bool, device=vision.device),
            ],
            dim=1,
        )
        x = self.queries.expand(b, -1, -1)
        for layer in self.layers:
            x = layer(x, context, mask)
        tokens = self.norm(x)
        return tokens, tokens.mean(dim=1) + self.language_pooled_proj(language_pooled)
