"""The LM head's logits as the LLM's own causal LM makes them: scaled or softcapped where its family does so."""

from __future__ import annotations

import torch
from transformers import PreTrainedConfig

# How causal-LM families scale their LM head's output, by model_type prefix: (operation, config field).
LOGIT_SCALING = {
    "cohere": ("multiply", "logit_scale"),
    "granite": ("divide", "logits_scaling"),
    "hyperclovax": ("multiply", "logits_scaling"),
}
# Config fields with which other causal LMs scale their logits: COMM refuses those LLMs rather than give logits the
# LLM was not trained with.
UNKNOWN_SCALING_FIELDS = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_mult")


def logit_scaling(config: PreTrainedConfig) -> tuple[str, str] | None:
    """``(operation, field)`` when the causal LM of ``config`` multiplies or divides its logits by a config field."""
    model_type = config.model_type or ""
    return next((scaling for prefix, scaling in LOGIT_SCALING.items() if model_type.startswith(prefix)), None)


def check_head(config: PreTrainedConfig) -> None:
    """Raise a ValueError for an LLM whose causal LM's logits or loss COMM's head (`transform_logits`) would not
    reproduce: an unknown logit scaling, or an MoE router loss."""
    unknown = [field for field in UNKNOWN_SCALING_FIELDS if getattr(config, field, None) not in (None, 1, 1.0)]
    if unknown and logit_scaling(config) is None:
        raise ValueError(
            f"the {config.model_type} LLM scales its logits ({', '.join(unknown)}) in a way COMM's LM head does not "
            "reproduce"
        )
    if getattr(config, "output_router_logits", False):
        raise ValueError(
            "text_config.output_router_logits is set, but COMM does not add the MoE router's auxiliary loss: set it "
            "to False"
        )


def transform_logits(logits: torch.Tensor, config: PreTrainedConfig) -> torch.Tensor:
    """``logits`` (the LM head's output) as the causal LM of ``config`` returns them."""
    scaling = logit_scaling(config)
    if scaling is not None:
        operation, field = scaling
        value = getattr(config, field)
        logits = logits * value if operation == "multiply" else logits / value
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
