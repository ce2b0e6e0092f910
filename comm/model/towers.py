"""Frozen vision towers (CLIP, DINOv2) that return the pooled patch tokens of chosen layers."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel


def pool_to_grid(tokens: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Adaptive-average-pool ``(B, side*side, D)`` patch tokens to ``(B, grid_size**2, D)``."""
    batch, num_tokens, dim = tokens.shape
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"expected a square patch grid, got {num_tokens} tokens")
    if side == grid_size:
        return tokens
    grid = tokens.transpose(1, 2).reshape(batch, dim, side, side)
    pooled = F.adaptive_avg_pool2d(grid, grid_size)
    return pooled.flatten(2).transpose(1, 2)


def truncated_tower_config(config: PreTrainedConfig, layers: list[int]) -> PreTrainedConfig:
    """A copy of a tower config with only the blocks up to the deepest merged layer (nothing deeper is built)."""
    truncated = copy.deepcopy(config)
    truncated.num_hidden_layers = max(layers)
    return truncated


def transformer_blocks(encoder: PreTrainedModel) -> nn.ModuleList:
    """The list of transformer blocks of a CLIP vision model or a DINOv2 model."""
    body = getattr(encoder, "vision_model", encoder).encoder
    blocks = getattr(body, "layers", None) or getattr(body, "layer", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"cannot find the transformer blocks of {type(encoder).__name__}")
    return blocks


class FrozenVisionTower(nn.Module):
    """A frozen ViT that returns, per chosen layer, its patch tokens pooled to a ``grid x grid`` grid.

    The tower is built with only as many blocks as the deepest chosen layer needs, so nothing beyond it is
    computed or stored. Chosen layers are captured by forward hooks and pooled at once; the other hidden
    states are never kept. CLS and register tokens are dropped (the last ``num_patches`` tokens are patches).
    """

    def __init__(self, config: PreTrainedConfig, layers: list[int], grid_size: int, image_size: int):
        super().__init__()
        self.encoder = AutoModel.from_config(truncated_tower_config(config, layers))
        self.layers = list(layers)
        self.grid_size = grid_size
        self.image_size = image_size
        self.patch_size = config.patch_size
        self.requires_grad_(False)
        self.eval()

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before pooling."""
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> FrozenVisionTower:
        """Stay in eval mode: the tower is frozen (no dropout, no stochastic depth)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Pooled patch tokens ``(B, grid**2, D)`` of each chosen layer, in the order of ``self.layers``."""
        expected = (self.image_size, self.image_size)
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(f"pixel values are {tuple(pixel_values.shape[-2:])}, this tower expects {expected}")
        captured: dict[int, torch.Tensor] = {}
        blocks = transformer_blocks(self.encoder)

        def capture(layer: int):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                # Pooling happens here, before merging: the merger's per-layer LayerNorm+Linear then runs on
                # grid**2 tokens instead of every patch (196 vs 576 at ViT-L/14-336, ~3x cheaper), which keeps
                # it a few percent of the towers' cost; averaging first changes the result only through the
                # LayerNorm's statistics, which barely move under a local mean.
                captured[layer] = pool_to_grid(hidden[:, -self.num_patches :], self.grid_size)

            return hook

        handles = [blocks[layer - 1].register_forward_hook(capture(layer)) for layer in set(self.layers)]
        try:
            dtype = next(self.encoder.parameters()).dtype
            self.encoder(pixel_values=pixel_values.to(dtype))
        finally:
            for handle in handles:
                handle.remove()
        return [captured[layer] for layer in self.layers]
