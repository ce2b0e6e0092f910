"""Causal-LM loss on the labelled positions only: the LM head and cross-entropy skip every position without a label."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100

# Config fields with which a transformers causal LM transforms the LM head's output (Gemma-2 softcapping, Cohere's
# logit scale) or adds to its loss (MoE router auxiliary loss): such an LLM keeps its own full-logits loss.
HEAD_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "output_router_logits")


def decoder_and_head(language_model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder body (embeddings to the final norm) and the LM head of a causal LM, or None where they cannot be
    run apart with the same result as the LM's own forward.

    Works through a peft wrapper (its attribute lookups reach the wrapped model, whose layers carry the adapters).
    """
    config = getattr(language_model, "config", None)
    if config is None or any(getattr(config, field, None) for field in HEAD_TRANSFORM_FIELDS):
        return None
    get_decoder = getattr(language_model, "get_decoder", None)
    get_head = getattr(language_model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if decoder is None or head is None or decoder is language_model:
        return None
    return decoder, head


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
    lm_head: nn.Module,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of transformers' ``ForCausalLMLoss`` with ``lm_head`` applied only where a label is set.

    ``hidden_states`` ``(batch, seq, hidden)`` are the decoder's last ones. Mean over the labelled tokens, or, with
    ``num_items_in_batch`` (the Trainer's count over all gradient-accumulation micro-batches), their sum divided by
    it. Returns ``(loss, logits)``: the float32 logits of the labelled positions, ``(num_labelled, vocab)``.
    """
    keep, targets = labelled_positions(labels.to(hidden_states.device), ignore_index)
    selected = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, keep)
    logits = lm_head(selected).float()  # upcast as ForCausalLMLoss does
    if num_items_in_batch is None:
        return nn.functional.cross_entropy(logits, targets, reduction="mean"), logits
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    return nn.functional.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch, logits
