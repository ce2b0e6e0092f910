"""`CommConfig`: the COMM model's configuration, with CLIP, DINOv2 and LLM sub-configs like `LlavaConfig`."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from comm.model.positions import IMAGE_POSITIONS

# The paper's towers: CLIP ViT-L/14 at 336 px and DINOv2 ViT-L/14.
CLIP_L14_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
}
DINOV2_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "image_size": 518,
    "patch_size": 14,
}


class CommConfig(PreTrainedConfig):
    """Configuration of `CommForConditionalGeneration`.

    Sub-configs: ``clip_config`` (a CLIP vision config), ``dino_config`` (DINOv2, with or without registers)
    and ``text_config`` (any causal LM). Layer indices are 1-based hidden-state indices: layer ``i`` is the
    output of the tower's ``i``-th transformer block (``hidden_states[i]`` in transformers).

    Fields:
        clip_layers / dino_layers: layers merged by LLN-Layerscale (paper: CLIP 1..24, DINOv2 19..24).
        layerscale_init: initial per-layer scale; None means ``1 / number of layers``.
        layerscale_softmax: normalise the per-layer scales with a softmax over layers.
        dino_aligner_depth / dino_aligner_ratio: the DINOv2 MLP aligner (2 layers, D -> 4D -> D by default).
        grid_size: visual tokens are pooled to ``grid_size x grid_size`` per tower.
        concat: "channel" (one token per grid cell) or "sequence" (CLIP tokens then DINOv2 tokens).
        dino_image_size: input side of the DINOv2 tower (its checkpoints are trained at 224).
        image_token_index / image_start_token_index / image_end_token_index: ids of the special tokens
            ``<im_patch>``, ``<im_start>``, ``<im_end>``, set when they are added to the tokenizer.
        loss_weighting: "token" (every labelled token counts the same, transformers' causal-LM loss) or "sample"
            (every sample counts the same whatever its answer length; `comm.model.loss`).
        image_positions: the LLM's position ids for visual tokens: "sequential" (one per token, as LLaVA) or
            "shared" (one per image, the text going on after it; `comm.model.positions`).
        image_position_embedding: add a learned embedding of each grid cell's 2D sin-cos code to its visual token
            (`comm.model.positions.GridPositionEmbedding`).
    """

    model_type = "comm"
    sub_configs_defaults = {
        "clip_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_L14_336),
        "dino_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2", init_kwargs=DINOV2_LARGE),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    clip_config: dict | PreTrainedConfig | None = None
    dino_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    clip_layers: list[int] | None = None
    dino_layers: list[int] | None = None
    layerscale_init: float | None = None
    layerscale_softmax: bool = False
    dino_aligner_depth: int = 2
    dino_aligner_ratio: int = 4
    grid_size: int = 14
    concat: Literal["channel", "sequence"] = "channel"
    dino_image_size: int = 224
    image_token_index: int | None = None
    image_start_token_index: int | None = None
    image_end_token_index: int | None = None
    tie_word_embeddings: bool = False
    loss_weighting: Literal["token", "sample"] = "token"
    image_positions: Literal["sequential", "shared"] = "sequential"
    image_position_embedding: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # The LM head lives beside the LLM's body (as in Llava): an LLM that ties them keeps them tied.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        if self.clip_layers is None:
            self.clip_layers = list(range(1, self.clip_config.num_hidden_layers + 1))
        if self.dino_layers is None:
            deepest = self.dino_config.num_hidden_layers
            self.dino_layers = list(range(max(1, deepest - 5), deepest + 1))
        self.clip_layers = [int(i) for i in self.clip_layers]
        self.dino_layers = [int(i) for i in self.dino_layers]
        check_layers("clip_layers", self.clip_layers, self.clip_config.num_hidden_layers)
        check_layers("dino_layers", self.dino_layers, self.dino_config.num_hidden_layers)
        if self.concat not in ("channel", "sequence"):
            raise ValueError(f"concat must be 'channel' or 'sequence', got {self.concat!r}")
        if self.loss_weighting not in ("token", "sample"):
            raise ValueError(f"loss_weighting must be 'token' or 'sample', got {self.loss_weighting!r}")
        if self.image_positions not in IMAGE_POSITIONS:
            raise ValueError(f"image_positions must be one of {IMAGE_POSITIONS}, got {self.image_positions!r}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be >= 1, got {self.grid_size}")
        if self.dino_aligner_depth < 1 or self.dino_aligner_ratio < 1:
            raise ValueError("dino_aligner_depth and dino_aligner_ratio must be >= 1")

    @property
    def num_image_tokens(self) -> int:
        """Visual tokens per image fed to the LLM (196 for a 14x14 grid with channel concatenation)."""
        per_tower = self.grid_size * self.grid_size
        return per_tower if self.concat == "channel" else 2 * per_tower

    def tower_reading_fields(self) -> dict:
        """The fields that say how the towers are read (merged layers, grid, DINOv2 input size).

        Tower checkpoints do not carry them, so pass these to `build_from_components` to rebuild this layout.
        """
        return {
            "clip_layers": list(self.clip_layers),
            "dino_layers": list(self.dino_layers),
            "grid_size": self.grid_size,
            "dino_image_size": self.dino_image_size,
        }


def check_layers(name: str, layers: list[int], num_hidden_layers: int) -> None:
    """Raise a ValueError naming ``name`` when a layer index is outside ``1..num_hidden_layers``."""
    if not layers:
        raise ValueError(f"{name} is empty: merge at least one layer")
    bad = [i for i in layers if not 1 <= i <= num_hidden_layers]
    if bad:
        raise ValueError(
            f"{name} has layer indices {bad} but the tower has layers 1..{num_hidden_layers} "
            "(1-based: layer i is the output of the i-th transformer block)"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name} lists a layer twice: {layers}")
