"""comm: COMM-style multimodal LLMs with multi-level CLIP + DINOv2 features (arXiv 2310.08825)."""

from comm.build import add_image_tokens, build_from_components, build_processor
from comm.loading import load_model_and_processor
from comm.model.configuration import CommConfig
from comm.model.modeling import CommForConditionalGeneration
from comm.pipeline import CommPipeline
from comm.processing import CommProcessor

__all__ = [
    "CommConfig",
    "CommForConditionalGeneration",
    "CommPipeline",
    "CommProcessor",
    "add_image_tokens",
    "build_from_components",
    "build_processor",
    "load_model_and_processor",
]
__version__ = "0.1.0"
