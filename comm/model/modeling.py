"""`CommForConditionalGeneration`: frozen CLIP + DINOv2 towers, LLN-Layerscale mergers, aligners and an LLM."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from comm.model.aligners import linear_projection, mlp_aligner
from comm.model.configuration import CommConfig
from comm.model.loss import decoder_and_head, labelled_causal_lm_loss
from comm.model.merge import LLNLayerscale
from comm.model.towers import FrozenVisionTower

# The image inputs of `forward` (what `CommProcessor` returns under these names): each tower's pixel values.
PIXEL_VALUES_CLIP = "pixel_values_clip"
PIXEL_VALUES_DINO = "pixel_values_dino"
PIXEL_INPUTS = (PIXEL_VALUES_CLIP, PIXEL_VALUES_DINO)
# Recent transformers name the KV cache ``cache`` (forward argument and output field), earlier 5.x ``past_key_values``.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class CommPreTrainedModel(PreTrainedModel):
    """Weight initialisation and capability flags shared by COMM models."""

    config: CommConfig
    config_class = CommConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        # Only the modules between the towers and the LLM get here: the towers and the LLM are PreTrainedModels
        # and bring their own init. These get PyTorch's fan-in init (as LLaVA's projector keeps): the usual
        # N(0, 0.02) scales features by 0.02 * sqrt(width) per layer, so over the merger -> aligner -> projector
        # chain a narrow model would feed the LLM an image ~100x fainter than its text and learn to ignore it.
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LLNLayerscale):
            init.constant_(module.layer_scale, module.scale_init)


class CommForConditionalGeneration(CommPreTrainedModel, GenerationMixin):
    """The COMM multimodal LLM (arXiv 2310.08825).

    Vision path, per image: each frozen tower gives the patch tokens of its chosen layers pooled to
    ``grid x grid``; LLN-Layerscale merges them per tower; DINOv2 goes through the MLP aligner and CLIP
    through a linear projection; the two are concatenated (channels or sequence) and projected to the
    LLM's width. The result replaces the embeddings of the ``<im_patch>`` placeholder tokens.
    """

    # With labels (training), apply the LM head and the loss only at the labelled positions (`comm.model.loss`):
    # same loss and gradients as the LLM's own full-logits loss, a fraction of its logits memory and head FLOPs.
    # False runs the LLM's own forward (the reference the tests and benchmarks compare with).
    labelled_logits_only: bool = True

    def __init__(self, config: CommConfig):
        super().__init__(config)
        clip_dim = config.clip_config.hidden_size
        dino_dim = config.dino_config.hidden_size
        self.clip_tower = FrozenVisionTower(
            config.clip_config, config.clip_layers, config.grid_size, config.clip_config.image_size
        )
        self.dino_tower = FrozenVisionTower(
            config.dino_config, config.dino_layers, config.grid_size, config.dino_image_size
        )
        scale_kwargs = {"scale_init": config.layerscale_init, "softmax": config.layerscale_softmax}
        self.clip_merger = LLNLayerscale(len(config.clip_layers), clip_dim, **scale_kwargs)
        self.dino_merger = LLNLayerscale(len(config.dino_layers), dino_dim, **scale_kwargs)
        self.clip_projection = linear_projection(clip_dim, clip_dim)
        self.dino_aligner = mlp_aligner(dino_dim, clip_dim, config.dino_aligner_depth, config.dino_aligner_ratio)
        fused_dim = 2 * clip_dim if config.concat == "channel" else clip_dim
        self.projector = nn.Linear(fused_dim, config.text_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs) -> CommForConditionalGeneration:
        """Load like any `PreTrainedModel`, then re-freeze the towers (loading makes fresh parameters)."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.freeze_towers()
        return loaded

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def trainable_vision_modules(self) -> dict[str, nn.Module]:
        """The modules between the towers and the LLM (what a projector-only stage trains)."""
        return {
            "clip_merger": self.clip_merger,
            "dino_merger": self.dino_merger,
            "clip_projection": self.clip_projection,
            "dino_aligner": self.dino_aligner,
            "projector": self.projector,
        }

    def freeze_towers(self) -> None:
        """Freeze both towers (no gradients, eval mode); called again after towers are swapped in."""
        for tower in (self.clip_tower, self.dino_tower):
            tower.requires_grad_(False)
            tower.eval()

    def get_image_features(self, pixel_values_clip: torch.Tensor, pixel_values_dino: torch.Tensor) -> torch.Tensor:
        """Visual tokens ``(num_images, num_image_tokens, llm_width)`` for a batch of images."""
        if pixel_values_clip.shape[0] != pixel_values_dino.shape[0]:
            raise ValueError(
                f"got {pixel_values_clip.shape[0]} CLIP images but {pixel_values_dino.shape[0]} DINOv2 images"
            )
        clip = self.clip_projection(self.clip_merger(self.clip_tower(pixel_values_clip)))
        dino = self.dino_aligner(self.dino_merger(self.dino_tower(pixel_values_dino)))
        fused = torch.cat([clip, dino], dim=-1 if self.config.concat == "channel" else 1)
        return self.projector(fused)

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Put the visual tokens in place of the ``<im_patch>`` placeholders, image by image in order."""
        mask = input_ids == self.config.image_token_index
        expected = image_features.shape[0] * image_features.shape[1]
        if int(mask.sum()) != expected:
            raise ValueError(
                f"the text has {int(mask.sum())} image placeholder tokens but {image_features.shape[0]} images "
                f"give {expected} visual tokens ({image_features.shape[1]} each)"
            )
        features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_clip: torch.Tensor | None = None,
        pixel_values_dino: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Run the LLM on text whose ``<im_patch>`` tokens are replaced by the images' visual tokens.

        With ``labels``, ``logits`` holds only the labelled positions' (``(num_labelled, vocab)``, float32; see
        `labelled_logits_only`); without, the usual ``(batch, seq, vocab)`` (``logits_to_keep`` applies).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            inputs_embeds = self.get_input_embeddings()(input_ids)
            has_placeholders = self.config.image_token_index is not None and bool(
                (input_ids == self.config.image_token_index).any()
            )
            if pixel_values_clip is not None or pixel_values_dino is not None:
                if pixel_values_clip is None or pixel_values_dino is None:
                    raise ValueError("pass both pixel_values_clip and pixel_values_dino")
                image_features = self.get_image_features(pixel_values_clip, pixel_values_dino)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif has_placeholders:
                raise ValueError("the text has image placeholder tokens but no pixel values were given")
        cache = kwargs.pop("cache", None)
        llm_kwargs = {
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            CACHE_NAME: cache if cache is not None else past_key_values,
            "use_cache": use_cache,
            **kwargs,
        }
        if labels is not None and self.labelled_logits_only and not {"return_dict", "shift_labels"} & kwargs.keys():
            parts = decoder_and_head(self.language_model)
            if parts is not None:
                return self._labelled_loss_forward(*parts, inputs_embeds, labels, llm_kwargs)
        return self.language_model(
            inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep, **llm_kwargs
        )

    @staticmethod
    def _labelled_loss_forward(
        decoder: nn.Module, lm_head: nn.Module, inputs_embeds: torch.Tensor, labels: torch.Tensor, llm_kwargs: dict
    ) -> CausalLMOutputWithPast:
        """The LLM's decoder body, then the LM head and loss at the labelled positions; logits are only theirs."""
        num_items_in_batch = llm_kwargs.pop("num_items_in_batch", None)
        outputs = decoder(inputs_embeds=inputs_embeds, **llm_kwargs)
        loss, logits = labelled_causal_lm_loss(outputs.last_hidden_state, labels, lm_head, num_items_in_batch)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME, None)},
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """Pass the images on the prefill step only; later steps read them from the KV cache.

        Decode steps get the new tokens' embeddings instead of their ids: nothing image-related runs after the
        prefill (no placeholder check, so no host sync and a step that compiles as one graph), and a generated
        ``<im_patch>`` is just a token.
        """
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in PIXEL_INPUTS:
                inputs.pop(key, None)
            if inputs.get("input_ids") is not None and inputs.get("inputs_embeds") is None:
                inputs["inputs_embeds"] = self.get_input_embeddings()(inputs.pop("input_ids"))
        return inputs


AutoConfig.register(CommConfig.model_type, CommConfig, exist_ok=True)
AutoModelForImageTextToText.register(CommConfig, CommForConditionalGeneration, exist_ok=True)
