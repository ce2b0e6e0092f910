"""Where the LLM sees a visual token: its position ids (one per token or one per image) and its grid cell's
embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_POSITIONS = ("sequential", "shared")


def image_position_ids(placeholders: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids where each run of visual tokens shares one position (its first token's) and text goes on from it.

    ``placeholders`` marks the ``<im_patch>`` tokens, ``(batch, seq)``. The grid position of a visual token is in its
    features already; giving the LLM's rotary embedding 64 or 196 different positions for one image only makes the
    match between a question's words and an object's tokens depend on where the object lies in the raster order
    (README, findings: how much faster the demo grounds with shared positions). Padding (``attention_mask`` 0)
    gets position 1, as transformers gives it; with left padding the first real token gets 0.
    """
    attended = torch.ones_like(placeholders, dtype=torch.long) if attention_mask is None else attention_mask.long()
    repeat = placeholders & F.pad(placeholders, (1, 0))[:, :-1]  # a visual token right after another
    positions = (attended * (~repeat).long()).cumsum(-1) - 1
    return positions.masked_fill(attended == 0, 1)


def grid_position_codes(grid_size: int, device: torch.device | None = None) -> torch.Tensor:
    """``(grid_size**2, 4 * octaves)``: each grid cell's fixed 2D sin-cos code, cells in raster order.

    For the row and the column ``v`` of a cell: ``sin(v f), cos(v f)`` at ``f = pi * 2**k / grid_size`` for
    ``k = 0 .. octaves - 1`` (``octaves = ceil(log2(grid_size)) + 1``: the finest tells neighbours apart).
    """
    octaves = math.ceil(math.log2(max(grid_size, 2))) + 1
    frequencies = math.pi * 2.0 ** torch.arange(octaves, device=device) / grid_size
    cells = torch.arange(grid_size, device=device, dtype=torch.float32)
    rows, columns = torch.meshgrid(cells, cells, indexing="ij")
    angles = torch.stack([rows.reshape(-1), columns.reshape(-1)], -1)[..., None] * frequencies  # (cells, 2, octaves)
    return torch.cat([angles.sin(), angles.cos()], -1).reshape(grid_size * grid_size, -1)


class GridPositionEmbedding(nn.Module):
    """A learned linear map of each grid cell's fixed 2D sin-cos code (`grid_position_codes`), added to its visual
    token at the LLM's input: the cell's row and column made as easy to read as a word, whatever the towers kept."""

    def __init__(self, grid_size: int, width: int):
        super().__init__()
        self.grid_size = grid_size
        self.projection = nn.Linear(grid_position_codes(grid_size).shape[-1], width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(images, k * grid_size**2, width)`` (k towers' grids in a row) plus each cell's embedding."""
        codes = grid_position_codes(self.grid_size, tokens.device).to(tokens.dtype)
        embedding = self.projection(codes)
        repeats = tokens.shape[1] // embedding.shape[0]
        return tokens + embedding.repeat(repeats, 1)
