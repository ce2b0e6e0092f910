"""LLN-Layerscale: the COMM merger of multi-level features from one vision tower."""

from __future__ import annotations

import torch
from torch import nn


class LLNLayerscale(nn.Module):
    """Merge hidden states of several layers: ``v = sum_i alpha_i * Linear_i(LN_i(h_i))``.

    One ``LayerNorm -> Linear(D, D)`` module per layer and one learnable scale ``alpha_i`` per layer
    (COMM, arXiv 2310.08825, Sec. 3). With ``softmax=True`` the scales are ``softmax(alpha)`` over layers.
    """

    def __init__(self, num_layers: int, dim: int, scale_init: float | None = None, softmax: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(num_layers))
        self.scale_init = 1.0 / num_layers if scale_init is None else float(scale_init)
        self.softmax = softmax
        self.layer_scale = nn.Parameter(torch.full((num_layers,), self.scale_init))

    def scales(self) -> torch.Tensor:
        """The per-layer weights actually applied (after the softmax, if any)."""
        return self.layer_scale.softmax(0) if self.softmax else self.layer_scale

    def forward(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        """Merge a list of ``(B, N, D)`` hidden states (one per layer) into one ``(B, N, D)`` tensor."""
        if len(hidden_states) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} layers of hidden states, got {len(hidden_states)}")
        alpha = self.scales()
        dtype = self.layer_scale.dtype
        merged = None
        for i, (block, hidden) in enumerate(zip(self.blocks, hidden_states)):
            term = alpha[i] * block(hidden.to(dtype))
            merged = term if merged is None else merged + term
        return merged
