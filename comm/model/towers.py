"""Frozen vision towers (CLIP, DINOv2) that return the pooled patch tokens of chosen layers."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

# Config fields an encoder assigned to a tower must share with the tower's config (the weights' shapes and the input).
MATCHING_FIELDS = ("model_type", "hidden_size", "patch_size", "image_size")


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
    """A copy of a tower config with only the blocks up to the deepest merged layer (to load only those blocks)."""
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

    The encoder runs on ``config`` itself (the model's sub-config object, so setting the model's attention
    implementation reaches it) and holds only the blocks up to the deepest chosen layer: nothing beyond it is
    computed or stored, while ``config.num_hidden_layers`` keeps the checkpoint's depth. Chosen layers are captured
    by forward hooks and pooled at once; the other hidden states are never kept. CLS and register tokens are dropped
    (the last ``num_patches`` tokens are patches).

    An encoder assigned to ``tower.encoder`` (a pretrained one, full or truncated) is cut to those blocks and made
    to run on ``config`` too.
    """

    def __init__(self, config: PreTrainedConfig, layers: list[int], grid_size: int, image_size: int):
        super().__init__()
        self.config = config
        self.layers = list(layers)
        self.depth = max(self.layers)
        self.grid_size = grid_size
        self.image_size = image_size
        self.patch_size = config.patch_size
        self.encoder = AutoModel.from_config(config)
        self.requires_grad_(False)
        self.eval()

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "encoder":
            value = self._adopt(value)
        super().__setattr__(name, value)

    def _adopt(self, encoder: PreTrainedModel) -> PreTrainedModel:
        """``encoder`` cut to ``depth`` blocks, its modules reading this tower's config instead of their own."""
        blocks = transformer_blocks(encoder)
        if len(blocks) < self.depth:
            raise ValueError(f"the encoder has {len(blocks)} blocks, this tower reads layers up to {self.depth}")
        del blocks[self.depth :]
        own = encoder.config
        if own is self.config:
            return encoder
        different = [f for f in MATCHING_FIELDS if getattr(own, f, None) != getattr(self.config, f, None)]
        if different:
            raise ValueError(f"the encoder's config differs from the tower's in {', '.join(different)}")
        if own._attn_implementation != self.config._attn_implementation:
            self.config._attn_implementation = own._attn_implementation  # as it was loaded
        for module in encoder.modules():
            if getattr(module, "config", None) is own:
                module.config = self.config
        return encoder

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before pooling."""
        return (self.image_size // self.patch_size) ** 2

    def train(self, mode: bool = True) -> FrozenVisionTower:
        """Stay in eval mode: the tower is frozen (no dropout, no stochastic depth)."""
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Pooled patch tokens ``(B, grid**2, D)`` of each chosen layer, in the order of ``self.layers``."""
        return self.encode(pixel_values)[0]

    @torch.no_grad()
    def encode(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> tuple[list[torch.Tensor], BaseModelOutput]:
        """`forward`'s pooled layers and the encoder's own output (all its hidden states and attentions if asked)."""
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
        flags = {"output_hidden_states": True} if output_hidden_states else {}
        if output_attentions:
            flags["output_attentions"] = True
        try:
            dtype = next(self.encoder.parameters()).dtype
            output = self.encoder(pixel_values=pixel_values.to(dtype), **flags)
        finally:
            for handle in handles:
                handle.remove()
        return [captured[layer] for layer in self.layers], output
