"""Causal-LM loss on the labelled positions only: the LM head and cross-entropy skip every position without a label."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IGNORE_INDEX = -100
LOSS_WEIGHTINGS = ("token", "sample")


def labelled_positions(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (into batch x sequence) of the positions whose next token has a label, and those labels.

    The shift is transformers' ``ForCausalLMLoss``'s: position t predicts label t + 1, the last position nothing.
    """
    shifted = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
    keep = (shifted != ignore_index).nonzero().squeeze(-1)
    return keep, shifted[keep]


def labelled_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    weighting: str = "token",
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of transformers' ``ForCausalLMLoss`` with ``head`` (hidden states to logits) applied only where a
    label is set.

    ``hidden_states`` ``(batch, seq, hidden)`` are the decoder's last ones. Mean over the labelled tokens, or, with
    ``num_items_in_batch`` (the Trainer's count over all gradient-accumulation micro-batches), their sum divided by
    it. Returns ``(loss, logits)``: the float32 logits of the labelled positions, ``(num_labelled, vocab)``.

    ``weighting="sample"`` gives every sample of the batch the same total weight, whatever its answer length: a
    token of a sample with ``n`` labelled tokens counts ``mean_n / n`` (``mean_n``: the batch's labelled tokens per
    labelled sample), so the weights still sum to the number of labelled tokens and the normalisation above holds.
    Without it, a 21-token box answer outweighs a one-word "Yes" 21 to 1 in the gradient. ``sample_weights``
    ``(batch,)`` then multiply each sample's token losses (a training file's loss weight, `comm.data.DataSpec`).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    keep, targets = labelled_positions(labels.to(hidden_states.device), ignore_index)
    selected = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, keep)
    logits = head(selected).float()  # upcast as ForCausalLMLoss does
    losses = nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = torch.div(keep, labels.shape[-1], rounding_mode="floor")
    if weighting == "sample" and keep.numel():
        per_row = torch.bincount(rows)
        losses = losses * (keep.numel() / (per_row > 0).sum()) / per_row[rows]
    if sample_weights is not None:
        losses = losses * sample_weights.to(losses.device, losses.dtype)[rows]
    if num_items_in_batch is None:
        return losses.sum() / keep.numel(), logits
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return losses.sum() / num_items_in_batch, logits
