"""The COMM model: configuration, towers, merger, aligners, the headless model and the conditional-generation model."""

from comm.model.configuration import CommConfig
from comm.model.modeling import CommForConditionalGeneration, CommModel

__all__ = ["CommConfig", "CommForConditionalGeneration", "CommModel"]
