"""The LLM's position ids for a text with images: one per token ("sequential"), or one per image ("shared")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
