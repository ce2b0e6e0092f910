"""Aligners that bring each tower's merged features into a common space before the LLM projection."""

from __future__ import annotations

from torch import nn


def mlp_aligner(in_dim: int, out_dim: int, depth: int = 2, ratio: int = 4) -> nn.Sequential:
    """DINOv2's MLP aligner: ``depth`` Linear layers with GELU between them, hidden width ``ratio * in_dim``.

    The default (depth 2, ratio 4) is ``Linear(D, 4D) -> GELU -> Linear(4D, D_out)``.
    """
    if depth == 1:
        return nn.Sequential(nn.Linear(in_dim, out_dim))
    hidden = ratio * in_dim
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
    for _ in range(depth - 2):
        layers += [nn.GELU(), nn.Linear(hidden, hidden)]
    layers += [nn.GELU(), nn.Linear(hidden, out_dim)]
    return nn.Sequential(*layers)


def linear_projection(in_dim: int, out_dim: int) -> nn.Linear:
    """CLIP's aligner: a single linear projection."""
    return nn.Linear(in_dim, out_dim)
