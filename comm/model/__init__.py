"""The COMM model: configuration, towers, merger, aligners and the conditional-generation model."""

from comm.model.configuration import CommConfig
from comm.model.modeling import CommForConditionalGeneration

__all__ = ["CommConfig", "CommForConditionalGeneration"]
