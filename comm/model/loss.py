"""Causal-LM loss on the labelled positions only: the LM head and cross-entropy skip every position without a label."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

IGNORE_INDEX = -100


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of transformers' ``ForCausalLMLoss`` with ``head`` (hidden states to logits) applied only where a
    label is set.

    ``hidden_states`` ``(batch, seq, hidden)`` are the decoder's last ones. Mean over the labelled tokens, or, with
    ``num_items_in_batch`` (the Trainer's count over all gradient-accumulation micro-batches), their sum divided by
    it. Returns ``(loss, logits)``: the float32 logits of the labelled positions, ``(num_labelled, vocab)``.
    """
    keep, targets = labelled_positions(labels.to(hidden_states.device), ignore_index)
    selected = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, keep)
    logits = head(selected).float()  # upcast as ForCausalLMLoss does
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets, reduction="mean"), logits
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch, logits
